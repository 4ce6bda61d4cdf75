//! Bottleneck adapters (Houlsby, Pfeiffer, parallel): no reference implementation exists in
//! PEFT, so the backward pass is checked by finite differences, the zero-initialised adapter
//! against the base model, the inference hook against the training forward pass, and a short
//! training run against the loss it should lower.

use peftkit_core::model::{ForwardOptions, Model, SeqInput};
use peftkit_core::rng::Rng;
use peftkit_core::train::bottleneck::{self, Activation, BottleneckConfig, Variant};
use peftkit_core::train::engine::{Batch, Engine};
use peftkit_core::train::params::TrainState;
use peftkit_tests::{eval_loss, fixtures, read_batch, read_tensors, run};

fn base() -> Model {
    Model::load(&fixtures().join("models").join("llama_gqa")).unwrap()
}

fn cfg(variant: Variant, activation: Activation) -> BottleneckConfig {
    BottleneckConfig {
        variant,
        size: 8,
        reduction_factor: 16,
        activation,
        base_model_name_or_path: None,
    }
}

const VARIANTS: [(Variant, Activation); 3] = [
    (Variant::Houlsby, Activation::Relu),
    (Variant::Pfeiffer, Activation::Silu),
    (Variant::Parallel, Activation::Silu),
];

/// Mean loss of the fixture batch (and gradients into `state` when `backward`).
fn loss(model: &Model, state: &mut TrainState, backward: bool) -> f64 {
    let (ids, labels) = read_batch(
        &fixtures()
            .join("train")
            .join("llama_gqa")
            .join("batch.json"),
    );
    let batch = Batch {
        ids: ids.iter().map(|v| &v[..]).collect(),
        labels: labels.iter().map(|v| &v[..]).collect(),
    };
    let n = batch.loss_tokens();
    let engine = if backward {
        Engine::new(model, state)
    } else {
        Engine::for_eval(model)
    };
    let s = engine
        .forward_backward(state, &batch, 1.0 / n as f32, &mut Rng::new(0))
        .unwrap();
    s.nll_sum / n as f64
}

/// Adapters with every tensor random (so that every gradient is non-trivial).
fn randomized(model: &Model, c: &BottleneckConfig, seed: u64) -> TrainState {
    let mut state = TrainState::new(model.linears().len());
    let mut rng = Rng::new(seed);
    bottleneck::attach(model, &mut state, c, &mut rng).unwrap();
    for sites in &mut state.bottleneck.as_mut().unwrap().units {
        for u in sites.iter_mut().flatten() {
            for v in u
                .down_w
                .iter_mut()
                .chain(&mut u.down_b)
                .chain(&mut u.up_w)
                .chain(&mut u.up_b)
            {
                *v = rng.normal() * 0.3;
            }
        }
    }
    state
}

#[test]
fn zero_initialised_adapters_leave_the_model_unchanged() {
    let model = base();
    let mut plain = TrainState::new(model.linears().len());
    let want = loss(&model, &mut plain, false);
    for (variant, act) in VARIANTS {
        let c = cfg(variant, act);
        let mut state = TrainState::new(model.linears().len());
        bottleneck::attach(&model, &mut state, &c, &mut Rng::new(1)).unwrap();
        assert_eq!(loss(&model, &mut state, false), want, "{variant:?}");
        assert_eq!(
            state.trainable_count(),
            bottleneck::param_count(&c, &model),
            "{variant:?}: parameter count"
        );
    }
}

#[test]
fn gradients_match_finite_differences() {
    let model = base();
    for (variant, act) in VARIANTS {
        let c = cfg(variant, act);
        let mut state = randomized(&model, &c, 3);
        loss(&model, &mut state, true);
        let grads: Vec<(String, Vec<f32>)> = state
            .params
            .iter()
            .map(|(_, p)| (p.name.clone(), p.grad.clone()))
            .collect();
        for (k, (name, g)) in grads.iter().enumerate() {
            // A few elements of every tensor, including the largest gradient.
            let big = (0..g.len())
                .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                .unwrap();
            for i in [0, g.len() / 2, big] {
                let eps = 1e-2f32;
                let slot = state.params[k].0;
                let mut at = |delta: f32| {
                    set(&mut state, slot, i, delta);
                    let l = loss(&model, &mut state, false);
                    set(&mut state, slot, i, -delta);
                    l
                };
                let fd = ((at(eps) - at(-eps)) / (2.0 * eps as f64)) as f32;
                let tol = 3e-2 * g[i].abs().max(1e-2) + 2e-4;
                assert!(
                    (fd - g[i]).abs() <= tol,
                    "{variant:?} {name}[{i}]: analytic {} vs finite difference {fd}",
                    g[i]
                );
            }
        }
    }
}

fn set(state: &mut TrainState, slot: peftkit_core::train::params::Slot, i: usize, delta: f32) {
    let peftkit_core::train::params::Slot::Bottleneck(b, site, part) = slot else {
        panic!("not an adapter slot")
    };
    let u = state.bottleneck.as_mut().unwrap().units[b][site]
        .as_mut()
        .unwrap();
    let t = match part {
        0 => &mut u.down_w,
        1 => &mut u.down_b,
        2 => &mut u.up_w,
        _ => &mut u.up_b,
    };
    t[i] += delta;
}

/// Saved, loaded and installed for inference, the adapters give the training forward pass's
/// loss.
#[test]
fn save_load_and_inference_agree_with_training() {
    let model = base();
    let (ids, labels) = read_batch(
        &fixtures()
            .join("train")
            .join("llama_gqa")
            .join("batch.json"),
    );
    for (variant, act) in VARIANTS {
        let c = cfg(variant, act);
        let mut state = randomized(&model, &c, 5);
        let train_loss = loss(&model, &mut state, false);
        let tmp = tempfile::tempdir().unwrap();
        bottleneck::save_adapter(tmp.path(), &c, &model, &state).unwrap();
        let saved = read_tensors(&tmp.path().join("adapter_model.safetensors"));
        assert_eq!(saved.len(), state.params.len());
        let mut inf = base();
        peftkit_core::train::lora::load_for_inference(&mut inf, tmp.path(), 0).unwrap();
        let opts = ForwardOptions { adapter: Some(0) };
        let (mut nll, mut n) = (0.0f64, 0usize);
        for (seq, lab) in ids.iter().zip(&labels) {
            let hidden = inf.forward(&[SeqInput { ids: seq }], None, &opts).unwrap();
            let targets: Vec<(usize, u32)> = (0..seq.len() - 1)
                .filter(|&j| lab[j + 1] != -100)
                .map(|j| (j, lab[j + 1] as u32))
                .collect();
            let lp = inf.target_logprobs(&hidden, &targets, &opts);
            nll -= lp.iter().map(|&v| v as f64).sum::<f64>();
            n += targets.len();
        }
        let inf_loss = nll / n as f64;
        assert!(
            (inf_loss - train_loss).abs() < 1e-5,
            "{variant:?}: inference {inf_loss} vs training {train_loss}"
        );
    }
}

#[test]
fn a_short_training_run_lowers_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("models").join("llama_gqa");
    let data = fixtures().join("data").join("text.jsonl");
    for variant in ["houlsby", "pfeiffer", "parallel"] {
        let out = tmp.path().join(variant);
        let o = run(
            "peft-train",
            &[
                "--model",
                model.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--method",
                "adapter",
                "--adapter-variant",
                variant,
                "--adapter-size",
                "8",
                "--steps",
                "8",
                "--batch",
                "2",
                "--lr",
                "0.01",
                "--schedule",
                "constant",
                "--val-data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        let eval_loss = |when: &str| eval_loss(&err, when);
        assert!(
            eval_loss("after") < eval_loss("before") - 1e-3,
            "{variant}: {err}"
        );
        let o = run(
            "peft-generate",
            &[
                "--model",
                model.to_str().unwrap(),
                "--adapter",
                out.to_str().unwrap(),
                "--prompt",
                "hello",
                "--max-new-tokens",
                "3",
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

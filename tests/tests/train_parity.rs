//! One training step against PEFT + torch (tests/fixtures/generate_train.py): the loss, the
//! gradient of every trainable tensor and the AdamW update, for LoRA (q/v, all-linear,
//! patterns), rsLoRA, DoRA and full fine-tuning on a tiny Llama and a tiny GPT-2.

use peftkit_core::kernels::ops::transpose;
use peftkit_core::model::{ForwardOptions, Model, SeqInput};
use peftkit_core::rng::Rng;
use peftkit_core::train::engine::{Batch, Engine};
use peftkit_core::train::optim::AdamW;
use peftkit_core::train::params::{Slot, TrainState};
use peftkit_core::train::{full, lora};
use peftkit_tests::{fixtures, read_batch, read_json, read_tensors as tensors};
use std::path::PathBuf;

fn batch_of(model: &str) -> (Vec<Vec<u32>>, Vec<Vec<i32>>) {
    read_batch(&fixtures().join("train").join(model).join("batch.json"))
}

/// The Conv1D (out, in) dims of a trainable GPT-2 weight, whose file layout is [in, out].
fn conv1d_dims(model: &Model, slot: Slot) -> Option<(usize, usize)> {
    match slot {
        Slot::LinearWeight(i) if model.linears()[i].conv1d => {
            let l = model.linears()[i];
            Some((l.out_features, l.in_features))
        }
        _ => None,
    }
}

/// Our in-memory [out, in] tensor in the orientation the reference stores.
fn as_stored(model: &Model, slot: Slot, v: &[f32]) -> Vec<f32> {
    match conv1d_dims(model, slot) {
        Some((o, n)) => transpose(v, o, n),
        None => v.to_vec(),
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= rel * scale,
        "{what}: max |Δ| {err} vs max |ref| {scale}"
    );
}

fn run_case(model_name: &str, case: &str) {
    let dir: PathBuf = fixtures().join("train").join(model_name).join(case);
    let reference = read_json(&dir.join("reference.json"));
    let mut model = Model::load(&fixtures().join("models").join(model_name)).unwrap();
    let mut state = TrainState::new(model.linears().len());
    if case == "full" {
        full::register(&model, &mut state, |_| true, true);
    } else {
        lora::load_adapter(&dir.join("adapter_init"), &model, &mut state).unwrap();
    }
    let (ids, labels) = batch_of(model_name);
    let batch = Batch {
        ids: ids.iter().map(|v| &v[..]).collect(),
        labels: labels.iter().map(|v| &v[..]).collect(),
    };
    let n = batch.loss_tokens();
    let stats = {
        let engine = Engine::new(&model, &state);
        engine
            .forward_backward(&mut state, &batch, 1.0 / n as f32, &mut Rng::new(0))
            .unwrap()
    };
    let loss = stats.nll_sum / n as f64;
    let want_loss = reference["loss"].as_f64().unwrap();
    assert!(
        (loss - want_loss).abs() < 1e-5,
        "{model_name}/{case}: loss {loss} vs {want_loss}"
    );

    let grads = tensors(&dir.join("grads.safetensors"));
    assert_eq!(
        grads.len(),
        state.params.len(),
        "{model_name}/{case}: trainable tensors"
    );
    for (name, _, want) in &grads {
        let (slot, p) = state
            .params
            .iter()
            .find(|(_, p)| &p.name == name)
            .unwrap_or_else(|| panic!("{name} not trained"));
        let got = as_stored(&model, *slot, &p.grad);
        assert_close(
            &format!("{model_name}/{case} grad {name}"),
            &got,
            want,
            1e-4,
        );
    }

    // The update, from the reference gradients: an element whose gradient is ~0 (e.g. GPT-2's
    // key bias, mathematically zero) moves by ±lr depending on the sign of rounding noise, so
    // the optimizer is checked on the reference's own gradients (exact arithmetic check) after
    // the gradients themselves were checked above.
    for (name, _, want) in &grads {
        let (slot, p) = state
            .params
            .iter_mut()
            .find(|(_, p)| &p.name == name)
            .unwrap();
        let g = match conv1d_dims(&model, *slot) {
            Some((o, n)) => transpose(want, n, o),
            None => want.clone(),
        };
        p.grad = g;
    }
    let opt = AdamW {
        lr: reference["lr"].as_f64().unwrap() as f32,
        beta1: 0.9,
        beta2: 0.999,
        eps: reference["eps"].as_f64().unwrap() as f32,
        weight_decay: reference["weight_decay"].as_f64().unwrap() as f32,
    };
    opt.step(&mut state, &mut model, opt.lr, 1);
    for (name, _, want) in tensors(&dir.join("updated.safetensors")) {
        let (slot, _) = state.params.iter().find(|(_, p)| p.name == name).unwrap();
        let got = as_stored(&model, *slot, state.value(&model, *slot));
        assert_close(
            &format!("{model_name}/{case} updated {name}"),
            &got,
            &want,
            1e-6,
        );
    }
}

#[test]
fn llama_lora_steps_match_peft() {
    for case in ["lora_qv", "lora_all", "rslora", "dora", "lora_bias_mts"] {
        run_case("llama_gqa", case);
    }
}

#[test]
fn llama_full_step_matches_torch() {
    run_case("llama_gqa", "full");
}

#[test]
fn gpt2_steps_match_peft_and_torch() {
    for case in ["lora_c_attn", "lora_all", "full"] {
        run_case("gpt2", case);
    }
}

/// Adapters written by PEFT load here and give PEFT's logits.
#[test]
fn peft_adapters_give_peft_logits() {
    for (model_name, folder) in [
        ("llama_gqa", "peft_adapter"),
        ("llama_gqa", "peft_dora_adapter"),
        ("gpt2", "peft_adapter"),
    ] {
        let dir = fixtures().join("train").join(model_name).join(folder);
        let mut model = Model::load(&fixtures().join("models").join(model_name)).unwrap();
        let mut state = TrainState::new(model.linears().len());
        lora::load_adapter(&dir, &model, &mut state).unwrap();
        lora::install(&mut model, state, 0);
        let (ids, _) = batch_of(model_name);
        let want = tensors(&dir.join("logits.safetensors"));
        let opts = ForwardOptions { adapter: Some(0) };
        for (i, seq) in ids.iter().enumerate() {
            let hidden = model
                .forward(&[SeqInput { ids: seq }], None, &opts)
                .unwrap();
            let logits = model.logits(&hidden, seq.len(), &opts);
            let (_, _, w) = want
                .iter()
                .find(|(n, _, _)| n == &format!("logits.{i}"))
                .unwrap();
            let err = logits
                .iter()
                .zip(w)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-4,
                "{model_name}/{folder} seq {i}: max |Δ logit| {err}"
            );
        }
    }
}

//! PPO's update objective through the whole model: its hand-written gradients (policy loss
//! through the LM head and blocks into LoRA, value loss into the value head and the backbone)
//! agree with finite differences of the loss.

use peftkit_core::model::Model;
use peftkit_core::rng::Rng;
use peftkit_core::train::engine::{Batch, Engine};
use peftkit_core::train::lora::{self, LoraConfig, Targets};
use peftkit_core::train::params::{ParamState, Slot, TrainState};
use peftkit_core::train::ppo_objective::{PpoObjective, RolloutEval, RolloutSeq};
use peftkit_tests::fixtures;

fn setup() -> (Model, TrainState) {
    let model = Model::load(&fixtures().join("models").join("llama_gqa")).unwrap();
    let mut state = TrainState::new(model.linears().len());
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: Targets::Names(vec!["q_proj".into(), "v_proj".into()]),
        ..LoraConfig::default()
    };
    let mut rng = Rng::new(3);
    lora::attach(&model, &mut state, &cfg, &mut rng).unwrap();
    for l in state.lora.iter_mut().flatten() {
        l.b.iter_mut().for_each(|b| *b = rng.normal() * 0.05);
    }
    let h = model.config.hidden;
    state.value_head = Some((0..h).map(|_| rng.normal() * 0.1).collect());
    state.value_bias = Some(0.1);
    state.add(
        Slot::ValueHead,
        ParamState::new("v_head.summary.weight".into(), vec![1, h], true),
    );
    state.add(
        Slot::ValueBias,
        ParamState::new("v_head.summary.bias".into(), vec![1], false),
    );
    (model, state)
}

const SEQS: [&[u32]; 2] = [&[5, 17, 40, 99, 23, 8, 61], &[12, 7, 300, 45, 9]];
const QUERY: [usize; 2] = [3, 2];

fn loss(model: &Model, state: &mut TrainState, obj: &mut PpoObjective, backward: bool) -> f64 {
    let labels: Vec<Vec<i32>> = SEQS.iter().map(|s| vec![-100; s.len()]).collect();
    let batch = Batch {
        ids: SEQS.to_vec(),
        labels: labels.iter().map(Vec::as_slice).collect(),
    };
    let engine = if backward {
        Engine::new(model, state)
    } else {
        Engine::for_eval(model)
    };
    engine
        .forward_backward_with(state, &batch, &mut Rng::new(0), obj)
        .unwrap();
    obj.pg_loss + obj.vf_loss
}

#[test]
fn ppo_gradients_match_finite_differences() {
    check(1.0, false);
}

/// Log-probs at the sampling temperature, and PPOv2's terminal position (a value one past the
/// last token, no policy term).
#[test]
fn ppo_gradients_match_with_temperature_and_terminal_position() {
    check(0.7, true);
}

fn check(temperature: f32, terminal: bool) {
    let (model, mut state) = setup();
    // current log-probs and values, then "old" ones offset so that some ratios and values clip
    let empty: Vec<RolloutSeq> = (0..2)
        .map(|i| {
            let n = SEQS[i].len() - QUERY[i] + usize::from(terminal && i == 0);
            RolloutSeq {
                query_len: QUERY[i],
                old_logp: vec![0.0; n],
                old_value: vec![0.0; n],
                advantage: vec![0.0; n],
                returns: vec![0.0; n],
                policy_mask: vec![true; n],
                value_mask: vec![true; n],
            }
        })
        .collect();
    let mut probe = PpoObjective::new(empty.clone(), 0.2, 0.2, 0.1);
    probe.temperature = temperature;
    loss(&model, &mut state, &mut probe, false);
    // the rollout pass computes the same log-probs and values (the ratio starts at 1)
    let shape: Vec<(usize, usize, bool)> = (0..2)
        .map(|i| (QUERY[i], SEQS[i].len() - QUERY[i], terminal && i == 0))
        .collect();
    let mut ev = RolloutEval::new(shape, temperature, true);
    let labels: Vec<Vec<i32>> = SEQS.iter().map(|s| vec![-100; s.len()]).collect();
    let batch = Batch {
        ids: SEQS.to_vec(),
        labels: labels.iter().map(Vec::as_slice).collect(),
    };
    Engine::for_eval(&model)
        .forward_backward_with(&mut state, &batch, &mut Rng::new(0), &mut ev)
        .unwrap();
    let mut k = 0;
    for i in 0..2 {
        for t in 0..ev.values[i].len() {
            assert!((ev.values[i][t] - probe.values[k]).abs() < 1e-5);
            if t < ev.logp[i].len() {
                assert!(
                    (ev.logp[i][t] - probe.logp[k]).abs() < 1e-4,
                    "logp {} vs {}",
                    ev.logp[i][t],
                    probe.logp[k]
                );
                assert!(ev.entropies[i][t] > 0.0);
            }
            k += 1;
        }
    }
    let offsets = [-0.5, 0.0, 0.05, 0.5, 0.02, -0.03, 0.4];
    let mut k = 0;
    let seqs: Vec<RolloutSeq> = empty
        .into_iter()
        .map(|mut s| {
            for t in 0..s.old_logp.len() {
                let o = offsets[k % offsets.len()];
                s.old_logp[t] = probe.logp[k] + o;
                s.old_value[t] = probe.values[k] - o;
                s.advantage[t] = if k % 2 == 0 { 1.3 } else { -0.7 };
                s.returns[t] = probe.values[k] + 0.8 - 0.3 * k as f64;
                k += 1;
            }
            // the last position counts for the value loss only (TRL's one-step-later mask)
            let n = s.policy_mask.len();
            s.policy_mask[n - 1] = false;
            s
        })
        .collect();
    let mut obj = PpoObjective::new(seqs, 0.2, 0.2, 0.1);
    obj.temperature = temperature;
    state.zero_grads();
    let l0 = loss(&model, &mut state, &mut obj, true);
    assert!(
        obj.clipfrac > 0.0 && obj.clipfrac < 1.0,
        "clipfrac {}",
        obj.clipfrac
    );
    let grads: Vec<(Slot, Vec<f32>)> = state
        .params
        .iter()
        .map(|(s, p)| (*s, p.grad.clone()))
        .collect();
    let eps = 1e-3f32;
    let mut checked = 0;
    for (slot, g) in &grads {
        // the largest gradient entry of each tensor
        let (i, &gi) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        if gi.abs() < 1e-4 {
            continue;
        }
        let f = |d: f32| {
            let mut st = TrainState::new(model.linears().len());
            st.lora = state.lora.clone();
            st.value_head = state.value_head.clone();
            st.value_bias = state.value_bias;
            match slot {
                Slot::LoraA(j) => st.lora[*j].as_mut().unwrap().a[i] += d,
                Slot::LoraB(j) => st.lora[*j].as_mut().unwrap().b[i] += d,
                Slot::ValueHead => st.value_head.as_mut().unwrap()[i] += d,
                Slot::ValueBias => *st.value_bias.as_mut().unwrap() += d,
                _ => unreachable!(),
            }
            let mut o = PpoObjective::new(obj.seqs.clone(), 0.2, 0.2, 0.1);
            o.temperature = temperature;
            loss(&model, &mut st, &mut o, false)
        };
        let num = (f(eps) - f(-eps)) / (2.0 * eps as f64);
        let rel = (num - gi as f64).abs() / num.abs().max(gi.abs() as f64);
        assert!(
            rel < 2e-2,
            "{slot:?}[{i}]: analytic {gi}, numeric {num} (loss {l0})"
        );
        checked += 1;
    }
    assert!(
        checked >= 5,
        "only {checked} tensors had a gradient to check"
    );
}

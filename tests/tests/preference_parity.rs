//! Reward-model and DPO objectives against TRL 1.16 (tests/fixtures/generate_preference.py):
//! scores read where transformers reads them, losses with margin and centering, DPO's
//! sigmoid / hinge / IPO / robust losses, and the gradients of every trainable tensor.

use peftkit_core::io::safetensors_file::{to_f32, SafetensorsFile};
use peftkit_core::model::Model;
use peftkit_core::rng::Rng;
use peftkit_core::train::engine::{Batch, Engine};
use peftkit_core::train::lora;
use peftkit_core::train::params::{ParamState, Slot, TrainState};
use peftkit_core::train::preference::{DpoLoss, DpoObjective, RewardLoss, Scores, SeqLogprobs};
use peftkit_tests::{fixtures, read_json, read_tensors};
use serde_json::Value;
use std::path::PathBuf;

fn dir(case: &str) -> PathBuf {
    fixtures().join("preference").join(case)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn base() -> Model {
    Model::load(&fixtures().join("models").join("llama_gqa")).unwrap()
}

/// LoRA from the adapter directory, plus its `score` head when it has one, all trainable.
fn load(model: &Model, case: &str) -> TrainState {
    let adapter = dir(case).join("adapter_init");
    let mut state = TrainState::new(model.linears().len());
    lora::load_adapter(&adapter, model, &mut state).unwrap();
    let f = SafetensorsFile::open(&adapter.join("adapter_model.safetensors")).unwrap();
    if let Some(t) = f.get("base_model.model.score.weight") {
        state.score = Some(to_f32("score", &t).unwrap());
        state.add(
            Slot::Score,
            ParamState::new(
                "base_model.model.score.weight".into(),
                vec![1, model.config.hidden],
                true,
            ),
        );
    }
    state
}

fn check_grads(model: &Model, state: &TrainState, file: &str, tol: f32) {
    let want =
        read_tensors(&dir(file.split('/').next().unwrap()).join(file.split('/').nth(1).unwrap()));
    assert!(!want.is_empty());
    for (name, _, w) in &want {
        let (_, p) = state
            .params
            .iter()
            .find(|(_, p)| &p.name == name)
            .unwrap_or_else(|| panic!("no trainable tensor {name}"));
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        let err = p
            .grad
            .iter()
            .zip(w)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= tol * scale.max(1.0),
            "{file}: {name}: max |Δ grad| {err} (largest {scale})"
        );
    }
    let _ = model;
}

#[test]
fn reward_scores_are_read_where_transformers_reads_them() {
    let model = base();
    let mut state = load(&model, "rm");
    let scores = read_json(&dir("rm").join("scores.json"));
    let seqs: Vec<Vec<u32>> = scores["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| ids(&s["ids"]))
        .collect();
    let labels: Vec<Vec<i32>> = seqs.iter().map(|s| vec![-100; s.len()]).collect();
    let batch = Batch {
        ids: seqs.iter().map(Vec::as_slice).collect(),
        labels: labels.iter().map(Vec::as_slice).collect(),
    };
    let mut obj = Scores {
        pad: Some(2),
        scores: Vec::new(),
    };
    Engine::for_eval(&model)
        .forward_backward_with(&mut state, &batch, &mut Rng::new(0), &mut obj)
        .unwrap();
    for (s, got) in scores["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&obj.scores)
    {
        let want = s["score"].as_f64().unwrap() as f32;
        assert!(
            (got - want).abs() <= 1e-5,
            "score {got} vs transformers {want}"
        );
    }
}

#[test]
fn reward_loss_and_gradients_match_trl() {
    let model = base();
    let mut state = load(&model, "rm");
    let r = read_json(&dir("rm").join("reference.json"));
    let mut seqs: Vec<Vec<u32>> = r["chosen_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    seqs.extend(r["rejected_ids"].as_array().unwrap().iter().map(ids));
    let labels: Vec<Vec<i32>> = seqs.iter().map(|s| vec![-100; s.len()]).collect();
    let batch = Batch {
        ids: seqs.iter().map(Vec::as_slice).collect(),
        labels: labels.iter().map(Vec::as_slice).collect(),
    };
    let margins: Vec<f32> = floats(&r["margin"]).iter().map(|&m| m as f32).collect();
    let pairs = margins.len();
    let run = |state: &mut TrainState, margins: Vec<f32>, center: Option<f32>| {
        let mut obj = RewardLoss {
            pad: Some(2),
            margins,
            center,
            loss_scale: 1.0 / pairs as f32,
            rewards: Vec::new(),
        };
        let s = Engine::new(&model, state)
            .forward_backward_with(state, &batch, &mut Rng::new(0), &mut obj)
            .unwrap();
        (s.nll_sum / pairs as f64, obj.rewards)
    };
    let (plain, rewards) = run(&mut state, Vec::new(), None);
    for (k, (rc, rr)) in rewards.iter().enumerate() {
        assert!((*rc as f64 - r["rewards_chosen"][k].as_f64().unwrap()).abs() < 1e-5);
        assert!((*rr as f64 - r["rewards_rejected"][k].as_f64().unwrap()).abs() < 1e-5);
    }
    assert!((plain - r["losses"]["plain"].as_f64().unwrap()).abs() < 1e-5);
    let (with_margin, _) = run(&mut state, margins.clone(), None);
    assert!((with_margin - r["losses"]["margin"].as_f64().unwrap()).abs() < 1e-5);
    state.zero_grads();
    let (full, _) = run(&mut state, margins, Some(0.01));
    assert!((full - r["losses"]["margin_center"].as_f64().unwrap()).abs() < 1e-5);
    check_grads(&model, &state, "rm/grads.safetensors", 1e-4);
}

fn dpo_batch(r: &Value) -> (Vec<Vec<u32>>, Vec<Vec<i32>>) {
    let mut seqs = Vec::new();
    let mut labels = Vec::new();
    for which in ["chosen_ids", "rejected_ids"] {
        for e in r["examples"].as_array().unwrap() {
            let p = ids(&e["prompt_ids"]);
            let c = ids(&e[which]);
            let mut s = p.clone();
            s.extend(&c);
            let mut l = vec![-100i32; p.len()];
            l.extend(c.iter().map(|&t| t as i32));
            seqs.push(s);
            labels.push(l);
        }
    }
    (seqs, labels)
}

#[test]
fn dpo_losses_and_gradients_match_trl() {
    let model = base();
    let r = read_json(&dir("dpo").join("reference.json"));
    let (seqs, labels) = dpo_batch(&r);
    let batch = Batch {
        ids: seqs.iter().map(Vec::as_slice).collect(),
        labels: labels.iter().map(Vec::as_slice).collect(),
    };
    let pairs = seqs.len() / 2;
    // the reference: the same model with no adapter
    let mut plain = TrainState::new(model.linears().len());
    let mut reference = SeqLogprobs::default();
    Engine::for_eval(&model)
        .forward_backward_with(&mut plain, &batch, &mut Rng::new(0), &mut reference)
        .unwrap();
    let (rc, rr) = (
        floats(&r["reference_chosen_logps"]),
        floats(&r["reference_rejected_logps"]),
    );
    for k in 0..pairs {
        assert!((reference.logps[k] - rc[k]).abs() < 1e-4, "ref chosen {k}");
        assert!(
            (reference.logps[k + pairs] - rr[k]).abs() < 1e-4,
            "ref rejected {k}"
        );
    }
    let refs: Vec<(f64, f64)> = (0..pairs)
        .map(|k| (reference.logps[k], reference.logps[k + pairs]))
        .collect();
    for (name, kind) in [
        ("sigmoid", DpoLoss::Sigmoid),
        ("hinge", DpoLoss::Hinge),
        ("ipo", DpoLoss::Ipo),
        ("robust", DpoLoss::Robust),
    ] {
        let mut state = load(&model, "dpo");
        let mut obj = DpoObjective {
            kind,
            beta: r["beta"].as_f64().unwrap() as f32,
            label_smoothing: r["label_smoothing"].as_f64().unwrap() as f32,
            reference: refs.clone(),
            loss_scale: 1.0 / pairs as f32,
            policy: Vec::new(),
        };
        let s = Engine::new(&model, &state)
            .forward_backward_with(&mut state, &batch, &mut Rng::new(0), &mut obj)
            .unwrap();
        let (pc, pr) = (
            floats(&r["policy_chosen_logps"]),
            floats(&r["policy_rejected_logps"]),
        );
        for k in 0..pairs {
            assert!(
                (obj.policy[k].0 - pc[k]).abs() < 1e-4,
                "{name}: policy chosen {k}"
            );
            assert!(
                (obj.policy[k].1 - pr[k]).abs() < 1e-4,
                "{name}: policy rejected {k}"
            );
        }
        let want = r["losses"][name]["mean"].as_f64().unwrap();
        let got = s.nll_sum / pairs as f64;
        assert!(
            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
            "{name}: loss {got} vs TRL {want}"
        );
        if let Some(f) = r["grads_files"][name].as_str() {
            check_grads(&model, &state, &format!("dpo/{f}"), 1e-4);
        }
    }
}

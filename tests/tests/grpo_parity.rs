//! GRPO against TRL 1.16's GRPOTrainer (tests/fixtures/generate_grpo.py): group-relative
//! advantages from weighted reward functions with unscorable completions, per-token log-probs
//! at the sampling temperature under the policy and the reference (adapter off), and the loss
//! and LoRA gradients of every loss type, with clipping, two-sided clipping, GSPO's
//! sequence-level ratio, masked truncated completions and no KL.

use peftkit_core::model::Model;
use peftkit_core::rng::Rng;
use peftkit_core::train::engine::{Batch, Engine};
use peftkit_core::train::grpo_math::{
    advantages, Aggregation, GrpoLoss, LossType, RatioLevel, RewardScale, StepShare, Vespo,
};
use peftkit_core::train::grpo_objective::{GrpoObjective, GrpoSeq};
use peftkit_core::train::lora;
use peftkit_core::train::params::TrainState;
use peftkit_core::train::ppo_objective::RolloutEval;
use peftkit_tests::{fixtures, read_json, read_tensors};
use serde_json::Value;
use std::path::PathBuf;

fn dir() -> PathBuf {
    fixtures().join("grpo")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Numbers, null as NaN.
fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN))
        .collect()
}

fn ragged(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(floats).collect()
}

struct Setup {
    model: Model,
    r: Value,
    seqs: Vec<Vec<u32>>,
    prompt_len: Vec<usize>,
}

fn setup() -> Setup {
    let model = Model::load(&fixtures().join("models").join("llama_gqa")).unwrap();
    let r = read_json(&dir().join("reference.json"));
    let prompts: Vec<Vec<u32>> = r["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let completions: Vec<Vec<u32>> = r["completion_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let g = r["num_generations"].as_u64().unwrap() as usize;
    let mut seqs = Vec::new();
    let mut prompt_len = Vec::new();
    for (i, c) in completions.iter().enumerate() {
        let mut s = prompts[i / g].clone();
        prompt_len.push(s.len());
        s.extend_from_slice(c);
        seqs.push(s);
    }
    Setup {
        model,
        r,
        seqs,
        prompt_len,
    }
}

fn policy(model: &Model) -> TrainState {
    let mut state = TrainState::new(model.linears().len());
    lora::load_adapter(&dir().join("adapter_init"), model, &mut state).unwrap();
    state
}

fn batch(s: &Setup) -> (Vec<Vec<i32>>, Vec<&[u32]>) {
    let labels = s.seqs.iter().map(|q| vec![-100; q.len()]).collect();
    (labels, s.seqs.iter().map(Vec::as_slice).collect())
}

/// Per-token log-probs at the fixture's temperature under `state` (an empty state: the base).
fn logps(s: &Setup, state: &mut TrainState) -> Vec<Vec<f64>> {
    let (labels, ids) = batch(s);
    let b = Batch {
        ids,
        labels: labels.iter().map(Vec::as_slice).collect(),
    };
    let shape = s
        .seqs
        .iter()
        .zip(&s.prompt_len)
        .map(|(q, &p)| (p, q.len() - p, false))
        .collect();
    let t = s.r["temperature"].as_f64().unwrap() as f32;
    let mut obj = RolloutEval::new(shape, t, true);
    Engine::for_eval(&s.model)
        .forward_backward_with(state, &b, &mut Rng::new(0), &mut obj)
        .unwrap();
    obj.logp
}

fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x.is_nan() || y.is_nan() {
            assert!(x.is_nan() && y.is_nan(), "{what}[{i}]: {x} vs {y}");
            continue;
        }
        assert!(
            (x - y).abs() <= tol * y.abs().max(1.0),
            "{what}[{i}]: {x} vs TRL {y}"
        );
    }
}

#[test]
fn advantages_match_trl() {
    let s = setup();
    let r = &s.r;
    let table: Vec<Vec<f64>> = ragged(&r["rewards_table"]);
    let weights = floats(&r["reward_weights"]);
    let g = r["num_generations"].as_u64().unwrap() as usize;
    for (case, scale, agg) in [
        ("group", RewardScale::Group, Aggregation::SumThenNormalize),
        ("batch", RewardScale::Batch, Aggregation::SumThenNormalize),
        ("none", RewardScale::None, Aggregation::SumThenNormalize),
        (
            "normalize_then_sum",
            RewardScale::Group,
            Aggregation::NormalizeThenSum,
        ),
    ] {
        let want = &r["advantages"][case];
        let a = advantages(&table, &weights, g, scale, agg);
        close(&a.advantages, &floats(&want["advantages"]), 2e-5, case);
        let zero: Vec<bool> = want["is_std_zero"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_bool().unwrap())
            .collect();
        assert_eq!(a.std_zero, zero, "{case}: is_std_zero");
        let m = &want["metrics"];
        let mean = peftkit_core::train::grpo_math::nanmean(&a.rewards);
        if agg == Aggregation::SumThenNormalize {
            assert!(
                (mean - m["reward"].as_f64().unwrap()).abs() < 1e-6,
                "{case}: reward"
            );
        }
    }
}

#[test]
fn log_probs_at_the_temperature_match_trl_under_policy_and_reference() {
    let s = setup();
    let mut state = policy(&s.model);
    let pol = logps(&s, &mut state);
    let refe = logps(&s, &mut TrainState::new(s.model.linears().len()));
    let want_pol = ragged(&s.r["logps"]["policy"]);
    let want_ref = ragged(&s.r["logps"]["reference"]);
    for i in 0..s.seqs.len() {
        close(&pol[i], &want_pol[i], 1e-4, &format!("policy row {i}"));
        close(&refe[i], &want_ref[i], 1e-4, &format!("reference row {i}"));
    }
}

fn check_grads(state: &TrainState, file: &str, case: &str) {
    let want = read_tensors(&dir().join(file));
    assert_eq!(want.len(), 8, "{case}: gradient tensors");
    for (name, _, w) in &want {
        let (_, p) = state
            .params
            .iter()
            .find(|(_, p)| &p.name == name)
            .unwrap_or_else(|| panic!("{case}: no trainable tensor {name}"));
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        let err = p
            .grad
            .iter()
            .zip(w)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= 2e-4 * scale,
            "{case}: {name}: max |Δ grad| {err} (largest {scale})"
        );
    }
}

#[test]
fn losses_and_gradients_of_every_case_match_trl() {
    let s = setup();
    let r = &s.r;
    let refe = logps(&s, &mut TrainState::new(s.model.linears().len()));
    let t = r["temperature"].as_f64().unwrap() as f32;
    let max_len = r["max_completion_length"].as_u64().unwrap() as usize;
    let truncated: Vec<bool> = r["is_truncated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    let adv = floats(&r["advantages"]["group"]["advantages"]);
    let cases = r["loss_cases"].as_object().unwrap();
    assert_eq!(cases.len(), 15);
    for (case, c) in cases {
        let cfg = &c["config"];
        let loss_type = LossType::parse(cfg["loss_type"].as_str().unwrap()).unwrap();
        let level = match cfg["importance_sampling_level"].as_str().unwrap() {
            "token" => RatioLevel::Token,
            _ => RatioLevel::Sequence,
        };
        let beta = cfg["beta"].as_f64().unwrap();
        let loss = GrpoLoss {
            loss_type,
            epsilon_low: cfg["epsilon"].as_f64().unwrap(),
            epsilon_high: cfg["epsilon_high_effective"].as_f64().unwrap(),
            delta: cfg["delta"].as_f64(),
            beta,
            kl_ratio: cfg["use_bias_correction_kl"].as_bool().unwrap(),
            level,
            max_completion_len: max_len,
            sapo_temperature_pos: cfg["sapo_temperature_pos"].as_f64().unwrap(),
            sapo_temperature_neg: cfg["sapo_temperature_neg"].as_f64().unwrap(),
            top_entropy_quantile: cfg["top_entropy_quantile"].as_f64().unwrap(),
            vespo: Vespo {
                k_pos: cfg["vespo_k_pos"].as_f64().unwrap(),
                lambda_pos: cfg["vespo_lambda_pos"].as_f64().unwrap(),
                k_neg: cfg["vespo_k_neg"].as_f64().unwrap(),
                lambda_neg: cfg["vespo_lambda_neg"].as_f64().unwrap(),
            },
            entropy_coef: cfg["entropy_coef"].as_f64().unwrap(),
            off_policy_threshold: cfg["off_policy_mask_threshold"].as_f64(),
        };
        let mask_truncated = cfg["mask_truncated_completions"].as_bool().unwrap();
        let old = c["old_per_token_logps"]
            .as_array()
            .map(|_| ragged(&c["old_per_token_logps"]));
        let data: Vec<GrpoSeq> = (0..s.seqs.len())
            .map(|i| GrpoSeq {
                prompt_len: s.prompt_len[i],
                mask: vec![!(mask_truncated && truncated[i]); s.seqs[i].len() - s.prompt_len[i]],
                advantage: adv[i],
                old_logp: old.as_ref().map(|o| o[i].clone()),
                ref_logp: (beta != 0.0).then(|| refe[i].clone()),
            })
            .collect();
        let step_tokens: usize = data
            .iter()
            .map(|d| d.mask.iter().filter(|&&m| m).count())
            .sum();
        assert_eq!(
            step_tokens as u64,
            cfg["num_items_in_batch"].as_u64().unwrap(),
            "{case}: counted tokens"
        );
        let mut state = policy(&s.model);
        let mut obj = GrpoObjective::new(
            data,
            loss,
            StepShare {
                grad_accum: 1,
                step_tokens,
            },
            t,
        );
        let (labels, ids) = batch(&s);
        let b = Batch {
            ids,
            labels: labels.iter().map(Vec::as_slice).collect(),
        };
        Engine::new(&s.model, &state)
            .forward_backward_with(&mut state, &b, &mut Rng::new(0), &mut obj)
            .unwrap();
        let want = c["loss"].as_f64().unwrap();
        assert!(
            (obj.out.loss - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{case}: loss {} vs TRL {want}",
            obj.out.loss
        );
        let m = &c["metrics"];
        if beta != 0.0 {
            let kl = obj.out.kl_sum / obj.out.tokens as f64;
            let w = m["kl"].as_f64().unwrap();
            assert!(
                (kl - w).abs() <= 1e-5 * w.abs().max(1e-3),
                "{case}: kl {kl} vs {w}"
            );
        }
        // TRL's entropy metric: the policy's tempered entropy, averaged over counted tokens
        let ent = obj.entropy_sum / obj.out.tokens as f64;
        let w = m["entropy"].as_f64().unwrap();
        assert!(
            (ent - w).abs() <= 1e-4 * w.abs(),
            "{case}: entropy {ent} vs {w}"
        );
        let count = match level {
            RatioLevel::Token => obj.out.tokens,
            RatioLevel::Sequence => obj.out.completions,
        } as f64;
        // TRL logs CISPO's capped fraction instead of the clip ratios, VESPO's mean φ over
        // the completions, and nothing for SAPO
        let completions = obj.out.completions as f64;
        let clip_metrics: &[(f64, &str)] = match loss_type {
            LossType::Cispo => &[(obj.out.high_clipped / count, "cispo_clip_ratio")],
            LossType::Sapo => &[],
            LossType::Vespo => &[(obj.out.phi_sum / completions, "vespo/phi_seq_mean")],
            _ => &[
                (obj.out.low_clipped / count, "clip_ratio/low_mean"),
                (obj.out.high_clipped / count, "clip_ratio/high_mean"),
                (obj.out.region_clipped / count, "clip_ratio/region_mean"),
            ],
        };
        for &(ours, key) in clip_metrics {
            let w = m[key].as_f64().unwrap();
            assert!((ours - w).abs() < 1e-6, "{case}: {key} {ours} vs {w}");
        }
        check_grads(&state, c["grads_file"].as_str().unwrap(), case);
    }
}

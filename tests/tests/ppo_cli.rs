//! ppo-train end to end on the tiny Llama: a reward model trained by rm-train in the test,
//! PPO raising its score with the KL to the reference bounded, exact resume, starting from an
//! SFT adapter, the output loading in peft-generate, and clean failures.

use peftkit_core::io::safetensors_file::SafetensorsFile;
use peftkit_tests::{assert_clean_error, fixtures, run};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn model() -> PathBuf {
    fixtures().join("models").join("llama_gqa")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A reward model that prefers completions ending in " yes yes" over " no no".
fn reward_model(dir: &Path) -> PathBuf {
    let words = [
        "apple", "river", "stone", "cloud", "green", "quick", "slow", "table", "music", "light",
    ];
    let mut state = 12345u64;
    let mut pick = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        words[(state >> 33) as usize % words.len()]
    };
    let mut lines = String::new();
    for _ in 0..64 {
        let prompt = format!("{} {} {}:", pick(), pick(), pick());
        let body = format!("{} {}", pick(), pick());
        lines += &json!({"prompt": prompt, "chosen": format!(" {body} yes yes"), "rejected": format!(" {body} no no")}).to_string();
        lines.push('\n');
    }
    let data = dir.join("pairs.jsonl");
    std::fs::write(&data, lines).unwrap();
    let out = dir.join("rm");
    let r = run(
        "rm-train",
        &[
            "--model",
            s(&model()),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--lr",
            "3e-3",
            "--batch",
            "8",
            "--steps",
            "30",
            "--quiet",
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    out
}

fn prompts(dir: &Path, texts: &[&str], copies: usize) -> PathBuf {
    let p = dir.join("prompts.jsonl");
    let mut lines = String::new();
    for _ in 0..copies {
        for t in texts {
            lines += &json!({ "prompt": t }).to_string();
            lines.push('\n');
        }
    }
    std::fs::write(&p, lines).unwrap();
    p
}

fn ppo(rm: &Path, data: &Path, out: &Path, extra: &[&str]) -> (Vec<Value>, String) {
    let log = out.with_extension("jsonl");
    let _ = std::fs::remove_file(&log);
    let m = model();
    let mut args = vec![
        "--model",
        s(&m),
        "--reward-model",
        s(rm),
        "--prompts",
        s(data),
        "--out",
        s(out),
        "--log",
        s(&log),
        "--lr",
        "3e-3",
        "--batch",
        "16",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let r = run("ppo-train", &args);
    assert!(
        r.status.success(),
        "ppo-train failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let lines = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (lines, String::from_utf8_lossy(&r.stdout).into_owned())
}

fn evals(log: &[Value]) -> Vec<(f64, f64)> {
    log.iter()
        .filter(|v| v.get("eval_score").is_some())
        .map(|v| {
            (
                v["eval_score"].as_f64().unwrap(),
                v["eval_kl"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn ppo_raises_the_reward_with_bounded_kl_and_writes_a_loadable_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = reward_model(tmp.path());
    let data = prompts(tmp.path(), &["apple river stone:", "quick slow table:"], 8);
    let out = tmp.path().join("ppo");
    let (log, stdout) = ppo(
        &rm,
        &data,
        &out,
        &["--response-length", "1", "--steps", "40"],
    );
    let e = evals(&log);
    assert_eq!(e.len(), 2, "evaluation before and after");
    let (before, after) = (e[0], e[1]);
    assert_eq!(before.1, 0.0, "the untrained policy is the reference");
    assert!(
        after.0 > before.0 + 0.3,
        "mean score should rise: {before:?} -> {after:?}"
    );
    assert!(
        after.1 > 0.0 && after.1 < 10.0,
        "KL to the reference stays bounded: {}",
        after.1
    );
    assert!(stdout.contains("mean score"), "{stdout}");
    let steps: Vec<&Value> = log
        .iter()
        .filter(|v| v.get("score_mean").is_some())
        .collect();
    assert_eq!(steps.len(), 40);
    for key in [
        "score_mean",
        "score_std",
        "kl",
        "entropy",
        "clipfrac",
        "approx_kl",
        "vf_loss",
        "pg_loss",
        "explained_variance",
        "response_length",
        "kl_coef",
        "rollout_tokens_per_second",
        "update_tokens_per_second",
    ] {
        assert!(steps[5].get(key).is_some(), "log lacks {key}");
    }
    // the first mini-batch of the first step sees the rollout policy itself
    assert!((steps[0]["ratio_mean"].as_f64().unwrap() - 1.0).abs() < 0.5);

    // PEFT adapter + value head under TRL's names
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    let vh = SafetensorsFile::open(&out.join("value_head.safetensors")).unwrap();
    assert_eq!(vh.get("v_head.summary.weight").unwrap().shape, [1, 64]);
    assert_eq!(vh.get("v_head.summary.bias").unwrap().shape, [1]);
    let g = run(
        "peft-generate",
        &[
            "--model",
            s(&model()),
            "--adapter",
            s(&out),
            "--prompt",
            "apple river stone:",
            "--max-new-tokens",
            "2",
        ],
    );
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
}

#[test]
fn ppo_resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = reward_model(tmp.path());
    let data = prompts(
        tmp.path(),
        &[
            "apple river stone:",
            "quick slow table:",
            "music light cloud:",
        ],
        4,
    );
    let extra = [
        "--response-length",
        "6",
        "--steps",
        "4",
        "--save-every",
        "2",
        "--mini-batches",
        "2",
        "--ppo-epochs",
        "2",
        "--grad-accum",
        "2",
        "--kl-estimator",
        "k3",
        "--adaptive-kl",
        "--kl-target",
        "0.5",
        "--kl-horizon",
        "20",
        "--missing-eos-penalty",
        "0.5",
        "--whiten-rewards",
        "--eval-prompts",
        "0",
        "--batch",
        "8",
    ];
    let full = tmp.path().join("full");
    let (log_full, _) = ppo(&rm, &data, &full, &extra);
    let resumed = tmp.path().join("resumed");
    let ckpt = full.join("checkpoints").join("step-2");
    let mut args = extra.to_vec();
    args.extend_from_slice(&["--resume", s(&ckpt)]);
    let (log_resumed, _) = ppo(&rm, &data, &resumed, &args);
    for f in ["adapter_model.safetensors", "value_head.safetensors"] {
        assert_eq!(
            std::fs::read(full.join(f)).unwrap(),
            std::fs::read(resumed.join(f)).unwrap(),
            "{f} differs after resume"
        );
    }
    let pick = |log: &[Value], step: u64| -> Value {
        let v = log
            .iter()
            .find(|v| v["step"] == step && v.get("score_mean").is_some())
            .unwrap()
            .clone();
        json!([
            v["score_mean"],
            v["kl"],
            v["kl_coef"],
            v["pg_loss"],
            v["vf_loss"]
        ])
    };
    for step in [3, 4] {
        assert_eq!(
            pick(&log_full, step),
            pick(&log_resumed, step),
            "step {step}"
        );
    }
    // the adaptive controller moved β away from its start
    let beta: Vec<f64> = log_full
        .iter()
        .filter_map(|v| v.get("kl_coef").and_then(Value::as_f64))
        .collect();
    assert!(beta.iter().any(|&b| b != 0.05), "{beta:?}");
}

#[test]
fn ppo_from_an_sft_adapter_keeps_it_as_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = reward_model(tmp.path());
    let data = prompts(tmp.path(), &["apple river stone:", "quick slow table:"], 4);
    let first = tmp.path().join("first");
    ppo(
        &rm,
        &data,
        &first,
        &[
            "--response-length",
            "2",
            "--steps",
            "6",
            "--eval-prompts",
            "0",
        ],
    );
    let second = tmp.path().join("second");
    let (log, _) = ppo(
        &rm,
        &data,
        &second,
        &[
            "--response-length",
            "2",
            "--steps",
            "2",
            "--init-adapter",
            s(&first),
            "--eval-prompts",
            "8",
        ],
    );
    let e = evals(&log);
    // before training the policy is the starting adapter, which is the reference
    assert_eq!(e[0].1, 0.0);
}

#[test]
fn ppo_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prompts(tmp.path(), &["apple river stone:"], 2);
    let out = tmp.path().join("out");
    let m = model();
    let base = |extra: &[&str]| {
        let mut a = vec![
            "--model",
            s(&m),
            "--prompts",
            s(&data),
            "--out",
            s(&out),
            "--quiet",
        ];
        a.extend_from_slice(extra);
        a.iter().map(|x| x.to_string()).collect::<Vec<String>>()
    };
    let go = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        run("ppo-train", &refs)
    };
    // a causal LM folder is not a reward model
    assert_clean_error(
        &go(base(&["--reward-model", s(&m)])),
        "ForSequenceClassification",
    );
    // a LoRA adapter without a score head is not a reward adapter
    let sft = fixtures().join("interop").join("llama_gqa_lora");
    assert_clean_error(
        &go(base(&["--reward-model", s(&sft)])),
        "not a reward-model adapter",
    );
    let rm = reward_model(tmp.path());
    assert_clean_error(
        &go(base(&["--reward-model", s(&rm), "--method", "ia3"])),
        "LoRA or DoRA",
    );
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"ok\"}\n{\"answer\": 3}\n").unwrap();
    let mut a = base(&["--reward-model", s(&rm)]);
    let i = a.iter().position(|x| x == s(&data)).unwrap();
    a[i] = s(&bad).to_string();
    assert_clean_error(&go(a), "line 2");
    assert_clean_error(
        &go(base(&["--reward-model", s(&rm), "--temperature", "0"])),
        "temperature",
    );
    // --plan prints the budget and trains nothing
    let r = go(base(&["--reward-model", s(&rm), "--plan"]));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        text.contains("KV cache") && text.contains("shared with the policy"),
        "{text}"
    );
    assert!(!out.join("adapter_model.safetensors").exists());
}

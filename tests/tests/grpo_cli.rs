//! grpo-train end to end on the tiny Llama: a verifiable (regex) reward rising, the output
//! loading in peft-generate, an external reward command seeing each record, a KL penalty with
//! several iterations per batch from an SFT adapter, exact resume, and clean failures.

use peftkit_tests::{assert_clean_error, fixtures, run};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn model() -> PathBuf {
    fixtures().join("models").join("llama_gqa")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn prompts(dir: &Path, n: usize) -> PathBuf {
    let p = dir.join("prompts.jsonl");
    let mut lines = String::new();
    for i in 0..n {
        lines += &json!({"prompt": format!("item {i} says"), "answer": i.to_string()}).to_string();
        lines.push('\n');
    }
    std::fs::write(&p, lines).unwrap();
    p
}

fn grpo(data: &Path, out: &Path, extra: &[&str]) -> (Vec<Value>, String) {
    let log = out.with_extension("jsonl");
    let _ = std::fs::remove_file(&log);
    let m = model();
    let mut args = vec![
        "--model",
        s(&m),
        "--prompts",
        s(data),
        "--out",
        s(out),
        "--log",
        s(&log),
        "--max-completion-length",
        "8",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let r = run("grpo-train", &args);
    assert!(
        r.status.success(),
        "grpo-train failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let lines = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (lines, String::from_utf8_lossy(&r.stdout).into_owned())
}

fn evals(log: &[Value]) -> Vec<f64> {
    log.iter()
        .filter_map(|v| v.get("eval_reward").and_then(Value::as_f64))
        .collect()
}

#[test]
fn grpo_raises_a_verifiable_reward_and_writes_a_loadable_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prompts(tmp.path(), 16);
    let out = tmp.path().join("out");
    // reward: the completion contains " the" (about one in eight at the start)
    let (log, stdout) = grpo(
        &data,
        &out,
        &[
            "--reward",
            "regex: the",
            "--num-generations",
            "8",
            "--batch",
            "4",
            "--steps",
            "40",
            "--lr",
            "2e-2",
            "--eval-prompts",
            "16",
        ],
    );
    let e = evals(&log);
    assert_eq!(e.len(), 2, "{log:?}");
    assert!(e[1] > e[0] + 0.4, "eval reward {} -> {}", e[0], e[1]);
    assert!(stdout.contains("mean reward"), "{stdout}");
    let step: Vec<&Value> = log.iter().filter(|v| v.get("loss").is_some()).collect();
    assert_eq!(step.len(), 40);
    for k in [
        "reward",
        "reward_std",
        "reward_regex0",
        "frac_reward_zero_std",
        "clip_ratio_region",
        "entropy",
        "response_length",
        "truncated_fraction",
        "grad_norm",
    ] {
        assert!(step[0].get(k).is_some(), "log lacks {k}: {}", step[0]);
    }
    // β = 0: no reference, no KL logged
    assert!(step[0].get("kl").is_none());
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    let r = run(
        "peft-generate",
        &[
            "--model",
            s(&model()),
            "--adapter",
            s(&out),
            "--prompt",
            "item 3 says",
            "--max-new-tokens",
            "4",
            "--quiet",
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

#[test]
fn a_reward_command_sees_every_completion_with_its_record() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prompts(tmp.path(), 4);
    let seen = tmp.path().join("seen.jsonl");
    // reward: 1 for the records whose answer is "2", null (cannot score) for answer "3"
    let cmd = format!(
        "cmd:tee -a {} | sed -e 's/.*\"answer\":\"2\".*/1/' -e 's/.*\"answer\":\"3\".*/null/' -e 's/^{{.*/0/'",
        s(&seen)
    );
    let sft = fixtures().join("grpo").join("adapter_init");
    let (log, _) = grpo(
        &data,
        &tmp.path().join("out"),
        &[
            "--reward",
            &cmd,
            "--reward",
            "answer:answer",
            "--reward-weights",
            "1,0.5",
            "--num-generations",
            "3",
            "--batch",
            "4",
            "--steps",
            "2",
            "--beta",
            "0.04",
            "--num-iterations",
            "2",
            "--grad-accum",
            "2",
            "--init-adapter",
            s(&sft),
            "--eval-prompts",
            "0",
        ],
    );
    let lines: Vec<Value> = std::fs::read_to_string(&seen)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // 2 steps × 4 prompts × 3 completions, each with its record
    assert_eq!(lines.len(), 24);
    for l in &lines {
        assert!(l["prompt"].as_str().unwrap().starts_with("item "), "{l}");
        assert!(
            l["completion"].is_string() && l["stopped"].is_boolean(),
            "{l}"
        );
        let p = l["record"]["prompt"].as_str().unwrap();
        assert_eq!(l["prompt"].as_str().unwrap(), p);
    }
    let step: Vec<&Value> = log.iter().filter(|v| v.get("loss").is_some()).collect();
    assert_eq!(step.len(), 2);
    for v in &step {
        assert!(
            (v["reward_cmd0"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-12,
            "{v}"
        );
        assert_eq!(v["optimizer_steps"], 2);
        // the policy starts as the SFT adapter, which is also the reference: KL ≈ 0 at first
        assert!(v["kl"].as_f64().unwrap() >= 0.0, "{v}");
    }
    assert!(step[0]["kl"].as_f64().unwrap() < 1e-6, "{}", step[0]);
}

/// serve:COMMAND is started once for the whole run (the evaluations and every step) and
/// answers each completion with a line; its rewards are those cmd: gives for the same program.
#[test]
fn a_reward_server_is_started_once_and_answers_every_completion() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prompts(tmp.path(), 4);
    let (starts, seen) = (tmp.path().join("starts"), tmp.path().join("seen.jsonl"));
    // 1 for the records whose answer is "2", null for "3", else 0; `echo` writes at once
    let body = r#"while IFS= read -r l; do echo "$l" >> SEEN; case "$l" in *'"answer":"2"'*) echo 1;; *'"answer":"3"'*) echo null;; *) echo 0;; esac; done"#
        .replace("SEEN", s(&seen));
    let serve = format!("serve:echo started >> {}; {body}", s(&starts));
    let args = |reward: &str| -> Vec<String> {
        [
            "--reward",
            reward,
            "--num-generations",
            "3",
            "--batch",
            "2",
            "--steps",
            "3",
            "--eval-prompts",
            "4",
        ]
        .map(String::from)
        .to_vec()
    };
    let served = args(&serve);
    let served: Vec<&str> = served.iter().map(String::as_str).collect();
    let (log, _) = grpo(&data, &tmp.path().join("served"), &served);
    assert_eq!(std::fs::read_to_string(&starts).unwrap(), "started\n");
    // 3 steps × 2 prompts × 3 completions, and 4 prompts before and after training
    let n = std::fs::read_to_string(&seen).unwrap().lines().count();
    assert_eq!(n, 18 + 8);
    // the same program run per step gives the same run
    let per_step = args(&format!("cmd:{body}"));
    let per_step: Vec<&str> = per_step.iter().map(String::as_str).collect();
    let (again, _) = grpo(&data, &tmp.path().join("per-step"), &per_step);
    let rewards = |l: &[Value], k: &str| -> Vec<Value> {
        l.iter().filter_map(|v| v.get(k).cloned()).collect()
    };
    assert_eq!(rewards(&log, "reward"), rewards(&again, "reward"));
    assert_eq!(rewards(&log, "eval_reward"), rewards(&again, "eval_reward"));
    assert_eq!(
        rewards(&log, "reward_serve0"),
        rewards(&again, "reward_cmd0")
    );
    assert_eq!(rewards(&log, "reward").len(), 3);
}

/// The other loss types and the high-entropy mask run end to end and log TRL's metrics:
/// CISPO its capped fraction, SAPO no clip ratios, LUSPO (sequence ratios) GRPO's, VESPO its
/// mean weight; the off-policy sequence mask.
#[test]
fn every_loss_type_and_the_entropy_mask_train() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prompts(tmp.path(), 4);
    let cases: &[(&[&str], &str, bool)] = &[
        (
            &["--loss-type", "cispo", "--epsilon-high", "5"],
            "cispo_clip_ratio",
            true,
        ),
        (&["--loss-type", "sapo"], "sapo", false),
        (
            &[
                "--loss-type",
                "luspo",
                "--importance-sampling-level",
                "sequence",
            ],
            "clip_ratio_region",
            true,
        ),
        (
            &["--top-entropy-quantile", "0.2"],
            "clip_ratio_region",
            true,
        ),
        (&["--loss-type", "vespo"], "vespo_phi_mean", true),
        (&["--entropy-coef", "0.01"], "entropy_coef", true),
        (
            &["--off-policy-mask-threshold", "0.01"],
            "clip_ratio_region",
            true,
        ),
    ];
    for (k, &(opts, key, present)) in cases.iter().enumerate() {
        let mut args = vec![
            "--reward",
            "regex: the",
            "--num-generations",
            "4",
            "--batch",
            "2",
            "--steps",
            "2",
            "--num-iterations",
            "2",
            "--eval-prompts",
            "0",
        ];
        args.extend_from_slice(opts);
        let (log, _) = grpo(&data, &tmp.path().join(format!("out{k}")), &args);
        let step: Vec<&Value> = log.iter().filter(|v| v.get("loss").is_some()).collect();
        assert_eq!(step.len(), 2, "{opts:?}");
        for v in &step {
            assert!(v["loss"].as_f64().unwrap().is_finite(), "{opts:?}: {v}");
            assert_eq!(v.get(key).is_some(), present, "{opts:?}: {v}");
        }
        if !present {
            assert!(step[0].get("clip_ratio_region").is_none(), "{}", step[0]);
        }
        assert!(tmp
            .path()
            .join(format!("out{k}"))
            .join("adapter_model.safetensors")
            .is_file());
    }
}

#[test]
fn grpo_resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prompts(tmp.path(), 6);
    let extra = [
        "--reward",
        "regex: the",
        "--reward",
        "regex:e",
        "--num-generations",
        "4",
        "--batch",
        "2",
        "--steps",
        "4",
        "--save-every",
        "2",
        "--lr",
        "1e-2",
        "--beta",
        "0.04",
        "--num-iterations",
        "2",
        "--epsilon-high",
        "0.28",
        "--eval-prompts",
        "0",
    ];
    let full = tmp.path().join("full");
    let (log_full, _) = grpo(&data, &full, &extra);
    let resumed = tmp.path().join("resumed");
    let ckpt = full.join("checkpoints").join("step-2");
    let mut args = extra.to_vec();
    args.extend_from_slice(&["--resume", s(&ckpt)]);
    let (log_resumed, _) = grpo(&data, &resumed, &args);
    assert_eq!(
        std::fs::read(full.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(resumed.join("adapter_model.safetensors")).unwrap(),
        "the adapter differs after resume"
    );
    let pick = |log: &[Value], step: u64| -> Value {
        let v = log
            .iter()
            .find(|v| v["step"] == step && v.get("loss").is_some())
            .unwrap()
            .clone();
        json!([v["reward"], v["kl"], v["loss"], v["grad_norm"]])
    };
    for step in [3, 4] {
        assert_eq!(
            pick(&log_full, step),
            pick(&log_resumed, step),
            "step {step}"
        );
    }
}

#[test]
fn grpo_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prompts(tmp.path(), 2);
    let out = tmp.path().join("out");
    let m = model();
    let go = |extra: &[&str]| {
        let mut a = vec![
            "--model",
            s(&m),
            "--prompts",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            "1",
            "--num-generations",
            "2",
            "--max-completion-length",
            "4",
            "--eval-prompts",
            "0",
            "--quiet",
        ];
        a.extend_from_slice(extra);
        run("grpo-train", &a)
    };
    assert_clean_error(&go(&["--reward", "bogus:x"]), "unknown kind");
    assert_clean_error(&go(&["--reward", "regex:("]), "--reward regex:(");
    assert_clean_error(
        &go(&["--reward", "regex:a", "--reward-weights", "1,2"]),
        "2 values for 1",
    );
    assert_clean_error(
        &go(&["--reward", "regex:a", "--num-generations", "1"]),
        "at least 2",
    );
    assert_clean_error(&go(&["--reward", "cmd:exit 4"]), "exited with");
    assert_clean_error(&go(&["--reward", "cmd:echo 1"]), "printed 1 lines");
    assert_clean_error(&go(&["--reward", "cmd:sed s/.*/x/"]), "not a number");
    assert_clean_error(&go(&["--reward", "serve:exit 3"]), "exited with");
    assert_clean_error(
        &go(&["--reward", "serve:while read l; do echo x; done"]),
        "not a number",
    );
    assert_clean_error(
        &go(&["--reward", "serve:read l; echo 1; exit 0"]),
        "before answering every completion",
    );
    // a server that never answers (here: nothing flushed) stops the run after the timeout
    let mut silent = std::process::Command::new(peftkit_tests::bin("grpo-train"));
    silent
        .args([
            "--model",
            s(&m),
            "--prompts",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            "1",
            "--num-generations",
            "2",
            "--max-completion-length",
            "4",
            "--eval-prompts",
            "0",
            "--quiet",
            "--reward",
            "serve:cat > /dev/null",
        ])
        .env("PEFTKIT_REWARD_TIMEOUT", "0.5");
    assert_clean_error(&silent.output().unwrap(), "within 0.5 s");
    assert_clean_error(
        &go(&["--reward", "regex:a", "--loss-type", "ppo"]),
        "--loss-type",
    );
    assert_clean_error(
        &go(&["--reward", "regex:a", "--top-entropy-quantile", "0"]),
        "--top-entropy-quantile",
    );
    assert_clean_error(
        &go(&["--reward", "regex:a", "--method", "ia3"]),
        "LoRA or DoRA",
    );
    assert_clean_error(
        &go(&["--reward", &format!("model:{}", s(&m))]),
        "ForSequenceClassification",
    );
    // the starting adapter is an input: --out may not overwrite it
    let sft = tmp.path().join("sft");
    std::fs::create_dir(&sft).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixtures().join("grpo/adapter_init").join(f), sft.join(f)).unwrap();
    }
    let before = std::fs::read(sft.join("adapter_model.safetensors")).unwrap();
    let r = run(
        "grpo-train",
        &[
            "--model",
            s(&m),
            "--prompts",
            s(&data),
            "--out",
            s(&sft),
            "--init-adapter",
            s(&sft),
            "--reward",
            "regex:a",
            "--steps",
            "1",
            "--num-generations",
            "2",
            "--max-completion-length",
            "2",
            "--eval-prompts",
            "0",
            "--quiet",
        ],
    );
    assert_clean_error(&r, "would overwrite the input");
    assert_eq!(
        std::fs::read(sft.join("adapter_model.safetensors")).unwrap(),
        before
    );
    let r = go(&["--reward", "regex:a", "--plan"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        text.contains("plan for grpo-train") && text.contains("KV cache (2 sequences"),
        "{text}"
    );
    assert!(!out.join("adapter_model.safetensors").exists());
    assert!(!out.exists(), "a failed run leaves no output folder");
}

//! rm-train, rm-score and dpo-train end to end on the tiny Llama: they learn a synthetic
//! preference, write files PEFT and transformers load, count what they drop, and fail cleanly.

use peftkit_core::io::safetensors_file::SafetensorsFile;
use peftkit_tests::{assert_clean_error, fixtures, read_json, run};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn model() -> PathBuf {
    fixtures().join("models").join("llama_gqa")
}

/// Pairs whose chosen completion says "yes" where the rejected one says "no" (deterministic).
fn synthetic_pairs(dir: &Path, n: usize) -> PathBuf {
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
    for _ in 0..n {
        let prompt = format!("{} {} {}:", pick(), pick(), pick());
        let body = format!("{} {}", pick(), pick());
        lines += &json!({"prompt": prompt, "chosen": format!(" {body} yes yes"), "rejected": format!(" {body} no no")}).to_string();
        lines.push('\n');
    }
    let p = dir.join("pairs.jsonl");
    std::fs::write(&p, lines).unwrap();
    p
}

fn log_lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn train(tool: &str, data: &Path, out: &Path, extra: &[&str]) -> Vec<Value> {
    let log = out.with_extension("jsonl");
    let m = model();
    let mut args = vec![
        "--model",
        m.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
        "--lr",
        "3e-3",
        "--batch",
        "8",
        "--val-split",
        "0.25",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let r = run(tool, &args);
    assert!(
        r.status.success(),
        "{tool} failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    log_lines(&log)
}

fn evals(log: &[Value]) -> (Value, Value) {
    let e: Vec<&Value> = log
        .iter()
        .filter(|v| v.get("eval_loss").is_some())
        .collect();
    (e[0].clone(), e[e.len() - 1].clone())
}

#[test]
fn reward_model_learns_and_writes_a_seq_cls_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_pairs(tmp.path(), 80);
    let out = tmp.path().join("rm");
    let log = train("rm-train", &data, &out, &["--steps", "40"]);
    let (before, after) = evals(&log);
    assert!(
        after["eval_loss"].as_f64().unwrap() < 0.5 * before["eval_loss"].as_f64().unwrap(),
        "held-out loss did not halve: {before} → {after}"
    );
    assert!(after["eval_accuracy"].as_f64().unwrap() >= 0.9, "{after}");
    assert_eq!(log[0]["data"]["pairs"], 80);
    // what PEFT writes for a sequence-classification LoRA
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["modules_to_save"], json!(["classifier", "score"]));
    let f = SafetensorsFile::open(&out.join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        f.get("base_model.model.score.weight").unwrap().shape,
        &[1, 64]
    );
    // rm-score reads it back: the training pairs are ranked right
    let r = run(
        "rm-score",
        &[
            "--model",
            model().to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let rows: Vec<Value> = String::from_utf8_lossy(&r.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 80);
    let correct = rows.iter().filter(|v| v["correct"] == true).count();
    assert!(correct >= 72, "{correct}/80 pairs ranked right");
}

#[test]
fn full_reward_model_is_a_sequence_classification_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_pairs(tmp.path(), 16);
    let out = tmp.path().join("rm-full");
    train(
        "rm-train",
        &data,
        &out,
        &["--method", "full", "--steps", "2", "--lr", "1e-4"],
    );
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(
        cfg["architectures"],
        json!(["LlamaForSequenceClassification"])
    );
    assert_eq!(cfg["num_labels"], 1);
    let f = SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
    assert_eq!(f.get("score.weight").unwrap().shape, &[1, 64]);
    assert!(f.get("lm_head.weight").is_none());
}

#[test]
fn dpo_raises_the_chosen_margin_with_every_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_pairs(tmp.path(), 64);
    for (loss, extra) in [
        ("sigmoid", vec![]),
        ("ipo", vec![]),
        ("hinge", vec![]),
        ("robust", vec!["--label-smoothing", "0.1"]),
    ] {
        let out = tmp.path().join(format!("dpo-{loss}"));
        let mut args = vec!["--loss", loss, "--steps", "20"];
        args.extend(extra);
        let log = train("dpo-train", &data, &out, &args);
        let (before, after) = evals(&log);
        // before training the policy is the reference: every implicit reward is 0
        assert!(
            before["eval_margin"].as_f64().unwrap().abs() < 1e-6,
            "{loss}: {before}"
        );
        assert!(
            after["eval_margin"].as_f64().unwrap() > 0.2,
            "{loss}: {after}"
        );
        assert!(
            after["eval_accuracy"].as_f64().unwrap() >= 0.9,
            "{loss}: {after}"
        );
        let cfg = read_json(&out.join("adapter_config.json"));
        assert_eq!(cfg["task_type"], "CAUSAL_LM");
    }
}

#[test]
fn long_pairs_are_truncated_or_dropped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_pairs(tmp.path(), 16);
    let out = tmp.path().join("t");
    let log = train(
        "rm-train",
        &data,
        &out,
        &["--steps", "1", "--max-len", "12"],
    );
    assert_eq!(log[0]["data"]["truncated"], 16);
    let out = tmp.path().join("d");
    let r = run(
        "rm-train",
        &[
            "--model",
            model().to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-len",
            "12",
            "--drop-long",
        ],
    );
    assert_clean_error(&r, "no preference pairs left");
}

#[test]
fn llama_factory_and_conversational_pairs_load() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("lf.json");
    let mut recs = Vec::new();
    for i in 0..8 {
        recs.push(json!({
            "conversations": [{"from": "human", "value": format!("question {i}")}],
            "chosen": {"from": "gpt", "value": "yes it is"},
            "rejected": {"from": "gpt", "value": "no it is not"}
        }));
        recs.push(json!({
            "prompt": [{"role": "user", "content": format!("hello {i}")}],
            "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}]
        }));
    }
    std::fs::write(&p, serde_json::to_string(&recs).unwrap()).unwrap();
    let out = tmp.path().join("o");
    let log = train("dpo-train", &p, &out, &["--steps", "2"]);
    assert_eq!(log[0]["data"]["pairs"], 16);
}

#[test]
fn bad_preference_data_fails_with_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.jsonl");
    std::fs::write(
        &p,
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"chosen\": \"b\"}\n",
    )
    .unwrap();
    for tool in ["rm-train", "dpo-train"] {
        let r = run(
            tool,
            &[
                "--model",
                model().to_str().unwrap(),
                "--data",
                p.to_str().unwrap(),
                "--out",
                tmp.path().join("o").to_str().unwrap(),
            ],
        );
        assert_clean_error(&r, "line 2");
    }
    let r = run(
        "dpo-train",
        &[
            "--model",
            model().to_str().unwrap(),
            "--data",
            p.to_str().unwrap(),
            "--out",
            tmp.path().join("o").to_str().unwrap(),
            "--label-smoothing",
            "0.1",
        ],
    );
    assert_clean_error(&r, "--loss robust");
}

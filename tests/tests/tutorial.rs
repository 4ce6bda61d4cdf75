//! The tutorial's Makefile (examples/pipeline.mk, docs/tutorial.md) runs end to end: on the tiny
//! Llama fixture with a dozen records instead of SmolLM2 and the alpaca / dpo demo data, every
//! step (quantize-nf4, peft-train with --plot, peft-eval, adapter-inspect, model-export, adapter-merge,
//! peft-generate, rm-train, dpo-train, ppo-train, grpo-train) leaves its output. Skipped when `make` is
//! not installed.
//!
//! The tools must be built first: `cargo build --release --bins` (make test does).

use peftkit_tests::{bin_dir, fixtures};
use serde_json::json;
use std::path::Path;
use std::process::Command;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn pipeline_makefile_runs_on_the_fixtures() {
    if Command::new("make").arg("--version").output().is_err() {
        eprintln!("make is not installed: skipping the tutorial pipeline");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sft = dir.path().join("sft.json");
    let recs: Vec<_> = (0..12)
        .map(|i| json!({"instruction": format!("Say {i}."), "input": "", "output": format!("It is {i}.")}))
        .collect();
    std::fs::write(&sft, serde_json::to_string(&recs).unwrap()).unwrap();
    let pairs = dir.path().join("pairs.json");
    let recs: Vec<_> = (0..16)
        .map(
            |i| json!({"prompt": format!("item {i}:"), "chosen": " yes yes", "rejected": " no no"}),
        )
        .collect();
    std::fs::write(&pairs, serde_json::to_string(&recs).unwrap()).unwrap();
    let runs = dir.path().join("runs");
    let mk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pipeline.mk");
    let model = fixtures().join("models").join("llama_gqa");
    let out = Command::new("make")
        .current_dir(dir.path())
        .args(["-s", "-f", s(&mk)])
        .arg(format!("BIN={}", s(&bin_dir())))
        .arg(format!("MODEL={}", s(&model)))
        .arg(format!("RUNS={}", s(&runs)))
        .arg(format!("SFT_DATA={}", s(&sft)))
        .arg(format!("PAIRS={}", s(&pairs)))
        .args([
            "STEPS=2",
            "PREF_STEPS=2",
            "PPO_STEPS=1",
            "GRPO_STEPS=1",
            "MAXLEN=200",
            "PREF_MAXLEN=96",
            "THREADS=1",
            "FLAGS=--quiet",
        ])
        .env("PEFTKIT_NO_PROGRESS", "1")
        .output()
        .expect("run make");
    assert!(
        out.status.success(),
        "make -f examples/pipeline.mk failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "smollm2-nf4/config.json",
        "lora/adapter_config.json",
        "lora.png",
        "eval.json",
        "eval-base.json",
        "inspect.txt",
        "lora-norms.png",
        "lora.gguf",
        "merged/config.json",
        "answers.jsonl",
        "answers-merged.jsonl",
        "rm/adapter_config.json",
        "rm.png",
        "dpo/adapter_config.json",
        "dpo.png",
        "ppo/adapter_config.json",
        "ppo.png",
        "grpo/adapter_config.json",
        "grpo.png",
    ] {
        assert!(runs.join(f).is_file(), "the pipeline did not write {f}");
    }
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs.join("eval.json")).unwrap()).unwrap();
    assert!(eval["perplexity"].as_f64().is_some_and(f64::is_finite));
    let answers = std::fs::read_to_string(runs.join("answers.jsonl")).unwrap();
    assert_eq!(answers.lines().count(), 2);
}

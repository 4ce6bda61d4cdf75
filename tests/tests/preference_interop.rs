//! A reward-model adapter trained by our rm-train, loaded by transformers + PEFT
//! (`AutoModelForSequenceClassification` + `PeftModel.from_pretrained`): rm-score gives
//! transformers' scores, and our tokenizer feeds the same ids (tests/fixtures/preference/interop,
//! made by tests/fixtures/generate_rm_interop.py).

use peftkit_core::tokenizer::TextTokenizer;
use peftkit_core::train::pairs::{load_pairs, PairOptions};
use peftkit_tests::{fixtures, json_ids, read_json, run};
use serde_json::Value;
use std::path::PathBuf;

fn interop() -> PathBuf {
    fixtures().join("preference").join("interop")
}

fn model() -> PathBuf {
    fixtures().join("models").join("llama_gqa")
}

fn reference() -> Value {
    read_json(&interop().join("scores.json"))
}

#[test]
fn our_tokenization_matches_the_recorded_ids() {
    let r = reference();
    let recorded = r["pairs"].as_array().unwrap();
    let tok = TextTokenizer::load(&model()).unwrap();
    let opts = PairOptions {
        max_len: 1024,
        drop_long: false,
        margin_column: None,
        skip_bad_lines: false,
    };
    let (pairs, stats) = load_pairs(&interop().join("pairs.jsonl"), &tok, &opts).unwrap();
    assert_eq!(stats.truncated, 0);
    assert_eq!(pairs.len(), recorded.len());
    for (i, (p, rec)) in pairs.iter().zip(recorded).enumerate() {
        assert_eq!(
            p.chosen.ids,
            json_ids(&rec["chosen_ids"]),
            "pair {i} chosen"
        );
        assert_eq!(
            p.rejected.ids,
            json_ids(&rec["rejected_ids"]),
            "pair {i} rejected"
        );
    }
}

#[test]
fn rm_score_gives_transformers_scores_for_our_adapter() {
    let r = reference();
    let recorded = r["pairs"].as_array().unwrap();
    let tol = r["tolerance"].as_f64().unwrap();
    let (m, a, d) = (
        model(),
        interop().join("adapter"),
        interop().join("pairs.jsonl"),
    );
    let out = run(
        "rm-score",
        &[
            "--model",
            m.to_str().unwrap(),
            "--adapter",
            a.to_str().unwrap(),
            "--data",
            d.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "rm-score failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), recorded.len());
    let mut worst = 0f64;
    let mut correct = 0;
    for (i, (ours, rec)) in lines.iter().zip(recorded).enumerate() {
        for side in ["chosen", "rejected"] {
            let got = ours[side].as_f64().unwrap();
            let want = rec[format!("{side}_score")].as_f64().unwrap();
            let diff = (got - want).abs();
            assert!(
                diff <= tol,
                "pair {i} {side}: rm-score {got}, transformers {want} (|Δ| {diff:.3e})"
            );
            worst = worst.max(diff);
        }
        correct += usize::from(ours["correct"].as_bool().unwrap());
    }
    let accuracy = correct as f64 / lines.len() as f64;
    assert_eq!(accuracy, r["accuracy"].as_f64().unwrap());
    eprintln!(
        "max |Δ score| vs transformers: {worst:.3e} over {} pairs",
        lines.len()
    );
}

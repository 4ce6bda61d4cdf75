//! `--compute-dtype bf16`: frozen linear weights multiply in bf16 with f32 accumulation. The
//! loss curve follows the f32 one closely (but not bit for bit: the bf16 path is really used),
//! on the CPU's best bf16 path and on the portable fallback every machine runs.

use peftkit_tests::fixtures;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn losses(dtype: &str, path: Option<&str>, out: &Path) -> Vec<f64> {
    losses_of(
        &fixtures().join("models").join("llama_gqa"),
        dtype,
        path,
        out,
    )
}

fn losses_of(model: &Path, dtype: &str, path: Option<&str>, out: &Path) -> Vec<f64> {
    let log = out.with_extension("jsonl");
    let data = fixtures().join("data").join("alpaca.json");
    let mut cmd = Command::new(peftkit_tests::bin("peft-train"));
    cmd.args([
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--method",
        "lora",
        "--target",
        "all-linear",
        "--rank",
        "4",
        "--lr",
        "3e-3",
        "--batch",
        "2",
        "--steps",
        "12",
        "--compute-dtype",
        dtype,
        "--out",
        out.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
        "--quiet",
    ])
    .env("PEFTKIT_NO_PROGRESS", "1");
    if let Some(p) = path {
        cmd.env("PEFTKIT_GEMM_BF16", p);
    }
    let r = cmd.output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v.get("loss").and_then(Value::as_f64))
        .collect()
}

/// The curves agree to bf16 precision and are not bit-identical (the bf16 path ran).
fn assert_close_not_equal(name: &str, f32_curve: &[f64], bf: &[f64]) {
    assert_eq!(bf.len(), f32_curve.len());
    for (a, b) in f32_curve.iter().zip(bf) {
        assert!(
            (a - b).abs() <= 1e-2 * a.abs(),
            "{name}: f32 {a} vs bf16 {b}"
        );
    }
    assert!(
        f32_curve.iter().zip(bf).any(|(a, b)| a != b),
        "{name}: bf16 losses equal f32 ones bit for bit: path unused?"
    );
}

/// QLoRA: the 4-bit base decodes into bf16 panels per product. Those panels hold exactly what
/// packing the dequantized f32 base gives, so the run is bit-identical to bf16 compute on the
/// `quantize-nf4 --dequantize` copy (an f32 4-bit product would not be), and it follows f32.
#[test]
fn qlora_bf16_compute_follows_the_f32_loss_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("qlora").join("llama_gqa-nf4");
    let dense = tmp.path().join("dense");
    let r = peftkit_tests::run(
        "quantize-nf4",
        &[
            "--model",
            model.to_str().unwrap(),
            "--out",
            dense.to_str().unwrap(),
            "--dequantize",
            "--quiet",
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let f32_curve = losses_of(&model, "f32", None, &tmp.path().join("f32"));
    assert_eq!(f32_curve.len(), 12);
    for (name, path) in [("best", None), ("fallback", Some("fallback"))] {
        let bf = losses_of(&model, "bf16", path, &tmp.path().join(name));
        assert_close_not_equal(name, &f32_curve, &bf);
        let bf_dense = losses_of(
            &dense,
            "bf16",
            path,
            &tmp.path().join(format!("{name}-dense")),
        );
        assert_eq!(bf, bf_dense, "{name}: 4-bit bf16 vs dequantized bf16");
    }
}

#[test]
fn bf16_compute_follows_the_f32_loss_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let f32_curve = losses("f32", None, &tmp.path().join("f32"));
    assert_eq!(f32_curve.len(), 12);
    for (name, path) in [("best", None), ("fallback", Some("fallback"))] {
        let bf = losses("bf16", path, &tmp.path().join(name));
        assert_close_not_equal(name, &f32_curve, &bf);
    }
    let model = fixtures().join("models").join("llama_gqa");
    let data = fixtures().join("data").join("alpaca.json");
    let out = tmp.path().join("bad");
    let bad = peftkit_tests::run(
        "peft-train",
        &[
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--compute-dtype",
            "fp8",
        ],
    );
    peftkit_tests::assert_clean_error(&bad, "--compute-dtype");
}

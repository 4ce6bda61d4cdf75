//! model-export: LoRA adapters written as llama.cpp LoRA GGUFs, byte for byte what llama.cpp's
//! own convert_lora_to_gguf.py writes (tests/fixtures/gguf_export, made by
//! generate_gguf_export.py); rsLoRA and alpha_pattern scales folded so the file computes PEFT's
//! ΔW; adapters llama.cpp cannot load refused with one clean error line.

use peftkit_core::gguf::names::unpermute_rows;
use peftkit_core::gguf::reader::GgufFile;
use peftkit_core::merge::adapter_dir::AdapterDir;
use peftkit_tests::{assert_clean_error, fixtures, run};
use std::path::{Path, PathBuf};

fn export(model: &str, adapter: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let model = fixtures().join("models").join(model);
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    run("model-export", &args)
}

fn reference(name: &str) -> PathBuf {
    fixtures().join("gguf_export").join(name)
}

#[test]
fn lora_files_are_byte_identical_to_llama_cpp_converter() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("interop/llama_gqa_lora", "f32", "llama_gqa_lora.f32.gguf"),
        ("interop/llama_gqa_lora", "f16", "llama_gqa_lora.f16.gguf"),
        ("interop/llama_gqa_lora", "q8_0", "llama_gqa_lora.q8_0.gguf"),
        ("merge/lora_llama/adapter", "f32", "lora_llama.f32.gguf"),
    ];
    for (adapter, ty, want) in cases {
        let out = tmp.path().join(want);
        let o = export(
            "llama_gqa",
            &fixtures().join(adapter),
            &out,
            &["--type", ty, "--json"],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(summary["kind"], "lora");
        assert_eq!(summary["folded_scales"], 0);
        let ours = std::fs::read(&out).unwrap();
        let theirs = std::fs::read(reference(want)).unwrap();
        assert!(
            ours == theirs,
            "{adapter} --type {ty}: differs from {want} ({} vs {} bytes)",
            ours.len(),
            theirs.len()
        );
    }
}

/// The default type of an adapter export is f32, the converter's.
#[test]
fn lora_default_type_is_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a.gguf");
    let o = export(
        "llama_gqa",
        &fixtures().join("interop/llama_gqa_lora"),
        &out,
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(reference("llama_gqa_lora.f32.gguf")).unwrap()
    );
}

/// rsLoRA with rank and alpha patterns: llama.cpp scales each pair by alpha / r, so PEFT's
/// scale must be folded into lora_b. Every module's ΔW read back from the file, as llama.cpp
/// computes it (with q/k rows un-permuted), equals PEFT's s·B·A.
#[test]
fn rslora_and_patterns_compute_pefts_delta() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rs.gguf");
    let adapter = fixtures().join("interop/llama_gqa_rslora_patterns");
    let o = export("llama_gqa", &adapter, &out, &["--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(summary["folded_scales"].as_u64().unwrap() > 0);

    let g = GgufFile::open(&out).unwrap();
    let alpha = g.get_f64("adapter.lora.alpha").unwrap().unwrap() as f32;
    let modules = AdapterDir::open(&adapter).unwrap().lora_modules().unwrap();
    assert!(!modules.is_empty());
    for m in &modules {
        let name = peftkit_core::gguf::names::gguf_name(&format!("{}.weight", m.path)).unwrap();
        let a_t = g.tensor(&format!("{name}.lora_a")).unwrap();
        let b_t = g.tensor(&format!("{name}.lora_b")).unwrap();
        assert_eq!(a_t.shape(), vec![m.rank, m.in_features]);
        assert_eq!(b_t.shape(), vec![m.out_features, m.rank]);
        let a = g.dequantize(a_t).unwrap();
        let mut b = g.dequantize(b_t).unwrap();
        let heads = if m.path.ends_with("q_proj") {
            Some(4)
        } else if m.path.ends_with("k_proj") {
            Some(2)
        } else {
            None
        };
        if let Some(h) = heads {
            b = unpermute_rows(&b, m.out_features, m.rank, h);
        }
        // llama.cpp: scale = alpha / r, r = lora_b's inner dimension.
        let s = alpha / m.rank as f32;
        let want = m.delta();
        let (o, i, r) = (m.out_features, m.in_features, m.rank);
        let mut worst = 0f32;
        let norm = want.iter().fold(0f32, |x, v| x.max(v.abs()));
        for row in 0..o {
            for col in 0..i {
                let got: f32 = (0..r).map(|k| b[row * r + k] * a[k * i + col]).sum::<f32>() * s;
                worst = worst.max((got - want[row * i + col]).abs());
            }
        }
        assert!(
            worst <= 1e-5 * norm.max(1.0),
            "{}: ΔW off by {worst} (max |ΔW| {norm})",
            m.path
        );
    }
}

#[test]
fn adapters_llama_cpp_cannot_load_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.gguf");
    let cases = [
        ("llama_gqa", "merge/dora_llama/adapter", "DoRA"),
        ("llama_gqa", "interop/llama_gqa_ia3", "IA3"),
        ("llama_gqa", "interop/llama_gqa_prefix", "PREFIX_TUNING"),
        ("gpt2", "interop/gpt2_lora", "GPT-2"),
        ("llama_gqa", "interop/does_not_exist", "does_not_exist"),
    ];
    for (model, adapter, needle) in cases {
        let o = export(model, &fixtures().join(adapter), &out, &[]);
        assert_clean_error(&o, needle);
        assert!(
            !out.exists(),
            "{adapter}: a refused export left {}",
            out.display()
        );
    }
    // An unknown type is a usage error (exit 2).
    let o = export(
        "llama_gqa",
        &fixtures().join("interop/llama_gqa_lora"),
        &out,
        &["--type", "q4_k"],
    );
    assert_clean_error(&o, "q4_k");
    assert_eq!(o.status.code(), Some(2));
}

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
        ("models_gguf/qwen2_lora", "f32", "qwen2_lora.f32.gguf"),
    ];
    for (adapter, ty, want) in cases {
        let out = tmp.path().join(want);
        let base = if want.starts_with("qwen2") {
            "qwen2"
        } else {
            "llama_gqa"
        };
        let o = export(
            base,
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

    assert_delta_matches(&out, &adapter, |m| {
        if m.ends_with("q_proj") {
            Some(4)
        } else if m.ends_with("k_proj") {
            Some(2)
        } else {
            None
        }
    });
}

#[test]
fn adapters_llama_cpp_cannot_load_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.gguf");
    let cases = [
        ("llama_gqa", "merge/dora_llama/adapter", "DoRA"),
        ("llama_gqa", "interop/llama_gqa_ia3", "IA3"),
        ("llama_gqa", "interop/llama_gqa_prefix", "PREFIX_TUNING"),
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

fn export_model(model: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    run("model-export", &args)
}

/// Whole models: byte for byte what convert_hf_to_gguf.py writes, for every type and its three
/// vocabulary paths (byte-level BPE: llama_gqa, qwen2, gpt2; SentencePiece-style tokenizer.json:
/// llama_untied, mistral; SentencePiece tokenizer.model: llama_spm). GPT-2's reference was
/// converted from a copy whose config.json also has `n_ctx`: the converter fails without it,
/// and transformers 5 no longer writes it. The fixture tokenizers are unknown to llama.cpp's pre-tokenizer
/// table, so the references were made with "default", and so are ours.
#[test]
fn model_files_are_byte_identical_to_llama_cpp_converter() {
    let tmp = tempfile::tempdir().unwrap();
    for file in [
        "llama_gqa.f32.gguf",
        "llama_gqa.f16.gguf",
        "llama_gqa.bf16.gguf",
        "llama_gqa.q8_0.gguf",
        "qwen2.f16.gguf",
        "qwen2.q8_0.gguf",
        "llama_untied.f32.gguf",
        "mistral.q8_0.gguf",
        "llama_spm.f32.gguf",
        "llama_spm.q8_0.gguf",
        "gpt2.f32.gguf",
        "gpt2.q8_0.gguf",
    ] {
        let mut parts = file.split('.');
        let (model, ty) = (parts.next().unwrap(), parts.next().unwrap());
        // llama_spm (a SentencePiece tokenizer.model, added tokens, sampling defaults in
        // generation_config.json) lives apart from the models the other tests load.
        let dir = match model {
            "llama_spm" => fixtures().join("models_gguf").join(model),
            _ => fixtures().join("models").join(model),
        };
        let out = tmp.path().join(file);
        let o = export_model(
            &dir,
            &out,
            &["--type", ty, "--tokenizer-pre", "default", "--json"],
        );
        assert!(
            o.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(summary["kind"], "model");
        let ours = std::fs::read(&out).unwrap();
        let theirs = std::fs::read(reference(file)).unwrap();
        if ours != theirs {
            // Name the first difference: a metadata key or a tensor.
            let a = GgufFile::open(&out).unwrap();
            let b = GgufFile::open(&reference(file)).unwrap();
            for (x, y) in a.metadata.iter().zip(&b.metadata) {
                assert_eq!(x, y, "{file}: metadata differs");
            }
            assert_eq!(a.metadata.len(), b.metadata.len(), "{file}: key count");
            for (x, y) in a.tensors.iter().zip(&b.tensors) {
                assert_eq!((&x.name, &x.dims, x.ty), (&y.name, &y.dims, y.ty), "{file}");
                assert!(a.data(x) == b.data(y), "{file}: tensor {} differs", x.name);
            }
            panic!(
                "{file}: files differ ({} vs {} bytes)",
                ours.len(),
                theirs.len()
            );
        }
    }
}

/// The pre-tokenizer hash is the converter's: the same ids for its fixed text, hence the
/// same sha256 it recorded (pre_hashes.json). An unknown hash is a clean error that names it.
#[test]
fn pre_tokenizer_hash_matches_the_converter() {
    let recorded = peftkit_tests::read_json(&reference("pre_hashes.json"));
    for model in ["llama_gqa", "qwen2", "llama_untied", "mistral"] {
        let want = recorded["models"][model]["chkhsh"]
            .as_str()
            .unwrap_or_else(|| panic!("no chkhsh for {model} in pre_hashes.json"));
        let got = peftkit_core::gguf::export_vocab::pre_tokenizer_hash(
            &fixtures().join("models").join(model),
        )
        .unwrap();
        assert_eq!(got, want, "{model}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.gguf");
    let o = export_model(&fixtures().join("models/llama_gqa"), &out, &[]);
    assert_clean_error(
        &o,
        "6e3f6bb1250ddb84fa2156e6d1e61919fcfe01a526045aafd419422eaa6ede44",
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("--tokenizer-pre"));
    assert!(!out.exists());
}

/// A 4-bit folder is decoded exactly: its GGUF equals the GGUF of the same model dequantized
/// by quantize-nf4 --dequantize (same folder name, so the same general.name).
#[test]
fn four_bit_models_export_their_decoded_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let nf4 = tmp.path().join("a").join("llama_gqa");
    let plain = tmp.path().join("b").join("llama_gqa");
    std::fs::create_dir_all(nf4.parent().unwrap()).unwrap();
    std::fs::create_dir_all(plain.parent().unwrap()).unwrap();
    let m = fixtures().join("models/llama_gqa");
    let o = run(
        "quantize-nf4",
        &[
            "--model",
            m.to_str().unwrap(),
            "--out",
            nf4.to_str().unwrap(),
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(
        "quantize-nf4",
        &[
            "--model",
            nf4.to_str().unwrap(),
            "--out",
            plain.to_str().unwrap(),
            "--dequantize",
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (tmp.path().join("a.gguf"), tmp.path().join("b.gguf"));
    for (dir, out) in [(&nf4, &a), (&plain, &b)] {
        let o = export_model(dir, out, &["--type", "f32", "--tokenizer-pre", "default"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (ga, gb) = (GgufFile::open(&a).unwrap(), GgufFile::open(&b).unwrap());
    assert_eq!(ga.metadata, gb.metadata);
    assert_eq!(ga.tensors.len(), gb.tensors.len());
    for (x, y) in ga.tensors.iter().zip(&gb.tensors) {
        assert_eq!((&x.name, &x.dims, x.ty), (&y.name, &y.dims, y.ty));
        assert!(ga.data(x) == gb.data(y), "{} differs", x.name);
    }
    // And the decoded weights are not the original ones (the 4-bit base really was read).
    let orig = GgufFile::open(&reference("llama_gqa.f32.gguf")).unwrap();
    let q = ga.tensor("blk.0.attn_q.weight").unwrap();
    assert!(ga.data(q) != orig.data(orig.tensor("blk.0.attn_q.weight").unwrap()));
}

#[test]
fn models_the_export_cannot_take_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.gguf");
    let o = export_model(&fixtures().join("preference/seq_cls/llama"), &out, &[]);
    assert_clean_error(&o, "sequence-classification");
    // A tokenizer.model that is not a SentencePiece model is a clean error.
    let spm = tmp.path().join("spm");
    peftkit_tests::copy_dir(&fixtures().join("models/llama_untied"), &spm);
    std::fs::write(spm.join("tokenizer.model"), b"not read").unwrap();
    let o = export_model(&spm, &out, &[]);
    assert_clean_error(&o, "tokenizer.model");
    assert!(!out.exists());
    // --tokenizer-pre belongs to model exports.
    let o = run(
        "model-export",
        &[
            "--model",
            fixtures().join("models/llama_gqa").to_str().unwrap(),
            "--adapter",
            fixtures().join("interop/llama_gqa_lora").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--tokenizer-pre",
            "default",
        ],
    );
    assert_clean_error(&o, "--tokenizer-pre");
    assert_eq!(o.status.code(), Some(2));
}

/// LoRA on GPT-2's Conv1D modules. convert_lora_to_gguf.py applies the weights' Conv1D
/// transpose to the pair, which swaps A and B and transposes both: llama.cpp refuses that file
/// ("incorrect shape", gpt2_lora.f32.gguf). Ours keeps lora_a = A and lora_b = B, whose shapes
/// fit the base GGUF's weights the way llama.cpp checks them, and computes PEFT's ΔW.
#[test]
fn gpt2_lora_fits_llama_cpp_where_the_converter_swaps_a_and_b() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("g.gguf");
    let adapter = fixtures().join("interop/gpt2_lora");
    let o = export("gpt2", &adapter, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = GgufFile::open(&out).unwrap();
    let base = GgufFile::open(&reference("gpt2.f32.gguf")).unwrap();
    let theirs = GgufFile::open(&reference("gpt2_lora.f32.gguf")).unwrap();
    let mut pairs = 0;
    for t in ours.tensors.iter().filter(|t| t.name.ends_with(".lora_a")) {
        let stem = t.name.strip_suffix(".lora_a").unwrap();
        let b = ours.tensor(&format!("{stem}.lora_b")).unwrap();
        let w = base.tensor(stem).unwrap();
        // llama.cpp's check: a.ne[0] == w.ne[0], b.ne[1] == w.ne[1], a.ne[1] == b.ne[0].
        assert_eq!(t.dims[0], w.dims[0], "{stem}: lora_a");
        assert_eq!(b.dims[1], w.dims[1], "{stem}: lora_b");
        assert_eq!(t.dims[1], b.dims[0], "{stem}: rank");
        let their_a = theirs.tensor(&t.name).unwrap();
        if w.dims[0] != w.dims[1] {
            assert_ne!(
                their_a.dims[0], w.dims[0],
                "{stem}: the converter's file now fits"
            );
        }
        pairs += 1;
    }
    assert_eq!(pairs, 8);
    assert_delta_matches(&out, &adapter, |_| None);
}

/// Every module's ΔW read back from `gguf` (q/k rows un-permuted with `heads(module)`), as
/// llama.cpp computes it (alpha / r), equals PEFT's s·B·A of `adapter`.
fn assert_delta_matches(gguf: &Path, adapter: &Path, heads: impl Fn(&str) -> Option<usize>) {
    let g = GgufFile::open(gguf).unwrap();
    let alpha = g.get_f64("adapter.lora.alpha").unwrap().unwrap() as f32;
    let modules = AdapterDir::open(adapter).unwrap().lora_modules().unwrap();
    assert!(!modules.is_empty());
    for m in &modules {
        let target = format!("{}.weight", m.path);
        let name = peftkit_core::gguf::names::gguf_name(&target)
            .or_else(|| peftkit_core::gguf::names::gpt2_gguf_name(&target))
            .unwrap();
        let a_t = g.tensor(&format!("{name}.lora_a")).unwrap();
        let b_t = g.tensor(&format!("{name}.lora_b")).unwrap();
        assert_eq!(a_t.shape(), vec![m.rank, m.in_features]);
        assert_eq!(b_t.shape(), vec![m.out_features, m.rank]);
        let a = g.dequantize(a_t).unwrap();
        let mut b = g.dequantize(b_t).unwrap();
        if let Some(h) = heads(&m.path) {
            b = unpermute_rows(&b, m.out_features, m.rank, h);
        }
        let s = alpha / m.rank as f32;
        let want = m.delta();
        let (o, i, r) = (m.out_features, m.in_features, m.rank);
        let norm = want.iter().fold(0f32, |x, v| x.max(v.abs()));
        let mut worst = 0f32;
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

//! model-import: the tiny GGUF fixture against gguf-py's reference dequantization and the
//! Python `tokenizers` library's ids; corrupt files end in one clean error line and no output.

use peftkit_core::io::safetensors_file::SafetensorsFile;
use peftkit_tests::{assert_clean_error, fixtures, run};
use std::path::{Path, PathBuf};

fn tiny() -> PathBuf {
    fixtures().join("gguf/tiny.gguf")
}

fn import(out: &Path, extra: &[&str]) -> std::process::Output {
    let g = tiny();
    let mut args = vec![
        "--gguf",
        g.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run("model-import", &args)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn imports_tiny_gguf_f32_matching_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let o = import(&out, &["--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["architecture"], "llama");
    assert_eq!(summary["tensors"], 20);
    assert_eq!(summary["dtype"], "float32");

    let reference =
        SafetensorsFile::open(&fixtures().join("gguf/tiny.reference.safetensors")).unwrap();
    let got = SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
    let mut names = got.names();
    let mut want_names = reference.names();
    names.sort();
    want_names.sort();
    assert_eq!(names, want_names);
    let mut params = 0;
    for name in &want_names {
        let r = reference.get(name).unwrap();
        let want = reference.f32_checked(name, r.shape).unwrap();
        let g = got.f32_checked(name, r.shape).unwrap();
        assert_eq!(got.get(name).unwrap().dtype, safetensors::Dtype::F32);
        for (i, (a, b)) in g.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-6, "{name}[{i}]: {a} vs reference {b}");
        }
        params += want.len();
    }
    assert_eq!(summary["parameters"], params);

    let c = json(&out.join("config.json"));
    assert_eq!(c["architectures"][0], "LlamaForCausalLM");
    assert_eq!(c["model_type"], "llama");
    assert_eq!(c["hidden_size"], 64);
    assert_eq!(c["intermediate_size"], 256);
    assert_eq!(c["num_hidden_layers"], 2);
    assert_eq!(c["num_attention_heads"], 4);
    assert_eq!(c["num_key_value_heads"], 2);
    assert_eq!(c["head_dim"], 16);
    assert_eq!(c["vocab_size"], 300);
    assert_eq!(c["max_position_embeddings"], 512);
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["rms_norm_eps"].as_f64().unwrap(), 1e-5);
    assert_eq!(c["rope_theta"].as_f64().unwrap(), 10000.0);
    assert_eq!(c["bos_token_id"], 1);
    assert_eq!(c["eos_token_id"], 2);
    assert_eq!(c["pad_token_id"], 2);
    assert_eq!(c["hidden_act"], "silu");
    assert_eq!(c["torch_dtype"], "float32");

    let tc = json(&out.join("tokenizer_config.json"));
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["pad_token"], "<|im_end|>");
    assert_eq!(tc["add_bos_token"], false);
    assert_eq!(tc["add_eos_token"], false);
    assert_eq!(tc["model_max_length"], 512);
    assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast");
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    let gc = json(&out.join("generation_config.json"));
    assert_eq!(gc["bos_token_id"], 1);
    assert_eq!(gc["eos_token_id"], 2);

    // Tokenizer: same ids as the Python `tokenizers` library, and lossless round trips.
    let tk = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let cases = json(&fixtures().join("gguf/tiny.tokens.json"));
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let enc = tk.encode(text, true).unwrap();
        assert_eq!(enc.get_ids(), &want[..], "ids of {text:?}");
        assert_eq!(
            tk.decode(&want, false).unwrap(),
            text,
            "round trip of {text:?}"
        );
    }
    assert_eq!(tk.token_to_id("<|im_end|>"), Some(2));
}

#[test]
fn bf16_output_is_the_exact_conversion() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model-bf16");
    let o = import(&out, &["--dtype", "bf16", "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference =
        SafetensorsFile::open(&fixtures().join("gguf/tiny.reference.safetensors")).unwrap();
    let got = SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
    for name in reference.names() {
        let r = reference.get(&name).unwrap();
        let want: Vec<u8> = reference
            .f32_checked(&name, r.shape)
            .unwrap()
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let g = got.get(&name).unwrap();
        assert_eq!(g.dtype, safetensors::Dtype::BF16);
        assert_eq!(g.shape, r.shape);
        assert!(g.bytes == &want[..], "{name}: bf16 bytes differ");
    }
    assert_eq!(json(&out.join("config.json"))["torch_dtype"], "bfloat16");
}

/// Write a corrupted copy of tiny.gguf, import it, and check the error and that nothing is left.
fn check_corrupt(bytes: Vec<u8>, needle: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.gguf");
    std::fs::write(&bad, bytes).unwrap();
    let out = tmp.path().join("out");
    let o = run(
        "model-import",
        &[
            "--gguf",
            bad.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_clean_error(&o, needle);
    assert_clean_error(&o, "bad.gguf");
    assert_eq!(o.status.code(), Some(3));
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["bad.gguf".to_string()], "output left behind");
}

#[test]
fn bad_magic() {
    let mut b = std::fs::read(tiny()).unwrap();
    b[..4].copy_from_slice(b"GGUX");
    check_corrupt(b, "not a GGUF file");
}

#[test]
fn truncated_in_header() {
    let b = std::fs::read(tiny()).unwrap();
    check_corrupt(b[..2000].to_vec(), "truncated");
}

#[test]
fn truncated_in_tensor_data() {
    let b = std::fs::read(tiny()).unwrap();
    check_corrupt(b[..b.len() - 1000].to_vec(), "past the end of the file");
}

#[test]
fn unknown_tensor_type() {
    let mut b = std::fs::read(tiny()).unwrap();
    // Tensor info: name, n_dims (u32), dims (u64 each), type (u32), offset (u64).
    let name = b"token_embd.weight";
    let at = b.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let n_dims = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    let ty_at = at + 4 + 8 * n_dims;
    b[ty_at..ty_at + 4].copy_from_slice(&99u32.to_le_bytes());
    check_corrupt(b, "unknown tensor type 99");
}

#[test]
fn refuses_unsupported_dtype_and_missing_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let o = import(&out, &["--dtype", "q4"]);
    assert_clean_error(&o, "unknown dtype");
    assert!(!out.exists());
    let o = run(
        "model-import",
        &[
            "--gguf",
            "/nonexistent/x.gguf",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_clean_error(&o, "/nonexistent/x.gguf");
    assert!(!out.exists());
}

/// GGUFs written by llama.cpp's own convert_hf_to_gguf.py from the tiny HF fixtures
/// (tests/fixtures/gguf_export, generate_gguf_export.py) import back to exactly the tensors
/// they were made from: names, q/k row order (Llama's permutation undone; Qwen2 has none),
/// untied heads and biases. The f32 and f16 conversions lose nothing, so equality is exact.
#[test]
fn imports_llama_cpp_converter_output_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    for (gguf, model) in [
        ("llama_gqa.f32.gguf", "llama_gqa"),
        ("qwen2.f16.gguf", "qwen2"),
        ("llama_untied.f32.gguf", "llama_untied"),
    ] {
        let out = tmp.path().join(model);
        let g = fixtures().join("gguf_export").join(gguf);
        let o = run(
            "model-import",
            &[
                "--gguf",
                g.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--quiet",
            ],
        );
        assert!(
            o.status.success(),
            "{gguf}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let ours = peftkit_tests::read_tensors(&out.join("model.safetensors"));
        let orig = peftkit_tests::read_tensors(
            &fixtures()
                .join("models")
                .join(model)
                .join("model.safetensors"),
        );
        let names = |v: &[(String, Vec<usize>, Vec<f32>)]| {
            let mut n: Vec<String> = v.iter().map(|t| t.0.clone()).collect();
            n.sort();
            n
        };
        assert_eq!(names(&ours), names(&orig), "{gguf}: tensor names");
        for (name, shape, values) in &orig {
            let (_, s, v) = ours.iter().find(|t| &t.0 == name).unwrap();
            assert_eq!(s, shape, "{gguf}: {name} shape");
            assert!(v == values, "{gguf}: {name} differs from the HF original");
        }
    }
}

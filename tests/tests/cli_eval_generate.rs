//! peft-eval and peft-generate as a user runs them: output against the transformers
//! references, and bad inputs that must end in one clean error line.

use peftkit_tests::{assert_clean_error, copy_dir, fixtures, run};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn reference(name: &str) -> Value {
    let p = model_dir(name).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn write_samples(dir: &Path, texts: &[&str]) -> PathBuf {
    let p = dir.join("data.jsonl");
    let lines: Vec<String> = texts
        .iter()
        .map(|t| serde_json::json!({ "text": t }).to_string())
        .collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// The reference's sample texts as a data file for peft-eval.
fn write_reference_samples(dir: &Path, samples: &[Value]) -> PathBuf {
    let texts: Vec<&str> = samples
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    write_samples(dir, &texts)
}

#[test]
fn eval_per_token_json_matches_reference() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama_untied", "gpt2", "qwen2"] {
        let r = reference(name);
        let samples = r["samples"].as_array().unwrap();
        let data = write_reference_samples(tmp.path(), samples);
        let out = run(
            "peft-eval",
            &[
                "--model",
                model_dir(name).to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--per-token",
                "--json",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut nll = 0.0;
        let mut n = 0;
        for (g, want) in got["per_sample"].as_array().unwrap().iter().zip(samples) {
            assert_eq!(g["token_ids"], want["input_ids"], "{name}");
            for (a, b) in g["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .zip(want["logprobs"].as_array().unwrap())
            {
                assert!(
                    (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() <= 1e-4,
                    "{name}"
                );
            }
            nll += want["nll_sum"].as_f64().unwrap();
            n += want["n_tokens"].as_u64().unwrap();
        }
        let loss = got["loss"].as_f64().unwrap();
        assert!((loss - nll / n as f64).abs() < 1e-4, "{name}: loss {loss}");
        assert!((got["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-6 * loss.exp());
        assert_eq!(got["tokens"].as_u64().unwrap(), n);
    }
}

/// `--compute-dtype bf16` (bf16 weights, f32 accumulation, forward only) evaluates within bf16
/// rounding of the transformers f32 reference, and the bf16 path really runs (the numbers are
/// not the f32 ones); a tied head (gpt2, Conv1D weights with biases) and an untied one, on the
/// CPU's best bf16 path and on the portable one. Generation runs on it to the requested length.
#[test]
fn eval_and_generate_in_bf16_follow_the_f32_reference() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["gpt2", "llama_untied"] {
        let r = reference(name);
        let samples = r["samples"].as_array().unwrap();
        let data = write_reference_samples(tmp.path(), samples);
        let model = model_dir(name);
        // The empty value keeps the CPU's best path.
        for path in ["", "fallback"] {
            let out = std::process::Command::new(peftkit_tests::bin("peft-eval"))
                .args(["--model", model.to_str().unwrap(), "--data"])
                .arg(&data)
                .args(["--per-token", "--json", "--compute-dtype", "bf16"])
                .env("PEFTKIT_NO_PROGRESS", "1")
                .env("PEFTKIT_GEMM_BF16", path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let got: Value = serde_json::from_slice(&out.stdout).unwrap();
            let (mut worst, mut equal) = (0.0f64, true);
            for (g, want) in got["per_sample"].as_array().unwrap().iter().zip(samples) {
                for (a, b) in g["logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .zip(want["logprobs"].as_array().unwrap())
                {
                    let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
                    worst = worst.max((a - b).abs());
                    equal &= (a - b).abs() <= 1e-6;
                }
            }
            // Measured 0.028 on both paths (tiny random models, logits of a few units).
            assert!(worst <= 5e-2, "{name} ({path}): logprobs off by {worst}");
            assert!(!equal, "{name} ({path}): bf16 equals f32: path unused?");
        }
        let out = run(
            "peft-generate",
            &[
                "--model",
                model.to_str().unwrap(),
                "--prompt",
                "hello",
                "--max-new-tokens",
                "12",
                "--ignore-eos",
                "--json",
                "--compute-dtype",
                "bf16",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(
            last["token_ids"].as_array().map(Vec::len),
            Some(12),
            "{name}: {last}"
        );
    }
}

#[test]
fn generate_json_greedy_matches_reference() {
    for name in ["llama_gqa", "mistral"] {
        let r = reference(name);
        let g = &r["greedy"][0];
        let out = run(
            "peft-generate",
            &[
                "--model",
                model_dir(name).to_str().unwrap(),
                "--prompt",
                g["prompt"].as_str().unwrap(),
                "--max-new-tokens",
                "12",
                "--json",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got["token_ids"], g["new_token_ids"], "{name}");
    }
}

#[test]
fn generate_streams_the_same_text_as_json() {
    let m = model_dir("llama_gqa");
    let args = [
        "--model",
        m.to_str().unwrap(),
        "--chat",
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "8",
    ];
    let plain = run("peft-generate", &args);
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let json = run("peft-generate", &with_json);
    let v: Value = serde_json::from_slice(&json.stdout).unwrap();
    let streamed = String::from_utf8(plain.stdout).unwrap();
    assert_eq!(streamed.trim_end_matches('\n'), v["text"].as_str().unwrap());
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let m = model_dir("gpt2");
    let args = [
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "The",
        "--temperature",
        "1.0",
        "--top-k",
        "50",
        "--top-p",
        "0.9",
        "--seed",
        "7",
        "--json",
    ];
    let a = run("peft-generate", &args);
    let b = run("peft-generate", &args);
    assert!(a.status.success());
    let (a, b): (Value, Value) = (
        serde_json::from_slice(&a.stdout).unwrap(),
        serde_json::from_slice(&b.stdout).unwrap(),
    );
    assert_eq!(a["token_ids"], b["token_ids"]);
    assert_eq!(a["token_ids"].as_array().unwrap().len(), 128);
    let greedy = run(
        "peft-generate",
        &["--model", m.to_str().unwrap(), "--prompt", "The", "--json"],
    );
    let greedy: Value = serde_json::from_slice(&greedy.stdout).unwrap();
    assert_ne!(
        a["token_ids"], greedy["token_ids"],
        "sampling should differ from greedy"
    );
}

/// Something that breaks a copied model folder.
type Breaker = Box<dyn FnOnce(&Path)>;

/// A model folder copy that a test may break.
fn broken_model(tmp: &Path, break_it: impl FnOnce(&Path)) -> PathBuf {
    let dir = tmp.join("model");
    copy_dir(&model_dir("llama_gqa"), &dir);
    break_it(&dir);
    dir
}

fn eval_error(model: &Path, data: &Path, needle: &str) {
    let out = run(
        "peft-eval",
        &[
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ],
    );
    assert_clean_error(&out, needle);
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

#[test]
fn bad_model_folders_give_one_line_errors() {
    let cases: Vec<(&str, Breaker)> = vec![
        (
            "config.json is missing",
            Box::new(|d: &Path| std::fs::remove_file(d.join("config.json")).unwrap()),
        ),
        (
            "invalid JSON",
            Box::new(|d: &Path| {
                std::fs::write(d.join("config.json"), "{\"hidden_size\": 64,").unwrap()
            }),
        ),
        (
            "unsupported architecture BertForMaskedLM",
            Box::new(|d: &Path| {
                edit_config(d, |v| {
                    v["architectures"] = serde_json::json!(["BertForMaskedLM"])
                })
            }),
        ),
        (
            "unknown dtype float8",
            Box::new(|d: &Path| edit_config(d, |v| v["dtype"] = "float8".into())),
        ),
        (
            "\"hidden_size\" must be a positive integer",
            Box::new(|d: &Path| edit_config(d, |v| v["hidden_size"] = "big".into())),
        ),
        (
            "unsupported rope scaling type yarn",
            Box::new(|d: &Path| {
                edit_config(d, |v| {
                    v["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0})
                })
            }),
        ),
        // The config says 128, the weights are 64 wide.
        (
            "expected [454, 128] from config.json",
            Box::new(|d: &Path| edit_config(d, |v| v["hidden_size"] = 128.into())),
        ),
        (
            "not a valid safetensors file",
            Box::new(|d: &Path| {
                let p = d.join("model.safetensors");
                let bytes = std::fs::read(&p).unwrap();
                std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
            }),
        ),
        (
            "not a valid safetensors file",
            Box::new(|d: &Path| {
                // Header length far past the end of the file.
                let p = d.join("model.safetensors");
                let mut bytes = std::fs::read(&p).unwrap();
                bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                std::fs::write(&p, bytes).unwrap();
            }),
        ),
        (
            "no model.safetensors",
            Box::new(|d: &Path| std::fs::remove_file(d.join("model.safetensors")).unwrap()),
        ),
        (
            "tokenizer.json is missing",
            Box::new(|d: &Path| std::fs::remove_file(d.join("tokenizer.json")).unwrap()),
        ),
    ];
    for (needle, f) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let data = write_samples(tmp.path(), &["Hello world"]);
        let model = broken_model(tmp.path(), f);
        eval_error(&model, &data, needle);
    }
}

#[test]
fn bad_data_files_name_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_dir("llama_gqa");
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    eval_error(&m, &empty, "empty.jsonl: the file is empty");
    let latin1 = tmp.path().join("latin1.txt");
    std::fs::write(&latin1, b"fine line\ncaf\xe9\n").unwrap();
    eval_error(&m, &latin1, "latin1.txt: line 2: not valid UTF-8");
    let bad_json = tmp.path().join("bad.jsonl");
    std::fs::write(&bad_json, "{\"text\": \"ok\"}\n{\"text\": oops}\n").unwrap();
    eval_error(&m, &bad_json, "bad.jsonl: line 2: invalid JSON");
    let no_text = tmp.path().join("notext.jsonl");
    std::fs::write(&no_text, "{\"content\": \"ok\"}\n").unwrap();
    eval_error(
        &m,
        &no_text,
        "line 1: expected an object with a string \"text\" field (found keys: content)",
    );
    let missing = tmp.path().join("missing.jsonl");
    eval_error(&m, &missing, "missing.jsonl");
}

#[test]
fn generate_bad_prompts_file() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("prompts.jsonl");
    std::fs::write(&p, "{\"prompt\": \"hi\"}\n{\"question\": \"x\"}\n").unwrap();
    let out = run(
        "peft-generate",
        &[
            "--model",
            model_dir("gpt2").to_str().unwrap(),
            "--prompts",
            p.to_str().unwrap(),
        ],
    );
    assert_clean_error(
        &out,
        "prompts.jsonl: line 2: expected \"prompt\", \"text\" or \"messages\"",
    );
    // gpt2's tokenizer has no chat template.
    let out = run(
        "peft-generate",
        &[
            "--model",
            model_dir("gpt2").to_str().unwrap(),
            "--chat",
            "--prompt",
            "hi",
        ],
    );
    assert_clean_error(&out, "no chat_template");
}

/// --batch: prompts decoded together give, greedy, exactly the tokens of one by one, with the
/// per-prompt adapter choice (a batch never mixes adapters) and stop reasons kept, in order;
/// sampled, a seed gives the same answers whatever the batch size.
#[test]
fn batched_generation_equals_one_prompt_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_dir("llama_gqa");
    let adapter = fixtures().join("grpo").join("adapter_init");
    let prompts = tmp.path().join("p.jsonl");
    let lines: Vec<String> = [
        ("The capital of France is", None),
        ("2 + 2 =", None),
        ("Once upon a time", Some("null")),
        ("Water boils at", None),
        ("A healthy diet", Some("\"a\"")),
        ("Tell me", Some("null")),
        ("x", None),
        ("x", Some("null")),
    ]
    .iter()
    .map(|(p, a)| match a {
        None => format!("{{\"prompt\": \"{p}\"}}"),
        Some(a) => format!("{{\"prompt\": \"{p}\", \"adapter\": {a}}}"),
    })
    .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let named = format!("a={}", adapter.display());
    let gen = |extra: &[&str]| -> Vec<Value> {
        let mut args = vec![
            "--model",
            m.to_str().unwrap(),
            "--adapter",
            &named,
            "--prompts",
            prompts.to_str().unwrap(),
            "--max-new-tokens",
            "10",
            "--json",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let out = run("peft-generate", &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let one = gen(&[]);
    assert_eq!(one.len(), 8);
    for batch in ["2", "4", "32"] {
        let many = gen(&["--batch", batch]);
        assert_eq!(many.len(), 8);
        for (a, b) in one.iter().zip(&many) {
            for k in ["prompt", "text", "token_ids", "stop_reason", "adapter"] {
                assert_eq!(a[k], b[k], "--batch {batch}: {k}");
            }
        }
    }
    // the adapter changes the answers (so the grouping above was tested)
    assert_eq!(one[6]["adapter"], "a");
    assert_ne!(one[6]["token_ids"], one[7]["token_ids"]);
    // sampled: a seed gives the same answers at any --batch (a generator per prompt)
    let sampled = |batch| gen(&["--temperature", "1.0", "--seed", "3", "--batch", batch]);
    let a = sampled("1");
    assert_ne!(
        a[0]["token_ids"], one[0]["token_ids"],
        "sampling changed nothing"
    );
    for batch in ["4", "3"] {
        for (x, y) in a.iter().zip(&sampled(batch)) {
            assert_eq!(x["token_ids"], y["token_ids"], "sampled --batch {batch}");
        }
    }
    // plain text: one answer per line, in order
    let out = run(
        "peft-generate",
        &[
            "--model",
            m.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--adapter",
            &named,
            "--max-new-tokens",
            "3",
            "--batch",
            "3",
            "--quiet",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.matches('\n').count(), 8, "{text:?}");
}

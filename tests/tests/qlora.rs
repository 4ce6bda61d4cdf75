//! QLoRA against the reference stack (tests/fixtures/generate_qlora.py: transformers +
//! bitsandbytes + PEFT on CPU): 4-bit checkpoints written by transformers (`save_pretrained` of a
//! model loaded with `BitsAndBytesConfig(load_in_4bit=True)`, NF4 + double quant and FP4) load
//! and give bitsandbytes' logits; one LoRA step on the NF4 base gives PEFT's loss and gradients;
//! the CLI tools run on a 4-bit model (eval, generate, LoRA training) and refuse full training.
//!
//! The tools must be built first: `cargo build --release --bins` (make test does).

use peftkit_core::io::safetensors_file::{to_f32, SafetensorsFile};
use peftkit_core::model::{ForwardOptions, Model, SeqInput};
use peftkit_core::rng::Rng;
use peftkit_core::train::engine::{Batch, Engine};
use peftkit_core::train::lora;
use peftkit_core::train::optim::AdamW;
use peftkit_core::train::params::TrainState;
use peftkit_tests::{assert_clean_error, fixtures, json_ids, run};
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// helpers

const NF4: &str = "llama_gqa-nf4";
const FP4: &str = "llama_gqa-fp4";

fn qlora() -> PathBuf {
    fixtures().join("qlora")
}

fn ckpt(name: &str) -> PathBuf {
    qlora().join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn tensors(p: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let f = SafetensorsFile::open(p).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let t = f.get(&n).unwrap();
            let v = to_f32(&n, &t).unwrap();
            (n.clone(), (t.shape.to_vec(), v))
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length");
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// max |got − want| ≤ rel · max |want| (train_parity.rs's rule); returns the max |Δ|.
fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) -> f32 {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    let err = max_abs_diff(got, want);
    assert!(
        err <= rel * scale,
        "{what}: max |Δ| {err} vs max |ref| {scale}"
    );
    err
}

/// Logits `[len, vocab]` of one unpadded sequence, base model or adapter slot 0.
fn logits(model: &Model, ids: &[u32], adapter: Option<usize>) -> Vec<f32> {
    let opts = ForwardOptions { adapter };
    let hidden = model.forward(&[SeqInput { ids }], None, &opts).unwrap();
    model.logits(&hidden, ids.len(), &opts)
}

fn batch() -> (Vec<Vec<u32>>, Vec<Vec<i32>>) {
    let b = read_json(&qlora().join("batch.json"));
    let ids = b["input_ids"].as_array().unwrap().iter().map(json_ids);
    let labels = b["labels"].as_array().unwrap().iter().map(|s| {
        s.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap() as i32)
            .collect()
    });
    (ids.collect(), labels.collect())
}

fn tool_ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({:?}):\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

// ---------------------------------------------------------------------------------------------
// (i) transformers-written 4-bit checkpoints give bitsandbytes' logits

#[test]
fn transformers_4bit_checkpoints_give_bnb_logits() {
    let meta = read_json(&qlora().join("logits.json"));
    let want = tensors(&qlora().join("logits.safetensors"));
    let tol = meta["tolerance"].as_f64().unwrap() as f32;
    let seqs: Vec<Vec<u32>> = meta["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(json_ids)
        .collect();
    for name in [NF4, FP4] {
        let model = Model::load(&ckpt(name)).unwrap();
        let n_q4 = model
            .linears()
            .iter()
            .filter(|l| l.weight.as_f32().is_none())
            .count();
        assert_eq!(n_q4, 14, "{name}: 2 layers × 7 projections stored 4-bit");
        for (i, ids) in seqs.iter().enumerate() {
            let key = meta["checkpoints"][name]["logits_keys"][i]
                .as_str()
                .unwrap();
            let (shape, w) = &want[key];
            assert_eq!(shape[0], ids.len());
            let got = logits(&model, ids, None);
            let err = max_abs_diff(&got, w);
            eprintln!("{name} seq {i}: max |Δ logit| {err:e}");
            assert!(err <= tol, "{name} seq {i}: max |Δ logit| {err} > {tol}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (ii) one QLoRA step: loss, LoRA gradients and the AdamW update against PEFT

fn qlora_step(case: &str) {
    let dir = qlora().join(case);
    let reference = read_json(&dir.join("reference.json"));
    let mut model = Model::load(&ckpt(NF4)).unwrap();
    let mut state = TrainState::new(model.linears().len());
    lora::load_adapter(&dir.join("adapter_init"), &model, &mut state).unwrap();
    let (ids, labels) = batch();
    let batch = Batch {
        ids: ids.iter().map(|v| &v[..]).collect(),
        labels: labels.iter().map(|v| &v[..]).collect(),
    };
    let n = batch.loss_tokens();
    let stats = {
        let engine = Engine::new(&model, &state);
        engine
            .forward_backward(&mut state, &batch, 1.0 / n as f32, &mut Rng::new(0))
            .unwrap()
    };
    let loss = stats.nll_sum / n as f64;
    let want_loss = reference["loss"].as_f64().unwrap();
    eprintln!(
        "{case}: loss {loss} vs {want_loss} (|Δ| {:e})",
        (loss - want_loss).abs()
    );
    assert!(
        (loss - want_loss).abs() < 1e-5,
        "{case}: loss {loss} vs {want_loss}"
    );

    let grads = tensors(&dir.join("grads.safetensors"));
    assert_eq!(grads.len(), state.params.len(), "{case}: trainable tensors");
    // (max |Δ| / max |ref| and max |Δ| over all tensors, for the log)
    let (mut worst_rel, mut worst_abs) = (0.0f32, 0.0f32);
    for (name, (_, want)) in &grads {
        let (_, p) = state
            .params
            .iter()
            .find(|(_, p)| &p.name == name)
            .unwrap_or_else(|| panic!("{case}: {name} not trained"));
        let err = assert_close(&format!("{case} grad {name}"), &p.grad, want, 1e-4);
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        worst_rel = worst_rel.max(err / scale);
        worst_abs = worst_abs.max(err);
    }
    eprintln!("{case}: grads max |Δ| {worst_abs:e}, max |Δ|/max |ref| {worst_rel:e}");

    // The update, from the reference gradients (see train_parity.rs): checks that the optimizer
    // step works on a model whose base is 4-bit.
    for (name, (_, want)) in &grads {
        let (_, p) = state
            .params
            .iter_mut()
            .find(|(_, p)| &p.name == name)
            .unwrap();
        p.grad = want.clone();
    }
    let opt = AdamW {
        lr: reference["lr"].as_f64().unwrap() as f32,
        beta1: 0.9,
        beta2: 0.999,
        eps: reference["eps"].as_f64().unwrap() as f32,
        weight_decay: reference["weight_decay"].as_f64().unwrap() as f32,
    };
    opt.step(&mut state, &mut model, opt.lr, 1);
    for (name, (_, want)) in tensors(&dir.join("updated.safetensors")) {
        let (slot, _) = state.params.iter().find(|(_, p)| p.name == name).unwrap();
        let got = state.value(&model, *slot);
        assert_close(&format!("{case} updated {name}"), got, &want, 1e-6);
    }
}

#[test]
fn qlora_step_q_v_matches_peft() {
    qlora_step("lora_qv");
}

#[test]
fn qlora_step_all_linear_matches_peft() {
    qlora_step("lora_all");
}

// ---------------------------------------------------------------------------------------------
// (iii) peft-eval and peft-generate on a 4-bit model, with and without an adapter

fn write_texts(dir: &Path, texts: &[&str]) -> PathBuf {
    let p = dir.join("data.jsonl");
    let lines: Vec<String> = texts
        .iter()
        .map(|t| serde_json::json!({ "text": t }).to_string())
        .collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// log_softmax(logits[t])[next] for a [len, vocab] row-major block.
fn next_token_logprobs(logits: &[f32], ids: &[u32]) -> Vec<f64> {
    let vocab = logits.len() / ids.len();
    (0..ids.len() - 1)
        .map(|t| {
            let row = &logits[t * vocab..(t + 1) * vocab];
            let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            row[ids[t + 1] as usize] as f64 - lse
        })
        .collect()
}

#[test]
fn eval_on_4bit_model_matches_bnb_logprobs() {
    let tmp = tempfile::tempdir().unwrap();
    let meta = read_json(&qlora().join("logits.json"));
    let want = tensors(&qlora().join("logits.safetensors"));
    let texts: Vec<&str> = meta["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let data = write_texts(tmp.path(), &texts);
    let m = ckpt(NF4);
    let eval = |extra: &[&str]| -> Value {
        let mut args = vec![
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--per-token",
            "--json",
        ];
        args.extend(extra);
        serde_json::from_str(&tool_ok("peft-eval", &args)).unwrap()
    };
    let base = eval(&[]);
    let mut worst = 0.0f64;
    for (i, sample) in base["per_sample"].as_array().unwrap().iter().enumerate() {
        let ids = json_ids(&meta["input_ids"][i]);
        assert_eq!(
            json_ids(&sample["token_ids"]),
            ids,
            "sample {i}: tokenization"
        );
        let key = meta["checkpoints"][NF4]["logits_keys"][i].as_str().unwrap();
        let ref_lp = next_token_logprobs(&want[key].1, &ids);
        let got: Vec<f64> = sample["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), ref_lp.len(), "sample {i}: logprob count");
        for (a, b) in got.iter().zip(&ref_lp) {
            worst = worst.max((a - b).abs());
        }
    }
    eprintln!("peft-eval on {NF4}: max |Δ logprob| {worst:e}");
    assert!(worst <= 1e-4, "peft-eval logprobs differ by {worst}");

    // With a PEFT adapter (trained on the 4-bit base): runs and changes the loss.
    let adapter = qlora().join("lora_qv").join("adapter_init");
    let with = eval(&["--adapter", s(&adapter)]);
    let (l0, l1) = (
        base["loss"].as_f64().unwrap(),
        with["loss"].as_f64().unwrap(),
    );
    assert!(
        l1.is_finite() && (l0 - l1).abs() > 1e-4,
        "adapter loss {l1} vs base {l0}"
    );

    // ... and the adapter's effect is the one the library computes with the same files.
    let mut model = Model::load(&m).unwrap();
    let mut state = TrainState::new(model.linears().len());
    lora::load_adapter(&adapter, &model, &mut state).unwrap();
    lora::install(&mut model, state, 0);
    for (i, sample) in with["per_sample"].as_array().unwrap().iter().enumerate() {
        let ids = json_ids(&meta["input_ids"][i]);
        let lp = next_token_logprobs(&logits(&model, &ids, Some(0)), &ids);
        for (a, b) in sample["logprobs"].as_array().unwrap().iter().zip(&lp) {
            assert!((a.as_f64().unwrap() - b).abs() <= 1e-5, "sample {i}");
        }
    }
}

#[test]
fn generate_on_4bit_models_matches_transformers_greedy() {
    for name in [NF4, FP4] {
        let meta = read_json(&qlora().join("logits.json"));
        let g = &meta["checkpoints"][name]["greedy"];
        let m = ckpt(name);
        let out = tool_ok(
            "peft-generate",
            &[
                "--model",
                s(&m),
                "--prompt",
                g["prompt"].as_str().unwrap(),
                "--max-new-tokens",
                "5",
                "--json",
            ],
        );
        let got: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(got["token_ids"], g["new_token_ids"], "{name}");
    }
    // With an adapter: runs, and plain-text mode prints something.
    let m = ckpt(NF4);
    let adapter = qlora().join("lora_all").join("adapter_init");
    let out = tool_ok(
        "peft-generate",
        &[
            "--model",
            s(&m),
            "--adapter",
            s(&adapter),
            "--prompt",
            "The quick brown fox",
            "--max-new-tokens",
            "5",
            "--json",
        ],
    );
    let got: Value = serde_json::from_str(&out).unwrap();
    let n = got["token_ids"].as_array().unwrap().len();
    assert!((1..=5).contains(&n), "{got}");
}

// ---------------------------------------------------------------------------------------------
// (iv) peft-train on a 4-bit model

#[test]
fn train_lora_on_4bit_model_writes_a_peft_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let m = ckpt(NF4);
    let data = fixtures().join("data").join("alpaca.json");
    let out = tmp.path().join("o");
    tool_ok(
        "peft-train",
        &[
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--method",
            "lora",
            "--rank",
            "4",
            "--alpha",
            "8",
            "--target",
            "q_proj,v_proj",
            "--steps",
            "2",
            "--lr",
            "1e-2",
        ],
    );

    // adapter_config.json: the fields PEFT reads, with the values of the PEFT-written adapter
    // of the same configuration on the same 4-bit base (qlora/lora_qv/adapter_init).
    let ours = read_json(&out.join("adapter_config.json"));
    let peft = read_json(&qlora().join("lora_qv/adapter_init/adapter_config.json"));
    for key in [
        "peft_type",
        "task_type",
        "r",
        "bias",
        "use_dora",
        "use_rslora",
        "fan_in_fan_out",
        "layers_to_transform",
        "modules_to_save",
    ] {
        assert_eq!(ours[key], peft[key], "adapter_config.json {key}");
    }
    assert_eq!(ours["lora_alpha"].as_f64(), peft["lora_alpha"].as_f64());
    let targets = |v: &Value| {
        let mut t: Vec<String> = v["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect();
        t.sort();
        t
    };
    assert_eq!(targets(&ours), targets(&peft));
    let base = ours["base_model_name_or_path"].as_str().unwrap_or_default();
    assert!(base.ends_with(NF4), "base_model_name_or_path {base:?}");

    // adapter_model.safetensors: PEFT's tensor names, shapes and dtype, format "pt".
    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        header.metadata().as_ref().and_then(|m| m.get("format")),
        Some(&"pt".to_string())
    );
    let peft_bytes =
        std::fs::read(qlora().join("lora_qv/adapter_init/adapter_model.safetensors")).unwrap();
    let layout = |b: &[u8]| -> BTreeMap<String, (String, Vec<usize>)> {
        let st = SafeTensors::deserialize(b).unwrap();
        st.tensors()
            .into_iter()
            .map(|(n, v)| (n, (format!("{:?}", v.dtype()), v.shape().to_vec())))
            .collect()
    };
    assert_eq!(layout(&bytes), layout(&peft_bytes));

    // It loads back onto the 4-bit base and changes the output; peft-eval takes it.
    let mut model = Model::load(&m).unwrap();
    let mut state = TrainState::new(model.linears().len());
    lora::load_adapter(&out, &model, &mut state).unwrap();
    lora::install(&mut model, state, 0);
    let ids = [5u32, 17, 40, 3, 99];
    let d = max_abs_diff(&logits(&model, &ids, Some(0)), &logits(&model, &ids, None));
    assert!(d > 1e-6, "the trained adapter has no effect");
    let text = fixtures().join("data").join("text.jsonl");
    tool_ok(
        "peft-eval",
        &["--model", s(&m), "--data", s(&text), "--adapter", s(&out)],
    );
}

#[test]
fn full_training_of_a_4bit_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = ckpt(NF4);
    let data = fixtures().join("data").join("alpaca.json");
    let out = tmp.path().join("o");
    let r = run(
        "peft-train",
        &[
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--method",
            "full",
            "--steps",
            "2",
        ],
    );
    assert_clean_error(&r, "4-bit");
    assert_eq!(r.status.code(), Some(2));
    assert!(!out.exists(), "a refused run left {} behind", out.display());
}

//! PEFT's other methods against PEFT 0.21 (tests/fixtures/generate_methods.py): logits of
//! PEFT-written adapters and one training step's loss and gradients, on a tiny Llama.

use peftkit_core::model::{ForwardOptions, Model, SeqInput};
use peftkit_core::rng::Rng;
use peftkit_core::train::engine::{Batch, Engine};
use peftkit_core::train::ia3;
use peftkit_core::train::params::TrainState;
use peftkit_tests::{eval_loss, fixtures, read_batch, read_json, read_tensors as tensors, run};

fn batch() -> (Vec<Vec<u32>>, Vec<Vec<i32>>) {
    read_batch(&fixtures().join("methods").join("batch.json"))
}
use serde_json::Value;
use std::path::{Path, PathBuf};

fn case_dir(case: &str) -> PathBuf {
    fixtures().join("methods").join(case)
}

fn base() -> Model {
    Model::load(&fixtures().join("models").join("llama_gqa")).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// The model's logits with adapter slot 0, per batch sequence, against PEFT's recorded ones
/// (whose first `skip` rows belong to virtual tokens PEFT returns logits for).
fn assert_peft_logits(model: &Model, case: &str, skip: usize) {
    let want = tensors(&case_dir(case).join("logits.safetensors"));
    let (ids, _) = batch();
    let opts = ForwardOptions { adapter: Some(0) };
    let vocab = model.config.vocab;
    for (i, seq) in ids.iter().enumerate() {
        let hidden = model
            .forward(&[SeqInput { ids: seq }], None, &opts)
            .unwrap();
        let logits = model.logits(&hidden, seq.len(), &opts);
        let (_, shape, w) = want
            .iter()
            .find(|(n, _, _)| n == &format!("logits.{i}"))
            .unwrap();
        assert_eq!(shape[0], skip + seq.len(), "{case}: PEFT's logit rows");
        let err = max_diff(&logits, &w[skip * vocab..]);
        assert!(err <= 1e-4, "{case} seq {i}: max |Δ logit| {err}");
    }
}

fn load_ia3(model: &Model, dir: &Path) -> TrainState {
    let cfg: Value = read_json(&dir.join("adapter_config.json"));
    let mut state = TrainState::new(model.linears().len());
    ia3::load_adapter(dir, &cfg, model, &mut state).unwrap();
    state
}

#[test]
fn ia3_adapter_from_peft_gives_peft_logits() {
    let dir = case_dir("ia3");
    let mut model = base();
    let state = load_ia3(&model, &dir.join("adapter"));
    ia3::install(&mut model, state, 0);
    assert_peft_logits(&model, "ia3", 0);
}

#[test]
fn ia3_step_matches_peft() {
    let dir = case_dir("ia3");
    let reference = read_json(&dir.join("reference.json"));
    let model = base();
    let mut state = load_ia3(&model, &dir.join("adapter"));
    let (ids, labels) = batch();
    let batch = Batch {
        ids: ids.iter().map(|v| &v[..]).collect(),
        labels: labels.iter().map(|v| &v[..]).collect(),
    };
    let n = batch.loss_tokens();
    let stats = Engine::new(&model, &state)
        .forward_backward(&mut state, &batch, 1.0 / n as f32, &mut Rng::new(0))
        .unwrap();
    let loss = stats.nll_sum / n as f64;
    let want = reference["loss"].as_f64().unwrap();
    assert!((loss - want).abs() < 1e-5, "ia3 loss {loss} vs {want}");
    let grads = tensors(&dir.join("grads.safetensors"));
    assert_eq!(grads.len(), state.params.len(), "trainable tensors");
    for (name, shape, want) in &grads {
        // PEFT's parameter names end in the adapter name; the saved (and our) names do not.
        let ours = name.strip_suffix(".default").unwrap_or(name);
        let (_, p) = state
            .params
            .iter()
            .find(|(_, p)| p.name == ours)
            .unwrap_or_else(|| panic!("{ours} not trained"));
        assert_eq!(&p.shape, shape, "{name}: shape");
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = max_diff(&p.grad, want);
        assert!(
            err <= 1e-4 * scale,
            "{name}: max |Δ| {err} vs max |ref| {scale}"
        );
    }
    assert_eq!(
        state.trainable_count() as u64,
        reference["trainable_params"].as_u64().unwrap(),
        "trainable parameter count"
    );
}

/// peft-train --method ia3 writes what PEFT wrote for the same configuration (config keys,
/// tensor names and shapes) and peft-eval reads it back.
#[test]
fn ia3_training_writes_a_peft_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ia3");
    let model = fixtures().join("models").join("llama_gqa");
    let data = fixtures().join("data").join("text.jsonl");
    let o = run(
        "peft-train",
        &[
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--method",
            "ia3",
            "--steps",
            "3",
            "--batch",
            "2",
            "--lr",
            "0.01",
            "--val-data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Evaluation runs with the IA3 vectors (all ones before training, so "before" is the
    // base model's loss; after training they have moved).
    let err = String::from_utf8_lossy(&o.stderr);
    let eval_loss = |when: &str| eval_loss(&err, when);
    assert_ne!(
        eval_loss("before"),
        eval_loss("after"),
        "eval uses the adapter"
    );
    let ours = read_json(&out.join("adapter_config.json"));
    let peft = read_json(&case_dir("ia3").join("adapter").join("adapter_config.json"));
    for k in [
        "peft_type",
        "task_type",
        "fan_in_fan_out",
        "init_ia3_weights",
    ] {
        assert_eq!(ours[k], peft[k], "adapter_config.json {k}");
    }
    let set = |v: &Value| {
        let mut s: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect();
        s.sort();
        s
    };
    assert_eq!(set(&ours["target_modules"]), set(&peft["target_modules"]));
    assert_eq!(
        set(&ours["feedforward_modules"]),
        set(&peft["feedforward_modules"])
    );
    let a = tensors(&out.join("adapter_model.safetensors"));
    let b = tensors(
        &case_dir("ia3")
            .join("adapter")
            .join("adapter_model.safetensors"),
    );
    let shapes = |t: &[(String, Vec<usize>, Vec<f32>)]| {
        let mut v: Vec<(String, Vec<usize>)> =
            t.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect();
        v.sort();
        v
    };
    assert_eq!(shapes(&a), shapes(&b), "adapter tensors");
    assert!(
        a.iter()
            .any(|(_, _, v)| v.iter().any(|x| (x - 1.0).abs() > 1e-6)),
        "training moved the IA3 vectors"
    );
    let o = run(
        "peft-eval",
        &[
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
            "--json",
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn load_prefix_adapter(model: &Model, dir: &Path) -> TrainState {
    let cfg: Value = read_json(&dir.join("adapter_config.json"));
    let mut state = TrainState::new(model.linears().len());
    peftkit_core::train::prefix::load_adapter(dir, &cfg, model, &mut state).unwrap();
    state
}

/// PEFT's prefix adapters (P-Tuning v2, and prefix tuning whose MLP output PEFT saves) give
/// PEFT's logits: the prefix is a pre-filled KV cache, positions start after it.
#[test]
fn prefix_adapters_from_peft_give_peft_logits() {
    for case in ["prefix", "prefix_proj"] {
        let dir = case_dir(case);
        let mut model = base();
        let state = load_prefix_adapter(&model, &dir.join("adapter"));
        peftkit_core::train::prefix::install(&mut model, state, 0);
        assert_peft_logits(&model, case, 0);
    }
}

fn check_step(case: &str, mut state: TrainState, model: &Model) {
    let dir = case_dir(case);
    let reference = read_json(&dir.join("reference.json"));
    let (ids, labels) = batch();
    let batch = Batch {
        ids: ids.iter().map(|v| &v[..]).collect(),
        labels: labels.iter().map(|v| &v[..]).collect(),
    };
    let n = batch.loss_tokens();
    let stats = Engine::new(model, &state)
        .forward_backward(&mut state, &batch, 1.0 / n as f32, &mut Rng::new(0))
        .unwrap();
    let loss = stats.nll_sum / n as f64;
    let want = reference["loss"].as_f64().unwrap();
    assert!((loss - want).abs() < 1e-5, "{case} loss {loss} vs {want}");
    let grads = tensors(&dir.join("grads.safetensors"));
    assert_eq!(grads.len(), state.params.len(), "{case}: trainable tensors");
    for (name, shape, want) in &grads {
        let ours = name.strip_suffix(".default").unwrap_or(name);
        let (_, p) = state
            .params
            .iter()
            .find(|(_, p)| p.name == *ours || p.name == *name)
            .unwrap_or_else(|| panic!("{case}: {name} not trained"));
        assert_eq!(&p.shape, shape, "{case} {name}: shape");
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = max_diff(&p.grad, want);
        assert!(
            err <= 1e-4 * scale,
            "{case} {name}: max |Δ| {err} vs max |ref| {scale}"
        );
    }
    assert_eq!(
        state.trainable_count() as u64,
        reference["trainable_params"].as_u64().unwrap(),
        "{case}: trainable parameter count"
    );
}

#[test]
fn ptuning_v2_step_matches_peft() {
    let model = base();
    let state = load_prefix_adapter(&model, &case_dir("prefix").join("adapter"));
    check_step("prefix", state, &model);
}

/// Prefix tuning through the reparameterization MLP, from PEFT's initial parameters.
#[test]
fn prefix_projection_step_matches_peft() {
    use peftkit_core::train::prefix::{set_trainable, PrefixMlp, PrefixParams};
    let model = base();
    let init = tensors(&case_dir("prefix_proj").join("params_init.safetensors"));
    let get = |suffix: &str| {
        init.iter()
            .find(|(n, _, _)| n.ends_with(suffix))
            .map(|(_, s, v)| (s.clone(), v.clone()))
            .unwrap()
    };
    let (es, emb) = get("embedding.weight");
    let (w1s, w1) = get("transform.0.weight");
    let c = &model.config;
    let mut state = TrainState::new(model.linears().len());
    set_trainable(
        &mut state,
        PrefixParams {
            n: es[0],
            layers: c.layers,
            kv_dim: c.kv_dim(),
            emb,
            mlp: Some(PrefixMlp {
                hidden: w1s[0],
                w1,
                b1: get("transform.0.bias").1,
                w2: get("transform.2.weight").1,
                b2: get("transform.2.bias").1,
            }),
        },
    );
    check_step("prefix_proj", state, &model);
}

/// peft-train --method prefix / ptuning-v2 write adapters shaped like PEFT's; peft-eval and
/// peft-generate run them.
#[test]
fn prefix_training_writes_peft_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("models").join("llama_gqa");
    let data = fixtures().join("data").join("text.jsonl");
    for (method, case) in [("ptuning-v2", "prefix"), ("prefix", "prefix_proj")] {
        let out = tmp.path().join(method);
        let o = run(
            "peft-train",
            &[
                "--model",
                model.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--method",
                method,
                "--num-virtual-tokens",
                "4",
                "--steps",
                "3",
                "--batch",
                "2",
                "--lr",
                "0.01",
                "--quiet",
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let ours = read_json(&out.join("adapter_config.json"));
        let peft = read_json(&case_dir(case).join("adapter").join("adapter_config.json"));
        for k in [
            "peft_type",
            "task_type",
            "num_virtual_tokens",
            "token_dim",
            "num_layers",
            "num_attention_heads",
            "num_transformer_submodules",
            "prefix_projection",
        ] {
            assert_eq!(ours[k], peft[k], "{method}: adapter_config.json {k}");
        }
        let a = tensors(&out.join("adapter_model.safetensors"));
        let b = tensors(
            &case_dir(case)
                .join("adapter")
                .join("adapter_model.safetensors"),
        );
        assert_eq!(a.len(), 1);
        assert_eq!((&a[0].0, &a[0].1), (&b[0].0, &b[0].1), "{method}: tensor");
        for tool in ["peft-eval", "peft-generate"] {
            let extra: &[&str] = if tool == "peft-eval" {
                &["--data", data.to_str().unwrap(), "--json", "--quiet"]
            } else {
                &["--prompt", "hello", "--max-new-tokens", "3"]
            };
            let mut args = vec![
                "--model",
                model.to_str().unwrap(),
                "--adapter",
                out.to_str().unwrap(),
            ];
            args.extend_from_slice(extra);
            let o = run(tool, &args);
            assert!(
                o.status.success(),
                "{tool} {method}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

fn load_prompt_adapter(model: &Model, dir: &Path) -> TrainState {
    let cfg: Value = read_json(&dir.join("adapter_config.json"));
    let mut state = TrainState::new(model.linears().len());
    peftkit_core::train::prompt::load_adapter(dir, &cfg, model, &mut state).unwrap();
    state
}

/// A PEFT prompt-tuning adapter gives PEFT's logits on the real tokens (PEFT's logits also
/// cover the virtual positions, which come first).
#[test]
fn prompt_adapter_from_peft_gives_peft_logits() {
    let dir = case_dir("prompt");
    let mut model = base();
    let state = load_prompt_adapter(&model, &dir.join("adapter"));
    let n = state.prompt.as_ref().unwrap().n;
    peftkit_core::train::prompt::install(&mut model, state, 0);
    assert_peft_logits(&model, "prompt", n);
}

#[test]
fn prompt_step_matches_peft() {
    let model = base();
    let state = load_prompt_adapter(&model, &case_dir("prompt").join("adapter"));
    check_step("prompt", state, &model);
}

/// TEXT initialization takes the text's token embeddings, cut to the number of virtual tokens.
#[test]
fn prompt_text_init_matches_peft() {
    use peftkit_core::train::prompt::{attach, PromptConfig};
    let model = base();
    let reference = read_json(&case_dir("prompt_text").join("reference.json"));
    let ids: Vec<u32> = reference["init_text_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let tok =
        peftkit_core::tokenizer::TextTokenizer::load(&fixtures().join("models").join("llama_gqa"))
            .unwrap();
    let text = reference["prompt_tuning_init_text"].as_str().unwrap();
    assert_eq!(
        tok.encode(text).unwrap(),
        ids,
        "tokenization of the init text"
    );
    let mut state = TrainState::new(model.linears().len());
    let cfg = PromptConfig {
        num_virtual_tokens: 4,
        init_text: Some((text.to_string(), ids)),
        base_model_name_or_path: None,
    };
    attach(&model, &mut state, &cfg, &mut Rng::new(0)).unwrap();
    let init = tensors(&case_dir("prompt_text").join("params_init.safetensors"));
    assert_eq!(
        state.prompt.as_ref().unwrap().emb,
        init[0].2,
        "init embeddings"
    );
    check_step("prompt_text", state, &model);
}

#[test]
fn prompt_training_writes_a_peft_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("prompt");
    let model = fixtures().join("models").join("llama_gqa");
    let data = fixtures().join("data").join("text.jsonl");
    let o = run(
        "peft-train",
        &[
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--method",
            "prompt",
            "--num-virtual-tokens",
            "4",
            "--steps",
            "3",
            "--batch",
            "2",
            "--lr",
            "0.01",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = read_json(&out.join("adapter_config.json"));
    let peft = read_json(
        &case_dir("prompt")
            .join("adapter")
            .join("adapter_config.json"),
    );
    for k in [
        "peft_type",
        "task_type",
        "num_virtual_tokens",
        "token_dim",
        "num_layers",
        "num_attention_heads",
        "num_transformer_submodules",
        "prompt_tuning_init",
    ] {
        assert_eq!(ours[k], peft[k], "adapter_config.json {k}");
    }
    let a = tensors(&out.join("adapter_model.safetensors"));
    let b = tensors(
        &case_dir("prompt")
            .join("adapter")
            .join("adapter_model.safetensors"),
    );
    assert_eq!((&a[0].0, &a[0].1), (&b[0].0, &b[0].1), "tensor");
    for (tool, extra) in [
        (
            "peft-eval",
            vec!["--data", data.to_str().unwrap(), "--json", "--quiet"],
        ),
        (
            "peft-generate",
            vec!["--prompt", "hello", "--max-new-tokens", "3"],
        ),
    ] {
        let mut args = vec![
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = run(tool, &args);
        assert!(
            o.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

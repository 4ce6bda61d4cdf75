//! Writing a fine-tuned model as a Hugging Face folder that transformers loads.

use super::full::base_tensors;
use super::params::base_tensor;
use crate::error::{Error, Result};
use crate::io::atomic::write_file;
use crate::io::safetensors_file::{encode_f32, write_streaming, OutDtype, TensorSpec};
use crate::model::Model;
use std::collections::BTreeMap;
use std::path::Path;

/// Tokenizer and generation files copied from the base folder.
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// Write config.json, model.safetensors (f32, tensors streamed one at a time, GPT-2 Conv1D
/// weights back in their [in, out] layout) and the tokenizer files into `out`.
pub fn save_model(out: &Path, base: &Path, model: &Model) -> Result<()> {
    save_with_head(out, base, model, None)
}

/// A reward model trained in full: a `…ForSequenceClassification` folder (no LM head, a
/// `score.weight` `[1, hidden]`, `num_labels` 1 and the pad id the score position uses), which
/// `AutoModelForSequenceClassification` loads.
pub fn save_reward_model(
    out: &Path,
    base: &Path,
    model: &Model,
    state: &super::params::TrainState,
    pad: Option<u32>,
) -> Result<()> {
    let score = state
        .score
        .as_deref()
        .ok_or_else(|| Error::usage("internal: no score head to save"))?;
    save_with_head(out, base, model, Some((score, pad)))
}

fn save_with_head(
    out: &Path,
    base: &Path,
    model: &Model,
    score: Option<(&[f32], Option<u32>)>,
) -> Result<()> {
    let tensors: Vec<_> = base_tensors(model)
        .into_iter()
        .filter(|(slot, _, _)| {
            !((model.config.tie_embeddings || score.is_some())
                && matches!(slot, super::params::Slot::Head))
        })
        .collect();
    let mut specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(slot, name, shape)| TensorSpec {
            name: name.clone(),
            dtype: OutDtype::F32.st(),
            shape: stored_shape(model, *slot, shape),
        })
        .collect();
    if let Some((w, _)) = score {
        specs.push(TensorSpec {
            name: "score.weight".into(),
            dtype: OutDtype::F32.st(),
            shape: vec![1, w.len()],
        });
    }
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    write_streaming(&out.join("model.safetensors"), &specs, &meta, |i| {
        let Some((slot, _, _)) = tensors.get(i) else {
            return Ok(encode_f32(score.expect("score head").0, OutDtype::F32));
        };
        let v = base_tensor(model, *slot);
        Ok(encode_f32(&stored_values(model, *slot, v), OutDtype::F32))
    })?;
    let mut cfg = model.config.raw.clone();
    if let Some(o) = cfg.as_object_mut() {
        o.remove("torch_dtype");
        o.insert("dtype".into(), "float32".into());
        if let Some((_, pad)) = score {
            let arch = o
                .get("architectures")
                .and_then(|a| a.get(0))
                .and_then(|a| a.as_str())
                .map(|a| {
                    a.replace("ForCausalLM", "ForSequenceClassification")
                        .replace("LMHeadModel", "ForSequenceClassification")
                })
                .unwrap_or_else(|| "LlamaForSequenceClassification".into());
            o.insert("architectures".into(), serde_json::json!([arch]));
            o.insert("num_labels".into(), 1.into());
            o.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
            o.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
            if let Some(p) = pad {
                o.insert("pad_token_id".into(), p.into());
            }
        }
    }
    write_file(
        &out.join("config.json"),
        serde_json::to_string_pretty(&cfg).expect("json").as_bytes(),
    )?;
    for f in SIDE_FILES {
        let src = base.join(f);
        if src.exists() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            write_file(&out.join(f), &bytes)?;
        }
    }
    Ok(())
}

fn conv1d_dims(model: &Model, slot: super::params::Slot) -> Option<(usize, usize)> {
    if let super::params::Slot::LinearWeight(i) = slot {
        let l = model.linears()[i];
        if l.conv1d {
            return Some((l.out_features, l.in_features));
        }
    }
    None
}

fn stored_shape(model: &Model, slot: super::params::Slot, shape: &[usize]) -> Vec<usize> {
    match conv1d_dims(model, slot) {
        Some((o, i)) => vec![i, o],
        None => shape.to_vec(),
    }
}

fn stored_values(model: &Model, slot: super::params::Slot, v: &[f32]) -> Vec<f32> {
    match conv1d_dims(model, slot) {
        Some((o, n)) => crate::kernels::ops::transpose(v, o, n),
        None => v.to_vec(),
    }
}

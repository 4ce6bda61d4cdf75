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
    let tensors: Vec<_> = base_tensors(model)
        .into_iter()
        .filter(|(slot, _, _)| {
            !(model.config.tie_embeddings && matches!(slot, super::params::Slot::Head))
        })
        .collect();
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(slot, name, shape)| TensorSpec {
            name: name.clone(),
            dtype: OutDtype::F32.st(),
            shape: stored_shape(model, *slot, shape),
        })
        .collect();
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    write_streaming(&out.join("model.safetensors"), &specs, &meta, |i| {
        let (slot, _, _) = &tensors[i];
        let v = base_tensor(model, *slot);
        Ok(encode_f32(&stored_values(model, *slot, v), OutDtype::F32))
    })?;
    let mut cfg = model.config.raw.clone();
    if let Some(o) = cfg.as_object_mut() {
        o.remove("torch_dtype");
        o.insert("dtype".into(), "float32".into());
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

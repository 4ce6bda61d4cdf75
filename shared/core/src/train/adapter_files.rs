//! Writing adapter directories (`adapter_config.json` + `adapter_model.safetensors`), shared
//! by every method: PEFT's layout for LoRA, IA3, prefix and prompt tuning, ours for bottleneck
//! adapters.

use super::params::TrainState;
use crate::error::Result;
use crate::io::safetensors_file::{write_f32_tensors, OutDtype};
use crate::model::Model;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// A JSON object as PEFT writes adapter_config.json (`sort_keys=True`, indent 2); serde_json
/// keeps insertion order here, so the keys are sorted explicitly.
pub fn sorted_json(v: Value) -> String {
    let sorted: BTreeMap<String, Value> = v
        .as_object()
        .expect("adapter config is a JSON object")
        .clone()
        .into_iter()
        .collect();
    serde_json::to_string_pretty(&sorted).expect("json")
}

/// Every trainable tensor of `state` under its output name (what adapter_model.safetensors
/// holds for methods whose trainable tensors are what they save).
pub fn trainable_tensors(model: &Model, state: &TrainState) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    state
        .params
        .iter()
        .map(|(slot, p)| {
            (
                p.name.clone(),
                p.shape.clone(),
                state.value(model, *slot).to_vec(),
            )
        })
        .collect()
}

/// Write `tensors` (f32, metadata `{"format": "pt"}`) and `config` into the directory `dir`.
pub fn write_adapter(
    dir: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    config: &str,
) -> Result<()> {
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    write_f32_tensors(
        &dir.join("adapter_model.safetensors"),
        tensors,
        OutDtype::F32,
        &meta,
    )?;
    crate::io::atomic::write_file(&dir.join("adapter_config.json"), config.as_bytes())
}

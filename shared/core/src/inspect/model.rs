//! Model folders and plain tensor files: size, parameters and, for bitsandbytes 4-bit
//! checkpoints, what the quantization costs per parameter.

use super::report::{FilesSummary, ModelSummary, QuantReport};
use super::tensors::dtype_name;
use crate::io::model_folder::ModelFolder;
use crate::quant::blockwise::packed_len;
use crate::quant::checkpoint::{component_suffixes, weight_of_quant_state, TensorSource};
use crate::quant::state::QuantState;
use crate::{Error, Result};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Sizes of a set of tensors: the file summary, the parameter count (4-bit weights at their
/// original size) and the 4-bit part.
pub struct Sizes {
    pub files: FilesSummary,
    pub parameters: u64,
    pub quant: Option<QuantReport>,
}

/// One 4-bit weight: its state and the bytes of all its parts.
struct Q4 {
    state: QuantState,
    bytes: u64,
}

/// Size `names` (all tensors of a file or folder) found through `src`.
pub fn sizes<S: TensorSource + ?Sized>(src: &S, names: &[String]) -> Result<Sizes> {
    let mut files = FilesSummary::default();
    for n in names {
        if let Some(t) = src.tensor(n) {
            files.tensors += 1;
            files.elements += t.shape.iter().product::<usize>() as u64;
            files.bytes += t.bytes.len() as u64;
            *files.dtypes.entry(dtype_name(t.dtype)).or_default() += 1;
        }
    }
    // 4-bit weights and their component tensors
    let mut q4: BTreeMap<String, Q4> = BTreeMap::new();
    let mut parts: BTreeSet<&str> = BTreeSet::new();
    for n in names {
        let Some(w) = weight_of_quant_state(n) else {
            continue;
        };
        let Some(t) = src.tensor(n) else { continue };
        let state = QuantState::from_json(t.bytes)
            .map_err(|m| Error::bad_input(src.file_for(n), format!("tensor {n}: {m}")))?;
        let Some(packed) = src.tensor(w) else {
            return Err(Error::bad_input(
                src.file_for(n),
                format!("tensor {w} is missing (4-bit weight with state {n})"),
            ));
        };
        if packed.bytes.len() != packed_len(state.numel()) {
            return Err(Error::bad_input(
                src.file_for(w),
                format!(
                    "tensor {w} holds {} bytes; a 4-bit {:?} weight needs {}",
                    packed.bytes.len(),
                    state.shape,
                    packed_len(state.numel())
                ),
            ));
        }
        let mut bytes = packed.bytes.len() as u64;
        for suffix in component_suffixes() {
            let part = format!("{w}.{suffix}");
            if let Some(p) = src.tensor(&part) {
                bytes += p.bytes.len() as u64;
            }
        }
        parts.insert(w);
        q4.insert(w.to_string(), Q4 { state, bytes });
    }
    let is_part = |n: &str| -> bool {
        parts.contains(n)
            || component_suffixes().iter().any(|s| {
                n.strip_suffix(s)
                    .and_then(|w| w.strip_suffix('.'))
                    .is_some_and(|w| parts.contains(w))
            })
    };
    let mut parameters = 0u64;
    for n in names {
        if !is_part(n) {
            if let Some(t) = src.tensor(n) {
                parameters += t.shape.iter().product::<usize>() as u64;
            }
        }
    }
    let params_4bit: u64 = q4.values().map(|q| q.state.numel() as u64).sum();
    parameters += params_4bit;
    let quant = (!q4.is_empty()).then(|| {
        let bytes_4bit: u64 = q4.values().map(|q| q.bytes).sum();
        let types: BTreeSet<&str> = q4.values().map(|q| q.state.quant_type.name()).collect();
        let blocks: BTreeSet<usize> = q4.values().map(|q| q.state.blocksize).collect();
        let nested: BTreeSet<bool> = q4.values().map(|q| q.state.nested.is_some()).collect();
        let dtypes: BTreeSet<&str> = q4.values().map(|q| q.state.dtype.torch_name()).collect();
        let single = |s: &BTreeSet<&str>| -> String {
            if s.len() == 1 {
                s.iter().next().map(|x| x.to_string()).unwrap_or_default()
            } else {
                "mixed".into()
            }
        };
        QuantReport {
            quant_method: "bitsandbytes".into(),
            quant_type: single(&types),
            blocksize: (blocks.len() == 1)
                .then(|| blocks.iter().next().copied())
                .flatten(),
            double_quant: (nested.len() == 1)
                .then(|| nested.iter().next().copied())
                .flatten(),
            compute_dtype: None,
            quant_storage: None,
            original_dtype: Some(single(&dtypes)),
            weights_4bit: q4.len() as u64,
            params_4bit,
            bytes_4bit,
            bits_per_param_4bit: bytes_4bit as f64 * 8.0 / params_4bit.max(1) as f64,
            unquantized_linears: Vec::new(),
        }
    });
    Ok(Sizes {
        files,
        parameters,
        quant,
    })
}

/// stored bits per parameter.
pub fn bits_per_param(bytes: u64, params: u64) -> f64 {
    if params == 0 {
        0.0
    } else {
        bytes as f64 * 8.0 / params as f64
    }
}

/// Model folder summary and its 4-bit report (with config.json's quantization_config).
pub fn inspect_model(folder: &ModelFolder) -> Result<(Sizes, ModelSummary)> {
    let mut sizes = sizes(&folder.weights, &folder.names)?;
    let cfg = &folder.config;
    let u = |k: &str| cfg.get(k).and_then(Value::as_u64);
    let first_u = |keys: &[&str]| keys.iter().find_map(|k| u(k));
    let dtype = ["dtype", "torch_dtype"]
        .iter()
        .find_map(|k| cfg.get(*k).and_then(Value::as_str))
        .map(String::from);
    if let Some(q) = sizes.quant.as_mut() {
        apply_quant_config(q, cfg);
        q.unquantized_linears = unquantized_linears(folder);
    }
    let summary = ModelSummary {
        model_type: folder.model_type.clone(),
        architectures: cfg.get("architectures").cloned().unwrap_or(Value::Null),
        hidden_size: first_u(&["hidden_size", "n_embd"]),
        num_hidden_layers: first_u(&["num_hidden_layers", "n_layer"]),
        vocab_size: u("vocab_size"),
        dtype,
        parameters: sizes.parameters,
        stored_bytes: sizes.files.bytes,
        bits_per_param: bits_per_param(sizes.files.bytes, sizes.parameters),
    };
    Ok((sizes, summary))
}

fn apply_quant_config(q: &mut QuantReport, cfg: &Map<String, Value>) {
    let Some(qc) = cfg.get("quantization_config").and_then(Value::as_object) else {
        return;
    };
    let s = |k: &str| qc.get(k).and_then(Value::as_str).map(String::from);
    if let Some(m) = s("quant_method") {
        q.quant_method = m;
    }
    q.compute_dtype = s("bnb_4bit_compute_dtype");
    q.quant_storage = s("bnb_4bit_quant_storage");
}

/// Linear weights (and lm_head) stored in full precision in a 4-bit folder.
fn unquantized_linears(folder: &ModelFolder) -> Vec<String> {
    folder
        .names
        .iter()
        .filter(|n| {
            let Some(module) = n.strip_suffix(".weight") else {
                return false;
            };
            let linear = folder.is_linear(module) || module.ends_with("lm_head");
            let q4 = crate::quant::checkpoint::quant_state_tensor(&folder.weights, n).is_some();
            linear && !q4
        })
        .cloned()
        .collect()
}

//! Reading 4-bit weights from a checkpoint in the transformers/bitsandbytes layout (ours or one
//! transformers wrote), and the `quantization_config` block of config.json.
//!
//! A weight `W` is 4-bit when `W.quant_state.bitsandbytes__nf4` (or `__fp4`) exists; its other
//! parts are `W` (packed), `W.absmax`, `W.quant_map` and, with double quantization,
//! `W.nested_absmax` and `W.nested_quant_map` (see weight.rs). They may sit in different shards.

use super::blockwise::{dequantize_4bit_into, num_blocks, packed_len};
use super::codebook::QuantType;
use super::double_quant::dequantize_absmax;
use super::state::{QuantState, QUANT_STATE_KEY};
use crate::error::{Error, Result};
use crate::io::safetensors_file::{to_f32, OutDtype, SafetensorsFile, TensorRef};
use crate::model::weights::WeightFiles;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::path::PathBuf;

/// Where tensors are looked up by name: one safetensors file or a (sharded) model folder.
pub trait TensorSource {
    fn tensor(&self, name: &str) -> Option<TensorRef<'_>>;
    /// The file to name in an error about tensor `name`.
    fn file_for(&self, name: &str) -> PathBuf;
}

impl TensorSource for SafetensorsFile {
    fn tensor(&self, name: &str) -> Option<TensorRef<'_>> {
        self.get(name)
    }
    fn file_for(&self, _name: &str) -> PathBuf {
        self.path().to_path_buf()
    }
}

impl TensorSource for WeightFiles {
    fn tensor(&self, name: &str) -> Option<TensorRef<'_>> {
        self.get(name)
    }
    fn file_for(&self, name: &str) -> PathBuf {
        self.file_of(name)
            .map(|f| f.path().to_path_buf())
            .unwrap_or_else(|| self.dir().to_path_buf())
    }
}

/// A 4-bit weight read from a checkpoint, with everything needed to dequantize it.
#[derive(Clone, Debug)]
pub struct QuantizedTensor {
    /// The weight's name (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// quant type, block size, original dtype and shape (`[out, in]`), nested parameters.
    pub state: QuantState,
    /// Two 4-bit indices per byte, even element high; `ceil(n/2)` bytes.
    pub packed: Vec<u8>,
    /// One float32 scale per block, double quantization already undone.
    pub absmax: Vec<f32>,
    /// The table the indices decode with: the quant type's code table (bitsandbytes decodes with
    /// its built-in table too; the stored `W.quant_map` is checked to hold those values).
    pub code: [f32; 16],
}

impl QuantizedTensor {
    pub fn quant_type(&self) -> QuantType {
        self.state.quant_type
    }
    pub fn blocksize(&self) -> usize {
        self.state.blocksize
    }
    pub fn shape(&self) -> &[usize] {
        &self.state.shape
    }
    /// dtype of the original weight.
    pub fn dtype(&self) -> OutDtype {
        self.state.dtype
    }
    pub fn numel(&self) -> usize {
        self.state.numel()
    }

    /// The weight in float32 (row-major `shape`), before bitsandbytes' final cast to `dtype`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_into(&mut out);
        out
    }

    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.numel(), "output size");
        dequantize_4bit_into(
            &self.packed,
            &self.absmax,
            self.blocksize(),
            &self.code,
            out,
        );
    }
}

/// [`QuantizedTensor::dequantize`].
pub fn dequantize(q: &QuantizedTensor) -> Vec<f32> {
    q.dequantize()
}

/// Name of `weight`'s JSON state tensor, if the weight is 4-bit in `src`.
pub fn quant_state_tensor<S: TensorSource + ?Sized>(src: &S, weight: &str) -> Option<String> {
    ["nf4", "fp4"]
        .iter()
        .map(|t| format!("{weight}.{QUANT_STATE_KEY}{t}"))
        .find(|n| src.tensor(n).is_some())
}

/// The names of the parts of a 4-bit weight other than the weight itself (present or not).
pub fn component_suffixes() -> [&'static str; 6] {
    [
        "absmax",
        "quant_map",
        "nested_absmax",
        "nested_quant_map",
        "quant_state.bitsandbytes__nf4",
        "quant_state.bitsandbytes__fp4",
    ]
}

/// If `name` is the JSON state of a 4-bit weight, that weight's name.
pub fn weight_of_quant_state(name: &str) -> Option<&str> {
    let (w, suffix) = name.rsplit_once(&format!(".{QUANT_STATE_KEY}"))?;
    matches!(suffix, "nf4" | "fp4").then_some(w)
}

/// The 4-bit weights among a folder's tensor `names`, and the names of their parts (absmax,
/// code, quant state...), which are not tensors of the model in their own right.
pub fn four_bit_weights(
    names: &[String],
) -> (
    std::collections::HashSet<String>,
    std::collections::HashSet<String>,
) {
    let weights: std::collections::HashSet<String> = names
        .iter()
        .filter_map(|n| weight_of_quant_state(n).map(String::from))
        .collect();
    let parts = weights
        .iter()
        .flat_map(|w| component_suffixes().map(|s| format!("{w}.{s}")))
        .collect();
    (weights, parts)
}

/// Read 4-bit weight `weight` (e.g. `model.layers.0.mlp.up_proj.weight`): `Ok(None)` when
/// it is not stored 4-bit, an error naming the file and tensor when its parts are inconsistent.
pub fn read_quantized<S: TensorSource + ?Sized>(
    src: &S,
    weight: &str,
) -> Result<Option<QuantizedTensor>> {
    let Some(qs_name) = quant_state_tensor(src, weight) else {
        return Ok(None);
    };
    let err = |name: &str, msg: String| Error::bad_input(src.file_for(name), msg);
    let get = |suffix: &str| -> Result<TensorRef<'_>> {
        let name = if suffix.is_empty() {
            weight.to_string()
        } else {
            format!("{weight}.{suffix}")
        };
        src.tensor(&name).ok_or_else(|| {
            err(
                &qs_name,
                format!("tensor {name} is missing (4-bit weight {weight})"),
            )
        })
    };
    let qs = get(qs_name
        .strip_prefix(&format!("{weight}."))
        .unwrap_or(&qs_name))?;
    let state = QuantState::from_json(qs.bytes)
        .map_err(|m| err(&qs_name, format!("tensor {qs_name}: {m}")))?;
    if !qs_name.ends_with(state.quant_type.name()) {
        return Err(err(
            &qs_name,
            format!(
                "tensor {qs_name} says quant_type {:?}",
                state.quant_type.name()
            ),
        ));
    }
    let n = state.numel();
    if n == 0 {
        return Err(err(&qs_name, format!("tensor {qs_name}: empty shape")));
    }
    let blocks = num_blocks(n, state.blocksize);
    let packed = get("")?;
    if packed.bytes.len() != packed_len(n) {
        return Err(err(
            weight,
            format!(
                "tensor {weight} holds {} bytes; a 4-bit {:?} weight needs {}",
                packed.bytes.len(),
                state.shape,
                packed_len(n)
            ),
        ));
    }
    let floats = |suffix: &str, len: usize| -> Result<Vec<f32>> {
        let t = get(suffix)?;
        let name = format!("{weight}.{suffix}");
        let v = to_f32(&name, &t).map_err(|m| err(&name, m))?;
        if v.len() != len {
            return Err(err(
                &name,
                format!("tensor {name} has {} values, expected {len}", v.len()),
            ));
        }
        Ok(v)
    };
    let stored = floats("quant_map", 16)?;
    if stored
        .iter()
        .zip(state.quant_type.code())
        .any(|(a, b)| a != b)
    {
        let name = format!("{weight}.quant_map");
        return Err(err(
            &name,
            format!(
                "tensor {name} is not bitsandbytes' {} code table",
                state.quant_type.name()
            ),
        ));
    }
    let code = *state.quant_type.code();
    let absmax = match &state.nested {
        None => floats("absmax", blocks)?,
        Some(nested) => {
            let q = get("absmax")?;
            let name = format!("{weight}.absmax");
            if q.dtype != Dtype::U8 || q.bytes.len() != blocks {
                return Err(err(
                    &name,
                    format!(
                        "tensor {name} is {:?} {:?}; double quantization needs U8 [{blocks}]",
                        q.dtype, q.shape
                    ),
                ));
            }
            let nested_absmax = floats("nested_absmax", blocks.div_ceil(nested.blocksize))?;
            let map: [f32; 256] = floats("nested_quant_map", 256)?
                .try_into()
                .expect("256 values");
            dequantize_absmax(
                q.bytes,
                &nested_absmax,
                &map,
                nested.blocksize,
                nested.offset,
            )
        }
    };
    Ok(Some(QuantizedTensor {
        name: weight.to_string(),
        state,
        packed: packed.bytes.to_vec(),
        absmax,
        code,
    }))
}

/// The `quantization_config` object transformers writes for `BitsAndBytesConfig(load_in_4bit=
/// True, ...)` (shared/docs/formats.md §4.5). `skip_modules: None` writes `null` (transformers
/// then keeps its defaults: the output head and tied weights unquantized).
pub fn quantization_config(
    quant_type: QuantType,
    double_quant: bool,
    compute_dtype: OutDtype,
    skip_modules: Option<&[String]>,
) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype.torch_name(),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type.name(),
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quant_state_names() {
        assert_eq!(
            weight_of_quant_state("a.q_proj.weight.quant_state.bitsandbytes__nf4"),
            Some("a.q_proj.weight")
        );
        assert_eq!(weight_of_quant_state("a.q_proj.weight.absmax"), None);
        assert_eq!(
            weight_of_quant_state("x.quant_state.bitsandbytes__int8"),
            None
        );
    }

    #[test]
    fn config_block_key_order() {
        let c = quantization_config(QuantType::Nf4, true, OutDtype::BF16, None);
        let keys: Vec<&str> = c.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(c["bnb_4bit_compute_dtype"], "bfloat16");
        assert!(c["llm_int8_skip_modules"].is_null());
        let skip = vec!["lm_head".to_string()];
        let c = quantization_config(QuantType::Fp4, false, OutDtype::F32, Some(&skip));
        assert_eq!(c["llm_int8_skip_modules"][0], "lm_head");
        assert_eq!(c["bnb_4bit_quant_type"], "fp4");
    }
}

//! One weight quantized the way bitsandbytes' `Params4bit` does (4-bit blocks plus, optionally,
//! double-quantized block maxima), and its serialized tensors in the transformers layout
//! (shared/docs/formats.md §4.4):
//!
//! ```text
//! W.weight                                  U8  [ceil(n/2), 1]   packed indices
//! W.weight.absmax                           U8  [blocks]         (F32 without double quant)
//! W.weight.quant_map                        F32 [16]             the code table
//! W.weight.nested_absmax                    F32 [ceil(blocks/256)]   double quant only
//! W.weight.nested_quant_map                 F32 [256]            double quant only
//! W.weight.quant_state.bitsandbytes__nf4    U8  [json bytes]     see state.rs
//! ```

use super::blockwise::{first_non_finite, num_blocks, packed_len, quantize_4bit_source, Source};
use super::codebook::{QuantType, DYNAMIC_MAP};
use super::double_quant::{
    dequantize_absmax, double_quantize_with, DoubleQuantized, NESTED_BLOCKSIZE,
};
use super::state::{NestedState, QuantState};
use super::torch_mean::TorchReduce;
use crate::io::safetensors_file::{OutDtype, TensorSpec};
use safetensors::Dtype;

/// How the block maxima are stored.
#[derive(Clone, Debug, PartialEq)]
pub enum StoredAbsmax {
    F32(Vec<f32>),
    Double(DoubleQuantized),
}

/// A quantized weight as bitsandbytes holds it, ready to be written.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedWeight {
    pub state: QuantState,
    pub packed: Vec<u8>,
    pub absmax: StoredAbsmax,
}

/// A NaN or infinite input value (quantization refuses it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NonFinite {
    /// Flat (row-major) element index.
    pub index: usize,
    pub value: f32,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "element {} is {}", self.index, self.value)
    }
}

/// Quantize one weight (values in row-major order of `shape`; `dtype` is the original dtype
/// recorded in the state) as `bitsandbytes.functional.quantize_4bit(A, blocksize,
/// compress_statistics=double_quant, quant_type)` does on CPU.
pub fn quantize_weight(
    src: Source<'_>,
    shape: &[usize],
    dtype: OutDtype,
    quant_type: QuantType,
    blocksize: usize,
    double_quant: bool,
    reduce: TorchReduce,
) -> Result<QuantizedWeight, NonFinite> {
    let n: usize = shape.iter().product();
    assert_eq!(src.len(), n, "source length does not match the shape");
    assert!(n > 0, "cannot quantize an empty tensor");
    let (packed, absmax) = quantize_4bit_source(src, blocksize, quant_type);
    if let Some(b) = first_non_finite(&absmax) {
        return Err(find_non_finite(&src, b * blocksize, blocksize));
    }
    let (nested, absmax) = if double_quant {
        let dq = double_quantize_with(&absmax, reduce);
        (
            Some(NestedState {
                blocksize: NESTED_BLOCKSIZE,
                dtype: OutDtype::F32,
                offset: dq.offset,
            }),
            StoredAbsmax::Double(dq),
        )
    } else {
        (None, StoredAbsmax::F32(absmax))
    };
    Ok(QuantizedWeight {
        state: QuantState {
            quant_type,
            blocksize,
            dtype,
            shape: shape.to_vec(),
            nested,
        },
        packed,
        absmax,
    })
}

fn find_non_finite(src: &Source<'_>, start: usize, blocksize: usize) -> NonFinite {
    let m = blocksize.min(src.len() - start);
    let mut buf = vec![0f32; m];
    src.load(start, &mut buf);
    let (i, v) = buf
        .iter()
        .enumerate()
        .find(|(_, v)| v.is_nan())
        .or_else(|| buf.iter().enumerate().find(|(_, v)| !v.is_finite()))
        .expect("block flagged non-finite");
    NonFinite {
        index: start + i,
        value: *v,
    }
}

impl QuantizedWeight {
    /// Float32 block maxima (double quantization undone), as a 4-bit matmul uses them.
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            StoredAbsmax::F32(a) => a.clone(),
            StoredAbsmax::Double(dq) => dequantize_absmax(
                &dq.absmax,
                &dq.nested_absmax,
                &DYNAMIC_MAP,
                NESTED_BLOCKSIZE,
                dq.offset,
            ),
        }
    }

    /// The weight as a loader holds it (float32 block maxima), named `weight_name`.
    pub fn into_tensor(self, weight_name: &str) -> super::checkpoint::QuantizedTensor {
        super::checkpoint::QuantizedTensor {
            name: weight_name.to_string(),
            absmax: self.absmax_f32(),
            code: *self.state.quant_type.code(),
            packed: self.packed,
            state: self.state,
        }
    }

    /// The serialized tensors (names and bytes) under `weight_name` (e.g.
    /// `model.layers.0.self_attn.q_proj.weight`), in bitsandbytes' order.
    pub fn tensors(&self, weight_name: &str) -> Vec<(TensorSpec, Vec<u8>)> {
        let specs = serialized_specs(weight_name, &self.state);
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mut bytes = vec![self.packed.clone()];
        match &self.absmax {
            StoredAbsmax::F32(a) => {
                bytes.push(f32s(a));
                bytes.push(f32s(self.state.quant_type.code()));
            }
            StoredAbsmax::Double(dq) => {
                bytes.push(dq.absmax.clone());
                bytes.push(f32s(self.state.quant_type.code()));
                bytes.push(f32s(&dq.nested_absmax));
                bytes.push(f32s(&DYNAMIC_MAP));
            }
        }
        bytes.push(self.state.to_json().into_bytes());
        specs.into_iter().zip(bytes).collect()
    }
}

/// Names, dtypes and shapes of the tensors written for one quantized weight (known from the
/// state alone, so a file header can be computed before any data).
pub fn serialized_specs(weight_name: &str, state: &QuantState) -> Vec<TensorSpec> {
    let n = state.numel();
    let blocks = num_blocks(n, state.blocksize);
    let spec = |suffix: &str, dtype: Dtype, shape: Vec<usize>| TensorSpec {
        name: if suffix.is_empty() {
            weight_name.to_string()
        } else {
            format!("{weight_name}.{suffix}")
        },
        dtype,
        shape,
    };
    let mut v = vec![spec("", Dtype::U8, vec![packed_len(n), 1])];
    match &state.nested {
        None => {
            v.push(spec("absmax", Dtype::F32, vec![blocks]));
            v.push(spec("quant_map", Dtype::F32, vec![16]));
        }
        Some(nested) => {
            v.push(spec("absmax", Dtype::U8, vec![blocks]));
            v.push(spec("quant_map", Dtype::F32, vec![16]));
            v.push(spec(
                "nested_absmax",
                Dtype::F32,
                vec![blocks.div_ceil(nested.blocksize)],
            ));
            v.push(spec("nested_quant_map", Dtype::F32, vec![256]));
        }
    }
    v.push(spec(
        &state.tensor_suffix(),
        Dtype::U8,
        vec![state.to_json().len()],
    ));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_and_bytes_agree() {
        let x: Vec<f32> = (0..64 * 40)
            .map(|i| ((i % 97) as f32 - 48.0) / 9.0)
            .collect();
        for dq in [false, true] {
            let w = quantize_weight(
                Source::F32(&x),
                &[64, 40],
                OutDtype::F32,
                QuantType::Nf4,
                64,
                dq,
                TorchReduce::serial(8),
            )
            .unwrap();
            let t = w.tensors("m.q_proj.weight");
            assert_eq!(t.len(), if dq { 6 } else { 4 });
            for (spec, bytes) in &t {
                assert_eq!(spec.byte_len(), bytes.len(), "{}", spec.name);
            }
            assert_eq!(t[0].0.name, "m.q_proj.weight");
            assert_eq!(
                t.last().unwrap().0.name,
                "m.q_proj.weight.quant_state.bitsandbytes__nf4"
            );
            let a = w.absmax_f32();
            assert_eq!(a.len(), 40);
        }
    }

    #[test]
    fn non_finite_is_located() {
        let mut x = vec![1.0f32; 300];
        x[211] = f32::NEG_INFINITY;
        let e = quantize_weight(
            Source::F32(&x),
            &[300],
            OutDtype::F32,
            QuantType::Fp4,
            64,
            true,
            TorchReduce::serial(8),
        )
        .unwrap_err();
        assert_eq!(e.index, 211);
        assert_eq!(e.to_string(), "element 211 is -inf");
    }
}

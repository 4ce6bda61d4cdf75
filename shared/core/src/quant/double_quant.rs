//! Double quantization ("compress_statistics", "nested"): the float32 block maxima of a 4-bit
//! tensor are themselves quantized to 8 bits, bit-exact with bitsandbytes 0.50.2 on CPU.
//!
//! `offset = absmax.mean()` (torch's float32 mean, see [`super::torch_mean`]), then
//! `absmax - offset` is quantized blockwise (block 256) with the signed dynamic map by
//! bitsandbytes' native CPU kernel (`cquantize_blockwise_cpu_fp32`), which does not search the
//! nearest code value but looks it up in a 65536-entry table:
//!
//! - table entry `i` covers `v_i = 2i/65535 − 1` and holds the first code index whose midpoint
//!   `(code[k] + code[k+1]) * 0.5` is not below `v_i` (255 past the last midpoint);
//! - per block, `absmax₂ = max |x|`; an all-zero block stores 0 and indices 0;
//! - each value is scaled `x * (1/absmax₂)`, clamped to [−1, 1] and looked up at
//!   `trunc(fma((s + 1) * 0.5, 65535, 0.5))` (the native code is compiled with FMA contraction).
//!
//! Dequantization: `absmax = code[q] * absmax₂[b / 256] + offset` (a product, then a sum).

use super::codebook::DYNAMIC_MAP;
use super::torch_mean::{torch_mean_f32, TorchReduce};

/// Block size of the nested quantization (fixed in bitsandbytes' `quantize_4bit`).
pub const NESTED_BLOCKSIZE: usize = 256;

const LUT_SIZE: usize = 65536;

/// Double-quantized block maxima of one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuantized {
    /// One byte per 4-bit block (`<weight>.absmax`, uint8).
    pub absmax: Vec<u8>,
    /// One float32 per 256 blocks (`<weight>.nested_absmax`).
    pub nested_absmax: Vec<f32>,
    /// The subtracted mean (`nested_offset` in the JSON state).
    pub offset: f32,
}

/// Double-quantize block maxima with torch's reduction as it would run on this machine.
pub fn double_quantize(absmax: &[f32]) -> DoubleQuantized {
    double_quantize_with(absmax, TorchReduce::detect())
}

/// [`double_quantize`] with an explicit torch reduction shape (for reproducing other machines).
pub fn double_quantize_with(absmax: &[f32], reduce: TorchReduce) -> DoubleQuantized {
    assert!(!absmax.is_empty(), "no block maxima to quantize");
    let offset = torch_mean_f32(absmax, reduce);
    let shifted: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let (q, nested) = quantize_blockwise_8bit(&shifted, &DYNAMIC_MAP, NESTED_BLOCKSIZE);
    DoubleQuantized {
        absmax: q,
        nested_absmax: nested,
        offset,
    }
}

/// Float32 block maxima back from their double-quantized form.
pub fn dequantize_absmax(
    q: &[u8],
    nested_absmax: &[f32],
    code: &[f32; 256],
    nested_blocksize: usize,
    offset: f32,
) -> Vec<f32> {
    dequantize_blockwise_8bit(q, nested_absmax, code, nested_blocksize)
        .into_iter()
        .map(|v| v + offset)
        .collect()
}

/// bitsandbytes' CPU 8-bit blockwise quantization with a sorted 256-entry code (see the module
/// documentation): `(indices, absmax per block)`.
pub fn quantize_blockwise_8bit(
    x: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> (Vec<u8>, Vec<f32>) {
    assert!(blocksize > 0, "blocksize must be positive");
    static DYNAMIC_LUT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let built;
    let lut: &[u8] = if code == &DYNAMIC_MAP {
        DYNAMIC_LUT.get_or_init(|| build_lut(&DYNAMIC_MAP))
    } else {
        built = build_lut(code);
        &built
    };
    let mut q = vec![0u8; x.len()];
    let mut absmax = vec![0f32; x.len().div_ceil(blocksize)];
    for ((block, qb), am) in x
        .chunks(blocksize)
        .zip(q.chunks_mut(blocksize))
        .zip(absmax.iter_mut())
    {
        // std::max(acc, fabs(v)) from -inf, then max with 0
        let mut m = f32::NEG_INFINITY;
        for v in block {
            let a = v.abs();
            if m < a {
                m = a;
            }
        }
        let m = if m > 0.0 { m } else { 0.0 };
        *am = m;
        if m == 0.0 {
            qb.fill(0);
            continue;
        }
        let inv = 1.0f32 / m;
        for (o, &v) in qb.iter_mut().zip(block) {
            let s = v * inv;
            let s = s.clamp(-1.0, 1.0);
            let t = (s + 1.0) * 0.5;
            let idx = t.mul_add((LUT_SIZE - 1) as f32, 0.5) as i32 as u16;
            *o = lut[idx as usize];
        }
    }
    (q, absmax)
}

/// `code[q] * absmax[block]` in float32.
pub fn dequantize_blockwise_8bit(
    q: &[u8],
    absmax: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> Vec<f32> {
    assert!(blocksize > 0, "blocksize must be positive");
    assert!(
        absmax.len() >= q.len().div_ceil(blocksize),
        "absmax too short"
    );
    q.chunks(blocksize)
        .zip(absmax)
        .flat_map(|(qb, &s)| qb.iter().map(move |&i| code[i as usize] * s))
        .collect()
}

/// `build_quantize_lut` of bitsandbytes' cpu_ops.cpp.
fn build_lut(code: &[f32; 256]) -> Vec<u8> {
    let mut mid = [0f32; 255];
    for (k, m) in mid.iter_mut().enumerate() {
        *m = (code[k] + code[k + 1]) * 0.5;
    }
    let mut lut = vec![0u8; LUT_SIZE];
    let mut k = 0usize;
    for (i, slot) in lut.iter_mut().enumerate() {
        let v = (2.0 * i as f32) / (LUT_SIZE - 1) as f32 - 1.0;
        while k < 255 && v > mid[k] {
            k += 1;
        }
        *slot = k as u8;
    }
    lut
}

#[cfg(test)]
mod tests {
    use super::*;

    /// shared/docs/formats.md §8.1 (double-quant example).
    #[test]
    fn formats_md_example() {
        let x: Vec<f32> = linspace(0.01, 3.0, 300);
        let dq = double_quantize_with(&x, TorchReduce::serial(8));
        assert_eq!(dq.offset as f64, 1.5049999952316284);
        assert_eq!(dq.nested_absmax.len(), 2);
        assert_eq!(dq.nested_absmax[0] as f64, 1.4950000047683716);
        assert_eq!(dq.nested_absmax[1] as f64, 1.4950000047683716);
        assert_eq!(&dq.absmax[..8], &[0, 0, 0, 1, 1, 2, 2, 3]);
        assert_eq!(&dq.absmax[296..], &[253, 254, 254, 255]);
        let back = dequantize_absmax(
            &dq.absmax,
            &dq.nested_absmax,
            &DYNAMIC_MAP,
            NESTED_BLOCKSIZE,
            dq.offset,
        );
        for (a, b) in back.iter().zip(&x) {
            assert!((a - b).abs() < 0.02, "{a} vs {b}");
        }
    }

    /// torch.linspace in float32 (start + i * step, with the symmetric second half).
    fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
        let step = (end - start) / (steps - 1) as f32;
        let half = steps / 2;
        (0..steps)
            .map(|i| {
                if i < half {
                    start + step * i as f32
                } else {
                    end - step * (steps - 1 - i) as f32
                }
            })
            .collect()
    }

    #[test]
    fn all_zero_block() {
        let (q, a) = quantize_blockwise_8bit(&[0.0; 300], &DYNAMIC_MAP, 256);
        assert_eq!(a, vec![0.0, 0.0]);
        assert!(q.iter().all(|&v| v == 0));
    }
}

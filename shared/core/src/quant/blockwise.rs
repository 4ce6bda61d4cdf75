//! 4-bit blockwise quantization and dequantization, bit-exact with bitsandbytes 0.50.2 on CPU
//! (`bitsandbytes.functional.quantize_4bit`, which runs the default-backend PyTorch code).
//!
//! For each block of `blocksize` consecutive elements (row-major; the last block may be short):
//!
//! - `absmax = max |x|` over the block; a short last block stores `max(absmax, 1e-38)`;
//! - full blocks are scaled as `x * (1 / max(absmax, 1e-38))` (reciprocal, then product), the
//!   short last block as `x / max(absmax, 1e-38)` (a true division), both in float32;
//! - the index is the number of code midpoints strictly below the scaled value
//!   (`torch.bucketize`, see [`Buckets`]), mapped to the code index;
//! - two indices per byte, the even element in the high nibble; an odd element count is padded
//!   with the index of a scaled 0.0 (7 for NF4, 0 for FP4).
//!
//! An all-zero block therefore gets absmax 0 (1e-38 when it is the short last block) and the
//! index of 0.0 everywhere. A block holding NaN or ±inf gets a non-finite absmax (NaN wins over
//! inf): callers check [`first_non_finite`] and refuse the tensor.
//!
//! Inputs are read straight from little-endian f32 / f16 / bf16 bytes ([`Source`]), one block
//! at a time into a stack buffer, and blocks are spread over rayon's thread pool.

use super::codebook::{Buckets, QuantType};
use rayon::prelude::*;

/// Smallest and largest supported block sizes (bitsandbytes: 32, 64, ..., 4096).
pub const MIN_BLOCKSIZE: usize = 32;
pub const MAX_BLOCKSIZE: usize = 4096;

/// torch's `clamp(min=1e-38)` lower bound in float32 (a subnormal).
const ABSMAX_FLOOR: f32 = 1e-38;

/// Elements per rayon task (whole blocks).
const TASK_ELEMS: usize = 1 << 15;

/// Define `fn $name(args)` running `$body` compiled for AVX-512 or AVX2 when the CPU has them
/// (runtime detection), else for the build target. The body is plain Rust with no fused
/// operations, so every variant computes the same bits; the target features only let the
/// compiler vectorize wider.
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
            unsafe fn avx512($($arg: $ty),*) {
                generic($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2($($arg: $ty),*) {
                generic($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                    // SAFETY: the CPU has the features `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

/// Whether `blocksize` is one bitsandbytes accepts: a power of two in 32..=4096.
pub fn valid_blocksize(blocksize: usize) -> bool {
    blocksize.is_power_of_two() && (MIN_BLOCKSIZE..=MAX_BLOCKSIZE).contains(&blocksize)
}

/// Bytes of packed indices for `n` elements: `ceil(n / 2)`.
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

/// Number of blocks (absmax values) for `n` elements.
pub fn num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// Element type of raw little-endian input bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SrcDtype {
    F32,
    F16,
    BF16,
}

impl SrcDtype {
    pub fn size(self) -> usize {
        match self {
            SrcDtype::F32 => 4,
            SrcDtype::F16 | SrcDtype::BF16 => 2,
        }
    }
}

/// Values to quantize: f32 in memory, or raw little-endian bytes (e.g. a memory-mapped or
/// freshly read safetensors tensor), converted block by block.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    F32(&'a [f32]),
    Bytes(&'a [u8], SrcDtype),
}

impl Source<'_> {
    pub fn len(&self) -> usize {
        match self {
            Source::F32(x) => x.len(),
            Source::Bytes(b, d) => b.len() / d.size(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `start..start + out.len()` as f32 (exact conversions).
    #[inline(always)]
    pub fn load(&self, start: usize, out: &mut [f32]) {
        match *self {
            Source::F32(x) => out.copy_from_slice(&x[start..start + out.len()]),
            Source::Bytes(b, SrcDtype::F32) => {
                let b = &b[start * 4..(start + out.len()) * 4];
                for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Source::Bytes(b, SrcDtype::BF16) => {
                let b = &b[start * 2..(start + out.len()) * 2];
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
            Source::Bytes(b, SrcDtype::F16) => {
                let b = &b[start * 2..(start + out.len()) * 2];
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
        }
    }
}

/// Quantize `x` (row-major) to 4 bits: `(packed, absmax)` with `ceil(n/2)` bytes and
/// `ceil(n/blocksize)` block maxima, exactly as bitsandbytes does on CPU.
///
/// Panics when `blocksize` is not a power of two in 32..=4096 (see [`valid_blocksize`]).
pub fn quantize_4bit(x: &[f32], blocksize: usize, qt: QuantType) -> (Vec<u8>, Vec<f32>) {
    quantize_4bit_source(Source::F32(x), blocksize, qt)
}

/// [`quantize_4bit`] from any [`Source`].
pub fn quantize_4bit_source(
    src: Source<'_>,
    blocksize: usize,
    qt: QuantType,
) -> (Vec<u8>, Vec<f32>) {
    let n = src.len();
    let mut packed = vec![0u8; packed_len(n)];
    let mut absmax = vec![0f32; num_blocks(n, blocksize)];
    quantize_4bit_into(src, blocksize, qt, &mut packed, &mut absmax);
    (packed, absmax)
}

/// [`quantize_4bit`] into caller-provided buffers of `ceil(n/2)` and `ceil(n/blocksize)`.
pub fn quantize_4bit_into(
    src: Source<'_>,
    blocksize: usize,
    qt: QuantType,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    assert!(valid_blocksize(blocksize), "invalid blocksize {blocksize}");
    let n = src.len();
    assert_eq!(packed.len(), packed_len(n), "packed buffer size");
    assert_eq!(absmax.len(), num_blocks(n, blocksize), "absmax buffer size");
    let buckets = qt.buckets();
    let blocks_per_task = (TASK_ELEMS / blocksize).max(1);
    packed
        .par_chunks_mut(blocks_per_task * blocksize / 2)
        .zip(absmax.par_chunks_mut(blocks_per_task))
        .enumerate()
        .for_each(|(t, (p, a))| {
            quantize_task(&src, n, t * blocks_per_task, blocksize, &buckets, p, a)
        });
}

/// Block maxima only (the same values [`quantize_4bit`] returns), e.g. to plan a file layout.
pub fn block_absmax(src: Source<'_>, blocksize: usize) -> Vec<f32> {
    assert!(valid_blocksize(blocksize), "invalid blocksize {blocksize}");
    let n = src.len();
    let mut absmax = vec![0f32; num_blocks(n, blocksize)];
    let blocks_per_task = (TASK_ELEMS / blocksize).max(1);
    absmax
        .par_chunks_mut(blocks_per_task)
        .enumerate()
        .for_each(|(t, a)| absmax_task(&src, n, t * blocks_per_task, blocksize, a));
    absmax
}

/// Index of the first block whose absmax is NaN or infinite (the block holds such a value).
pub fn first_non_finite(absmax: &[f32]) -> Option<usize> {
    absmax.iter().position(|a| !a.is_finite())
}

multiversion! {
    /// The blocks `first_block..` whose outputs are `packed` / `absmax`.
    fn quantize_task(
        src: &Source<'_>,
        n: usize,
        first_block: usize,
        blocksize: usize,
        buckets: &Buckets,
        packed: &mut [u8],
        absmax: &mut [f32],
    ) {
        let mut buf = [0f32; MAX_BLOCKSIZE];
        let half = blocksize / 2;
        let table = buckets.order_nibbles();
        let (lo, hi) = (table as u32, (table >> 32) as u32);
        let zero = buckets.index(0.0);
        let total = packed.len();
        for (j, am) in absmax.iter_mut().enumerate() {
            let start = (first_block + j) * blocksize;
            let m = blocksize.min(n - start);
            let vals = &mut buf[..m];
            src.load(start, vals);
            let raw = raw_absmax(vals);
            let out = &mut packed[j * half..(j * half + half).min(total)];
            if m == blocksize {
                *am = raw;
                let inv = 1.0 / floor(raw);
                for (o, p) in out.iter_mut().zip(vals.chunks_exact(2)) {
                    let a = code_index(p[0] * inv, &buckets.bounds, lo, hi);
                    let b = code_index(p[1] * inv, &buckets.bounds, lo, hi);
                    *o = ((a << 4) | b) as u8;
                }
            } else {
                let d = floor(raw);
                *am = d;
                let mut pairs = vals.chunks_exact(2);
                for (o, p) in out.iter_mut().zip(&mut pairs) {
                    let a = code_index(p[0] / d, &buckets.bounds, lo, hi);
                    let b = code_index(p[1] / d, &buckets.bounds, lo, hi);
                    *o = ((a << 4) | b) as u8;
                }
                if let [last] = pairs.remainder() {
                    let a = code_index(last / d, &buckets.bounds, lo, hi);
                    out[m / 2] = ((a << 4) as u8) | zero;
                }
            }
        }
    }
}

multiversion! {
    /// Block maxima of the blocks `first_block..` (the values quantize_task stores).
    fn absmax_task(src: &Source<'_>, n: usize, first_block: usize, blocksize: usize, absmax: &mut [f32]) {
        let mut buf = [0f32; MAX_BLOCKSIZE];
        for (j, am) in absmax.iter_mut().enumerate() {
            let start = (first_block + j) * blocksize;
            let m = blocksize.min(n - start);
            src.load(start, &mut buf[..m]);
            let raw = raw_absmax(&buf[..m]);
            *am = if m == blocksize { raw } else { floor(raw) };
        }
    }
}

multiversion! {
    /// Dequantize the blocks `first_block..` into `out`.
    fn dequantize_task(
        packed: &[u8],
        absmax: &[f32],
        code: &[f32; 16],
        first_block: usize,
        blocksize: usize,
        out: &mut [f32],
    ) {
        for (j, ob) in out.chunks_mut(blocksize).enumerate() {
            let b = first_block + j;
            let scale = absmax[b];
            let p = &packed[b * blocksize / 2..];
            let half = ob.len() / 2;
            let mut pairs = ob.chunks_exact_mut(2);
            for (pair, &byte) in (&mut pairs).zip(p) {
                pair[0] = code[(byte >> 4) as usize] * scale;
                pair[1] = code[(byte & 15) as usize] * scale;
            }
            if let [last] = pairs.into_remainder() {
                *last = code[(p[half] >> 4) as usize] * scale;
            }
        }
    }
}

/// max |x| of a block through the integer order of the absolute bit patterns: identical to the
/// float maximum for finite values, and a NaN (or inf) anywhere makes the result NaN (or inf).
#[inline(always)]
fn raw_absmax(vals: &[f32]) -> f32 {
    let mut m = 0u32;
    for v in vals {
        m = m.max(v.to_bits() & 0x7fff_ffff);
    }
    f32::from_bits(m)
}

/// torch's `clamp(min=1e-38)` (NaN stays NaN).
#[inline(always)]
fn floor(a: f32) -> f32 {
    if a < ABSMAX_FLOOR {
        ABSMAX_FLOOR
    } else {
        a
    }
}

/// Code index of a scaled value: the number of bounds strictly below it (`torch.bucketize`),
/// mapped through the position → index table (nibbles; `lo` positions 0..8, `hi` 8..16),
/// in 32-bit lanes so that it vectorizes.
#[inline(always)]
fn code_index(s: f32, bounds: &[f32; 15], lo: u32, hi: u32) -> u32 {
    let mut c = 0u32;
    for &b in bounds {
        c += (s > b) as u32;
    }
    let t = if c < 8 { lo } else { hi };
    (t >> (4 * (c & 7))) & 15
}

/// Dequantize `n` elements: `code[index] * absmax[block]` in float32 (bitsandbytes'
/// `dequantize_4bit` before the cast to the stored dtype).
///
/// With the FP4 table, index 8 gives +0.0, as in bitsandbytes' PyTorch implementation and its
/// AVX-512 CPU kernel; its scalar/AVX2 CPU kernel (used when the last dimension is not a
/// multiple of 16) and its CUDA kernel give −0.0 there. The values are equal.
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    n: usize,
    blocksize: usize,
    code: &[f32; 16],
) -> Vec<f32> {
    let mut out = vec![0f32; n];
    dequantize_4bit_into(packed, absmax, blocksize, code, &mut out);
    out
}

/// [`dequantize_4bit`] into `out` (its length is the element count).
pub fn dequantize_4bit_into(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    code: &[f32; 16],
    out: &mut [f32],
) {
    assert!(
        blocksize > 0 && blocksize.is_multiple_of(2),
        "invalid blocksize {blocksize}"
    );
    let n = out.len();
    assert!(packed.len() >= packed_len(n), "packed data too short");
    assert!(absmax.len() >= num_blocks(n, blocksize), "absmax too short");
    let blocks_per_task = (TASK_ELEMS / blocksize).max(1);
    out.par_chunks_mut(blocks_per_task * blocksize)
        .enumerate()
        .for_each(|(t, o)| {
            dequantize_task(packed, absmax, code, t * blocks_per_task, blocksize, o)
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// shared/docs/formats.md §8.1
    fn vector() -> Vec<f32> {
        let mut x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 31.5).collect();
        x.extend((0..64).map(|i| (((i * 37) % 64) as f32 - 32.0) / 8.0));
        x
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|v| format!("{v:02x}")).collect()
    }

    #[test]
    fn formats_md_test_vector() {
        let x = vector();
        let (p, a) = quantize_4bit(&x, 64, QuantType::Nf4);
        assert_eq!(a, vec![1.0, 4.0]);
        assert_eq!(
            hex(&p),
            "00000111111112222233344445556667788899aaabbbccccddddeeeeeeefffff091c3e60a2d4f71b2e5f91c3e60a1d4e71b2d5f81c3e6091c3e70a2d4f81b2e5"
        );
        let (p, _) = quantize_4bit(&x, 64, QuantType::Fp4);
        assert_eq!(
            hex(&p),
            "bbbbbbaaaaaaaadddddccccffeeee99911166667744445555522222222333333b6a5c29b7a5f31a4d2e36a5c2eb7a5c30b4d2f36a4d2eb6a5c29b7d2f31a4d2e"
        );
    }

    #[test]
    fn packing_order_and_padding() {
        let (p, a) = quantize_4bit(&[1.0, -1.0, 0.5], 64, QuantType::Nf4);
        assert_eq!(a, vec![1.0]);
        // [1, -1] -> 0xf0; 0.5 -> index 12 (0.4407 < 0.5 < 0.5016 midpoint), padded with 7
        assert_eq!(p, vec![0xf0, 0xc7]);
        // absmax 0.5: scaled to [1, -1, 1] -> FP4 indices 3, 11, 3, pad 0
        let (p, _) = quantize_4bit(&[0.5, -0.5, 0.5], 64, QuantType::Fp4);
        assert_eq!(p, vec![0x3b, 0x30]);
    }

    #[test]
    fn zero_blocks() {
        let x = vec![0f32; 96];
        let (p, a) = quantize_4bit(&x, 64, QuantType::Nf4);
        assert_eq!(a, vec![0.0, 1e-38]);
        assert!(p.iter().all(|&b| b == 0x77));
        let (p, _) = quantize_4bit(&x, 64, QuantType::Fp4);
        assert!(p.iter().all(|&b| b == 0));
    }

    #[test]
    fn non_finite_blocks_are_flagged() {
        let mut x = vec![0.5f32; 200];
        assert_eq!(
            first_non_finite(&quantize_4bit(&x, 64, QuantType::Nf4).1),
            None
        );
        x[130] = f32::INFINITY;
        assert_eq!(
            first_non_finite(&quantize_4bit(&x, 64, QuantType::Nf4).1),
            Some(2)
        );
        x[70] = f32::NAN;
        assert_eq!(
            first_non_finite(&quantize_4bit(&x, 64, QuantType::Nf4).1),
            Some(1)
        );
        assert_eq!(
            first_non_finite(&block_absmax(Source::F32(&x), 64)),
            Some(1)
        );
    }

    #[test]
    fn sources_agree_and_roundtrip() {
        let x: Vec<f32> = (0..10_001)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 77.0)
            .collect();
        let bf: Vec<u8> = x
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let xb: Vec<f32> = bf
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        for bs in [32, 64, 128, 256, 4096] {
            let a = quantize_4bit(&xb, bs, QuantType::Nf4);
            let b = quantize_4bit_source(Source::Bytes(&bf, SrcDtype::BF16), bs, QuantType::Nf4);
            assert_eq!(a, b);
            assert_eq!(block_absmax(Source::F32(&xb), bs), a.1);
            let d = dequantize_4bit(&a.0, &a.1, xb.len(), bs, QuantType::Nf4.code());
            for (i, (u, v)) in d.iter().zip(&xb).enumerate() {
                let am = a.1[i / bs];
                assert!((u - v).abs() <= am * 0.17, "{i}: {u} vs {v}");
            }
        }
    }
}

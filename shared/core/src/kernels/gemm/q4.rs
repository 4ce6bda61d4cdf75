//! Products with 4-bit weights (NF4/FP4 in the bitsandbytes layout): the weight is decoded
//! panel by panel while the GEMM driver packs it, so no full-precision copy of it ever exists.
//! The forward product `x·Wᵀ` and the input gradient `dy·W` both decode straight into the
//! driver's panel layout; the decode itself is an AVX-512 table lookup (`vpermps` over the 16
//! code values) when available.

use super::driver::{self, BSource, Kernel, View};
use super::{GemmPath, PackedWeight, PARALLEL_MIN, SERIAL};
use std::cell::Cell;

/// A borrowed 4-bit weight `[n, k]` (a linear layer's `[out, in]`), row-major when decoded.
#[derive(Clone, Copy)]
pub struct Q4Weight<'a> {
    /// Two code indices per byte; the element with the even index is in the high nibble.
    pub packed: &'a [u8],
    /// Scale of each block of `blocksize` consecutive elements.
    pub absmax: &'a [f32],
    /// The 16 code values (NF4 or FP4 table).
    pub code: &'a [f32; 16],
    pub blocksize: usize,
    pub n: usize,
    pub k: usize,
}

impl Q4Weight<'_> {
    fn check(&self) {
        let len = self.n * self.k;
        assert!(
            self.packed.len() >= len.div_ceil(2)
                && self.blocksize > 0
                && self.absmax.len() >= len.div_ceil(self.blocksize),
            "Q4Weight: storage too small for its shape"
        );
    }
}

/// Decode elements `start..start + out.len()` of the flattened weight: `code[q]·absmax[block]`
/// in f32, as bitsandbytes' dequantize does.
pub fn decode(w: &Q4Weight, start: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if start.is_multiple_of(32) && w.blocksize.is_multiple_of(32) && avx512() {
        let whole = out.len() / 32 * 32;
        // SAFETY: AVX-512F is available; the chunks lie inside the weight (caller contract,
        // checked by the slice indexing inside).
        unsafe { decode32_avx512(w, start, &mut out[..whole]) };
        decode_scalar(w, start + whole, &mut out[whole..]);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if start.is_multiple_of(16) && w.blocksize.is_multiple_of(16) && avx2() {
        let whole = out.len() / 16 * 16;
        // SAFETY: AVX2 and FMA are available; the chunks lie inside the weight (caller
        // contract, checked by the slice indexing inside).
        unsafe { super::q4_avx2::decode16(w, start, &mut out[..whole]) };
        decode_scalar(w, start + whole, &mut out[whole..]);
        return;
    }
    decode_scalar(w, start, out)
}

fn decode_scalar(w: &Q4Weight, start: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        let e = start + i;
        let byte = w.packed[e / 2];
        let q = if e.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 15
        };
        *o = w.code[q as usize] * w.absmax[e / w.blocksize];
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f"))
}

/// AVX2 kernels on CPUs without AVX-512.
#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        !avx512() && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    })
}

/// 32 elements at a time (`start` and `out.len()` multiples of 32, blocks multiples of 32,
/// so each group of 32 shares one scale).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn decode32_avx512(w: &Q4Weight, start: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let bytes = &w.packed[start / 2..(start + out.len()) / 2];
    // SAFETY: every load reads 16 bytes inside `bytes` and every store 32 floats inside `out`.
    unsafe {
        let code = _mm512_loadu_ps(w.code.as_ptr());
        // Interleave even (high nibble) and odd (low nibble) elements back into order.
        let lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let hi_idx =
            _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        // The block of each group, stepped instead of divided (see dot_q4_avx512).
        let (mut block, mut offset) = (start / w.blocksize, start % w.blocksize);
        for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(16)) {
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.as_ptr() as *const __m128i));
            let even = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), code);
            // vpermps reads only the low four bits of each index: no mask needed.
            let odd = _mm512_permutexvar_ps(v, code);
            let s = _mm512_set1_ps(w.absmax[block]);
            offset += 32;
            if offset == w.blocksize {
                (block, offset) = (block + 1, 0);
            }
            let o0 = _mm512_mul_ps(_mm512_permutex2var_ps(even, lo_idx, odd), s);
            let o1 = _mm512_mul_ps(_mm512_permutex2var_ps(even, hi_idx, odd), s);
            _mm512_storeu_ps(o.as_mut_ptr(), o0);
            _mm512_storeu_ps(o.as_mut_ptr().add(16), o1);
        }
    }
}

thread_local! {
    /// Rows decoded for one transposing panel pack (reused between panels).
    static ROWS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Packs panels of B(kk, j) = W[j, kk] (the forward product x·Wᵀ): decode the panel's rows,
/// then the kernel's own transposing pack.
fn nt_packer<K: Kernel>(
    w: Q4Weight<'_>,
) -> impl Fn(usize, usize, usize, usize, *mut f32) + Sync + '_ {
    move |j0, cols, pc, kc, dst| {
        let mut rows = ROWS.with(|c| c.take());
        rows.resize(cols * kc, 0.0);
        for r in 0..cols {
            decode(&w, (j0 + r) * w.k + pc, &mut rows[r * kc..(r + 1) * kc]);
        }
        let src = View {
            ptr: rows.as_ptr(),
            ls: kc,
            ks: 1,
        };
        // SAFETY: `rows` holds cols × kc floats; the driver hands a dst of kc × NR floats.
        unsafe { K::pack(src, cols, kc, dst, K::NR) };
        ROWS.with(|c| c.set(rows));
    }
}

/// Packs panels of B(kk, j) = W[kk, j] (the input gradient dy·W): each k-step is a row
/// segment of W, decoded straight into the panel.
fn nn_packer<K: Kernel>(
    w: Q4Weight<'_>,
) -> impl Fn(usize, usize, usize, usize, *mut f32) + Sync + '_ {
    move |j0, cols, pc, kc, dst| {
        for kk in 0..kc {
            // SAFETY: the driver's panel holds kc × NR floats.
            let row = unsafe { std::slice::from_raw_parts_mut(dst.add(kk * K::NR), K::NR) };
            decode(&w, (pc + kk) * w.k + j0, &mut row[..cols]);
            row[cols..].fill(0.0);
        }
    }
}

/// The driver kernel for the selected path (the `gemm` crate path has no custom packing; it
/// uses the best of ours).
macro_rules! with_kernel {
    ($path:expr, $K:ident => $body:expr) => {
        match $path {
            #[cfg(target_arch = "x86_64")]
            GemmPath::Avx512 => {
                type $K = super::avx512::Avx512;
                $body
            }
            #[cfg(target_arch = "x86_64")]
            GemmPath::Avx2 => {
                type $K = super::avx2::Avx2;
                $body
            }
            _ => {
                type $K = super::scalar::Scalar;
                $body
            }
        }
    };
}

fn path() -> GemmPath {
    match GemmPath::selected() {
        GemmPath::Crate => GemmPath::best(),
        p if !p.available() => GemmPath::best(),
        p => p,
    }
}

fn threads(m: usize, n: usize, k: usize) -> usize {
    if m * n * k < PARALLEL_MIN || SERIAL.with(|s| s.get()) {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// Rows up to which [`matmul_nt_q4`] decodes each weight row once and takes dot products
/// (generation) instead of going through the packed GEMM.
const GEMV_MAX_M: usize = 4;

/// C[m×n] (+)= A[m×k] · Wᵀ for a 4-bit W `[n, k]` (a linear layer's forward pass).
pub fn matmul_nt_q4(a: &[f32], w: &Q4Weight, c: &mut [f32], m: usize, acc: bool) {
    w.check();
    let (n, k) = (w.n, w.k);
    assert!(
        a.len() >= m * k && c.len() >= m * n,
        "matmul_nt_q4 operand sizes"
    );
    if m == 0 || n == 0 || k == 0 {
        if !acc {
            c[..m * n].fill(0.0);
        }
        return;
    }
    if m <= GEMV_MAX_M {
        return gemv_q4(a, w, c, m, acc);
    }
    let av = View {
        ptr: a.as_ptr(),
        ls: k,
        ks: 1,
    };
    let t = threads(m, n, k);
    with_kernel!(path(), K => {
        let packer = nt_packer::<K>(*w);
        // SAFETY: A covers m×k and C m×n (asserted); the packer writes whole panels; the
        // kernel's instruction set is available (path()).
        unsafe {
            driver::gemm_driver::<K>(m, n, k, av, BSource::Custom(&packer), c.as_mut_ptr(), n, acc, t)
        }
    })
}

/// Few rows: every weight row is decoded once (into a small buffer) and dotted with each
/// input row; output rows in parallel chunks. Reads half a byte per weight.
fn gemv_q4(a: &[f32], w: &Q4Weight, c: &mut [f32], m: usize, acc: bool) {
    use rayon::prelude::*;
    let (n, k) = (w.n, w.k);
    const CHUNK: usize = 64;
    let cp = driver::SendPtr(c.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    if avx512() && k.is_multiple_of(32) && w.blocksize.is_multiple_of(32) {
        // Decode fused into the dot product: the inputs are split once into the nibbles'
        // order, so no decoded row is written and read back.
        let wide = k.is_multiple_of(64) && w.blocksize.is_multiple_of(64);
        let split: Vec<f32> = a[..m * k]
            .chunks(k)
            .flat_map(|x| split_nibble_order(x, wide))
            .collect();
        let work = |j0: usize, j1: usize| {
            for j in j0..j1 {
                for i in 0..m {
                    // SAFETY: AVX-512F is available; k and the block size are multiples of 32.
                    let v = unsafe { dot_q4_avx512(w, j, &split[i * k..(i + 1) * k], wide) };
                    // SAFETY: (i, j) is inside C (asserted by the caller); chunks own
                    // disjoint j.
                    unsafe {
                        let p = cp.get().add(i * n + j);
                        *p = if acc { *p + v } else { v };
                    }
                }
            }
        };
        // One range of rows per thread, as the f32 GEMV splits its columns (fewer hand-offs
        // between the threads per token than tasks of 64 rows).
        super::gemv::split_columns(m, n, k, threads(m, n, k), work);
        return;
    }
    let work = |j0: usize| {
        let mut row = vec![0.0f32; k];
        for j in j0..(j0 + CHUNK).min(n) {
            decode(w, j * k, &mut row);
            for i in 0..m {
                let v = crate::kernels::ops::dot(&a[i * k..(i + 1) * k], &row);
                // SAFETY: (i, j) is inside C (asserted by the caller); chunks own disjoint j.
                unsafe {
                    let p = cp.get().add(i * n + j);
                    *p = if acc { *p + v } else { v };
                }
            }
        }
    };
    if threads(m, n, k) > 1 {
        (0..n).into_par_iter().step_by(CHUNK).for_each(work);
    } else {
        (0..n).step_by(CHUNK).for_each(work);
    }
}

/// An input row (length a multiple of 32) reordered to match a 4-bit row's bytes as
/// [`dot_q4_avx512`] reads them. `wide`: groups of 128 first, as 8 vectors, vector t holding
/// the elements of nibble t of each 32-bit word (`8·lane + σ(t)`, the low nibble of a byte
/// being the odd element); then, and otherwise throughout, groups of 32 as the 16 even
/// elements (high nibbles) followed by the 16 odd ones (low nibbles).
#[cfg(target_arch = "x86_64")]
fn split_nibble_order(x: &[f32], wide: bool) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    let wide_len = if wide { x.len() / 128 * 128 } else { 0 };
    for g in x[..wide_len].chunks_exact(128) {
        for t in 0..8 {
            let sigma = (t & 6) + 1 - (t & 1);
            out.extend((0..16).map(|lane| g[8 * lane + sigma]));
        }
    }
    for g in x[wide_len..].chunks_exact(32) {
        out.extend(g.iter().step_by(2));
        out.extend(g.iter().skip(1).step_by(2));
    }
    out
}

/// Weight row `j` (4-bit) · `x` (given in [`split_nibble_order`] with the same `wide`): the
/// 16 code values are looked up with `vpermps`, which reads only the low four bits of each
/// index, so no nibble needs a mask; each block's scale multiplies its partial sum.
///
/// `wide` (k and the block size multiples of 64): 64 bytes at a time, each 32-bit lane
/// shifted by 4·t for its nibble t, instead of widening 16 bytes to lanes first. That is 8
/// table lookups and no widening per 128 weights against 12 shuffles: the lookups and
/// shuffles are what bounds this product.
///
/// # Safety
/// AVX-512F; `w.k` and `w.blocksize` are multiples of 32 (of 64 with `wide`), `j < w.n`,
/// `x.len() == w.k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_q4_avx512(w: &Q4Weight, j: usize, x: &[f32], wide: bool) -> f32 {
    use std::arch::x86_64::*;
    let start = j * w.k;
    let bytes = &w.packed[start / 2..(start + w.k) / 2];
    // SAFETY: every load reads 16 or 64 bytes of `bytes` or 16 floats of `x` inside their
    // bounds.
    unsafe {
        let code = _mm512_loadu_ps(w.code.as_ptr());
        let mut total = _mm512_setzero_ps();
        // The block of each group, stepped instead of divided (a division per group of 32
        // was as slow as the rest of the group).
        let (mut block, mut offset) = (start / w.blocksize, start % w.blocksize);
        let mut step = |by: usize| {
            let at = block;
            offset += by;
            if offset == w.blocksize {
                (block, offset) = (block + 1, 0);
            }
            at
        };
        let wide_len = if wide { w.k / 128 * 128 } else { 0 };
        for (b, xg) in bytes[..wide_len / 2]
            .chunks_exact(64)
            .zip(x[..wide_len].chunks_exact(128))
        {
            let v = _mm512_loadu_si512(b.as_ptr() as *const __m512i);
            let xp = xg.as_ptr();
            let look = |idx: __m512i, t: usize, acc: __m512| {
                _mm512_fmadd_ps(
                    _mm512_permutexvar_ps(idx, code),
                    _mm512_loadu_ps(xp.add(16 * t)),
                    acc,
                )
            };
            let zero = _mm512_setzero_ps();
            // Two chains (even and odd nibbles) so that the lookups overlap.
            let mut e = look(v, 0, zero);
            let mut o = look(_mm512_srli_epi32::<4>(v), 1, zero);
            e = look(_mm512_srli_epi32::<8>(v), 2, e);
            o = look(_mm512_srli_epi32::<12>(v), 3, o);
            e = look(_mm512_srli_epi32::<16>(v), 4, e);
            o = look(_mm512_srli_epi32::<20>(v), 5, o);
            e = look(_mm512_srli_epi32::<24>(v), 6, e);
            o = look(_mm512_srli_epi32::<28>(v), 7, o);
            // Lanes 0–7 hold elements 0–63 of the group, lanes 8–15 elements 64–127: one
            // block each (blocks are multiples of 64 and start where groups do).
            let s_lo = *w.absmax.get_unchecked(step(64));
            let s_hi = *w.absmax.get_unchecked(step(64));
            let scale = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(s_lo), _mm512_set1_ps(s_hi));
            total = _mm512_fmadd_ps(_mm512_add_ps(e, o), scale, total);
        }
        for (b, xg) in bytes[wide_len / 2..]
            .chunks_exact(16)
            .zip(x[wide_len..].chunks_exact(32))
        {
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.as_ptr() as *const __m128i));
            let even = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), code);
            let odd = _mm512_permutexvar_ps(v, code);
            let part = _mm512_mul_ps(even, _mm512_loadu_ps(xg.as_ptr()));
            let part = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xg.as_ptr().add(16)), part);
            // `block` stays below the scales of row j (Q4Weight::check by the caller).
            let s = *w.absmax.get_unchecked(step(32));
            total = _mm512_fmadd_ps(part, _mm512_set1_ps(s), total);
        }
        _mm512_reduce_add_ps(total)
    }
}

/// C[m×k] (+)= A[m×n] · W for a 4-bit W `[n, k]` (the input gradient of a linear layer:
/// A is the output gradient).
pub fn matmul_nn_q4(a: &[f32], w: &Q4Weight, c: &mut [f32], m: usize, acc: bool) {
    w.check();
    let (n_out, k_in) = (w.n, w.k);
    assert!(
        a.len() >= m * n_out && c.len() >= m * k_in,
        "matmul_nn_q4 operand sizes"
    );
    if m == 0 || k_in == 0 || n_out == 0 {
        if !acc {
            c[..m * k_in].fill(0.0);
        }
        return;
    }
    let av = View {
        ptr: a.as_ptr(),
        ls: n_out,
        ks: 1,
    };
    let t = threads(m, k_in, n_out);
    with_kernel!(path(), K => {
        let packer = nn_packer::<K>(*w);
        // SAFETY: as in matmul_nt_q4, with the product's n = k_in and k = n_out.
        unsafe {
            driver::gemm_driver::<K>(
                m, k_in, n_out, av, BSource::Custom(&packer), c.as_mut_ptr(), k_in, acc, t,
            )
        }
    })
}

impl PackedWeight {
    /// Decode and pack a 4-bit weight for [`super::matmul_nt_packed`] (reusing this buffer).
    pub fn repack_q4(&mut self, w: &Q4Weight) {
        w.check();
        let path = path();
        let (n, k) = (w.n, w.k);
        let len = with_kernel!(path, K => driver::packed_b_len::<K>(n, k));
        if self.buf.len() < len + 16 {
            self.buf = vec![0.0; len + 16];
        }
        self.off = self.buf.as_ptr().align_offset(64).min(15);
        self.path = path;
        self.n = n;
        self.k = k;
        if n == 0 || k == 0 {
            return;
        }
        let t = if SERIAL.with(|s| s.get()) {
            1
        } else {
            rayon::current_num_threads()
        };
        let dst = self.buf[self.off..].as_mut_ptr();
        with_kernel!(path, K => {
            let packer = nt_packer::<K>(*w);
            // SAFETY: dst has room for the packed length of this kernel, n and k.
            unsafe { driver::pack_b_full::<K>(n, k, BSource::Custom(&packer), dst, t) }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm::{matmul_nn, matmul_nt, matmul_nt_packed};

    /// A random 4-bit weight and its f32 decoding by the scalar rule.
    fn weight(n: usize, k: usize, blocksize: usize, seed: u64) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let packed: Vec<u8> = (0..(n * k).div_ceil(2)).map(|_| next() as u8).collect();
        let absmax: Vec<f32> = (0..(n * k).div_ceil(blocksize))
            .map(|_| (next() % 1000) as f32 / 500.0)
            .collect();
        let code = CODE;
        let dense = (0..n * k)
            .map(|e| {
                let b = packed[e / 2];
                let q = if e % 2 == 0 { b >> 4 } else { b & 15 };
                code[q as usize] * absmax[e / blocksize]
            })
            .collect();
        (packed, absmax, dense)
    }

    const CODE: [f32; 16] = [
        -1.0, -0.696, -0.525, -0.395, -0.284, -0.185, -0.091, 0.0, 0.0796, 0.161, 0.246, 0.338,
        0.441, 0.563, 0.723, 1.0,
    ];

    fn close(a: &[f32], b: &[f32], what: &str) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    /// The AVX2 decode and dot product directly (an AVX-512 CPU takes the AVX-512 ones
    /// through the public entry points).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_decode_and_dot_match_scalar() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("skipping: no AVX2");
            return;
        }
        for &(n, k, bs) in &[(3, 64, 64), (5, 96, 32), (2, 1536, 128), (7, 48, 16)] {
            let (packed, absmax, dense) = weight(n, k, bs, (n * k) as u64);
            let w = Q4Weight {
                packed: &packed,
                absmax: &absmax,
                code: &CODE,
                blocksize: bs,
                n,
                k,
            };
            for start in [0, 16, 48] {
                let len = (n * k - start) / 16 * 16;
                let mut got = vec![f32::NAN; len];
                // SAFETY: AVX2 and FMA checked above; start and len are multiples of 16.
                unsafe { super::super::q4_avx2::decode16(&w, start, &mut got) };
                assert_eq!(
                    got,
                    dense[start..start + len],
                    "decode {n}x{k} from {start}"
                );
            }
            for len in [1, 15, 16, 17, 100] {
                let x: Vec<f32> = (0..len).map(|i| (i % 7) as f32 - 3.0).collect();
                let y = &dense[..len];
                let want: f32 = x.iter().zip(y).map(|(a, b)| a * b).sum();
                // SAFETY: AVX2 and FMA checked above.
                let got = unsafe { crate::kernels::ops_avx2::dot(&x, y) };
                assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "dot {len}");
            }
        }
    }

    #[test]
    fn products_with_4bit_weights_match_dense() {
        // Shapes with k a multiple of 32 (SIMD decode) and not (scalar decode), odd sizes.
        for &(m, n, k, bs) in &[
            (37, 96, 64, 64),
            (130, 70, 576, 64),
            (5, 33, 40, 32),
            (64, 64, 1536, 128),
            (1, 200, 96, 256),
            (3, 70, 576, 64),
            (4, 130, 40, 32),
            // GEMV in groups of 128 whose halves fall in different blocks of 128
            (2, 50, 192, 128),
        ] {
            let (packed, absmax, dense) = weight(n, k, bs, (m * n + k) as u64);
            let w = Q4Weight {
                packed: &packed,
                absmax: &absmax,
                code: &CODE,
                blocksize: bs,
                n,
                k,
            };
            let mut dec = vec![0.0; n * k];
            decode(&w, 0, &mut dec);
            assert_eq!(dec, dense, "decode {n}x{k}");
            // Starts that are multiples of 16 but not 32, ragged lengths.
            for (start, len) in [(16, 100), (48, 33), (n * k - 40, 40)] {
                let mut part = vec![0.0; len];
                decode(&w, start, &mut part);
                assert_eq!(part, dense[start..start + len], "decode {start}+{len}");
            }
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7) % 13) as f32 / 6.0 - 1.0)
                .collect();
            let (mut want, mut got) = (vec![0.0; m * n], vec![0.0; m * n]);
            matmul_nt(&a, &dense, &mut want, m, n, k, false);
            matmul_nt_q4(&a, &w, &mut got, m, false);
            close(&got, &want, &format!("nt {m}x{n}x{k}"));
            let mut p = PackedWeight::default();
            p.repack_q4(&w);
            matmul_nt_packed(&a, &p, &mut got, m, false);
            close(&got, &want, &format!("packed {m}x{n}x{k}"));
            let dy: Vec<f32> = (0..m * n)
                .map(|i| ((i * 5) % 11) as f32 / 5.0 - 1.0)
                .collect();
            let (mut want, mut got) = (vec![0.0; m * k], vec![1.0; m * k]);
            matmul_nn(&dy, &dense, &mut want, m, k, n, false);
            matmul_nn_q4(&dy, &w, &mut got, m, false);
            close(&got, &want, &format!("nn {m}x{n}x{k}"));
        }
    }

    /// bf16 products of a 4-bit weight decode it into exactly the panels the dense weight
    /// packs into: bit-identical results, both layouts, odd shapes and scalar-decode ones.
    #[test]
    fn bf16_products_with_4bit_weights_equal_the_dense_bf16_ones() {
        use super::super::PackedBf16;
        use super::super::{matmul_nn_bf16, matmul_nn_q4_bf16, matmul_nt_bf16, matmul_nt_q4_bf16};
        for &(m, n, k, bs) in &[
            (37, 96, 64, 64),
            (20, 70, 576, 64),
            (17, 33, 40, 32),
            (24, 64, 1600, 128),
        ] {
            let (packed, absmax, dense) = weight(n, k, bs, (m * n + k) as u64);
            let w = Q4Weight {
                packed: &packed,
                absmax: &absmax,
                code: &CODE,
                blocksize: bs,
                n,
                k,
            };
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7) % 13) as f32 / 6.0 - 1.0)
                .collect();
            let (mut want, mut got) = (vec![0.0; m * n], vec![0.0; m * n]);
            matmul_nt_bf16(&a, &PackedBf16::for_nt(&dense, n, k), &mut want, m, false);
            matmul_nt_q4_bf16(&a, &w, &mut got, m, false);
            assert_eq!(got, want, "nt {m}x{n}x{k}");
            let dy: Vec<f32> = (0..m * n)
                .map(|i| ((i * 5) % 11) as f32 / 5.0 - 1.0)
                .collect();
            let (mut want, mut got) = (vec![0.5; m * k], vec![0.5; m * k]);
            matmul_nn_bf16(&dy, &PackedBf16::for_nn(&dense, n, k), &mut want, m, true);
            matmul_nn_q4_bf16(&dy, &w, &mut got, m, true);
            assert_eq!(got, want, "nn {m}x{n}x{k}");
        }
    }
}

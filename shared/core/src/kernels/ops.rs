//! Fused element-wise and row-wise operations of the transformer blocks (forward passes).
//!
//! All operate in place or into caller-provided buffers on row-major `[rows, width]` data and
//! run rows in parallel: allocation and memory traffic, not arithmetic, dominate these ops.

use rayon::prelude::*;

/// Rows per parallel task: enough work per task to amortise scheduling.
fn chunk_rows(width: usize) -> usize {
    (16384 / width.max(1)).max(1)
}

/// RMSNorm: out = x / sqrt(mean(x²) + eps) · w  (Llama, Mistral, Qwen2).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let width = w.len();
    let cr = chunk_rows(width) * width;
    out.par_chunks_mut(cr)
        .zip(x.par_chunks(cr))
        .for_each(|(o, xi)| {
            for (orow, xrow) in o.chunks_exact_mut(width).zip(xi.chunks_exact(width)) {
                #[cfg(target_arch = "x86_64")]
                if avx512() {
                    // SAFETY: AVX-512F is available; the rows have `width` elements.
                    unsafe { x86::rms_norm_row(xrow, w, eps, orow) };
                    continue;
                }
                #[cfg(target_arch = "x86_64")]
                if avx2() {
                    // SAFETY: AVX2 and FMA are available; the rows have `width` elements.
                    unsafe { super::ops_avx2::rms_norm_row(xrow, w, eps, orow) };
                    continue;
                }
                rms_norm_row_scalar(xrow, w, eps, orow);
            }
        });
}

fn rms_norm_row_scalar(xrow: &[f32], w: &[f32], eps: f32, orow: &mut [f32]) {
    let ss: f32 = xrow.iter().map(|v| v * v).sum();
    let inv = 1.0 / (ss / w.len() as f32 + eps).sqrt();
    for ((o, &v), &g) in orow.iter_mut().zip(xrow).zip(w) {
        *o = g * (v * inv);
    }
}

/// Instruction set of the element-wise kernels: `PEFTKIT_OPS=scalar` forces the portable ones,
/// `PEFTKIT_OPS=avx2` the AVX2 ones on an AVX-512 CPU (to test both paths on one machine).
#[cfg(target_arch = "x86_64")]
fn ops_isa() -> u8 {
    static ISA: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let forced = std::env::var("PEFTKIT_OPS").unwrap_or_default();
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        match forced.trim() {
            "scalar" => 0,
            "avx2" if avx2 => 1,
            _ if is_x86_feature_detected!("avx512f") => 2,
            _ if avx2 => 1,
            _ => 0,
        }
    })
}

/// Whether the AVX-512 element-wise kernels run.
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    ops_isa() == 2
}

/// Whether the AVX2 element-wise kernels run (CPUs without AVX-512).
#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    ops_isa() == 1
}

/// LayerNorm with biased variance (GPT-2): out = (x − mean)/sqrt(var + eps) · w + b.
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let width = w.len();
    let cr = chunk_rows(width) * width;
    out.par_chunks_mut(cr)
        .zip(x.par_chunks(cr))
        .for_each(|(o, xi)| {
            for (orow, xrow) in o.chunks_exact_mut(width).zip(xi.chunks_exact(width)) {
                let mean = xrow.iter().sum::<f32>() / width as f32;
                let var = xrow.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
                let inv = 1.0 / (var + eps).sqrt();
                for (((o, &v), &g), &bb) in orow.iter_mut().zip(xrow).zip(w).zip(b) {
                    *o = (v - mean) * inv * g + bb;
                }
            }
        });
}

/// Transpose a row-major `[rows, cols]` matrix (GPT-2's Conv1D weights are stored `[in, out]`).
pub fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

/// x += y
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(16384)
        .zip(y.par_chunks(16384))
        .for_each(|(a, b)| {
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: AVX-512F is available.
                unsafe { x86::add_assign(a, b) };
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if avx2() {
                // SAFETY: AVX2 and FMA are available.
                unsafe { super::ops_avx2::add_assign(a, b) };
                return;
            }
            a.iter_mut().zip(b).for_each(|(a, b)| *a += b)
        });
}

/// Add a bias row to every row of x.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    let width = bias.len();
    x.par_chunks_mut(chunk_rows(width) * width).for_each(|c| {
        for row in c.chunks_exact_mut(width) {
            row.iter_mut().zip(bias).for_each(|(a, b)| *a += b);
        }
    });
}

/// e^x in f32 without a libm call, so that loops over it vectorize: range reduction to
/// r ∈ [−ln2/2, ln2/2] and a degree-6 Taylor polynomial (relative error ≈ 2e-7, about libm's).
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.33, 88.72);
    // Round to nearest by adding and removing 1.5·2²³ (no libm call: `round` is not an
    // instruction on the x86-64 baseline, and a call would stop the loop vectorizing).
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n by building the exponent bits; n ∈ [−126, 128) after the clamp.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// Σ exp(x − shift), accumulated in 16 lanes so that it vectorizes.
pub fn sum_exp_shifted(x: &[f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is available.
        return unsafe { x86::sum_exp_shifted(x, shift) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA are available.
        return unsafe { super::ops_avx2::sum_exp_shifted(x, shift) };
    }
    sum_exp_shifted_scalar(x, shift)
}

fn sum_exp_shifted_scalar(x: &[f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] += exp_fast(c[i] - shift);
        }
    }
    let mut s: f32 = tail.iter().map(|&v| exp_fast(v - shift)).sum();
    s += acc.iter().sum::<f32>();
    s
}

/// `x[i] ← exp(x[i] − shift) · mul` in place: the cross-entropy gradient's softmax row (a
/// scalar exponential per vocabulary entry cost 3–4 % of a bf16 LoRA step).
pub fn exp_shifted_scaled(x: &mut [f32], shift: f32, mul: f32) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is available.
        return unsafe { x86::exp_shifted_scaled(x, shift, mul) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA are available.
        return unsafe { super::ops_avx2::exp_shifted_scaled(x, shift, mul) };
    }
    x.iter_mut().for_each(|v| *v = exp_fast(*v - shift) * mul);
}

/// Maximum of a row, 16 lanes at a time.
pub fn max_of(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is available.
        return unsafe { x86::max_of(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA are available.
        return unsafe { super::ops_avx2::max_of(x) };
    }
    max_of_scalar(x)
}

fn max_of_scalar(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    tail.iter()
        .chain(acc.iter())
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp_fast(-x))
}

#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/π)
    0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
}

#[inline]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2))
}

/// erf with f64 internals (Abramowitz–Stegun 7.1.26 is too coarse for parity; use a series /
/// continued fraction through libm-quality `erfc` approximation).
fn erf(x: f32) -> f32 {
    // W. J. Cody's rational approximations are what libm uses; f64 evaluation of the
    // standard high-precision formula below is accurate to ~1e-7 relative, enough for f32.
    let x = x as f64;
    let t = 1.0 / (1.0 + 0.5 * x.abs());
    let y = 1.0
        - t * (-x * x - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    (if x >= 0.0 { y } else { -y }) as f32
}

/// SwiGLU: out = silu(gate) · up, element-wise.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(16384)
        .zip(gate.par_chunks(16384).zip(up.par_chunks(16384)))
        .for_each(|(o, (g, u))| {
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: AVX-512F is available.
                unsafe { x86::swiglu(g, u, o) };
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if avx2() {
                // SAFETY: AVX2 and FMA are available.
                unsafe { super::ops_avx2::swiglu(g, u, o) };
                return;
            }
            swiglu_scalar(g, u, o)
        });
}

fn swiglu_scalar(g: &[f32], u: &[f32], o: &mut [f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = silu(g) * u;
    }
}

/// Backward of `a = silu(g)·u`: `du = da·silu(g)`, `dg = da·u·σ(g)·(1 + g·(1 − σ(g)))`.
pub fn swiglu_backward(gate: &[f32], up: &[f32], da: &[f32], dg: &mut [f32], du: &mut [f32]) {
    const C: usize = 16384;
    dg.par_chunks_mut(C)
        .zip(du.par_chunks_mut(C))
        .zip(
            gate.par_chunks(C)
                .zip(up.par_chunks(C))
                .zip(da.par_chunks(C)),
        )
        .for_each(|((dg, du), ((g, u), da))| {
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: AVX-512F is available.
                unsafe { x86::swiglu_backward(g, u, da, dg, du) };
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if avx2() {
                // SAFETY: AVX2 and FMA are available.
                unsafe { super::ops_avx2::swiglu_backward(g, u, da, dg, du) };
                return;
            }
            swiglu_backward_scalar(g, u, da, dg, du)
        });
}

fn swiglu_backward_scalar(g: &[f32], u: &[f32], da: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for i in 0..dg.len() {
        let s = 1.0 / (1.0 + exp_fast(-g[i]));
        du[i] = da[i] * g[i] * s;
        dg[i] = da[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
    }
}

/// `x ⊙ s` per row (`s` has one entry per column).
pub fn scale_columns(x: &[f32], s: &[f32]) -> Vec<f32> {
    let mut y = x.to_vec();
    scale_columns_in_place(&mut y, s);
    y
}

/// `x ⊙= s` per row (`s` has one entry per column).
pub fn scale_columns_in_place(x: &mut [f32], s: &[f32]) {
    x.par_chunks_mut((s.len() * 64).max(1)).for_each(|c| {
        for row in c.chunks_exact_mut(s.len()) {
            row.iter_mut().zip(s).for_each(|(v, k)| *v *= k);
        }
    });
}

/// Apply an activation in place.
pub fn activate(x: &mut [f32], f: fn(f32) -> f32) {
    x.par_chunks_mut(16384)
        .for_each(|c| c.iter_mut().for_each(|v| *v = f(*v)));
}

/// In-place softmax of one row (max-subtracted). Entries that are −∞ become 0.
pub fn softmax_row(row: &mut [f32]) {
    let max = max_of(row);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    for v in row.iter_mut() {
        *v = if *v == f32::NEG_INFINITY {
            0.0
        } else {
            exp_fast(*v - max)
        };
    }
    let sum = row.iter().sum::<f32>();
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// In-place softmax of `scale · row` (all entries finite): attention scores.
pub fn softmax_scaled(row: &mut [f32], scale: f32) {
    if row.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is available.
        unsafe { x86::softmax_scaled(row, scale) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA are available.
        unsafe { super::ops_avx2::softmax_scaled(row, scale) };
        return;
    }
    softmax_scaled_scalar(row, scale)
}

fn softmax_scaled_scalar(row: &mut [f32], scale: f32) {
    row.iter_mut().for_each(|v| *v *= scale);
    let max = max_of_scalar(row);
    row.iter_mut().for_each(|v| *v = exp_fast(*v - max));
    let inv = 1.0 / row.iter().sum::<f32>();
    row.iter_mut().for_each(|v| *v *= inv);
}

/// Σ a·b: AVX-512 or AVX2+FMA where the CPU has them, else in 16 independent lanes (so it
/// vectorizes; a single running sum waits on every add).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is available.
        return unsafe { x86::dot(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA are available.
        return unsafe { super::ops_avx2::dot(a, b) };
    }
    dot_lanes(a, b)
}

fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for ((l, p), q) in lanes.iter_mut().zip(x).zip(y) {
            *l += p * q;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Σ a·b·c in 16 independent lanes.
pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let (ac, bc, cc) = (a.chunks_exact(16), b.chunks_exact(16), c.chunks_exact(16));
    let n = a.len() / 16 * 16;
    let tail: f32 = (n..a.len().min(b.len()).min(c.len()))
        .map(|i| a[i] * b[i] * c[i])
        .sum();
    for ((x, y), z) in ac.zip(bc).zip(cc) {
        for (((l, p), q), r) in lanes.iter_mut().zip(x).zip(y).zip(z) {
            *l += p * q * r;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Backward of a softmax row `p` (scaled scores, as attention uses it), in place on the
/// gradient: `g ← scale · p ⊙ (g − Σ p⊙g)`, the sum by [`dot`].
pub fn softmax_backward_row(p: &[f32], g: &mut [f32], scale: f32) {
    let dot = dot(p, g);
    for (gv, &pv) in g.iter_mut().zip(p) {
        *gv = pv * (*gv - dot) * scale;
    }
}

/// One step of an online log-sum-exp: given the running maximum `max` and the running
/// `sum` of exp(v − max) over earlier values, fold in `row`; returns the new (max, sum).
pub fn logsumexp_update(row: &[f32], max: f32, sum: f32) -> (f32, f32) {
    let m = max_of(row).max(max);
    if m == f32::NEG_INFINITY {
        return (m, sum);
    }
    let old = if max == f32::NEG_INFINITY {
        0.0
    } else {
        sum * exp_fast(max - m)
    };
    (m, old + sum_exp_shifted(row, m))
}

/// log-softmax value of entry `target` of a row, computed stably.
pub fn log_softmax_at(row: &[f32], target: usize) -> f32 {
    let max = max_of(row);
    let sum = sum_exp_shifted(row, max);
    (row[target] - max) - sum.ln()
}

/// AVX-512 versions of the row kernels (same arithmetic as the portable ones, 16 lanes).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[inline(always)]
    fn mask(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// e^x per lane, as [`super::exp_fast`].
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub fn exp(x: __m512) -> __m512 {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-87.33)),
            _mm512_set1_ps(88.72),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// # Safety
    /// AVX-512F; slices of equal length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let n = x.len().min(w.len()).min(out.len());
        // SAFETY: masked accesses stay below n.
        unsafe {
            let mut acc = _mm512_setzero_ps();
            let mut i = 0;
            while i < n {
                let m = mask(n - i);
                let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
                acc = _mm512_fmadd_ps(v, v, acc);
                i += 16;
            }
            let ss = _mm512_reduce_add_ps(acc);
            let inv = _mm512_set1_ps(1.0 / (ss / n as f32 + eps).sqrt());
            let mut i = 0;
            while i < n {
                let m = mask(n - i);
                let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
                let g = _mm512_maskz_loadu_ps(m, w.as_ptr().add(i));
                let o = _mm512_mul_ps(g, _mm512_mul_ps(v, inv));
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, o);
                i += 16;
            }
        }
    }

    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn add_assign(a: &mut [f32], b: &[f32]) {
        let n = a.len().min(b.len());
        let mut i = 0;
        // SAFETY: masked accesses stay below n.
        unsafe {
            while i < n {
                let m = mask(n - i);
                let p = a.as_mut_ptr().add(i);
                let v = _mm512_add_ps(
                    _mm512_maskz_loadu_ps(m, p),
                    _mm512_maskz_loadu_ps(m, b.as_ptr().add(i)),
                );
                _mm512_mask_storeu_ps(p, m, v);
                i += 16;
            }
        }
    }

    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn swiglu(g: &[f32], u: &[f32], o: &mut [f32]) {
        let n = g.len().min(u.len()).min(o.len());
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        // SAFETY: masked accesses stay below n.
        unsafe {
            while i < n {
                let m = mask(n - i);
                let gv = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
                let uv = _mm512_maskz_loadu_ps(m, u.as_ptr().add(i));
                let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), gv));
                let s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
                _mm512_mask_storeu_ps(o.as_mut_ptr().add(i), m, _mm512_mul_ps(s, uv));
                i += 16;
            }
        }
    }

    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn swiglu_backward(
        g: &[f32],
        u: &[f32],
        da: &[f32],
        dg: &mut [f32],
        du: &mut [f32],
    ) {
        let n = g
            .len()
            .min(u.len())
            .min(da.len())
            .min(dg.len())
            .min(du.len());
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        // SAFETY: masked accesses stay below n.
        unsafe {
            while i < n {
                let m = mask(n - i);
                let gv = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
                let uv = _mm512_maskz_loadu_ps(m, u.as_ptr().add(i));
                let dv = _mm512_maskz_loadu_ps(m, da.as_ptr().add(i));
                let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), gv));
                let s = _mm512_div_ps(one, _mm512_add_ps(one, e));
                let gs = _mm512_mul_ps(gv, s);
                _mm512_mask_storeu_ps(du.as_mut_ptr().add(i), m, _mm512_mul_ps(dv, gs));
                // σ(g)·(1 + g − g·σ(g)) = s + gs − gs·s
                let d = _mm512_fnmadd_ps(gs, s, _mm512_add_ps(s, gs));
                let out = _mm512_mul_ps(_mm512_mul_ps(dv, uv), d);
                _mm512_mask_storeu_ps(dg.as_mut_ptr().add(i), m, out);
                i += 16;
            }
        }
    }

    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn max_of(x: &[f32]) -> f32 {
        let n = x.len();
        let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        // SAFETY: masked loads stay below n.
        unsafe {
            while i + 16 <= n {
                acc = _mm512_max_ps(acc, _mm512_loadu_ps(x.as_ptr().add(i)));
                i += 16;
            }
            if i < n {
                acc = _mm512_mask_max_ps(acc, mask(n - i), acc, _mm512_loadu_ps_masked(x, i));
            }
        }
        _mm512_reduce_max_ps(acc)
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn _mm512_loadu_ps_masked(x: &[f32], i: usize) -> __m512 {
        // SAFETY: the mask covers only elements below x.len().
        unsafe { _mm512_maskz_loadu_ps(mask(x.len() - i), x.as_ptr().add(i)) }
    }

    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sum_exp_shifted(x: &[f32], shift: f32) -> f32 {
        let n = x.len();
        let sh = _mm512_set1_ps(shift);
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        // SAFETY: loads stay below n.
        unsafe {
            while i + 32 <= n {
                let p = x.as_ptr().add(i);
                a0 = _mm512_add_ps(a0, exp(_mm512_sub_ps(_mm512_loadu_ps(p), sh)));
                a1 = _mm512_add_ps(a1, exp(_mm512_sub_ps(_mm512_loadu_ps(p.add(16)), sh)));
                i += 32;
            }
            while i < n {
                let m = mask(n - i);
                let e = exp(_mm512_sub_ps(_mm512_loadu_ps_masked(x, i), sh));
                a0 = _mm512_mask_add_ps(a0, m, a0, e);
                i += 16;
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
    }

    /// Σ x·y (AVX-512F).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot(x: &[f32], y: &[f32]) -> f32 {
        let n = x.len().min(y.len());
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        // SAFETY: every access is below n (masked for the tail).
        unsafe {
            while i + 32 <= n {
                s0 = _mm512_fmadd_ps(
                    _mm512_loadu_ps(x.as_ptr().add(i)),
                    _mm512_loadu_ps(y.as_ptr().add(i)),
                    s0,
                );
                s1 = _mm512_fmadd_ps(
                    _mm512_loadu_ps(x.as_ptr().add(i + 16)),
                    _mm512_loadu_ps(y.as_ptr().add(i + 16)),
                    s1,
                );
                i += 32;
            }
            while i < n {
                let mk: __mmask16 = if n - i >= 16 {
                    0xffff
                } else {
                    ((1u32 << (n - i)) - 1) as u16
                };
                s0 = _mm512_fmadd_ps(
                    _mm512_maskz_loadu_ps(mk, x.as_ptr().add(i)),
                    _mm512_maskz_loadu_ps(mk, y.as_ptr().add(i)),
                    s0,
                );
                i += 16;
            }
            _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
        }
    }

    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_shifted_scaled(x: &mut [f32], shift: f32, mul: f32) {
        let (sh, mu) = (_mm512_set1_ps(shift), _mm512_set1_ps(mul));
        let p = x.as_mut_ptr();
        let mut i = 0;
        // SAFETY: masked accesses stay below the length.
        unsafe {
            while i < x.len() {
                let m = mask(x.len() - i);
                let v = _mm512_maskz_loadu_ps(m, p.add(i));
                _mm512_mask_storeu_ps(p.add(i), m, _mm512_mul_ps(exp(_mm512_sub_ps(v, sh)), mu));
                i += 16;
            }
        }
    }

    /// # Safety
    /// AVX-512F; `row` is not empty.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_scaled(row: &mut [f32], scale: f32) {
        let n = row.len();
        let sc = _mm512_set1_ps(scale);
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        let p = row.as_mut_ptr();
        // SAFETY: masked accesses stay below n.
        unsafe {
            let mut i = 0;
            while i < n {
                let m = mask(n - i);
                let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(i)), sc);
                mx = _mm512_mask_max_ps(mx, m, mx, v);
                i += 16;
            }
            let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
            let mut sum = _mm512_setzero_ps();
            let mut i = 0;
            while i < n {
                let m = mask(n - i);
                let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(i)), sc);
                let e = exp(_mm512_sub_ps(v, mx));
                sum = _mm512_mask_add_ps(sum, m, sum, e);
                _mm512_mask_storeu_ps(p.add(i), m, e);
                i += 16;
            }
            let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
            let mut i = 0;
            while i < n {
                let m = mask(n - i);
                let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(i)), inv);
                _mm512_mask_storeu_ps(p.add(i), m, v);
                i += 16;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norms_match_definitions() {
        let x = [1.0f32, -2.0, 3.0, 0.5, 0.0, 4.0];
        let w = [1.0f32, 2.0, 0.5];
        let mut out = [0.0f32; 6];
        rms_norm(&x, &w, 1e-6, &mut out);
        let r = ((1.0 + 4.0 + 9.0) / 3.0f32 + 1e-6).sqrt();
        assert!((out[1] - (-2.0 / r * 2.0)).abs() < 1e-6);
        layer_norm(&x, &w, &[0.0, 1.0, 0.0], 1e-5, &mut out);
        let mean = 2.0 / 3.0;
        let var =
            ((1.0f32 - mean).powi(2) + (-2.0f32 - mean).powi(2) + (3.0f32 - mean).powi(2)) / 3.0;
        assert!((out[0] - (1.0 - mean) / (var + 1e-5).sqrt()).abs() < 1e-5);
    }

    #[test]
    fn erf_is_accurate() {
        for &(x, want) in &[
            (0.5f32, 0.520_499_9f32),
            (1.0, 0.842_700_8),
            (-2.0, -0.995_322_3),
        ] {
            assert!((erf(x) - want).abs() < 2e-7, "{x}");
        }
    }

    #[test]
    fn exp_fast_matches_libm() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_fast(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "max relative error {worst}");
        assert!(exp_fast(-1000.0) < 1e-37);
    }

    #[test]
    fn softmax_and_log_softmax_agree() {
        let mut row = [1.0f32, 2.0, 3.0, -1.0];
        let lp = log_softmax_at(&row, 2);
        softmax_row(&mut row);
        assert!((row[2].ln() - lp).abs() < 1e-6);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    /// Odd-size inputs for the kernel comparisons.
    fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n).map(|_| rng.normal() * scale).collect()
    }

    fn close(a: &[f32], b: &[f32], tol: f32, ctx: &str) {
        assert_eq!(a.len(), b.len(), "{ctx}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{ctx} [{i}]: {x} vs {y}"
            );
        }
    }

    const SIZES: [usize; 9] = [1, 3, 15, 16, 17, 31, 33, 100, 577];

    #[test]
    fn row_kernels_match_naive_both_paths() {
        for &n in &SIZES {
            let x = data(n, n as u64, 3.0);
            let w = data(n, 99 + n as u64, 1.0);
            let y = data(n, 7 + n as u64, 1.0);
            // Naive references in f64.
            let ss: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            let inv = 1.0 / (ss / n as f64 + 1e-5).sqrt();
            let rms: Vec<f32> = x
                .iter()
                .zip(&w)
                .map(|(&v, &g)| (v as f64 * inv * g as f64) as f32)
                .collect();
            let swi: Vec<f32> = x
                .iter()
                .zip(&y)
                .map(|(&g, &u)| (g as f64 / (1.0 + (-g as f64).exp()) * u as f64) as f32)
                .collect();
            let mx = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let se: f64 = x.iter().map(|&v| ((v - 1.5) as f64).exp()).sum();
            let sm: Vec<f32> = {
                let z: Vec<f64> = x.iter().map(|&v| ((v - mx) as f64 * 0.7).exp()).collect();
                let t: f64 = z.iter().sum();
                z.iter().map(|v| (v / t) as f32).collect()
            };
            let sum: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
            let esc: Vec<f32> = x
                .iter()
                .map(|&v| ((v as f64 - 1.5).exp() * 0.3) as f32)
                .collect();
            // softmax backward of the row sm against gradient y, scale 0.5
            let sbw: Vec<f32> = {
                let dot: f64 = sm.iter().zip(&y).map(|(&p, &g)| p as f64 * g as f64).sum();
                sm.iter()
                    .zip(&y)
                    .map(|(&p, &g)| (p as f64 * (g as f64 - dot) * 0.5) as f32)
                    .collect()
            };
            let d3: f64 = (0..n)
                .map(|i| x[i] as f64 * y[i] as f64 * w[i] as f64)
                .sum();
            close(
                &[dot3(&x, &y, &w)],
                &[d3 as f32],
                1e-5,
                &format!("dot3 n={n}"),
            );
            let d2: f64 = (0..n).map(|i| x[i] as f64 * y[i] as f64).sum();
            close(&[dot(&x, &y)], &[d2 as f32], 1e-5, &format!("dot n={n}"));
            close(
                &[dot_lanes(&x, &y)],
                &[d2 as f32],
                1e-5,
                &format!("dot n={n}"),
            );
            let mut g = y.clone();
            softmax_backward_row(&sm, &mut g, 0.5);
            close(&g, &sbw, 1e-5, &format!("softmax backward n={n}"));
            // swiglu backward with da = w: du = w·silu(x), dg = w·y·silu'(x)
            let (bdg, bdu): (Vec<f32>, Vec<f32>) = x
                .iter()
                .zip(&y)
                .zip(&w)
                .map(|((&g, &u), &d)| {
                    let (g, u, d) = (g as f64, u as f64, d as f64);
                    let s = 1.0 / (1.0 + (-g).exp());
                    (
                        (d * u * s * (1.0 + g * (1.0 - s))) as f32,
                        (d * g * s) as f32,
                    )
                })
                .unzip();
            let ctx = format!("n={n}");
            let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
            swiglu_backward_scalar(&x, &y, &w, &mut dg, &mut du);
            close(&dg, &bdg, 1e-5, &ctx);
            close(&du, &bdu, 1e-5, &ctx);
            swiglu_backward(&x, &y, &w, &mut dg, &mut du);
            close(&dg, &bdg, 1e-5, &ctx);
            close(&du, &bdu, 1e-5, &ctx);
            let mut o = vec![0.0; n];
            rms_norm_row_scalar(&x, &w, 1e-5, &mut o);
            close(&o, &rms, 1e-5, &ctx);
            swiglu_scalar(&x, &y, &mut o);
            close(&o, &swi, 1e-5, &ctx);
            assert_eq!(max_of_scalar(&x), mx);
            close(&[sum_exp_shifted_scalar(&x, 1.5)], &[se as f32], 1e-5, &ctx);
            let mut r = x.clone();
            softmax_scaled_scalar(&mut r, 0.7);
            close(&r, &sm, 1e-5, &ctx);
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F checked above.
                unsafe {
                    x86::rms_norm_row(&x, &w, 1e-5, &mut o);
                    close(&o, &rms, 1e-5, &ctx);
                    x86::swiglu(&x, &y, &mut o);
                    close(&o, &swi, 1e-5, &ctx);
                    assert_eq!(x86::max_of(&x), mx);
                    close(&[x86::sum_exp_shifted(&x, 1.5)], &[se as f32], 1e-5, &ctx);
                    r.copy_from_slice(&x);
                    x86::softmax_scaled(&mut r, 0.7);
                    close(&r, &sm, 1e-5, &ctx);
                    let mut a = x.clone();
                    x86::add_assign(&mut a, &y);
                    close(&a, &sum, 0.0, &ctx);
                    close(&[x86::dot(&x, &y)], &[d2 as f32], 1e-5, &ctx);
                    let mut e = x.clone();
                    x86::exp_shifted_scaled(&mut e, 1.5, 0.3);
                    close(&e, &esc, 1e-5, &ctx);
                    for &v in &x {
                        let e = x86::exp(std::arch::x86_64::_mm512_set1_ps(v));
                        let mut out = [0.0f32; 16];
                        std::arch::x86_64::_mm512_storeu_ps(out.as_mut_ptr(), e);
                        close(&out[..1], &[v.exp()], 5e-7, &ctx);
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                use super::super::ops_avx2 as v2;
                // SAFETY: AVX2 and FMA checked above.
                unsafe {
                    v2::rms_norm_row(&x, &w, 1e-5, &mut o);
                    close(&o, &rms, 1e-5, &ctx);
                    v2::swiglu(&x, &y, &mut o);
                    close(&o, &swi, 1e-5, &ctx);
                    v2::swiglu_backward(&x, &y, &w, &mut dg, &mut du);
                    close(&dg, &bdg, 1e-5, &ctx);
                    close(&du, &bdu, 1e-5, &ctx);
                    assert_eq!(v2::max_of(&x), mx);
                    close(&[v2::sum_exp_shifted(&x, 1.5)], &[se as f32], 1e-5, &ctx);
                    r.copy_from_slice(&x);
                    v2::softmax_scaled(&mut r, 0.7);
                    close(&r, &sm, 1e-5, &ctx);
                    let mut a = x.clone();
                    v2::add_assign(&mut a, &y);
                    close(&a, &sum, 0.0, &ctx);
                    close(&[v2::dot(&x, &y)], &[d2 as f32], 1e-5, &ctx);
                    let mut e = x.clone();
                    v2::exp_shifted_scaled(&mut e, 1.5, 0.3);
                    close(&e, &esc, 1e-5, &ctx);
                    for &v in x.iter().chain(&[-100.0, -87.0, 0.0, 1e-8, 80.0]) {
                        let e = v2::exp(std::arch::x86_64::_mm256_set1_ps(v));
                        let mut out = [0.0f32; 8];
                        std::arch::x86_64::_mm256_storeu_ps(out.as_mut_ptr(), e);
                        close(&out[..1], &[exp_fast(v)], 5e-7, &ctx);
                    }
                }
            }
            // Public entry points (whichever path this CPU takes).
            let mut e = x.clone();
            exp_shifted_scaled(&mut e, 1.5, 0.3);
            close(&e, &esc, 1e-5, &ctx);
            let mut a = x.clone();
            add_assign(&mut a, &y);
            close(&a, &sum, 0.0, &ctx);
            rms_norm(&x, &w, 1e-5, &mut o);
            close(&o, &rms, 1e-5, &ctx);
        }
    }

    #[test]
    fn online_logsumexp_matches_direct() {
        let x = data(1000, 5, 4.0);
        let want = {
            let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
        };
        for block in [1, 7, 16, 333, 1000] {
            let (mut m, mut s) = (f32::NEG_INFINITY, 0.0);
            for c in x.chunks(block) {
                (m, s) = logsumexp_update(c, m, s);
            }
            let got = m as f64 + (s as f64).ln();
            assert!((got - want).abs() < 1e-5, "block {block}: {got} vs {want}");
        }
    }
}

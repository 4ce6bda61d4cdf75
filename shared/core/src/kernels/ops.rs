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
                let ss: f32 = xrow.iter().map(|v| v * v).sum();
                let inv = 1.0 / (ss / width as f32 + eps).sqrt();
                for ((o, &v), &g) in orow.iter_mut().zip(xrow).zip(w) {
                    *o = g * (v * inv);
                }
            }
        });
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

/// x += y
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(16384)
        .zip(y.par_chunks(16384))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
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

/// Maximum of a row, 16 lanes at a time.
pub fn max_of(x: &[f32]) -> f32 {
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
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = silu(g) * u;
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

/// log-softmax value of entry `target` of a row, computed stably.
pub fn log_softmax_at(row: &[f32], target: usize) -> f32 {
    let max = max_of(row);
    let sum = sum_exp_shifted(row, max);
    (row[target] - max) - sum.ln()
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
}

//! AVX2+FMA versions of the row kernels in [`super::ops`] (8 lanes), for the many CPUs without
//! AVX-512 (AMD Zen 1–3, Intel client cores). Same arithmetic as the portable versions; the
//! tails shorter than a vector run through the portable code.

use super::ops::exp_fast;
use std::arch::x86_64::*;

/// e^x per lane, as [`exp_fast`] (clamp, round to nearest, degree-6 polynomial, 2ⁿ from the
/// exponent bits).
#[target_feature(enable = "avx2,fma")]
#[inline]
pub fn exp(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.33)),
        _mm256_set1_ps(88.72),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm256_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
}

/// Sum of the 8 lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[target_feature(enable = "avx2,fma")]
#[inline]
fn hmax(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_max_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Length covered by whole 8-lane vectors.
fn body(n: usize) -> usize {
    n & !7
}

/// # Safety
/// AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len().min(w.len()).min(out.len());
    let b = body(n);
    // SAFETY: vector accesses stay below b ≤ n.
    unsafe {
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= b {
            let v0 = _mm256_loadu_ps(x.as_ptr().add(i));
            let v1 = _mm256_loadu_ps(x.as_ptr().add(i + 8));
            a0 = _mm256_fmadd_ps(v0, v0, a0);
            a1 = _mm256_fmadd_ps(v1, v1, a1);
            i += 16;
        }
        if i < b {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            a0 = _mm256_fmadd_ps(v, v, a0);
        }
        let ss = hsum(_mm256_add_ps(a0, a1)) + x[b..n].iter().map(|v| v * v).sum::<f32>();
        let s = 1.0 / (ss / n as f32 + eps).sqrt();
        let inv = _mm256_set1_ps(s);
        let mut i = 0;
        while i < b {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            let g = _mm256_loadu_ps(w.as_ptr().add(i));
            _mm256_storeu_ps(
                out.as_mut_ptr().add(i),
                _mm256_mul_ps(g, _mm256_mul_ps(v, inv)),
            );
            i += 8;
        }
        for j in b..n {
            out[j] = w[j] * (x[j] * s);
        }
    }
}

/// # Safety
/// AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn add_assign(a: &mut [f32], y: &[f32]) {
    let n = a.len().min(y.len());
    let b = body(n);
    // SAFETY: vector accesses stay below b ≤ n.
    unsafe {
        let mut i = 0;
        while i < b {
            let p = a.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                p,
                _mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(y.as_ptr().add(i))),
            );
            i += 8;
        }
    }
    for j in b..n {
        a[j] += y[j];
    }
}

/// # Safety
/// AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn swiglu(g: &[f32], u: &[f32], o: &mut [f32]) {
    let n = g.len().min(u.len()).min(o.len());
    let b = body(n);
    let one = _mm256_set1_ps(1.0);
    // SAFETY: vector accesses stay below b ≤ n.
    unsafe {
        let mut i = 0;
        while i < b {
            let gv = _mm256_loadu_ps(g.as_ptr().add(i));
            let uv = _mm256_loadu_ps(u.as_ptr().add(i));
            let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            _mm256_storeu_ps(o.as_mut_ptr().add(i), _mm256_mul_ps(s, uv));
            i += 8;
        }
    }
    for j in b..n {
        o[j] = g[j] / (1.0 + exp_fast(-g[j])) * u[j];
    }
}

/// # Safety
/// AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn swiglu_backward(g: &[f32], u: &[f32], da: &[f32], dg: &mut [f32], du: &mut [f32]) {
    let n = g
        .len()
        .min(u.len())
        .min(da.len())
        .min(dg.len())
        .min(du.len());
    let b = body(n);
    let one = _mm256_set1_ps(1.0);
    // SAFETY: vector accesses stay below b ≤ n.
    unsafe {
        let mut i = 0;
        while i < b {
            let gv = _mm256_loadu_ps(g.as_ptr().add(i));
            let uv = _mm256_loadu_ps(u.as_ptr().add(i));
            let dv = _mm256_loadu_ps(da.as_ptr().add(i));
            let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            let s = _mm256_div_ps(one, _mm256_add_ps(one, e));
            let gs = _mm256_mul_ps(gv, s);
            _mm256_storeu_ps(du.as_mut_ptr().add(i), _mm256_mul_ps(dv, gs));
            // σ(g)·(1 + g − g·σ(g)) = s + gs − gs·s
            let d = _mm256_fnmadd_ps(gs, s, _mm256_add_ps(s, gs));
            _mm256_storeu_ps(
                dg.as_mut_ptr().add(i),
                _mm256_mul_ps(_mm256_mul_ps(dv, uv), d),
            );
            i += 8;
        }
    }
    for j in b..n {
        let s = 1.0 / (1.0 + exp_fast(-g[j]));
        du[j] = da[j] * g[j] * s;
        dg[j] = da[j] * u[j] * s * (1.0 + g[j] * (1.0 - s));
    }
}

/// # Safety
/// AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn max_of(x: &[f32]) -> f32 {
    let b = body(x.len());
    let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
    // SAFETY: vector loads stay below b.
    unsafe {
        let mut i = 0;
        while i < b {
            acc = _mm256_max_ps(acc, _mm256_loadu_ps(x.as_ptr().add(i)));
            i += 8;
        }
    }
    x[b..]
        .iter()
        .fold(hmax(acc), |m, &v| if v > m { v } else { m })
}

/// # Safety
/// AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn sum_exp_shifted(x: &[f32], shift: f32) -> f32 {
    let n = x.len();
    let b = body(n);
    let sh = _mm256_set1_ps(shift);
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    // SAFETY: vector loads stay below b.
    unsafe {
        let mut i = 0;
        while i + 16 <= b {
            let p = x.as_ptr().add(i);
            a0 = _mm256_add_ps(a0, exp(_mm256_sub_ps(_mm256_loadu_ps(p), sh)));
            a1 = _mm256_add_ps(a1, exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(8)), sh)));
            i += 16;
        }
        if i < b {
            a0 = _mm256_add_ps(
                a0,
                exp(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), sh)),
            );
        }
    }
    hsum(_mm256_add_ps(a0, a1)) + x[b..].iter().map(|&v| exp_fast(v - shift)).sum::<f32>()
}

/// # Safety
/// AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp_shifted_scaled(x: &mut [f32], shift: f32, mul: f32) {
    let b = body(x.len());
    let (sh, mu) = (_mm256_set1_ps(shift), _mm256_set1_ps(mul));
    let p = x.as_mut_ptr();
    // SAFETY: vector accesses stay below b ≤ len.
    unsafe {
        let mut i = 0;
        while i < b {
            let v = _mm256_loadu_ps(p.add(i));
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(exp(_mm256_sub_ps(v, sh)), mu));
            i += 8;
        }
    }
    x[b..]
        .iter_mut()
        .for_each(|v| *v = exp_fast(*v - shift) * mul);
}

/// # Safety
/// AVX2 and FMA; `row` is not empty.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn softmax_scaled(row: &mut [f32], scale: f32) {
    let n = row.len();
    let b = body(n);
    let sc = _mm256_set1_ps(scale);
    let p = row.as_mut_ptr();
    // SAFETY: vector accesses stay below b ≤ n; scalar ones below n.
    unsafe {
        let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < b {
            mx = _mm256_max_ps(mx, _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), sc));
            i += 8;
        }
        let m = (b..n).fold(hmax(mx), |m, j| m.max(*p.add(j) * scale));
        let mv = _mm256_set1_ps(m);
        let mut sum = _mm256_setzero_ps();
        let mut i = 0;
        while i < b {
            let e = exp(_mm256_sub_ps(
                _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), sc),
                mv,
            ));
            sum = _mm256_add_ps(sum, e);
            _mm256_storeu_ps(p.add(i), e);
            i += 8;
        }
        let mut s = hsum(sum);
        for j in b..n {
            let e = exp_fast(*p.add(j) * scale - m);
            *p.add(j) = e;
            s += e;
        }
        let inv = 1.0 / s;
        let iv = _mm256_set1_ps(inv);
        let mut i = 0;
        while i < b {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), iv));
            i += 8;
        }
        for j in b..n {
            *p.add(j) *= inv;
        }
    }
}

/// Σ x·y.
///
/// # Safety
/// AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let b = n & !15;
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    // SAFETY: vector loads stay below b ≤ n.
    unsafe {
        let mut i = 0;
        while i < b {
            s0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(x.as_ptr().add(i)),
                _mm256_loadu_ps(y.as_ptr().add(i)),
                s0,
            );
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(x.as_ptr().add(i + 8)),
                _mm256_loadu_ps(y.as_ptr().add(i + 8)),
                s1,
            );
            i += 16;
        }
    }
    let tail: f32 = x[b..n].iter().zip(&y[b..n]).map(|(a, b)| a * b).sum();
    hsum(_mm256_add_ps(s0, s1)) + tail
}

//! AVX2+FMA path for very short products (m ≤ 8 rows of A: token-by-token generation), the
//! counterpart of `gemv` for CPUs without AVX-512: B is streamed once, with no packing.
//!
//! AVX2 has 16 vector registers, so the number of columns (or column groups) per pass shrinks
//! as m grows, keeping accumulators + B vectors + the A broadcast within the register file.

use super::avx2::store_mask as mask;
use super::driver::{SendPtr, View};
use crate::kernels::ops_avx2::hsum;
use std::arch::x86_64::*;

use super::gemv::split_columns;
pub(crate) use super::gemv::MAX_M;

/// As `gemv::gemv`, on AVX2+FMA.
///
/// # Safety
/// `b` covers the k×n operand, `c` the m×n output, no overlap; the CPU has AVX2 and FMA.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemv(
    m: usize,
    n: usize,
    k: usize,
    at: &[f32],
    b: View,
    c: *mut f32,
    c_rs: usize,
    c_cs: usize,
    acc: bool,
    threads: usize,
) {
    debug_assert!((1..=MAX_M).contains(&m) && at.len() >= m * k);
    let cp = SendPtr(c);
    let run = |j0: usize, j1: usize| {
        // SAFETY: columns j0..j1 of C are written by this call only.
        unsafe {
            let c = cp.get();
            // <rows, k unroll, columns (dot form) or 8-wide groups (row form)>: ≥ 8
            // independent FMA chains, ≤ 14 registers in use.
            match m {
                1 => cols::<1, 2, 4>(j0, j1, k, at, b, c, c_rs, c_cs, acc),
                2 => cols::<2, 1, 4>(j0, j1, k, at, b, c, c_rs, c_cs, acc),
                3 => cols::<3, 1, 3>(j0, j1, k, at, b, c, c_rs, c_cs, acc),
                4 => cols::<4, 1, 2>(j0, j1, k, at, b, c, c_rs, c_cs, acc),
                5 => cols::<5, 1, 2>(j0, j1, k, at, b, c, c_rs, c_cs, acc),
                6 => cols::<6, 1, 1>(j0, j1, k, at, b, c, c_rs, c_cs, acc),
                7 => cols::<7, 1, 1>(j0, j1, k, at, b, c, c_rs, c_cs, acc),
                _ => cols::<8, 1, 1>(j0, j1, k, at, b, c, c_rs, c_cs, acc),
            }
        }
    };
    split_columns(m, n, k, threads, run);
}

/// Columns j0..j1 of C: `G` columns at a time as dot products (B's k contiguous), or `G`
/// groups of 8 columns as row updates (B's columns contiguous); the k loop unrolled `U` times
/// into separate accumulators.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn cols<const M: usize, const U: usize, const G: usize>(
    j0: usize,
    j1: usize,
    k: usize,
    at: &[f32],
    b: View,
    c: *mut f32,
    c_rs: usize,
    c_cs: usize,
    acc: bool,
) {
    let a = at.as_ptr();
    // SAFETY: all accesses are inside A (m×k), B's columns j0..j1 and C's columns j0..j1;
    // masked loads and stores touch only the lanes inside them.
    unsafe {
        let store = |i: usize, j: usize, v: f32| {
            let p = c.add(i * c_rs + j * c_cs);
            *p = if acc { *p + v } else { v };
        };
        if b.ks == 1 {
            let mut j = j0;
            while j < j1 {
                let nb = (j1 - j).min(G);
                let mut s = [[[_mm256_setzero_ps(); U]; G]; M];
                let mut bj = [b.ptr; G];
                for (q, p) in bj.iter_mut().enumerate() {
                    *p = b.ptr.add((j + q.min(nb - 1)) * b.ls);
                }
                let mut kk = 0;
                while kk + 8 * U <= k {
                    for u in 0..U {
                        let off = kk + 8 * u;
                        let mut bv = [_mm256_setzero_ps(); G];
                        for q in 0..G {
                            bv[q] = _mm256_loadu_ps(bj[q].add(off));
                        }
                        for (i, si) in s.iter_mut().enumerate() {
                            let av = _mm256_loadu_ps(a.add(i * k + off));
                            for q in 0..G {
                                si[q][u] = _mm256_fmadd_ps(av, bv[q], si[q][u]);
                            }
                        }
                    }
                    kk += 8 * U;
                }
                while kk < k {
                    let lm = mask(k - kk);
                    let mut bv = [_mm256_setzero_ps(); G];
                    for q in 0..G {
                        bv[q] = _mm256_maskload_ps(bj[q].add(kk), lm);
                    }
                    for (i, si) in s.iter_mut().enumerate() {
                        let av = _mm256_maskload_ps(a.add(i * k + kk), lm);
                        for q in 0..G {
                            si[q][0] = _mm256_fmadd_ps(av, bv[q], si[q][0]);
                        }
                    }
                    kk += 8;
                }
                for (i, si) in s.iter().enumerate() {
                    for (q, sq) in si.iter().enumerate().take(nb) {
                        let mut v = sq[0];
                        for x in &sq[1..] {
                            v = _mm256_add_ps(v, *x);
                        }
                        store(i, j + q, hsum(v));
                    }
                }
                j += nb;
            }
        } else {
            // Row updates: C[i, j..j+8G] += Σ_kk A[i, kk] · B[kk, j..j+8G].
            let mut j = j0;
            while j < j1 {
                let w = (j1 - j).min(8 * G);
                let mut masks = [_mm256_setzero_si256(); G];
                for (g, mk) in masks.iter_mut().enumerate() {
                    *mk = mask(w.saturating_sub(8 * g));
                }
                let mut s = [[[_mm256_setzero_ps(); G]; U]; M];
                let step = |kk: usize, u: usize, s: &mut [[[__m256; G]; U]; M]| {
                    let br = b.ptr.add(kk * b.ks + j);
                    let mut bv = [_mm256_setzero_ps(); G];
                    for (g, v) in bv.iter_mut().enumerate() {
                        *v = if w >= 8 * (g + 1) {
                            _mm256_loadu_ps(br.add(8 * g))
                        } else {
                            _mm256_maskload_ps(br.wrapping_add(8 * g), masks[g])
                        };
                    }
                    for (i, si) in s.iter_mut().enumerate() {
                        let av = _mm256_broadcast_ss(&*a.add(i * k + kk));
                        for g in 0..G {
                            si[u][g] = _mm256_fmadd_ps(av, bv[g], si[u][g]);
                        }
                    }
                };
                let mut kk = 0;
                while kk + U <= k {
                    for u in 0..U {
                        step(kk + u, u, &mut s);
                    }
                    kk += U;
                }
                while kk < k {
                    step(kk, 0, &mut s);
                    kk += 1;
                }
                for (i, su) in s.iter().enumerate() {
                    let mut si = su[0];
                    for x in &su[1..] {
                        for g in 0..G {
                            si[g] = _mm256_add_ps(si[g], x[g]);
                        }
                    }
                    if c_cs != 1 {
                        let mut tmp = [[0.0f32; 8]; G];
                        for (t, v) in tmp.iter_mut().zip(&si) {
                            _mm256_storeu_ps(t.as_mut_ptr(), *v);
                        }
                        for (q, &v) in tmp.iter().flatten().enumerate().take(w) {
                            store(i, j + q, v);
                        }
                        continue;
                    }
                    let cr = c.add(i * c_rs + j);
                    for g in 0..G {
                        let p = cr.wrapping_add(8 * g);
                        let v = if acc {
                            _mm256_add_ps(si[g], _mm256_maskload_ps(p, masks[g]))
                        } else {
                            si[g]
                        };
                        _mm256_maskstore_ps(p, masks[g], v);
                    }
                }
                j += w;
            }
        }
    }
}

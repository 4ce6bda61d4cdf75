//! AVX-512 path for short products (m ≤ 32 rows of A: token-by-token generation, batched
//! sampling): B is streamed once, with no packing.

use super::avx512::lane_mask;
use super::driver::{SendPtr, View};
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Largest m handled here.
pub(crate) const MAX_M: usize = 8;

/// C[m×n] (+)= A·B for m ≤ 8, where A's rows are contiguous in `at` (m×k) and B(kk, j) =
/// `b.ptr[j*b.ls + kk*b.ks]` with `b.ks == 1` (dot products) or `b.ls == 1` (row updates).
/// C(i, j) is at `c[i*c_rs + j*c_cs]`.
///
/// # Safety
/// `b` covers the k×n operand, `c` the m×n output, no overlap; the CPU has AVX-512F.
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
    debug_assert!((1..=MAX_ROWS).contains(&m) && at.len() >= m * k);
    let cp = SendPtr(c);
    let run = |j0: usize, j1: usize| {
        // SAFETY: columns j0..j1 of C are written by this call only.
        unsafe {
            let c = cp.get();
            if m <= MAX_M {
                rows8(m, j0, j1, k, at, b, c, c_rs, c_cs, acc);
                return;
            }
            // More than 8 rows: blocks of COL_BLOCK columns of B, each used by every group
            // of 8 rows while it is in L2, so that B still comes from memory once.
            let mut jb = j0;
            while jb < j1 {
                let je = (jb + COL_BLOCK).min(j1);
                for i0 in (0..m).step_by(MAX_M) {
                    let mi = (m - i0).min(MAX_M);
                    let ci = c.add(i0 * c_rs);
                    rows8(mi, jb, je, k, &at[i0 * k..], b, ci, c_rs, c_cs, acc);
                }
                jb = je;
            }
        }
    };
    split_columns(m, n, k, threads, run);
}

/// Most rows of A `gemv` takes: up to 8 in one pass over B, more in groups of 8 over blocks
/// of B's columns. Batched decoding (16 sequences sampled together) has this shape, where
/// packing B for a blocked GEMM cost as much as the products.
pub(crate) const MAX_ROWS: usize = 32;

/// Columns of B per block when more than 8 rows share it (64 columns × k = 4096: 1 MB).
const COL_BLOCK: usize = 64;

/// Columns j0..j1 of C for m ≤ 8 rows.
///
/// # Safety
/// As [`gemv`], for those columns.
#[allow(clippy::too_many_arguments)]
unsafe fn rows8(
    m: usize,
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
    // Enough independent accumulators (≥ 8) to hide the FMA latency, and few enough (with the
    // B vectors) for the 32 registers: from 5 rows on, 2 columns (or 32 lanes) at a time.
    // With 4, 8 rows needed 36 registers and ran at half the speed of 4 rows.
    // SAFETY: forwarded contract.
    unsafe {
        match m {
            1 => cols::<1, 3, 4, 4>(j0, j1, k, at, b, c, c_rs, c_cs, acc),
            2 => cols::<2, 2, 4, 4>(j0, j1, k, at, b, c, c_rs, c_cs, acc),
            3 => cols::<3, 1, 4, 4>(j0, j1, k, at, b, c, c_rs, c_cs, acc),
            4 => cols::<4, 1, 4, 4>(j0, j1, k, at, b, c, c_rs, c_cs, acc),
            5 => cols::<5, 1, 2, 2>(j0, j1, k, at, b, c, c_rs, c_cs, acc),
            6 => cols::<6, 1, 2, 2>(j0, j1, k, at, b, c, c_rs, c_cs, acc),
            7 => cols::<7, 1, 2, 2>(j0, j1, k, at, b, c, c_rs, c_cs, acc),
            _ => cols::<8, 1, 2, 2>(j0, j1, k, at, b, c, c_rs, c_cs, acc),
        }
    }
}

/// Run `run(j0, j1)` over C's n columns: in one call, or for big enough products in one chunk
/// per thread (multiples of 64 columns) in parallel. Shared by the AVX-512 and AVX2 versions.
pub(crate) fn split_columns(
    m: usize,
    n: usize,
    k: usize,
    threads: usize,
    run: impl Fn(usize, usize) + Sync,
) {
    // One chunk per thread: with two per thread, greedy generation on 2 Zen 5 cores ran at
    // 77–83 instead of 90–91 tokens/s (more hand-offs between the threads per token).
    let chunks = if threads > 1 && m * n * k >= 1 << 17 && n >= 128 {
        threads
    } else {
        1
    };
    if chunks == 1 {
        run(0, n);
    } else {
        let step = n.div_ceil(chunks).div_ceil(64) * 64;
        (0..n.div_ceil(step))
            .into_par_iter()
            .for_each(|t| run(t * step, (t * step + step).min(n)));
    }
}

/// Columns j0..j1 of C, `JB` columns (dot-product form) or 16·`W` columns (row-update form)
/// at a time, with the k loop unrolled `U` times into separate accumulators so that at least
/// ~8 independent FMA chains hide the latency.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn cols<const M: usize, const U: usize, const JB: usize, const W: usize>(
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
    // SAFETY: all accesses are inside A (m×k), B's columns j0..j1 and C's columns j0..j1.
    unsafe {
        let store = |i: usize, j: usize, v: f32| {
            let p = c.add(i * c_rs + j * c_cs);
            *p = if acc { *p + v } else { v };
        };
        if b.ks == 1 {
            // Dot products of A rows with B columns (rows of the stored Bᵀ).
            let mut j = j0;
            while j < j1 {
                let nb = (j1 - j).min(JB);
                let mut s = [[[_mm512_setzero_ps(); U]; JB]; M];
                let mut bj = [b.ptr; JB];
                for (q, p) in bj.iter_mut().enumerate() {
                    *p = b.ptr.add((j + q.min(nb - 1)) * b.ls);
                }
                let mut kk = 0;
                while kk + 16 * U <= k {
                    for u in 0..U {
                        let off = kk + 16 * u;
                        let mut bv = [_mm512_setzero_ps(); JB];
                        for q in 0..JB {
                            bv[q] = _mm512_loadu_ps(bj[q].add(off));
                        }
                        for (i, si) in s.iter_mut().enumerate() {
                            let av = _mm512_loadu_ps(a.add(i * k + off));
                            for q in 0..JB {
                                si[q][u] = _mm512_fmadd_ps(av, bv[q], si[q][u]);
                            }
                        }
                    }
                    kk += 16 * U;
                }
                while kk < k {
                    let lm = lane_mask(k - kk);
                    let mut bv = [_mm512_setzero_ps(); JB];
                    for q in 0..JB {
                        bv[q] = _mm512_maskz_loadu_ps(lm, bj[q].add(kk));
                    }
                    for (i, si) in s.iter_mut().enumerate() {
                        let av = _mm512_maskz_loadu_ps(lm, a.add(i * k + kk));
                        for q in 0..JB {
                            si[q][0] = _mm512_fmadd_ps(av, bv[q], si[q][0]);
                        }
                    }
                    kk += 16;
                }
                for (i, si) in s.iter().enumerate() {
                    for (q, sq) in si.iter().enumerate().take(nb) {
                        let mut v = sq[0];
                        for x in &sq[1..] {
                            v = _mm512_add_ps(v, *x);
                        }
                        store(i, j + q, _mm512_reduce_add_ps(v));
                    }
                }
                j += nb;
            }
        } else {
            // Row updates: C[i, j..j+64] += Σ_kk A[i, kk] · B[kk, j..j+64].
            let mut j = j0;
            while j < j1 {
                let w = (j1 - j).min(16 * W);
                let mut masks = [0; W];
                for (g, mk) in masks.iter_mut().enumerate() {
                    *mk = lane_mask(w.saturating_sub(16 * g));
                }
                let mut s = [[[_mm512_setzero_ps(); W]; U]; M];
                let step = |kk: usize, u: usize, s: &mut [[[__m512; W]; U]; M]| {
                    let br = b.ptr.add(kk * b.ks + j);
                    let mut bv = [_mm512_setzero_ps(); W];
                    for (g, v) in bv.iter_mut().enumerate() {
                        *v = _mm512_maskz_loadu_ps(masks[g], br.wrapping_add(16 * g));
                    }
                    for (i, si) in s.iter_mut().enumerate() {
                        let av = _mm512_set1_ps(*a.add(i * k + kk));
                        for g in 0..W {
                            si[u][g] = _mm512_fmadd_ps(av, bv[g], si[u][g]);
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
                        for g in 0..W {
                            si[g] = _mm512_add_ps(si[g], x[g]);
                        }
                    }
                    if c_cs != 1 {
                        let mut tmp = [[0.0f32; 16]; W];
                        for (t, v) in tmp.iter_mut().zip(&si) {
                            _mm512_storeu_ps(t.as_mut_ptr(), *v);
                        }
                        for (q, &v) in tmp.iter().flatten().enumerate().take(w) {
                            store(i, j + q, v);
                        }
                        continue;
                    }
                    let cr = c.add(i * c_rs + j);
                    for g in 0..W {
                        let p = cr.wrapping_add(16 * g);
                        let v = if acc {
                            _mm512_add_ps(si[g], _mm512_maskz_loadu_ps(masks[g], p))
                        } else {
                            si[g]
                        };
                        _mm512_mask_storeu_ps(p, masks[g], v);
                    }
                }
                j += w;
            }
        }
    }
}

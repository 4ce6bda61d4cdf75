//! Generation's matrix-vector products against the memory bandwidth: one row times a weight
//! of about 256 MB (k = 576, SmolLM2's hidden size), far larger than the caches, stored as
//! f32, bf16 and 4-bit (NF4 layout, blocks of 64).
//! Prints GB/s of weight bytes streamed per product next to the fastest read seen (a parallel
//! sum over 256 MB, or one of the products), best of several calls.
//!
//! `cargo run --release --example gemv_bandwidth [threads]`

mod common;

use peftkit_core::kernels::gemm::{matmul_nt, matmul_nt_bf16, matmul_nt_q4, PackedBf16, Q4Weight};
use rayon::prelude::*;

/// Σ x with 8 independent AVX-512 accumulators where the CPU has them (so that only the
/// loads limit it), else 16 lanes of portable code.
fn sum(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is available.
        return unsafe { sum_avx512(x) };
    }
    let mut acc = [0.0f32; 16];
    for v in x.chunks_exact(16) {
        acc.iter_mut().zip(v).for_each(|(a, &x)| *a += x);
    }
    acc.iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (mut a0, mut a1, mut a2, mut a3) = (
        _mm512_setzero_ps(),
        _mm512_setzero_ps(),
        _mm512_setzero_ps(),
        _mm512_setzero_ps(),
    );
    for c in x.chunks_exact(64) {
        let p = c.as_ptr();
        // SAFETY: each chunk holds 64 floats.
        unsafe {
            a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p));
            a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p.add(16)));
            a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p.add(32)));
            a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p.add(48)));
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)))
}

/// Best seconds per call over at least ~0.3 s (at least 3 calls).
fn time(f: impl FnMut()) -> f64 {
    common::best_seconds(3, 0.3, f)
}

fn main() {
    // The same memory set-up as the tools: 2 MB pages (re-runs this process once).
    peftkit_core::kernels::allocator::use_huge_pages();
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    peftkit_core::kernels::set_threads(threads);
    let k = 576usize;

    // Written by the threads that read it (in the same halves), as the weights are packed.
    let mut big = vec![0.0f32; 64 << 20];
    let half = big.len().div_ceil(threads);
    big.par_chunks_mut(half).for_each(|c| c.fill(1.0));
    let read = time(|| {
        let s: f32 = big.par_chunks(big.len().div_ceil(threads)).map(sum).sum();
        std::hint::black_box(s);
    });
    let bandwidth = big.len() as f64 * 4.0 / read / 1e9;
    println!("{threads} thread(s); read bandwidth (sum over 256 MB): {bandwidth:.1} GB/s");

    let x: Vec<f32> = (0..k).map(|i| (i % 13) as f32 * 0.1).collect();
    // Each weight holds about 256 MB in its own format, 8 times the 32 MB L3 of the Zen 5
    // machines this was tuned on: a weight the size of SmolLM2's head (57 MB in bf16) stays
    // partly cached between calls and reads faster than memory.
    let rows = |bytes_per_weight: f64| {
        ((256e6 / (k as f64 * bytes_per_weight)) as usize).div_ceil(64) * 64
    };
    let weight = |n: usize| -> Vec<f32> {
        (0..n * k)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3)
            .collect()
    };

    let n32 = rows(4.0);
    // As generation multiplies an f32 weight: in place (the GEMV reads its rows).
    let w32 = weight(n32);
    let mut y = vec![0.0f32; n32];
    let t_f32 = time(|| matmul_nt(&x, &w32, &mut y, 1, n32, k, false));
    drop(w32);

    let n16 = rows(2.0);
    let bf16 = PackedBf16::for_nt(&weight(n16), n16, k);
    let mut y = vec![0.0f32; n16];
    let t_bf16 = time(|| matmul_nt_bf16(&x, &bf16, &mut y, 1, false));
    drop(bf16);

    let n4 = rows(0.5625);
    let packed: Vec<u8> = (0..n4 * k / 2).map(|i| (i * 37 % 256) as u8).collect();
    let absmax: Vec<f32> = (0..n4 * k / 64).map(|i| 0.5 + (i % 7) as f32).collect();
    let code: [f32; 16] = std::array::from_fn(|i| i as f32 / 7.5 - 1.0);
    let q4 = Q4Weight {
        packed: &packed,
        absmax: &absmax,
        code: &code,
        blocksize: 64,
        n: n4,
        k,
    };
    let mut y = vec![0.0f32; n4];
    let t_q4 = time(|| matmul_nt_q4(&x, &q4, &mut y, 1, false));

    let q4_bytes = packed.len() + absmax.len() * 4;
    let rates = [
        ("f32", t_f32, n32, n32 * k * 4),
        ("bf16", t_bf16, n16, n16 * k * 2),
        ("4-bit", t_q4, n4, q4_bytes),
    ];
    // The plain sum reads slower than the best GEMV on some machines (it read 67–89 GB/s
    // where the bf16 GEMV streamed 112 on Zen 5), so the reference is the fastest read seen.
    let fastest = rates
        .iter()
        .map(|&(_, secs, _, bytes)| bytes as f64 / secs / 1e9)
        .fold(bandwidth, f64::max);
    println!("fastest read seen: {fastest:.1} GB/s");
    for (name, secs, n, bytes) in rates {
        let gbs = bytes as f64 / secs / 1e9;
        println!(
            "{name:>6}: {:7.3} ms per product, {gbs:6.1} GB/s of weights ({:3.0}% of the fastest read), {:6.1} G weights/s",
            secs * 1e3,
            100.0 * gbs / fastest,
            (n * k) as f64 / secs / 1e9
        );
    }
}

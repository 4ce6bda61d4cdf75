//! Generation's matrix-vector products against the memory bandwidth: one row times a weight
//! too large for the caches (SmolLM2's LM head, 49152 × 576; the decoder layers of a token
//! together are larger still), stored as f32, bf16 and 4-bit (NF4 layout, blocks of 64).
//! Prints GB/s of weight bytes streamed per product next to the machine's read bandwidth
//! (a parallel sum over 1 GiB), best of several calls.
//!
//! `cargo run --release --example gemv_bandwidth [threads]`

use peftkit_core::kernels::gemm::{
    matmul_nt_bf16, matmul_nt_packed, matmul_nt_q4, PackedBf16, PackedWeight, Q4Weight,
};
use rayon::prelude::*;
use std::time::Instant;

/// Best seconds per call over at least ~0.3 s (at least 3 calls).
fn time(mut f: impl FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    let start = Instant::now();
    let mut calls = 0;
    while calls < 3 || start.elapsed().as_secs_f64() < 0.3 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        calls += 1;
    }
    best
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    peftkit_core::kernels::set_threads(threads);
    let (n, k) = (49152usize, 576usize);

    let big = vec![1.0f32; 256 << 20];
    let read = time(|| {
        // 16 independent lanes, so the sum vectorizes and only the loads limit it.
        let lanes = |c: &[f32]| {
            let mut acc = [0.0f32; 16];
            for v in c.chunks_exact(16) {
                acc.iter_mut().zip(v).for_each(|(a, &x)| *a += x);
            }
            acc.iter().sum::<f32>()
        };
        let s: f32 = big.par_chunks(1 << 16).map(lanes).sum();
        std::hint::black_box(s);
    });
    let bandwidth = big.len() as f64 * 4.0 / read / 1e9;
    println!("{threads} thread(s); read bandwidth (sum over 1 GiB): {bandwidth:.1} GB/s");

    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3)
        .collect();
    let x: Vec<f32> = (0..k).map(|i| (i % 13) as f32 * 0.1).collect();
    let mut y = vec![0.0f32; n];

    let f32_pack = PackedWeight::new(&w, n, k);
    let t_f32 = time(|| matmul_nt_packed(&x, &f32_pack, &mut y, 1, false));
    let bf16 = PackedBf16::for_nt(&w, n, k);
    let t_bf16 = time(|| matmul_nt_bf16(&x, &bf16, &mut y, 1, false));
    let packed: Vec<u8> = (0..n * k / 2).map(|i| (i * 37 % 256) as u8).collect();
    let absmax: Vec<f32> = (0..n * k / 64).map(|i| 0.5 + (i % 7) as f32).collect();
    let code: [f32; 16] = std::array::from_fn(|i| i as f32 / 7.5 - 1.0);
    let q4 = Q4Weight {
        packed: &packed,
        absmax: &absmax,
        code: &code,
        blocksize: 64,
        n,
        k,
    };
    let t_q4 = time(|| matmul_nt_q4(&x, &q4, &mut y, 1, false));

    let q4_bytes = packed.len() + absmax.len() * 4;
    for (name, secs, bytes) in [
        ("f32", t_f32, n * k * 4),
        ("bf16", t_bf16, n * k * 2),
        ("4-bit", t_q4, q4_bytes),
    ] {
        let gbs = bytes as f64 / secs / 1e9;
        println!(
            "{name:>6}: {:7.3} ms per product, {gbs:6.1} GB/s of weights ({:3.0}% of the read bandwidth), {:6.1} G weights/s",
            secs * 1e3,
            100.0 * gbs / bandwidth,
            (n * k) as f64 / secs / 1e9
        );
    }
}

//! bf16 products (f32 accumulation) against our f32 ones on the linear layers of SmolLM2-135M
//! training (m = 1024 rows = batch 4 × 256): the forward `x·Wᵀ` (f32 `matmul_nt_packed` vs
//! `matmul_nt_bf16`) and the input gradient `dy·W` (f32 `matmul_nn` vs `matmul_nn_bf16`),
//! for every bf16 path this CPU has, with 1 and 2 threads. GFLOP/s, best call of several
//! interleaved rounds.
//!
//! `cargo run --release --example gemm_bf16_bench [rounds] [threads,...] [filter] [all]`
//! (`all` adds the portable fallback kernel; `PEFTKIT_BENCH_M=256` changes the row count, e.g.
//! to the loss's 256-row chunks).

mod common;

use peftkit_core::kernels::gemm::{
    matmul_nn, matmul_nn_bf16, matmul_nt_bf16, matmul_nt_packed, Bf16Path, PackedBf16, PackedWeight,
};
use std::time::Instant;

/// (label, n, k): weight `[n, k]` = a linear layer's `[out, in]`.
const SHAPES: &[(&str, usize, usize)] = &[
    ("q/o", 576, 576),
    ("k/v", 192, 576),
    ("up/gate", 1536, 576),
    ("down", 576, 1536),
    ("lm_head", 49152, 576),
];

/// Best seconds per call over a timed batch of at least ~50 ms (at least 2 calls).
fn time(f: impl FnMut()) -> f64 {
    common::best_seconds(2, 0.05, f)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let threads: Vec<usize> = args
        .get(2)
        .map(|s| s.split(',').filter_map(|t| t.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2]);
    let filter = args.get(3).cloned().unwrap_or_default();
    let all = args.get(4).is_some_and(|a| a == "all");
    let m: usize = std::env::var("PEFTKIT_BENCH_M")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let mut paths: Vec<Bf16Path> = [Bf16Path::Amx, Bf16Path::Avx512Bf16]
        .into_iter()
        .filter(|p| p.available())
        .collect();
    if all || paths.is_empty() {
        paths.push(Bf16Path::Fallback);
    }
    println!("m = {m}, GFLOP/s (best of {rounds} interleaved rounds); bf16 paths {paths:?}");
    for (dir, f32name) in [("nt", "f32 packed"), ("nn", "f32")] {
        print!(
            "{dir} {:<8} {:>6} {:>5} {:>3} {:>10}",
            "layer", "n", "k", "thr", f32name
        );
        for p in &paths {
            print!(" {:>11} {:>6}", format!("{p:?}"), "x");
        }
        println!();
        for &(label, n, k) in SHAPES {
            if !label.contains(&filter) {
                continue;
            }
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.01)
                .collect();
            // Forward: x[m×k]·Wᵀ → [m×n]; input gradient: dy[m×n]·W → [m×k].
            let (rows_in, out_w) = if dir == "nt" { (k, n) } else { (n, k) };
            let a: Vec<f32> = (0..m * rows_in)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.01)
                .collect();
            let mut c = vec![0.0f32; m * out_w];
            let pw = (dir == "nt").then(|| PackedWeight::new(&w, n, k));
            let mut pack_ms = Vec::new();
            let packs: Vec<PackedBf16> = paths
                .iter()
                .map(|&p| {
                    let t = Instant::now();
                    let pk = if dir == "nt" {
                        PackedBf16::for_nt_with(p, &w, n, k)
                    } else {
                        PackedBf16::for_nn_with(p, &w, n, k)
                    };
                    pack_ms.push(t.elapsed().as_secs_f64() * 1e3);
                    pk
                })
                .collect();
            let flops = 2.0 * (m * n * k) as f64;
            for &t in &threads {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .expect("thread pool");
                let mut best = vec![f64::INFINITY; 1 + paths.len()];
                pool.install(|| {
                    for _ in 0..rounds {
                        best[0] = best[0].min(time(|| match &pw {
                            Some(pw) => matmul_nt_packed(&a, pw, &mut c, m, false),
                            None => matmul_nn(&a, &w, &mut c, m, k, n, false),
                        }));
                        for (b, pk) in best[1..].iter_mut().zip(&packs) {
                            *b = b.min(time(|| {
                                if dir == "nt" {
                                    matmul_nt_bf16(&a, pk, &mut c, m, false)
                                } else {
                                    matmul_nn_bf16(&a, pk, &mut c, m, false)
                                }
                            }));
                        }
                    }
                });
                let g: Vec<f64> = best.iter().map(|s| flops / s / 1e9).collect();
                print!("{dir} {label:<8} {n:>6} {k:>5} {t:>3} {:>10.1}", g[0]);
                for x in &g[1..] {
                    print!(" {:>11.1} {:>5.2}x", x, x / g[0]);
                }
                println!();
            }
            let ms: Vec<String> = pack_ms.iter().map(|t| format!("{t:.1}")).collect();
            println!(
                "   (packing the weight, ms, default pool: {})",
                ms.join(" / ")
            );
        }
    }
}

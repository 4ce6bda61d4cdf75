//! GEMM throughput on the shapes of SmolLM2-135M training and generation: our paths against
//! the `gemm` crate, interleaved (best of several rounds, so noise from other processes hurts
//! every path alike).
//!
//! `cargo run --release --example gemm_bench [rounds] [filter]`

mod common;

use peftkit_core::kernels::gemm::{sgemm_with, GemmPath};

/// (label, layout, m, n, k); layout: "nt" (B = [n×k]), "nn" (B = [k×n]), "tn" (A = [k×m]).
const SHAPES: &[(&str, &str, usize, usize, usize)] = &[
    ("fwd q/o", "nt", 1024, 576, 576),
    ("fwd k/v", "nt", 1024, 192, 576),
    ("fwd up/gate", "nt", 1024, 1536, 576),
    ("fwd down", "nt", 1024, 576, 1536),
    ("fwd lm_head", "nt", 1024, 49152, 576),
    ("dX q/o", "nn", 1024, 576, 576),
    ("dX k/v", "nn", 1024, 576, 192),
    ("dX up/gate", "nn", 1024, 576, 1536),
    ("dX down", "nn", 1024, 1536, 576),
    ("dW q/o", "tn", 576, 576, 1024),
    ("dW k/v", "tn", 192, 576, 1024),
    ("dW up/gate", "tn", 1536, 576, 1024),
    ("dW down", "tn", 576, 1536, 1024),
    ("gen q/o", "nt", 1, 576, 576),
    ("gen up", "nt", 1, 1536, 576),
    ("gen down", "nt", 1, 576, 1536),
    ("gen lm_head", "nt", 1, 49152, 576),
    ("gen4 up", "nt", 4, 1536, 576),
    ("gen4 lm_head", "nt", 4, 49152, 576),
    ("m8 up", "nt", 8, 1536, 576),
    ("gen dX", "nn", 1, 576, 1536),
    ("attn QK^T", "nt", 256, 256, 64),
    ("attn PV", "nn", 256, 64, 256),
];

#[allow(clippy::too_many_arguments)]
fn run(
    path: GemmPath,
    layout: &str,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
) {
    match layout {
        "nt" => sgemm_with(path, m, n, k, a, k, 1, b, 1, k, c, n, false),
        "nn" => sgemm_with(path, m, n, k, a, k, 1, b, n, 1, c, n, false),
        _ => sgemm_with(path, m, n, k, a, 1, m, b, n, 1, c, n, false),
    }
}

/// Best seconds per call over one timed batch of at least ~60 ms.
fn time(f: impl FnMut()) -> f64 {
    common::best_seconds(3, 0.06, f)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let filter = args.get(2).cloned().unwrap_or_default();
    let ours = GemmPath::best();
    let mut paths = vec![ours];
    if ours == GemmPath::Avx512 && GemmPath::Avx2.available() {
        paths.push(GemmPath::Avx2);
    }
    paths.push(GemmPath::Crate);
    println!(
        "threads: {}, paths: {:?} (GFLOP/s, best of {rounds} interleaved rounds)",
        rayon::current_num_threads(),
        paths
    );
    print!(
        "{:<14} {:>3} {:>5} {:>6} {:>5}",
        "shape", "lay", "m", "n", "k"
    );
    for p in &paths {
        print!(" {:>9}", format!("{p:?}"));
    }
    println!(" {:>7}", "speedup");
    for &(label, layout, m, n, k) in SHAPES {
        if !label.contains(&filter) {
            continue;
        }
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.01)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.01)
            .collect();
        let mut c = vec![0.0f32; m * n];
        let mut best = vec![f64::INFINITY; paths.len()];
        for _ in 0..rounds {
            for (p, bt) in paths.iter().zip(best.iter_mut()) {
                *bt = bt.min(time(|| run(*p, layout, m, n, k, &a, &b, &mut c)));
            }
        }
        let flops = 2.0 * (m * n * k) as f64;
        print!("{label:<14} {layout:>3} {m:>5} {n:>6} {k:>5}");
        for t in &best {
            print!(" {:>9.1}", flops / t / 1e9);
        }
        println!(" {:>6.2}x", best[best.len() - 1] / best[0]);
    }
}

//! The machine's f32 FMA peak, measured: every thread of the pool runs independent chains of
//! fused multiply-adds (AVX-512, else AVX2+FMA, else scalar) for a few milliseconds. MFU is
//! reported against this number (the brief's "measured peak 511 GFLOP/s" on 2 cores is the same
//! measurement). bf16 dot products (`vdpbf16ps`) do twice the multiply-adds per instruction.

use rayon::prelude::*;
use std::sync::OnceLock;
use std::time::Instant;

static PEAK: OnceLock<f64> = OnceLock::new();

/// GFLOP/s of f32 FMAs on all pool threads (measured once per process, ~30 ms): the best of
/// several short rounds, since a peak is a maximum. One long round read anywhere from 413 to
/// 524 GFLOP/s on the same 2-vCPU Zen 5 machine when the host took time from a thread, which
/// made the reported MFU swing by a fifth.
pub fn fma_peak_gflops() -> f64 {
    *PEAK.get_or_init(|| {
        let threads = rayon::current_num_threads();
        // warm up the clocks, then measure
        let _ = (0..threads)
            .into_par_iter()
            .map(|_| run(1_000_000))
            .sum::<f64>();
        (0..8)
            .map(|_| {
                let t = Instant::now();
                let flops: f64 = (0..threads).into_par_iter().map(|_| run(2_000_000)).sum();
                flops / t.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    })
}

/// Runs `iters` rounds of the widest FMA loop available; returns the FLOPs done.
fn run(iters: usize) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            let (flops, sink) = unsafe { fma_avx512(iters) };
            std::hint::black_box(sink);
            return flops;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let (flops, sink) = unsafe { fma_avx2(iters) };
            std::hint::black_box(sink);
            return flops;
        }
    }
    let (flops, sink) = fma_scalar(iters);
    std::hint::black_box(sink);
    flops
}

// 12 independent chains: enough to cover the FMA latency on two ports.
const CHAINS: usize = 12;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_avx512(iters: usize) -> (f64, f32) {
    use std::arch::x86_64::*;
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    let mut acc = [_mm512_set1_ps(1.0); CHAINS];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    let mut s = _mm512_setzero_ps();
    for x in acc {
        s = _mm512_add_ps(s, x);
    }
    ((iters * CHAINS * 16 * 2) as f64, _mm512_reduce_add_ps(s))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_avx2(iters: usize) -> (f64, f32) {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    let mut acc = [_mm256_set1_ps(1.0); CHAINS];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    let mut out = [0f32; 8];
    let mut s = _mm256_setzero_ps();
    for x in acc {
        s = _mm256_add_ps(s, x);
    }
    _mm256_storeu_ps(out.as_mut_ptr(), s);
    ((iters * CHAINS * 8 * 2) as f64, out.iter().sum())
}

fn fma_scalar(iters: usize) -> (f64, f32) {
    let mut acc = [1.0f32; CHAINS];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = x.mul_add(0.999_999, 1e-7);
        }
    }
    ((iters * CHAINS * 2) as f64, acc.iter().sum())
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_is_positive_and_cached() {
        let a = super::fma_peak_gflops();
        assert!(a > 0.1, "{a}");
        assert_eq!(a, super::fma_peak_gflops());
    }
}

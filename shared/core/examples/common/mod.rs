//! What the benchmark examples share.

use std::time::Instant;

/// Best seconds per call of `f`, over at least `min_calls` calls and `min_secs` seconds (the
/// best call is the one the machine disturbed least).
pub fn best_seconds(min_calls: usize, min_secs: f64, mut f: impl FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    let start = Instant::now();
    let mut calls = 0;
    while calls < min_calls || start.elapsed().as_secs_f64() < min_secs {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        calls += 1;
    }
    best
}

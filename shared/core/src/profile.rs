//! Wall-clock phase timers for finding where a step's time goes.
//!
//! Off unless `PEFTKIT_PROFILE=1`: then every [`scope`] adds its duration to a named total and
//! [`report`] prints the totals to stderr (the tools call it at exit). When off, a scope costs
//! one relaxed atomic load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static STATE: AtomicU8 = AtomicU8::new(0); // 0 = unknown, 1 = off, 2 = on
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());
static FLOPS: Mutex<BTreeMap<&'static str, f64>> = Mutex::new(BTreeMap::new());

/// Credit `flops` model FLOPs to phase `name` (when profiling is on): the report then shows
/// the phase's GFLOP/s and its fraction of the measured FMA peak.
pub fn flops(name: &'static str, flops: f64) {
    if enabled() {
        *FLOPS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name)
            .or_default() += flops;
    }
}

/// Whether `PEFTKIT_PROFILE=1` is set (read once).
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var("PEFTKIT_PROFILE").is_ok_and(|v| v == "1");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
    }
}

/// Times until dropped (when profiling is on).
pub struct Scope {
    name: &'static str,
    start: Option<Instant>,
}

pub fn scope(name: &'static str) -> Scope {
    Scope {
        name,
        start: enabled().then(Instant::now),
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(t) = self.start {
            let d = t.elapsed();
            let mut m = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
            let e = m.entry(self.name).or_default();
            e.0 += d;
            e.1 += 1;
        }
    }
}

/// Print the totals (largest first) to stderr, if profiling is on.
pub fn report() {
    if !enabled() {
        return;
    }
    let m = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1 .0));
    let flops = FLOPS.lock().unwrap_or_else(|e| e.into_inner());
    let peak = if flops.is_empty() {
        0.0
    } else {
        crate::kernels::peak::fma_peak_gflops()
    };
    eprintln!("profile (wall time per phase; nested phases overlap):");
    for (name, (d, n)) in v {
        let rate = match flops.get(name) {
            Some(&f) if d.as_secs_f64() > 0.0 => {
                let g = f / d.as_secs_f64() / 1e9;
                format!(
                    "  {g:>7.1} GFLOP/s ({:.0}% of the {peak:.0} GFLOP/s FMA peak)",
                    100.0 * g / peak
                )
            }
            _ => String::new(),
        };
        eprintln!(
            "  {name:<28} {:>9.3} s  {n:>7} calls{rate}",
            d.as_secs_f64()
        );
    }
}

//! Time the phases of a forward pass on a model folder: `cargo run --release --example
//! forward_timing -- models/smollm2 [batch] [seq]` (random token ids).

use peftkit_core::model::{ForwardOptions, Model, SeqInput};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).expect("model dir"));
    let batch: usize = args.get(2).map_or(8, |s| s.parse().unwrap());
    let seq: usize = args.get(3).map_or(256, |s| s.parse().unwrap());
    peftkit_core::kernels::set_threads(0);
    let model = Model::load(&dir).unwrap();
    let mut rng = peftkit_core::rng::Rng::new(1);
    let ids: Vec<Vec<u32>> = (0..batch)
        .map(|_| {
            (0..seq)
                .map(|_| rng.below(model.config.vocab) as u32)
                .collect()
        })
        .collect();
    let seqs: Vec<SeqInput> = ids.iter().map(|i| SeqInput { ids: i }).collect();
    let opts = ForwardOptions::default();
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    for round in 0..rounds {
        let (t, c) = (Instant::now(), cpu_seconds());
        let hidden = model.forward(&seqs, None, &opts).unwrap();
        let (t_fwd, c_fwd) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
        let targets: Vec<(usize, u32)> = (0..batch * seq - 1).map(|r| (r, ids[0][0])).collect();
        let (t, c) = (Instant::now(), cpu_seconds());
        let lp = model.target_logprobs(&hidden, &targets, &opts);
        let (t_lp, c_lp) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
        println!(
            "round {round}: blocks {t_fwd:.3}s (cpu {c_fwd:.2}s), head+log-softmax {t_lp:.3}s \
             (cpu {c_lp:.2}s), {:.0} tokens/s ({})",
            (batch * seq) as f64 / (t_fwd + t_lp),
            lp.len()
        );
    }
}

/// User + system CPU time of the process so far (Linux; 0 elsewhere). Under contention from
/// other processes, CPU time is a steadier measure of work than wall time.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based) of the whole line: 11 and 12 here.
    (ticks(11) + ticks(12)) / 100.0
}

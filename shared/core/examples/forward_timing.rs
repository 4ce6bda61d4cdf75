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
    for round in 0..2 {
        let t = Instant::now();
        let hidden = model.forward(&seqs, None, &opts).unwrap();
        let t_fwd = t.elapsed().as_secs_f64();
        let targets: Vec<(usize, u32)> = (0..batch * seq - 1).map(|r| (r, ids[0][0])).collect();
        let t = Instant::now();
        let lp = model.target_logprobs(&hidden, &targets, &opts);
        let t_lp = t.elapsed().as_secs_f64();
        println!(
            "round {round}: blocks {t_fwd:.3}s, head+log-softmax {t_lp:.3}s, {:.0} tokens/s ({})",
            (batch * seq) as f64 / (t_fwd + t_lp),
            lp.len()
        );
    }
}

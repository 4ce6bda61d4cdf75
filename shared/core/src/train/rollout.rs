//! Sampling responses for a batch of prompts at once with the KV cache: every decoding step
//! runs the still-active sequences through the model together (one matrix product per layer
//! for the whole batch), and a sequence leaves the batch when it samples a stop token.

use crate::error::Result;
use crate::generate::{choose, SamplingParams};
use crate::model::{ForwardOptions, KvCache, Model, SeqInput};
use crate::rng::Rng;

/// One sampled response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The sampled tokens, the stop token included when one ended the response.
    pub ids: Vec<u32>,
    pub stopped: bool,
}

/// Sample one response per prompt (at most `params.max_new_tokens` tokens each). Tokens are
/// drawn from `rng` in prompt order at every step, so a run is reproducible.
pub fn sample_responses(
    model: &Model,
    prompts: &[&[u32]],
    params: &SamplingParams,
    stop: &[u32],
    rng: &mut Rng,
    opts: &ForwardOptions,
) -> Result<Vec<Response>> {
    let n = prompts.len();
    let h = model.config.hidden;
    let limit = model.config.max_positions;
    let mut caches: Vec<KvCache> = (0..n)
        .map(|_| model.new_cache(opts))
        .collect::<Result<_>>()?;
    let mut out: Vec<Response> = vec![
        Response {
            ids: Vec::new(),
            stopped: false,
        };
        n
    ];
    // the sequences still generating and the tokens each feeds next
    let mut active: Vec<usize> = (0..n).collect();
    let mut next: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    for _ in 0..params.max_new_tokens {
        active.retain(|&i| caches[i].len + next[i].len() <= limit);
        if active.is_empty() {
            break;
        }
        let seqs: Vec<SeqInput> = active.iter().map(|&i| SeqInput { ids: &next[i] }).collect();
        let mut sub: Vec<KvCache> = active
            .iter()
            .map(|&i| std::mem::take(&mut caches[i]))
            .collect();
        let hidden = model.forward(&seqs, Some(&mut sub), opts)?;
        for (&i, c) in active.iter().zip(sub) {
            caches[i] = c;
        }
        // the last row of every active sequence
        let mut last = Vec::with_capacity(active.len() * h);
        let mut row_end = 0;
        for &i in &active {
            row_end += next[i].len();
            last.extend_from_slice(&hidden[(row_end - 1) * h..row_end * h]);
        }
        let logits = model.logits(&last, active.len(), opts);
        let vocab = logits.len() / active.len();
        for (k, &i) in active.iter().enumerate() {
            let tok = choose(&logits[k * vocab..(k + 1) * vocab], params, rng);
            out[i].ids.push(tok);
            if stop.contains(&tok) {
                out[i].stopped = true;
            }
            next[i] = vec![tok];
        }
        active.retain(|&i| !out[i].stopped);
    }
    Ok(out)
}

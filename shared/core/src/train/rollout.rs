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

/// Sequences extended together: the CPU model with one KV cache per sequence
/// ([`CpuBatchDecoder`]), or the GPU engine (`gpu::decode::GpuBatchDecoder`).
pub trait BatchDecoder {
    /// Feeds `next[i]` to each sequence `i` of `active` (in that order); returns the logits of
    /// each one's last token, one row after another.
    fn step(&mut self, active: &[usize], next: &[Vec<u32>]) -> Result<Vec<f32>>;
    /// Tokens sequence `i` has been fed.
    fn fed(&self, i: usize) -> usize;
    /// The most tokens a sequence can hold.
    fn limit(&self) -> usize;
}

/// The CPU model: every step runs the active sequences through it together.
pub struct CpuBatchDecoder<'a> {
    model: &'a Model,
    opts: &'a ForwardOptions,
    caches: Vec<KvCache>,
}

impl<'a> CpuBatchDecoder<'a> {
    pub fn new(model: &'a Model, n: usize, opts: &'a ForwardOptions) -> Result<Self> {
        Ok(Self {
            model,
            opts,
            caches: (0..n)
                .map(|_| model.new_cache(opts))
                .collect::<Result<_>>()?,
        })
    }
}

impl BatchDecoder for CpuBatchDecoder<'_> {
    fn step(&mut self, active: &[usize], next: &[Vec<u32>]) -> Result<Vec<f32>> {
        let h = self.model.config.hidden;
        let seqs: Vec<SeqInput> = active.iter().map(|&i| SeqInput { ids: &next[i] }).collect();
        let mut sub: Vec<KvCache> = active
            .iter()
            .map(|&i| std::mem::take(&mut self.caches[i]))
            .collect();
        let hidden = self.model.forward(&seqs, Some(&mut sub), self.opts)?;
        for (&i, c) in active.iter().zip(sub) {
            self.caches[i] = c;
        }
        // the last row of every active sequence
        let mut last = Vec::with_capacity(active.len() * h);
        let mut row_end = 0;
        for &i in active {
            row_end += next[i].len();
            last.extend_from_slice(&hidden[(row_end - 1) * h..row_end * h]);
        }
        Ok(self.model.logits(&last, active.len(), self.opts))
    }

    fn fed(&self, i: usize) -> usize {
        self.caches[i].len
    }

    fn limit(&self) -> usize {
        self.model.config.max_positions
    }
}

/// One generator per sequence, each seeded by one draw from `shared`: a sequence's tokens
/// then depend on its own generator alone, not on which other sequences share its batch, its
/// rank (data parallel) or the batch size, and `shared` advances by `n` draws whatever
/// happens (so a checkpoint of it resumes the same samples).
pub fn row_rngs(shared: &mut Rng, n: usize) -> Vec<Rng> {
    (0..n).map(|_| Rng::new(shared.next_u64())).collect()
}

/// Sample one response per prompt (at most `params.max_new_tokens` tokens each) on the CPU,
/// prompt `i`'s tokens drawn from `rngs[i]` ([`row_rngs`]), so a run is reproducible.
pub fn sample_responses(
    model: &Model,
    prompts: &[&[u32]],
    params: &SamplingParams,
    stop: &[u32],
    rngs: &mut [Rng],
    opts: &ForwardOptions,
) -> Result<Vec<Response>> {
    let mut dec = CpuBatchDecoder::new(model, prompts.len(), opts)?;
    sample_responses_with(&mut dec, prompts, params, stop, rngs)
}

/// [`sample_responses`] on any [`BatchDecoder`] (fresh: nothing fed yet).
pub fn sample_responses_with(
    dec: &mut dyn BatchDecoder,
    prompts: &[&[u32]],
    params: &SamplingParams,
    stop: &[u32],
    rngs: &mut [Rng],
) -> Result<Vec<Response>> {
    let n = prompts.len();
    assert_eq!(rngs.len(), n, "one generator per prompt");
    let limit = dec.limit();
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
        active.retain(|&i| dec.fed(i) + next[i].len() <= limit);
        if active.is_empty() {
            break;
        }
        let logits = dec.step(&active, &next)?;
        let vocab = logits.len() / active.len();
        for (k, &i) in active.iter().enumerate() {
            let tok = choose(&logits[k * vocab..(k + 1) * vocab], params, &mut rngs[i]);
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

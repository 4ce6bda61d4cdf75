//! Text generation with the KV cache: greedy (temperature 0) or sampling with temperature,
//! top-k and top-p applied in transformers' order.

use crate::error::Result;
use crate::model::{ForwardOptions, Model, SeqInput};
use crate::rng::Rng;

#[derive(Clone, Debug)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
        }
    }
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    MaxTokens,
    ContextFull,
}

/// A model that extends one sequence a token (or a prompt) at a time, keeping what it has seen
/// (its KV cache): the CPU model ([`CpuDecoder`]) or the GPU engine (`gpu::decode`).
pub trait Decoder {
    /// Feeds `next` after everything fed before; returns the logits of its last token.
    fn step(&mut self, next: &[u32]) -> Result<Vec<f32>>;
    /// Tokens fed so far.
    fn fed(&self) -> usize;
    /// The most tokens it can hold.
    fn limit(&self) -> usize;
}

/// The CPU forward pass with its KV cache.
pub struct CpuDecoder<'a> {
    model: &'a Model,
    opts: &'a ForwardOptions,
    cache: Vec<crate::model::KvCache>,
}

impl<'a> CpuDecoder<'a> {
    pub fn new(model: &'a Model, opts: &'a ForwardOptions) -> Result<Self> {
        Ok(Self {
            model,
            opts,
            cache: vec![model.new_cache(opts)?],
        })
    }
}

impl Decoder for CpuDecoder<'_> {
    fn step(&mut self, next: &[u32]) -> Result<Vec<f32>> {
        let h = self.model.config.hidden;
        let hidden =
            self.model
                .forward(&[SeqInput { ids: next }], Some(&mut self.cache), self.opts)?;
        let last = &hidden[hidden.len() - h..];
        Ok(self.model.logits(last, 1, self.opts))
    }

    fn fed(&self) -> usize {
        self.cache[0].len
    }

    fn limit(&self) -> usize {
        self.model.config.max_positions
    }
}

/// Generate after `prompt`. `on_token` sees each new token as soon as it is chosen (for
/// streaming). The returned ids include the EOS token when one ended the text.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    params: &SamplingParams,
    eos: &[u32],
    rng: &mut Rng,
    opts: &ForwardOptions,
    on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, StopReason)> {
    let mut dec = CpuDecoder::new(model, opts)?;
    generate_with(&mut dec, prompt, params, eos, rng, on_token)
}

/// [`generate`] on any [`Decoder`] (a fresh one: nothing fed yet).
pub fn generate_with(
    dec: &mut dyn Decoder,
    prompt: &[u32],
    params: &SamplingParams,
    eos: &[u32],
    rng: &mut Rng,
    mut on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, StopReason)> {
    let mut out = Vec::new();
    let mut next: Vec<u32> = prompt.to_vec();
    for _ in 0..params.max_new_tokens {
        if dec.fed() + next.len() > dec.limit() {
            return Ok((out, StopReason::ContextFull));
        }
        let logits = dec.step(&next)?;
        let tok = choose(&logits, params, rng);
        out.push(tok);
        on_token(tok);
        if eos.contains(&tok) {
            return Ok((out, StopReason::Eos));
        }
        next = vec![tok];
    }
    Ok((out, StopReason::MaxTokens))
}

/// Where peft-generate runs: the CPU model (adapters loaded into it), or a GPU (a build with
/// the `cuda` or `cuda-sim` feature; adapters given as folders in the same order).
pub struct Generator<'m> {
    model: &'m Model,
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    gpu: Option<crate::gpu::decode::GpuGenerator>,
}

impl<'m> Generator<'m> {
    pub fn new(
        device: crate::gpu::DeviceSpec,
        model: &'m Model,
        adapter_dirs: &[std::path::PathBuf],
    ) -> Result<Self> {
        device.check_available()?;
        #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
        {
            let gpu = if device.is_gpu() {
                Some(crate::gpu::decode::GpuGenerator::new(
                    device,
                    model,
                    adapter_dirs,
                )?)
            } else {
                None
            };
            Ok(Self { model, gpu })
        }
        #[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
        {
            let _ = adapter_dirs;
            Ok(Self { model })
        }
    }

    /// [`generate`] with adapter `adapter` (its index among those loaded) or none.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &SamplingParams,
        eos: &[u32],
        rng: &mut Rng,
        adapter: Option<usize>,
        on_token: impl FnMut(u32),
    ) -> Result<(Vec<u32>, StopReason)> {
        #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
        if let Some(g) = &mut self.gpu {
            let max_len =
                (prompt.len() + params.max_new_tokens).min(self.model.config.max_positions);
            let mut dec = g.decoder(adapter, max_len.max(1))?;
            return generate_with(&mut dec, prompt, params, eos, rng, on_token);
        }
        let opts = ForwardOptions { adapter };
        generate(self.model, prompt, params, eos, rng, &opts, on_token)
    }

    /// Several prompts decoded together (one matrix product per layer for all of them, which
    /// on a CPU costs about what one sequence costs: the weights are read once per token).
    /// Prompt `i` samples from `rngs[i]` (`train::rollout::row_rngs`), so on a CPU it gets
    /// what [`Self::generate`] gives it alone with that generator, greedy or sampled, whatever
    /// the batch. A GPU steps the prompts together too (`GpuBatchDecoder`: one product per
    /// weight for all of them, attention per sequence).
    pub fn generate_batch(
        &mut self,
        prompts: &[&[u32]],
        params: &SamplingParams,
        eos: &[u32],
        rngs: &mut [Rng],
        adapter: Option<usize>,
    ) -> Result<Vec<(Vec<u32>, StopReason)>> {
        use crate::train::rollout::{sample_responses_with, CpuBatchDecoder};
        #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
        if let Some(g) = &mut self.gpu {
            let limit = self.model.config.max_positions;
            let mut dec = g.batch_decoder(adapter, prompts, params.max_new_tokens, limit)?;
            let out = sample_responses_with(&mut dec, prompts, params, eos, rngs)?;
            return Ok(with_stop_reasons(out, params));
        }
        let opts = ForwardOptions { adapter };
        let mut dec = CpuBatchDecoder::new(self.model, prompts.len(), &opts)?;
        let out = sample_responses_with(&mut dec, prompts, params, eos, rngs)?;
        Ok(with_stop_reasons(out, params))
    }
}

/// Why each batched response ended.
fn with_stop_reasons(
    out: Vec<crate::train::rollout::Response>,
    params: &SamplingParams,
) -> Vec<(Vec<u32>, StopReason)> {
    out.into_iter()
        .map(|r| {
            let reason = if r.stopped {
                StopReason::Eos
            } else if r.ids.len() < params.max_new_tokens {
                StopReason::ContextFull
            } else {
                StopReason::MaxTokens
            };
            (r.ids, reason)
        })
        .collect()
}

/// Pick the next token from one row of logits: candidates in descending order of logit / T
/// (ties: the lower id first), top-k and then top-p applied to that order, and the token where
/// the cumulative probability first exceeds a uniform draw.
///
/// Only the head of that order is ever sorted: blocks of the largest remaining logits are
/// selected (O(vocab)) and sorted until the draw is covered, which at any temperature is
/// usually the first few hundred of a 50k vocabulary; a whole-vocabulary sort per token made
/// sampling slower than the model's forward pass.
pub fn choose(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.temperature <= 0.0 {
        return argmax(logits);
    }
    let t = p.temperature;
    let scaled = |i: u32| logits[i as usize] / t;
    let order = |a: &u32, b: &u32| scaled(*b).total_cmp(&scaled(*a)).then(a.cmp(b));
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    if p.top_k > 0 && p.top_k < idx.len() {
        idx.select_nth_unstable_by(p.top_k - 1, order);
        idx.truncate(p.top_k);
    }
    let mut head = SortedHead {
        idx: &mut idx,
        sorted: 0,
    };
    let max = scaled(head.at(0, &order));
    let weight = |i: u32| ((scaled(i) - max) as f64).exp();
    let sum: f64 = head.idx.iter().map(|&i| weight(i)).sum();
    let n = head.idx.len();
    // top-p: the smallest prefix whose mass reaches top_p (at least one token)
    let (keep, mass) = if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = n;
        for j in 0..n {
            acc += weight(head.at(j, &order)) / sum;
            if acc >= p.top_p as f64 {
                keep = j + 1;
                break;
            }
        }
        let mass: f64 = (0..keep).map(|j| weight(head.at(j, &order)) / sum).sum();
        (keep, Some(mass))
    } else {
        (n, None)
    };
    let u = rng.uniform_f64();
    let mut acc = 0.0;
    for j in 0..keep {
        let i = head.at(j, &order);
        let pr = weight(i) / sum;
        acc += match mass {
            Some(m) => pr / m,
            None => pr,
        };
        if u < acc {
            return i;
        }
    }
    head.at(keep - 1, &order)
}

/// A candidate list whose first `sorted` entries are the largest, in order; more of it gets
/// sorted as positions past that are asked for.
struct SortedHead<'a> {
    idx: &'a mut Vec<u32>,
    sorted: usize,
}

impl SortedHead<'_> {
    fn at(&mut self, j: usize, order: &impl Fn(&u32, &u32) -> std::cmp::Ordering) -> u32 {
        while j >= self.sorted {
            let rest = &mut self.idx[self.sorted..];
            // 256 first, then doubling: what was sorted so far
            let block = self.sorted.max(256).min(rest.len());
            if block < rest.len() {
                rest.select_nth_unstable_by(block - 1, order);
            }
            rest[..block].sort_unstable_by(order);
            self.sorted += block;
        }
        self.idx[j]
    }
}

pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Token ids that end generation: generation_config.json's `eos_token_id` (one id or a
/// list), else config.json's, plus the tokenizer's EOS token.
pub fn stop_tokens(
    dir: &std::path::Path,
    config: &crate::model::ModelConfig,
    tok: &crate::tokenizer::TextTokenizer,
) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    let mut ids: Vec<u32> = Vec::new();
    if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|e| crate::Error::io(&path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| crate::Error::bad_input(&path, format!("invalid JSON: {e}")))?;
        match v.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => {
                ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
            }
            Some(x) => ids.extend(x.as_u64().map(|x| x as u32)),
            None => {}
        }
    }
    if ids.is_empty() {
        ids.extend(&config.eos_token_ids);
    }
    if let Some(e) = tok.eos_id() {
        if !ids.contains(&e) {
            ids.push(e);
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The straightforward sampler: the whole vocabulary sorted for every token.
    fn choose_by_full_sort(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|v| *v /= sum);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &v) in probs.iter().enumerate() {
                acc += v;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|v| *v /= s);
        }
        let u = rng.uniform_f64();
        let mut acc = 0.0;
        for (c, pr) in cand.iter().zip(&probs) {
            acc += pr;
            if u < acc {
                return c.0;
            }
        }
        cand.last().map(|c| c.0).unwrap_or(0)
    }

    /// Sorting only the head of the order draws the same tokens as sorting everything, for
    /// every filter, flat and peaked distributions, and ties.
    #[test]
    fn partial_sort_draws_what_the_full_sort_draws() {
        let mut gen = Rng::new(7);
        for case in 0..60 {
            let vocab = [5, 300, 3000, 49152][case % 4];
            let spread = [0.1f32, 1.0, 4.0][case % 3];
            let logits: Vec<f32> = (0..vocab)
                .map(|i| {
                    if case % 5 == 0 && i % 7 == 0 {
                        1.5 // ties
                    } else {
                        gen.normal() * spread
                    }
                })
                .collect();
            let p = SamplingParams {
                max_new_tokens: 1,
                temperature: [0.7, 1.0, 1.3][case % 3],
                top_k: [0, 0, 3, 50, 1000][case % 5],
                top_p: [1.0, 0.9, 0.5, 0.999][case % 4],
            };
            let (mut a, mut b) = (Rng::new(case as u64), Rng::new(case as u64));
            for _ in 0..40 {
                assert_eq!(
                    choose(&logits, &p, &mut a),
                    choose_by_full_sort(&logits, &p, &mut b),
                    "case {case}"
                );
            }
        }
    }

    #[test]
    fn greedy_and_filters() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let mut rng = Rng::new(1);
        assert_eq!(choose(&logits, &SamplingParams::default(), &mut rng), 1);
        // top_k = 1 at any temperature is greedy.
        let p = SamplingParams {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(choose(&logits, &p, &mut rng), 1);
        }
        // top_p small keeps only the best token.
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.1,
            ..Default::default()
        };
        assert_eq!(choose(&logits, &p, &mut rng), 1);
        // Sampling follows the softmax roughly.
        let p = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let n = 20000;
        let ones = (0..n)
            .filter(|_| choose(&logits, &p, &mut rng) == 1)
            .count();
        let want = 3f64.exp() / (1f64.exp() + 3f64.exp() + 2f64.exp() + (-1f64).exp());
        assert!((ones as f64 / n as f64 - want).abs() < 0.02);
    }
}

//! Loss, perplexity and per-token log-probabilities of texts under a model.

use crate::error::Result;
use crate::gpu::DeviceSpec;
use crate::model::{ForwardOptions, Model, SeqInput};
use crate::progress::Progress;
use crate::tokenizer::TextTokenizer;
use serde::Serialize;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Samples longer than this are truncated (counted in the report).
    pub max_len: usize,
    /// Tokens per forward pass (several samples share one pass).
    pub batch_tokens: usize,
    pub per_token: bool,
    pub forward: ForwardOptions,
}

#[derive(Clone, Debug, Serialize)]
pub struct SampleResult {
    pub token_ids: Vec<u32>,
    /// log p(token_i | tokens_<i) for i ≥ 1.
    pub logprobs: Vec<f32>,
    pub nll: f64,
    pub tokens: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    /// Mean negative log-likelihood per predicted token over all samples.
    pub loss: f64,
    pub perplexity: f64,
    /// Predicted tokens (each sample contributes its length − 1).
    pub tokens: usize,
    pub samples: usize,
    pub truncated: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_sample: Option<Vec<SampleResult>>,
}

/// What [`evaluate_with`] needs of a model: the log-probabilities of every token after the
/// first of each sequence, concatenated in order.
pub type Scorer<'a> = Box<dyn FnMut(&[&[u32]]) -> Result<Vec<f32>> + 'a>;

/// The CPU forward pass (with the adapter `forward` names, if any).
pub fn cpu_scorer<'a>(model: &'a Model, forward: &'a ForwardOptions) -> Scorer<'a> {
    Box::new(move |seqs: &[&[u32]]| {
        let inputs: Vec<SeqInput> = seqs.iter().map(|&ids| SeqInput { ids }).collect();
        let hidden = model.forward(&inputs, None, forward)?;
        let mut targets = Vec::new();
        let mut row = 0;
        for ids in seqs {
            for k in 0..ids.len().saturating_sub(1) {
                targets.push((row + k, ids[k + 1]));
            }
            row += ids.len();
        }
        Ok(model.target_logprobs(&hidden, &targets, forward))
    })
}

/// The GPU engine's forward pass (`--device cuda:N`, or the simulator), with the adapter
/// folder `adapter` (any PEFT type peft-eval loads) or none. A build without GPU support says so.
pub fn gpu_scorer<'a>(
    device: DeviceSpec,
    model: &'a Model,
    adapter: Option<&Path>,
) -> Result<Scorer<'a>> {
    device.check_available()?;
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    {
        use crate::train::params::TrainState;
        let state = match adapter {
            Some(dir) => crate::train::lora::load_any_adapter(dir, model)?.0,
            None => TrainState::new(model.linears().len()),
        };
        let gpu = crate::gpu::device::Gpu::open(device)?;
        crate::cli::info(format!("evaluating on {} ({device})", gpu.name()));
        let mut engine = crate::gpu::engine::GpuEngine::for_eval(gpu, model, &state)?;
        Ok(Box::new(move |seqs: &[&[u32]]| {
            engine.token_logprobs(&state, seqs)
        }))
    }
    #[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
    {
        let _ = (model, adapter);
        unreachable!("check_available refuses a GPU in a build without the features")
    }
}

pub fn evaluate(
    model: &Model,
    tok: &TextTokenizer,
    texts: &[String],
    opts: &EvalOptions,
    progress: &Progress,
) -> Result<EvalReport> {
    evaluate_with(tok, texts, opts, progress, cpu_scorer(model, &opts.forward))
}

/// [`evaluate`] with the log-probabilities from `score` (a CPU or GPU [`Scorer`]).
pub fn evaluate_with(
    tok: &TextTokenizer,
    texts: &[String],
    opts: &EvalOptions,
    progress: &Progress,
    mut score: Scorer,
) -> Result<EvalReport> {
    let start = std::time::Instant::now();
    let mut truncated = 0;
    let mut encoded = Vec::with_capacity(texts.len());
    for t in texts {
        let mut ids = tok.encode(t)?;
        if ids.len() > opts.max_len {
            ids.truncate(opts.max_len);
            truncated += 1;
        }
        encoded.push(ids);
    }
    let total_tokens: usize = encoded.iter().map(Vec::len).sum();
    let bar = progress.bar(total_tokens as u64, "eval");
    let mut results: Vec<SampleResult> = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        // Fill one forward pass with whole samples up to the token budget.
        let mut j = i;
        let mut budget = 0;
        while j < encoded.len() && (j == i || budget + encoded[j].len() <= opts.batch_tokens) {
            budget += encoded[j].len();
            j += 1;
        }
        let seqs: Vec<&[u32]> = encoded[i..j].iter().map(|ids| &ids[..]).collect();
        let lps = score(&seqs)?;
        let mut off = 0;
        for ids in &encoded[i..j] {
            let n = ids.len().saturating_sub(1);
            let lp = lps[off..off + n].to_vec();
            off += n;
            let nll = -lp.iter().map(|&v| v as f64).sum::<f64>();
            results.push(SampleResult {
                token_ids: ids.clone(),
                logprobs: lp,
                nll,
                tokens: n,
            });
        }
        bar.inc(budget as u64);
        i = j;
    }
    bar.finish();
    let tokens: usize = results.iter().map(|r| r.tokens).sum();
    let nll: f64 = results.iter().map(|r| r.nll).sum();
    let loss = if tokens > 0 {
        nll / tokens as f64
    } else {
        f64::NAN
    };
    let seconds = start.elapsed().as_secs_f64();
    Ok(EvalReport {
        loss,
        perplexity: loss.exp(),
        tokens,
        samples: results.len(),
        truncated,
        seconds,
        tokens_per_second: total_tokens as f64 / seconds.max(1e-9),
        per_sample: opts.per_token.then_some(results),
    })
}

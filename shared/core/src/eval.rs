//! Loss, perplexity and per-token log-probabilities of texts under a model.

use crate::error::Result;
use crate::model::{ForwardOptions, Model, SeqInput};
use crate::progress::Progress;
use crate::tokenizer::TextTokenizer;
use serde::Serialize;

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

pub fn evaluate(
    model: &Model,
    tok: &TextTokenizer,
    texts: &[String],
    opts: &EvalOptions,
    progress: &Progress,
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
        let seqs: Vec<SeqInput> = encoded[i..j].iter().map(|ids| SeqInput { ids }).collect();
        let hidden = model.forward(&seqs, None, &opts.forward)?;
        let mut targets = Vec::new();
        let mut row = 0;
        for ids in &encoded[i..j] {
            for k in 0..ids.len().saturating_sub(1) {
                targets.push((row + k, ids[k + 1]));
            }
            row += ids.len();
        }
        let lps = model.target_logprobs(&hidden, &targets, &opts.forward);
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

//! GRPO's update objective on the engine's hidden states: the clipped surrogate of every
//! counted completion token with its group-relative advantage, plus β·KL to the reference
//! ([`super::grpo_math::grpo_loss`]), through the LM head at the sampling temperature.
//!
//! Per sequence (prompt + completion), completion token t is predicted from hidden row
//! prompt_len + t − 1. Tokens outside the mask (a truncated completion under
//! `--mask-truncated`) are not even run through the head.

use super::engine::{Objective, ObjectiveCtx, StepStats};
use super::grpo_math::{
    grpo_loss, high_entropy, CompletionTokens, GrpoLoss, LossOutput, StepShare,
};
use super::params::TrainState;
use super::policy_head;
use crate::error::{Error, Result};

/// What one completion of a GRPO micro-batch carries from its rollout.
#[derive(Clone, Debug)]
pub struct GrpoSeq {
    /// Tokens of the prompt; the completion follows it in the batch's ids.
    pub prompt_len: usize,
    /// Per completion token: whether it counts.
    pub mask: Vec<bool>,
    pub advantage: f64,
    /// Log-probs at sampling time (None: the current ones, detached: ratio 1).
    pub old_logp: Option<Vec<f64>>,
    /// Log-probs under the reference (when β ≠ 0).
    pub ref_logp: Option<Vec<f64>>,
}

pub struct GrpoObjective {
    pub seqs: Vec<GrpoSeq>,
    pub loss: GrpoLoss,
    pub share: StepShare,
    /// Sampling temperature the log-probabilities are taken at.
    pub temperature: f32,
    /// Filled by `apply`: the loss, its gradient and the metrics.
    pub out: LossOutput,
    /// Per sequence, per completion token: the current log-probs (0 where not counted).
    pub logp: Vec<Vec<f64>>,
    /// Σ over the counted tokens of the entropy of the policy's (tempered) distribution.
    pub entropy_sum: f64,
}

impl GrpoObjective {
    pub fn new(seqs: Vec<GrpoSeq>, loss: GrpoLoss, share: StepShare, temperature: f32) -> Self {
        Self {
            seqs,
            loss,
            share,
            temperature,
            out: LossOutput::default(),
            logp: Vec::new(),
            entropy_sum: 0.0,
        }
    }
}

impl Objective for GrpoObjective {
    fn apply(
        &mut self,
        ctx: &ObjectiveCtx,
        state: &mut TrainState,
        dh: &mut [f32],
    ) -> Result<StepStats> {
        if self.seqs.len() != ctx.batch.ids.len() {
            return Err(Error::usage("internal: GRPO batch and rollouts disagree"));
        }
        // rows of the counted tokens, and where each lands in its sequence
        let mut rows = Vec::new();
        let mut at = Vec::new();
        for (k, ((ids, &(first, _)), s)) in ctx
            .batch
            .ids
            .iter()
            .zip(&ctx.seq_rows)
            .zip(&self.seqs)
            .enumerate()
        {
            if s.prompt_len == 0 || s.prompt_len + s.mask.len() != ids.len() {
                return Err(Error::usage(
                    "internal: GRPO completion positions do not fit the sequence",
                ));
            }
            for (t, &m) in s.mask.iter().enumerate() {
                if m {
                    rows.push((first + s.prompt_len + t - 1, ids[s.prompt_len + t]));
                    at.push((k, t));
                }
            }
        }
        let scale = policy_head::logit_scale(self.temperature);
        let (flat, entropy) = policy_head::rows_logp_entropy(ctx, &rows, scale, true)?;
        self.entropy_sum = entropy.iter().sum();
        let mut logp: Vec<Vec<f64>> = self.seqs.iter().map(|s| vec![0.0; s.mask.len()]).collect();
        for (&(k, t), &v) in at.iter().zip(&flat) {
            logp[k][t] = v;
        }
        // --top-entropy-quantile: the policy term of the micro-batch's high-entropy tokens only
        let policy_mask: Option<Vec<Vec<bool>>> =
            (self.loss.top_entropy_quantile < 1.0).then(|| {
                let high = high_entropy(&entropy, self.loss.top_entropy_quantile);
                let mut m: Vec<Vec<bool>> = self
                    .seqs
                    .iter()
                    .map(|s| vec![false; s.mask.len()])
                    .collect();
                for (&(k, t), &h) in at.iter().zip(&high) {
                    m[k][t] = h;
                }
                m
            });
        let tokens: Vec<CompletionTokens> = self
            .seqs
            .iter()
            .zip(&logp)
            .enumerate()
            .map(|(k, (s, lp))| CompletionTokens {
                logp: lp,
                old_logp: s.old_logp.as_deref(),
                ref_logp: s.ref_logp.as_deref(),
                mask: &s.mask,
                policy_mask: policy_mask.as_ref().map(|m| m[k].as_slice()),
                advantage: s.advantage,
            })
            .collect();
        if self.loss.beta != 0.0 && tokens.iter().any(|t| t.ref_logp.is_none()) {
            return Err(Error::usage(
                "internal: GRPO's KL needs the reference log-probs",
            ));
        }
        let mut out = grpo_loss(&self.loss, &tokens, self.share);
        // The entropy bonus (TRL's entropy_coef): − coef · the mean entropy of the tokens the
        // policy term acts on, per micro-batch, / micro-batches.
        let coef = self.loss.entropy_coef;
        let dentropy: Option<Vec<f32>> = (coef != 0.0).then(|| {
            let on: Vec<bool> = at
                .iter()
                .map(|&(k, t)| policy_mask.as_ref().is_none_or(|m| m[k][t]))
                .collect();
            let n = on.iter().filter(|&&o| o).count().max(1) as f64;
            let ga = self.share.grad_accum.max(1) as f64;
            let sum: f64 = entropy
                .iter()
                .zip(&on)
                .filter(|(_, &o)| o)
                .map(|(e, _)| e)
                .sum();
            out.loss -= coef * sum / n / ga;
            let d = (-coef / (n * ga)) as f32;
            on.iter().map(|&o| if o { d } else { 0.0 }).collect()
        });
        if ctx.backward {
            let dlogp: Vec<f32> = at.iter().map(|&(k, t)| out.grad[k][t] as f32).collect();
            policy_head::rows_logp_backward(
                ctx,
                state,
                &rows,
                self.temperature,
                (&dlogp, dentropy.as_deref()),
                dh,
            )?;
        }
        let stats = StepStats {
            nll_sum: out.loss,
            loss_tokens: rows.len(),
        };
        self.out = out;
        self.logp = logp;
        Ok(stats)
    }
}

//! PPO's update objective on the engine's hidden states: the clipped policy loss over response
//! tokens plus the clipped value loss of a value head on the same backbone (TRL ≤ 0.11's
//! `AutoModelForCausalLMWithValueHead` layout: `v_head.summary` Linear(hidden → 1) with bias).
//!
//! Per sequence (query + response), response token t is predicted from hidden row t − 1, and
//! its value is read on that same row (TRL PPOv2: `full_value[:, context_length − 1 : −1]`).
//! A sequence may carry one position more than its response (PPOv2's terminal position one
//! past the last token, where the score lands): it has a value (read on the last row) but no
//! token, and its policy mask is false.
//!
//! Log-probabilities are of the logits divided by the sampling temperature, as PPOv2 computes
//! them (`logits / (temperature + 1e-7)`), so that the ratio compares the distributions the
//! responses were sampled from.

use super::engine::{Objective, ObjectiveCtx, StepStats};
use super::params::{Slot, TrainState};
use super::policy_head;
use super::ppo_math::{policy_loss, value_loss};
pub use super::rollout_eval::RolloutEval;
use crate::error::{Error, Result};

/// What one sequence of a PPO mini-batch carries from its rollout.
#[derive(Clone, Debug)]
pub struct RolloutSeq {
    /// Tokens of the query (prompt); the response follows it in the batch's ids.
    pub query_len: usize,
    /// Per response position: log-prob at rollout time, value at rollout time, advantage,
    /// return; `policy_mask` counts a position in the policy loss, `value_mask` in the value
    /// loss (TRL masks the value one position later).
    pub old_logp: Vec<f64>,
    pub old_value: Vec<f64>,
    pub advantage: Vec<f64>,
    pub returns: Vec<f64>,
    pub policy_mask: Vec<bool>,
    pub value_mask: Vec<bool>,
}

pub struct PpoObjective {
    pub seqs: Vec<RolloutSeq>,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    /// Scales the whole loss (1 / micro-batches accumulated).
    pub loss_scale: f32,
    /// Sampling temperature the log-probabilities are taken at.
    pub temperature: f32,
    /// Legacy TRL's `ratio_threshold`: when the mean ratio over the counted positions exceeds
    /// it, the batch adds no gradient (`skipped` is set).
    pub ratio_threshold: Option<f64>,
    pub skipped: bool,
    /// Mean of the ratio π/π_old over the counted positions.
    pub mean_ratio: f64,
    /// Filled by `apply`.
    pub pg_loss: f64,
    pub vf_loss: f64,
    pub clipfrac: f64,
    pub vf_clipfrac: f64,
    pub approx_kl: f64,
    /// Per response position, sequence after sequence: the current log-probs and values (the
    /// rollout's "old" ones when run in evaluation mode).
    pub logp: Vec<f64>,
    pub values: Vec<f64>,
}

impl PpoObjective {
    pub fn new(seqs: Vec<RolloutSeq>, cliprange: f64, cliprange_value: f64, vf_coef: f64) -> Self {
        Self {
            seqs,
            cliprange,
            cliprange_value,
            vf_coef,
            loss_scale: 1.0,
            temperature: 1.0,
            ratio_threshold: None,
            skipped: false,
            mean_ratio: 1.0,
            pg_loss: 0.0,
            vf_loss: 0.0,
            clipfrac: 0.0,
            vf_clipfrac: 0.0,
            approx_kl: 0.0,
            logp: Vec::new(),
            values: Vec::new(),
        }
    }
}

impl Objective for PpoObjective {
    fn apply(
        &mut self,
        ctx: &ObjectiveCtx,
        state: &mut TrainState,
        dh: &mut [f32],
    ) -> Result<StepStats> {
        let m = ctx.model;
        let c = &m.config;
        let h = c.hidden;
        if self.seqs.len() != ctx.batch.ids.len() {
            return Err(Error::usage(
                "internal: PPO batch and rollout data disagree",
            ));
        }
        let (wv, bv) = match (&state.value_head, &state.value_bias) {
            (Some(w), Some(b)) => (w.clone(), *b),
            _ => return Err(Error::usage("internal: no value head")),
        };
        // rows: (hidden row, target token) for every response position, sequence by sequence
        let mut rows = Vec::new();
        for ((ids, &(first, _)), s) in ctx.batch.ids.iter().zip(&ctx.seq_rows).zip(&self.seqs) {
            if s.query_len == 0 || s.query_len + s.old_logp.len() > ids.len() + 1 {
                return Err(Error::usage(
                    "internal: PPO rollout positions do not fit the sequence",
                ));
            }
            for t in 0..s.old_logp.len() {
                let pos = s.query_len + t;
                // the terminal position has no token: any target, its policy mask is false
                rows.push((first + pos - 1, ids.get(pos).copied().unwrap_or(0)));
            }
        }
        let logp = policy_head::rows_logp(ctx, &rows, self.temperature)?;
        let vpred: Vec<f64> = rows
            .iter()
            .map(|&(r, _)| {
                let x = &ctx.hidden[r * h..(r + 1) * h];
                x.iter().zip(&wv).map(|(a, b)| (a * b) as f64).sum::<f64>() + bv as f64
            })
            .collect();
        let cat = |f: &dyn Fn(&RolloutSeq) -> Vec<f64>| -> Vec<f64> {
            self.seqs.iter().flat_map(f).collect()
        };
        let catb = |f: &dyn Fn(&RolloutSeq) -> Vec<bool>| -> Vec<bool> {
            self.seqs.iter().flat_map(f).collect()
        };
        let old_logp = cat(&|s| s.old_logp.clone());
        let old_value = cat(&|s| s.old_value.clone());
        let adv = cat(&|s| s.advantage.clone());
        let ret = cat(&|s| s.returns.clone());
        let pmask = catb(&|s| s.policy_mask.clone());
        let vmask = catb(&|s| s.value_mask.clone());
        let pg = policy_loss(&logp, &old_logp, &adv, &pmask, self.cliprange);
        let vf = value_loss(
            &vpred,
            &old_value,
            &ret,
            &vmask,
            self.cliprange_value,
            self.vf_coef,
        );
        self.pg_loss = pg.loss;
        self.vf_loss = vf.loss;
        self.clipfrac = pg.clipfrac;
        self.vf_clipfrac = vf.clipfrac;
        self.approx_kl = pg.approx_kl;
        let counted = pmask.iter().filter(|&&x| x).count().max(1) as f64;
        self.mean_ratio = logp
            .iter()
            .zip(&old_logp)
            .zip(&pmask)
            .filter(|(_, &k)| k)
            .map(|((a, b), _)| (a - b).exp())
            .sum::<f64>()
            / counted;
        self.skipped = self.ratio_threshold.is_some_and(|r| self.mean_ratio > r);
        self.logp = logp;
        self.values = vpred;
        if ctx.backward && !self.skipped {
            let scale = self.loss_scale;
            let dlogp: Vec<f32> = pg.grad.iter().map(|g| *g as f32 * scale).collect();
            policy_head::rows_logp_backward(
                ctx,
                state,
                &rows,
                self.temperature,
                (&dlogp, None),
                dh,
            )?;
            let mut gw = vec![0f32; h];
            let mut gb = 0f32;
            for (&(r, _), &g) in rows.iter().zip(&vf.grad) {
                let g = g as f32 * scale;
                if g == 0.0 {
                    continue;
                }
                let x = &ctx.hidden[r * h..(r + 1) * h];
                dh[r * h..(r + 1) * h]
                    .iter_mut()
                    .zip(&wv)
                    .for_each(|(d, w)| *d += g * w);
                gw.iter_mut().zip(x).for_each(|(a, b)| *a += g * b);
                gb += g;
            }
            if let Some(g) = state.grad_mut(Slot::ValueHead) {
                g.iter_mut().zip(&gw).for_each(|(a, b)| *a += b);
            }
            if let Some(g) = state.grad_mut(Slot::ValueBias) {
                g[0] += gb;
            }
        }
        Ok(StepStats {
            nll_sum: pg.loss + vf.loss,
            loss_tokens: rows.len(),
        })
    }
}

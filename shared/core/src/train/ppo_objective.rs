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
use super::loss;
use super::params::{Slot, TrainState};
use super::ppo_math::{policy_loss, value_loss};
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
        // logits / T = (hidden / T) · Wᵀ: the tempered rows, and dh scaled back by 1/T
        let inv_t = 1.0 / (self.temperature + 1e-7);
        let tempered: Option<Vec<f32>> =
            (self.temperature != 1.0).then(|| ctx.hidden.iter().map(|x| x * inv_t).collect());
        let head_in = tempered.as_deref().unwrap_or(ctx.hidden);
        let mut nll = vec![0f64; rows.len()];
        // On a device (the GPU engine) the LM head runs where the hidden states are.
        let device_inv_t = if tempered.is_some() { inv_t } else { 1.0 };
        match ctx.rows_ce {
            Some(ce) => ce.run(&rows, device_inv_t, &|_| 0.0, None, &mut nll, None)?,
            None => loss::cross_entropy_rows(
                head_in,
                h,
                loss::Head::of(m, ctx.head_pack),
                c.vocab,
                &rows,
                &|_| 0.0,
                None,
                None,
                &mut nll,
            ),
        }
        let logp: Vec<f64> = nll.iter().map(|l| -l).collect();
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
            // d loss / d nll_row = −d loss / d logp_row
            let row_scale: Vec<f32> = pg.grad.iter().map(|g| -(*g as f32) * scale).collect();
            let head_slot = Slot::lm_head(m);
            let dw = state.grad_mut(head_slot).map(|g| &mut g[..]);
            if let Some(ce) = ctx.rows_ce {
                // the device engine never trains the head here (LoRA/DoRA only)
                ce.run(
                    &rows,
                    device_inv_t,
                    &|i| row_scale[i],
                    Some(dh),
                    &mut nll,
                    None,
                )?;
            } else if tempered.is_some() {
                let mut dht = vec![0f32; dh.len()];
                loss::cross_entropy_rows(
                    head_in,
                    h,
                    loss::Head::of(m, ctx.head_pack),
                    c.vocab,
                    &rows,
                    &|i| row_scale[i],
                    Some(&mut dht),
                    dw,
                    &mut nll,
                );
                dh.iter_mut().zip(&dht).for_each(|(d, g)| *d += g * inv_t);
            } else {
                loss::cross_entropy_rows(
                    ctx.hidden,
                    h,
                    loss::Head::of(m, ctx.head_pack),
                    c.vocab,
                    &rows,
                    &|i| row_scale[i],
                    Some(dh),
                    dw,
                    &mut nll,
                );
            }
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

/// Evaluation pass over rollouts (no gradient): per response token its log-probability at the
/// sampling temperature and the entropy of that tempered distribution, and per position (one
/// more when `terminal`) the value head's output when the state has one. Used for the
/// policy's "old" values, the reference's log-probabilities and the logged entropy.
pub struct RolloutEval {
    /// Per sequence: query tokens, response tokens, whether a terminal position follows.
    pub seqs: Vec<(usize, usize, bool)>,
    pub temperature: f32,
    pub entropy: bool,
    /// Filled by `apply`, one entry per sequence.
    pub logp: Vec<Vec<f64>>,
    pub entropies: Vec<Vec<f64>>,
    pub values: Vec<Vec<f64>>,
}

impl RolloutEval {
    pub fn new(seqs: Vec<(usize, usize, bool)>, temperature: f32, entropy: bool) -> Self {
        Self {
            seqs,
            temperature,
            entropy,
            logp: Vec::new(),
            entropies: Vec::new(),
            values: Vec::new(),
        }
    }
}

impl Objective for RolloutEval {
    fn apply(
        &mut self,
        ctx: &ObjectiveCtx,
        state: &mut TrainState,
        _dh: &mut [f32],
    ) -> Result<StepStats> {
        let m = ctx.model;
        let (h, vocab) = (m.config.hidden, m.config.vocab);
        let inv_t = 1.0 / (self.temperature as f64 + 1e-7);
        let mut rows = Vec::new();
        for ((ids, &(first, _)), &(q, r, _)) in
            ctx.batch.ids.iter().zip(&ctx.seq_rows).zip(&self.seqs)
        {
            if q == 0 || q + r > ids.len() {
                return Err(Error::usage("internal: rollout lengths do not fit"));
            }
            for t in 0..r {
                rows.push((first + q + t - 1, ids[q + t]));
            }
        }
        let (logp, ent) = match ctx.rows_ce {
            // On a device (the GPU engine): the LM head runs where the hidden states are.
            Some(ce) => {
                let mut nll = vec![0f64; rows.len()];
                let mut ent = vec![0f64; rows.len()];
                let want = self.entropy.then_some(&mut ent[..]);
                ce.run(&rows, inv_t as f32, &|_| 0.0, None, &mut nll, want)?;
                (nll.iter().map(|l| -l).collect::<Vec<f64>>(), ent)
            }
            None => tempered_logp_entropy(ctx, &rows, h, vocab, inv_t, self.entropy),
        };
        let (mut k, mut lp, mut en, mut vals) = (0, Vec::new(), Vec::new(), Vec::new());
        for (&(first, _), &(q, r, terminal)) in ctx.seq_rows.iter().zip(&self.seqs) {
            lp.push(logp[k..k + r].to_vec());
            en.push(ent[k..k + r].to_vec());
            k += r;
            if let (Some(w), Some(b)) = (&state.value_head, state.value_bias) {
                let n = r + usize::from(terminal);
                vals.push(
                    (0..n)
                        .map(|t| {
                            let row = first + q + t - 1;
                            let x = &ctx.hidden[row * h..(row + 1) * h];
                            x.iter().zip(w).map(|(a, b)| (a * b) as f64).sum::<f64>() + b as f64
                        })
                        .collect(),
                );
            }
        }
        self.logp = lp;
        self.entropies = en;
        self.values = vals;
        Ok(StepStats {
            nll_sum: -logp.iter().sum::<f64>(),
            loss_tokens: rows.len(),
        })
    }
}

/// log softmax(z)[target] and the entropy of softmax(z), z = (h · Wᵀ) · inv_t, per row, in
/// chunks so that the logits of a whole batch never exist at once.
fn tempered_logp_entropy(
    ctx: &ObjectiveCtx,
    rows: &[(usize, u32)],
    h: usize,
    vocab: usize,
    inv_t: f64,
    want_entropy: bool,
) -> (Vec<f64>, Vec<f64>) {
    use rayon::prelude::*;
    const CHUNK: usize = 128;
    let mut logp = Vec::with_capacity(rows.len());
    let mut ent = Vec::with_capacity(rows.len());
    let mut x = vec![0f32; CHUNK.min(rows.len().max(1)) * h];
    let mut logits = vec![0f32; CHUNK.min(rows.len().max(1)) * vocab];
    for chunk in rows.chunks(CHUNK) {
        let n = chunk.len();
        for (i, &(r, _)) in chunk.iter().enumerate() {
            x[i * h..(i + 1) * h].copy_from_slice(&ctx.hidden[r * h..(r + 1) * h]);
        }
        let lg = &mut logits[..n * vocab];
        loss::Head::of(ctx.model, ctx.head_pack).logits(&x[..n * h], lg, n, vocab, h);
        let out: Vec<(f64, f64)> = lg
            .par_chunks(vocab)
            .zip(chunk.par_iter())
            .map(|(row, &(_, t))| {
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64 * inv_t;
                let mut sum = 0f64;
                let mut zsum = 0f64;
                for &v in row {
                    let z = v as f64 * inv_t;
                    let e = (z - max).exp();
                    sum += e;
                    if want_entropy {
                        zsum += e * z;
                    }
                }
                let lse = max + sum.ln();
                let lp = row[t as usize] as f64 * inv_t - lse;
                (lp, if want_entropy { lse - zsum / sum } else { 0.0 })
            })
            .collect();
        for (a, b) in out {
            logp.push(a);
            ent.push(b);
        }
    }
    (logp, ent)
}

//! Evaluation passes over sampled rollouts (no gradient): per response token its
//! log-probability at the sampling temperature (and the entropy of that distribution, and the
//! value head's output when the state has one), under the policy, a frozen starting adapter, or
//! the base with the adapters off. PPO takes its "old" log-probs, values and the reference from
//! these; GRPO its reference and, with several iterations per batch, its "old" log-probs.

use super::backend::Backend;
use super::engine::{Batch, Engine, Objective, ObjectiveCtx, StepStats};
use super::loss;
use super::params::TrainState;
use crate::error::{Error, Result};
use crate::kernels::gemm;
use crate::model::Model;
use crate::rng::Rng;

/// Which adapters a rollout evaluation runs with.
pub enum Under<'a> {
    /// The policy's (its log-probabilities, values and entropies).
    Policy,
    /// The reference when it is the starting adapter, frozen: its own state.
    FrozenStart(&'a mut TrainState),
    /// The reference when it is the bare base: the policy with its adapters switched off (the
    /// state is the adapter-less one the CPU runs).
    AdaptersOff(&'a mut TrainState),
}

/// Per-token log-probs (and values, entropies) of `resp` after `queries` under the policy
/// `state` or the reference.
#[allow(clippy::too_many_arguments)]
pub fn eval_rollouts(
    backend: &mut Backend,
    model: &Model,
    head: &gemm::PackedWeight,
    state: &mut TrainState,
    mut under: Under,
    seqs: &[Vec<u32>],
    shape: &[(usize, usize, bool)],
    (temperature, entropy): (f32, bool),
    batch: usize,
) -> Result<RolloutEval> {
    let engine = Engine::for_eval(model).with_head_pack(head);
    let mut all = RolloutEval::new(Vec::new(), temperature, entropy);
    for (chunk, sh) in seqs.chunks(batch.max(1)).zip(shape.chunks(batch.max(1))) {
        let labels: Vec<Vec<i32>> = chunk.iter().map(|s| vec![-100; s.len()]).collect();
        let b = Batch {
            ids: chunk.iter().map(Vec::as_slice).collect(),
            labels: labels.iter().map(Vec::as_slice).collect(),
        };
        let mut obj = RolloutEval::new(sh.to_vec(), temperature, entropy);
        let mut rng = Rng::new(0);
        match &mut under {
            Under::Policy => backend
                .forward_backward_with(&engine, model, state, &b, &mut rng, false, &mut obj)?,
            Under::FrozenStart(reference) => backend
                .forward_backward_with(&engine, model, reference, &b, &mut rng, false, &mut obj)?,
            Under::AdaptersOff(base) => {
                backend.reference_with(&engine, model, base, state, &b, &mut obj)?
            }
        };
        all.logp.extend(obj.logp);
        all.entropies.extend(obj.entropies);
        all.values.extend(obj.values);
    }
    Ok(all)
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

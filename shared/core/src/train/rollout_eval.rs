//! Evaluation passes over sampled rollouts (no gradient): per response token its
//! log-probability at the sampling temperature (and the entropy of that distribution, and the
//! value head's output when the state has one), under the policy, a frozen starting adapter, or
//! the base with the adapters off. PPO takes its "old" log-probs, values and the reference from
//! these; GRPO its reference and, with several iterations per batch, its "old" log-probs.

use super::backend::Backend;
use super::engine::{Batch, Engine, Objective, ObjectiveCtx, StepStats};
use super::params::TrainState;
use super::policy_head;
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
        let h = m.config.hidden;
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
        let (logp, ent) = policy_head::rows_logp_entropy(ctx, &rows, inv_t, self.entropy)?;
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

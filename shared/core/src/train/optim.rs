//! AdamW (torch.optim.AdamW's arithmetic), learning-rate schedules (transformers' semantics)
//! and gradient-norm clipping (torch.nn.utils.clip_grad_norm_).

use super::params::{Slot, TrainState};
use crate::model::Model;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamW {
    /// One update with learning rate `lr` at optimizer step `step` (1-based).
    pub fn step(&self, state: &mut TrainState, model: &mut Model, lr: f32, step: u64) {
        self.step_where(state, model, lr, step, |_| true);
    }

    /// [`Self::step`] of the tensors `which` selects (the others step elsewhere: a GPU's
    /// device optimizer).
    pub fn step_where(
        &self,
        state: &mut TrainState,
        model: &mut Model,
        lr: f32,
        step: u64,
        which: impl Fn(Slot) -> bool,
    ) {
        let bc1 = 1.0 - (self.beta1 as f64).powi(step as i32);
        let bc2 = 1.0 - (self.beta2 as f64).powi(step as i32);
        let step_size = (lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        for k in 0..state.params.len() {
            if !which(state.params[k].0) {
                continue;
            }
            let (value, p) = state.value_and_state_mut(model, k);
            let decay = if p.decay {
                1.0 - lr * self.weight_decay
            } else {
                1.0
            };
            let (m, v, g) = (&mut p.m, &mut p.v, &p.grad);
            value
                .par_chunks_mut(4096)
                .zip(m.par_chunks_mut(4096))
                .zip(v.par_chunks_mut(4096))
                .zip(g.par_chunks(4096))
                .for_each(|(((w, m), v), g)| {
                    for i in 0..w.len() {
                        w[i] *= decay;
                        // torch: exp_avg.lerp_(grad, 1 − β1)
                        m[i] += (1.0 - b1) * (g[i] - m[i]);
                        v[i] = v[i] * b2 + (1.0 - b2) * g[i] * g[i];
                        let denom = v[i].sqrt() / bc2_sqrt + eps;
                        w[i] -= step_size * m[i] / denom;
                    }
                });
        }
    }
}

/// Global L2 norm of all gradients; scales them down to `max_norm` when above it.
/// Returns the norm before clipping.
pub fn clip_grad_norm(state: &mut TrainState, max_norm: Option<f32>) -> f32 {
    clip_grad_norm_with(state, max_norm, 0.0).0
}

/// [`clip_grad_norm`] with `extra_sq`, the Σ g² of gradients held elsewhere (a GPU's), in the
/// norm. Returns the norm before clipping and the coefficient applied (which the caller
/// applies to those other gradients).
pub fn clip_grad_norm_with(
    state: &mut TrainState,
    max_norm: Option<f32>,
    extra_sq: f64,
) -> (f32, f32) {
    let sq: f64 = state
        .params
        .iter()
        .map(|(_, p)| p.grad.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>())
        .sum();
    let norm = (sq + extra_sq).sqrt() as f32;
    let mut coef = 1.0;
    if let Some(max) = max_norm {
        coef = (max / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            for (_, p) in &mut state.params {
                p.grad.iter_mut().for_each(|g| *g *= coef);
            }
        } else {
            coef = 1.0;
        }
    }
    (norm, coef)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl Schedule {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "constant" => Some(Self::Constant),
            "linear" => Some(Self::Linear),
            "cosine" => Some(Self::Cosine),
            _ => None,
        }
    }

    /// Multiplier of the base learning rate for the optimizer step with index `step`
    /// (0-based, as transformers' LambdaLR sees it).
    pub fn factor(self, step: u64, warmup: u64, total: u64) -> f32 {
        if step < warmup {
            return step as f32 / warmup.max(1) as f32;
        }
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => (total.saturating_sub(step) as f32
                / total.saturating_sub(warmup).max(1) as f32)
                .max(0.0),
            Schedule::Cosine => {
                let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0) as f32
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_transformers() {
        assert_eq!(Schedule::Linear.factor(0, 2, 10), 0.0);
        assert_eq!(Schedule::Linear.factor(1, 2, 10), 0.5);
        assert_eq!(Schedule::Linear.factor(2, 2, 10), 1.0);
        assert!((Schedule::Linear.factor(6, 2, 10) - 0.5).abs() < 1e-6);
        assert!((Schedule::Cosine.factor(6, 2, 10) - 0.5).abs() < 1e-6);
        assert_eq!(Schedule::Constant.factor(9, 2, 10), 1.0);
    }
}

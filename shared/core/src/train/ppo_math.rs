//! The arithmetic of PPO for language models, as TRL computes it (formats.md §6.2): masked
//! statistics and whitening, per-token KL estimates, generalized advantage estimation, the
//! clipped policy and value losses with their gradients, and the KL controllers.
//!
//! Tensors are `[rows, len]` row-major slices (one row per response, `len` response positions)
//! with a mask of the positions that count. Everything is f64: these are small per-token
//! vectors, and the rounding of long sums should not decide a clip.

/// Σ x·mask / Σ mask.
pub fn masked_mean(x: &[f64], mask: &[bool]) -> f64 {
    let (s, n) = x
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m)
        .fold((0.0, 0usize), |(s, n), (v, _)| (s + v, n + 1));
    s / n.max(1) as f64
}

/// Masked variance; `unbiased` applies TRL's n / (n − 1) correction.
pub fn masked_var(x: &[f64], mask: &[bool], unbiased: bool) -> f64 {
    let mean = masked_mean(x, mask);
    let n = mask.iter().filter(|&&m| m).count();
    let var = x
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m)
        .map(|(v, _)| (v - mean) * (v - mean))
        .sum::<f64>()
        / n.max(1) as f64;
    if unbiased && n > 1 {
        var * n as f64 / (n - 1) as f64
    } else {
        var
    }
}

/// TRL's `masked_whiten`: (x − mean) / √(var + 1e-8) with the unbiased masked variance; without
/// `shift_mean` the mean is added back (rewards keep their offset).
pub fn masked_whiten(x: &[f64], mask: &[bool], shift_mean: bool) -> Vec<f64> {
    let mean = masked_mean(x, mask);
    let var = masked_var(x, mask, true);
    let inv = 1.0 / (var + 1e-8).sqrt();
    x.iter()
        .map(|v| {
            let w = (v - mean) * inv;
            if shift_mean {
                w
            } else {
                w + mean
            }
        })
        .collect()
}

/// How the per-token KL to the reference is estimated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KlEstimator {
    /// log p − log p_ref (PPOv2 "k1", legacy "kl")
    K1,
    /// (exp(r) − 1) − r with r = log p_ref − log p (PPOv2 "k3": unbiased, never negative)
    K3,
    /// |log p − log p_ref| (legacy "abs")
    Abs,
    /// ½ (log p − log p_ref)² (legacy "mse")
    Mse,
}

impl KlEstimator {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "k1" | "kl" => Some(Self::K1),
            "k3" => Some(Self::K3),
            "abs" => Some(Self::Abs),
            "mse" => Some(Self::Mse),
            _ => None,
        }
    }

    pub fn estimate(self, logp: f64, ref_logp: f64) -> f64 {
        let d = logp - ref_logp;
        match self {
            Self::K1 => d,
            Self::K3 => {
                let r = -d;
                r.exp_m1() - r
            }
            Self::Abs => d.abs(),
            Self::Mse => 0.5 * d * d,
        }
    }
}

/// Generalized advantage estimation over each row (TRL's loop: from the last position back,
/// the value after the window is 0): δ_t = r_t + γV_{t+1} − V_t, A_t = δ_t + γλA_{t+1};
/// returns = A + V. Masked positions take part as TRL's do (their rewards and values are 0
/// there by construction); callers mask afterwards.
pub fn gae(
    values: &[f64],
    rewards: &[f64],
    len: usize,
    gamma: f64,
    lam: f64,
) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(values.len(), rewards.len());
    let mut adv = vec![0.0; values.len()];
    for (row_v, (row_r, row_a)) in values
        .chunks(len)
        .zip(rewards.chunks(len).zip(adv.chunks_mut(len)))
    {
        let mut last = 0.0;
        for t in (0..len).rev() {
            let next = if t + 1 < len { row_v[t + 1] } else { 0.0 };
            let delta = row_r[t] + gamma * next - row_v[t];
            last = delta + gamma * lam * last;
            row_a[t] = last;
        }
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// The clipped policy loss and what is logged about it.
#[derive(Clone, Debug)]
pub struct PolicyLoss {
    pub loss: f64,
    /// Share of counted positions where the clipped term was the larger one.
    pub clipfrac: f64,
    /// ½ · mean((log p − log p_old)²)
    pub approx_kl: f64,
    /// d loss / d log p per position (0 where masked)
    pub grad: Vec<f64>,
}

/// `masked_mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)))`, ρ = exp(log p − log p_old).
pub fn policy_loss(logp: &[f64], old: &[f64], adv: &[f64], mask: &[bool], clip: f64) -> PolicyLoss {
    let n = mask.iter().filter(|&&m| m).count().max(1) as f64;
    let mut loss = 0.0;
    let mut clipped = 0usize;
    let mut kl = 0.0;
    let mut grad = vec![0.0; logp.len()];
    for i in 0..logp.len() {
        if !mask[i] {
            continue;
        }
        let d = logp[i] - old[i];
        let ratio = d.exp();
        let l1 = -adv[i] * ratio;
        let l2 = -adv[i] * ratio.clamp(1.0 - clip, 1.0 + clip);
        if l2 > l1 {
            clipped += 1;
            // the clipped ratio is constant in log p (outside the band): no gradient
            let inside = ratio > 1.0 - clip && ratio < 1.0 + clip;
            grad[i] = if inside { -adv[i] * ratio / n } else { 0.0 };
            loss += l2;
        } else {
            grad[i] = -adv[i] * ratio / n;
            loss += l1;
        }
        kl += 0.5 * d * d;
    }
    PolicyLoss {
        loss: loss / n,
        clipfrac: clipped as f64 / n,
        approx_kl: kl / n,
        grad,
    }
}

#[derive(Clone, Debug)]
pub struct ValueLoss {
    pub loss: f64,
    pub clipfrac: f64,
    /// d loss / d v_pred per position
    pub grad: Vec<f64>,
}

/// `vf_coef · ½ · masked_mean(max((V − R)², (clip(V, V_old ± ε) − R)²))`.
pub fn value_loss(
    vpred: &[f64],
    old: &[f64],
    returns: &[f64],
    mask: &[bool],
    clip: f64,
    vf_coef: f64,
) -> ValueLoss {
    let n = mask.iter().filter(|&&m| m).count().max(1) as f64;
    let mut loss = 0.0;
    let mut clipped = 0usize;
    let mut grad = vec![0.0; vpred.len()];
    for i in 0..vpred.len() {
        if !mask[i] {
            continue;
        }
        let vc = vpred[i].clamp(old[i] - clip, old[i] + clip);
        let l1 = (vpred[i] - returns[i]).powi(2);
        let l2 = (vc - returns[i]).powi(2);
        let scale = vf_coef * 0.5 / n;
        if l2 > l1 {
            clipped += 1;
            let inside = vpred[i] > old[i] - clip && vpred[i] < old[i] + clip;
            grad[i] = if inside {
                scale * 2.0 * (vc - returns[i])
            } else {
                0.0
            };
            loss += l2;
        } else {
            grad[i] = scale * 2.0 * (vpred[i] - returns[i]);
            loss += l1;
        }
    }
    ValueLoss {
        loss: vf_coef * 0.5 * loss / n,
        clipfrac: clipped as f64 / n,
        grad,
    }
}

/// The KL coefficient: fixed, or adapted toward a target KL (Ziegler et al.; TRL ≤ 0.11).
#[derive(Clone, Debug)]
pub struct KlController {
    pub value: f64,
    /// (target, horizon) when adaptive
    pub adaptive: Option<(f64, f64)>,
}

impl KlController {
    /// After a batch with mean KL `current` over `n_steps` samples:
    /// β ← β·(1 + clip(current/target − 1, −0.2, 0.2)·n_steps/horizon).
    pub fn update(&mut self, current: f64, n_steps: usize) {
        if let Some((target, horizon)) = self.adaptive {
            let err = (current / target - 1.0).clamp(-0.2, 0.2);
            self.value *= 1.0 + err * n_steps as f64 / horizon;
        }
    }
}

/// Entropy of the softmax of one row of logits: logsumexp(l) − Σ softmax(l)·l.
pub fn entropy(logits: &[f32]) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    let expect: f64 = logits
        .iter()
        .map(|&x| (x as f64 - max).exp() / sum * x as f64)
        .sum();
    lse - expect
}

/// 1 − Var(returns − values) / Var(returns) over the counted positions.
pub fn explained_variance(values: &[f64], returns: &[f64], mask: &[bool]) -> f64 {
    let diff: Vec<f64> = returns.iter().zip(values).map(|(r, v)| r - v).collect();
    let var_r = masked_var(returns, mask, false);
    1.0 - masked_var(&diff, mask, false) / var_r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_match_finite_differences() {
        let logp = [-1.0, -0.5, -2.0, -0.1];
        let old = [-1.1, -0.9, -1.7, -0.1];
        let adv = [0.5, -1.0, 2.0, 0.3];
        let mask = [true, true, true, false];
        let g = policy_loss(&logp, &old, &adv, &mask, 0.2).grad;
        for i in 0..3 {
            let e = 1e-6;
            let mut a = logp;
            a[i] += e;
            let mut b = logp;
            b[i] -= e;
            let num = (policy_loss(&a, &old, &adv, &mask, 0.2).loss
                - policy_loss(&b, &old, &adv, &mask, 0.2).loss)
                / (2.0 * e);
            assert!((num - g[i]).abs() < 1e-6, "policy {i}: {num} vs {}", g[i]);
        }
        let v = [0.3, 1.5, -0.2, 0.0];
        let vo = [0.2, 1.0, -0.1, 0.0];
        let ret = [1.0, 1.2, -0.4, 0.0];
        let g = value_loss(&v, &vo, &ret, &mask, 0.2, 0.1).grad;
        for i in 0..3 {
            let e = 1e-6;
            let mut a = v;
            a[i] += e;
            let mut b = v;
            b[i] -= e;
            let num = (value_loss(&a, &vo, &ret, &mask, 0.2, 0.1).loss
                - value_loss(&b, &vo, &ret, &mask, 0.2, 0.1).loss)
                / (2.0 * e);
            assert!((num - g[i]).abs() < 1e-6, "value {i}: {num} vs {}", g[i]);
        }
    }

    #[test]
    fn gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value() {
        let v = [0.5, 0.25, 0.0];
        let r = [1.0, 0.0, 2.0];
        let (a, ret) = gae(&v, &r, 3, 1.0, 1.0);
        assert_eq!(ret, vec![3.0, 2.0, 2.0]);
        assert_eq!(a, vec![2.5, 1.75, 2.0]);
    }

    #[test]
    fn k3_is_never_negative() {
        for (p, q) in [(-1.0, -2.0), (-2.0, -1.0), (-0.5, -0.5)] {
            assert!(KlEstimator::K3.estimate(p, q) >= 0.0);
        }
    }
}

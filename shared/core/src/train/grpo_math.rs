//! The arithmetic of GRPO as TRL 1.16's `GRPOTrainer` computes it (formats.md has no section of
//! its own; docs/grpo-train.md writes the formulas out): group-relative advantages from several
//! weighted reward functions, and the clipped surrogate loss per completion token with its
//! KL penalty, aggregated by one of TRL's loss types, with d loss / d log p for the backward.
//!
//! Everything is f64 on small per-completion vectors. A reward is `NaN` when its function
//! could not score the completion (TRL's `None`).

/// How the summed rewards are scaled into advantages (`scale_rewards`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewardScale {
    /// By the standard deviation within each prompt's group (TRL's default).
    Group,
    /// By the standard deviation over the whole batch (PPO Lite).
    Batch,
    /// Not at all (Dr. GRPO: no question-difficulty bias).
    None,
}

impl RewardScale {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "group" | "true" => Some(Self::Group),
            "batch" => Some(Self::Batch),
            "none" | "false" => Some(Self::None),
            _ => None,
        }
    }
}

/// How several reward functions combine (`multi_objective_aggregation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aggregation {
    /// Weighted sum, then the group baseline and scaling (TRL's default).
    SumThenNormalize,
    /// GDPO: each function normalized within its group, then the weighted sum, then the sum
    /// normalized over the batch.
    NormalizeThenSum,
}

impl Aggregation {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sum_then_normalize" | "sum-then-normalize" => Some(Self::SumThenNormalize),
            "normalize_then_sum" | "normalize-then-sum" => Some(Self::NormalizeThenSum),
            _ => None,
        }
    }
}

/// The advantage of every completion and what TRL logs about the rewards.
#[derive(Clone, Debug)]
pub struct Advantages {
    pub advantages: Vec<f64>,
    /// The weighted sum of each completion's rewards (`NaN` when none could score it).
    pub rewards: Vec<f64>,
    /// Per completion: whether the standard deviation that scales it is zero.
    pub std_zero: Vec<bool>,
}

/// Mean of the non-NaN values (NaN when there are none).
pub fn nanmean(x: &[f64]) -> f64 {
    let (s, n) = x
        .iter()
        .filter(|v| !v.is_nan())
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

/// TRL's `nanstd`: the standard deviation of the non-NaN values with Bessel's correction
/// (NaN with fewer than two).
pub fn nanstd(x: &[f64]) -> f64 {
    let m = nanmean(x);
    let vals: Vec<f64> = x.iter().copied().filter(|v| !v.is_nan()).collect();
    let n = vals.len();
    if n < 2 {
        return f64::NAN;
    }
    let var = vals.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / n as f64;
    (var * n as f64 / (n - 1) as f64).sqrt()
}

/// Σ of the non-NaN values (0 when there are none).
fn nansum(x: impl Iterator<Item = f64>) -> f64 {
    x.filter(|v| !v.is_nan()).sum()
}

/// `torch.isclose(std, 0)`.
fn is_zero(std: f64) -> bool {
    std.abs() <= 1e-8
}

/// Group-relative advantages. `rewards[i][k]` is function k's reward for completion i; the
/// completions of one prompt are `g` consecutive rows. A completion no function could score
/// gets advantage 0 and stays out of its group's baseline.
pub fn advantages(
    rewards: &[Vec<f64>],
    weights: &[f64],
    g: usize,
    scale: RewardScale,
    aggregation: Aggregation,
) -> Advantages {
    let n = rewards.len();
    let g = g.max(1);
    let unscorable: Vec<bool> = rewards
        .iter()
        .map(|r| r.iter().all(|v| v.is_nan()))
        .collect();
    let weighted = |row: &[f64]| nansum(row.iter().zip(weights).map(|(r, w)| r * w));
    let (adv, summed, std_zero) = match aggregation {
        Aggregation::SumThenNormalize => {
            let summed: Vec<f64> = rewards
                .iter()
                .zip(&unscorable)
                .map(|(r, &u)| if u { f64::NAN } else { weighted(r) })
                .collect();
            let batch_std = if n > 1 { nanstd(&summed) } else { 0.0 };
            let mut adv = vec![0.0; n];
            let mut zero = vec![false; n];
            for (gi, group) in summed.chunks(g).enumerate() {
                let mean = nanmean(group);
                let std = match scale {
                    RewardScale::Batch => batch_std,
                    _ if g > 1 => nanstd(group),
                    _ => 0.0,
                };
                for (j, r) in group.iter().enumerate() {
                    let i = gi * g + j;
                    let mut a = r - mean;
                    if scale != RewardScale::None {
                        a /= std + 1e-4;
                    }
                    adv[i] = a;
                    zero[i] = is_zero(std);
                }
            }
            (adv, summed, zero)
        }
        Aggregation::NormalizeThenSum => {
            let k = weights.len();
            let mut normed = vec![vec![0.0; k]; n];
            for (gi, group) in rewards.chunks(g).enumerate() {
                for f in 0..k {
                    let col: Vec<f64> = group.iter().map(|r| r[f]).collect();
                    let mean = nanmean(&col);
                    let std = if g > 1 { nanstd(&col) } else { 0.0 };
                    for (j, v) in col.iter().enumerate() {
                        normed[gi * g + j][f] = (v - mean) / (std + 1e-4);
                    }
                }
            }
            let summed: Vec<f64> = normed
                .iter()
                .zip(&unscorable)
                .map(|(r, &u)| if u { f64::NAN } else { weighted(r) })
                .collect();
            let std = if n > 1 { nanstd(&summed) } else { 0.0 };
            let mean = nanmean(&summed);
            let adv = summed.iter().map(|r| (r - mean) / (std + 1e-4)).collect();
            (adv, summed, vec![is_zero(std); n])
        }
    };
    let advantages = adv
        .into_iter()
        .map(|a: f64| if a.is_nan() { 0.0 } else { a })
        .collect();
    // What TRL logs as the reward: the weighted sum of the raw rewards.
    let rewards_logged = match aggregation {
        Aggregation::SumThenNormalize => summed,
        Aggregation::NormalizeThenSum => rewards
            .iter()
            .zip(&unscorable)
            .map(|(r, &u)| if u { f64::NAN } else { weighted(r) })
            .collect(),
    };
    Advantages {
        advantages,
        rewards: rewards_logged,
        std_zero,
    }
}

/// How the per-token losses of a micro-batch are summed into its loss (`loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossType {
    /// Mean over each completion's tokens, then over completions (length-biased).
    Grpo,
    /// Mean over the micro-batch's tokens.
    Bnpo,
    /// Sum over tokens / (completions × the completion length limit) (Dr. GRPO).
    DrGrpo,
    /// Sum over tokens / the tokens of the whole optimizer step (DAPO; TRL's default).
    Dapo,
    /// CISPO (MiniMax-M1): −min(ratio, ε_high)·A·log p with the clipped ratio detached, so no
    /// token loses its gradient; normalised as DAPO.
    Cispo,
    /// SAPO: a soft gate σ(τ(ratio − 1))·4/τ instead of the clip (τ by the advantage's sign);
    /// normalised as GRPO.
    Sapo,
    /// LUSPO: GRPO's clipped surrogate summed over each completion's tokens, then averaged over
    /// completions (no per-length mean; meant for sequence-level ratios).
    Luspo,
    /// VESPO: −φ(w)·A·log p with φ a detached gamma weight of the completion's whole ratio
    /// w = Π ρ_t (φ(1) = 1); normalised as DAPO.
    Vespo,
}

/// VESPO's gamma weight φ(w) = e^λ·w^k·e^{−λw}, with (k, λ) by the advantage's sign.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Vespo {
    pub k_pos: f64,
    pub lambda_pos: f64,
    pub k_neg: f64,
    pub lambda_neg: f64,
}

impl Default for Vespo {
    /// TRL's defaults.
    fn default() -> Self {
        Self {
            k_pos: 2.0,
            lambda_pos: 3.0,
            k_neg: 3.0,
            lambda_neg: 2.0,
        }
    }
}

impl Vespo {
    /// φ of a completion from its per-token log-ratios (TRL `get_gamma_weights`: each clamped to
    /// ±20, summed over the counted tokens, log w clamped to [ln 1e-8, 20]); 0 where it
    /// overflows.
    pub fn weight(&self, log_ratio: &[f64], mask: &[bool], advantage: f64) -> f64 {
        let seq: f64 = log_ratio
            .iter()
            .zip(mask)
            .filter(|(_, &m)| m)
            .map(|(l, _)| l.clamp(-20.0, 20.0))
            .sum();
        let log_w = seq.clamp(1e-8f64.ln(), 20.0);
        let (k, lambda) = if advantage >= 0.0 {
            (self.k_pos, self.lambda_pos)
        } else {
            (self.k_neg, self.lambda_neg)
        };
        let lambda = lambda.max(1e-4);
        let phi = (lambda + k * log_w - lambda * log_w.exp()).exp();
        if phi.is_finite() {
            phi
        } else {
            0.0
        }
    }
}

impl LossType {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "grpo" => Some(Self::Grpo),
            "bnpo" => Some(Self::Bnpo),
            "dr_grpo" | "dr-grpo" => Some(Self::DrGrpo),
            "dapo" => Some(Self::Dapo),
            "cispo" => Some(Self::Cispo),
            "sapo" => Some(Self::Sapo),
            "luspo" => Some(Self::Luspo),
            "vespo" => Some(Self::Vespo),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Grpo => "grpo",
            Self::Bnpo => "bnpo",
            Self::DrGrpo => "dr_grpo",
            Self::Dapo => "dapo",
            Self::Cispo => "cispo",
            Self::Sapo => "sapo",
            Self::Luspo => "luspo",
            Self::Vespo => "vespo",
        }
    }
}

/// Where the importance ratio π/π_old is taken (`importance_sampling_level`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RatioLevel {
    /// One ratio per token (GRPO).
    Token,
    /// exp of the mean per-token log-ratio, one per completion (GSPO).
    Sequence,
}

/// The loss's settings.
#[derive(Clone, Copy, Debug)]
pub struct GrpoLoss {
    pub loss_type: LossType,
    /// The ratio is clipped to [1 − epsilon_low, 1 + epsilon_high].
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// Two-sided clipping (INTELLECT-2): the unclipped ratio is capped at delta.
    pub delta: Option<f64>,
    /// Weight of the k3 KL to the reference.
    pub beta: f64,
    /// Multiply the KL by the importance ratio (TRL's `use_bias_correction_kl`, default on).
    pub kl_ratio: bool,
    pub level: RatioLevel,
    /// The completion length limit (Dr. GRPO's constant).
    pub max_completion_len: usize,
    /// SAPO's gate temperatures for positive and for other advantages.
    pub sapo_temperature_pos: f64,
    pub sapo_temperature_neg: f64,
    /// ρ of "Beyond the 80/20 rule": only the micro-batch's top-ρ quantile of tokens by
    /// entropy keep their policy term (1: all).
    pub top_entropy_quantile: f64,
    pub vespo: Vespo,
    /// The entropy bonus's weight (TRL's static `entropy_coef`; 0: none).
    pub entropy_coef: f64,
    /// DeepSeek-V3.2's off-policy sequence mask: a completion with a negative advantage whose
    /// mean log p_old − log p over its tokens exceeds this loses its policy term.
    pub off_policy_threshold: Option<f64>,
}

/// The tokens whose entropy reaches the (1 − ρ) quantile of `entropies` (torch.quantile's
/// linear interpolation), as TRL's `get_high_entropy_mask`: with ρ = 1 all of them.
pub fn high_entropy(entropies: &[f64], rho: f64) -> Vec<bool> {
    if rho >= 1.0 || entropies.is_empty() {
        return vec![true; entropies.len()];
    }
    let mut sorted = entropies.to_vec();
    sorted.sort_by(f64::total_cmp);
    let pos = (1.0 - rho) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let threshold = sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64);
    entropies.iter().map(|&e| e >= threshold).collect()
}

/// One completion's tokens as the loss sees them.
#[derive(Clone, Copy, Debug)]
pub struct CompletionTokens<'a> {
    /// log π(token) now, at the sampling temperature.
    pub logp: &'a [f64],
    /// At sampling time (None: the same as now, detached; ratio 1).
    pub old_logp: Option<&'a [f64]>,
    /// Under the reference (needed when beta ≠ 0).
    pub ref_logp: Option<&'a [f64]>,
    /// Which tokens count.
    pub mask: &'a [bool],
    /// Of the counted tokens, those whose policy term counts (`--top-entropy-quantile`: the
    /// high-entropy ones; None: all). The KL term and the normalisation still use `mask`.
    pub policy_mask: Option<&'a [bool]>,
    pub advantage: f64,
}

/// How a micro-batch's loss is normalized within its optimizer step.
#[derive(Clone, Copy, Debug)]
pub struct StepShare {
    /// Micro-batches accumulated into the optimizer step.
    pub grad_accum: usize,
    /// Tokens counted in the whole optimizer step (DAPO's denominator).
    pub step_tokens: usize,
}

/// The loss of one micro-batch, its gradient and TRL's metrics.
#[derive(Clone, Debug, Default)]
pub struct LossOutput {
    pub loss: f64,
    /// Per completion, per token: d loss / d logp.
    pub grad: Vec<Vec<f64>>,
    /// Σ over counted tokens (or completions, for sequence-level ratios) of the metric; with
    /// the count, so that a step's micro-batches add up.
    pub kl_sum: f64,
    pub low_clipped: f64,
    pub high_clipped: f64,
    pub region_clipped: f64,
    /// Counted tokens, and completions (the count of sequence-level clip metrics).
    pub tokens: usize,
    pub completions: usize,
    /// VESPO: Σ over completions of φ (TRL logs its mean, `vespo/phi_seq_mean`).
    pub phi_sum: f64,
}

/// The mean log-ratio over a completion's counted tokens (GSPO's sequence-level ratio).
fn mean_log_ratio(log_ratio: &[f64], mask: &[bool]) -> f64 {
    let (s, n) = log_ratio
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m)
        .fold((0.0, 0usize), |(s, n), (v, _)| (s + v, n + 1));
    s / n.max(1) as f64
}

/// d min(a, b) / d a and / d b as torch computes them (a tie splits the gradient).
fn min_grads(a: f64, b: f64) -> (f64, f64) {
    if a < b {
        (1.0, 0.0)
    } else if b < a {
        (0.0, 1.0)
    } else {
        (0.5, 0.5)
    }
}

/// The GRPO loss of a micro-batch of completions (TRL `_compute_loss`).
pub fn grpo_loss(cfg: &GrpoLoss, seqs: &[CompletionTokens], share: StepShare) -> LossOutput {
    let ga = share.grad_accum.max(1) as f64;
    let n_seq = seqs.len();
    let micro_tokens: usize = seqs
        .iter()
        .map(|s| s.mask.iter().filter(|&&m| m).count())
        .sum();
    let mut out = LossOutput {
        grad: Vec::with_capacity(n_seq),
        tokens: micro_tokens,
        completions: n_seq,
        ..Default::default()
    };
    for s in seqs {
        let len = s.logp.len();
        let n_i = s.mask.iter().filter(|&&m| m).count();
        // d loss / d per_token_loss[t] for a counted token
        let weight = match cfg.loss_type {
            LossType::Grpo | LossType::Sapo => 1.0 / (n_i.max(1) as f64 * n_seq.max(1) as f64 * ga),
            LossType::Bnpo => 1.0 / (micro_tokens.max(1) as f64 * ga),
            LossType::DrGrpo => 1.0 / ((n_seq * cfg.max_completion_len).max(1) as f64 * ga),
            LossType::Dapo | LossType::Cispo | LossType::Vespo => {
                1.0 / share.step_tokens.max(1) as f64
            }
            LossType::Luspo => 1.0 / (n_seq.max(1) as f64 * ga),
        };
        let a = s.advantage;
        let log_ratio: Vec<f64> = match s.old_logp {
            Some(old) => s.logp.iter().zip(old).map(|(p, o)| p - o).collect(),
            None => vec![0.0; len],
        };
        // the off-policy mask drops the whole completion's policy term
        let off_policy = cfg.off_policy_threshold.is_some_and(|d| {
            let drift: Vec<f64> = log_ratio.iter().map(|l| -l).collect();
            a < 0.0 && mean_log_ratio(&drift, s.mask) > d
        });
        let policy = |t: usize| !off_policy && s.policy_mask.is_none_or(|m| m[t]);
        // counted tokens whose policy term counts
        let m_i = (0..len).filter(|&t| s.mask[t] && policy(t)).count();
        // the policy term at one log-ratio: (loss, d loss / d log-ratio, clip flags); CISPO's
        // is linear in log p instead (its ratio is detached): see `cispo` below
        let surrogate = |lr: f64| {
            let raw = lr.exp();
            if cfg.loss_type == LossType::Sapo {
                let tau = if a > 0.0 {
                    cfg.sapo_temperature_pos
                } else {
                    cfg.sapo_temperature_neg
                };
                let sig = 1.0 / (1.0 + (-tau * (raw - 1.0)).exp());
                let loss = -sig * 4.0 / tau * a;
                let dlr = -4.0 * sig * (1.0 - sig) * raw * a;
                return (loss, dlr, false, false);
            }
            let (c1, d1) = match cfg.delta {
                Some(d) if raw > d => (d, 0.0),
                _ => (raw, raw),
            };
            let (lo, hi) = (1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high);
            let (c2, d2) = if raw < lo {
                (lo, 0.0)
            } else if raw > hi {
                (hi, 0.0)
            } else {
                (raw, raw)
            };
            let (ga1, ga2) = min_grads(c1 * a, c2 * a);
            let loss = -(c1 * a).min(c2 * a);
            let dlr = -(ga1 * d1 + ga2 * d2) * a;
            let low = c1 < lo && a < 0.0;
            let high = c1 > hi && a > 0.0;
            (loss, dlr, low, high)
        };
        // CISPO at one ratio: the detached weight −min(ratio, ε_high)·A of log p, and whether
        // it was clipped (TRL's cispo_clip_ratio)
        let cispo = |lr: f64| {
            let raw = lr.exp();
            (
                -raw.min(cfg.epsilon_high) * a,
                raw > cfg.epsilon_high && a > 0.0,
            )
        };
        let mut g = vec![0.0; len];
        let mut seq_loss = 0.0;
        match (cfg.loss_type, cfg.level) {
            (LossType::Vespo, _) => {
                let phi = cfg.vespo.weight(&log_ratio, s.mask, a);
                out.phi_sum += phi;
                for (t, gt) in g.iter_mut().enumerate() {
                    if s.mask[t] && policy(t) {
                        seq_loss += -phi * a * s.logp[t] * weight;
                        *gt += -phi * a * weight;
                    }
                }
            }
            (LossType::Cispo, level) => {
                let seq_lr = mean_log_ratio(&log_ratio, s.mask);
                for t in 0..len {
                    if !s.mask[t] {
                        continue;
                    }
                    let (w, clipped) = cispo(match level {
                        RatioLevel::Token => log_ratio[t],
                        RatioLevel::Sequence => seq_lr,
                    });
                    if policy(t) {
                        seq_loss += w * s.logp[t] * weight;
                        g[t] += w * weight;
                    }
                    if level == RatioLevel::Token {
                        out.high_clipped += f64::from(u8::from(clipped));
                    }
                }
                if level == RatioLevel::Sequence {
                    out.high_clipped += f64::from(u8::from(cispo(seq_lr).1));
                }
            }
            (_, RatioLevel::Token) => {
                for t in 0..len {
                    if !s.mask[t] {
                        continue;
                    }
                    let (l, dlr, low, high) = surrogate(log_ratio[t]);
                    if policy(t) {
                        seq_loss += l * weight;
                        g[t] += dlr * weight;
                    }
                    out.low_clipped += f64::from(u8::from(low));
                    out.high_clipped += f64::from(u8::from(high));
                    out.region_clipped += f64::from(u8::from(low || high));
                }
            }
            (_, RatioLevel::Sequence) => {
                let (l, dlr, low, high) = surrogate(mean_log_ratio(&log_ratio, s.mask));
                // the same loss on every counted token (whose policy term counts)
                seq_loss += l * weight * m_i as f64;
                for (gt, _) in g.iter_mut().zip(s.mask).filter(|(_, &m)| m) {
                    *gt += dlr * weight * m_i as f64 / n_i.max(1) as f64;
                }
                out.low_clipped += f64::from(u8::from(low));
                out.high_clipped += f64::from(u8::from(high));
                out.region_clipped += f64::from(u8::from(low || high));
            }
        }
        if cfg.beta != 0.0 {
            let r = s.ref_logp.expect("reference log-probs when beta ≠ 0");
            // TRL's bias correction: the KL times the (unclipped, differentiable) ratio, so
            // that its gradient is the reverse KL's even off-policy (DeepSeek-V3.2).
            let seq_ratio = mean_log_ratio(&log_ratio, s.mask).exp();
            let mut kl_total = 0.0;
            for t in 0..len {
                if !s.mask[t] {
                    continue;
                }
                let d = r[t] - s.logp[t];
                let kl = d.exp() - d - 1.0;
                let dkl = 1.0 - d.exp();
                let rho = match (cfg.kl_ratio, cfg.level) {
                    (false, _) => 1.0,
                    (true, RatioLevel::Token) => log_ratio[t].exp(),
                    (true, RatioLevel::Sequence) => seq_ratio,
                };
                out.kl_sum += kl * rho;
                seq_loss += cfg.beta * kl * rho * weight;
                g[t] += cfg.beta * dkl * rho * weight;
                if cfg.kl_ratio && cfg.level == RatioLevel::Token {
                    g[t] += cfg.beta * kl * rho * weight;
                }
                kl_total += kl;
            }
            if cfg.kl_ratio && cfg.level == RatioLevel::Sequence {
                // every token's log-prob moves the shared ratio
                let share = cfg.beta * kl_total * seq_ratio * weight / n_i.max(1) as f64;
                for (gt, _) in g.iter_mut().zip(s.mask).filter(|(_, &m)| m) {
                    *gt += share;
                }
            }
        }
        out.loss += seq_loss;
        out.grad.push(g);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(loss_type: LossType) -> GrpoLoss {
        GrpoLoss {
            loss_type,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            delta: None,
            beta: 0.0,
            kl_ratio: true,
            level: RatioLevel::Token,
            max_completion_len: 4,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            top_entropy_quantile: 1.0,
            vespo: Vespo::default(),
            entropy_coef: 0.0,
            off_policy_threshold: None,
        }
    }

    #[test]
    fn group_advantages_are_zscores_with_bessel() {
        let r = vec![vec![1.0], vec![0.0], vec![0.5], vec![0.5]];
        let a = advantages(
            &r,
            &[1.0],
            2,
            RewardScale::Group,
            Aggregation::SumThenNormalize,
        );
        let std = (0.5f64).sqrt(); // two values 1, 0: mean 0.5, unbiased var 0.5
        assert!((a.advantages[0] - 0.5 / (std + 1e-4)).abs() < 1e-12);
        assert!((a.advantages[1] + 0.5 / (std + 1e-4)).abs() < 1e-12);
        assert_eq!(&a.advantages[2..], &[0.0, 0.0]);
        assert_eq!(a.std_zero, vec![false, false, true, true]);
    }

    #[test]
    fn unscorable_completions_get_no_advantage_and_no_say_in_the_baseline() {
        let nan = f64::NAN;
        let r = vec![vec![nan, nan], vec![1.0, nan], vec![3.0, 2.0]];
        let a = advantages(
            &r,
            &[1.0, 0.5],
            3,
            RewardScale::None,
            Aggregation::SumThenNormalize,
        );
        assert_eq!(a.advantages[0], 0.0);
        // summed: NaN, 1, 4 → mean 2.5
        assert!((a.advantages[1] + 1.5).abs() < 1e-12);
        assert!((a.advantages[2] - 1.5).abs() < 1e-12);
        assert!(a.rewards[0].is_nan());
    }

    #[test]
    fn ratio_one_gradient_is_minus_the_advantage_per_token_weight() {
        let logp = [-1.0, -2.0, -3.0];
        let mask = [true, true, false];
        let s = CompletionTokens {
            logp: &logp,
            old_logp: None,
            ref_logp: None,
            mask: &mask,
            policy_mask: None,
            advantage: 2.0,
        };
        let share = StepShare {
            grad_accum: 1,
            step_tokens: 4,
        };
        let o = grpo_loss(&cfg(LossType::Dapo), &[s], share);
        assert!((o.loss + 2.0 * 2.0 / 4.0).abs() < 1e-12);
        assert_eq!(o.grad[0], vec![-0.5, -0.5, 0.0]);
        let o = grpo_loss(&cfg(LossType::Grpo), &[s], share);
        assert_eq!(o.grad[0], vec![-1.0, -1.0, 0.0]);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let logp = vec![-1.0, -0.7, -2.0, -0.3];
        let old = vec![-1.3, -0.5, -2.1, -0.9];
        let reference = vec![-1.1, -0.9, -1.7, -0.2];
        let mask = [true, true, true, false];
        // the high-entropy tokens' policy terms (the second counted token's is off)
        let high = [true, false, true, false];
        for level in [RatioLevel::Token, RatioLevel::Sequence] {
            for (lt, policy) in [
                (LossType::Grpo, None),
                (LossType::Bnpo, None),
                (LossType::DrGrpo, None),
                (LossType::Dapo, None),
                (LossType::Sapo, None),
                (LossType::Luspo, None),
                (LossType::Grpo, Some(&high[..])),
                (LossType::Sapo, Some(&high[..])),
            ] {
                for adv in [1.3, -0.8] {
                    let mut c = cfg(lt);
                    c.beta = 0.05;
                    c.kl_ratio = adv > 0.0;
                    c.level = level;
                    c.delta = Some(1.25);
                    let share = StepShare {
                        grad_accum: 2,
                        step_tokens: 7,
                    };
                    let run = |lp: &[f64]| {
                        let s = CompletionTokens {
                            logp: lp,
                            old_logp: Some(&old),
                            ref_logp: Some(&reference),
                            mask: &mask,
                            policy_mask: policy,
                            advantage: adv,
                        };
                        grpo_loss(&c, &[s], share)
                    };
                    let base = run(&logp);
                    for t in 0..logp.len() {
                        let h = 1e-6;
                        let mut p = logp.clone();
                        p[t] += h;
                        let mut m = logp.clone();
                        m[t] -= h;
                        let fd = (run(&p).loss - run(&m).loss) / (2.0 * h);
                        assert!(
                            (fd - base.grad[0][t]).abs() < 1e-6,
                            "{lt:?} {level:?} {policy:?} adv {adv} token {t}: {fd} vs {}",
                            base.grad[0][t]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn high_entropy_tokens_are_the_top_quantile() {
        let e = [0.5, 2.0, 1.0, 3.0, 0.1];
        assert_eq!(high_entropy(&e, 1.0), vec![true; 5]);
        // sorted 0.1 0.5 1 2 3; the 0.6 quantile sits at 2.4 → between 1 and 2: 1.4
        assert_eq!(high_entropy(&e, 0.4), vec![false, true, false, true, false]);
        // exactly on a value: that token stays
        assert_eq!(high_entropy(&e, 0.5), vec![false, true, true, true, false]);
    }

    /// CISPO's weight is detached: the gradient of each counted token's log p is
    /// −min(ratio, ε_high)·A / (step tokens), clipped or not, and its loss is that times log p.
    #[test]
    fn cispo_keeps_every_tokens_gradient_with_a_capped_weight() {
        let logp = vec![-1.0, -0.7, -2.0];
        let old = vec![-1.3, -0.5, -2.5]; // ratios e^0.3, e^-0.2, e^0.5
        let mask = [true, true, true];
        let mut c = cfg(LossType::Cispo);
        c.epsilon_high = 1.4;
        let share = StepShare {
            grad_accum: 1,
            step_tokens: 4,
        };
        let s = CompletionTokens {
            logp: &logp,
            old_logp: Some(&old),
            ref_logp: None,
            mask: &mask,
            policy_mask: None,
            advantage: 2.0,
        };
        let o = grpo_loss(&c, &[s], share);
        let w: Vec<f64> = [0.3f64, -0.2, 0.5]
            .iter()
            .map(|lr| -lr.exp().min(1.4) * 2.0 / 4.0)
            .collect();
        for (t, (g, w)) in o.grad[0].iter().zip(&w).enumerate() {
            assert!((g - w).abs() < 1e-12, "token {t}");
        }
        let loss: f64 = w.iter().zip(&logp).map(|(w, l)| w * l).sum();
        assert!((o.loss - loss).abs() < 1e-12);
        // e^0.5 > 1.4 with A > 0: one clipped token
        assert_eq!(o.high_clipped, 1.0);
    }
}

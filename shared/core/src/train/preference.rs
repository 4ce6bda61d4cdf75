//! Preference objectives on the engine's final hidden states: a reward model's pairwise loss
//! (TRL RewardTrainer) and DPO's losses (TRL DPOTrainer), plus sequence log-probabilities for
//! DPO's reference. Formulas: formats.md §6.1 and §6.3, pinned against TRL 1.16 by
//! tests/fixtures/generate_preference.py.
//!
//! Batch layout, as TRL's collators: the chosen sequences of the pairs first, then the
//! rejected ones in the same order (sequence k and k + pairs form pair k).

use super::engine::{Objective, ObjectiveCtx, StepStats};
use super::loss;
use super::params::{Slot, TrainState};
use crate::error::{Error, Result};

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// log σ(x), stable for large |x|.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// The row whose hidden state a sequence-classification model reads: the right-most token
/// that is not padding (transformers' rule, so with pad = eos a trailing EOS is skipped), or
/// the last token when every token is the pad id.
pub fn score_position(ids: &[u32], pad: Option<u32>) -> usize {
    match pad {
        Some(p) => ids
            .iter()
            .rposition(|&t| t != p)
            .unwrap_or(ids.len().saturating_sub(1)),
        None => ids.len().saturating_sub(1),
    }
}

/// The reward model's scalar score of each sequence: `score · hidden[score_position]`.
pub fn sequence_scores(ctx: &ObjectiveCtx, w: &[f32], pad: Option<u32>) -> Vec<(usize, f32)> {
    let h = ctx.model.config.hidden;
    ctx.batch
        .ids
        .iter()
        .zip(&ctx.seq_rows)
        .map(|(ids, &(first, _))| {
            let row = first + score_position(ids, pad);
            let x = &ctx.hidden[row * h..(row + 1) * h];
            (row, x.iter().zip(w).map(|(a, b)| a * b).sum())
        })
        .collect()
}

/// Scores only (no loss): `rm-score`, evaluation.
pub struct Scores {
    pub pad: Option<u32>,
    pub scores: Vec<f32>,
}

impl Objective for Scores {
    fn apply(
        &mut self,
        ctx: &ObjectiveCtx,
        state: &mut TrainState,
        _dh: &mut [f32],
    ) -> Result<StepStats> {
        let w = state
            .score
            .as_deref()
            .ok_or_else(|| Error::usage("internal: no score head"))?;
        self.scores = sequence_scores(ctx, w, self.pad)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        Ok(StepStats::default())
    }
}

/// TRL RewardTrainer: per pair −log σ(r_c − r_r − margin), plus, when `center` is set,
/// `center · (r_c + r_r)²`; the batch loss is the mean over pairs (scaled by `loss_scale`).
pub struct RewardLoss {
    pub pad: Option<u32>,
    /// Per pair (empty: no margins).
    pub margins: Vec<f32>,
    pub center: Option<f32>,
    /// Multiplies every pair's gradient: 1 / pairs in the accumulation window.
    pub loss_scale: f32,
    /// Filled by `apply`: (r_chosen, r_rejected) per pair.
    pub rewards: Vec<(f32, f32)>,
}

impl Objective for RewardLoss {
    fn apply(
        &mut self,
        ctx: &ObjectiveCtx,
        state: &mut TrainState,
        dh: &mut [f32],
    ) -> Result<StepStats> {
        let h = ctx.model.config.hidden;
        let n = ctx.batch.ids.len();
        if !n.is_multiple_of(2) {
            return Err(Error::usage(
                "internal: a reward batch holds chosen then rejected rows",
            ));
        }
        let pairs = n / 2;
        let w = state
            .score
            .clone()
            .ok_or_else(|| Error::usage("internal: no score head"))?;
        let scores = sequence_scores(ctx, &w, self.pad);
        self.rewards.clear();
        let mut total = 0f64;
        // dL/d(score) per sequence
        let mut g = vec![0f64; n];
        for k in 0..pairs {
            let (rc, rr) = (scores[k].1 as f64, scores[k + pairs].1 as f64);
            let m = self.margins.get(k).copied().unwrap_or(0.0) as f64;
            let d = rc - rr - m;
            let mut loss = -log_sigmoid(d);
            let dd = -sigmoid(-d);
            let (mut gc, mut gr) = (dd, -dd);
            if let Some(c) = self.center {
                let s = rc + rr;
                loss += c as f64 * s * s;
                gc += 2.0 * c as f64 * s;
                gr += 2.0 * c as f64 * s;
            }
            total += loss;
            g[k] = gc * self.loss_scale as f64;
            g[k + pairs] = gr * self.loss_scale as f64;
            self.rewards.push((rc as f32, rr as f32));
        }
        if !total.is_finite() {
            return Err(Error::Numeric(format!(
                "reward loss is not finite ({total}); lower the learning rate"
            )));
        }
        if ctx.backward {
            let mut gw = vec![0f32; h];
            for (&(row, _), &gi) in scores.iter().zip(&g) {
                let gi = gi as f32;
                let x = &ctx.hidden[row * h..(row + 1) * h];
                dh[row * h..(row + 1) * h]
                    .iter_mut()
                    .zip(&w)
                    .for_each(|(d, wv)| *d += gi * wv);
                gw.iter_mut().zip(x).for_each(|(a, b)| *a += gi * b);
            }
            if let Some(gs) = state.grad_mut(Slot::Score) {
                gs.iter_mut().zip(&gw).for_each(|(a, b)| *a += b);
            }
        }
        Ok(StepStats {
            nll_sum: total,
            loss_tokens: pairs,
        })
    }
}

/// The rows predicting each sequence's labelled tokens: (hidden row, target, sequence index).
fn labelled_rows(ctx: &ObjectiveCtx) -> Result<Vec<(usize, u32, usize)>> {
    let vocab = ctx.model.config.vocab;
    let mut rows = Vec::new();
    for (s, (labels, &(first, len))) in ctx.batch.labels.iter().zip(&ctx.seq_rows).enumerate() {
        for j in 0..len.saturating_sub(1) {
            let t = labels[j + 1];
            if t == -100 {
                continue;
            }
            if t < 0 || t as usize >= vocab {
                return Err(Error::usage(format!(
                    "label {t} is outside the vocabulary of {vocab}"
                )));
            }
            rows.push((first + j, t as u32, s));
        }
    }
    Ok(rows)
}

/// Σ log p(label) per sequence (the completion's log-probability, prompt labels −100),
/// with the number of labelled tokens; optionally the gradient of Σ coef(seq)·logp(seq).
fn sequence_logprobs(
    ctx: &ObjectiveCtx,
    state: &mut TrainState,
    dh: Option<&mut [f32]>,
    coef: Option<&[f64]>,
) -> Result<(Vec<f64>, Vec<usize>)> {
    let m = ctx.model;
    let c = &m.config;
    let rows = labelled_rows(ctx)?;
    let pairs: Vec<(usize, u32)> = rows.iter().map(|&(r, t, _)| (r, t)).collect();
    let seq_of: Vec<usize> = rows.iter().map(|&(_, _, s)| s).collect();
    let mut nll = vec![0f64; rows.len()];
    // d(Σ coef·logp)/d(nll_row) = −coef(seq)
    let scale = |i: usize| coef.map_or(0.0, |cf| -cf[seq_of[i]] as f32);
    let head_slot = Slot::lm_head(m);
    let dw = if dh.is_some() {
        state.grad_mut(head_slot).map(|g| &mut g[..])
    } else {
        None
    };
    match ctx.rows_ce {
        // On a device (the GPU engine, which never trains the head).
        Some(ce) => ce.run(&pairs, 1.0, &scale, dh, &mut nll, None, None)?,
        None => loss::cross_entropy_rows(
            ctx.hidden,
            c.hidden,
            loss::Head::of(m, ctx.head_pack),
            c.vocab,
            &pairs,
            &scale,
            dh,
            dw,
            &mut nll,
        ),
    }
    let n = ctx.batch.ids.len();
    let mut logp = vec![0f64; n];
    let mut count = vec![0usize; n];
    for (l, &s) in nll.iter().zip(&seq_of) {
        logp[s] -= l;
        count[s] += 1;
    }
    Ok((logp, count))
}

/// Sequence log-probabilities without gradients (DPO's reference pass, evaluation).
#[derive(Default)]
pub struct SeqLogprobs {
    pub logps: Vec<f64>,
    pub tokens: Vec<usize>,
}

impl Objective for SeqLogprobs {
    fn apply(
        &mut self,
        ctx: &ObjectiveCtx,
        state: &mut TrainState,
        _dh: &mut [f32],
    ) -> Result<StepStats> {
        let (lp, n) = sequence_logprobs(ctx, state, None, None)?;
        self.logps = lp;
        self.tokens = n;
        Ok(StepStats::default())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DpoLoss {
    /// −log σ(βΔ) (DPO)
    Sigmoid,
    /// relu(1 − βΔ) (SLiC)
    Hinge,
    /// (Δ̄ − 1/(2β))² with length-averaged log-ratios (IPO)
    Ipo,
    /// [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε) (robust DPO)
    Robust,
}

impl DpoLoss {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "sigmoid" => Ok(Self::Sigmoid),
            "hinge" => Ok(Self::Hinge),
            "ipo" => Ok(Self::Ipo),
            "robust" => Ok(Self::Robust),
            _ => Err(Error::usage(format!(
                "--loss {s}: expected sigmoid, hinge, ipo or robust"
            ))),
        }
    }
}

/// One pair's DPO loss and its derivatives by (π_c, π_r), from policy and reference
/// log-probabilities summed over the completions of `len_c` and `len_r` tokens.
#[allow(clippy::too_many_arguments)]
pub fn dpo_pair_loss(
    kind: DpoLoss,
    beta: f64,
    label_smoothing: f64,
    pi_c: f64,
    pi_r: f64,
    ref_c: f64,
    ref_r: f64,
    len_c: usize,
    len_r: usize,
) -> (f64, f64, f64) {
    let delta = (pi_c - ref_c) - (pi_r - ref_r);
    let z = beta * delta;
    match kind {
        DpoLoss::Sigmoid => {
            let d = -sigmoid(-z) * beta;
            (-log_sigmoid(z), d, -d)
        }
        DpoLoss::Hinge => {
            let d = if z < 1.0 { -beta } else { 0.0 };
            ((1.0 - z).max(0.0), d, -d)
        }
        DpoLoss::Robust => {
            let e = label_smoothing;
            let loss = (-(1.0 - e) * log_sigmoid(z) + e * log_sigmoid(-z)) / (1.0 - 2.0 * e);
            let dz = (-(1.0 - e) * sigmoid(-z) - e * sigmoid(z)) / (1.0 - 2.0 * e);
            (loss, dz * beta, -dz * beta)
        }
        DpoLoss::Ipo => {
            let (lc, lr) = (len_c.max(1) as f64, len_r.max(1) as f64);
            let avg = (pi_c - ref_c) / lc - (pi_r - ref_r) / lr;
            let u = avg - 1.0 / (2.0 * beta);
            (u * u, 2.0 * u / lc, -2.0 * u / lr)
        }
    }
}

/// DPO on a batch of pairs (chosen rows, then rejected rows), against reference
/// log-probabilities computed beforehand (the base model with the adapter off, or given).
pub struct DpoObjective {
    pub kind: DpoLoss,
    pub beta: f32,
    pub label_smoothing: f32,
    /// (ρ_chosen, ρ_rejected) per pair
    pub reference: Vec<(f64, f64)>,
    /// 1 / pairs in the accumulation window
    pub loss_scale: f32,
    /// Filled by `apply`: (π_c, π_r) per pair.
    pub policy: Vec<(f64, f64)>,
}

impl Objective for DpoObjective {
    fn apply(
        &mut self,
        ctx: &ObjectiveCtx,
        state: &mut TrainState,
        dh: &mut [f32],
    ) -> Result<StepStats> {
        let n = ctx.batch.ids.len();
        let pairs = n / 2;
        if !n.is_multiple_of(2) || self.reference.len() != pairs {
            return Err(Error::usage(
                "internal: DPO batch and reference log-probs disagree",
            ));
        }
        // the policy's log-probs first (no gradient), then the loss's coefficients
        let (lp, len) = sequence_logprobs(ctx, state, None, None)?;
        let mut coef = vec![0f64; n];
        let mut total = 0f64;
        self.policy.clear();
        for k in 0..pairs {
            let (rc, rr) = self.reference[k];
            let (l, dc, dr) = dpo_pair_loss(
                self.kind,
                self.beta as f64,
                self.label_smoothing as f64,
                lp[k],
                lp[k + pairs],
                rc,
                rr,
                len[k],
                len[k + pairs],
            );
            total += l;
            coef[k] = dc * self.loss_scale as f64;
            coef[k + pairs] = dr * self.loss_scale as f64;
            self.policy.push((lp[k], lp[k + pairs]));
        }
        if !total.is_finite() {
            return Err(Error::Numeric(format!(
                "DPO loss is not finite ({total}); lower the learning rate"
            )));
        }
        if ctx.backward {
            sequence_logprobs(ctx, state, Some(dh), Some(&coef))?;
        }
        Ok(StepStats {
            nll_sum: total,
            loss_tokens: pairs,
        })
    }
}

/// A reward-model adapter (LoRA with `score` in modules_to_save, as rm-train and PEFT write
/// it) loaded for scoring.
pub fn load_reward_adapter(
    model: &crate::model::Model,
    dir: &std::path::Path,
) -> Result<TrainState> {
    let mut state = TrainState::new(model.linears().len());
    super::lora::load_adapter(dir, model, &mut state)?;
    let st = dir.join("adapter_model.safetensors");
    let f = crate::io::safetensors_file::SafetensorsFile::open(&st)?;
    let key = "base_model.model.score.weight";
    let t = f.get(key).ok_or_else(|| {
        Error::bad_input(
            &st,
            format!("no {key}: not a reward-model adapter (rm-train writes one; PEFT does for task_type SEQ_CLS)"),
        )
    })?;
    let h = model.config.hidden;
    if t.shape != [1, h] {
        return Err(Error::bad_input(
            &st,
            format!(
                "{key} has shape {:?}; expected [1, {h}] (num_labels 1)",
                t.shape
            ),
        ));
    }
    let score =
        crate::io::safetensors_file::to_f32(key, &t).map_err(|m| Error::bad_input(&st, m))?;
    // A NaN head scores every text NaN (and every comparison false).
    crate::io::safetensors_file::check_finite(key, &score).map_err(|m| Error::bad_input(&st, m))?;
    state.score = Some(score);
    Ok(state)
}

/// Scores of `seqs` (one forward per `batch` sequences) on the CPU.
pub fn score_sequences(
    model: &crate::model::Model,
    state: &mut TrainState,
    seqs: &[Vec<u32>],
    pad: Option<u32>,
    batch: usize,
) -> Result<Vec<f32>> {
    score_sequences_on(
        &mut super::backend::Backend::Cpu,
        model,
        state,
        seqs,
        pad,
        batch,
    )
}

/// [`score_sequences`] where `backend` runs the passes (a GPU built with
/// [`super::backend::Backend::for_eval`] for `model` and `state`); the score head is applied
/// on the host to the final hidden states.
pub fn score_sequences_on(
    backend: &mut super::backend::Backend,
    model: &crate::model::Model,
    state: &mut TrainState,
    seqs: &[Vec<u32>],
    pad: Option<u32>,
    batch: usize,
) -> Result<Vec<f32>> {
    let engine = super::engine::Engine::for_eval(model);
    let mut rng = crate::rng::Rng::new(0);
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch.max(1)) {
        let labels: Vec<Vec<i32>> = chunk.iter().map(|s| vec![-100; s.len()]).collect();
        let b = super::engine::Batch {
            ids: chunk.iter().map(Vec::as_slice).collect(),
            labels: labels.iter().map(Vec::as_slice).collect(),
        };
        let mut obj = Scores {
            pad,
            scores: Vec::new(),
        };
        backend.forward_backward_with(&engine, model, state, &b, &mut rng, false, &mut obj)?;
        out.extend(obj.scores);
    }
    Ok(out)
}

/// The pad id a reward model's score skips at the end of a sequence ([`score_position`]).
///
/// For a `…ForSequenceClassification` folder (`model.config.seq_cls`) it is the folder's
/// config `pad_token_id`, exactly as transformers reads it (rm-train `--method full` writes the
/// pad it trained with there); None when unset, so the last token is scored, as transformers
/// does for one unpadded sequence. For a base model with an rm-train / PEFT SEQ_CLS adapter it
/// is the pad rm-train trains with: the tokenizer's pad, else config `pad_token_id`, else EOS.
pub fn reward_pad(
    model: &crate::model::Model,
    tok: &crate::tokenizer::TextTokenizer,
) -> Option<u32> {
    if model.config.seq_cls {
        model.config.pad_token_id
    } else {
        tok.pad_id().or(model.config.pad_token_id).or(tok.eos_id())
    }
}

/// A transformers sequence-classification checkpoint with one label, loaded for scoring:
/// `LlamaForSequenceClassification`, `MistralForSequenceClassification`,
/// `Qwen2ForSequenceClassification` or `GPT2ForSequenceClassification` as `save_pretrained`
/// writes it (`model.*` / `transformer.*` plus `score.weight` `[1, hidden]`, no bias), or the
/// folder rm-train `--method full` writes. Returns the backbone (no LM head: its LM logits
/// are meaningless) and a state whose `score` is the head; score with [`score_sequences`] and
/// [`reward_pad`]. `quantize` quantizes the backbone's linear weights while loading (the head
/// stays f32).
///
/// An rm-train LoRA adapter is not such a folder: load its base with [`load_reward_adapter`].
pub fn load_reward_model(
    dir: &std::path::Path,
    quantize: Option<crate::model::QuantizeOnLoad>,
) -> Result<(crate::model::Model, TrainState)> {
    let config = crate::model::ModelConfig::load(dir)?;
    if !config.seq_cls {
        let found = config
            .raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .map(|a| format!("architectures[0] is {a}"))
            .unwrap_or_else(|| "config.json names no architectures".into());
        return Err(Error::bad_input(
            dir,
            format!(
                "not a sequence-classification reward model ({found}; expected \
                 LlamaForSequenceClassification, MistralForSequenceClassification, \
                 Qwen2ForSequenceClassification or GPT2ForSequenceClassification); an rm-train \
                 LoRA reward adapter is given with --adapter / --reward-adapter next to its base \
                 model"
            ),
        ));
    }
    let h = config.hidden;
    let score = {
        let w = crate::model::weights::WeightFiles::open(dir)?;
        let key = "score.weight";
        let file = |name: &str| {
            w.file_of(name)
                .map(|f| f.path().to_path_buf())
                .unwrap_or_else(|| dir.to_path_buf())
        };
        if w.contains("score.bias") {
            return Err(Error::bad_input(
                file("score.bias"),
                "tensor score.bias: a score head with a bias is not supported (transformers' \
                 …ForSequenceClassification heads have none)",
            ));
        }
        let t = w.get(key).ok_or_else(|| {
            Error::bad_input(
                dir,
                format!(
                    "tensor {key} is missing: config.json names a sequence-classification model \
                     but the weights have no score head"
                ),
            )
        })?;
        match t.shape[..] {
            [1, k] if k == h => {}
            [n, k] if k == h => {
                return Err(Error::bad_input(
                    file(key),
                    format!(
                        "tensor {key} has shape [{n}, {k}] (num_labels {n}): a reward model \
                         needs one label"
                    ),
                ))
            }
            _ => {
                return Err(Error::bad_input(
                    file(key),
                    format!(
                        "tensor {key} has shape {:?}; expected [1, {h}] (one label, hidden_size \
                         {h})",
                        t.shape
                    ),
                ))
            }
        }
        w.f32(key, &[1, h])?
    };
    let model = crate::model::Model::load_with(dir, quantize)?;
    let mut state = TrainState::new(model.linears().len());
    state.score = Some(score);
    Ok((model, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_position_skips_trailing_padding() {
        assert_eq!(score_position(&[5, 6, 2], Some(2)), 1);
        assert_eq!(score_position(&[5, 2, 6], Some(2)), 2);
        assert_eq!(score_position(&[2, 2], Some(2)), 1);
        assert_eq!(score_position(&[5, 6, 2], None), 2);
    }

    #[test]
    fn dpo_derivatives_match_finite_differences() {
        for kind in [
            DpoLoss::Sigmoid,
            DpoLoss::Hinge,
            DpoLoss::Ipo,
            DpoLoss::Robust,
        ] {
            let f = |pc: f64, pr: f64| dpo_pair_loss(kind, 0.1, 0.1, pc, pr, -12.0, -9.0, 3, 5).0;
            let (_, dc, dr) = dpo_pair_loss(kind, 0.1, 0.1, -10.0, -11.0, -12.0, -9.0, 3, 5);
            let e = 1e-5;
            let nc = (f(-10.0 + e, -11.0) - f(-10.0 - e, -11.0)) / (2.0 * e);
            let nr = (f(-10.0, -11.0 + e) - f(-10.0, -11.0 - e)) / (2.0 * e);
            assert!((nc - dc).abs() < 1e-6 && (nr - dr).abs() < 1e-6, "{kind:?}");
        }
    }
}

//! The training forward pass (keeping what the backward pass needs) and the hand-written
//! backward pass, over the same [`Model`] structure inference uses.
//!
//! Sequences of a batch are concatenated without padding; attention never crosses sequence
//! boundaries. Frozen weights get no gradient buffers; the backward pass stops at the lowest
//! layer that holds a trainable tensor; the LM head and cross-entropy run in chunks of rows
//! that carry a loss, so the full logits never exist.

use super::attention;
use super::loss;
use super::params::{linears_per_block, LoraParams, Slot, TrainState};
use crate::error::{Error, Result};
use crate::kernels::{gemm, ops};
use crate::model::config::{Activation, NormKind};
use crate::model::forward::{act_fn, split_qkv};
use crate::model::linear::Linear;
use crate::model::rope::RopeTable;
use crate::model::{Mlp, Model, Norm, QkvProj};
use crate::rng::Rng;
use rayon::prelude::*;

/// A batch: sequences (token ids) and their labels (−100 = no loss), each label aligned with
/// its token (label i is predicted from tokens < i, as in transformers).
pub struct Batch<'a> {
    pub ids: Vec<&'a [u32]>,
    pub labels: Vec<&'a [i32]>,
}

impl Batch<'_> {
    /// Tokens that carry a loss (label ≠ −100, not the first token of a sequence).
    pub fn loss_tokens(&self) -> usize {
        self.labels
            .iter()
            .map(|l| l.iter().skip(1).filter(|&&v| v != -100).count())
            .sum()
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct StepStats {
    /// Σ of per-token negative log-likelihoods.
    pub nll_sum: f64,
    pub loss_tokens: usize,
}

/// What a training objective sees of a forward pass.
pub struct ObjectiveCtx<'a> {
    pub model: &'a Model,
    /// Final hidden states after the last norm, `[rows, hidden]`, sequences one after another.
    pub hidden: &'a [f32],
    pub batch: &'a Batch<'a>,
    /// Per sequence: the row of its first real token and its number of real tokens (rows of
    /// prompt-tuning virtual tokens come before).
    pub seq_rows: Vec<(usize, usize)>,
    pub n_prompt: usize,
    /// The LM head packed for the forward product, when the caller packed it.
    pub head_pack: Option<&'a gemm::PackedWeight>,
    /// Whether gradients are wanted (false in evaluation).
    pub backward: bool,
    /// Where the hidden states live on a device (the GPU engine): the LM head's
    /// cross-entropy on chosen rows runs there. None: compute it from `hidden`.
    pub rows_ce: Option<&'a dyn RowsCrossEntropy>,
}

/// The LM head's cross-entropy on rows of the final hidden states, computed where they live
/// (see [`loss::cross_entropy_rows`] for the same on the host, with the same contract).
pub trait RowsCrossEntropy {
    /// `rows[i] = (row, target)`, logits taken times `inv_temperature` (1 for plain
    /// log-likelihoods): writes row i's negative log-likelihood into `losses[i]`; with `dh`
    /// (`[rows, hidden]`), adds dL/d(hidden) of L = Σ scale(i)·nll_i into it; with
    /// `entropies`, writes each row's entropy of the (tempered) distribution there; with
    /// `dentropy` (and `dh`), L gains Σ dentropy[i]·H_i (GRPO's entropy bonus).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        rows: &[(usize, u32)],
        inv_temperature: f32,
        scale: &(dyn Fn(usize) -> f32 + Sync),
        dh: Option<&mut [f32]>,
        losses: &mut [f64],
        entropies: Option<&mut [f64]>,
        dentropy: Option<&[f32]>,
    ) -> Result<()>;
}

/// A loss of the final hidden states. `apply` returns its statistics and, when
/// `ctx.backward`, adds dL/d(hidden) into `dh` and the gradients of any head it owns.
pub trait Objective {
    fn apply(
        &mut self,
        ctx: &ObjectiveCtx,
        state: &mut TrainState,
        dh: &mut [f32],
    ) -> Result<StepStats>;
}

/// Next-token cross-entropy on the batch labels (causal LM training).
pub struct NextToken {
    pub loss_scale: f32,
}

impl Objective for NextToken {
    fn apply(
        &mut self,
        ctx: &ObjectiveCtx,
        state: &mut TrainState,
        dh: &mut [f32],
    ) -> Result<StepStats> {
        let m = ctx.model;
        let c = &m.config;
        let n_prompt = ctx.n_prompt;
        // Loss over the rows that predict a labelled token.
        let mut rows = Vec::new();
        for (labels, &(first, len)) in ctx.batch.labels.iter().zip(&ctx.seq_rows) {
            let start = first - n_prompt;
            for j in 0..(len + n_prompt).saturating_sub(1) {
                // Virtual tokens carry no label; the last one predicts the first real token.
                let t = if j + 1 < n_prompt {
                    -100
                } else {
                    labels[j + 1 - n_prompt]
                };
                if t != -100 {
                    if t < 0 || t as usize >= c.vocab {
                        return Err(Error::usage(format!(
                            "label {t} is outside the vocabulary of {}",
                            c.vocab
                        )));
                    }
                    rows.push((start + j, t as u32));
                }
            }
        }
        let head_slot = Slot::lm_head(m);
        let _p = crate::profile::scope("loss_head");
        let mut per_row = vec![0f64; rows.len()];
        let scale = self.loss_scale;
        // evaluation skips the gradient products of the head (a third of its work)
        let (dh, dw) = if ctx.backward {
            (Some(dh), state.grad_mut(head_slot).map(|g| &mut g[..]))
        } else {
            (None, None)
        };
        loss::cross_entropy_rows(
            ctx.hidden,
            c.hidden,
            loss::Head::of(m, ctx.head_pack),
            c.vocab,
            &rows,
            &|_| scale,
            dh,
            dw,
            &mut per_row,
        );
        let nll_sum: f64 = per_row.iter().sum();
        if !nll_sum.is_finite() {
            return Err(Error::Numeric(format!(
                "loss is not finite ({nll_sum}); lower the learning rate or check the data"
            )));
        }
        Ok(StepStats {
            nll_sum,
            loss_tokens: rows.len(),
        })
    }
}

#[derive(Clone, Copy)]
pub(super) struct Span {
    pub start: usize,
    pub len: usize,
}

/// What a linear layer's backward pass needs beyond its input.
#[derive(Default)]
struct LinSaved {
    /// s·x·Aᵀ of the (dropped-out) input, `[rows, r]` (the LoRA scale applied)
    su: Option<Vec<f32>>,
    /// dropout keep-scale per input element (0 or 1/(1−p)), `[rows, in]`
    keep: Option<Vec<f32>>,
    /// IA3 on the output: the layer output before the scaling, `[rows, out]`.
    ia3_pre: Option<Vec<f32>>,
    /// DoRA: pre-scale output `x·Wᵀ + s·B·A·x` `[rows, out]`, and the row norms of W + sBA.
    dora_z: Option<Vec<f32>>,
    dora_norm: Option<Vec<f32>>,
}

struct NormSaved {
    /// 1/rms (RMSNorm) or 1/std (LayerNorm) per row
    inv: Vec<f32>,
    /// LayerNorm mean per row
    mean: Option<Vec<f32>>,
}

struct LayerSaved {
    /// Bottleneck adapters after attention and after the MLP.
    ad_attn: Option<AdapterSaved>,
    ad_mlp: Option<AdapterSaved>,
    x_in: Vec<f32>,
    n1: Vec<f32>,
    s1: NormSaved,
    qkv_saved: Vec<LinSaved>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention probabilities per (sequence, head), `[len, len]`.
    probs: Vec<Vec<f32>>,
    attn: Vec<f32>,
    o_saved: LinSaved,
    x_mid: Vec<f32>,
    n2: Vec<f32>,
    s2: NormSaved,
    /// gate pre-activation (gated) or fc output (plain)
    pre: Vec<f32>,
    pre_saved: LinSaved,
    /// up projection (gated only)
    up: Vec<f32>,
    up_saved: LinSaved,
    act: Vec<f32>,
    down_saved: LinSaved,
}

/// Training step machinery bound to one model and its trainable state.
pub struct Engine<'m> {
    pub model: &'m Model,
    lpb: usize,
    /// Lowest block whose backward pass is needed.
    stop_layer: usize,
    embed_grad: bool,
    /// False for evaluation: forward and loss only, no gradients touched.
    backward: bool,
    /// The LM head weight packed for the forward product (see [`Engine::with_head_pack`]).
    head_pack: Option<&'m gemm::PackedWeight>,
}

impl<'m> Engine<'m> {
    pub fn new(model: &'m Model, state: &TrainState) -> Self {
        let lpb = linears_per_block(model);
        let nb = model.blocks.len();
        // Prompt tuning needs the gradient of the input rows (its virtual tokens).
        let embed_grad = state.is_trainable(Slot::Embedding)
            || state.is_trainable(Slot::PositionEmbedding)
            || state.prompt.is_some();
        let mut stop = nb;
        for l in 0..nb {
            let adapters = state
                .bottleneck
                .as_ref()
                .is_some_and(|b| b.unit(l, 0).is_some() || b.unit(l, 1).is_some());
            let lin_trainable = adapters
                || (l * lpb..(l + 1) * lpb).any(|i| {
                    state.lora[i].is_some()
                        || state.ia3[i].is_some()
                        || state.is_trainable(Slot::LinearWeight(i))
                        || state.is_trainable(Slot::LinearBias(i))
                });
            let norm_trainable = [2 * l, 2 * l + 1].iter().any(|&n| {
                state.is_trainable(Slot::NormWeight(n)) || state.is_trainable(Slot::NormBias(n))
            });
            if lin_trainable || norm_trainable {
                stop = l;
                break;
            }
        }
        // A prefix enters every layer's attention.
        if embed_grad || state.prefix.is_some() {
            stop = 0;
        }
        Self {
            model,
            lpb,
            stop_layer: stop,
            embed_grad,
            backward: true,
            head_pack: None,
        }
    }

    /// An engine that only computes the loss (evaluation): nothing is kept for a backward
    /// pass and no gradient changes.
    pub fn for_eval(model: &'m Model) -> Self {
        Self {
            model,
            lpb: linears_per_block(model),
            stop_layer: model.blocks.len(),
            embed_grad: false,
            backward: false,
            head_pack: None,
        }
    }

    /// Use `p`, the current head weight ([`Model::head_weight`]) packed by
    /// [`gemm::PackedWeight::repack`], for the loss: packing the 49k×576 head of a small model
    /// once per step instead of once per chunk of rows saves a sizeable share of the step.
    /// Ignored when the model has a bf16 head ([`Model::use_bf16_head`]), which then carries
    /// the loss's products (and the trainers leave `p` empty).
    pub fn with_head_pack(mut self, p: &'m gemm::PackedWeight) -> Self {
        if self.model.head_bf16.is_some() {
            return self;
        }
        assert_eq!(
            (p.n(), p.k()),
            (self.model.config.vocab, self.model.config.hidden),
            "head pack shape"
        );
        self.head_pack = Some(p);
        self
    }

    /// Model FLOPs of [`Engine::forward_backward`] over `batch` (see [`super::flops`]).
    pub fn flops(&self, state: &TrainState, batch: &Batch) -> super::flops::Flops {
        let stop = if self.backward {
            self.stop_layer
        } else {
            self.model.blocks.len()
        };
        super::flops::batch_flops(self.model, state, batch, stop, self.backward)
    }

    /// Forward and backward over one micro-batch for next-token prediction. Gradients are
    /// accumulated (added) into `state`, scaled by `loss_scale` (1 / loss tokens of the whole
    /// accumulation window).
    pub fn forward_backward(
        &self,
        state: &mut TrainState,
        batch: &Batch,
        loss_scale: f32,
        rng: &mut Rng,
    ) -> Result<StepStats> {
        if crate::profile::enabled() {
            let f = self.flops(state, batch);
            crate::profile::flops("lin_forward", f.linear_forward);
            crate::profile::flops("lin_backward", f.linear_backward);
            crate::profile::flops("attention_forward", f.attention_forward);
            crate::profile::flops("attention_backward", f.attention_backward);
            crate::profile::flops("loss_head", f.head);
            crate::profile::flops("step.forward_backward", f.total());
        }
        self.forward_backward_with(state, batch, rng, &mut NextToken { loss_scale })
    }

    /// Forward and backward over one micro-batch for any objective of the final hidden states
    /// (next-token prediction, a reward model's score, DPO's sequence log-probabilities).
    pub fn forward_backward_with(
        &self,
        state: &mut TrainState,
        batch: &Batch,
        rng: &mut Rng,
        objective: &mut dyn Objective,
    ) -> Result<StepStats> {
        let m = self.model;
        let c = &m.config;
        let (h, qd, kvd) = (c.hidden, c.q_dim(), c.kv_dim());
        // Prompt tuning: n virtual tokens in front of every sequence (positions 0..n).
        let n_prompt = state.prompt.as_ref().map_or(0, |p| p.n);
        let mut spans = Vec::new();
        let mut total = 0;
        for (ids, labels) in batch.ids.iter().zip(&batch.labels) {
            if ids.len() != labels.len() {
                return Err(Error::usage("internal: ids and labels differ in length"));
            }
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= c.vocab) {
                return Err(Error::usage(format!(
                    "token id {bad} is outside the model's vocabulary of {}",
                    c.vocab
                )));
            }
            if c.rope.is_none() && n_prompt + ids.len() > c.max_positions {
                return Err(Error::usage(format!(
                    "sequence of {} tokens is longer than the model's {} positions",
                    n_prompt + ids.len(),
                    c.max_positions
                )));
            }
            spans.push(Span {
                start: total,
                len: n_prompt + ids.len(),
            });
            total += n_prompt + ids.len();
        }
        let max_len = spans.iter().map(|s| s.len).max().unwrap_or(0);
        // Prefix tuning: the prefix's keys/values, and the sequence's positions start after it.
        let prefix_vals = state.prefix.as_ref().map(|p| p.values());
        let (n_prefix, prefix_stride, prefix_kv) = match &state.prefix {
            Some(p) => (p.n, p.out_dim(), p.kv_dim),
            None => (0, 0, 0),
        };
        let prefix_at = |li: usize| {
            prefix_vals.as_ref().map(|v| attention::PrefixKv {
                data: &v.p,
                n: n_prefix,
                stride: prefix_stride,
                k_off: 2 * li * prefix_kv,
                v_off: (2 * li + 1) * prefix_kv,
            })
        };
        let rope =
            (!m.inv_freq.is_empty()).then(|| RopeTable::new(&m.inv_freq, max_len + n_prefix));

        // Embeddings.
        let mut x = vec![0.0f32; total * h];
        for (ids, span) in batch.ids.iter().zip(&spans) {
            for j in 0..span.len {
                let row = &mut x[(span.start + j) * h..(span.start + j + 1) * h];
                if j < n_prompt {
                    let p = state.prompt.as_ref().expect("prompt");
                    row.copy_from_slice(&p.emb[j * h..(j + 1) * h]);
                } else {
                    let id = ids[j - n_prompt] as usize;
                    row.copy_from_slice(&m.embed[id * h..(id + 1) * h]);
                }
                if let Some(pe) = &m.pos_embed {
                    let pos = n_prefix + j;
                    if pos >= c.max_positions {
                        return Err(Error::usage(format!(
                            "prefix and sequence of {} tokens exceed the model's {} positions",
                            n_prefix + ids.len(),
                            c.max_positions
                        )));
                    }
                    row.iter_mut()
                        .zip(&pe[pos * h..(pos + 1) * h])
                        .for_each(|(a, b)| *a += b);
                }
            }
        }

        // Blocks.
        let _pf = crate::profile::scope("forward_blocks");
        let mut saved: Vec<Option<LayerSaved>> = Vec::with_capacity(m.blocks.len());
        for (li, block) in m.blocks.iter().enumerate() {
            let keep = li >= self.stop_layer;
            let base = li * self.lpb;
            let (n1, s1) = norm_forward(&block.attn_norm, c.norm, &x);
            let mut qkv_saved = Vec::new();
            let (mut q, mut k, v) = match &block.attn.qkv {
                QkvProj::Separate { q, k, v } => {
                    let (yq, sq) = lin_forward(q, state, base, &n1, total, rng);
                    let (yk, sk) = lin_forward(k, state, base + 1, &n1, total, rng);
                    let (yv, sv) = lin_forward(v, state, base + 2, &n1, total, rng);
                    qkv_saved.extend([sq, sk, sv]);
                    (yq, yk, yv)
                }
                QkvProj::Fused(l) => {
                    let (y, s) = lin_forward(l, state, base, &n1, total, rng);
                    qkv_saved.push(s);
                    split_qkv(&y, total, qd, kvd)
                }
            };
            if let Some(rope) = &rope {
                for span in &spans {
                    for j in 0..span.len {
                        let t = span.start + j;
                        rope.apply(&mut q[t * qd..(t + 1) * qd], n_prefix + j);
                        rope.apply(&mut k[t * kvd..(t + 1) * kvd], n_prefix + j);
                    }
                }
            }
            let window = c.sliding_window[li];
            let (attn, probs) =
                attention::forward(c, window, &q, &k, &v, &spans, total, prefix_at(li));
            let o_idx = base + qkv_saved.len();
            let (mut o_out, o_saved) = lin_forward(&block.attn.o, state, o_idx, &attn, total, rng);
            let ad_attn = adapter_forward(state, li, 0, &n1, &mut o_out, total);
            let x_in = if keep { x.clone() } else { Vec::new() };
            ops::add_assign(&mut x, &o_out);
            let (n2, s2) = norm_forward(&block.mlp_norm, c.norm, &x);
            let x_mid = if keep { x.clone() } else { Vec::new() };
            let (pre, pre_saved, up, up_saved, act, down_out, down_saved) = match &block.mlp {
                Mlp::Gated { gate, up, down } => {
                    let (g, gs) = lin_forward(gate, state, o_idx + 1, &n2, total, rng);
                    let (u, us) = lin_forward(up, state, o_idx + 2, &n2, total, rng);
                    let mut a = vec![0.0f32; g.len()];
                    match c.act {
                        Activation::Silu => ops::swiglu(&g, &u, &mut a),
                        act => {
                            let f = act_fn(act);
                            a.iter_mut()
                                .zip(g.iter().zip(&u))
                                .for_each(|(o, (g, u))| *o = f(*g) * u);
                        }
                    }
                    let (d, ds) = lin_forward(down, state, o_idx + 3, &a, total, rng);
                    (g, gs, u, us, a, d, ds)
                }
                Mlp::Plain { fc, proj } => {
                    let (f, fs) = lin_forward(fc, state, o_idx + 1, &n2, total, rng);
                    let mut a = f.clone();
                    ops::activate(&mut a, act_fn(c.act));
                    let (d, ds) = lin_forward(proj, state, o_idx + 2, &a, total, rng);
                    (f, fs, Vec::new(), LinSaved::default(), a, d, ds)
                }
            };
            let mut down_out = down_out;
            let ad_mlp = adapter_forward(state, li, 1, &n2, &mut down_out, total);
            ops::add_assign(&mut x, &down_out);
            saved.push(keep.then_some(LayerSaved {
                ad_attn,
                ad_mlp,
                x_in,
                n1,
                s1,
                qkv_saved,
                q,
                k,
                v,
                probs,
                attn,
                o_saved,
                x_mid,
                n2,
                s2,
                pre,
                pre_saved,
                up,
                up_saved,
                act,
                down_saved,
            }));
        }
        drop(_pf);
        let (hf, sf) = norm_forward(&m.final_norm, c.norm, &x);

        // The objective: a loss of the final hidden states and its gradient dL/dh.
        let mut dh = vec![0.0f32; total * h];
        let ctx = ObjectiveCtx {
            model: m,
            hidden: &hf,
            batch,
            seq_rows: spans
                .iter()
                .map(|s| (s.start + n_prompt, s.len - n_prompt))
                .collect(),
            n_prompt,
            head_pack: self.head_pack,
            backward: self.backward,
            rows_ce: None,
        };
        let stats = objective.apply(&ctx, state, &mut dh)?;
        if !self.backward {
            return Ok(stats);
        }
        // Backward.
        let _pb = crate::profile::scope("backward_blocks");
        let nb = m.blocks.len();
        let mut dx = norm_backward(&m.final_norm, c.norm, &x, &sf, &dh, state, 2 * nb);
        let mut dp_prefix = prefix_vals.as_ref().map(|v| vec![0.0f32; v.p.len()]);
        drop(dh);
        for li in (self.stop_layer..nb).rev() {
            let block = &m.blocks[li];
            let s = saved[li].take().expect("saved layer");
            let base = li * self.lpb;
            let o_idx = base + s.qkv_saved.len();
            // The lowest block needs dL/d(norm output) when something below trains, or when
            // its own attention norm does (its weight gradient comes from that).
            let need_input_grad = li > self.stop_layer
                || self.embed_grad
                || state.is_trainable(Slot::NormWeight(2 * li))
                || state.is_trainable(Slot::NormBias(2 * li));
            // MLP (and the adapter on its output)
            let (dy_mlp, par_mlp) =
                adapter_backward(state, li, 1, &s.n2, s.ad_mlp.as_ref(), &dx, total);
            let mut dn2 = match &block.mlp {
                Mlp::Gated { gate, up, down } => {
                    let da = lin_backward(
                        down,
                        o_idx + 3,
                        &s.act,
                        &s.down_saved,
                        &dy_mlp,
                        total,
                        state,
                        true,
                    )
                    .expect("dx");
                    let _pa = crate::profile::scope("act_backward");
                    let mut dg = vec![0.0f32; da.len()];
                    let mut du = vec![0.0f32; da.len()];
                    match c.act {
                        Activation::Silu => {
                            ops::swiglu_backward(&s.pre, &s.up, &da, &mut dg, &mut du)
                        }
                        act => gated_act_backward(act, &s.pre, &s.up, &da, &mut dg, &mut du),
                    }
                    drop(_pa);
                    let mut dn = lin_backward(
                        gate,
                        o_idx + 1,
                        &s.n2,
                        &s.pre_saved,
                        &dg,
                        total,
                        state,
                        true,
                    )
                    .expect("dx");
                    let dnu =
                        lin_backward(up, o_idx + 2, &s.n2, &s.up_saved, &du, total, state, true)
                            .expect("dx");
                    ops::add_assign(&mut dn, &dnu);
                    dn
                }
                Mlp::Plain { fc, proj } => {
                    let mut da = lin_backward(
                        proj,
                        o_idx + 2,
                        &s.act,
                        &s.down_saved,
                        &dy_mlp,
                        total,
                        state,
                        true,
                    )
                    .expect("dx");
                    let d = act_derivative(c.act);
                    da.iter_mut().zip(&s.pre).for_each(|(g, &p)| *g *= d(p));
                    lin_backward(fc, o_idx + 1, &s.n2, &s.pre_saved, &da, total, state, true)
                        .expect("dx")
                }
            };
            if let Some(d) = par_mlp {
                ops::add_assign(&mut dn2, &d);
            }
            let dmid = norm_backward(
                &block.mlp_norm,
                c.norm,
                &s.x_mid,
                &s.s2,
                &dn2,
                state,
                2 * li + 1,
            );
            ops::add_assign(&mut dx, &dmid);
            // Attention (and the adapter on its output)
            let (dy_attn, par_attn) =
                adapter_backward(state, li, 0, &s.n1, s.ad_attn.as_ref(), &dx, total);
            let dattn = lin_backward(
                &block.attn.o,
                o_idx,
                &s.attn,
                &s.o_saved,
                &dy_attn,
                total,
                state,
                true,
            )
            .expect("dx");
            let (mut dq, mut dk, dv, dprefix) = attention::backward(
                c,
                c.sliding_window[li],
                &s.q,
                &s.k,
                &s.v,
                &s.probs,
                &dattn,
                &spans,
                total,
                prefix_at(li),
            );
            if let (Some((dpk, dpv)), Some(dp)) = (dprefix, dp_prefix.as_mut()) {
                let kv = prefix_kv;
                for t in 0..n_prefix {
                    let r = t * prefix_stride;
                    let (ko, vo) = (r + 2 * li * kv, r + (2 * li + 1) * kv);
                    dp[ko..ko + kv]
                        .iter_mut()
                        .zip(&dpk[t * kv..(t + 1) * kv])
                        .for_each(|(a, b)| *a += b);
                    dp[vo..vo + kv]
                        .iter_mut()
                        .zip(&dpv[t * kv..(t + 1) * kv])
                        .for_each(|(a, b)| *a += b);
                }
            }
            if let Some(rope) = &rope {
                for span in &spans {
                    for j in 0..span.len {
                        let t = span.start + j;
                        rope_backward(rope, &mut dq[t * qd..(t + 1) * qd], n_prefix + j);
                        rope_backward(rope, &mut dk[t * kvd..(t + 1) * kvd], n_prefix + j);
                    }
                }
            }
            let dn1 = match &block.attn.qkv {
                QkvProj::Separate { q, k, v } => {
                    let a = lin_backward(
                        q,
                        base,
                        &s.n1,
                        &s.qkv_saved[0],
                        &dq,
                        total,
                        state,
                        need_input_grad,
                    );
                    let b = lin_backward(
                        k,
                        base + 1,
                        &s.n1,
                        &s.qkv_saved[1],
                        &dk,
                        total,
                        state,
                        need_input_grad,
                    );
                    let cc = lin_backward(
                        v,
                        base + 2,
                        &s.n1,
                        &s.qkv_saved[2],
                        &dv,
                        total,
                        state,
                        need_input_grad,
                    );
                    match (a, b, cc) {
                        (Some(mut a), Some(b), Some(cc)) => {
                            ops::add_assign(&mut a, &b);
                            ops::add_assign(&mut a, &cc);
                            Some(a)
                        }
                        _ => None,
                    }
                }
                QkvProj::Fused(l) => {
                    let dy = join3(&dq, &dk, &dv, total, qd, kvd);
                    lin_backward(
                        l,
                        base,
                        &s.n1,
                        &s.qkv_saved[0],
                        &dy,
                        total,
                        state,
                        need_input_grad,
                    )
                }
            };
            if let Some(mut dn1) = dn1 {
                if let Some(d) = par_attn {
                    ops::add_assign(&mut dn1, &d);
                }
                let din = norm_backward(
                    &block.attn_norm,
                    c.norm,
                    &s.x_in,
                    &s.s1,
                    &dn1,
                    state,
                    2 * li,
                );
                ops::add_assign(&mut dx, &din);
            } else {
                // The lowest block, and neither its norm nor anything below it trains.
                break;
            }
        }
        if let (Some(vals), Some(dp)) = (&prefix_vals, &dp_prefix) {
            super::prefix::backward(state, vals, dp);
        }
        if self.embed_grad {
            if let Some(g) = state.grad_mut(Slot::PromptEmbedding) {
                for span in &spans {
                    for j in 0..n_prompt {
                        let src = &dx[(span.start + j) * h..(span.start + j + 1) * h];
                        g[j * h..(j + 1) * h]
                            .iter_mut()
                            .zip(src)
                            .for_each(|(a, b)| *a += b);
                    }
                }
            }
            if let Some(g) = state.grad_mut(Slot::Embedding) {
                for (ids, span) in batch.ids.iter().zip(&spans) {
                    for (j, &id) in ids.iter().enumerate() {
                        let r = span.start + n_prompt + j;
                        let src = &dx[r * h..(r + 1) * h];
                        g[id as usize * h..(id as usize + 1) * h]
                            .iter_mut()
                            .zip(src)
                            .for_each(|(a, b)| *a += b);
                    }
                }
            }
            if let Some(g) = state.grad_mut(Slot::PositionEmbedding) {
                for span in &spans {
                    for j in 0..span.len {
                        let src = &dx[(span.start + j) * h..(span.start + j + 1) * h];
                        g[j * h..(j + 1) * h]
                            .iter_mut()
                            .zip(src)
                            .for_each(|(a, b)| *a += b);
                    }
                }
            }
        }
        Ok(stats)
    }
}

/// y = x·Wᵀ (+ LoRA/DoRA) + b, keeping what the backward pass needs.
fn lin_forward(
    l: &Linear,
    state: &TrainState,
    idx: usize,
    x: &[f32],
    rows: usize,
    rng: &mut Rng,
) -> (Vec<f32>, LinSaved) {
    let lora = state.lora[idx].as_ref();
    let (inp, out) = (l.in_features, l.out_features);
    let mut y = vec![0.0f32; rows * out];
    let _p = crate::profile::scope("lin_forward");
    let mut saved = LinSaved::default();
    if let Some(ia3) = &state.ia3[idx] {
        // IA3: scale the input (feed-forward) or the output, bias included (PEFT's order).
        if ia3.feedforward {
            let xs = ops::scale_columns(x, &ia3.l);
            l.matmul_base(&xs, rows, &mut y, false);
            if let Some(b) = &l.bias {
                ops::add_bias(&mut y, b);
            }
        } else {
            l.matmul_base(x, rows, &mut y, false);
            if let Some(b) = &l.bias {
                ops::add_bias(&mut y, b);
            }
            saved.ia3_pre = Some(y.clone());
            ops::scale_columns_in_place(&mut y, &ia3.l);
        }
        return (y, saved);
    }
    l.matmul_base(x, rows, &mut y, false);
    if let Some(lo) = lora {
        let xd_owned;
        let xd: &[f32] = if lo.dropout > 0.0 {
            let scale = 1.0 / (1.0 - lo.dropout);
            let keep: Vec<f32> = (0..x.len())
                .map(|_| {
                    if rng.uniform() < lo.dropout {
                        0.0
                    } else {
                        scale
                    }
                })
                .collect();
            xd_owned = x.iter().zip(&keep).map(|(a, k)| a * k).collect::<Vec<_>>();
            saved.keep = Some(keep);
            &xd_owned
        } else {
            x
        };
        // u = x·Aᵀ, y += (s·u)·Bᵀ: thin products (rank r) without packing the activations.
        let r = lo.rank;
        let mut u = vec![0.0f32; rows * r];
        let a_rows = gemm::RowPanels::new(&lo.a, r, inp, inp);
        gemm::small_nt(rows, xd, inp, 1, &a_rows, 0, r, &mut u, r, false);
        u.iter_mut().for_each(|v| *v *= lo.scale);
        let su = u;
        let b_rows = gemm::RowPanels::new(&lo.b, out, r, r);
        gemm::small_nt(rows, &su, r, 1, &b_rows, 0, out, &mut y, out, true);
        match &lo.magnitude {
            None => {}
            Some(mag) => {
                let norm = dora_weight_norm(l, lo);
                let z = y.clone();
                for row in y.chunks_exact_mut(out) {
                    for ((v, m), n) in row.iter_mut().zip(mag).zip(&norm) {
                        *v *= m / n;
                    }
                }
                saved.dora_z = Some(z);
                saved.dora_norm = Some(norm);
            }
        }
        saved.su = Some(su);
    }
    if let Some(b) = &l.bias {
        ops::add_bias(&mut y, b);
    }
    (y, saved)
}

/// What a bottleneck adapter's backward pass needs.
struct AdapterSaved {
    unit: super::bottleneck::UnitSaved,
    /// Sequential adapters: the sub-layer output they read (before their addition).
    src: Option<Vec<f32>>,
}

/// Add the bottleneck adapter of (block, site), if any, to the sub-layer output `h` (whose
/// input was `input`).
fn adapter_forward(
    state: &TrainState,
    block: usize,
    site: usize,
    input: &[f32],
    h: &mut [f32],
    rows: usize,
) -> Option<AdapterSaved> {
    let bp = state.bottleneck.as_ref()?;
    let u = bp.unit(block, site)?;
    let src = (!bp.parallel()).then(|| h.to_vec());
    let (out, unit) =
        super::bottleneck::forward_unit(u, bp.activation, src.as_deref().unwrap_or(input), rows);
    ops::add_assign(h, &out);
    Some(AdapterSaved { unit, src })
}

/// Backward through the adapter of (block, site): the gradient for the sub-layer output below
/// it and, for a parallel adapter, the gradient of the sub-layer input.
fn adapter_backward<'a>(
    state: &mut TrainState,
    block: usize,
    site: usize,
    input: &[f32],
    saved: Option<&AdapterSaved>,
    dout: &'a [f32],
    rows: usize,
) -> (std::borrow::Cow<'a, [f32]>, Option<Vec<f32>>) {
    use std::borrow::Cow;
    let Some(sv) = saved else {
        return (Cow::Borrowed(dout), None);
    };
    let src = sv.src.as_deref().unwrap_or(input);
    let dsrc = super::bottleneck::backward_unit(state, block, site, src, &sv.unit, dout, rows);
    match sv.src {
        // h' = h + adapter(h): dL/dh = dL/dh' + adapter's input gradient
        Some(_) => {
            let mut d = dout.to_vec();
            ops::add_assign(&mut d, &dsrc);
            (Cow::Owned(d), None)
        }
        None => (Cow::Borrowed(dout), Some(dsrc)),
    }
}

/// Backward through an IA3-scaled linear layer: the vector's gradient and dL/dx.
#[allow(clippy::too_many_arguments)]
fn ia3_backward(
    l: &Linear,
    idx: usize,
    ia3: &super::ia3::Ia3Params,
    x: &[f32],
    saved: &LinSaved,
    dy: &[f32],
    rows: usize,
    state: &mut TrainState,
    need_dx: bool,
) -> Option<Vec<f32>> {
    let (inp, out) = (l.in_features, l.out_features);
    if ia3.feedforward {
        // y = (x ⊙ l)·Wᵀ + b: d(x⊙l) = dy·W; dl = Σ_rows d(x⊙l) ⊙ x; dx = d(x⊙l) ⊙ l
        let mut dxs = vec![0.0f32; rows * inp];
        l.matmul_base_backward(dy, rows, &mut dxs, false);
        if let Some(g) = state.grad_mut(Slot::Ia3(idx)) {
            for (dr, xr) in dxs.chunks_exact(inp).zip(x.chunks_exact(inp)) {
                for ((g, d), xv) in g.iter_mut().zip(dr).zip(xr) {
                    *g += d * xv;
                }
            }
        }
        need_dx.then(|| {
            ops::scale_columns_in_place(&mut dxs, &ia3.l);
            dxs
        })
    } else {
        // y = (x·Wᵀ + b) ⊙ l: dl = Σ_rows dy ⊙ pre; d(pre) = dy ⊙ l
        let pre = saved.ia3_pre.as_ref().expect("ia3 pre-scale output");
        if let Some(g) = state.grad_mut(Slot::Ia3(idx)) {
            for (dr, pr) in dy.chunks_exact(out).zip(pre.chunks_exact(out)) {
                for ((g, d), p) in g.iter_mut().zip(dr).zip(pr) {
                    *g += d * p;
                }
            }
        }
        let dpre = ops::scale_columns(dy, &ia3.l);
        if let Some(g) = state.grad_mut(Slot::LinearBias(idx)) {
            for row in dpre.chunks_exact(out) {
                g.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
        }
        need_dx.then(|| {
            let mut dx = vec![0.0f32; rows * inp];
            l.matmul_base_backward(&dpre, rows, &mut dx, false);
            dx
        })
    }
}

/// Row norms of W + s·B·A (DoRA's weight norm, treated as a constant for gradients).
pub fn dora_weight_norm(l: &Linear, lo: &LoraParams) -> Vec<f32> {
    let (inp, out, r) = (lo.in_features, lo.out_features, lo.rank);
    let mut ba = vec![0.0f32; out * inp];
    gemm::matmul_nn(&lo.b, &lo.a, &mut ba, out, inp, r, false);
    let mut wr = vec![0.0f32; inp];
    (0..out)
        .map(|o| {
            l.weight_row(o, &mut wr);
            let br = &ba[o * inp..(o + 1) * inp];
            wr.iter()
                .zip(br)
                .map(|(a, b)| {
                    let v = a + lo.scale * b;
                    v * v
                })
                .sum::<f32>()
                .sqrt()
        })
        .collect()
}

/// Backward through a linear layer: accumulates the gradients of its trainable tensors and
/// returns dL/dx when asked.
#[allow(clippy::too_many_arguments)]
fn lin_backward(
    l: &Linear,
    idx: usize,
    x: &[f32],
    saved: &LinSaved,
    dy: &[f32],
    rows: usize,
    state: &mut TrainState,
    need_dx: bool,
) -> Option<Vec<f32>> {
    let _p = crate::profile::scope("lin_backward");
    let (inp, out) = (l.in_features, l.out_features);
    if let Some(ia3) = state.ia3[idx].take() {
        let r = ia3_backward(l, idx, &ia3, x, saved, dy, rows, state, need_dx);
        state.ia3[idx] = Some(ia3);
        return r;
    }
    if let Some(g) = state.grad_mut(Slot::LinearBias(idx)) {
        for row in dy.chunks_exact(out) {
            g.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
    }
    // The adapter is moved out of the state while its gradients are accumulated into the same
    // state (no copy of A and B), and put back at the end.
    let lora = state.lora[idx].take();
    // DoRA rescales the whole (base + LoRA) output per output feature.
    let scaled_dy;
    let dy: &[f32] = match (&saved.dora_z, &saved.dora_norm) {
        (Some(z), Some(norm)) => {
            let mag = lora
                .as_ref()
                .and_then(|lo| lo.magnitude.as_deref())
                .expect("magnitude");
            let mut dm = vec![0.0f32; out];
            for (zr, dr) in z.chunks_exact(out).zip(dy.chunks_exact(out)) {
                for o in 0..out {
                    dm[o] += dr[o] * zr[o] / norm[o];
                }
            }
            if let Some(g) = state.grad_mut(Slot::LoraMagnitude(idx)) {
                g.iter_mut().zip(&dm).for_each(|(a, b)| *a += b);
            }
            let factor: Vec<f32> = mag.iter().zip(norm).map(|(m, n)| m / n).collect();
            scaled_dy = dy
                .chunks_exact(out)
                .flat_map(|r| r.iter().zip(&factor).map(|(g, f)| g * f))
                .collect::<Vec<f32>>();
            &scaled_dy
        }
        _ => dy,
    };
    if let Some(g) = state.grad_mut(Slot::LinearWeight(idx)) {
        gemm::matmul_tn(dy, x, g, out, inp, rows, true);
    }
    let mut dx = need_dx.then(|| {
        let _p = crate::profile::scope("lin_backward.base_dx");
        let mut dx = vec![0.0f32; rows * inp];
        l.matmul_base_backward(dy, rows, &mut dx, false);
        dx
    });
    if let (Some(lo), Some(su)) = (&lora, &saved.su) {
        let _p = crate::profile::scope("lin_backward.lora");
        // Thin products (rank r): the scale goes on the small operands, and no product packs
        // the activations (gemm::small_nn).
        let r = lo.rank;
        if let Some(g) = state.grad_mut(Slot::LoraB(idx)) {
            // dBᵀ [r, out] = (s·u)ᵀ·dy, added transposed to dB [out, r]
            let mut gt = vec![0.0f32; r * out];
            gemm::small_nn(r, out, rows, su, 1, r, dy, out, &mut gt, out, false);
            for (o, grow) in g.chunks_exact_mut(r).enumerate() {
                for (j, gv) in grow.iter_mut().enumerate() {
                    *gv += gt[j * out + o];
                }
            }
        }
        let mut du = vec![0.0f32; rows * r];
        gemm::small_nn(rows, r, out, dy, out, 1, &lo.b, r, &mut du, r, false);
        du.iter_mut().for_each(|v| *v *= lo.scale);
        let xd_owned;
        let xd: &[f32] = match &saved.keep {
            Some(keep) => {
                xd_owned = x.iter().zip(keep).map(|(a, k)| a * k).collect::<Vec<_>>();
                &xd_owned
            }
            None => x,
        };
        if let Some(g) = state.grad_mut(Slot::LoraA(idx)) {
            // dA [r, inp] += duᵀ·x
            gemm::small_nn(r, inp, rows, &du, 1, r, xd, inp, g, inp, true);
        }
        if let Some(dx) = dx.as_mut() {
            // dx += du·A (through the dropout mask, if any)
            match &saved.keep {
                None => gemm::small_nn(rows, inp, r, &du, r, 1, &lo.a, inp, dx, inp, true),
                Some(keep) => {
                    let mut dxl = vec![0.0f32; rows * inp];
                    gemm::small_nn(rows, inp, r, &du, r, 1, &lo.a, inp, &mut dxl, inp, false);
                    dxl.iter_mut().zip(keep).for_each(|(a, k)| *a *= k);
                    ops::add_assign(dx, &dxl);
                }
            }
        }
    }
    state.lora[idx] = lora;
    dx
}

fn norm_forward(n: &Norm, kind: NormKind, x: &[f32]) -> (Vec<f32>, NormSaved) {
    let _p = crate::profile::scope("norm_forward");
    let h = n.weight.len();
    let rows = x.len() / h;
    let mut y = vec![0.0f32; x.len()];
    let mut inv = vec![0.0f32; rows];
    let mut means = vec![0.0f32; rows];
    let w = &n.weight;
    let b = n.bias.as_deref();
    y.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .zip(inv.par_iter_mut().zip(means.par_iter_mut()))
        .for_each(|((yr, xr), (iv, mu))| match kind {
            NormKind::Rms { eps } => {
                let ss = ops::dot(xr, xr);
                *iv = 1.0 / (ss / h as f32 + eps).sqrt();
                for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                    *o = g * (v * *iv);
                }
            }
            NormKind::Layer { eps } => {
                let b = b.expect("layernorm bias");
                *mu = xr.iter().sum::<f32>() / h as f32;
                let var = xr.iter().map(|v| (v - *mu) * (v - *mu)).sum::<f32>() / h as f32;
                *iv = 1.0 / (var + eps).sqrt();
                for (((o, &v), &g), &bb) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                    *o = (v - *mu) * *iv * g + bb;
                }
            }
        });
    let mean = matches!(kind, NormKind::Layer { .. }).then_some(means);
    (y, NormSaved { inv, mean })
}

/// dL/dx of a norm layer (and its weight/bias gradients when trainable).
fn norm_backward(
    n: &Norm,
    kind: NormKind,
    x: &[f32],
    s: &NormSaved,
    dy: &[f32],
    state: &mut TrainState,
    norm_idx: usize,
) -> Vec<f32> {
    let _p = crate::profile::scope("norm_backward");
    let h = n.weight.len();
    let w = &n.weight;
    let mut dx = vec![0.0f32; x.len()];
    let want_w = state.is_trainable(Slot::NormWeight(norm_idx));
    let want_b = state.is_trainable(Slot::NormBias(norm_idx));
    const ROWS: usize = 32;
    // Rows in parallel; weight/bias gradients as per-chunk partial sums, added in a fixed
    // order afterwards so the result does not depend on scheduling.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(ROWS * h)
        .zip(x.par_chunks(ROWS * h).zip(dy.par_chunks(ROWS * h)))
        .enumerate()
        .map(|(ci, (dxc, (xc, dyc)))| {
            let mut dw = if want_w { vec![0.0f32; h] } else { Vec::new() };
            let mut db = if want_b { vec![0.0f32; h] } else { Vec::new() };
            for (j, ((dxr, xr), dyr)) in dxc
                .chunks_exact_mut(h)
                .zip(xc.chunks_exact(h))
                .zip(dyc.chunks_exact(h))
                .enumerate()
            {
                let r = ci * ROWS + j;
                let inv = s.inv[r];
                match kind {
                    NormKind::Rms { .. } => {
                        // y = w ⊙ x·inv; dx = inv·(w⊙dy) − x·inv³/h·Σ(w⊙dy⊙x)
                        let dot = ops::dot3(w, dyr, xr);
                        let c = inv * inv * inv * dot / h as f32;
                        for i in 0..h {
                            dxr[i] = inv * w[i] * dyr[i] - xr[i] * c;
                        }
                        if want_w {
                            for i in 0..h {
                                dw[i] += dyr[i] * xr[i] * inv;
                            }
                        }
                    }
                    NormKind::Layer { .. } => {
                        let mu = s.mean.as_ref().expect("mean")[r];
                        let mut mean_g = 0.0f32;
                        let mut mean_gx = 0.0f32;
                        for i in 0..h {
                            let g = dyr[i] * w[i];
                            let xh = (xr[i] - mu) * inv;
                            mean_g += g;
                            mean_gx += g * xh;
                        }
                        mean_g /= h as f32;
                        mean_gx /= h as f32;
                        for i in 0..h {
                            let xh = (xr[i] - mu) * inv;
                            dxr[i] = inv * (dyr[i] * w[i] - mean_g - xh * mean_gx);
                            if want_w {
                                dw[i] += dyr[i] * xh;
                            }
                            if want_b {
                                db[i] += dyr[i];
                            }
                        }
                    }
                }
            }
            (dw, db)
        })
        .collect();
    if want_w {
        let g = state.grad_mut(Slot::NormWeight(norm_idx)).expect("grad");
        for (dw, _) in &partials {
            g.iter_mut().zip(dw).for_each(|(a, b)| *a += b);
        }
    }
    if want_b {
        let g = state.grad_mut(Slot::NormBias(norm_idx)).expect("grad");
        for (_, db) in &partials {
            g.iter_mut().zip(db).for_each(|(a, b)| *a += b);
        }
    }
    dx
}

/// Transpose of the rotation: rotate the gradient by −angle.
fn rope_backward(rope: &RopeTable, g: &mut [f32], pos: usize) {
    let h = rope.half;
    let cos = &rope.cos[pos * h..pos * h + h];
    let sin = &rope.sin[pos * h..pos * h + h];
    for head in g.chunks_exact_mut(2 * h) {
        let (a, b) = head.split_at_mut(h);
        for i in 0..h {
            let (ga, gb) = (a[i], b[i]);
            a[i] = ga * cos[i] + gb * sin[i];
            b[i] = gb * cos[i] - ga * sin[i];
        }
    }
}

fn gated_act_backward(
    act: Activation,
    g: &[f32],
    u: &[f32],
    da: &[f32],
    dg: &mut [f32],
    du: &mut [f32],
) {
    let f = act_fn(act);
    let df = act_derivative(act);
    const C: usize = 4096;
    dg.par_chunks_mut(C)
        .zip(du.par_chunks_mut(C))
        .enumerate()
        .for_each(|(ci, (dgc, duc))| {
            let o = ci * C;
            for i in 0..dgc.len() {
                let (gi, ui, di) = (g[o + i], u[o + i], da[o + i]);
                duc[i] = di * f(gi);
                dgc[i] = di * ui * df(gi);
            }
        });
}

fn act_derivative(a: Activation) -> fn(f32) -> f32 {
    match a {
        Activation::Silu => |x| {
            let s = 1.0 / (1.0 + ops::exp_fast(-x));
            s * (1.0 + x * (1.0 - s))
        },
        Activation::GeluTanh => |x| {
            const C: f32 = 0.797_884_6;
            let inner = C * (x + 0.044715 * x * x * x);
            let t = inner.tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044715 * x * x)
        },
        Activation::Gelu => |x| {
            let cdf = ops::gelu_erf(x) / if x == 0.0 { 1.0 } else { x };
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f32::consts::PI).sqrt();
            if x == 0.0 {
                0.5
            } else {
                cdf + x * pdf
            }
        },
    }
}

fn join3(q: &[f32], k: &[f32], v: &[f32], rows: usize, qd: usize, kvd: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(rows * (qd + 2 * kvd));
    for t in 0..rows {
        y.extend_from_slice(&q[t * qd..(t + 1) * qd]);
        y.extend_from_slice(&k[t * kvd..(t + 1) * kvd]);
        y.extend_from_slice(&v[t * kvd..(t + 1) * kvd]);
    }
    y
}

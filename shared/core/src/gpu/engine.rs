//! The training step on the GPU: the forward pass keeps only each block's input (gradient
//! checkpointing), the backward pass recomputes one block at a time and runs its hand-written
//! backward. Products are cuBLAS bf16 with f32 accumulation; norms, SwiGLU, RoPE, softmax and
//! cross-entropy are our kernels (kernels.cu). Every peft-train method runs here: LoRA (DoRA,
//! QLoRA), IA3, prompt and prefix tuning, bottleneck adapters, full and partial fine-tuning;
//! and any host objective (reward models, DPO) through [`GpuEngine::forward_backward_with`].
//!
//! It plugs into the CPU trainer under the same contract as [`crate::train::engine::Engine`]:
//! gradients of the trainable tensors are *added* into the [`TrainState`], scaled by
//! `loss_scale`. The optimizer, its states, schedule, checkpoints and output stay on the host
//! (QLoRA's paged-optimizer idea taken to its end: the states never occupy the GPU); base
//! tensors that train go back to the device after each step ([`GpuEngine::refresh_base`]).

use super::blas::Gemm;
use super::device::{Arg, DBuf, Gpu};
use super::flash::{flash_available, launch_flash_bwd, launch_flash_fwd, FlashArgs};
use super::weights::{Family, GpuModel, GpuNorm, DOWN, GATE, K, O, Q, ROLES, UP, V};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::rng::Rng;
use crate::train::engine::{Batch, Objective, ObjectiveCtx, RowsCrossEntropy, StepStats};
use crate::train::params::{Slot, TrainState};

mod base;
mod bottleneck;
pub(crate) mod loss;
mod optim;
mod prefix;

use bottleneck::{AdapterSaved, GpuUnit};
use loss::GpuRowsCe;
use prefix::GpuPrefix;

/// One LoRA adapter's tensors on the device: addresses inside [`GpuEngine`]'s two shared
/// buffers, so that a step moves all adapters in one copy each way.
struct GpuLora {
    rank: usize,
    scale: f32,
    dropout: f32,
    /// `[r, in]` and `[out, r]` in bf16, refreshed from the host values every step.
    a: u64,
    b: u64,
    /// f32 gradient accumulators, downloaded and added into the state after each step.
    ga: u64,
    gb: u64,
    /// Element offsets of A and B in the concatenation of all adapters (host order).
    off: usize,
    na: usize,
    nb: usize,
}

/// A trainable vector of one linear layer (f32, with its gradient): DoRA's magnitude `[out]`,
/// or IA3's scaling of the output `[out]` or, for feed-forward modules, of the input `[in]`.
#[derive(Clone, Copy)]
struct GpuVec {
    kind: VecKind,
    value: u64,
    grad: u64,
    /// Offset and length in the concatenation of all vectors.
    at: usize,
    len: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum VecKind {
    Magnitude,
    Ia3Output,
    Ia3Input,
}

/// Which product [`GpuEngine::weight_product`] takes with a base weight.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Product {
    Forward,
    InputGrad,
}

/// What a linear layer's forward pass keeps for its backward pass.
pub(super) struct LinAct {
    /// The scaled LoRA activation `s·(x·Aᵀ)` in bf16 (LoRA, DoRA).
    xa: Option<DBuf>,
    /// DoRA and IA3 on the output: the output before its rescaling (f32).
    pre: Option<DBuf>,
    /// DoRA: the weight norms.
    norm: Option<DBuf>,
}

/// The MLP sub-layer's output (residual added) and what its backward pass needs.
pub(super) struct Mlp {
    n2: DBuf,
    rstd2: DBuf,
    /// The activation's input: gate (SwiGLU) or fc (GPT-2) output, f32.
    g: DBuf,
    /// SwiGLU's up output (f32).
    u: Option<DBuf>,
    /// The down (proj) product's input, bf16.
    a: DBuf,
    pub(super) out: DBuf,
    /// gate, up, down.
    acts: [Option<LinAct>; 3],
    adapter: Option<AdapterSaved>,
}

/// What the forward pass leaves for the loss and the backward pass.
struct Forward {
    lay: Layout,
    /// Every block's input in bf16 (empty in evaluation).
    hs: Vec<DBuf>,
    /// The last block's output (f32), the final norm's output (bf16) and its 1/rms.
    x: DBuf,
    nf: DBuf,
    rstd: DBuf,
    /// Without gradient checkpointing: each block's activations for its backward pass (None
    /// for the blocks the backward pass does not reach).
    saved: Vec<Option<Saved>>,
}

/// Per-step layout of the batch.
struct Layout {
    rows: usize,
    nseq: usize,
    /// Longest sequence: the padded attention length.
    l: usize,
    ids: DBuf,
    row_seq: DBuf,
    row_pos: DBuf,
    seq_len: DBuf,
    /// Rows that carry a loss and their targets.
    loss_idx: Vec<i32>,
    loss_tgt: Vec<i32>,
    /// Prompt tuning: the virtual tokens' rows (n per sequence, in front of its tokens).
    virtual_rows: Vec<i32>,
    /// The embedding gradient's token per row, u32::MAX at virtual rows (prompt tuning),
    /// which have no token.
    grad_ids: Option<DBuf>,
}

/// What the backward pass of a block needs (recomputed from the block's input).
struct Saved {
    n1: DBuf,
    rstd1: DBuf,
    qp: DBuf,
    kp: DBuf,
    vp: DBuf,
    o_in: DBuf,
    h2: DBuf,
    n2: DBuf,
    rstd2: DBuf,
    g: DBuf,
    u: Option<DBuf>,
    a: DBuf,
    /// Per linear: what its LoRA (DoRA) backward needs.
    xa: Vec<Option<LinAct>>,
    /// With flash attention: its output (f32, padded) and log-sum-exp, for its backward.
    flash: Option<(DBuf, DBuf)>,
    /// Bottleneck adapters after attention (0) and after the MLP (1).
    adapters: [Option<AdapterSaved>; 2],
}

pub struct GpuEngine {
    pub gpu: Gpu,
    pub model: GpuModel,
    lora: Vec<Option<GpuLora>>,
    /// Every adapter's A and B (bf16) and their gradients (f32), one after another.
    adapter_values: DBuf,
    adapter_grads: DBuf,
    adapter_len: usize,
    /// Per linear: its DoRA magnitude or IA3 vector.
    vecs: Vec<Option<GpuVec>>,
    /// Prompt tuning: the virtual tokens in front of every sequence, `[n, hidden]` f32 on the
    /// device (refreshed from the host each pass).
    pub(super) prompt: Option<(usize, DBuf)>,
    /// Bottleneck adapters per block and site, their activation (0 relu, 1 silu), and whether
    /// they read the sub-layer's normalized input (parallel) instead of its output.
    units: Vec<[Option<GpuUnit>; 2]>,
    unit_act: i32,
    units_parallel: bool,
    /// Prefix tuning / P-Tuning v2: the prefix's keys and values of every layer, P
    /// `[n, layers·2·kv_dim]` f32 (computed on the host each pass, through the
    /// reparameterization MLP when there is one), and dL/dP accumulated by the backward pass.
    pub(super) prefix: Option<GpuPrefix>,
    /// Full and partial fine-tuning (and LoRA's biases and modules_to_save): an f32 gradient
    /// on the device for each trainable base tensor; their values are the model's, uploaded
    /// again after each optimizer step ([`Self::refresh_base`]).
    base_grads: std::collections::HashMap<Slot, DBuf>,
    /// AdamW on the device (engine/optim.rs): which tensors step here, their masters and
    /// moments; their gradients stay here across micro-batches.
    optim: optim::DeviceOptim,
    /// All those vectors (f32) and their gradients, one after another.
    vec_values: DBuf,
    vec_grads: DBuf,
    vec_len: usize,
    /// bf16 decoding scratch for 4-bit weights.
    pub(super) scratch: DBuf,
    /// Lowest block with an adapter: the backward pass stops there.
    stop_layer: usize,
    seed: u64,
    /// False while an evaluation's forward pass runs: no dropout.
    pub(super) training: std::cell::Cell<bool>,
    /// False while a reference pass runs: the base model without the adapters.
    adapters_on: std::cell::Cell<bool>,
    /// Attention on the flash kernels (`PEFTKIT_GPU_ATTENTION=flash`, where `flash_available`
    /// says they run) instead of products over materialised scores; see docs/gpu.md.
    flash: bool,
    /// Gradient checkpointing (the default): the backward pass recomputes each block from its
    /// input. Off (`PEFTKIT_GPU_CHECKPOINTING=off`): the forward pass keeps every block's
    /// activations, for about a quarter less time per step and several times the memory.
    checkpointing: bool,
    /// Products with 4-bit weights on the fused kernel `gemm_q4` (`PEFTKIT_GPU_Q4_GEMM=fused`)
    /// instead of a decoded bf16 copy and cuBLAS; opt-in until a GPU has timed it.
    fused_q4: bool,
    phases: Phases,
}

/// Where a step's time goes (`PEFTKIT_GPU_PROFILE=1`): the device is synchronised at each
/// phase boundary, so profiling slows the step a little; off, marks cost nothing.
struct Phases {
    on: bool,
    last: std::cell::Cell<std::time::Instant>,
    acc: std::cell::RefCell<Vec<(&'static str, f64)>>,
    steps: std::cell::Cell<usize>,
}

impl Phases {
    fn new() -> Self {
        Self {
            on: std::env::var_os("PEFTKIT_GPU_PROFILE").is_some_and(|v| v != "0"),
            last: std::cell::Cell::new(std::time::Instant::now()),
            acc: std::cell::RefCell::new(Vec::new()),
            steps: std::cell::Cell::new(0),
        }
    }

    fn mark(&self, gpu: &Gpu, name: &'static str) {
        if !self.on {
            return;
        }
        let _ = gpu.sync();
        let now = std::time::Instant::now();
        let dt = (now - self.last.get()).as_secs_f64();
        self.last.set(now);
        let mut acc = self.acc.borrow_mut();
        match acc.iter_mut().find(|(n, _)| *n == name) {
            Some((_, t)) => *t += dt,
            None => acc.push((name, dt)),
        }
    }
}

const BF: usize = 2;
const F4: usize = 4;
/// Most rows a product with a 4-bit weight takes as one fused GEMV per row.
const GEMV_ROWS: usize = 8;

impl GpuEngine {
    /// Uploads `model` and checks that the trainable state is one the GPU path computes.
    pub fn new(gpu: Gpu, model: &Model, state: &TrainState) -> Result<Self> {
        if let Some(what) = unsupported_state(state) {
            return Err(Error::usage(format!(
                "--device cuda trains every peft-train method (QLoRA too), reward models, DPO and PPO; {what} needs --device cpu"
            )));
        }
        Self::upload(gpu, model, state)
    }

    /// An engine for evaluation only ([`Self::token_logprobs`], [`Self::eval`], generation):
    /// the base model alone, or with the adapters of `state` (any type).
    pub fn for_eval(gpu: Gpu, model: &Model, state: &TrainState) -> Result<Self> {
        Self::upload(gpu, model, state)
    }

    fn upload(gpu: Gpu, model: &Model, state: &TrainState) -> Result<Self> {
        Self::upload_with_positions(gpu, model, state, 2048)
    }

    /// The model on the device with RoPE tables for `positions` positions.
    pub(super) fn upload_with_positions(
        gpu: Gpu,
        model: &Model,
        state: &TrainState,
        positions: usize,
    ) -> Result<Self> {
        let gm = GpuModel::upload(&gpu, model, positions)?;
        let scratch = gpu.alloc_bf16(if gm.any_q4() { gm.max_linear } else { 1 })?;
        let mut engine = Self {
            adapter_values: gpu.alloc_bf16(1)?,
            adapter_grads: gpu.alloc_f32(1)?,
            vecs: Vec::new(),
            prompt: None,
            units: Vec::new(),
            unit_act: 0,
            units_parallel: false,
            prefix: None,
            base_grads: std::collections::HashMap::new(),
            optim: optim::DeviceOptim::new(state),
            vec_values: gpu.alloc_f32(1)?,
            vec_grads: gpu.alloc_f32(1)?,
            vec_len: 0,
            gpu,
            stop_layer: gm.blocks.len(),
            model: gm,
            lora: Vec::new(),
            adapter_len: 0,
            scratch,
            seed: 0,
            training: std::cell::Cell::new(true),
            adapters_on: std::cell::Cell::new(true),
            flash: false,
            checkpointing: true,
            fused_q4: false,
            phases: Phases::new(),
        };
        engine.use_flash_attention(
            std::env::var("PEFTKIT_GPU_ATTENTION").is_ok_and(|v| v == "flash"),
        );
        engine.use_fused_q4(std::env::var("PEFTKIT_GPU_Q4_GEMM").is_ok_and(|v| v == "fused"));
        engine.use_gradient_checkpointing(
            !std::env::var("PEFTKIT_GPU_CHECKPOINTING").is_ok_and(|v| v == "off" || v == "0"),
        );
        engine.set_adapters(state)?;
        engine.set_base_trainables(model, state)?;
        engine.choose_device_optimizer()?;
        Ok(engine)
    }

    /// Lays out the LoRA adapters of `state` on the device (their values arrive with each
    /// pass): at construction, and to switch adapters between generations.
    pub(super) fn set_adapters(&mut self, state: &TrainState) -> Result<()> {
        // The device optimizer's ranges point into the buffers replaced here.
        self.optim.forget_adapters()?;
        let gpu = &self.gpu;
        let nb = self.model.blocks.len();
        let total: usize = state
            .lora
            .iter()
            .flatten()
            .map(|lo| lo.a.len() + lo.b.len())
            .sum();
        let adapter_values = gpu.alloc_bf16(total)?;
        let adapter_grads = gpu.alloc_f32(total)?;
        // DoRA magnitudes and IA3 vectors: one f32 vector per linear at most.
        let host_vecs: Vec<Option<(VecKind, usize)>> = state
            .lora
            .iter()
            .zip(&state.ia3)
            .map(
                |(lo, ia3)| match (lo.as_ref().and_then(|lo| lo.magnitude.as_ref()), ia3) {
                    (Some(m), _) => Some((VecKind::Magnitude, m.len())),
                    (None, Some(v)) if v.feedforward => Some((VecKind::Ia3Input, v.l.len())),
                    (None, Some(v)) => Some((VecKind::Ia3Output, v.l.len())),
                    _ => None,
                },
            )
            .collect();
        let vec_total: usize = host_vecs.iter().flatten().map(|v| v.1).sum();
        let vec_values = gpu.alloc_f32(vec_total)?;
        let vec_grads = gpu.alloc_f32(vec_total)?;
        let mut at = 0;
        let vecs: Vec<Option<GpuVec>> = host_vecs
            .iter()
            .map(|v| {
                v.map(|(kind, len)| {
                    let g = GpuVec {
                        kind,
                        value: vec_values.at(at, F4),
                        grad: vec_grads.at(at, F4),
                        at,
                        len,
                    };
                    at += len;
                    g
                })
            })
            .collect();
        let per_block = self.model.per_block;
        let mut lora = Vec::with_capacity(nb * per_block);
        let mut stop = nb;
        let mut off = 0;
        for (i, lo) in state.lora.iter().enumerate() {
            let Some(lo) = lo else {
                lora.push(None);
                continue;
            };
            stop = stop.min(i / per_block);
            let (na, nb_) = (lo.a.len(), lo.b.len());
            lora.push(Some(GpuLora {
                rank: lo.rank,
                scale: lo.scale,
                dropout: lo.dropout,
                a: adapter_values.at(off, BF),
                b: adapter_values.at(off + na, BF),
                ga: adapter_grads.at(off, F4),
                gb: adapter_grads.at(off + na, F4),
                off,
                na,
                nb: nb_,
            }));
            off += na + nb_;
        }
        if lora.len() != nb * per_block {
            return Err(Error::usage(
                "internal: LoRA slots do not match the model's linears",
            ));
        }
        self.lora = lora;
        self.adapter_values = adapter_values;
        self.adapter_grads = adapter_grads;
        self.adapter_len = total;
        // The backward pass stops below the lowest block with anything trainable.
        if let Some(i) = vecs.iter().position(Option::is_some) {
            stop = stop.min(i / per_block);
        }
        self.vecs = vecs;
        self.vec_values = vec_values;
        self.vec_grads = vec_grads;
        self.vec_len = vec_total;
        self.stop_layer = stop;
        Ok(())
    }

    /// Forward and backward over one micro-batch; LoRA gradients are added into `state`.
    pub fn forward_backward(
        &mut self,
        state: &mut TrainState,
        batch: &Batch,
        loss_scale: f32,
        rng: &mut Rng,
    ) -> Result<StepStats> {
        self.phases.mark(&self.gpu, "host (between steps)");
        self.phases.steps.set(self.phases.steps.get() + 1);
        let f = self.run_forward(state, batch, Some(rng))?;
        let (d, rows) = (self.model.hidden, f.lay.rows);
        // The loss in chunks of rows.
        let dnf = self.gpu.alloc_f32(rows * d)?;
        let nll = self.loss(&f.nf, &f.lay, loss_scale, Some(&dnf))?;
        let stats = StepStats {
            nll_sum: nll,
            loss_tokens: f.lay.loss_idx.len(),
        };
        self.phases.mark(&self.gpu, "loss (head and cross-entropy)");
        self.run_backward(state, f, dnf)?;
        Ok(stats)
    }

    /// The loss over one batch without gradients and without dropout (evaluation): the forward
    /// pass of [`Self::forward_backward`], keeping nothing for a backward pass.
    pub fn eval(&mut self, state: &TrainState, batch: &Batch) -> Result<StepStats> {
        let f = self.run_forward(state, batch, None)?;
        let nll = self.loss(&f.nf, &f.lay, 0.0, None)?;
        Ok(StepStats {
            nll_sum: nll,
            loss_tokens: f.lay.loss_idx.len(),
        })
    }

    /// Log-probabilities of every token after the first of each sequence, concatenated in
    /// order (peft-eval): a forward pass without dropout and the LM head's cross-entropy.
    pub fn token_logprobs(&mut self, state: &TrainState, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        // The first token is not predicted (with prompt tuning the last virtual token would).
        let labels: Vec<Vec<i32>> = seqs
            .iter()
            .map(|s| {
                let mut l: Vec<i32> = s.iter().map(|&t| t as i32).collect();
                if let Some(first) = l.first_mut() {
                    *first = -100;
                }
                l
            })
            .collect();
        let batch = Batch {
            ids: seqs.to_vec(),
            labels: labels.iter().map(|l| &l[..]).collect(),
        };
        let f = self.run_forward(state, &batch, None)?;
        let ce = loss::RowsCe {
            scale: 0.0,
            ..loss::RowsCe::new(&f.lay.loss_idx, &f.lay.loss_tgt)
        };
        let (nll, _) = self.rows_cross_entropy(&f.nf, &ce, None)?;
        Ok(nll.into_iter().map(|x| -x).collect())
    }

    /// Forward and backward with any [`Objective`] of the final hidden states (reward models,
    /// DPO, …): the objective runs on the host on the downloaded hidden states, and what it
    /// needs of the LM head (log-probabilities of labels) runs here through
    /// [`ObjectiveCtx::rows_ce`]; its gradient of the hidden states comes back for the
    /// backward pass. Without `rng`: evaluation (no dropout, no backward pass).
    pub fn forward_backward_with(
        &mut self,
        model: &Model,
        state: &mut TrainState,
        batch: &Batch,
        rng: Option<&mut Rng>,
        objective: &mut dyn Objective,
    ) -> Result<StepStats> {
        let backward = rng.is_some();
        let f = self.run_forward(state, batch, rng)?;
        let (d, rows) = (self.model.hidden, f.lay.rows);
        let hidden = self.gpu.download_bf16(&f.nf, rows * d)?;
        // Each sequence's first real row (after its virtual tokens) and its length.
        let n_prompt = self.prompt.as_ref().map_or(0, |p| p.0);
        let mut seq_rows = Vec::with_capacity(batch.ids.len());
        let mut r = 0;
        for ids in &batch.ids {
            seq_rows.push((r + n_prompt, ids.len()));
            r += n_prompt + ids.len();
        }
        let mut dh = vec![0f32; rows * d];
        let stats = {
            let ce = GpuRowsCe {
                engine: self,
                nf: &f.nf,
                rows,
            };
            let ctx = ObjectiveCtx {
                model,
                hidden: &hidden,
                batch,
                seq_rows,
                n_prompt,
                head_pack: None,
                backward,
                rows_ce: Some(&ce),
            };
            objective.apply(&ctx, state, &mut dh)?
        };
        if backward {
            let dnf = self.gpu.upload(&dh)?;
            self.run_backward(state, f, dnf)?;
        }
        Ok(stats)
    }

    /// The forward pass up to the final norm. With `rng` (training): dropout on, every block's
    /// input kept in bf16 (gradient checkpointing); without: evaluation, nothing kept.
    fn run_forward(
        &mut self,
        state: &TrainState,
        batch: &Batch,
        rng: Option<&mut Rng>,
    ) -> Result<Forward> {
        self.sync_adapters(state)?;
        let training = rng.is_some();
        if let Some(rng) = rng {
            if self
                .lora
                .iter()
                .any(|l| l.as_ref().is_some_and(|l| l.dropout > 0.0))
            {
                self.seed = rng.next_u64();
            }
        }
        let lay = self.layout(batch)?;
        self.phases.mark(&self.gpu, "inputs and adapters to device");
        let (d, rows) = (self.model.hidden, lay.rows);
        let nb = self.model.blocks.len();
        // The residual stream is rounded to bf16 between blocks, as in a bf16 PyTorch model,
        // so that the backward pass recomputes each block from exactly the input the forward
        // pass used.
        self.training.set(training);
        type Run = (Vec<DBuf>, DBuf, Vec<Option<Saved>>);
        let run = || -> Result<Run> {
            let mut hs = Vec::with_capacity(nb + 1);
            let mut saved = Vec::with_capacity(nb);
            let mut x = self.embed(&lay)?;
            for l in 0..nb {
                if training {
                    hs.push(self.cast_bf16(&x, rows * d)?);
                }
                // Without checkpointing, what the backward pass needs is kept now (for the
                // blocks it reaches) instead of recomputed then.
                let keep = training && !self.checkpointing && l >= self.stop_layer;
                let (out, s) = self.block_forward(l, &x, &lay, keep)?;
                saved.push(s);
                x = self.round_bf16(&out, rows * d)?;
            }
            Ok((hs, x, saved))
        };
        let done = run();
        self.training.set(true);
        let (hs, x, saved) = done?;
        self.phases.mark(&self.gpu, "forward");
        let nf = self.gpu.uninit_bf16(rows * d)?;
        let rstd = self.norm_stats(rows)?;
        self.norm_fwd(&x, &self.model.final_norm, &nf, &rstd, rows)?;
        Ok(Forward {
            lay,
            hs,
            x,
            nf,
            rstd,
            saved,
        })
    }

    /// The backward pass from `dnf`, the gradient of the final norm's output; LoRA gradients
    /// are added into `state`.
    fn run_backward(&mut self, state: &mut TrainState, f: Forward, dnf: DBuf) -> Result<()> {
        let Forward {
            lay,
            mut hs,
            x,
            nf,
            rstd,
            mut saved,
        } = f;
        drop(nf);
        let (d, rows) = (self.model.hidden, lay.rows);
        let nb = self.model.blocks.len();
        self.norm_weight_grad(2 * nb, &x, &rstd, &dnf, rows)?;
        if self.stop_layer < nb {
            let mut dh = self.gpu.alloc_f32(rows * d)?;
            self.norm_bwd(&x, &self.model.final_norm, &rstd, &dnf, &dh, rows)?;
            drop((dnf, x));
            for l in (self.stop_layer..nb).rev() {
                let xl = self.to_f32(&hs[l], rows * d)?;
                let kept = saved.get_mut(l).and_then(Option::take);
                dh = self.block_backward(l, &xl, dh, &lay, kept)?;
                hs.truncate(l);
            }
            // Prompt tuning: the virtual rows' input gradients, summed over the sequences.
            if let (Some((n, _)), Some(g)) = (&self.prompt, state.grad_mut(Slot::PromptEmbedding)) {
                let all = self.gpu.download_f32(&dh, rows * d)?;
                for (k, &r) in lay.virtual_rows.iter().enumerate() {
                    let j = k % n;
                    let src = &all[r as usize * d..(r as usize + 1) * d];
                    g[j * d..(j + 1) * d]
                        .iter_mut()
                        .zip(src)
                        .for_each(|(a, b)| *a += b);
                }
            }
            // The embeddings' gradients: dh is now the gradient of the first block's input.
            // Token rows (not prompt tuning's virtual rows) and, for learned positions, every
            // row's position.
            let tables = [
                (Slot::Embedding, lay.grad_ids.as_ref().unwrap_or(&lay.ids)),
                (Slot::PositionEmbedding, &lay.row_pos),
            ];
            for (slot, ids) in tables {
                if let Some(g) = self.base_grads.get(&slot) {
                    self.gpu.launch_n(
                        "embed_grad",
                        rows * d,
                        &[
                            Arg::P(ids.ptr),
                            Arg::P(dh.ptr),
                            Arg::P(g.ptr),
                            Arg::L(rows as i64),
                            Arg::I(d as i32),
                        ],
                    )?;
                }
            }
        }
        // Prefix tuning: dL/dP back to the host, through the reparameterization there.
        if let Some(g) = &self.prefix {
            let dp = self.gpu.download_f32(&g.dp, g.n * g.stride)?;
            let vals = g.values.as_ref().expect("set by the forward pass");
            crate::train::prefix::backward(state, vals, &dp);
        }
        self.collect_grads(state)?;
        self.phases.mark(&self.gpu, "gradients to host");
        Ok(())
    }

    /// Switches the LoRA adapters off (a reference model: DPO's reference log-probabilities
    /// are the base model's) or back on.
    pub fn set_adapters_enabled(&self, on: bool) {
        self.adapters_on.set(on);
    }

    /// Runs products with 4-bit weights on the fused `gemm_q4` kernel (or not). The kernel
    /// needs bf16 tensor cores (sm_80 or later): elsewhere the request is ignored.
    pub fn use_fused_q4(&mut self, on: bool) {
        self.fused_q4 = on && self.gpu.bf16_tensor_cores();
    }

    /// Gradient checkpointing on (the default) or off: see the `checkpointing` field.
    pub fn use_gradient_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// Runs attention on the flash kernels (or not; the default comes from
    /// `PEFTKIT_GPU_ATTENTION`). Where they cannot run (before sm_80, a head size they are not
    /// built for, too little shared memory) the request is ignored, and said once.
    pub fn use_flash_attention(&mut self, on: bool) {
        let available = flash_available(&self.gpu, self.model.head_dim);
        if on && !available {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                crate::cli::info(format!(
                    "flash attention is not available on {} for head size {} (it needs sm_80 or later, head size 16, 32, 64, 80, 96 or 128, and {} KB of shared memory per block): using the default attention",
                    self.gpu.name(),
                    self.model.head_dim,
                    crate::gpu::flash::flash_bwd_shared_bytes(self.model.head_dim) >> 10
                ))
            });
        }
        self.flash = on && available;
    }

    /// Milliseconds per step in each phase, when profiling (`PEFTKIT_GPU_PROFILE=1`).
    pub fn profile(&self) -> Option<Vec<(&'static str, f64)>> {
        if !self.phases.on {
            return None;
        }
        let n = self.phases.steps.get().max(1) as f64;
        Some(
            self.phases
                .acc
                .borrow()
                .iter()
                .map(|&(k, t)| (k, t * 1e3 / n))
                .collect(),
        )
    }

    /// Copies the current host LoRA values (bf16) and zeroes the gradient accumulators, or,
    /// for the tensors that step on the device, makes sure their compute copies hold the run's
    /// values and lets their gradients accumulate.
    pub(super) fn sync_adapters(&mut self, state: &TrainState) -> Result<()> {
        let held = self.adapters_held_on_device(state)?;
        if !held {
            self.upload_adapter_values(state)?;
        }
        if !self.optim.keeps_adapter_grads() {
            let n = self.adapter_grads.bytes;
            self.gpu.zero(&mut self.adapter_grads, n)?;
            let n = self.vec_grads.bytes;
            self.gpu.zero(&mut self.vec_grads, n)?;
        }
        self.sync_adapter_modules(state)?;
        // With the device optimizer the base gradients accumulate over a step's micro-batches
        // here (its step zeroes them); otherwise each pass's go to the host.
        if !self.optim.keeps_base_grads() {
            let slots: Vec<Slot> = self.base_grads.keys().copied().collect();
            for slot in slots {
                let g = self.base_grads.get_mut(&slot).expect("listed");
                let n = g.bytes;
                self.gpu.zero(g, n)?;
            }
        }
        Ok(())
    }

    /// The host's LoRA values (as bf16) and DoRA/IA3 vectors into their compute copies.
    fn upload_adapter_values(&mut self, state: &TrainState) -> Result<()> {
        use rayon::prelude::*;
        let mut host = vec![0u16; self.adapter_len];
        // Adapters are disjoint ranges of `host`: convert them in parallel (bf16 rounding in
        // software is the cost here, not the copy).
        let mut rest = &mut host[..];
        let mut jobs = Vec::new();
        let mut at = 0;
        for (g, lo) in self.lora.iter().zip(&state.lora) {
            let (Some(g), Some(lo)) = (g, lo) else {
                continue;
            };
            let (_, tail) = rest.split_at_mut(g.off - at);
            let (dst, tail) = tail.split_at_mut(g.na + g.nb);
            rest = tail;
            at = g.off + g.na + g.nb;
            jobs.push((dst, lo));
        }
        jobs.into_par_iter().for_each(|(dst, lo)| {
            for (d, &x) in dst.iter_mut().zip(lo.a.iter().chain(&lo.b)) {
                *d = half::bf16::from_f32(x).to_bits();
            }
        });
        self.gpu.write(&mut self.adapter_values, &host)?;
        if self.vec_len > 0 {
            let mut host = vec![0f32; self.vec_len];
            for (i, g) in self.vecs.iter().enumerate() {
                let Some(g) = g else { continue };
                let src = match g.kind {
                    VecKind::Magnitude => state.lora[i].as_ref().and_then(|l| l.magnitude.as_ref()),
                    _ => state.ia3[i].as_ref().map(|v| &v.l),
                };
                if let Some(v) = src {
                    host[g.at..g.at + g.len].copy_from_slice(v);
                }
            }
            self.gpu.write(&mut self.vec_values, &host)?;
        }
        Ok(())
    }

    /// The host's prompt, prefix and bottleneck values (host optimizer) to the device, their
    /// gradients zeroed.
    fn sync_adapter_modules(&mut self, state: &TrainState) -> Result<()> {
        if let (Some((_, buf)), Some(p)) = (&mut self.prompt, &state.prompt) {
            self.gpu.write(buf, &p.emb)?;
        }
        if let (Some(g), Some(p)) = (&mut self.prefix, &state.prefix) {
            // Kept for the backward pass: it takes dL/dP through the same values.
            let vals = p.values();
            self.gpu.write(&mut g.p, &vals.p)?;
            g.values = Some(vals);
            let n = g.dp.bytes;
            self.gpu.zero(&mut g.dp, n)?;
        }
        if let Some(bp) = &state.bottleneck {
            let bf = |v: &[f32]| -> Vec<u16> {
                v.iter()
                    .map(|&x| half::bf16::from_f32(x).to_bits())
                    .collect()
            };
            for (b, pair) in self.units.iter_mut().enumerate() {
                for (site, g) in pair.iter_mut().enumerate() {
                    let (Some(g), Some(u)) = (g, bp.unit(b, site)) else {
                        continue;
                    };
                    self.gpu.write(&mut g.down_w, &bf(&u.down_w))?;
                    self.gpu.write(&mut g.down_b, &u.down_b)?;
                    self.gpu.write(&mut g.up_w, &bf(&u.up_w))?;
                    self.gpu.write(&mut g.up_b, &u.up_b)?;
                    for gr in &mut g.grads {
                        let n = gr.bytes;
                        self.gpu.zero(gr, n)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds the pass's gradients of the tensors that step on the host into `state`.
    fn collect_grads(&mut self, state: &mut TrainState) -> Result<()> {
        self.check_gradient_owner(state)?;
        let on_host = |e: &Self, slot: Slot| !e.steps_on_device(slot);
        let any_lora = self.lora.iter().enumerate().any(|(i, g)| {
            g.is_some() && (on_host(self, Slot::LoraA(i)) || on_host(self, Slot::LoraB(i)))
        });
        let all = if any_lora {
            self.gpu
                .download_f32(&self.adapter_grads, self.adapter_len)?
        } else {
            Vec::new()
        };
        for (i, g) in self.lora.iter().enumerate() {
            let Some(g) = g else { continue };
            if !any_lora {
                break;
            }
            let (ga, gb) = all[g.off..g.off + g.na + g.nb].split_at(g.na);
            for (slot, v) in [(Slot::LoraA(i), ga), (Slot::LoraB(i), gb)] {
                if !on_host(self, slot) {
                    continue;
                }
                if let Some(dst) = state.grad_mut(slot) {
                    dst.iter_mut().zip(v).for_each(|(d, s)| *d += s);
                }
            }
        }
        for (b, pair) in self.units.iter().enumerate() {
            for (site, g) in pair.iter().enumerate() {
                let Some(g) = g else { continue };
                for (part, gr) in g.grads.iter().enumerate() {
                    if let Some(dst) = state.grad_mut(Slot::Bottleneck(b, site, part)) {
                        let v = self.gpu.download_f32(gr, dst.len())?;
                        dst.iter_mut().zip(v).for_each(|(d, s)| *d += s);
                    }
                }
            }
        }
        // (The gradients of tensors that step on the device stay there for its step.)
        for (slot, g) in &self.base_grads {
            if !on_host(self, *slot) {
                continue;
            }
            if let Some(dst) = state.grad_mut(*slot) {
                let v = self.gpu.download_f32(g, dst.len())?;
                dst.iter_mut().zip(v).for_each(|(d, s)| *d += s);
            }
        }
        let vec_slot = |i: usize, kind: VecKind| match kind {
            VecKind::Magnitude => Slot::LoraMagnitude(i),
            _ => Slot::Ia3(i),
        };
        let any_vec = self.vecs.iter().enumerate().any(|(i, g)| {
            g.as_ref()
                .is_some_and(|g| on_host(self, vec_slot(i, g.kind)))
        });
        if any_vec {
            let all = self.gpu.download_f32(&self.vec_grads, self.vec_len)?;
            for (i, g) in self.vecs.iter().enumerate() {
                let Some(g) = g else { continue };
                let slot = vec_slot(i, g.kind);
                if !on_host(self, slot) {
                    continue;
                }
                if let Some(dst) = state.grad_mut(slot) {
                    dst.iter_mut()
                        .zip(&all[g.at..g.at + g.len])
                        .for_each(|(d, s)| *d += s);
                }
            }
        }
        Ok(())
    }

    fn layout(&mut self, batch: &Batch) -> Result<Layout> {
        let vocab = self.model.vocab;
        let mut ids = Vec::new();
        let (mut row_seq, mut row_pos, mut seq_len) = (Vec::new(), Vec::new(), Vec::new());
        let (mut loss_idx, mut loss_tgt) = (Vec::new(), Vec::new());
        let mut l = 0;
        let n_prompt = self.prompt.as_ref().map_or(0, |p| p.0);
        // Prefix tuning: the sequence's positions start after the prefix, which takes the first
        // n rows of the padded attention layout (not rows of the hidden states).
        let n_prefix = self.prefix.as_ref().map_or(0, |p| p.n);
        let mut virtual_rows = Vec::new();
        for (s, (sid, labels)) in batch.ids.iter().zip(&batch.labels).enumerate() {
            if sid.len() != labels.len() {
                return Err(Error::usage("internal: ids and labels differ in length"));
            }
            let start = ids.len();
            // Prompt tuning: n virtual tokens first (their rows get the trained vectors after
            // the embedding lookup of a placeholder id).
            for p in 0..n_prompt {
                virtual_rows.push(ids.len() as i32);
                ids.push(0);
                row_seq.push(s as i32);
                row_pos.push((n_prefix + p) as i32);
            }
            for (p, &t) in sid.iter().enumerate() {
                if t as usize >= vocab {
                    return Err(Error::usage(format!(
                        "token id {t} is outside the model's vocabulary of {vocab}"
                    )));
                }
                ids.push(t);
                row_seq.push(s as i32);
                row_pos.push((n_prefix + n_prompt + p) as i32);
            }
            // Row j predicts label j + 1 − n: virtual tokens carry no label, the last one
            // predicts the first real token (PEFT's prompt tuning).
            for j in 0..(n_prompt + sid.len()).saturating_sub(1) {
                if j + 1 < n_prompt {
                    continue;
                }
                let t = labels[j + 1 - n_prompt];
                if t != -100 {
                    if t < 0 || t as usize >= vocab {
                        return Err(Error::usage(format!(
                            "label {t} is outside the vocabulary of {vocab}"
                        )));
                    }
                    loss_idx.push((start + j) as i32);
                    loss_tgt.push(t);
                }
            }
            seq_len.push((n_prefix + n_prompt + sid.len()) as i32);
            l = l.max(n_prefix + n_prompt + sid.len());
        }
        self.model.ensure_positions(&self.gpu, l)?;
        Ok(Layout {
            rows: ids.len(),
            nseq: seq_len.len(),
            l,
            ids: self.gpu.upload(&ids)?,
            row_seq: self.gpu.upload(&row_seq)?,
            row_pos: self.gpu.upload(&row_pos)?,
            seq_len: self.gpu.upload(&seq_len)?,
            grad_ids: if virtual_rows.is_empty() {
                None
            } else {
                let mut g = ids.clone();
                for &r in &virtual_rows {
                    g[r as usize] = u32::MAX;
                }
                Some(self.gpu.upload(&g)?)
            },
            loss_idx,
            loss_tgt,
            virtual_rows,
        })
    }

    /// Rows `ids` of the bf16 `table` as f32 `[rows, hidden]` (`embed_gather`).
    fn gather_rows(&self, ids: &DBuf, table: &DBuf, rows: usize) -> Result<DBuf> {
        let d = self.model.hidden;
        let out = self.gpu.uninit_f32(rows * d)?;
        self.gpu.launch_n(
            "embed_gather",
            rows * d,
            &[
                Arg::P(ids.ptr),
                Arg::P(table.ptr),
                Arg::P(out.ptr),
                Arg::L(rows as i64),
                Arg::I(d as i32),
            ],
        )?;
        Ok(out)
    }

    /// The input rows of tokens `ids` at positions `pos`: their embeddings, plus the learned
    /// positions where the model has them (GPT-2).
    pub(super) fn embed_rows(&self, ids: &DBuf, pos: &DBuf, rows: usize) -> Result<DBuf> {
        let h = self.gather_rows(ids, &self.model.embed, rows)?;
        self.add_positions(&h, pos, rows)?;
        Ok(h)
    }

    /// `h += pos_embed[pos]` row by row for a model with learned positions.
    pub(super) fn add_positions(&self, h: &DBuf, pos: &DBuf, rows: usize) -> Result<()> {
        let Some(pe) = &self.model.pos_embed else {
            return Ok(());
        };
        let n = rows * self.model.hidden;
        let p = self.gather_rows(pos, pe, rows)?;
        self.gpu.launch_n(
            "add_inplace",
            n,
            &[Arg::P(h.ptr), Arg::P(p.ptr), Arg::L(n as i64)],
        )
    }

    /// The input rows: embedding lookups, prompt tuning's virtual rows, then the learned
    /// positions (virtual rows have positions too, as in PEFT).
    fn embed(&self, lay: &Layout) -> Result<DBuf> {
        let (d, rows) = (self.model.hidden, lay.rows);
        let h = self.gather_rows(&lay.ids, &self.model.embed, rows)?;
        if let Some((n, emb)) = &self.prompt {
            // The virtual rows: the prompt's vectors, one copy per sequence.
            let idx = self.gpu.upload(&lay.virtual_rows)?;
            for s in 0..lay.nseq {
                self.gpu.launch_n(
                    "scatter_rows_f32",
                    n * d,
                    &[
                        Arg::P(emb.ptr),
                        Arg::P(idx.at(s * n, 4)),
                        Arg::P(h.ptr),
                        Arg::L(*n as i64),
                        Arg::I(d as i32),
                    ],
                )?;
            }
        }
        self.add_positions(&h, &lay.row_pos, rows)?;
        Ok(h)
    }

    fn to_f32(&self, x: &DBuf, n: usize) -> Result<DBuf> {
        let y = self.gpu.uninit_f32(n)?;
        self.gpu.launch_n(
            "cast_bf16_f32",
            n,
            &[Arg::P(x.ptr), Arg::P(y.ptr), Arg::L(n as i64)],
        )?;
        Ok(y)
    }

    /// `x` rounded to bf16 (and back to f32): a block output entering the next block.
    pub(super) fn round_bf16(&self, x: &DBuf, n: usize) -> Result<DBuf> {
        let b = self.cast_bf16(x, n)?;
        self.to_f32(&b, n)
    }

    /// A buffer for a norm's per-row statistics: 1/rms (RMSNorm), or mean and 1/std
    /// (LayerNorm).
    pub(super) fn norm_stats(&self, rows: usize) -> Result<DBuf> {
        let per_row = if self.model.family == Family::Llama {
            1
        } else {
            2
        };
        self.gpu.uninit_f32(rows * per_row)
    }

    /// `y = norm(x)` in bf16 (RMSNorm, or LayerNorm with its bias), its statistics into
    /// `stats` ([`Self::norm_stats`]).
    pub(super) fn norm_fwd(
        &self,
        x: &DBuf,
        n: &GpuNorm,
        y: &DBuf,
        stats: &DBuf,
        rows: usize,
    ) -> Result<()> {
        let d = self.model.hidden;
        match &n.b {
            None => self.gpu.launch_norm(
                rows,
                d,
                &[
                    Arg::P(x.ptr),
                    Arg::P(n.w.ptr),
                    Arg::P(y.ptr),
                    Arg::P(stats.ptr),
                    Arg::I(d as i32),
                    Arg::F(self.model.eps),
                ],
            ),
            Some(b) => self.gpu.launch_rows(
                "layernorm_fwd",
                rows,
                d,
                &[
                    Arg::P(x.ptr),
                    Arg::P(n.w.ptr),
                    Arg::P(b.ptr),
                    Arg::P(y.ptr),
                    Arg::P(stats.ptr),
                    Arg::I(d as i32),
                    Arg::F(self.model.eps),
                ],
            ),
        }
    }

    /// dx += the norm's backward pass of dy.
    fn norm_bwd(
        &self,
        x: &DBuf,
        n: &GpuNorm,
        stats: &DBuf,
        dy: &DBuf,
        dx: &DBuf,
        rows: usize,
    ) -> Result<()> {
        let d = self.model.hidden;
        let kernel = if n.b.is_some() {
            "layernorm_bwd"
        } else {
            "rmsnorm_bwd"
        };
        self.gpu.launch_rows(
            kernel,
            rows,
            d,
            &[
                Arg::P(x.ptr),
                Arg::P(n.w.ptr),
                Arg::P(stats.ptr),
                Arg::P(dy.ptr),
                Arg::P(dx.ptr),
                Arg::I(d as i32),
            ],
        )
    }

    pub(super) fn cast_bf16(&self, x: &DBuf, n: usize) -> Result<DBuf> {
        let y = self.gpu.uninit_bf16(n)?;
        self.gpu.launch_n(
            "cast_f32_bf16",
            n,
            &[Arg::P(x.ptr), Arg::P(y.ptr), Arg::L(n as i64)],
        )?;
        Ok(y)
    }

    fn dropout_seed(&self, l: usize, slot: usize) -> u64 {
        self.seed ^ ((l as u64) << 8 | slot as u64).wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// The LoRA input: `x` itself, or `x` through the adapter's dropout.
    fn lora_input(&self, l: usize, slot: usize, x: &DBuf, n: usize) -> Result<Option<DBuf>> {
        let lo = self.lora[self.model.index(l, slot)].as_ref().unwrap();
        if lo.dropout <= 0.0 || !self.training.get() {
            return Ok(None);
        }
        let y = self.gpu.uninit_bf16(n)?;
        self.gpu.launch_n(
            "dropout_bf16",
            n,
            &[
                Arg::P(x.ptr),
                Arg::P(y.ptr),
                Arg::F(lo.dropout),
                Arg::U64(self.dropout_seed(l, slot)),
                Arg::L(n as i64),
            ],
        )?;
        Ok(Some(y))
    }

    /// A product with a linear layer's base weight, `x` bf16 and `y` f32 (`accumulate`: added
    /// into `y`): `y = x·Wᵀ` ([`Product::Forward`], x `[rows, in]`) or `y = x·W`
    /// ([`Product::InputGrad`], x `[rows, out]`). A 4-bit weight is decoded into the bf16
    /// scratch for cuBLAS, or (`fused_q4`) multiplied by `gemm_q4` straight from its bytes.
    fn weight_product(
        &self,
        lin: &super::weights::GpuLinear,
        x: u64,
        y: u64,
        rows: usize,
        op: Product,
        accumulate: bool,
    ) -> Result<()> {
        let (n, k) = match op {
            Product::Forward => (lin.out, lin.inp),
            Product::InputGrad => (lin.inp, lin.out),
        };
        if self.fused_q4 {
            if let super::weights::GpuWeight::Q4 {
                packed,
                absmax,
                code,
                blocksize,
            } = &lin.w
            {
                return self.gpu.launch(
                    "gemm_q4",
                    (rows.div_ceil(64) * n.div_ceil(64)) as u32,
                    128,
                    &[
                        Arg::P(x),
                        Arg::P(packed.ptr),
                        Arg::P(absmax.ptr),
                        Arg::P(code.ptr),
                        Arg::P(y),
                        Arg::I(rows as i32),
                        Arg::I(n as i32),
                        Arg::I(k as i32),
                        Arg::I(*blocksize as i32),
                        Arg::I(i32::from(op == Product::Forward)),
                        Arg::I(i32::from(accumulate)),
                    ],
                );
            }
        }
        let w = lin.bf16_weight(&self.gpu, &self.scratch)?;
        let g = match op {
            Product::Forward => Gemm::nt(rows, n, k, x, w, y),
            Product::InputGrad => Gemm::nn(rows, n, k, x, w, y),
        };
        self.gpu.gemm(&if accumulate { g.accumulate() } else { g })
    }

    /// `y = x·Wᵀ (+ s·(x·Aᵀ)·Bᵀ) (+ bias)` for linear `slot` of block `l`, with DoRA's
    /// rescaling `· m/‖W + s·B·A‖` per output before the bias; `x` bf16 `[rows, in]`, `y` f32
    /// `[rows, out]`. Returns what the backward pass needs (with an adapter).
    pub(super) fn lin_fwd(
        &self,
        l: usize,
        slot: usize,
        x: &DBuf,
        y: &DBuf,
        rows: usize,
    ) -> Result<Option<LinAct>> {
        let lin = self.model.lin(l, slot);
        let on = self.adapters_on.get();
        let vec = self.vecs[self.model.index(l, slot)].filter(|_| on);
        // IA3 on the input (feed-forward modules): the product sees x ⊙ l.
        let scaled_x;
        let x_in = match vec {
            Some(v) if v.kind == VecKind::Ia3Input => {
                scaled_x = self.gpu.uninit_bf16(rows * lin.inp)?;
                self.gpu.launch_n(
                    "ia3_scale_input",
                    rows * lin.inp,
                    &[
                        Arg::P(x.ptr),
                        Arg::P(v.value),
                        Arg::P(scaled_x.ptr),
                        Arg::L(rows as i64),
                        Arg::I(lin.inp as i32),
                    ],
                )?;
                &scaled_x
            }
            _ => x,
        };
        // A few rows of a 4-bit weight (generation steps, PPO's rollouts): the fused GEMV per
        // row reads the 4-bit bytes (0.56 byte per weight) once per row, where decoding for a
        // product moves 4.5 bytes per weight; up to 8 rows the GEMVs read less. (The fused
        // GEMM, when on, reads them once for all rows.)
        let gemv = rows <= GEMV_ROWS && lin.is_q4() && !self.fused_q4 && {
            let xf = self.to_f32(x_in, rows * lin.inp)?;
            let mut done = true;
            for r in 0..rows {
                let (xr, yr) = (xf.at(r * lin.inp, F4), y.at(r * lin.out, F4));
                done = done && lin.gemv_q4(&self.gpu, xr, yr)?;
            }
            done
        };
        if !gemv {
            self.weight_product(lin, x_in.ptr, y.ptr, rows, Product::Forward, false)?;
        }
        let mut act = match &self.lora[self.model.index(l, slot)] {
            Some(lo) if on => Some(self.lora_fwd(l, slot, lo, x, y, rows)?),
            _ => None,
        };
        if let Some(b) = &lin.bias {
            self.gpu.launch_n(
                "add_bias",
                rows * lin.out,
                &[
                    Arg::P(y.ptr),
                    Arg::P(b.ptr),
                    Arg::L(rows as i64),
                    Arg::I(lin.out as i32),
                ],
            )?;
        }
        // IA3 on the output: (x·Wᵀ + b) ⊙ l, the bias included (PEFT's order).
        if let Some(v) = vec.filter(|v| v.kind == VecKind::Ia3Output) {
            let pre = self.gpu.uninit_f32(rows * lin.out)?;
            self.gpu.copy(&pre, y, rows * lin.out * F4)?;
            self.gpu.launch_n(
                "dora_scale",
                rows * lin.out,
                &[
                    Arg::P(y.ptr),
                    Arg::P(v.value),
                    Arg::P(0),
                    Arg::L(rows as i64),
                    Arg::I(lin.out as i32),
                ],
            )?;
            act = Some(LinAct {
                xa: None,
                pre: Some(pre),
                norm: None,
            });
        }
        Ok(act)
    }

    /// The adapter's part of [`Self::lin_fwd`]: adds `s·(x·Aᵀ)·Bᵀ` into `y` (the base output)
    /// and, for DoRA, rescales the sum per output.
    fn lora_fwd(
        &self,
        l: usize,
        slot: usize,
        lo: &GpuLora,
        x: &DBuf,
        y: &DBuf,
        rows: usize,
    ) -> Result<LinAct> {
        let lin = self.model.lin(l, slot);
        let r = lo.rank;
        let xd = self.lora_input(l, slot, x, rows * lin.inp)?;
        let xin = xd.as_ref().unwrap_or(x);
        let t = self.gpu.uninit_f32(rows * r)?;
        self.gpu
            .gemm(&Gemm::nt(rows, r, lin.inp, xin.ptr, lo.a, t.ptr))?;
        let xa = self.gpu.uninit_bf16(rows * r)?;
        self.gpu.launch_n(
            "scale_to_bf16",
            rows * r,
            &[
                Arg::P(t.ptr),
                Arg::P(xa.ptr),
                Arg::F(lo.scale),
                Arg::L((rows * r) as i64),
            ],
        )?;
        self.gpu
            .gemm(&Gemm::nt(rows, lin.out, r, xa.ptr, lo.b, y.ptr).accumulate())?;
        let magnitude =
            self.vecs[self.model.index(l, slot)].filter(|v| v.kind == VecKind::Magnitude);
        let Some(mag) = magnitude.map(|v| v.value) else {
            return Ok(LinAct {
                xa: Some(xa),
                pre: None,
                norm: None,
            });
        };
        let (out, inp) = (lin.out, lin.inp);
        // ‖W + s·B·A‖ per output row, from B·A in f32 and the bf16 weight.
        let ba = self.gpu.uninit_f32(out * inp)?;
        self.gpu.gemm(&Gemm::nn(out, inp, r, lo.b, lo.a, ba.ptr))?;
        let w = lin.bf16_weight(&self.gpu, &self.scratch)?;
        let norm = self.gpu.uninit_f32(out)?;
        self.gpu.launch_rows(
            "dora_norm",
            out,
            inp,
            &[
                Arg::P(w),
                Arg::P(ba.ptr),
                Arg::F(lo.scale),
                Arg::P(norm.ptr),
                Arg::I(inp as i32),
            ],
        )?;
        drop(ba);
        let z = self.gpu.uninit_f32(rows * out)?;
        self.gpu.copy(&z, y, rows * out * F4)?;
        self.gpu.launch_n(
            "dora_scale",
            rows * out,
            &[
                Arg::P(y.ptr),
                Arg::P(mag),
                Arg::P(norm.ptr),
                Arg::L(rows as i64),
                Arg::I(out as i32),
            ],
        )?;
        Ok(LinAct {
            xa: Some(xa),
            pre: Some(z),
            norm: Some(norm),
        })
    }

    /// Backward of [`Self::lin_fwd`]: LoRA gradients accumulate on the device; with `dx`,
    /// the input gradient is written (`acc` = false) or added (`acc` = true) there.
    #[allow(clippy::too_many_arguments)]
    fn lin_bwd(
        &self,
        l: usize,
        slot: usize,
        dy: &DBuf,
        x: &DBuf,
        act: Option<&LinAct>,
        dx: Option<&DBuf>,
        acc: bool,
        rows: usize,
    ) -> Result<()> {
        let lin = self.model.lin(l, slot);
        let (out, inp) = (lin.out, lin.inp);
        let lora = self.lora[self.model.index(l, slot)].as_ref();
        let vec = self.vecs[self.model.index(l, slot)];
        // IA3 on the input: dl = Σ_rows (dy·W) ⊙ x, dx = (dy·W) ⊙ l; nothing else trains.
        if let Some(v) = vec.filter(|v| v.kind == VecKind::Ia3Input) {
            let dxs = self.gpu.uninit_f32(rows * inp)?;
            self.weight_product(lin, dy.ptr, dxs.ptr, rows, Product::InputGrad, false)?;
            return self.gpu.launch_cols(
                "ia3_input_bwd",
                inp,
                &[
                    Arg::P(dxs.ptr),
                    Arg::P(x.ptr),
                    Arg::P(v.value),
                    Arg::P(v.grad),
                    Arg::P(dx.map_or(0, |d| d.ptr)),
                    Arg::L(rows as i64),
                    Arg::I(inp as i32),
                    Arg::I(acc as i32),
                ],
            );
        }
        // DoRA, and IA3 on the output: the vector's gradient, and the rescaled dy that the
        // base product (and the LoRA branch) see.
        let scaled;
        let dy = match (vec, act.and_then(|a| a.pre.as_ref())) {
            (Some(v), Some(pre)) => {
                scaled = self.gpu.uninit_bf16(rows * out)?;
                let norm = act.and_then(|a| a.norm.as_ref()).map_or(0, |n| n.ptr);
                self.gpu.launch_cols(
                    "dora_bwd",
                    out,
                    &[
                        Arg::P(dy.ptr),
                        Arg::P(pre.ptr),
                        Arg::P(v.value),
                        Arg::P(norm),
                        Arg::P(v.grad),
                        Arg::P(scaled.ptr),
                        Arg::L(rows as i64),
                        Arg::I(out as i32),
                    ],
                )?;
                &scaled
            }
            _ => dy,
        };
        let idx = self.model.index(l, slot);
        if let Some(g) = self.base_grads.get(&Slot::LinearWeight(idx)) {
            // dW += dyᵀ·x
            self.gpu
                .gemm(&Gemm::tn(out, inp, rows, dy.ptr, x.ptr, g.ptr).accumulate())?;
        }
        if let Some(g) = self.base_grads.get(&Slot::LinearBias(idx)) {
            self.gpu.launch_cols(
                "col_sum_bf16",
                out,
                &[
                    Arg::P(dy.ptr),
                    Arg::P(g.ptr),
                    Arg::L(rows as i64),
                    Arg::I(out as i32),
                ],
            )?;
        }
        if let Some(dx) = dx {
            self.weight_product(lin, dy.ptr, dx.ptr, rows, Product::InputGrad, acc)?;
        }
        let Some(lo) = lora else {
            return Ok(());
        };
        let xa = act
            .and_then(|a| a.xa.as_ref())
            .expect("LoRA activation saved");
        let r = lo.rank;
        // dB += dyᵀ·(s·x·Aᵀ)
        self.gpu
            .gemm(&Gemm::tn(out, r, rows, dy.ptr, xa.ptr, lo.gb).accumulate())?;
        // t = s·(dy·B)
        let t = self.gpu.uninit_f32(rows * r)?;
        self.gpu
            .gemm(&Gemm::nn(rows, r, out, dy.ptr, lo.b, t.ptr))?;
        let ts = self.gpu.uninit_bf16(rows * r)?;
        self.gpu.launch_n(
            "scale_to_bf16",
            rows * r,
            &[
                Arg::P(t.ptr),
                Arg::P(ts.ptr),
                Arg::F(lo.scale),
                Arg::L((rows * r) as i64),
            ],
        )?;
        let xd = self.lora_input(l, slot, x, rows * inp)?;
        let xin = xd.as_ref().unwrap_or(x);
        // dA += tᵀ·x_dropped
        self.gpu
            .gemm(&Gemm::tn(r, inp, rows, ts.ptr, xin.ptr, lo.ga).accumulate())?;
        if let Some(dx) = dx {
            if lo.dropout <= 0.0 {
                self.gpu
                    .gemm(&Gemm::nn(rows, inp, r, ts.ptr, lo.a, dx.ptr).accumulate())?;
            } else {
                let tmp = self.gpu.uninit_f32(rows * inp)?;
                self.gpu
                    .gemm(&Gemm::nn(rows, inp, r, ts.ptr, lo.a, tmp.ptr))?;
                self.gpu.launch_n(
                    "dropout_bwd_add",
                    rows * inp,
                    &[
                        Arg::P(dx.ptr),
                        Arg::P(tmp.ptr),
                        Arg::F(lo.dropout),
                        Arg::U64(self.dropout_seed(l, slot)),
                        Arg::L((rows * inp) as i64),
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Rotates (RoPE) and lays out `src` `[rows, heads·dh]` as `[seq, heads, L, dh]` bf16.
    fn to_heads(&self, src: &DBuf, heads: usize, rope: bool, lay: &Layout) -> Result<DBuf> {
        let dst = self.padded_bf16(lay, lay.nseq * heads * lay.l * self.model.head_dim)?;
        self.rope_layout("rope_permute", src, &dst, heads, rope, lay)?;
        Ok(dst)
    }

    /// The inverse for gradients: `[seq, heads, L, dh]` f32 back to rows, rotation transposed.
    fn heads_grad_to_rows(
        &self,
        src: &DBuf,
        heads: usize,
        rope: bool,
        lay: &Layout,
    ) -> Result<DBuf> {
        let dst = self
            .gpu
            .uninit_f32(lay.rows * heads * self.model.head_dim)?;
        self.rope_layout("rope_unpermute_bwd", src, &dst, heads, rope, lay)?;
        Ok(dst)
    }

    /// Launches `rope_permute` or `rope_unpermute_bwd` (the same arguments, one thread per
    /// rotated pair).
    fn rope_layout(
        &self,
        kernel: &str,
        src: &DBuf,
        dst: &DBuf,
        heads: usize,
        rope: bool,
        lay: &Layout,
    ) -> Result<()> {
        let dh = self.model.head_dim;
        self.gpu.launch_n(
            kernel,
            lay.rows * heads * dh / 2,
            &[
                Arg::P(src.ptr),
                Arg::P(dst.ptr),
                Arg::P(lay.row_seq.ptr),
                Arg::P(lay.row_pos.ptr),
                Arg::P(self.model.cos.ptr),
                Arg::P(self.model.sin.ptr),
                Arg::L(lay.rows as i64),
                Arg::I(heads as i32),
                Arg::I(dh as i32),
                Arg::I(lay.l as i32),
                Arg::I((rope && self.model.rope()) as i32),
            ],
        )
    }

    /// Launches `unpermute_bf16` (padded heads → rows) or `permute_bf16` (rows → padded heads)
    /// for the query heads: the same arguments, one thread per element.
    fn merge_heads(&self, kernel: &str, src: &DBuf, dst: &DBuf, lay: &Layout) -> Result<()> {
        let m = &self.model;
        self.gpu.launch_n(
            kernel,
            lay.rows * m.heads * m.head_dim,
            &[
                Arg::P(src.ptr),
                Arg::P(dst.ptr),
                Arg::P(lay.row_seq.ptr),
                Arg::P(lay.row_pos.ptr),
                Arg::L(lay.rows as i64),
                Arg::I(m.heads as i32),
                Arg::I(m.head_dim as i32),
                Arg::I(lay.l as i32),
            ],
        )
    }

    /// Batched attention products over (sequence, kv head) groups: each group holds the `g`
    /// query heads sharing one kv head, `[g·L, dh]`, against that head's `[L, dh]`.
    fn attn_dims(&self, lay: &Layout) -> (usize, usize, usize, usize) {
        let m = &self.model;
        let g = m.heads / m.kv_heads;
        (lay.nseq * m.kv_heads, g * lay.l, lay.l, m.head_dim)
    }

    /// A zeroed buffer when the batch has padding (sequences shorter than the longest),
    /// whose padded rows must be zero; an uninitialised one when every row is written.
    fn padded_bf16(&self, lay: &Layout, n: usize) -> Result<DBuf> {
        if lay.rows == lay.nseq * lay.l {
            self.gpu.uninit_bf16(n)
        } else {
            self.gpu.alloc_bf16(n)
        }
    }

    /// Groups per attention chunk: a chunk's f32 scores take about 32 MB, so they stay in
    /// the L2 cache between the product that writes them and the softmax that reads them, and
    /// the `[L, L]` scores of the whole batch never exist at once.
    fn attn_chunk(&self, lay: &Layout) -> usize {
        let (batch, gl, ll, _) = self.attn_dims(lay);
        ((32usize << 20) / (gl * ll * F4)).clamp(1, batch)
    }

    fn softmax(
        &self,
        s: &DBuf,
        pb: &DBuf,
        rows: usize,
        row0: usize,
        lay: &Layout,
        window: Option<usize>,
    ) -> Result<()> {
        self.gpu.launch_rows(
            "softmax_causal",
            rows,
            lay.l,
            &[
                Arg::P(s.ptr),
                Arg::P(pb.ptr),
                Arg::P(lay.seq_len.ptr),
                Arg::I(self.model.heads as i32),
                Arg::I(lay.l as i32),
                Arg::I(window.unwrap_or(0) as i32),
                Arg::L(row0 as i64),
            ],
        )
    }

    /// The flash kernels' arguments for this batch's padded heads.
    fn flash_args(
        &self,
        qp: &DBuf,
        kp: &DBuf,
        vp: &DBuf,
        lay: &Layout,
        window: Option<usize>,
    ) -> FlashArgs {
        let m = &self.model;
        FlashArgs {
            q: qp.ptr,
            k: kp.ptr,
            v: vp.ptr,
            seq_len: lay.seq_len.ptr,
            nseq: lay.nseq,
            heads: m.heads,
            kv_heads: m.kv_heads,
            l: lay.l,
            dh: m.head_dim,
            window: window.unwrap_or(0),
        }
    }

    /// Whether attention runs on the flash kernels for this model.
    fn flash_on(&self) -> bool {
        self.flash
    }

    /// Causal attention of the padded heads: `softmax(Q·Kᵀ/√d)·V` as f32 `[seq, heads, L, dh]`.
    /// On the flash path with `keep`, also the rows' log-sum-exp for the backward pass.
    fn attention_fwd(
        &self,
        qp: &DBuf,
        kp: &DBuf,
        vp: &DBuf,
        lay: &Layout,
        window: Option<usize>,
        keep: bool,
    ) -> Result<(DBuf, Option<DBuf>)> {
        let gpu = &self.gpu;
        let (batch, gl, ll, dh) = self.attn_dims(lay);
        if self.flash_on() {
            let op = gpu.uninit_f32(batch * gl * dh)?;
            let lse = if keep {
                Some(gpu.uninit_f32(batch * gl)?)
            } else {
                None
            };
            let args = self.flash_args(qp, kp, vp, lay, window);
            launch_flash_fwd(gpu, &args, op.ptr, lse.as_ref().map_or(0, |b| b.ptr))?;
            return Ok((op, lse));
        }
        let ch = self.attn_chunk(lay);
        let s = gpu.uninit_f32(ch * gl * ll)?;
        let pb = gpu.uninit_bf16(ch * gl * ll)?;
        let op = gpu.uninit_f32(batch * gl * dh)?;
        let scale = 1.0 / (dh as f32).sqrt();
        for c0 in (0..batch).step_by(ch) {
            let c = ch.min(batch - c0);
            gpu.gemm(
                &Gemm::nt(
                    gl,
                    ll,
                    dh,
                    qp.at(c0 * gl * dh, BF),
                    kp.at(c0 * ll * dh, BF),
                    s.ptr,
                )
                .scaled(scale)
                .batched(c, gl * dh, ll * dh, gl * ll),
            )?;
            self.softmax(&s, &pb, c * gl, c0 * gl, lay, window)?;
            gpu.gemm(
                &Gemm::nn(
                    gl,
                    dh,
                    ll,
                    pb.ptr,
                    vp.at(c0 * ll * dh, BF),
                    op.at(c0 * gl * dh, F4),
                )
                .batched(c, gl * ll, ll * dh, gl * dh),
            )?;
        }
        Ok((op, None))
    }

    /// Backward of [`Self::attention_fwd`] given `dop` (bf16, padded layout): recomputes the
    /// probabilities chunk by chunk (as flash attention does) and returns dQ, dK, dV (f32).
    fn attention_bwd(
        &self,
        qp: &DBuf,
        kp: &DBuf,
        vp: &DBuf,
        dop: &DBuf,
        lay: &Layout,
        window: Option<usize>,
    ) -> Result<(DBuf, DBuf, DBuf)> {
        let gpu = &self.gpu;
        let (batch, gl, ll, dh) = self.attn_dims(lay);
        let ch = self.attn_chunk(lay);
        let s = gpu.uninit_f32(ch * gl * ll)?;
        let pb = gpu.uninit_bf16(ch * gl * ll)?;
        let dp = gpu.uninit_f32(ch * gl * ll)?;
        let dqp = gpu.uninit_f32(batch * gl * dh)?;
        let dkp = gpu.uninit_f32(batch * ll * dh)?;
        let dvp = gpu.uninit_f32(batch * ll * dh)?;
        let scale = 1.0 / (dh as f32).sqrt();
        for c0 in (0..batch).step_by(ch) {
            let c = ch.min(batch - c0);
            let (q, k, v) = (
                qp.at(c0 * gl * dh, BF),
                kp.at(c0 * ll * dh, BF),
                vp.at(c0 * ll * dh, BF),
            );
            let dout = dop.at(c0 * gl * dh, BF);
            gpu.gemm(&Gemm::nt(gl, ll, dh, q, k, s.ptr).scaled(scale).batched(
                c,
                gl * dh,
                ll * dh,
                gl * ll,
            ))?;
            self.softmax(&s, &pb, c * gl, c0 * gl, lay, window)?;
            // dP = dO·Vᵀ, dV = Pᵀ·dO
            gpu.gemm(&Gemm::nt(gl, ll, dh, dout, v, dp.ptr).batched(c, gl * dh, ll * dh, gl * ll))?;
            gpu.gemm(
                &Gemm::tn(ll, dh, gl, pb.ptr, dout, dvp.at(c0 * ll * dh, F4)).batched(
                    c,
                    gl * ll,
                    gl * dh,
                    ll * dh,
                ),
            )?;
            // dS (bf16) overwrites P in place (each thread reads its elements before it
            // writes them; dV was the last product to read P).
            gpu.launch_rows(
                "softmax_bwd",
                c * gl,
                ll,
                &[
                    Arg::P(pb.ptr),
                    Arg::P(dp.ptr),
                    Arg::P(pb.ptr),
                    Arg::I(ll as i32),
                    Arg::F(scale),
                ],
            )?;
            gpu.gemm(
                &Gemm::nn(gl, dh, ll, pb.ptr, k, dqp.at(c0 * gl * dh, F4)).batched(
                    c,
                    gl * ll,
                    ll * dh,
                    gl * dh,
                ),
            )?;
            gpu.gemm(
                &Gemm::tn(ll, dh, gl, pb.ptr, q, dkp.at(c0 * ll * dh, F4)).batched(
                    c,
                    gl * ll,
                    gl * dh,
                    ll * dh,
                ),
            )?;
        }
        Ok((dqp, dkp, dvp))
    }

    /// Block `l`'s MLP sub-layer on `h2` (the residual stream after attention, f32): its
    /// output with the residual added, and what its backward pass needs.
    pub(super) fn mlp_forward(&self, l: usize, h2: &DBuf, rows: usize) -> Result<Mlp> {
        let gpu = &self.gpu;
        let m = &self.model;
        let (d, ff) = (m.hidden, m.inter);
        let n2 = gpu.uninit_bf16(rows * d)?;
        let rstd2 = self.norm_stats(rows)?;
        self.norm_fwd(h2, &m.blocks[l].mlp_norm, &n2, &rstd2, rows)?;
        let g = gpu.uninit_f32(rows * ff)?;
        let a = gpu.uninit_bf16(rows * ff)?;
        let n = (rows * ff) as i64;
        let (xg, xu, u) = match m.family {
            Family::Llama => {
                let u = gpu.uninit_f32(rows * ff)?;
                let xg = self.lin_fwd(l, GATE, &n2, &g, rows)?;
                let xu = self.lin_fwd(l, UP, &n2, &u, rows)?;
                gpu.launch_n(
                    "silu_mul_fwd",
                    rows * ff,
                    &[Arg::P(g.ptr), Arg::P(u.ptr), Arg::P(a.ptr), Arg::L(n)],
                )?;
                (xg, xu, Some(u))
            }
            Family::Gpt2 { gelu } => {
                let xu = self.lin_fwd(l, UP, &n2, &g, rows)?;
                gpu.launch_n(
                    "gelu_fwd",
                    rows * ff,
                    &[Arg::P(g.ptr), Arg::P(a.ptr), Arg::L(n), Arg::I(gelu)],
                )?;
                (None, xu, None)
            }
        };
        let out = gpu.uninit_f32(rows * d)?;
        let xd = self.lin_fwd(l, DOWN, &a, &out, rows)?;
        let adapter = self.adapter_fwd(l, 1, &n2, &out, rows)?;
        gpu.launch_n(
            "add_inplace",
            rows * d,
            &[Arg::P(out.ptr), Arg::P(h2.ptr), Arg::L((rows * d) as i64)],
        )?;
        Ok(Mlp {
            n2,
            rstd2,
            g,
            u,
            a,
            out,
            acts: [xg, xu, xd],
            adapter,
        })
    }

    /// The attention's queries, keys and values of block `l` (f32 rows) from the normalized
    /// input `n1`, and what their linears' backward passes need (GPT-2's fused product: in
    /// Q's place).
    pub(super) fn qkv_fwd(
        &self,
        l: usize,
        n1: &DBuf,
        rows: usize,
    ) -> Result<(DBuf, DBuf, DBuf, [Option<LinAct>; 3])> {
        let gpu = &self.gpu;
        let m = &self.model;
        let (qd, kvd) = (m.heads * m.head_dim, m.kv_heads * m.head_dim);
        let q = gpu.uninit_f32(rows * qd)?;
        let k = gpu.uninit_f32(rows * kvd)?;
        let v = gpu.uninit_f32(rows * kvd)?;
        if m.family == Family::Llama {
            let aq = self.lin_fwd(l, Q, n1, &q, rows)?;
            let ak = self.lin_fwd(l, K, n1, &k, rows)?;
            let av = self.lin_fwd(l, V, n1, &v, rows)?;
            return Ok((q, k, v, [aq, ak, av]));
        }
        let width = qd + 2 * kvd;
        let qkv = gpu.uninit_f32(rows * width)?;
        let act = self.lin_fwd(l, Q, n1, &qkv, rows)?;
        for (dst, off, cols) in [(&q, 0, qd), (&k, qd, kvd), (&v, qd + kvd, kvd)] {
            gpu.launch_n(
                "copy_cols_f32",
                rows * cols,
                &[
                    Arg::P(qkv.ptr),
                    Arg::I(width as i32),
                    Arg::I(off as i32),
                    Arg::P(dst.ptr),
                    Arg::I(cols as i32),
                    Arg::I(0),
                    Arg::I(cols as i32),
                    Arg::L(rows as i64),
                ],
            )?;
        }
        Ok((q, k, v, [act, None, None]))
    }

    /// The backward pass of [`Self::qkv_fwd`]: the gradients of q, k and v (bf16 rows) through
    /// their linears (adapters' gradients included); dL/d`n1` into `dn1` when given.
    fn qkv_bwd(
        &self,
        l: usize,
        (dq, dk, dv): (&DBuf, &DBuf, &DBuf),
        n1: &DBuf,
        acts: &[Option<LinAct>],
        dn1: Option<&DBuf>,
        rows: usize,
    ) -> Result<()> {
        let m = &self.model;
        if m.family == Family::Llama {
            self.lin_bwd(l, Q, dq, n1, acts[Q].as_ref(), dn1, false, rows)?;
            self.lin_bwd(l, K, dk, n1, acts[K].as_ref(), dn1, true, rows)?;
            return self.lin_bwd(l, V, dv, n1, acts[V].as_ref(), dn1, true, rows);
        }
        let (qd, kvd) = (m.heads * m.head_dim, m.kv_heads * m.head_dim);
        let width = qd + 2 * kvd;
        let dqkv = self.gpu.uninit_bf16(rows * width)?;
        for (src, off, cols) in [(dq, 0, qd), (dk, qd, kvd), (dv, qd + kvd, kvd)] {
            self.gpu.launch_n(
                "copy_cols_bf16",
                rows * cols,
                &[
                    Arg::P(src.ptr),
                    Arg::I(cols as i32),
                    Arg::I(0),
                    Arg::P(dqkv.ptr),
                    Arg::I(width as i32),
                    Arg::I(off as i32),
                    Arg::I(cols as i32),
                    Arg::L(rows as i64),
                ],
            )?;
        }
        self.lin_bwd(l, Q, &dqkv, n1, acts[Q].as_ref(), dn1, false, rows)
    }

    fn block_forward(
        &self,
        l: usize,
        x: &DBuf,
        lay: &Layout,
        keep: bool,
    ) -> Result<(DBuf, Option<Saved>)> {
        let gpu = &self.gpu;
        let m = &self.model;
        let blk = &m.blocks[l];
        let (d, rows) = (m.hidden, lay.rows);
        let qd = m.heads * m.head_dim;
        let mut xa: Vec<Option<LinAct>> = (0..ROLES).map(|_| None).collect();
        // attention
        let n1 = gpu.uninit_bf16(rows * d)?;
        let rstd1 = self.norm_stats(rows)?;
        self.norm_fwd(x, &blk.attn_norm, &n1, &rstd1, rows)?;
        let (q, k, v, acts) = self.qkv_fwd(l, &n1, rows)?;
        [xa[Q], xa[K], xa[V]] = acts;
        let qp = self.to_heads(&q, m.heads, true, lay)?;
        let kp = self.to_heads(&k, m.kv_heads, true, lay)?;
        let vp = self.to_heads(&v, m.kv_heads, false, lay)?;
        if let Some(p) = &self.prefix {
            for (dst, off) in [(&kp, 2 * l * p.kv_dim), (&vp, (2 * l + 1) * p.kv_dim)] {
                self.prefix_launch("prefix_to_heads", &p.p, dst, off, p, lay)?;
            }
        }
        drop((q, k, v));
        let (op, lse) = self.attention_fwd(&qp, &kp, &vp, lay, blk.window, keep)?;
        let o_in = gpu.uninit_bf16(rows * qd)?;
        self.merge_heads("unpermute_bf16", &op, &o_in, lay)?;
        let flash = lse.map(|lse| (op, lse));
        let h2 = gpu.uninit_f32(rows * d)?;
        xa[O] = self.lin_fwd(l, O, &o_in, &h2, rows)?;
        let ad0 = self.adapter_fwd(l, 0, &n1, &h2, rows)?;
        gpu.launch_n(
            "add_inplace",
            rows * d,
            &[Arg::P(h2.ptr), Arg::P(x.ptr), Arg::L((rows * d) as i64)],
        )?;
        let Mlp {
            n2,
            rstd2,
            g,
            u,
            a,
            out,
            acts: [xg, xu, xd],
            adapter: ad1,
        } = self.mlp_forward(l, &h2, rows)?;
        (xa[GATE], xa[UP], xa[DOWN]) = (xg, xu, xd);
        let saved = keep.then_some(Saved {
            n1,
            rstd1,
            qp,
            kp,
            vp,
            o_in,
            h2,
            n2,
            rstd2,
            g,
            u,
            a,
            xa,
            flash,
            adapters: [ad0, ad1],
        });
        Ok((out, saved))
    }

    /// Recomputes block `l` from its input `x` and runs its backward pass given `dh`, the
    /// gradient of its output; returns the gradient of its input.
    /// One block's backward pass from `dh`, the gradient of its output: with its activations
    /// `kept` by the forward pass, or recomputed from its input `x` (checkpointing).
    fn block_backward(
        &self,
        l: usize,
        x: &DBuf,
        dh: DBuf,
        lay: &Layout,
        kept: Option<Saved>,
    ) -> Result<DBuf> {
        let gpu = &self.gpu;
        let m = &self.model;
        let blk = &m.blocks[l];
        let (d, rows) = (m.hidden, lay.rows);
        let (qd, kvd, ff) = (m.heads * m.head_dim, m.kv_heads * m.head_dim, m.inter);
        // The gradient of the block's input: for the blocks below, or the embedding.
        let need_dx = l > self.stop_layer
            || self.base_grads.contains_key(&Slot::Embedding)
            || self.base_grads.contains_key(&Slot::PositionEmbedding)
            || self.prompt.is_some();
        let attn_norm_trains = self.base_grads.contains_key(&Slot::NormWeight(2 * l))
            || self.base_grads.contains_key(&Slot::NormBias(2 * l));
        let s = match kept {
            Some(s) => s,
            None => {
                let (_, s) = self.block_forward(l, x, lay, true)?;
                self.phases.mark(gpu, "backward: recompute");
                s.expect("saved activations")
            }
        };
        // MLP backward (through the adapter on its output first)
        let (dy_mlp, par_mlp) = self.adapter_bwd(l, 1, s.adapters[1].as_ref(), &dh, rows)?;
        let dh_bf = self.cast_bf16(dy_mlp.as_ref().unwrap_or(&dh), rows * d)?;
        let da = gpu.uninit_f32(rows * ff)?;
        self.lin_bwd(
            l,
            DOWN,
            &dh_bf,
            &s.a,
            s.xa[DOWN].as_ref(),
            Some(&da),
            false,
            rows,
        )?;
        drop(dh_bf);
        let dn2 = gpu.uninit_f32(rows * d)?;
        let n = (rows * ff) as i64;
        match (m.family, &s.u) {
            (Family::Llama, Some(u)) => {
                let dg = gpu.uninit_bf16(rows * ff)?;
                let du = gpu.uninit_bf16(rows * ff)?;
                gpu.launch_n(
                    "silu_mul_bwd",
                    rows * ff,
                    &[
                        Arg::P(s.g.ptr),
                        Arg::P(u.ptr),
                        Arg::P(da.ptr),
                        Arg::P(dg.ptr),
                        Arg::P(du.ptr),
                        Arg::L(n),
                    ],
                )?;
                drop(da);
                let (n2, xa) = (&s.n2, &s.xa);
                self.lin_bwd(l, GATE, &dg, n2, xa[GATE].as_ref(), Some(&dn2), false, rows)?;
                self.lin_bwd(l, UP, &du, n2, xa[UP].as_ref(), Some(&dn2), true, rows)?;
            }
            (Family::Gpt2 { gelu }, _) => {
                let dg = gpu.uninit_bf16(rows * ff)?;
                gpu.launch_n(
                    "gelu_bwd",
                    rows * ff,
                    &[
                        Arg::P(s.g.ptr),
                        Arg::P(da.ptr),
                        Arg::P(dg.ptr),
                        Arg::L(n),
                        Arg::I(gelu),
                    ],
                )?;
                drop(da);
                let (n2, xa) = (&s.n2, &s.xa);
                self.lin_bwd(l, UP, &dg, n2, xa[UP].as_ref(), Some(&dn2), false, rows)?;
            }
            (Family::Llama, None) => unreachable!("SwiGLU keeps its up output"),
        }
        if let Some(p) = par_mlp {
            // A parallel adapter read the normalized input too.
            gpu.launch_n(
                "add_inplace",
                rows * d,
                &[Arg::P(dn2.ptr), Arg::P(p.ptr), Arg::L((rows * d) as i64)],
            )?;
        }
        // dh now becomes the gradient at h2 (residual plus the norm's path).
        self.norm_bwd(&s.h2, &blk.mlp_norm, &s.rstd2, &dn2, &dh, rows)?;
        self.norm_weight_grad(2 * l + 1, &s.h2, &s.rstd2, &dn2, rows)?;
        drop(dn2);
        self.phases.mark(gpu, "backward: MLP");
        // attention backward (through the adapter on its output first)
        let (dy_attn, par_attn) = self.adapter_bwd(l, 0, s.adapters[0].as_ref(), &dh, rows)?;
        let dh2_bf = self.cast_bf16(dy_attn.as_ref().unwrap_or(&dh), rows * d)?;
        let d_o = gpu.uninit_f32(rows * qd)?;
        self.lin_bwd(
            l,
            O,
            &dh2_bf,
            &s.o_in,
            s.xa[O].as_ref(),
            Some(&d_o),
            false,
            rows,
        )?;
        drop(dh2_bf);
        let (batch, gl, _, dh_) = self.attn_dims(lay);
        let dop = self.padded_bf16(lay, batch * gl * dh_)?;
        self.merge_heads("permute_bf16", &d_o, &dop, lay)?;
        drop(d_o);
        self.phases.mark(gpu, "backward: o_proj");
        let (dqp, dkp, dvp) = match &s.flash {
            Some((op, lse)) => {
                let args = self.flash_args(&s.qp, &s.kp, &s.vp, lay, blk.window);
                launch_flash_bwd(&self.gpu, &args, dop.ptr, op.ptr, lse.ptr)?
            }
            None => self.attention_bwd(&s.qp, &s.kp, &s.vp, &dop, lay, blk.window)?,
        };
        drop(dop);
        self.phases.mark(gpu, "backward: attention");
        if let Some(p) = &self.prefix {
            for (src, off) in [(&dkp, 2 * l * p.kv_dim), (&dvp, (2 * l + 1) * p.kv_dim)] {
                self.prefix_launch("prefix_grad", src, &p.dp, off, p, lay)?;
            }
        }
        let dq = self.heads_grad_to_rows(&dqp, m.heads, true, lay)?;
        let dk = self.heads_grad_to_rows(&dkp, m.kv_heads, true, lay)?;
        let dv = self.heads_grad_to_rows(&dvp, m.kv_heads, false, lay)?;
        drop((dqp, dkp, dvp));
        let dq_bf = self.cast_bf16(&dq, rows * qd)?;
        let dk_bf = self.cast_bf16(&dk, rows * kvd)?;
        let dv_bf = self.cast_bf16(&dv, rows * kvd)?;
        drop((dq, dk, dv));
        let dn1 = if need_dx || attn_norm_trains {
            Some(gpu.uninit_f32(rows * d)?)
        } else {
            None
        };
        self.qkv_bwd(
            l,
            (&dq_bf, &dk_bf, &dv_bf),
            &s.n1,
            &s.xa,
            dn1.as_ref(),
            rows,
        )?;
        if let (Some(dn1), Some(p)) = (&dn1, &par_attn) {
            gpu.launch_n(
                "add_inplace",
                rows * d,
                &[Arg::P(dn1.ptr), Arg::P(p.ptr), Arg::L((rows * d) as i64)],
            )?;
        }
        if let Some(dn1) = dn1 {
            if need_dx {
                self.norm_bwd(x, &blk.attn_norm, &s.rstd1, &dn1, &dh, rows)?;
            }
            self.norm_weight_grad(2 * l, x, &s.rstd1, &dn1, rows)?;
        }
        self.phases.mark(gpu, "backward: q/k/v");
        Ok(dh)
    }
}

/// What in `state` the GPU step does not compute yet.
fn unsupported_state(state: &TrainState) -> Option<&'static str> {
    // A reward model's score head and PPO's value head are the host objective's (rm-train,
    // ppo-train): they stay on the host.
    if state.params.iter().any(|(s, _)| {
        !matches!(
            s,
            Slot::LoraA(_)
                | Slot::LoraB(_)
                | Slot::LoraMagnitude(_)
                | Slot::Ia3(_)
                | Slot::Score
                | Slot::ValueHead
                | Slot::ValueBias
                | Slot::LinearWeight(_)
                | Slot::LinearBias(_)
                | Slot::NormWeight(_)
                | Slot::NormBias(_)
                | Slot::Embedding
                | Slot::PositionEmbedding
                | Slot::Head
                | Slot::PromptEmbedding
                | Slot::Bottleneck(..)
                | Slot::PrefixEmbedding
                | Slot::PrefixW1
                | Slot::PrefixB1
                | Slot::PrefixW2
                | Slot::PrefixB2
        )
    }) {
        return Some("this set of trainable tensors");
    }
    if state.params.is_empty() {
        return Some("a run with nothing to train");
    }
    None
}

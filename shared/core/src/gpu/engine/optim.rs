//! AdamW on the device: the f32 master copies and both moments of the tensors that step here
//! live on the GPU next to their gradients, so a step moves nothing over PCIe. Gradients
//! accumulate on the device over a step's micro-batches; the step clips them (their share of
//! the norm comes from `sum_squares`), updates masters and moments with torch's arithmetic,
//! writes the new values into the compute copies the passes read, and zeroes the gradients.
//!
//! Two groups of tensors step here:
//! - **Adapters** (LoRA A and B, DoRA magnitudes, IA3 vectors), unless the optimizer is kept
//!   on the host. They are small, but the host round trip they replace — every pass, the
//!   values converted to bf16 and uploaded, the gradients downloaded and added, then AdamW on
//!   the host — was about a tenth of a QLoRA step on an H200 (13 of 135 ms).
//! - **Trainable base tensors** (full and partial fine-tuning), when their 12 bytes per
//!   parameter fit in half the free memory.
//!
//! Bottleneck adapters, prompts and prefixes keep the host optimizer.
//!
//! `PEFTKIT_GPU_OPTIMIZER` chooses: `host` keeps the whole optimizer on the host; `device`
//! puts the base tensors' states in device memory whatever their size; `paged` puts all states
//! in managed memory, which the driver pages out to the host when the device runs short and
//! back when the step needs them (QLoRA's paged optimizers). Data-parallel ranks each step on
//! their device, after the gradients kept here are summed over the ranks
//! ([`GpuEngine::all_reduce_device_grads`]).
//!
//! The host's copies (values, moments) go stale once the device has stepped
//! (`TrainState::host_stale`); the trainer brings them back ([`GpuEngine::sync_to_host`])
//! before it writes a checkpoint or the output, and saving refuses stale values. A pass of
//! another state (PPO's frozen reference) writes its own values into the compute copies; the
//! next pass of the run's state restores them from the masters.

use super::*;
use crate::dist::Communicator;
use crate::gpu::weights::GpuWeight;
use crate::train::optim::{clip_grad_norm_with, AdamW};
use crate::train::params::StateId;
use std::collections::{HashMap, HashSet};

/// Tensors that step in one launch: `slots` (with their lengths) lie one after another at
/// `grad` (f32) and at `out`, the compute copy the passes read (bf16 or f32).
pub(super) struct DeviceRange {
    slots: Vec<(Slot, usize)>,
    n: usize,
    decay: bool,
    grad: u64,
    out: u64,
    out_bf16: bool,
    /// Adapter values (restored from the master after another state's pass).
    adapter: bool,
    /// The f32 master copy and the two moments, from the first step on.
    states: Option<[DBuf; 3]>,
}

/// Which tensors step on the device, and what it holds of them.
pub(super) struct DeviceOptim {
    ranges: Vec<DeviceRange>,
    on_device: HashSet<Slot>,
    paged: bool,
    /// The run whose values the masters hold: the state the engine was built for.
    owner: StateId,
    /// Whose adapter values the compute copies hold.
    compute_of: Option<StateId>,
    /// The trainable tensors and whether weight decay applies to each (HF Trainer's rule).
    decay: HashMap<Slot, bool>,
    /// Data parallel: whether the ranks agreed to sum the gradients on their GPUs (decided
    /// at the first reduction).
    reduce_on_gpu: Option<bool>,
}

impl DeviceOptim {
    pub(super) fn new(state: &TrainState) -> Self {
        Self {
            ranges: Vec::new(),
            on_device: HashSet::new(),
            paged: false,
            owner: state.id,
            compute_of: None,
            decay: state.params.iter().map(|(s, p)| (*s, p.decay)).collect(),
            reduce_on_gpu: None,
        }
    }

    /// Whether the device has stepped: its values are then the current ones.
    pub(super) fn stepped(&self) -> bool {
        self.ranges.iter().any(|r| r.states.is_some())
    }

    /// Whether adapter gradients accumulate on the device across micro-batches (the step
    /// zeroes them) rather than going to the host after each pass.
    pub(super) fn keeps_adapter_grads(&self) -> bool {
        self.ranges.iter().any(|r| r.adapter)
    }

    /// Whether base tensor gradients stay on the device.
    pub(super) fn keeps_base_grads(&self) -> bool {
        self.ranges.iter().any(|r| !r.adapter)
    }

    /// Drops the adapter ranges (their buffers are about to be replaced: adapters switched
    /// for generation); refused once the device has stepped, as it holds their only values.
    pub(super) fn forget_adapters(&mut self) -> Result<()> {
        if self.ranges.iter().any(|r| r.adapter && r.states.is_some()) {
            return Err(Error::Device(
                "internal: adapters replaced after the GPU optimizer stepped them".into(),
            ));
        }
        self.ranges.retain(|r| !r.adapter);
        let kept: HashSet<Slot> = self
            .ranges
            .iter()
            .flat_map(|r| r.slots.iter().map(|s| s.0))
            .collect();
        self.on_device = kept;
        Ok(())
    }

    /// Adds tensor `slot` (`n` values at `grad` and `out`) when it trains, to the last range
    /// when it continues it in memory with the same decay and kind.
    fn push(&mut self, slot: Slot, n: usize, grad: u64, out: (u64, bool), adapter: bool) {
        let Some(&decay) = self.decay.get(&slot) else {
            return;
        };
        let elem = if out.1 { 2 } else { 4 };
        self.on_device.insert(slot);
        if let Some(last) = self.ranges.last_mut() {
            if last.adapter == adapter
                && last.decay == decay
                && last.out_bf16 == out.1
                && last.grad + 4 * last.n as u64 == grad
                && last.out + (elem * last.n) as u64 == out.0
            {
                last.slots.push((slot, n));
                last.n += n;
                return;
            }
        }
        self.ranges.push(DeviceRange {
            slots: vec![(slot, n)],
            n,
            decay,
            grad,
            out: out.0,
            out_bf16: out.1,
            adapter,
            states: None,
        });
    }
}

impl GpuEngine {
    /// Chooses where AdamW runs (at construction, after the adapters and base gradients are
    /// laid out): see the module's notes.
    pub(super) fn choose_device_optimizer(&mut self) -> Result<()> {
        let params: usize = self.base_grads.values().map(|g| g.bytes / 4).sum();
        let (used, total) = self.gpu.device_used();
        let fits = total == 0 || 12 * params < total.saturating_sub(used) / 2;
        let (base, adapters, paged) = match std::env::var("PEFTKIT_GPU_OPTIMIZER").as_deref() {
            Err(_) | Ok("") => (fits, true, false),
            Ok("host") => (false, false, false),
            Ok("device") => (true, true, false),
            Ok("paged") => (true, true, true),
            Ok(other) => {
                return Err(Error::usage(format!(
                    "PEFTKIT_GPU_OPTIMIZER must be host, device or paged, not {other}"
                )))
            }
        };
        self.plan_optimizer(base, adapters, paged)
    }

    /// Lays out the ranges that step on the device: the base tensors when `base`, the
    /// adapters when `adapters`.
    fn plan_optimizer(&mut self, base: bool, adapters: bool, paged: bool) -> Result<()> {
        assert!(!self.optim.stepped(), "after the first step");
        self.optim.ranges.clear();
        self.optim.on_device.clear();
        self.optim.paged = paged;
        if adapters {
            for (i, g) in self.lora.iter().enumerate() {
                let Some(g) = g else { continue };
                for (slot, at, n) in [
                    (Slot::LoraA(i), g.off, g.na),
                    (Slot::LoraB(i), g.off + g.na, g.nb),
                ] {
                    let grad = self.adapter_grads.at(at, F4);
                    let out = self.adapter_values.at(at, BF);
                    self.optim.push(slot, n, grad, (out, true), true);
                }
            }
            for (i, v) in self.vecs.iter().enumerate() {
                let Some(v) = v else { continue };
                let slot = match v.kind {
                    VecKind::Magnitude => Slot::LoraMagnitude(i),
                    _ => Slot::Ia3(i),
                };
                self.optim.push(slot, v.len, v.grad, (v.value, false), true);
            }
        }
        if base {
            let mut slots: Vec<Slot> = self.base_grads.keys().copied().collect();
            slots.sort();
            for slot in slots {
                let g = &self.base_grads[&slot];
                let (out, bf16) = self.compute_copy(slot)?;
                let out = (out.ptr, bf16);
                self.optim.push(slot, g.bytes / 4, g.ptr, out, false);
            }
        }
        Ok(())
    }

    /// Whether `state` is the one the engine was built for (the run's own).
    pub(crate) fn built_for(&self, state: &TrainState) -> bool {
        state.id == self.optim.owner
    }

    /// Whether trainable tensor `slot` steps on the device.
    pub fn steps_on_device(&self, slot: Slot) -> bool {
        self.optim.on_device.contains(&slot)
    }

    /// Puts the optimizer on the device, base tensors included and its states in managed
    /// memory when `paged` (what `PEFTKIT_GPU_OPTIMIZER=device|paged` asks), before the
    /// first step.
    pub fn use_device_optimizer(&mut self, paged: bool) -> Result<()> {
        self.plan_optimizer(true, true, paged)
    }

    /// Keeps the whole optimizer on the host (what `PEFTKIT_GPU_OPTIMIZER=host` asks; checks
    /// that compare the gradients on the host), before the first step.
    pub fn keep_optimizer_on_host(&mut self) -> Result<()> {
        self.plan_optimizer(false, false, false)
    }

    /// Whether the device optimizer has stepped (its values are then the current ones).
    pub(super) fn steps_taken_on_device(&self) -> bool {
        self.optim.stepped()
    }

    /// Before a pass of `state`: true when the device holds its adapter values (the run's own
    /// state after a device step), which are then in the compute copies, restored from the
    /// masters if another state's pass replaced them. False: the caller uploads the state's.
    pub(super) fn adapters_held_on_device(&mut self, state: &TrainState) -> Result<bool> {
        // (Without adapter ranges the host steps the adapters: its values are the current ones.)
        let held = self.optim.stepped()
            && self.optim.keeps_adapter_grads()
            && state.id == self.optim.owner;
        if held && self.optim.compute_of != Some(state.id) {
            for r in self.optim.ranges.iter().filter(|r| r.adapter) {
                let Some([master, _, _]) = &r.states else {
                    continue;
                };
                if r.out_bf16 {
                    self.gpu.launch_n(
                        "cast_f32_bf16",
                        r.n,
                        &[Arg::P(master.ptr), Arg::P(r.out), Arg::L(r.n as i64)],
                    )?;
                } else {
                    self.gpu.copy_raw(r.out, master.ptr, 4 * r.n)?;
                }
            }
        }
        self.optim.compute_of = Some(state.id);
        Ok(held)
    }

    /// Refuses a backward pass of a state other than the run's while gradients accumulate on
    /// the device: they would mix with the run's.
    pub(super) fn check_gradient_owner(&self, state: &TrainState) -> Result<()> {
        if !self.optim.ranges.is_empty() && state.id != self.optim.owner {
            return Err(Error::Device(
                "internal: a backward pass of another state than the one the GPU optimizer trains"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Data parallel: sums the gradients kept on the device over the ranks (every rank then
    /// takes the same step). Ranks must call it at the same point of every step.
    ///
    /// Where the communicator sums this GPU's memory (NCCL), every range is summed in place
    /// there: for a 1B full fine-tune that is 4 GB that no longer crosses PCIe four times
    /// (down, and up, down and up again through NCCL's staging). Otherwise the gradients go
    /// through the host in one reduction: downloaded, reduced by `comm`, written back. The
    /// ranks agree on the path once (any rank that cannot sum on its GPU, say one whose
    /// engine runs on another device than its NCCL communicator, sends all through the host).
    pub fn all_reduce_device_grads(&mut self, comm: &mut dyn Communicator) -> Result<()> {
        if comm.world() == 1 || self.optim.ranges.is_empty() {
            return Ok(());
        }
        let on_gpu = match self.optim.reduce_on_gpu {
            Some(b) => b,
            None => {
                let here = comm.gpu_device() == Some(self.gpu.spec);
                let mut cannot = [f64::from(u8::from(!here))];
                comm.all_reduce_sum_f64(&mut cannot)?;
                let all = cannot[0] == 0.0;
                self.optim.reduce_on_gpu = Some(all);
                all
            }
        };
        if on_gpu {
            // NCCL runs on its own stream: the backward pass's writes must be done.
            self.gpu.sync()?;
            for r in &self.optim.ranges {
                comm.all_reduce_sum_gpu(r.grad, r.n)?;
            }
            return Ok(());
        }
        let n: usize = self.optim.ranges.iter().map(|r| r.n).sum();
        let mut flat = Vec::with_capacity(n);
        for r in &self.optim.ranges {
            flat.extend(self.gpu.download_f32_at(r.grad, r.n)?);
        }
        comm.all_reduce_sum(&mut flat)?;
        let mut at = 0;
        for r in &self.optim.ranges {
            self.gpu.upload_f32_at(r.grad, &flat[at..at + r.n])?;
            at += r.n;
        }
        Ok(())
    }

    /// Σ g² over the gradients kept on the device (gradient clipping's share of them).
    pub fn device_grad_sq(&self) -> Result<f64> {
        if self.optim.ranges.is_empty() {
            return Ok(0.0);
        }
        let out = self.gpu.alloc_f32(1)?;
        for r in &self.optim.ranges {
            self.gpu.launch_n(
                "sum_squares",
                r.n,
                &[Arg::P(r.grad), Arg::P(out.ptr), Arg::L(r.n as i64)],
            )?;
        }
        Ok(self.gpu.download_f32(&out, 1)?[0] as f64)
    }

    /// Clips the gradients, the host's and the device's together, to a global norm of `clip`
    /// and takes one AdamW step at `lr` (optimizer step `step`, 1-based): the host's tensors
    /// on the host, the others here; base tensors stepped on the host are uploaded. Returns
    /// the norm before clipping.
    pub fn clip_and_step(
        &mut self,
        opt: &AdamW,
        model: &mut Model,
        state: &mut TrainState,
        clip: Option<f32>,
        lr: f32,
        step: u64,
    ) -> Result<f32> {
        let (norm, coef) = clip_grad_norm_with(state, clip, self.device_grad_sq()?);
        opt.step_where(state, model, lr, step, |s| !self.steps_on_device(s));
        self.device_step(opt, model, state, lr, step, coef)?;
        self.refresh_base(model)?;
        Ok(norm)
    }

    /// One AdamW step of the tensors on the device with gradients scaled by `gscale`; their
    /// compute copies take the new values and the gradients are zeroed. The first step takes
    /// the masters and moments from the host (`model`, `state`: a fresh run, or one resumed
    /// from a checkpoint). The host's copies are stale from then on.
    pub fn device_step(
        &mut self,
        opt: &AdamW,
        model: &mut Model,
        state: &mut TrainState,
        lr: f32,
        step: u64,
        gscale: f32,
    ) -> Result<()> {
        if self.optim.ranges.is_empty() {
            return Ok(());
        }
        if !self.optim.stepped() {
            let paged = self.optim.paged;
            for r in &mut self.optim.ranges {
                let mut host: [Vec<f32>; 3] = std::array::from_fn(|_| Vec::with_capacity(r.n));
                for &(slot, _) in &r.slots {
                    let k = state.index_of(slot).expect("a trainable slot");
                    let (value, p) = state.value_and_state_mut(model, k);
                    host[0].extend_from_slice(value);
                    host[1].extend_from_slice(&p.m);
                    host[2].extend_from_slice(&p.v);
                }
                let put = |v: &[f32]| {
                    if paged {
                        self.gpu.upload_paged(v)
                    } else {
                        self.gpu.upload(v)
                    }
                };
                r.states = Some([put(&host[0])?, put(&host[1])?, put(&host[2])?]);
            }
        }
        let bc1 = 1.0 - (opt.beta1 as f64).powi(step as i32);
        let bc2 = 1.0 - (opt.beta2 as f64).powi(step as i32);
        let step_size = (lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        for r in &self.optim.ranges {
            let [master, m, v] = r.states.as_ref().expect("uploaded above");
            if self.optim.paged {
                // As bitsandbytes' paged optimizers do: the states move in before the update
                // (the driver pages them out again when the device runs short).
                for b in [master, m, v] {
                    self.gpu.prefetch_paged(b);
                }
            }
            let decay = if r.decay {
                1.0 - lr * opt.weight_decay
            } else {
                1.0
            };
            let (bf16_out, f32_out) = if r.out_bf16 { (r.out, 0) } else { (0, r.out) };
            self.gpu.launch_n(
                "adamw_step",
                r.n,
                &[
                    Arg::P(master.ptr),
                    Arg::P(m.ptr),
                    Arg::P(v.ptr),
                    Arg::P(r.grad),
                    Arg::L(r.n as i64),
                    Arg::F(gscale),
                    Arg::F(decay),
                    Arg::F(opt.beta1),
                    Arg::F(opt.beta2),
                    Arg::F(opt.eps),
                    Arg::F(step_size),
                    Arg::F(bc2_sqrt),
                    Arg::P(bf16_out),
                    Arg::P(f32_out),
                ],
            )?;
        }
        self.optim.compute_of = Some(self.optim.owner);
        state.host_stale = true;
        Ok(())
    }

    /// A trainable base tensor's compute copy on the device, and whether it is bf16 (else
    /// f32): what the passes read.
    pub(super) fn compute_copy(&self, slot: Slot) -> Result<(&DBuf, bool)> {
        let m = &self.model;
        fn bf16_weight(w: &GpuWeight) -> Result<(&DBuf, bool)> {
            match w {
                GpuWeight::Bf16(b) => Ok((b, true)),
                GpuWeight::Q4 { .. } => Err(Error::usage(
                    "internal: a 4-bit weight cannot train (refused before)",
                )),
            }
        }
        let lin = |i: usize| &m.blocks[i / m.per_block].lin[i % m.per_block];
        let missing = |what: &str| Error::usage(format!("internal: the model has no {what}"));
        match slot {
            Slot::LinearWeight(i) => bf16_weight(&lin(i).w),
            Slot::LinearBias(i) => {
                Ok((lin(i).bias.as_ref().ok_or_else(|| missing("bias"))?, false))
            }
            Slot::NormWeight(i) => Ok((&m.norm(i).w, false)),
            Slot::NormBias(i) => Ok((
                m.norm(i).b.as_ref().ok_or_else(|| missing("norm bias"))?,
                false,
            )),
            Slot::Embedding => Ok((&m.embed, true)),
            Slot::PositionEmbedding => Ok((
                m.pos_embed
                    .as_ref()
                    .ok_or_else(|| missing("position table"))?,
                true,
            )),
            Slot::Head => bf16_weight(&m.lm_head.as_ref().ok_or_else(|| missing("untied head"))?.w),
            _ => Err(Error::usage("internal: not a base tensor")),
        }
    }

    /// Brings the device optimizer's values and moments back into `model` and `state` (before
    /// a checkpoint or the output is written). Nothing to do before its first step.
    pub fn sync_to_host(&self, model: &mut Model, state: &mut TrainState) -> Result<()> {
        for r in &self.optim.ranges {
            let Some([master, m, v]) = &r.states else {
                continue;
            };
            let (master, m, v) = (
                self.gpu.download_f32(master, r.n)?,
                self.gpu.download_f32(m, r.n)?,
                self.gpu.download_f32(v, r.n)?,
            );
            let mut at = 0;
            for &(slot, n) in &r.slots {
                let k = state.index_of(slot).expect("a trainable slot");
                let (value, p) = state.value_and_state_mut(model, k);
                value.copy_from_slice(&master[at..at + n]);
                p.m.copy_from_slice(&m[at..at + n]);
                p.v.copy_from_slice(&v[at..at + n]);
                at += n;
            }
        }
        state.host_stale = false;
        Ok(())
    }
}

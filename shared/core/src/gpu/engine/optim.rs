//! AdamW on the device for the trainable base tensors (full and partial fine-tuning): their
//! f32 master copies and moments live on the GPU next to the gradients, so a step moves
//! nothing over PCIe (the host optimizer moves 4 bytes per parameter down and 2 up). Adapter
//! tensors keep the host optimizer: they are small, and the host holds their values anyway.
//!
//! The host's copies (model values, AdamW moments) go stale during training; the trainer
//! brings them back ([`GpuEngine::sync_to_host`]) before it writes a checkpoint or the output.
//!
//! `PEFTKIT_GPU_OPTIMIZER` chooses: `host` keeps the whole optimizer on the host; `device`
//! puts the base tensors' states (12 bytes per parameter) in device memory; `paged` puts them
//! in managed memory, which the driver pages out to the host when the device runs short and
//! back when the step needs them (QLoRA's paged optimizers). By default: `device` when the
//! states fit in half the free memory, else `host`.

use super::*;
use crate::gpu::weights::GpuWeight;
use crate::train::optim::AdamW;

/// One base tensor's optimizer state on the device.
pub(super) struct DeviceSlot {
    slot: Slot,
    master: DBuf,
    m: DBuf,
    v: DBuf,
    n: usize,
    decay: bool,
}

impl GpuEngine {
    /// Chooses where the base tensors' optimizer runs (at construction): on the device when
    /// there are trainable base tensors, the environment does not say `host`, and their states
    /// fit in half the device's free memory (the rest is for the activations; an allocation
    /// that fails later is a clear device error, and `PEFTKIT_GPU_OPTIMIZER=host` avoids it).
    pub(super) fn choose_device_optimizer(&mut self) -> Result<()> {
        let params: usize = self.base_grads.values().map(|g| g.bytes / 4).sum();
        let (used, total) = self.gpu.device_used();
        let fits = total == 0 || 12 * params < total.saturating_sub(used) / 2;
        let (on, paged) = match std::env::var("PEFTKIT_GPU_OPTIMIZER").as_deref() {
            Err(_) | Ok("") => (fits, false),
            Ok("host") => (false, false),
            Ok("device") => (true, false),
            Ok("paged") => (true, true),
            Ok(other) => {
                return Err(Error::usage(format!(
                    "PEFTKIT_GPU_OPTIMIZER must be host, device or paged, not {other}"
                )))
            }
        };
        self.device_optim_on = on && params > 0;
        self.device_optim_paged = paged;
        Ok(())
    }

    /// Whether trainable tensor `slot` steps on the device (a base tensor with the device
    /// optimizer on).
    pub fn steps_on_device(&self, slot: Slot) -> bool {
        self.device_optim_on && self.base_grads.contains_key(&slot)
    }

    /// Puts the base tensors' optimizer on the device, its states in managed memory when
    /// `paged` (what `PEFTKIT_GPU_OPTIMIZER=device|paged` asks), before the first step.
    pub fn use_device_optimizer(&mut self, paged: bool) {
        assert!(self.device_slots.is_empty(), "after the first step");
        self.device_optim_on = !self.base_grads.is_empty();
        self.device_optim_paged = paged;
    }

    /// Whether the device optimizer has stepped (its values are then the current ones).
    pub(super) fn steps_taken_on_device(&self) -> bool {
        !self.device_slots.is_empty()
    }

    /// Keeps the whole optimizer on the host (data parallel: the gradients are reduced there).
    pub fn keep_optimizer_on_host(&mut self) {
        assert!(self.device_slots.is_empty(), "after the first step");
        self.device_optim_on = false;
    }

    /// Σ g² over the gradients kept on the device (gradient clipping's share of them).
    pub fn device_grad_sq(&self) -> Result<f64> {
        if !self.device_optim_on {
            return Ok(0.0);
        }
        let out = self.gpu.alloc_f32(1)?;
        for g in self.base_grads.values() {
            self.gpu.launch_n(
                "sum_squares",
                g.bytes / 4,
                &[Arg::P(g.ptr), Arg::P(out.ptr), Arg::L((g.bytes / 4) as i64)],
            )?;
        }
        Ok(self.gpu.download_f32(&out, 1)?[0] as f64)
    }

    /// One AdamW step of the base tensors on the device with gradients scaled by `gscale`;
    /// their compute copies take the new values and the gradients are zeroed. The first step
    /// takes the masters and moments from the host (`model`, `state`: a fresh run, or one
    /// resumed from a checkpoint).
    pub fn device_step(
        &mut self,
        opt: &AdamW,
        model: &Model,
        state: &TrainState,
        lr: f32,
        step: u64,
        gscale: f32,
    ) -> Result<()> {
        if !self.device_optim_on {
            return Ok(());
        }
        if self.device_slots.is_empty() {
            let mut slots: Vec<Slot> = self.base_grads.keys().copied().collect();
            slots.sort_by_key(|s| format!("{s:?}"));
            for slot in slots {
                let p = &state
                    .params
                    .iter()
                    .find(|(s, _)| *s == slot)
                    .expect("a trainable slot")
                    .1;
                let value = crate::train::params::base_tensor(model, slot);
                let put = |v: &[f32]| {
                    if self.device_optim_paged {
                        self.gpu.upload_paged(v)
                    } else {
                        self.gpu.upload(v)
                    }
                };
                self.device_slots.push(DeviceSlot {
                    slot,
                    master: put(value)?,
                    m: put(&p.m)?,
                    v: put(&p.v)?,
                    n: value.len(),
                    decay: p.decay,
                });
            }
        }
        let bc1 = 1.0 - (opt.beta1 as f64).powi(step as i32);
        let bc2 = 1.0 - (opt.beta2 as f64).powi(step as i32);
        let step_size = (lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        for d in &self.device_slots {
            let g = &self.base_grads[&d.slot];
            let decay = if d.decay {
                1.0 - lr * opt.weight_decay
            } else {
                1.0
            };
            let (out, is_bf16) = self.compute_copy(d.slot)?;
            let (bf16_out, f32_out) = if is_bf16 { (out.ptr, 0) } else { (0, out.ptr) };
            self.gpu.launch_n(
                "adamw_step",
                d.n,
                &[
                    Arg::P(d.master.ptr),
                    Arg::P(d.m.ptr),
                    Arg::P(d.v.ptr),
                    Arg::P(g.ptr),
                    Arg::L(d.n as i64),
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
        for d in &self.device_slots {
            let k = state
                .params
                .iter()
                .position(|(s, _)| *s == d.slot)
                .expect("a trainable slot");
            let (value, p) = state.value_and_state_mut(model, k);
            value.copy_from_slice(&self.gpu.download_f32(&d.master, d.n)?);
            p.m = self.gpu.download_f32(&d.m, d.n)?;
            p.v = self.gpu.download_f32(&d.v, d.n)?;
        }
        Ok(())
    }
}

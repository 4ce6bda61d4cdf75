//! Full and partial fine-tuning on the GPU: gradient buffers of the trainable base tensors,
//! norm weight (and LayerNorm bias) gradients, and the upload of new values after each
//! optimizer step.

use super::*;

impl GpuEngine {
    /// Gradient buffers for the trainable base tensors of `state`, and the lowest block the
    /// backward pass must reach for them.
    pub(super) fn set_base_trainables(&mut self, model: &Model, state: &TrainState) -> Result<()> {
        let nb = self.model.blocks.len();
        let per_block = self.model.per_block;
        self.set_adapter_modules(state)?;
        for (slot, _) in state.params.iter() {
            let block = match *slot {
                Slot::LinearWeight(i) | Slot::LinearBias(i) => Some(i / per_block),
                Slot::NormWeight(i) | Slot::NormBias(i) if i < 2 * nb => Some(i / 2),
                Slot::Embedding | Slot::PositionEmbedding => Some(0),
                Slot::NormWeight(_) | Slot::NormBias(_) | Slot::Head => None,
                _ => continue,
            };
            if let Some(b) = block {
                self.stop_layer = self.stop_layer.min(b);
            }
            let n = crate::train::params::base_tensor(model, *slot).len();
            self.base_grads.insert(*slot, self.gpu.alloc_f32(n)?);
        }
        Ok(())
    }

    /// The adapters of `state` that are not per-linear (bottleneck units, a prefix, a prompt),
    /// replacing any the engine had: at construction, and to switch adapters for generation.
    /// Their values arrive with each pass ([`Self::sync_adapters`]).
    pub(in crate::gpu) fn set_adapter_modules(&mut self, state: &TrainState) -> Result<()> {
        self.units.clear();
        self.prefix = None;
        self.prompt = None;
        if let Some(bp) = &state.bottleneck {
            self.unit_act = match bp.activation {
                crate::train::bottleneck::Activation::Relu => 0,
                crate::train::bottleneck::Activation::Silu => 1,
            };
            self.units_parallel = bp.parallel();
            self.units.clear();
            for (b, sites) in bp.units.iter().enumerate() {
                let mut pair: [Option<GpuUnit>; 2] = [None, None];
                for (site, u) in sites.iter().enumerate() {
                    let Some(u) = u else { continue };
                    self.stop_layer = self.stop_layer.min(b);
                    let g = &self.gpu;
                    pair[site] = Some(GpuUnit {
                        size: u.size,
                        down_w: g.upload_bf16(&u.down_w)?,
                        down_b: g.upload(&u.down_b)?,
                        up_w: g.upload_bf16(&u.up_w)?,
                        up_b: g.upload(&u.up_b)?,
                        grads: [
                            g.alloc_f32(u.down_w.len())?,
                            g.alloc_f32(u.down_b.len())?,
                            g.alloc_f32(u.up_w.len())?,
                            g.alloc_f32(u.up_b.len())?,
                        ],
                    });
                }
                self.units.push(pair);
            }
        }
        if let Some(p) = &state.prefix {
            let len = p.n * p.out_dim();
            self.prefix = Some(GpuPrefix {
                n: p.n,
                stride: p.out_dim(),
                kv_dim: p.kv_dim,
                p: self.gpu.alloc_f32(len)?,
                dp: self.gpu.alloc_f32(len)?,
                values: None,
            });
            // Every layer attends to the prefix: the backward pass goes through all of them.
            self.stop_layer = 0;
        }
        if let Some(p) = &state.prompt {
            self.prompt = Some((p.n, self.gpu.upload(&p.emb)?));
            // Their gradient is the first block's input gradient at their rows.
            self.stop_layer = 0;
        }
        Ok(())
    }

    /// Uploads the current values of the trainable base tensors (after an optimizer step
    /// changed them on the host): linear weights and the embedding as bf16, the rest f32.
    pub fn refresh_base(&mut self, model: &Model) -> Result<()> {
        // Once the device optimizer has stepped, it holds the current values of its tensors
        // and the host stale ones.
        let stepped = self.steps_taken_on_device();
        for slot in self.base_grads.keys() {
            if stepped && self.steps_on_device(*slot) {
                continue;
            }
            let v = crate::train::params::base_tensor(model, *slot);
            match self.compute_copy(*slot)? {
                (dst, true) => {
                    let bf: Vec<u16> = v
                        .iter()
                        .map(|&x| half::bf16::from_f32(x).to_bits())
                        .collect();
                    self.gpu.overwrite(dst, &bf)?
                }
                (dst, false) => self.gpu.overwrite(dst, v)?,
            }
        }
        Ok(())
    }

    /// The gradients of norm `i`'s weight and (LayerNorm) bias (`norm_ref` order: 2l
    /// attention, 2l+1 MLP, 2·blocks the final norm), when they train: `x` its input, `stats`
    /// its forward statistics, `dy` the gradient of its output (f32).
    pub(super) fn norm_weight_grad(
        &self,
        i: usize,
        x: &DBuf,
        rstd: &DBuf,
        dy: &DBuf,
        rows: usize,
    ) -> Result<()> {
        let d = self.model.hidden;
        if self.model.family != Family::Llama {
            let dw = self.base_grads.get(&Slot::NormWeight(i));
            let db = self.base_grads.get(&Slot::NormBias(i));
            if dw.is_none() && db.is_none() {
                return Ok(());
            }
            return self.gpu.launch_cols(
                "layernorm_dwb",
                d,
                &[
                    Arg::P(x.ptr),
                    Arg::P(rstd.ptr),
                    Arg::P(dy.ptr),
                    Arg::P(dw.map_or(0, |g| g.ptr)),
                    Arg::P(db.map_or(0, |g| g.ptr)),
                    Arg::L(rows as i64),
                    Arg::I(d as i32),
                ],
            );
        }
        let Some(g) = self.base_grads.get(&Slot::NormWeight(i)) else {
            return Ok(());
        };
        self.gpu.launch_cols(
            "rmsnorm_dw",
            d,
            &[
                Arg::P(x.ptr),
                Arg::P(rstd.ptr),
                Arg::P(dy.ptr),
                Arg::P(g.ptr),
                Arg::L(rows as i64),
                Arg::I(d as i32),
            ],
        )
    }
}

//! Bottleneck adapters on the GPU: `up(f(down(src)))` inside the residual, and its backward.

use super::*;

/// One bottleneck adapter on the device: `down [size, hidden]` and `up [hidden, size]` in bf16
/// (product inputs), their biases in f32, and f32 gradients of the four (refreshed and
/// collected each pass).
pub(super) struct GpuUnit {
    pub(super) size: usize,
    pub(super) down_w: DBuf,
    pub(super) down_b: DBuf,
    pub(super) up_w: DBuf,
    pub(super) up_b: DBuf,
    pub(super) grads: [DBuf; 4],
}

/// What a bottleneck adapter's backward pass needs: its input (bf16), the activation's input
/// (f32) and output (bf16).
pub(in crate::gpu) struct AdapterSaved {
    pub(super) src: DBuf,
    pub(super) z: DBuf,
    pub(super) a: DBuf,
}

impl GpuEngine {
    /// Adds the bottleneck adapter of (block `l`, `site`), if any, to the sub-layer output `h`
    /// (f32): `h += up(f(down(src)))` with src = `h` itself, or the sub-layer's normalized
    /// input `n` (bf16) for parallel adapters.
    pub(in crate::gpu) fn adapter_fwd(
        &self,
        l: usize,
        site: usize,
        n: &DBuf,
        h: &DBuf,
        rows: usize,
    ) -> Result<Option<AdapterSaved>> {
        let Some(u) = self.units.get(l).and_then(|p| p[site].as_ref()) else {
            return Ok(None);
        };
        if !self.adapters_on.get() {
            return Ok(None);
        }
        let (gpu, d, r) = (&self.gpu, self.model.hidden, u.size);
        let src = if self.units_parallel {
            let c = gpu.uninit_bf16(rows * d)?;
            gpu.copy(&c, n, rows * d * BF)?;
            c
        } else {
            self.cast_bf16(h, rows * d)?
        };
        let z = gpu.uninit_f32(rows * r)?;
        gpu.gemm(&Gemm::nt(rows, r, d, src.ptr, u.down_w.ptr, z.ptr))?;
        let bias = |y: &DBuf, b: &DBuf, cols: usize| {
            gpu.launch_n(
                "add_bias",
                rows * cols,
                &[
                    Arg::P(y.ptr),
                    Arg::P(b.ptr),
                    Arg::L(rows as i64),
                    Arg::I(cols as i32),
                ],
            )
        };
        bias(&z, &u.down_b, r)?;
        let a = gpu.uninit_bf16(rows * r)?;
        gpu.launch_n(
            "adapter_act",
            rows * r,
            &[
                Arg::P(z.ptr),
                Arg::P(a.ptr),
                Arg::L((rows * r) as i64),
                Arg::I(self.unit_act),
            ],
        )?;
        gpu.gemm(&Gemm::nt(rows, d, r, a.ptr, u.up_w.ptr, h.ptr).accumulate())?;
        bias(h, &u.up_b, d)?;
        Ok(Some(AdapterSaved { src, z, a }))
    }

    /// Backward through the adapter of (block `l`, `site`) given `dout`, the gradient of the
    /// sub-layer output after the adapter's addition (f32): its parameters' gradients, and
    /// (sequential) the gradient below it, `dout` plus the adapter's input gradient, or
    /// (parallel) the gradient of the normalized input it read.
    pub(super) fn adapter_bwd(
        &self,
        l: usize,
        site: usize,
        saved: Option<&AdapterSaved>,
        dout: &DBuf,
        rows: usize,
    ) -> Result<(Option<DBuf>, Option<DBuf>)> {
        let (Some(u), Some(sv)) = (self.units.get(l).and_then(|p| p[site].as_ref()), saved) else {
            return Ok((None, None));
        };
        let (gpu, d, r) = (&self.gpu, self.model.hidden, u.size);
        let db = self.cast_bf16(dout, rows * d)?;
        // up: dW += doutᵀ·a, db += Σ dout
        gpu.gemm(&Gemm::tn(d, r, rows, db.ptr, sv.a.ptr, u.grads[2].ptr).accumulate())?;
        let colsum = |g: &DBuf, x: &DBuf, cols: usize| {
            gpu.launch_cols(
                "col_sum_bf16",
                cols,
                &[
                    Arg::P(x.ptr),
                    Arg::P(g.ptr),
                    Arg::L(rows as i64),
                    Arg::I(cols as i32),
                ],
            )
        };
        colsum(&u.grads[3], &db, d)?;
        // dz = dout·up ⊙ f'(z)
        let dz = gpu.uninit_f32(rows * r)?;
        gpu.gemm(&Gemm::nn(rows, r, d, db.ptr, u.up_w.ptr, dz.ptr))?;
        let dzb = gpu.uninit_bf16(rows * r)?;
        gpu.launch_n(
            "adapter_act_bwd",
            rows * r,
            &[
                Arg::P(dz.ptr),
                Arg::P(sv.z.ptr),
                Arg::P(dzb.ptr),
                Arg::L((rows * r) as i64),
                Arg::I(self.unit_act),
            ],
        )?;
        // down: dW += dzᵀ·src, db += Σ dz; dsrc = dz·down
        gpu.gemm(&Gemm::tn(r, d, rows, dzb.ptr, sv.src.ptr, u.grads[0].ptr).accumulate())?;
        colsum(&u.grads[1], &dzb, r)?;
        let dsrc = gpu.uninit_f32(rows * d)?;
        gpu.gemm(&Gemm::nn(rows, d, r, dzb.ptr, u.down_w.ptr, dsrc.ptr))?;
        if self.units_parallel {
            return Ok((None, Some(dsrc)));
        }
        // h' = h + adapter(h): the gradient of h is dout plus the adapter's input gradient.
        gpu.launch_n(
            "add_inplace",
            rows * d,
            &[
                Arg::P(dsrc.ptr),
                Arg::P(dout.ptr),
                Arg::L((rows * d) as i64),
            ],
        )?;
        Ok((Some(dsrc), None))
    }
}

//! The LM head's cross-entropy on the GPU: chunked logits, per-row weights, the head's
//! gradient when it trains, and the hook that lets host objectives use it.

use super::*;

/// The LM head's cross-entropy on rows of the final hidden states, on the device, for a host
/// objective ([`ObjectiveCtx::rows_ce`]).
pub(super) struct GpuRowsCe<'a> {
    pub(super) engine: &'a GpuEngine,
    pub(super) nf: &'a DBuf,
    pub(super) rows: usize,
}

impl RowsCrossEntropy for GpuRowsCe<'_> {
    fn run(
        &self,
        rows: &[(usize, u32)],
        scale: &(dyn Fn(usize) -> f32 + Sync),
        dh: Option<&mut [f32]>,
        losses: &mut [f64],
    ) -> Result<()> {
        let e = self.engine;
        let d = e.model.hidden;
        let idx: Vec<i32> = rows.iter().map(|&(r, _)| r as i32).collect();
        let tgt: Vec<i32> = rows.iter().map(|&(_, t)| t as i32).collect();
        let scales: Vec<f32> = (0..rows.len()).map(scale).collect();
        let dnf = match dh {
            Some(_) => Some(e.gpu.alloc_f32(self.rows * d)?),
            None => None,
        };
        let nll = e.rows_cross_entropy(self.nf, &idx, &tgt, 1.0, Some(&scales), dnf.as_ref())?;
        for (l, v) in losses.iter_mut().zip(nll) {
            *l = v as f64;
        }
        if let (Some(dh), Some(dnf)) = (dh, dnf) {
            let g = e.gpu.download_f32(&dnf, self.rows * d)?;
            for (a, b) in dh.iter_mut().zip(g) {
                *a += b;
            }
        }
        Ok(())
    }
}

impl GpuEngine {
    /// Cross-entropy over the loss rows in chunks (the full logits never exist); with `dnf`,
    /// writes dL/d(final norm output) there. Returns Σ nll.
    pub(super) fn loss(
        &self,
        nf: &DBuf,
        lay: &Layout,
        scale: f32,
        dnf: Option<&DBuf>,
    ) -> Result<f64> {
        let nll = self.rows_cross_entropy(nf, &lay.loss_idx, &lay.loss_tgt, scale, None, dnf)?;
        Ok(nll.iter().map(|&x| x as f64).sum())
    }

    /// Cross-entropy of the LM head on chosen rows of the final hidden states `nf` (bf16):
    /// row `idx[i]` predicts `tgt[i]`. Returns each row's negative log-likelihood; with `dnf`,
    /// scatters the gradient of Σ scale·row_scale[i]·nll_i into those rows of `dnf` (f32).
    /// The logits exist for a chunk of rows at a time (~256 MB).
    pub(super) fn rows_cross_entropy(
        &self,
        nf: &DBuf,
        idx: &[i32],
        tgt: &[i32],
        scale: f32,
        row_scale: Option<&[f32]>,
        dnf: Option<&DBuf>,
    ) -> Result<Vec<f32>> {
        let gpu = &self.gpu;
        let (d, vocab) = (self.model.hidden, self.model.vocab);
        let n = idx.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let head = self.model.head_ptr(gpu, &self.scratch)?;
        let chunk = ((256usize << 20) / (vocab * 6)).clamp(16, 4096).min(n);
        let gidx = gpu.upload(idx)?;
        let gtgt = gpu.upload(tgt)?;
        let gscale = row_scale.map(|r| gpu.upload(r)).transpose()?;
        let hb = gpu.uninit_bf16(chunk * d)?;
        let logits = gpu.uninit_f32(chunk * vocab)?;
        let grad = gpu.uninit_bf16(if dnf.is_some() { chunk * vocab } else { 1 })?;
        let dhc = gpu.uninit_f32(if dnf.is_some() { chunk * d } else { 1 })?;
        let nll = gpu.uninit_f32(n)?;
        for c0 in (0..n).step_by(chunk) {
            let c = chunk.min(n - c0);
            gpu.launch_n(
                "gather_rows_bf16",
                c * d,
                &[
                    Arg::P(nf.ptr),
                    Arg::P(gidx.at(c0, 4)),
                    Arg::P(hb.ptr),
                    Arg::L(c as i64),
                    Arg::I(d as i32),
                ],
            )?;
            gpu.gemm(&Gemm::nt(c, vocab, d, hb.ptr, head, logits.ptr))?;
            gpu.launch_rows(
                "cross_entropy",
                c,
                vocab,
                &[
                    Arg::P(logits.ptr),
                    Arg::P(gtgt.at(c0, 4)),
                    Arg::P(nll.at(c0, 4)),
                    Arg::P(if dnf.is_some() { grad.ptr } else { 0 }),
                    Arg::I(vocab as i32),
                    Arg::F(scale),
                    Arg::P(gscale.as_ref().map_or(0, |g| g.at(c0, 4))),
                ],
            )?;
            if let Some(dnf) = dnf {
                // A trainable head (untied), or the embedding it is tied to: dW += gradᵀ·h.
                let head_grad = match &self.model.lm_head {
                    Some(_) => self.base_grads.get(&Slot::Head),
                    None => self.base_grads.get(&Slot::Embedding),
                };
                if let Some(g) = head_grad {
                    gpu.gemm(&Gemm::tn(vocab, d, c, grad.ptr, hb.ptr, g.ptr).accumulate())?;
                }
                gpu.gemm(&Gemm::nn(c, d, vocab, grad.ptr, head, dhc.ptr))?;
                gpu.launch_n(
                    "scatter_rows_f32",
                    c * d,
                    &[
                        Arg::P(dhc.ptr),
                        Arg::P(gidx.at(c0, 4)),
                        Arg::P(dnf.ptr),
                        Arg::L(c as i64),
                        Arg::I(d as i32),
                    ],
                )?;
            }
        }
        gpu.download_f32(&nll, n)
    }
}

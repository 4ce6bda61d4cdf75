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
        inv_temperature: f32,
        scale: &(dyn Fn(usize) -> f32 + Sync),
        dh: Option<&mut [f32]>,
        losses: &mut [f64],
        entropies: Option<&mut [f64]>,
        dentropy: Option<&[f32]>,
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
        let ce = RowsCe {
            idx: &idx,
            tgt: &tgt,
            scale: 1.0,
            row_scale: Some(&scales),
            inv_t: inv_temperature,
            entropy: entropies.is_some(),
            ent_scale: dentropy,
        };
        let (nll, ent) = e.rows_cross_entropy(self.nf, &ce, dnf.as_ref())?;
        for (l, v) in losses.iter_mut().zip(nll) {
            *l = v as f64;
        }
        if let Some(out) = entropies {
            for (o, v) in out.iter_mut().zip(ent) {
                *o = v as f64;
            }
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
    /// `dst[i] = nf[idx[i]]` for `rows` rows of the hidden size (bf16), `idx` an i32 device
    /// array.
    pub(in crate::gpu) fn gather_hidden(
        &self,
        nf: &DBuf,
        idx: u64,
        dst: &DBuf,
        rows: usize,
    ) -> Result<()> {
        let d = self.model.hidden;
        self.gpu.launch_n(
            "gather_rows_bf16",
            rows * d,
            &[
                Arg::P(nf.ptr),
                Arg::P(idx),
                Arg::P(dst.ptr),
                Arg::L(rows as i64),
                Arg::I(d as i32),
            ],
        )
    }

    /// Cross-entropy over the loss rows in chunks (the full logits never exist); with `dnf`,
    /// writes dL/d(final norm output) there. Returns Σ nll.
    pub(super) fn loss(
        &self,
        nf: &DBuf,
        lay: &Layout,
        scale: f32,
        dnf: Option<&DBuf>,
    ) -> Result<f64> {
        let ce = RowsCe {
            scale,
            ..RowsCe::new(&lay.loss_idx, &lay.loss_tgt)
        };
        let (nll, _) = self.rows_cross_entropy(nf, &ce, dnf)?;
        Ok(nll.iter().map(|&x| x as f64).sum())
    }

    /// Cross-entropy of the LM head on chosen rows of the final hidden states `nf` (bf16), as
    /// `ce` describes. Returns each row's negative log-likelihood and (when asked) entropy;
    /// with `dnf`, scatters the gradient of Σ scale·row_scale[i]·nll_i into those rows of
    /// `dnf` (f32). The logits exist for a chunk of rows at a time (~256 MB).
    pub(super) fn rows_cross_entropy(
        &self,
        nf: &DBuf,
        ce: &RowsCe,
        dnf: Option<&DBuf>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let gpu = &self.gpu;
        let (d, vocab) = (self.model.hidden, self.model.vocab);
        let RowsCe {
            idx,
            tgt,
            scale,
            row_scale,
            inv_t,
            entropy,
            ent_scale,
        } = *ce;
        let n = idx.len();
        if n == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let head = self.model.head_ptr(gpu, &self.scratch)?;
        let chunk = ((256usize << 20) / (vocab * 6)).clamp(16, 4096).min(n);
        let gidx = gpu.upload(idx)?;
        let gtgt = gpu.upload(tgt)?;
        let gscale = row_scale.map(|r| gpu.upload(r)).transpose()?;
        let gent = ent_scale.map(|r| gpu.upload(r)).transpose()?;
        let hb = gpu.uninit_bf16(chunk * d)?;
        let logits = gpu.uninit_f32(chunk * vocab)?;
        let grad = gpu.uninit_bf16(if dnf.is_some() { chunk * vocab } else { 1 })?;
        let dhc = gpu.uninit_f32(if dnf.is_some() { chunk * d } else { 1 })?;
        let nll = gpu.uninit_f32(n)?;
        let ent = gpu.uninit_f32(if entropy { n } else { 1 })?;
        for c0 in (0..n).step_by(chunk) {
            let c = chunk.min(n - c0);
            self.gather_hidden(nf, gidx.at(c0, 4), &hb, c)?;
            gpu.gemm(&Gemm::nt(c, vocab, d, hb.ptr, head, logits.ptr))?;
            launch_cross_entropy(
                gpu,
                c,
                vocab,
                CeKernel::Best,
                &[
                    Arg::P(logits.ptr),
                    Arg::P(gtgt.at(c0, 4)),
                    Arg::P(nll.at(c0, 4)),
                    Arg::P(if dnf.is_some() { grad.ptr } else { 0 }),
                    Arg::I(vocab as i32),
                    Arg::F(scale),
                    Arg::P(gscale.as_ref().map_or(0, |g| g.at(c0, 4))),
                    Arg::F(inv_t),
                    Arg::P(if entropy { ent.at(c0, 4) } else { 0 }),
                    Arg::P(gent.as_ref().map_or(0, |g| g.at(c0, 4))),
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
        let entropies = if entropy {
            gpu.download_f32(&ent, n)?
        } else {
            Vec::new()
        };
        Ok((gpu.download_f32(&nll, n)?, entropies))
    }
}

/// Which rows [`GpuEngine::rows_cross_entropy`] takes and what it computes: row `idx[i]` of
/// the hidden states predicts token `tgt[i]` from the logits times `inv_t` (1/temperature),
/// with loss weight `scale·row_scale[i]`; `entropy` asks for each row's entropy too.
#[derive(Clone, Copy)]
pub(super) struct RowsCe<'a> {
    pub(super) idx: &'a [i32],
    pub(super) tgt: &'a [i32],
    pub(super) scale: f32,
    pub(super) row_scale: Option<&'a [f32]>,
    pub(super) inv_t: f32,
    pub(super) entropy: bool,
    /// d L / d H per row: the gradient carries the entropies' too (GRPO's entropy bonus).
    pub(super) ent_scale: Option<&'a [f32]>,
}

impl<'a> RowsCe<'a> {
    /// Plain cross-entropy of the rows: unit weights, temperature 1, no entropy.
    pub(super) fn new(idx: &'a [i32], tgt: &'a [i32]) -> Self {
        Self {
            idx,
            tgt,
            scale: 1.0,
            row_scale: None,
            inv_t: 1.0,
            entropy: false,
            ent_scale: None,
        }
    }
}

/// Which cross-entropy kernel [`launch_cross_entropy`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CeKernel {
    /// The row cached in shared memory where it fits, else read twice from global memory.
    Best,
    /// Always read twice (the check runs both).
    Uncached,
}

/// Launches the cross-entropy over `rows` rows of a `vocab` vocabulary with the `cross_entropy`
/// kernel's arguments: `cross_entropy_cached` (the row read from DRAM once) where the row fits
/// in the dynamic shared memory the device allows, else `cross_entropy`.
pub(crate) fn launch_cross_entropy(
    gpu: &Gpu,
    rows: usize,
    vocab: usize,
    kernel: CeKernel,
    args: &[Arg],
) -> Result<()> {
    let bytes = vocab * 4;
    if kernel == CeKernel::Best && bytes <= gpu.max_dynamic_shared() {
        gpu.launch_rows_shared("cross_entropy_cached", rows, vocab, bytes as u32, args)
    } else {
        gpu.launch_rows("cross_entropy", rows, vocab, args)
    }
}

//! Cross-entropy over the vocabulary, fused with the LM head and its backward pass, in chunks
//! of rows so that the logits of a whole batch never exist at once.

use crate::kernels::{gemm, ops};
use crate::model::{linear::Bf16Packs, Model};
use rayon::prelude::*;

/// The LM head `[vocab, h]` as the loss multiplies by it: the f32 weight, optionally packed
/// for the forward product, or the bf16 packs of a frozen head (`--compute-dtype bf16`),
/// which then carry both products (f32 accumulation, as torch autocast does).
#[derive(Clone, Copy)]
pub struct Head<'a> {
    pub w: &'a [f32],
    pub packed: Option<&'a gemm::PackedWeight>,
    pub bf16: Option<&'a Bf16Packs>,
}

impl<'a> Head<'a> {
    /// The model's head with its bf16 packs when it has them, and `packed` (the f32 weight
    /// packed once per step, see `Engine::with_head_pack`).
    pub fn of(m: &'a Model, packed: Option<&'a gemm::PackedWeight>) -> Self {
        Head {
            w: m.head_weight(),
            packed,
            bf16: m.head_bf16.as_deref(),
        }
    }

    /// An f32 weight, unpacked.
    pub fn plain(w: &'a [f32]) -> Self {
        Head {
            w,
            packed: None,
            bf16: None,
        }
    }

    /// `logits[n, vocab] = x[n, h] · Wᵀ`.
    pub fn logits(&self, x: &[f32], logits: &mut [f32], n: usize, vocab: usize, h: usize) {
        if let Some(p) = self.bf16 {
            gemm::matmul_nt_bf16(x, &p.nt, logits, n, false)
        } else if let Some(p) = self.packed {
            gemm::matmul_nt_packed(x, p, logits, n, false)
        } else {
            gemm::matmul_nt(x, self.w, logits, n, vocab, h, false)
        }
    }

    /// `dx[n, h] = g[n, vocab] · W`.
    fn input_grad(&self, g: &[f32], dx: &mut [f32], n: usize, vocab: usize, h: usize) {
        if let Some(nn) = self.bf16.and_then(|p| p.nn.as_ref()) {
            gemm::matmul_nn_bf16(g, nn, dx, n, false)
        } else if let Some(p) = self.packed.and_then(|p| p.input_grad()) {
            gemm::matmul_nt_packed(g, p, dx, n, false)
        } else {
            gemm::matmul_nn(g, self.w, dx, n, h, vocab, false)
        }
    }
}

const CHUNK: usize = 256;

/// For each (row of `hidden`, target token) pair: loss −log softmax(h·Wᵀ)[target]. Adds
/// `scale`·dL/dh into `dh` (same layout as `hidden`) and, when given, `scale`·dL/dW into
/// `dw` (`[vocab, h]`). Returns Σ loss (unscaled).
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_fwd_bwd(
    hidden: &[f32],
    h: usize,
    head: Head,
    vocab: usize,
    rows: &[(usize, u32)],
    scale: f32,
    dh: &mut [f32],
    dw: Option<&mut [f32]>,
) -> f64 {
    let mut per_row = vec![0f64; rows.len()];
    cross_entropy_rows(
        hidden,
        h,
        head,
        vocab,
        rows,
        &|_| scale,
        Some(dh),
        dw,
        &mut per_row,
    );
    per_row.iter().sum()
}

/// Per-row losses −log softmax(h·Wᵀ)[target] into `losses`, and, when `dh` is given, the
/// gradient of Σ `scale(i)`·loss_i into `dh` (and `dw`). Sequence-level objectives (DPO's
/// summed log-probabilities) weight each row by its sequence's coefficient this way.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_rows(
    hidden: &[f32],
    h: usize,
    head: Head,
    vocab: usize,
    rows: &[(usize, u32)],
    scale: &(dyn Fn(usize) -> f32 + Sync),
    dh: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    losses: &mut [f64],
) {
    cross_entropy_rows_with_entropy(hidden, h, head, vocab, rows, scale, None, dh, dw, losses)
}

/// [`cross_entropy_rows`] whose gradient also carries Σ dentropy(i)·H_i, H_i the entropy of
/// row i's softmax (GRPO's entropy bonus): d H / d z_j = −p_j·(z_j − lse + H) = −p_j·(z_j − E_p[z]).
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_rows_with_entropy(
    hidden: &[f32],
    h: usize,
    head: Head,
    vocab: usize,
    rows: &[(usize, u32)],
    scale: &(dyn Fn(usize) -> f32 + Sync),
    dentropy: Option<&(dyn Fn(usize) -> f32 + Sync)>,
    mut dh: Option<&mut [f32]>,
    mut dw: Option<&mut [f32]>,
    losses: &mut [f64],
) {
    assert_eq!(losses.len(), rows.len(), "one loss per row");
    let mut x = vec![0.0f32; CHUNK.min(rows.len().max(1)) * h];
    let mut logits = vec![0.0f32; CHUNK.min(rows.len().max(1)) * vocab];
    for (ci, chunk) in rows.chunks(CHUNK).enumerate() {
        let n = chunk.len();
        let base = ci * CHUNK;
        for (i, &(r, _)) in chunk.iter().enumerate() {
            x[i * h..(i + 1) * h].copy_from_slice(&hidden[r * h..(r + 1) * h]);
        }
        let lg = &mut logits[..n * vocab];
        head.logits(&x[..n * h], lg, n, vocab, h);
        let grad = dh.is_some();
        // softmax in place → gradient (p − onehot)·scale; collect the losses.
        let chunk_losses: Vec<f64> = lg
            .par_chunks_mut(vocab)
            .zip(chunk.par_iter())
            .enumerate()
            .map(|(i, (row, &(_, t)))| {
                let max = ops::max_of(row);
                let sum = ops::sum_exp_shifted(row, max);
                let lse = max + sum.ln();
                let loss = (lse - row[t as usize]) as f64;
                if grad {
                    let sc = scale(base + i);
                    match dentropy.map(|f| f(base + i)).filter(|&e| e != 0.0) {
                        Some(ec) => {
                            let inv = 1.0 / sum as f64;
                            let p = |z: f32| ((z - max) as f64).exp() * inv;
                            let mean_z: f64 = row.iter().map(|&z| p(z) * z as f64).sum();
                            for z in row.iter_mut() {
                                let pj = p(*z);
                                let dz = pj * sc as f64 - ec as f64 * pj * (*z as f64 - mean_z);
                                *z = dz as f32;
                            }
                        }
                        None => ops::exp_shifted_scaled(row, max, sc / sum),
                    }
                    row[t as usize] -= sc;
                }
                loss
            })
            .collect();
        losses[base..base + n].copy_from_slice(&chunk_losses);
        let Some(dh) = dh.as_deref_mut() else {
            continue;
        };
        let mut dx = vec![0.0f32; n * h];
        head.input_grad(lg, &mut dx, n, vocab, h);
        for (i, &(r, _)) in chunk.iter().enumerate() {
            dh[r * h..(r + 1) * h]
                .iter_mut()
                .zip(&dx[i * h..(i + 1) * h])
                .for_each(|(a, b)| *a += b);
        }
        if let Some(g) = dw.as_deref_mut() {
            debug_assert!(head.bf16.is_none(), "a trained head has no bf16 snapshot");
            gemm::matmul_tn(lg, &x[..n * h], g, vocab, h, n, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm::{round_bf16, PackedBf16};
    use crate::rng::Rng;

    /// The bf16 head computes the same losses as f32 arithmetic on bf16-rounded inputs and
    /// weights (f32 accumulation), and a hidden-state gradient close to the f32 one.
    #[test]
    fn bf16_head_matches_f32_on_rounded_operands() {
        let (h, vocab, n) = (40, 300, 7);
        let mut rng = Rng::new(3);
        let hidden: Vec<f32> = (0..n * h).map(|_| rng.normal()).collect();
        let w: Vec<f32> = (0..vocab * h).map(|_| 0.2 * rng.normal()).collect();
        let rows: Vec<(usize, u32)> = (0..n).map(|i| (i, (i * 37 % vocab) as u32)).collect();
        let packs = Bf16Packs {
            nt: PackedBf16::for_nt(&w, vocab, h),
            nn: Some(PackedBf16::for_nn(&w, vocab, h)),
        };
        let bf16_head = Head {
            w: &w,
            packed: None,
            bf16: Some(&packs),
        };
        let run = |head: Head, x: &[f32]| {
            let mut dh = vec![0f32; n * h];
            let mut losses = vec![0f64; n];
            cross_entropy_rows(
                x,
                h,
                head,
                vocab,
                &rows,
                &|_| 1.0,
                Some(&mut dh),
                None,
                &mut losses,
            );
            (losses, dh)
        };
        let (lb, dhb) = run(bf16_head, &hidden);
        let hr: Vec<f32> = hidden.iter().map(|&x| round_bf16(x)).collect();
        let wr: Vec<f32> = w.iter().map(|&x| round_bf16(x)).collect();
        let (lr, _) = run(Head::plain(&wr), &hr);
        let (lf, dhf) = run(Head::plain(&w), &hidden);
        for i in 0..n {
            assert!(
                (lb[i] - lr[i]).abs() < 1e-4,
                "row {i}: {} vs {}",
                lb[i],
                lr[i]
            );
        }
        assert!(lb.iter().zip(&lf).any(|(a, b)| a != b), "bf16 path unused");
        let scale = dhf.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (a, b) in dhb.iter().zip(&dhf) {
            assert!((a - b).abs() <= 2e-2 * scale, "{a} vs {b}");
        }
    }
}

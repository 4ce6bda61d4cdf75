//! Cross-entropy over the vocabulary, fused with the LM head and its backward pass, in chunks
//! of rows so that the logits of a whole batch never exist at once.

use crate::kernels::{gemm, ops};
use rayon::prelude::*;

const CHUNK: usize = 256;

/// For each (row of `hidden`, target token) pair: loss −log softmax(h·Wᵀ)[target]. Adds
/// `scale`·dL/dh into `dh` (same layout as `hidden`) and, when given, `scale`·dL/dW into
/// `dw` (`[vocab, h]`). Returns Σ loss (unscaled). `packed`, when given, is `w` packed for
/// the forward product (it is then packed once, not once per chunk of rows).
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_fwd_bwd(
    hidden: &[f32],
    h: usize,
    w: &[f32],
    packed: Option<&gemm::PackedWeight>,
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
        w,
        packed,
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
    w: &[f32],
    packed: Option<&gemm::PackedWeight>,
    vocab: usize,
    rows: &[(usize, u32)],
    scale: &(dyn Fn(usize) -> f32 + Sync),
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
        match packed {
            Some(p) => gemm::matmul_nt_packed(&x[..n * h], p, lg, n, false),
            None => gemm::matmul_nt(&x[..n * h], w, lg, n, vocab, h, false),
        }
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
                    let inv = sc / sum;
                    for v in row.iter_mut() {
                        *v = ops::exp_fast(*v - max) * inv;
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
        gemm::matmul_nn(lg, w, &mut dx, n, h, vocab, false);
        for (i, &(r, _)) in chunk.iter().enumerate() {
            dh[r * h..(r + 1) * h]
                .iter_mut()
                .zip(&dx[i * h..(i + 1) * h])
                .for_each(|(a, b)| *a += b);
        }
        if let Some(g) = dw.as_deref_mut() {
            gemm::matmul_tn(lg, &x[..n * h], g, vocab, h, n, true);
        }
    }
}

//! Log-probabilities of chosen tokens under the LM head at a sampling temperature, and their
//! backward pass: what the on-policy objectives (PPO, GRPO) need from the head.
//!
//! log softmax(h·Wᵀ / T)[target] is computed as the cross-entropy of the tempered rows h / T
//! (TRL divides the logits by `temperature + 1e-7`); the gradient flows back scaled by 1 / T.
//! On a device (the GPU engine) the head runs where the hidden states live.

use super::engine::ObjectiveCtx;
use super::loss;
use super::params::{Slot, TrainState};
use crate::error::Result;

/// `rows[i] = (hidden row, target token)`.
pub type Rows = [(usize, u32)];

fn inv_temperature(temperature: f32) -> f32 {
    1.0 / (temperature + 1e-7)
}

/// The logits' factor [`rows_logp`] and [`rows_logp_backward`] use: exactly 1 at temperature
/// 1, else 1 / (T + 1e-7).
pub fn logit_scale(temperature: f32) -> f64 {
    if temperature == 1.0 {
        1.0
    } else {
        inv_temperature(temperature) as f64
    }
}

/// The hidden states divided by the temperature (None at temperature 1: use them as they are).
fn tempered(ctx: &ObjectiveCtx, temperature: f32) -> Option<Vec<f32>> {
    let inv_t = inv_temperature(temperature);
    (temperature != 1.0).then(|| ctx.hidden.iter().map(|x| x * inv_t).collect())
}

/// log π(target) of every row at `temperature`.
pub fn rows_logp(ctx: &ObjectiveCtx, rows: &Rows, temperature: f32) -> Result<Vec<f64>> {
    let m = ctx.model;
    let mut nll = vec![0f64; rows.len()];
    match ctx.rows_ce {
        Some(ce) => {
            let inv_t = if temperature != 1.0 {
                inv_temperature(temperature)
            } else {
                1.0
            };
            ce.run(rows, inv_t, &|_| 0.0, None, &mut nll, None, None)?
        }
        None => {
            let t = tempered(ctx, temperature);
            loss::cross_entropy_rows(
                t.as_deref().unwrap_or(ctx.hidden),
                m.config.hidden,
                loss::Head::of(m, ctx.head_pack),
                m.config.vocab,
                rows,
                &|_| 0.0,
                None,
                None,
                &mut nll,
            )
        }
    }
    Ok(nll.iter().map(|l| -l).collect())
}

/// Adds d L / d hidden into `dh` (and d L / d W_head when the head trains) for
/// L = Σ_i dlogp[i] · log π(target_i) (+ Σ_i dentropy[i] · H_i, the entropy of row i's
/// distribution) at `temperature`.
pub fn rows_logp_backward(
    ctx: &ObjectiveCtx,
    state: &mut TrainState,
    rows: &Rows,
    temperature: f32,
    (dlogp, dentropy): (&[f32], Option<&[f32]>),
    dh: &mut [f32],
) -> Result<()> {
    let m = ctx.model;
    let h = m.config.hidden;
    // d L / d nll_i = −d L / d logp_i
    let scale = |i: usize| -dlogp[i];
    let mut nll = vec![0f64; rows.len()];
    if let Some(ce) = ctx.rows_ce {
        // the device engine never trains the head here (LoRA/DoRA only)
        let inv_t = if temperature != 1.0 {
            inv_temperature(temperature)
        } else {
            1.0
        };
        return ce.run(rows, inv_t, &scale, Some(dh), &mut nll, None, dentropy);
    }
    let dent = dentropy.map(|d| move |i: usize| d[i]);
    let dent: Option<&(dyn Fn(usize) -> f32 + Sync)> = dent.as_ref().map(|f| f as _);
    let dw = state.grad_mut(Slot::lm_head(m)).map(|g| &mut g[..]);
    let head = loss::Head::of(m, ctx.head_pack);
    match tempered(ctx, temperature) {
        Some(t) => {
            let mut dht = vec![0f32; dh.len()];
            loss::cross_entropy_rows_with_entropy(
                &t,
                h,
                head,
                m.config.vocab,
                rows,
                &scale,
                dent,
                Some(&mut dht),
                dw,
                &mut nll,
            );
            let inv_t = inv_temperature(temperature);
            dh.iter_mut().zip(&dht).for_each(|(d, g)| *d += g * inv_t);
        }
        None => loss::cross_entropy_rows_with_entropy(
            ctx.hidden,
            h,
            head,
            m.config.vocab,
            rows,
            &scale,
            dent,
            Some(dh),
            dw,
            &mut nll,
        ),
    }
    Ok(())
}

/// log π(target) of every row and the entropy of each row's distribution, both with the
/// logits times `inv_t` (1 / temperature), in one pass through the head (no gradient): on the
/// host in f64 from chunks of logits, or where a GPU engine keeps the hidden states. Entropies
/// are 0 unless `want_entropy`.
pub fn rows_logp_entropy(
    ctx: &ObjectiveCtx,
    rows: &Rows,
    inv_t: f64,
    want_entropy: bool,
) -> Result<(Vec<f64>, Vec<f64>)> {
    Ok(match ctx.rows_ce {
        Some(ce) => {
            let mut nll = vec![0f64; rows.len()];
            let mut ent = vec![0f64; rows.len()];
            let want = want_entropy.then_some(&mut ent[..]);
            ce.run(rows, inv_t as f32, &|_| 0.0, None, &mut nll, want, None)?;
            (nll.iter().map(|l| -l).collect(), ent)
        }
        None => tempered_logp_entropy(ctx, rows, inv_t, want_entropy),
    })
}

/// log softmax(z)[target] and the entropy of softmax(z), z = (h · Wᵀ) · inv_t, per row, in
/// chunks so that the logits of a whole batch never exist at once.
fn tempered_logp_entropy(
    ctx: &ObjectiveCtx,
    rows: &[(usize, u32)],
    inv_t: f64,
    want_entropy: bool,
) -> (Vec<f64>, Vec<f64>) {
    let (h, vocab) = (ctx.model.config.hidden, ctx.model.config.vocab);
    use rayon::prelude::*;
    const CHUNK: usize = 128;
    let mut logp = Vec::with_capacity(rows.len());
    let mut ent = Vec::with_capacity(rows.len());
    let mut x = vec![0f32; CHUNK.min(rows.len().max(1)) * h];
    let mut logits = vec![0f32; CHUNK.min(rows.len().max(1)) * vocab];
    for chunk in rows.chunks(CHUNK) {
        let n = chunk.len();
        for (i, &(r, _)) in chunk.iter().enumerate() {
            x[i * h..(i + 1) * h].copy_from_slice(&ctx.hidden[r * h..(r + 1) * h]);
        }
        let lg = &mut logits[..n * vocab];
        loss::Head::of(ctx.model, ctx.head_pack).logits(&x[..n * h], lg, n, vocab, h);
        let out: Vec<(f64, f64)> = lg
            .par_chunks(vocab)
            .zip(chunk.par_iter())
            .map(|(row, &(_, t))| {
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64 * inv_t;
                let mut sum = 0f64;
                let mut zsum = 0f64;
                for &v in row {
                    let z = v as f64 * inv_t;
                    let e = (z - max).exp();
                    sum += e;
                    if want_entropy {
                        zsum += e * z;
                    }
                }
                let lse = max + sum.ln();
                let lp = row[t as usize] as f64 * inv_t - lse;
                (lp, if want_entropy { lse - zsum / sum } else { 0.0 })
            })
            .collect();
        for (a, b) in out {
            logp.push(a);
            ent.push(b);
        }
    }
    (logp, ent)
}

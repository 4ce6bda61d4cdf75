//! Inference forward pass over several sequences at once, with an optional KV cache.
//!
//! Tokens of all sequences are concatenated so that every linear layer runs as one large
//! matrix product; attention runs per (sequence, head) in parallel and never crosses
//! sequence boundaries, so no padding is ever computed.

use super::config::{Activation, NormKind};
use super::hooks::ForwardOptions;
use super::rope::RopeTable;
use super::{Block, Mlp, Model, Norm, QkvProj};
use crate::error::{Error, Result};
use crate::kernels::{gemm, ops};
use rayon::prelude::*;

/// One sequence's new tokens. Its positions continue from its cache (or start at 0).
#[derive(Clone, Copy, Debug)]
pub struct SeqInput<'a> {
    pub ids: &'a [u32],
}

/// Keys and values seen so far by one sequence, per layer `[len, kv_dim]` (post-RoPE).
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
    pub len: usize,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![(Vec::new(), Vec::new()); layers],
            len: 0,
        }
    }
}

/// Where each sequence's tokens sit in the concatenated batch.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: usize,
    len: usize,
    /// Tokens already in the cache before this call.
    past: usize,
}

impl Model {
    /// Final hidden states `[total_tokens, hidden]` (after the final norm).
    pub fn forward(
        &self,
        seqs: &[SeqInput],
        mut caches: Option<&mut [KvCache]>,
        opts: &ForwardOptions,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        if let Some(cs) = caches.as_deref() {
            assert_eq!(cs.len(), seqs.len(), "one cache per sequence");
        }
        let mut spans = Vec::with_capacity(seqs.len());
        let mut total = 0;
        for (i, s) in seqs.iter().enumerate() {
            let past = caches.as_deref().map_or(0, |cs| cs[i].len);
            spans.push(Span {
                start: total,
                len: s.ids.len(),
                past,
            });
            total += s.ids.len();
            if past + s.ids.len() > c.max_positions && c.rope.is_none() {
                return Err(Error::usage(format!(
                    "sequence of {} tokens is longer than the model's {} positions",
                    past + s.ids.len(),
                    c.max_positions
                )));
            }
            if let Some(&bad) = s.ids.iter().find(|&&t| t as usize >= c.vocab) {
                return Err(Error::usage(format!(
                    "token id {bad} is outside the model's vocabulary of {}",
                    c.vocab
                )));
            }
        }
        let max_pos = spans.iter().map(|s| s.past + s.len).max().unwrap_or(0);
        let rope = (!self.inv_freq.is_empty()).then(|| RopeTable::new(&self.inv_freq, max_pos));

        let h = c.hidden;
        let mut x = vec![0.0f32; total * h];
        for (s, span) in seqs.iter().zip(&spans) {
            for (j, &id) in s.ids.iter().enumerate() {
                let row = &mut x[(span.start + j) * h..(span.start + j + 1) * h];
                row.copy_from_slice(&self.embed[id as usize * h..(id as usize + 1) * h]);
                if let Some(pe) = &self.pos_embed {
                    let p = span.past + j;
                    row.iter_mut()
                        .zip(&pe[p * h..(p + 1) * h])
                        .for_each(|(a, b)| *a += b);
                }
            }
        }

        let mut normed = vec![0.0f32; total * h];
        for (li, block) in self.blocks.iter().enumerate() {
            apply_norm(&block.attn_norm, c.norm, &x, &mut normed);
            let mut attn_out = self.attention(
                li,
                block,
                &normed,
                total,
                &spans,
                rope.as_ref(),
                caches.as_deref_mut(),
                opts,
            );
            if let Some(Some(a)) = opts.adapter.and_then(|s| block.adapters.get(s)) {
                a.after_attention(&mut attn_out, total);
            }
            ops::add_assign(&mut x, &attn_out);
            apply_norm(&block.mlp_norm, c.norm, &x, &mut normed);
            let mut mlp_out = self.mlp(block, &normed, total, opts);
            if let Some(Some(a)) = opts.adapter.and_then(|s| block.adapters.get(s)) {
                a.after_mlp(&mut mlp_out, total);
            }
            ops::add_assign(&mut x, &mlp_out);
        }
        if let Some(cs) = caches {
            for (cache, span) in cs.iter_mut().zip(&spans) {
                cache.len = span.past + span.len;
            }
        }
        apply_norm(&self.final_norm, c.norm, &x, &mut normed);
        Ok(normed)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        block: &Block,
        x: &[f32],
        rows: usize,
        spans: &[Span],
        rope: Option<&RopeTable>,
        caches: Option<&mut [KvCache]>,
        opts: &ForwardOptions,
    ) -> Vec<f32> {
        let c = &self.config;
        let (qd, kvd, d) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let (mut q, mut k, v) = match &block.attn.qkv {
            QkvProj::Separate { q, k, v } => (
                q.forward_alloc(x, rows, opts),
                k.forward_alloc(x, rows, opts),
                v.forward_alloc(x, rows, opts),
            ),
            QkvProj::Fused(l) => split_qkv(&l.forward_alloc(x, rows, opts), rows, qd, kvd),
        };
        if let Some(rope) = rope {
            for span in spans {
                for j in 0..span.len {
                    let t = span.start + j;
                    rope.apply(&mut q[t * qd..(t + 1) * qd], span.past + j);
                    rope.apply(&mut k[t * kvd..(t + 1) * kvd], span.past + j);
                }
            }
        }
        // Keys/values each sequence attends to: the cache (after appending) or its own rows.
        let kv_views: Vec<(&[f32], &[f32])> = match caches {
            Some(cs) => {
                for (cache, span) in cs.iter_mut().zip(spans) {
                    let (ck, cv) = &mut cache.layers[layer];
                    ck.truncate(span.past * kvd);
                    cv.truncate(span.past * kvd);
                    ck.extend_from_slice(&k[span.start * kvd..(span.start + span.len) * kvd]);
                    cv.extend_from_slice(&v[span.start * kvd..(span.start + span.len) * kvd]);
                }
                cs.iter()
                    .map(|cache| {
                        let (ck, cv) = &cache.layers[layer];
                        (&ck[..], &cv[..])
                    })
                    .collect()
            }
            None => spans
                .iter()
                .map(|s| {
                    let r = s.start * kvd..(s.start + s.len) * kvd;
                    (&k[r.clone()], &v[r])
                })
                .collect(),
        };
        let window = c.sliding_window[layer];
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let tasks: Vec<(usize, usize)> = (0..spans.len())
            .flat_map(|s| (0..c.heads).map(move |h| (s, h)))
            .collect();
        let results: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(s, head)| {
                let span = spans[s];
                let (keys, values) = kv_views[s];
                gemm::serial(|| {
                    attend_one_head(
                        &q[span.start * qd + head * d..],
                        qd,
                        &keys[(head / group) * d..],
                        &values[(head / group) * d..],
                        kvd,
                        d,
                        span,
                        window,
                        scale,
                    )
                })
            })
            .collect();
        let mut merged = vec![0.0f32; rows * qd];
        for (&(s, head), out) in tasks.iter().zip(&results) {
            let span = spans[s];
            for i in 0..span.len {
                let t = span.start + i;
                merged[t * qd + head * d..t * qd + (head + 1) * d]
                    .copy_from_slice(&out[i * d..(i + 1) * d]);
            }
        }
        block.attn.o.forward_alloc(&merged, rows, opts)
    }

    fn mlp(&self, block: &Block, x: &[f32], rows: usize, opts: &ForwardOptions) -> Vec<f32> {
        match &block.mlp {
            Mlp::Gated { gate, up, down } => {
                let g = gate.forward_alloc(x, rows, opts);
                let u = up.forward_alloc(x, rows, opts);
                let mut a = vec![0.0f32; g.len()];
                match self.config.act {
                    Activation::Silu => ops::swiglu(&g, &u, &mut a),
                    act => {
                        let f = act_fn(act);
                        a.iter_mut()
                            .zip(g.iter().zip(&u))
                            .for_each(|(o, (g, u))| *o = f(*g) * u);
                    }
                }
                down.forward_alloc(&a, rows, opts)
            }
            Mlp::Plain { fc, proj } => {
                let mut a = fc.forward_alloc(x, rows, opts);
                ops::activate(&mut a, act_fn(self.config.act));
                proj.forward_alloc(&a, rows, opts)
            }
        }
    }

    /// Logits `[rows, vocab]` for the given hidden rows.
    pub fn logits(&self, hidden: &[f32], rows: usize, opts: &ForwardOptions) -> Vec<f32> {
        let c = &self.config;
        match &self.lm_head {
            Some(l) => l.forward_alloc(hidden, rows, opts),
            None => {
                let mut out = vec![0.0f32; rows * c.vocab];
                gemm::matmul_nt(
                    hidden,
                    &self.embed,
                    &mut out,
                    rows,
                    c.vocab,
                    c.hidden,
                    false,
                );
                out
            }
        }
    }

    /// log p(target | row) for each (hidden row, target token) pair, computed in chunks so
    /// that the logits of all rows never exist at once.
    pub fn target_logprobs(
        &self,
        hidden: &[f32],
        targets: &[(usize, u32)],
        opts: &ForwardOptions,
    ) -> Vec<f32> {
        const CHUNK: usize = 128;
        let h = self.config.hidden;
        let vocab = self.config.vocab;
        let mut out = Vec::with_capacity(targets.len());
        let mut rows = vec![0.0f32; CHUNK * h];
        for chunk in targets.chunks(CHUNK) {
            for (i, &(r, _)) in chunk.iter().enumerate() {
                rows[i * h..(i + 1) * h].copy_from_slice(&hidden[r * h..(r + 1) * h]);
            }
            let logits = self.logits(&rows[..chunk.len() * h], chunk.len(), opts);
            let lps: Vec<f32> = logits
                .par_chunks(vocab)
                .zip(chunk.par_iter())
                .map(|(row, &(_, t))| ops::log_softmax_at(row, t as usize))
                .collect();
            out.extend(lps);
        }
        out
    }
}

/// Causal attention of one head of one sequence: queries `[len, d]` (row stride `q_rs`) over
/// keys/values `[past + len, d]` (row stride `kv_rs`). Each query row only looks at the keys it
/// may see (causal, sliding window), so masked scores are never computed.
#[allow(clippy::too_many_arguments)]
fn attend_one_head(
    q: &[f32],
    q_rs: usize,
    keys: &[f32],
    values: &[f32],
    kv_rs: usize,
    d: usize,
    span: Span,
    window: Option<usize>,
    scale: f32,
) -> Vec<f32> {
    let total = span.past + span.len;
    let mut out = vec![0.0f32; span.len * d];
    // Query rows in blocks: one product per block over the keys the block's last row sees.
    const BLOCK: usize = 64;
    let mut scores = vec![0.0f32; BLOCK.min(span.len) * total];
    let mut i0 = 0;
    while i0 < span.len {
        let rows = BLOCK.min(span.len - i0);
        let last_pos = span.past + i0 + rows - 1;
        let lo = window.map_or(0, |w| (span.past + i0 + 1).saturating_sub(w));
        let width = last_pos + 1 - lo;
        gemm::sgemm(
            rows,
            width,
            d,
            &q[i0 * q_rs..],
            q_rs,
            1,
            &keys[lo * kv_rs..],
            1,
            kv_rs,
            &mut scores,
            width,
            false,
        );
        for r in 0..rows {
            let qpos = span.past + i0 + r;
            let row = &mut scores[r * width..(r + 1) * width];
            let row_lo = window.map_or(0, |w| (qpos + 1).saturating_sub(w)) - lo;
            let row_hi = qpos + 1 - lo;
            row[..row_lo].fill(f32::NEG_INFINITY);
            row[row_hi..].fill(f32::NEG_INFINITY);
            row[row_lo..row_hi].iter_mut().for_each(|v| *v *= scale);
            ops::softmax_row(row);
        }
        gemm::sgemm(
            rows,
            d,
            width,
            &scores,
            width,
            1,
            &values[lo * kv_rs..],
            kv_rs,
            1,
            &mut out[i0 * d..],
            d,
            false,
        );
        i0 += rows;
    }
    out
}

fn apply_norm(n: &Norm, kind: NormKind, x: &[f32], out: &mut [f32]) {
    match kind {
        NormKind::Rms { eps } => ops::rms_norm(x, &n.weight, eps, out),
        NormKind::Layer { eps } => {
            ops::layer_norm(x, &n.weight, n.bias.as_deref().expect("bias"), eps, out)
        }
    }
}

fn act_fn(a: Activation) -> fn(f32) -> f32 {
    match a {
        Activation::Silu => ops::silu,
        Activation::GeluTanh => ops::gelu_tanh,
        Activation::Gelu => ops::gelu_erf,
    }
}

fn split_qkv(fused: &[f32], rows: usize, qd: usize, kvd: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let w = qd + 2 * kvd;
    let mut q = Vec::with_capacity(rows * qd);
    let mut k = Vec::with_capacity(rows * kvd);
    let mut v = Vec::with_capacity(rows * kvd);
    for row in fused.chunks_exact(w) {
        q.extend_from_slice(&row[..qd]);
        k.extend_from_slice(&row[qd..qd + kvd]);
        v.extend_from_slice(&row[qd + kvd..]);
    }
    (q, k, v)
}

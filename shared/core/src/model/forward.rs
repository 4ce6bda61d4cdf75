//! Inference forward pass over several sequences at once, with an optional KV cache.
//!
//! Tokens of all sequences are concatenated so that every linear layer runs as one large
//! matrix product; attention runs per (sequence, head) in parallel and never crosses
//! sequence boundaries, so no padding is ever computed.

use super::config::{Activation, NormKind};
use super::hooks::ForwardOptions;
use super::linear::Linear;
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
        caches: Option<&mut [KvCache]>,
        opts: &ForwardOptions,
    ) -> Result<Vec<f32>> {
        match caches {
            // A prefix (prefix or prompt tuning) is a pre-filled cache: without a cache, use
            // fresh ones.
            None if self.kv_prefix_len(opts) > 0 || self.input_prefix(opts).is_some() => {
                let mut local = vec![self.new_cache(opts)?; seqs.len()];
                self.forward_grouped(seqs, Some(&mut local), opts, group_tokens(), None)
            }
            caches => self.forward_grouped(seqs, caches, opts, group_tokens(), None),
        }
    }

    /// The active adapter's virtual input tokens (prompt tuning): `[n, hidden]` and n.
    pub fn input_prefix(&self, opts: &ForwardOptions) -> Option<(&[f32], usize)> {
        opts.adapter
            .and_then(|s| self.input_prefixes.get(s))
            .and_then(|p| p.as_ref())
            .map(|p| p.embeddings())
    }

    /// Virtual tokens the active adapter puts in front of every sequence's keys and values.
    pub fn kv_prefix_len(&self, opts: &ForwardOptions) -> usize {
        self.blocks
            .first()
            .and_then(|b| opts.adapter.and_then(|s| b.attn.prefixes.get(s)))
            .and_then(|p| p.as_ref())
            .map_or(0, |p| p.len())
    }

    /// An empty KV cache for one sequence, holding the active adapter's prefix keys/values
    /// when it has one (the sequence's positions then start after the prefix, as with
    /// transformers' past_key_values).
    pub fn new_cache(&self, opts: &ForwardOptions) -> Result<KvCache> {
        let mut cache = KvCache::new(self.blocks.len());
        if let Some((emb, n)) = self.input_prefix(opts) {
            // Prompt tuning: the virtual tokens run through the model once, at positions
            // 0..n, and stay in the cache like a prompt.
            let ids = vec![0u32; n];
            self.forward_grouped(
                &[SeqInput { ids: &ids }],
                Some(std::slice::from_mut(&mut cache)),
                opts,
                group_tokens(),
                Some(emb),
            )
            .map_err(|e| Error::usage(format!("the adapter's {n} virtual tokens: {e}")))?;
            return Ok(cache);
        }
        let n = self.kv_prefix_len(opts);
        if n == 0 {
            return Ok(cache);
        }
        for (li, b) in self.blocks.iter().enumerate() {
            let p = opts
                .adapter
                .and_then(|s| b.attn.prefixes.get(s))
                .and_then(|p| p.as_ref())
                .expect("prefix in every layer");
            let (k, v) = p.keys_values(li);
            cache.layers[li] = (k.to_vec(), v.to_vec());
        }
        cache.len = n;
        Ok(cache)
    }

    /// [`Model::forward`] with sub-batches of at most `group` tokens (whole sequences);
    /// `embeds` replaces the token embeddings of the input rows (virtual tokens).
    fn forward_grouped(
        &self,
        seqs: &[SeqInput],
        mut caches: Option<&mut [KvCache]>,
        opts: &ForwardOptions,
        group: usize,
        embeds: Option<&[f32]>,
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
                row.copy_from_slice(match embeds {
                    Some(e) => &e[(span.start + j) * h..(span.start + j + 1) * h],
                    None => &self.embed[id as usize * h..(id as usize + 1) * h],
                });
                if let Some(pe) = &self.pos_embed {
                    let p = span.past + j;
                    row.iter_mut()
                        .zip(&pe[p * h..(p + 1) * h])
                        .for_each(|(a, b)| *a += b);
                }
            }
        }

        // Whole sequences are grouped into sub-batches of about GROUP_TOKENS rows: each layer
        // runs group by group, so that the activations of a group stay in cache between the
        // ops of a layer, and each weight is packed once per layer for all groups.
        let groups = group_sequences(&spans, group);
        let mut packs = Packs::new(groups.len() > 1);
        let mut normed = vec![0.0f32; total * h];
        for (li, block) in self.blocks.iter().enumerate() {
            packs.clear();
            for &(g0, g1) in &groups {
                let r0 = spans[g0].start;
                let r1 = spans[g1 - 1].start + spans[g1 - 1].len;
                let rows = r1 - r0;
                let gspans: Vec<Span> = spans[g0..g1]
                    .iter()
                    .map(|s| Span {
                        start: s.start - r0,
                        ..*s
                    })
                    .collect();
                let xg = &mut x[r0 * h..r1 * h];
                let ng = &mut normed[r0 * h..r1 * h];
                apply_norm(&block.attn_norm, c.norm, xg, ng);
                let mut attn_out = self.attention(
                    li,
                    block,
                    ng,
                    rows,
                    &gspans,
                    rope.as_ref(),
                    caches.as_deref_mut().map(|cs| &mut cs[g0..g1]),
                    opts,
                    &mut packs,
                );
                if let Some(Some(a)) = opts.adapter.and_then(|s| block.adapters.get(s)) {
                    a.after_attention(ng, &mut attn_out, rows);
                }
                ops::add_assign(xg, &attn_out);
                drop(attn_out);
                apply_norm(&block.mlp_norm, c.norm, xg, ng);
                let mut mlp_out = self.mlp(block, ng, rows, opts, &mut packs);
                if let Some(Some(a)) = opts.adapter.and_then(|s| block.adapters.get(s)) {
                    a.after_mlp(ng, &mut mlp_out, rows);
                }
                ops::add_assign(xg, &mlp_out);
            }
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
        packs: &mut Packs,
    ) -> Vec<f32> {
        let c = &self.config;
        let (qd, kvd, d) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let (mut q, mut k, v) = match &block.attn.qkv {
            QkvProj::Separate { q, k, v } => (
                packs.linear(q, x, rows, opts),
                packs.linear(k, x, rows, opts),
                packs.linear(v, x, rows, opts),
            ),
            QkvProj::Fused(l) => split_qkv(&packs.linear(l, x, rows, opts), rows, qd, kvd),
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
        drop(results);
        packs.linear(&block.attn.o, &merged, rows, opts)
    }

    fn mlp(
        &self,
        block: &Block,
        x: &[f32],
        rows: usize,
        opts: &ForwardOptions,
        packs: &mut Packs,
    ) -> Vec<f32> {
        match &block.mlp {
            Mlp::Gated { gate, up, down } => {
                let g = packs.linear(gate, x, rows, opts);
                let u = packs.linear(up, x, rows, opts);
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
                drop((g, u));
                packs.linear(down, &a, rows, opts)
            }
            Mlp::Plain { fc, proj } => {
                let mut a = packs.linear(fc, x, rows, opts);
                ops::activate(&mut a, act_fn(self.config.act));
                packs.linear(proj, &a, rows, opts)
            }
        }
    }

    /// Logits `[rows, vocab]` for the given hidden rows.
    pub fn logits(&self, hidden: &[f32], rows: usize, opts: &ForwardOptions) -> Vec<f32> {
        let c = &self.config;
        match &self.lm_head {
            Some(l) => l.forward_alloc(hidden, rows, opts),
            None => {
                if let Some(p) = self.head_bf16.as_deref() {
                    let mut out = vec![0.0f32; rows * c.vocab];
                    gemm::matmul_nt_bf16(hidden, &p.nt, &mut out, rows, false);
                    return out;
                }
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

    /// log p(target | row) for each (hidden row, target token) pair, computed so that the
    /// logits of all rows never exist at once.
    pub fn target_logprobs(
        &self,
        hidden: &[f32],
        targets: &[(usize, u32)],
        opts: &ForwardOptions,
    ) -> Vec<f32> {
        // Plain head weight (no bias, no adapter): the fused vocabulary-blocked path.
        // A bf16 head goes through Model::logits, which multiplies in bf16.
        let head = match &self.lm_head {
            None if self.head_bf16.is_none() => Some(&self.embed[..]),
            Some(l) if l.bias.is_none() && l.adapter(opts).is_none() && l.bf16.is_none() => {
                l.weight.as_f32()
            }
            _ => None,
        };
        match head {
            Some(w) if targets.len() >= FUSED_HEAD_MIN_ROWS => {
                fused_head_logprobs(w, self.config.vocab, self.config.hidden, hidden, targets)
            }
            _ => self.target_logprobs_chunked(hidden, targets, opts),
        }
    }

    /// [`Model::target_logprobs`] through [`Model::logits`] on row chunks (any head).
    fn target_logprobs_chunked(
        &self,
        hidden: &[f32],
        targets: &[(usize, u32)],
        opts: &ForwardOptions,
    ) -> Vec<f32> {
        const CHUNK: usize = 128;
        let h = self.config.hidden;
        let vocab = self.config.vocab;
        let mut out = Vec::with_capacity(targets.len());
        let mut rows = vec![0.0f32; CHUNK.min(targets.len()) * h];
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

/// Fewer target rows than this go through the plain chunked head.
const FUSED_HEAD_MIN_ROWS: usize = 48;

/// log-softmax at the targets of `x[rows] · Wᵀ` for a head weight `w [vocab, h]`, vocabulary
/// block by block: each block of the weight is packed once for all rows, and per row a running
/// maximum and sum of exponentials (online log-sum-exp) replace the full logits row.
fn fused_head_logprobs(
    w: &[f32],
    vocab: usize,
    h: usize,
    hidden: &[f32],
    targets: &[(usize, u32)],
) -> Vec<f32> {
    const VB: usize = 3072;
    const R: usize = 192;
    let t = targets.len();
    let mut x = vec![0.0f32; t * h];
    x.par_chunks_mut(h)
        .zip(targets.par_iter())
        .for_each(|(row, &(r, _))| row.copy_from_slice(&hidden[r * h..(r + 1) * h]));
    // Per row: (running max, running sum of exp(logit − max), target logit).
    let mut state = vec![(f32::NEG_INFINITY, 0.0f32, 0.0f32); t];
    let mut packed = gemm::PackedWeight::default();
    let mut logits = vec![0.0f32; R.min(t) * VB.min(vocab)];
    for v0 in (0..vocab).step_by(VB) {
        let vb = VB.min(vocab - v0);
        packed.repack(&w[v0 * h..(v0 + vb) * h], vb, h);
        for r0 in (0..t).step_by(R) {
            let rows = R.min(t - r0);
            let lg = &mut logits[..rows * vb];
            gemm::matmul_nt_packed(&x[r0 * h..(r0 + rows) * h], &packed, lg, rows, false);
            lg.par_chunks(vb)
                .zip(state[r0..r0 + rows].par_iter_mut())
                .zip(targets[r0..r0 + rows].par_iter())
                .with_min_len(8)
                .for_each(|((row, st), &(_, tgt))| {
                    let (mx, sum) = ops::logsumexp_update(row, st.0, st.1);
                    st.0 = mx;
                    st.1 = sum;
                    let tgt = tgt as usize;
                    if (v0..v0 + vb).contains(&tgt) {
                        st.2 = row[tgt - v0];
                    }
                });
        }
    }
    state
        .iter()
        .map(|&(mx, sum, tl)| (tl - mx) - sum.ln())
        .collect()
}

/// Tokens per sub-batch of [`Model::forward`] (`PEFTKIT_GROUP_TOKENS` overrides, for tuning).
fn group_tokens() -> usize {
    static G: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *G.get_or_init(|| {
        std::env::var("PEFTKIT_GROUP_TOKENS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|&g| g > 0)
            .unwrap_or(512)
    })
}

/// Consecutive sequences grouped into sub-batches of at most `budget` tokens (a longer sequence
/// forms a group of its own): `(first, end)` sequence index ranges.
fn group_sequences(spans: &[Span], budget: usize) -> Vec<(usize, usize)> {
    let mut groups = Vec::new();
    let mut i = 0;
    while i < spans.len() {
        let mut j = i;
        let mut tokens = 0;
        while j < spans.len() && (j == i || tokens + spans[j].len <= budget) {
            tokens += spans[j].len;
            j += 1;
        }
        groups.push((i, j));
        i = j;
    }
    groups
}

/// Weights of the current layer packed once for all sub-batches (buffers reused across layers).
struct Packs {
    on: bool,
    slots: Vec<(*const Linear, gemm::PackedWeight)>,
    used: usize,
}

impl Packs {
    /// Products with fewer rows use the plain path (generation steps).
    const MIN_ROWS: usize = 16;

    fn new(on: bool) -> Self {
        Self {
            on,
            slots: Vec::new(),
            used: 0,
        }
    }

    /// Forget the packed weights (a new layer starts), keeping the buffers.
    fn clear(&mut self) {
        self.used = 0;
    }

    fn linear(&mut self, l: &Linear, x: &[f32], rows: usize, opts: &ForwardOptions) -> Vec<f32> {
        if !self.on || rows < Self::MIN_ROWS {
            return l.forward_alloc(x, rows, opts);
        }
        let key = l as *const Linear;
        let idx = match self.slots[..self.used].iter().position(|(p, _)| *p == key) {
            Some(i) => i,
            None => {
                if self.used == self.slots.len() {
                    self.slots
                        .push((std::ptr::null(), gemm::PackedWeight::default()));
                }
                let slot = &mut self.slots[self.used];
                slot.0 = key;
                l.pack_into(&mut slot.1);
                self.used += 1;
                self.used - 1
            }
        };
        let mut y = vec![0.0; rows * l.out_features];
        l.forward_with(x, rows, &mut y, opts, Some(&self.slots[idx].1));
        y
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
            row[..row_lo].fill(0.0);
            row[row_hi..].fill(0.0);
            ops::softmax_scaled(&mut row[row_lo..row_hi], scale);
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

/// The activation function of a config (shared with the training engine).
pub(crate) fn act_fn(a: Activation) -> fn(f32) -> f32 {
    match a {
        Activation::Silu => ops::silu,
        Activation::GeluTanh => ops::gelu_tanh,
        Activation::Gelu => ops::gelu_erf,
    }
}

/// Split GPT-2's fused `[q | k | v]` rows (shared with the training engine).
pub(crate) fn split_qkv(
    fused: &[f32],
    rows: usize,
    qd: usize,
    kvd: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Model {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(name);
        Model::load(&dir).unwrap()
    }

    fn close(a: &[f32], b: &[f32], ctx: &str) {
        assert_eq!(a.len(), b.len(), "{ctx}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "{ctx} [{i}]: {x} vs {y}"
            );
        }
    }

    #[test]
    fn sub_batches_and_fused_head_match_the_plain_paths() {
        let opts = ForwardOptions::default();
        for name in ["llama_gqa", "llama_untied", "gpt2", "qwen2"] {
            let model = fixture(name);
            let mut rng = crate::rng::Rng::new(3);
            let ids: Vec<Vec<u32>> = [5usize, 40, 17, 33, 1, 60, 9]
                .iter()
                .map(|&n| {
                    (0..n)
                        .map(|_| rng.below(model.config.vocab) as u32)
                        .collect()
                })
                .collect();
            let seqs: Vec<SeqInput> = ids.iter().map(|i| SeqInput { ids: i }).collect();
            let one = model
                .forward_grouped(&seqs, None, &opts, usize::MAX, None)
                .unwrap();
            for group in [1, 50, 64] {
                let grouped = model
                    .forward_grouped(&seqs, None, &opts, group, None)
                    .unwrap();
                close(&grouped, &one, &format!("{name} group {group}"));
                // With KV caches: same hidden states and the same cache contents.
                let layers = model.blocks.len();
                let mut ca = vec![KvCache::new(layers); seqs.len()];
                let mut cb = vec![KvCache::new(layers); seqs.len()];
                let a = model
                    .forward_grouped(&seqs, Some(&mut ca), &opts, usize::MAX, None)
                    .unwrap();
                let b = model
                    .forward_grouped(&seqs, Some(&mut cb), &opts, group, None)
                    .unwrap();
                close(&b, &a, &format!("{name} cached group {group}"));
                for (x, y) in ca.iter().zip(&cb) {
                    assert_eq!(x.len, y.len);
                    for (lx, ly) in x.layers.iter().zip(&y.layers) {
                        close(&ly.0, &lx.0, name);
                        close(&ly.1, &lx.1, name);
                    }
                }
            }
            let rows = one.len() / model.config.hidden;
            let targets: Vec<(usize, u32)> = (0..rows)
                .map(|r| (r, rng.below(model.config.vocab) as u32))
                .collect();
            let fused = model.target_logprobs(&one, &targets, &opts);
            let chunked = model.target_logprobs_chunked(&one, &targets, &opts);
            close(&fused, &chunked, &format!("{name} head"));
        }
    }
}

//! Generation on the GPU: the engine's forward pass a token (or a prompt) at a time, with a KV
//! cache on the device. The products, norms, SwiGLU and LoRA are the training path's; the
//! attention of the new rows against the cache is `attn_decode` (kernels.cu). Logits of the
//! last row come back to the host, where `generate` samples.

use super::blas::Gemm;
use super::device::{Arg, DBuf};
use super::engine::GpuEngine;
use super::weights::O;
use crate::error::{Error, Result};
use crate::generate::Decoder;
use crate::train::params::TrainState;

/// Warps per block of `attn_decode`: they split a row's keys for the weighted sum of values.
const ATTN_DECODE_WARPS: usize = 4;

/// The dynamic shared memory `attn_decode` takes for head size `dh` and `keys` cached
/// positions: the rotated query, one score per key, and each warp's partial output.
fn attn_decode_shared_bytes(dh: usize, keys: usize) -> usize {
    (dh + keys + ATTN_DECODE_WARPS * dh) * 4
}

/// One sequence's KV cache on the device: per layer the keys (rotated) and values seen so
/// far, bf16 `[kv_heads, max_len, head_dim]`.
pub struct GpuKvCache {
    k: Vec<DBuf>,
    v: Vec<DBuf>,
    len: usize,
    max_len: usize,
}

impl GpuKvCache {
    /// A cache for at most `max_len` tokens of `engine`'s model with the adapters it decodes
    /// with ([`GpuEngine::use_adapters_for_decoding`]): empty, or holding a prefix adapter's
    /// keys and values, or a prompt-tuning adapter's virtual tokens run through the model, at
    /// positions 0..n (as the CPU's `Model::new_cache`). Room for those n comes on top.
    pub fn new(engine: &mut GpuEngine, max_len: usize) -> Result<Self> {
        let virtual_len = match (&engine.prompt, &engine.prefix) {
            (Some((n, _)), _) => *n,
            (None, Some(p)) => p.n,
            (None, None) => 0,
        };
        let max_len = max_len + virtual_len;
        let m = &engine.model;
        // attn_decode keeps a row's scores in shared memory (48 KB without opting in).
        if attn_decode_shared_bytes(m.head_dim, max_len) > 48 << 10 {
            return Err(Error::usage(format!(
                "generation on the GPU holds at most {} tokens; ask for fewer new tokens",
                (48 << 10) / 4 - (1 + ATTN_DECODE_WARPS) * m.head_dim
            )));
        }
        engine.model.ensure_positions(&engine.gpu, max_len)?;
        let m = &engine.model;
        let per_layer = m.kv_heads * max_len * m.head_dim;
        let mut k = Vec::with_capacity(m.blocks.len());
        let mut v = Vec::with_capacity(m.blocks.len());
        for _ in 0..m.blocks.len() {
            k.push(engine.gpu.uninit_bf16(per_layer)?);
            v.push(engine.gpu.uninit_bf16(per_layer)?);
        }
        let mut cache = Self {
            k,
            v,
            len: 0,
            max_len,
        };
        engine.prefill(&mut cache)?;
        Ok(cache)
    }
}

impl GpuEngine {
    /// Makes the adapters of `state` (or none, for an empty state) the ones decoding uses.
    /// The state the engine was built for keeps its layout (PPO samples from the policy it
    /// trains, whose values the device optimizer may hold); another is laid out anew.
    pub fn use_adapters_for_decoding(&mut self, state: &TrainState) -> Result<()> {
        if !self.built_for(state) {
            self.set_adapters(state)?;
            self.set_adapter_modules(state)?;
        }
        self.sync_adapters(state)
    }

    /// Feeds `next` after what `cache` holds (without dropout); returns the logits of its last
    /// token.
    pub fn decode_step(&self, cache: &mut GpuKvCache, next: &[u32]) -> Result<Vec<f32>> {
        self.decode_batch(&mut [cache], &[next])
    }

    /// One step of several sequences at once: `next[i]` after what `caches[i]` holds (without
    /// dropout). The products, norms and MLPs take all their rows together (a weight is read
    /// once per step, not once per sequence); attention runs per sequence against its own
    /// cache. Returns each sequence's last-token logits, one row after another.
    pub fn decode_batch(
        &self,
        caches: &mut [&mut GpuKvCache],
        next: &[&[u32]],
    ) -> Result<Vec<f32>> {
        if caches.len() != next.len() || next.iter().any(|s| s.is_empty()) {
            return Err(Error::usage(
                "internal: an empty or mismatched decoding step",
            ));
        }
        for (cache, ids) in caches.iter().zip(next) {
            if cache.len + ids.len() > cache.max_len {
                return Err(Error::usage(format!(
                    "{} tokens do not fit the GPU cache of {}",
                    cache.len + ids.len(),
                    cache.max_len
                )));
            }
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.model.vocab) {
                return Err(Error::usage(format!(
                    "token id {bad} is outside the model's vocabulary of {}",
                    self.model.vocab
                )));
            }
        }
        let ids: Vec<u32> = next.concat();
        let row_pos: Vec<i32> = caches
            .iter()
            .zip(next)
            .flat_map(|(c, s)| (c.len..c.len + s.len()).map(|p| p as i32))
            .collect();
        let n = ids.len();
        let gids = self.gpu.upload(&ids)?;
        let row_pos = self.gpu.upload(&row_pos)?;
        let x = self.embed_rows(&gids, &row_pos, n)?;
        let lens: Vec<usize> = next.iter().map(|s| s.len()).collect();
        let views: Vec<&GpuKvCache> = caches.iter().map(|c| &**c).collect();
        let logits = self.decode_rows(&views, &lens, x, &row_pos)?;
        for (cache, ids) in caches.iter_mut().zip(next) {
            cache.len += ids.len();
        }
        Ok(logits)
    }

    /// What a fresh cache holds before the first token (see [`GpuKvCache::new`]).
    fn prefill(&self, cache: &mut GpuKvCache) -> Result<()> {
        if let Some((n, emb)) = &self.prompt {
            let (n, d) = (*n, self.model.hidden);
            let x = self.gpu.uninit_f32(n * d)?;
            self.gpu.copy(&x, emb, n * d * 4)?;
            let pos: Vec<i32> = (0..n as i32).collect();
            let pos = self.gpu.upload(&pos)?;
            self.add_positions(&x, &pos, n)?;
            self.decode_rows(&[&*cache], &[n], x, &pos)?;
            cache.len = n;
        } else if let Some(p) = &self.prefix {
            for l in 0..self.model.blocks.len() {
                for (dst, off) in [
                    (&cache.k[l], 2 * l * p.kv_dim),
                    (&cache.v[l], (2 * l + 1) * p.kv_dim),
                ] {
                    self.gpu.launch_n(
                        "prefix_to_heads",
                        self.model.kv_heads * p.n * self.model.head_dim,
                        &[
                            Arg::P(p.p.ptr),
                            Arg::P(dst.ptr),
                            Arg::I(off as i32),
                            Arg::I(p.n as i32),
                            Arg::I(1),
                            Arg::I(self.model.kv_heads as i32),
                            Arg::I(self.model.head_dim as i32),
                            Arg::I(cache.max_len as i32),
                            Arg::I(p.stride as i32),
                        ],
                    )?;
                }
            }
            cache.len = p.n;
        }
        Ok(())
    }

    /// Input rows `x` (f32) of several sequences through every block without dropout, sequence
    /// i's `lens[i]` rows after what `caches[i]` holds, at positions `row_pos`: their keys and
    /// values go into the caches. Returns each sequence's last-row logits, one row after
    /// another.
    fn decode_rows(
        &self,
        caches: &[&GpuKvCache],
        lens: &[usize],
        x: DBuf,
        row_pos: &DBuf,
    ) -> Result<Vec<f32>> {
        self.training.set(false);
        let r = self.decode_layers(caches, lens, x, row_pos);
        self.training.set(true);
        r
    }

    fn decode_layers(
        &self,
        caches: &[&GpuKvCache],
        lens: &[usize],
        mut x: DBuf,
        row_pos: &DBuf,
    ) -> Result<Vec<f32>> {
        let e = self;
        let (gpu, m) = (&e.gpu, &e.model);
        let n: usize = lens.iter().sum();
        let (d, dh) = (m.hidden, m.head_dim);
        let (qd, kvd) = (m.heads * dh, m.kv_heads * dh);
        let row_seq = gpu.upload(&vec![0i32; n])?;
        // Each sequence's first row.
        let starts: Vec<usize> = lens
            .iter()
            .scan(0, |at, &len| {
                let s = *at;
                *at += len;
                Some(s)
            })
            .collect();
        let add = |a: &DBuf, b: &DBuf, len: usize| {
            gpu.launch_n(
                "add_inplace",
                len,
                &[Arg::P(a.ptr), Arg::P(b.ptr), Arg::L(len as i64)],
            )
        };
        for (l, blk) in m.blocks.iter().enumerate() {
            let n1 = gpu.uninit_bf16(n * d)?;
            let rstd = e.norm_stats(n)?;
            e.norm_fwd(&x, &blk.attn_norm, &n1, &rstd, n)?;
            let (q, k, v, _) = e.qkv_fwd(l, &n1, n)?;
            // Per sequence: its keys (rotated) and values into its cache at their positions,
            // then its rows' attention against the cache.
            let rope = i32::from(m.rope());
            let o = gpu.uninit_f32(n * qd)?;
            for ((cache, &len), &r0) in caches.iter().zip(lens).zip(&starts) {
                for (src, dst, rope) in [(&k, &cache.k[l], rope), (&v, &cache.v[l], 0)] {
                    gpu.launch_n(
                        "rope_permute",
                        len * kvd / 2,
                        &[
                            Arg::P(src.at(r0 * kvd, 4)),
                            Arg::P(dst.ptr),
                            Arg::P(row_seq.ptr),
                            Arg::P(row_pos.at(r0, 4)),
                            Arg::P(m.cos.ptr),
                            Arg::P(m.sin.ptr),
                            Arg::L(len as i64),
                            Arg::I(m.kv_heads as i32),
                            Arg::I(dh as i32),
                            Arg::I(cache.max_len as i32),
                            Arg::I(rope),
                        ],
                    )?;
                }
                gpu.launch_shared(
                    "attn_decode",
                    (len * m.heads) as u32,
                    (32 * ATTN_DECODE_WARPS) as u32,
                    attn_decode_shared_bytes(dh, cache.len + len) as u32,
                    &[
                        Arg::P(q.at(r0 * qd, 4)),
                        Arg::P(cache.k[l].ptr),
                        Arg::P(cache.v[l].ptr),
                        Arg::P(o.at(r0 * qd, 4)),
                        Arg::P(m.cos.ptr),
                        Arg::P(m.sin.ptr),
                        Arg::I(m.heads as i32),
                        Arg::I(m.kv_heads as i32),
                        Arg::I(dh as i32),
                        Arg::I(cache.max_len as i32),
                        Arg::I(cache.len as i32),
                        Arg::I(blk.window.unwrap_or(0) as i32),
                        Arg::F(1.0 / (dh as f32).sqrt()),
                        Arg::I(rope),
                    ],
                )?;
            }
            let o_in = e.cast_bf16(&o, n * qd)?;
            let h2 = gpu.uninit_f32(n * d)?;
            e.lin_fwd(l, O, &o_in, &h2, n)?;
            e.adapter_fwd(l, 0, &n1, &h2, n)?;
            add(&h2, &x, n * d)?;
            let out = e.mlp_forward(l, &h2, n)?.out;
            // Rounded to bf16 between blocks, as in training and in a bf16 PyTorch model.
            x = e.round_bf16(&out, n * d)?;
        }
        let nf = gpu.uninit_bf16(n * d)?;
        let rstd = e.norm_stats(n)?;
        e.norm_fwd(&x, &m.final_norm, &nf, &rstd, n)?;
        // Each sequence's last row through the LM head.
        let last: Vec<i32> = starts
            .iter()
            .zip(lens)
            .map(|(&r0, &len)| (r0 + len - 1) as i32)
            .collect();
        let ns = last.len();
        let rows = gpu.uninit_bf16(ns * d)?;
        let idx = gpu.upload(&last)?;
        e.gather_hidden(&nf, idx.ptr, &rows, ns)?;
        let head = m.head_ptr(gpu, &e.scratch)?;
        let logits = gpu.uninit_f32(ns * m.vocab)?;
        gpu.gemm(&Gemm::nt(ns, m.vocab, d, rows.ptr, head, logits.ptr))?;
        gpu.download_f32(&logits, ns * m.vocab)
    }
}

/// One sequence being generated: the engine (with its adapters) and the sequence's cache.
pub struct GpuDecoder<'e> {
    engine: &'e mut GpuEngine,
    cache: GpuKvCache,
}

impl<'e> GpuDecoder<'e> {
    /// A fresh sequence of at most `max_len` tokens with the adapters of `state` (or none).
    pub fn new(engine: &'e mut GpuEngine, state: &TrainState, max_len: usize) -> Result<Self> {
        engine.use_adapters_for_decoding(state)?;
        let cache = GpuKvCache::new(engine, max_len)?;
        Ok(Self { engine, cache })
    }
}

impl Decoder for GpuDecoder<'_> {
    fn step(&mut self, next: &[u32]) -> Result<Vec<f32>> {
        self.engine.decode_step(&mut self.cache, next)
    }

    fn fed(&self) -> usize {
        self.cache.len
    }

    fn limit(&self) -> usize {
        self.cache.max_len
    }
}

/// peft-generate on a GPU: the model uploaded once, each adapter's tensors kept on the host
/// (they go to the device when a prompt chooses them), a fresh KV cache per prompt.
pub struct GpuGenerator {
    engine: GpuEngine,
    base: TrainState,
    adapters: Vec<TrainState>,
}

impl GpuGenerator {
    /// Opens `device` and uploads `model`; `adapter_dirs` are PEFT adapter folders (any type) in
    /// the order the caller numbers them.
    pub fn new(
        device: super::DeviceSpec,
        model: &crate::model::Model,
        adapter_dirs: &[std::path::PathBuf],
    ) -> Result<Self> {
        let base = TrainState::new(model.linears().len());
        let mut adapters = Vec::with_capacity(adapter_dirs.len());
        for dir in adapter_dirs {
            adapters.push(crate::train::lora::load_any_adapter(dir, model)?.0);
        }
        let gpu = super::device::Gpu::open(device)?;
        crate::cli::info(format!("generating on {} ({device})", gpu.name()));
        let engine = GpuEngine::for_eval(gpu, model, &base)?;
        Ok(Self {
            engine,
            base,
            adapters,
        })
    }

    /// A decoder for one sequence of at most `max_len` tokens with adapter `adapter` (an
    /// index into the folders given to [`Self::new`]) or none.
    pub fn decoder(&mut self, adapter: Option<usize>, max_len: usize) -> Result<GpuDecoder<'_>> {
        let state = match adapter {
            Some(i) => &self.adapters[i],
            None => &self.base,
        };
        GpuDecoder::new(&mut self.engine, state, max_len)
    }

    /// A decoder for `prompts` generated together (`max_new` tokens each at most) with adapter
    /// `adapter` or none: peft-generate's `--batch` on the GPU.
    pub fn batch_decoder(
        &mut self,
        adapter: Option<usize>,
        prompts: &[&[u32]],
        max_new: usize,
        limit: usize,
    ) -> Result<GpuBatchDecoder<'_>> {
        let state = match adapter {
            Some(i) => &self.adapters[i],
            None => &self.base,
        };
        self.engine.use_adapters_for_decoding(state)?;
        GpuBatchDecoder::new(&mut self.engine, prompts, max_new, limit)
    }
}

/// Several sequences generated together on the GPU (PPO's rollouts): one cache each; every
/// step feeds the active sequences through the engine together ([`GpuEngine::decode_batch`])
/// with the adapters last given to [`GpuEngine::use_adapters_for_decoding`].
pub struct GpuBatchDecoder<'e> {
    engine: &'e GpuEngine,
    caches: Vec<GpuKvCache>,
    limit: usize,
}

impl<'e> GpuBatchDecoder<'e> {
    /// Caches for `prompts`, each sized for its prompt and `max_new` tokens (at most `limit`,
    /// the model's positions).
    pub fn new(
        engine: &'e mut GpuEngine,
        prompts: &[&[u32]],
        max_new: usize,
        limit: usize,
    ) -> Result<Self> {
        let caches = prompts
            .iter()
            .map(|p| GpuKvCache::new(engine, (p.len() + max_new).min(limit).max(1)))
            .collect::<Result<_>>()?;
        Ok(Self {
            engine,
            caches,
            limit,
        })
    }
}

impl crate::train::rollout::BatchDecoder for GpuBatchDecoder<'_> {
    fn step(&mut self, active: &[usize], next: &[Vec<u32>]) -> Result<Vec<f32>> {
        // The active sequences' caches, in `active`'s order (it is increasing).
        let mut caches: Vec<&mut GpuKvCache> = self
            .caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| active.binary_search(i).is_ok())
            .map(|(_, c)| c)
            .collect();
        let ids: Vec<&[u32]> = active.iter().map(|&i| next[i].as_slice()).collect();
        self.engine.decode_batch(&mut caches, &ids)
    }

    fn fed(&self, i: usize) -> usize {
        self.caches[i].len
    }

    fn limit(&self) -> usize {
        self.limit
    }
}

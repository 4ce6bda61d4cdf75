//! The frozen model on the device: linear weights in bf16 (the compute dtype) or kept 4-bit
//! (QLoRA: NF4/FP4 bytes plus one f32 scale per block, decoded into a bf16 scratch right
//! before each product, as bitsandbytes does), norms in f32, the embedding in bf16 (it is
//! the tied LM head too), and the RoPE tables the CPU path uses (so scaled variants match),
//! or GPT-2's learned positions (bf16).

use super::device::{Arg, DBuf, Gpu};
use crate::error::{Error, Result};
use crate::model::config::{Activation, Arch, NormKind};
use crate::model::linear::{Linear, Weight};
use crate::model::rope::RopeTable;
use crate::model::{Mlp, Model, QkvProj};

pub enum GpuWeight {
    Bf16(DBuf),
    Q4 {
        packed: DBuf,
        absmax: DBuf,
        code: DBuf,
        blocksize: usize,
    },
}

/// Device addresses of a 4-bit weight (bitsandbytes layout) and its block size.
pub struct Q4Ptrs {
    pub packed: u64,
    pub absmax: u64,
    pub code: u64,
    pub blocksize: usize,
}

/// Rows of the 4-bit GEMV per warp (`GEMV_ROWS` in kernels.cu).
const GEMV_ROWS: usize = 4;

/// Launches the fused 4-bit GEMV (`gemv_q4`, the weight decoded in registers, never written):
/// `y[out] = W·x[inp]`, f32. False (nothing launched) where it does not apply: `inp` not a
/// multiple of 32, a block size not a power of two from 32, or `x` longer than the kernel's
/// 48 KB of shared memory (12288 values). Small layers get 16 rows per block rather than 32, so that more blocks
/// share the GPU's SMs.
pub fn launch_gemv_q4(
    gpu: &Gpu,
    q4: &Q4Ptrs,
    x: u64,
    y: u64,
    out: usize,
    inp: usize,
) -> Result<bool> {
    let shared = inp * 4;
    if !inp.is_multiple_of(32)
        || q4.blocksize < 32
        || !q4.blocksize.is_power_of_two()
        || shared > 48 << 10
        || out * inp / 32 > i32::MAX as usize
    {
        return Ok(false);
    }
    let rows_per_block = if out >= 8192 { 32 } else { 16 };
    gpu.launch_shared(
        "gemv_q4",
        out.div_ceil(rows_per_block) as u32,
        (32 * rows_per_block / GEMV_ROWS) as u32,
        shared as u32,
        &[
            Arg::P(q4.packed),
            Arg::P(q4.absmax),
            Arg::P(q4.code),
            Arg::P(x),
            Arg::P(y),
            Arg::I(out as i32),
            Arg::I(inp as i32),
            Arg::I(q4.blocksize as i32),
            Arg::I(rows_per_block as i32),
        ],
    )?;
    Ok(true)
}

pub struct GpuLinear {
    pub out: usize,
    pub inp: usize,
    pub w: GpuWeight,
    pub bias: Option<DBuf>,
}

impl GpuLinear {
    pub fn upload(gpu: &Gpu, l: &Linear) -> Result<Self> {
        let w = match &l.weight {
            Weight::F32(w) => GpuWeight::Bf16(gpu.upload_bf16(w)?),
            Weight::Q4(q) => GpuWeight::Q4 {
                packed: gpu.upload(&q.packed)?,
                absmax: gpu.upload(&q.absmax)?,
                code: gpu.upload(&q.code)?,
                blocksize: q.blocksize(),
            },
        };
        let bias = l.bias.as_deref().map(|b| gpu.upload(b)).transpose()?;
        Ok(Self {
            out: l.out_features,
            inp: l.in_features,
            w,
            bias,
        })
    }

    pub fn is_q4(&self) -> bool {
        matches!(self.w, GpuWeight::Q4 { .. })
    }

    /// `y = W·x` for one row by the fused 4-bit GEMV ([`launch_gemv_q4`]): `x` f32 `[in]`,
    /// `y` f32 `[out]`. False (nothing launched) for a bf16 weight or a shape the kernel
    /// does not take.
    pub fn gemv_q4(&self, gpu: &Gpu, x: u64, y: u64) -> Result<bool> {
        let GpuWeight::Q4 {
            packed,
            absmax,
            code,
            blocksize,
        } = &self.w
        else {
            return Ok(false);
        };
        let q4 = Q4Ptrs {
            packed: packed.ptr,
            absmax: absmax.ptr,
            code: code.ptr,
            blocksize: *blocksize,
        };
        launch_gemv_q4(gpu, &q4, x, y, self.out, self.inp)
    }

    /// Address of the weight as bf16 `[out, in]`: the stored copy, or the 4-bit weight
    /// decoded into `scratch` (at least `out·in` bf16 values).
    pub fn bf16_weight(&self, gpu: &Gpu, scratch: &DBuf) -> Result<u64> {
        match &self.w {
            GpuWeight::Bf16(b) => Ok(b.ptr),
            GpuWeight::Q4 {
                packed,
                absmax,
                code,
                blocksize,
            } => {
                let n = self.out * self.inp;
                assert!(scratch.bytes >= n * 2, "dequantization scratch too small");
                gpu.launch_n(
                    "dequant_q4_bf16",
                    n.div_ceil(2),
                    &[
                        Arg::P(packed.ptr),
                        Arg::P(absmax.ptr),
                        Arg::P(code.ptr),
                        Arg::P(scratch.ptr),
                        Arg::L(n as i64),
                        Arg::I(*blocksize as i32),
                    ],
                )?;
                Ok(scratch.ptr)
            }
        }
    }
}

/// The roles of a block's linear layers (the CPU's `linears()` order for gated models). A
/// block's `lin` holds its layers in the CPU's order; [`GpuModel::lin`] finds a role there.
/// GPT-2 has four: its fused `c_attn` (q|k|v) takes Q's role, `c_fc` UP's and the MLP's
/// `c_proj` DOWN's; it has no K, V or GATE.
pub const Q: usize = 0;
pub const K: usize = 1;
pub const V: usize = 2;
pub const O: usize = 3;
pub const GATE: usize = 4;
pub const UP: usize = 5;
pub const DOWN: usize = 6;
pub const ROLES: usize = 7;
const NONE: usize = usize::MAX;

/// A norm layer: RMSNorm (a weight) or LayerNorm (a weight and a bias).
pub struct GpuNorm {
    pub w: DBuf,
    pub b: Option<DBuf>,
}

impl GpuNorm {
    fn upload(gpu: &Gpu, n: &crate::model::Norm) -> Result<Self> {
        Ok(Self {
            w: gpu.upload(&n.weight)?,
            b: n.bias.as_deref().map(|b| gpu.upload(b)).transpose()?,
        })
    }
}

pub struct GpuBlock {
    pub attn_norm: GpuNorm,
    pub mlp_norm: GpuNorm,
    pub lin: Vec<GpuLinear>,
    pub window: Option<usize>,
}

/// How the architecture computes what the block code leaves open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Llama, Mistral, Qwen2: RMSNorm, RoPE, separate q/k/v, SwiGLU.
    Llama,
    /// GPT-2: LayerNorm, learned positions, fused q|k|v, `proj(gelu(fc(x)))` (`gelu` is the
    /// kind `gelu_fwd` takes: 0 tanh, 1 erf).
    Gpt2 { gelu: i32 },
}

pub struct GpuModel {
    pub hidden: usize,
    pub inter: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub eps: f32,
    pub family: Family,
    /// Linear layers per block, and where each role sits among them (NONE: absent).
    pub per_block: usize,
    slot_of: [usize; ROLES],
    /// `[vocab, hidden]` bf16.
    pub embed: DBuf,
    /// GPT-2's learned positions `[max_positions, hidden]` bf16.
    pub pos_embed: Option<DBuf>,
    pub max_positions: usize,
    pub lm_head: Option<GpuLinear>,
    pub final_norm: GpuNorm,
    pub blocks: Vec<GpuBlock>,
    pub cos: DBuf,
    pub sin: DBuf,
    pub rope_positions: usize,
    /// Largest linear weight (elements): the size of the 4-bit decoding scratch.
    pub max_linear: usize,
    pub inv_freq: Vec<f32>,
}

/// Why a model cannot run on the GPU path (it covers the Llama family's layout and GPT-2's).
pub fn unsupported_reason(m: &Model) -> Option<String> {
    let c = &m.config;
    if c.arch == Arch::Gpt2 {
        if c.act == Activation::Silu || m.pos_embed.is_none() {
            return Some("GPT-2 models without GELU and learned positions".into());
        }
        if !c.head_dim.is_multiple_of(2) {
            return Some("odd head dimensions".into());
        }
        return None;
    }
    if !matches!(c.norm, NormKind::Rms { .. }) || c.act != Activation::Silu || c.rope.is_none() {
        return Some("models without RMSNorm, SiLU and RoPE".into());
    }
    if c.o_bias || c.mlp_bias {
        return Some("models with o_proj or MLP biases".into());
    }
    if !c.head_dim.is_multiple_of(2) {
        return Some("odd head dimensions".into());
    }
    None
}

impl GpuModel {
    pub fn upload(gpu: &Gpu, m: &Model, positions: usize) -> Result<Self> {
        if let Some(why) = unsupported_reason(m) {
            return Err(Error::usage(format!(
                "--device cuda does not support {why} yet (Llama, Mistral and Qwen2 are supported); use --device cpu"
            )));
        }
        let c = &m.config;
        let eps = match c.norm {
            NormKind::Rms { eps } => eps,
            NormKind::Layer { eps } => eps,
        };
        let (family, slot_of) = if c.arch == Arch::Gpt2 {
            let gelu = i32::from(c.act == Activation::Gelu);
            (Family::Gpt2 { gelu }, [0, NONE, NONE, 1, NONE, 2, 3])
        } else {
            (Family::Llama, [0, 1, 2, 3, 4, 5, 6])
        };
        let mut blocks = Vec::with_capacity(m.blocks.len());
        let mut max_linear = 0;
        for (i, b) in m.blocks.iter().enumerate() {
            let mut host: Vec<&Linear> = match &b.attn.qkv {
                QkvProj::Separate { q, k, v } => vec![q, k, v],
                QkvProj::Fused(qkv) => vec![qkv],
            };
            host.push(&b.attn.o);
            match &b.mlp {
                Mlp::Gated { gate, up, down } => host.extend([gate, up, down]),
                Mlp::Plain { fc, proj } => host.extend([fc, proj]),
            }
            let mut lin = Vec::with_capacity(host.len());
            for l in host {
                max_linear = max_linear.max(l.in_features * l.out_features);
                lin.push(GpuLinear::upload(gpu, l)?);
            }
            blocks.push(GpuBlock {
                attn_norm: GpuNorm::upload(gpu, &b.attn_norm)?,
                mlp_norm: GpuNorm::upload(gpu, &b.mlp_norm)?,
                lin,
                window: c.sliding_window.get(i).copied().flatten(),
            });
        }
        let per_block = blocks.first().map_or(ROLES, |b| b.lin.len());
        let lm_head = m
            .lm_head
            .as_ref()
            .map(|l| GpuLinear::upload(gpu, l))
            .transpose()?;
        let table = RopeTable::new(&m.inv_freq, positions.max(1));
        // Models without RoPE keep one-element placeholders (no launch reads them).
        let table_or_placeholder = |t: &[f32]| gpu.upload(if t.is_empty() { &[0.0] } else { t });
        Ok(Self {
            hidden: c.hidden,
            inter: c.intermediate,
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            vocab: c.vocab,
            eps,
            family,
            per_block,
            slot_of,
            embed: gpu.upload_bf16(&m.embed)?,
            pos_embed: m
                .pos_embed
                .as_deref()
                .map(|p| gpu.upload_bf16(p))
                .transpose()?,
            max_positions: c.max_positions,
            lm_head,
            final_norm: GpuNorm::upload(gpu, &m.final_norm)?,
            blocks,
            cos: table_or_placeholder(&table.cos)?,
            sin: table_or_placeholder(&table.sin)?,
            rope_positions: positions.max(1),
            max_linear,
            inv_freq: m.inv_freq.clone(),
        })
    }

    /// Norm `i` in the CPU's `norm_ref` order: 2l block l's attention norm, 2l+1 its MLP
    /// norm, 2·blocks the final norm.
    pub fn norm(&self, i: usize) -> &GpuNorm {
        let nb = self.blocks.len();
        if i == 2 * nb {
            &self.final_norm
        } else if i.is_multiple_of(2) {
            &self.blocks[i / 2].attn_norm
        } else {
            &self.blocks[i / 2].mlp_norm
        }
    }

    /// Whether positions are rotary (else learned, added to the embeddings).
    pub fn rope(&self) -> bool {
        self.family == Family::Llama
    }

    /// Linear layer `role` of block `l`.
    pub fn lin(&self, l: usize, role: usize) -> &GpuLinear {
        &self.blocks[l].lin[self.slot_of[role]]
    }

    /// The index of linear layer `role` of block `l` among all of the model's linears (the
    /// CPU's `linears()` order, which adapters' slots follow).
    pub fn index(&self, l: usize, role: usize) -> usize {
        l * self.per_block + self.slot_of[role]
    }

    /// Makes the RoPE tables cover `positions` positions (learned positions: checks that the
    /// model has that many).
    pub fn ensure_positions(&mut self, gpu: &Gpu, positions: usize) -> Result<()> {
        if self.pos_embed.is_some() {
            if positions > self.max_positions {
                return Err(Error::usage(format!(
                    "sequence of {positions} tokens is longer than the model's {} positions",
                    self.max_positions
                )));
            }
            return Ok(());
        }
        if positions > self.rope_positions {
            let table = RopeTable::new(&self.inv_freq, positions);
            self.cos = gpu.upload(&table.cos)?;
            self.sin = gpu.upload(&table.sin)?;
            self.rope_positions = positions;
        }
        Ok(())
    }

    pub fn any_q4(&self) -> bool {
        self.blocks
            .iter()
            .any(|b| b.lin.iter().any(GpuLinear::is_q4))
    }

    /// The LM head as bf16 `[vocab, hidden]` (the embedding when tied).
    pub fn head_ptr(&self, gpu: &Gpu, scratch: &DBuf) -> Result<u64> {
        match &self.lm_head {
            Some(l) => l.bf16_weight(gpu, scratch),
            None => Ok(self.embed.ptr),
        }
    }
}

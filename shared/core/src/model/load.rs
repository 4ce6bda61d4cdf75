//! Building a [`Model`] from a Hugging Face folder.

use super::config::{Arch, ModelConfig, NormKind};
use super::weights::WeightFiles;
use super::*;
use crate::error::{Error, Result};
use std::path::Path;

impl Model {
    /// Load config.json and the safetensors weights of a model folder (weights converted to
    /// f32 for compute; the mapped files are released afterwards).
    ///
    /// A `…ForSequenceClassification` folder ([`ModelConfig::seq_cls`]) loads its backbone
    /// only: `lm_head` is None and `score.weight` is left for
    /// `train::preference::load_reward_model`. Such a model's LM logits (the input embeddings
    /// standing in for the missing head) are meaningless and must not be used.
    pub fn load(dir: &Path) -> Result<Self> {
        let config = ModelConfig::load(dir)?;
        let files = WeightFiles::open(dir)?;
        Self::from_weights(config, &files)
    }

    pub fn from_weights(config: ModelConfig, w: &WeightFiles) -> Result<Self> {
        Self::from_weights_with(config, w, None)
    }

    /// [`Model::load`], quantizing every linear weight (not the LM head) to 4 bits while
    /// loading, one tensor at a time: the full-precision model never exists in memory
    /// (QLoRA on a plain checkpoint). Weights already stored 4-bit load as they are.
    pub fn load_quantized(dir: &Path, q: QuantizeOnLoad) -> Result<Self> {
        let config = ModelConfig::load(dir)?;
        let files = WeightFiles::open(dir)?;
        Self::from_weights_with(config, &files, Some(q))
    }

    fn from_weights_with(
        config: ModelConfig,
        w: &WeightFiles,
        quantize: Option<QuantizeOnLoad>,
    ) -> Result<Self> {
        let ctx = Ctx { files: w, quantize };
        match config.arch {
            Arch::Gpt2 => load_gpt2(config, &ctx),
            _ => load_llama_like(config, &ctx),
        }
    }
}

/// How [`Model::load_quantized`] quantizes (bitsandbytes' `quantize_4bit` semantics).
#[derive(Clone, Copy, Debug)]
pub struct QuantizeOnLoad {
    pub quant_type: crate::quant::QuantType,
    pub blocksize: usize,
    pub double_quant: bool,
}

impl QuantizeOnLoad {
    /// From the tools' `--quantize TYPE --quant-blocksize N [--no-double-quant]` options.
    pub fn from_options(
        quant_type: Option<&str>,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Option<Self>> {
        let Some(t) = quant_type else {
            return Ok(None);
        };
        let quant_type = crate::quant::QuantType::parse(t)?;
        if !crate::quant::blockwise::valid_blocksize(blocksize) {
            return Err(Error::usage(
                "--quant-blocksize must be a power of two from 32 to 4096",
            ));
        }
        Ok(Some(Self {
            quant_type,
            blocksize,
            double_quant,
        }))
    }
}

impl Model {
    /// [`Model::load`] or [`Model::load_quantized`].
    pub fn load_with(dir: &Path, quantize: Option<QuantizeOnLoad>) -> Result<Self> {
        match quantize {
            Some(q) => Self::load_quantized(dir, q),
            None => Self::load(dir),
        }
    }
}

/// The weight files plus what to do with plain linear weights.
struct Ctx<'a> {
    files: &'a WeightFiles,
    quantize: Option<QuantizeOnLoad>,
}

impl std::ops::Deref for Ctx<'_> {
    type Target = WeightFiles;
    fn deref(&self) -> &WeightFiles {
        self.files
    }
}

impl Ctx<'_> {
    /// Quantize the f32 weight `[out, inp]` of linear layer `name` when asked to (never the
    /// LM head, which transformers and quantize-nf4 keep in full precision).
    fn maybe_quantize(
        &self,
        name: &str,
        weight: &[f32],
        out: usize,
        inp: usize,
    ) -> Result<Option<crate::quant::QuantizedTensor>> {
        let Some(q) = self.quantize else {
            return Ok(None);
        };
        if name == "lm_head" {
            return Ok(None);
        }
        let wname = format!("{name}.weight");
        let qw = crate::quant::quantize_weight(
            crate::quant::Source::F32(weight),
            &[out, inp],
            crate::io::safetensors_file::OutDtype::F32,
            q.quant_type,
            q.blocksize,
            q.double_quant,
            crate::quant::torch_mean::TorchReduce::detect(),
        )
        .map_err(|e| {
            Error::bad_input(
                crate::quant::TensorSource::file_for(self.files, &wname),
                format!("tensor {wname}: cannot quantize: {e}"),
            )
        })?;
        Ok(Some(crate::quant::QuantizedTensor {
            name: wname,
            absmax: qw.absmax_f32(),
            packed: qw.packed,
            state: qw.state,
            code: *q.quant_type.code(),
        }))
    }
}

fn linear(w: &Ctx, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    let b = if bias {
        Some(w.f32(&format!("{name}.bias"), &[out])?)
    } else {
        None
    };
    if let Some(q) = quantized(w, name, out, inp)? {
        return Ok(Linear::new_q4(name.to_string(), q, b));
    }
    let weight = w.f32(&format!("{name}.weight"), &[out, inp])?;
    if let Some(q) = w.maybe_quantize(name, &weight, out, inp)? {
        return Ok(Linear::new_q4(name.to_string(), q, b));
    }
    Ok(Linear::new(name.to_string(), weight, b, out, inp))
}

/// The 4-bit (bitsandbytes layout) weight of linear layer `name`, if it is stored that way;
/// its recorded shape must be the layer's `[out, in]` (also for GPT-2's Conv1D layers, which
/// transformers quantizes in Linear orientation).
fn quantized(
    w: &WeightFiles,
    name: &str,
    out: usize,
    inp: usize,
) -> Result<Option<crate::quant::QuantizedTensor>> {
    let wname = format!("{name}.weight");
    let Some(q) = crate::quant::read_quantized(w, &wname)? else {
        return Ok(None);
    };
    if q.shape() != [out, inp] {
        return Err(Error::bad_input(
            crate::quant::TensorSource::file_for(w, &wname),
            format!(
                "4-bit tensor {wname} has shape {:?} in its quant state, expected [{out}, {inp}] from config.json",
                q.shape()
            ),
        ));
    }
    Ok(Some(q))
}

fn norm(w: &WeightFiles, name: &str, h: usize, with_bias: bool) -> Result<Norm> {
    Ok(Norm {
        name: name.to_string(),
        weight: w.f32(&format!("{name}.weight"), &[h])?,
        bias: if with_bias {
            Some(w.f32(&format!("{name}.bias"), &[h])?)
        } else {
            None
        },
    })
}

fn load_llama_like(config: ModelConfig, w: &Ctx) -> Result<Model> {
    let c = &config;
    let (h, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.intermediate);
    let embed = w.f32("model.embed_tokens.weight", &[c.vocab, h])?;
    let mut blocks = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        let p = format!("model.layers.{i}");
        let attn = Attention {
            qkv: QkvProj::Separate {
                q: linear(w, &format!("{p}.self_attn.q_proj"), q, h, c.qkv_bias)?,
                k: linear(w, &format!("{p}.self_attn.k_proj"), kv, h, c.qkv_bias)?,
                v: linear(w, &format!("{p}.self_attn.v_proj"), kv, h, c.qkv_bias)?,
            },
            o: linear(w, &format!("{p}.self_attn.o_proj"), h, q, c.o_bias)?,
            prefixes: Vec::new(),
        };
        let mlp = Mlp::Gated {
            gate: linear(w, &format!("{p}.mlp.gate_proj"), f, h, c.mlp_bias)?,
            up: linear(w, &format!("{p}.mlp.up_proj"), f, h, c.mlp_bias)?,
            down: linear(w, &format!("{p}.mlp.down_proj"), h, f, c.mlp_bias)?,
        };
        blocks.push(Block {
            attn_norm: norm(w, &format!("{p}.input_layernorm"), h, false)?,
            attn,
            mlp_norm: norm(w, &format!("{p}.post_attention_layernorm"), h, false)?,
            mlp,
            adapters: Vec::new(),
        });
    }
    let final_norm = norm(w, "model.norm", h, false)?;
    // A sequence-classification checkpoint stores `score.weight` instead of an LM head.
    let lm_head = if c.tie_embeddings || c.seq_cls {
        None
    } else {
        Some(linear(w, "lm_head", c.vocab, h, false)?)
    };
    let inv_freq = rope::inv_freq(c.rope.as_ref().expect("rope"), c.head_dim);
    Ok(Model {
        embed,
        embed_name: "model.embed_tokens".into(),
        pos_embed: None,
        blocks,
        final_norm,
        lm_head,
        inv_freq,
        input_prefixes: Vec::new(),
        head_bf16: None,
        config,
    })
}

/// GPT-2 checkpoints name tensors with or without the `transformer.` prefix.
fn gpt2_prefix(w: &WeightFiles) -> Result<&'static str> {
    if w.contains("transformer.wte.weight") {
        Ok("transformer.")
    } else if w.contains("wte.weight") {
        Ok("")
    } else {
        Err(Error::bad_input(
            w.dir().join("model.safetensors"),
            "tensor transformer.wte.weight is missing (not a GPT-2 checkpoint?)",
        ))
    }
}

/// Conv1D stores `[in, out]`; keep the Linear orientation `[out, in]` in memory.
fn conv1d(w: &Ctx, name: &str, inp: usize, out: usize) -> Result<Linear> {
    if let Some(q) = quantized(w, name, out, inp)? {
        let bias = w.f32(&format!("{name}.bias"), &[out])?;
        let mut l = Linear::new_q4(name.to_string(), q, Some(bias));
        l.conv1d = true;
        return Ok(l);
    }
    let stored = w.f32(&format!("{name}.weight"), &[inp, out])?;
    let t = crate::kernels::ops::transpose(&stored, inp, out);
    drop(stored);
    let bias = w.f32(&format!("{name}.bias"), &[out])?;
    let mut l = match w.maybe_quantize(name, &t, out, inp)? {
        Some(q) => Linear::new_q4(name.to_string(), q, Some(bias)),
        None => Linear::new(name.to_string(), t, Some(bias), out, inp),
    };
    l.conv1d = true;
    Ok(l)
}

fn load_gpt2(config: ModelConfig, w: &Ctx) -> Result<Model> {
    let c = &config;
    let (h, f) = (c.hidden, c.intermediate);
    let pre = gpt2_prefix(w)?;
    let embed = w.f32(&format!("{pre}wte.weight"), &[c.vocab, h])?;
    let pos = w.f32(&format!("{pre}wpe.weight"), &[c.max_positions, h])?;
    let mut blocks = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        let p = format!("{pre}h.{i}");
        blocks.push(Block {
            attn_norm: norm(w, &format!("{p}.ln_1"), h, true)?,
            attn: Attention {
                qkv: QkvProj::Fused(conv1d(w, &format!("{p}.attn.c_attn"), h, 3 * h)?),
                o: conv1d(w, &format!("{p}.attn.c_proj"), h, h)?,
                prefixes: Vec::new(),
            },
            mlp_norm: norm(w, &format!("{p}.ln_2"), h, true)?,
            mlp: Mlp::Plain {
                fc: conv1d(w, &format!("{p}.mlp.c_fc"), h, f)?,
                proj: conv1d(w, &format!("{p}.mlp.c_proj"), f, h)?,
            },
            adapters: Vec::new(),
        });
    }
    let final_norm = norm(w, &format!("{pre}ln_f"), h, true)?;
    // GPT2ForSequenceClassification: `transformer.*` plus `score.weight`, no LM head.
    let lm_head = if c.tie_embeddings || c.seq_cls || !w.contains("lm_head.weight") {
        None
    } else {
        Some(linear(w, "lm_head", c.vocab, h, false)?)
    };
    debug_assert!(matches!(c.norm, NormKind::Layer { .. }));
    Ok(Model {
        embed,
        embed_name: format!("{pre}wte"),
        pos_embed: Some(pos),
        blocks,
        final_norm,
        lm_head,
        inv_freq: Vec::new(),
        input_prefixes: Vec::new(),
        head_bf16: None,
        config,
    })
}

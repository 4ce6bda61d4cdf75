//! Building a [`Model`] from a Hugging Face folder.

use super::config::{Arch, ModelConfig, NormKind};
use super::weights::WeightFiles;
use super::*;
use crate::error::{Error, Result};
use std::path::Path;

impl Model {
    /// Load config.json and the safetensors weights of a model folder (weights converted to
    /// f32 for compute; the mapped files are released afterwards).
    pub fn load(dir: &Path) -> Result<Self> {
        let config = ModelConfig::load(dir)?;
        let files = WeightFiles::open(dir)?;
        Self::from_weights(config, &files)
    }

    pub fn from_weights(config: ModelConfig, w: &WeightFiles) -> Result<Self> {
        match config.arch {
            Arch::Gpt2 => load_gpt2(config, w),
            _ => load_llama_like(config, w),
        }
    }
}

fn linear(w: &WeightFiles, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    let weight = w.f32(&format!("{name}.weight"), &[out, inp])?;
    let b = if bias {
        Some(w.f32(&format!("{name}.bias"), &[out])?)
    } else {
        None
    };
    Ok(Linear::new(name.to_string(), weight, b, out, inp))
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

fn load_llama_like(config: ModelConfig, w: &WeightFiles) -> Result<Model> {
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
    let lm_head = if c.tie_embeddings {
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
fn conv1d(w: &WeightFiles, name: &str, inp: usize, out: usize) -> Result<Linear> {
    let stored = w.f32(&format!("{name}.weight"), &[inp, out])?;
    let t = crate::kernels::ops::transpose(&stored, inp, out);
    let bias = w.f32(&format!("{name}.bias"), &[out])?;
    let mut l = Linear::new(name.to_string(), t, Some(bias), out, inp);
    l.conv1d = true;
    Ok(l)
}

fn load_gpt2(config: ModelConfig, w: &WeightFiles) -> Result<Model> {
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
    let lm_head = if c.tie_embeddings || !w.contains("lm_head.weight") {
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
        config,
    })
}

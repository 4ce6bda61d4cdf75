//! config.json of a Hugging Face causal LM, read into one architecture-neutral description.
//!
//! Fields that change the computation and that we do not implement are refused with an error
//! that names the field and what is supported, instead of being silently ignored.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Gpt2,
}

impl Arch {
    pub const SUPPORTED: &'static str =
        "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel (and their \
         ...ForSequenceClassification reward models)";

    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Gpt2 => "GPT2LMHeadModel",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormKind {
    Rms { eps: f32 },
    Layer { eps: f32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// tanh approximation (GPT-2's gelu_new, gelu_pytorch_tanh)
    GeluTanh,
    /// exact erf GELU
    Gelu,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f32,
    },
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: f32,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub theta: f32,
    pub scaling: RopeScaling,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub norm: NormKind,
    pub act: Activation,
    /// None for learned absolute positions (GPT-2).
    pub rope: Option<Rope>,
    pub tie_embeddings: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per layer: Some(window) when that layer attends only to the last `window` keys.
    pub sliding_window: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Stored dtype named by the config ("float32", "bfloat16", ...), if any.
    pub dtype: Option<String>,
    /// A transformers sequence-classification checkpoint (`architectures[0]` is
    /// `LlamaForSequenceClassification`, `MistralForSequenceClassification`,
    /// `Qwen2ForSequenceClassification` or `GPT2ForSequenceClassification`): the same backbone
    /// with a `score` head instead of an LM head. Such a model loads without `lm_head`; its LM
    /// logits are meaningless (see [`crate::model::Model::lm_head`]) and the head is read by
    /// `train::preference::load_reward_model`.
    pub seq_cls: bool,
    /// The file as read, to be written back (with changes) by tools that save models.
    pub raw: Value,
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::bad_input(
                &path,
                "config.json is missing: is this a Hugging Face model folder?",
            ),
            std::io::ErrorKind::InvalidData => Error::bad_input(&path, "not valid UTF-8"),
            _ => Error::io(&path, e),
        })?;
        let raw: Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_input(&path, format!("invalid JSON: {e}")))?;
        Self::from_json(raw).map_err(|msg| Error::bad_input(&path, msg))
    }

    pub fn from_json(raw: Value) -> std::result::Result<Self, String> {
        let r = Reader(&raw);
        let (arch, seq_cls) = detect_arch(&raw)?;
        if arch == Arch::Gpt2 {
            return gpt2_config(&r, raw.clone(), seq_cls);
        }
        let hidden = r.usize("hidden_size")?;
        let heads = r.usize("num_attention_heads")?;
        let kv_heads = r.opt_usize("num_key_value_heads")?.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(format!(
                "num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})"
            ));
        }
        let head_dim = match r.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if hidden % heads != 0 {
                    return Err(format!(
                        "hidden_size {hidden} is not divisible by num_attention_heads {heads}"
                    ));
                }
                hidden / heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(format!(
                "head_dim {head_dim} must be even for rotary embeddings"
            ));
        }
        let layers = r.usize("num_hidden_layers")?;
        let act = activation(r.opt_str("hidden_act")?.unwrap_or("silu"))?;
        let eps = r.opt_f32("rms_norm_eps")?.unwrap_or(1e-6);
        let rope = rope(&raw)?;
        let (qkv_bias, o_bias, mlp_bias) = match arch {
            Arch::Qwen2 => (true, false, false),
            Arch::Mistral => (false, false, false),
            _ => {
                let ab = r.opt_bool("attention_bias")?.unwrap_or(false);
                (ab, ab, r.opt_bool("mlp_bias")?.unwrap_or(false))
            }
        };
        let sliding_window = sliding_windows(&r, arch, layers)?;
        let tie_default = false;
        Ok(Self {
            arch,
            hidden,
            intermediate: r.usize("intermediate_size")?,
            layers,
            heads,
            kv_heads,
            head_dim,
            vocab: r.usize("vocab_size")?,
            max_positions: r.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            norm: NormKind::Rms { eps },
            act,
            rope: Some(rope),
            tie_embeddings: r.opt_bool("tie_word_embeddings")?.unwrap_or(tie_default),
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
            bos_token_id: r.opt_token("bos_token_id")?,
            eos_token_ids: r.token_list("eos_token_id")?,
            pad_token_id: r.opt_token("pad_token_id")?,
            dtype: dtype_name(&r)?,
            seq_cls,
            raw,
        })
    }

    /// Number of parameters the model has (tied embeddings counted once; a
    /// sequence-classification checkpoint has no LM head, its `score` head is not counted).
    pub fn param_count(&self) -> usize {
        let h = self.hidden;
        let (q, kv) = (self.q_dim(), self.kv_dim());
        let attn = h * q
            + 2 * h * kv
            + q * h
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { h } else { 0 };
        let norm_params = match self.norm {
            NormKind::Rms { .. } => h,
            NormKind::Layer { .. } => 2 * h,
        };
        let mlp = match self.arch {
            Arch::Gpt2 => 2 * h * self.intermediate + self.intermediate + h,
            _ => {
                3 * h * self.intermediate
                    + if self.mlp_bias {
                        2 * self.intermediate + h
                    } else {
                        0
                    }
            }
        };
        let per_layer = attn + mlp + 2 * norm_params;
        let pos = if self.arch == Arch::Gpt2 {
            self.max_positions * h
        } else {
            0
        };
        let head = if self.tie_embeddings || self.seq_cls {
            0
        } else {
            self.vocab * h
        };
        self.vocab * h + pos + self.layers * per_layer + norm_params + head
    }
}

/// The architecture, and whether the checkpoint is its sequence-classification variant.
fn detect_arch(raw: &Value) -> std::result::Result<(Arch, bool), String> {
    let archs: Vec<&str> = raw
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("");
    let by_class = |c: &str| match c {
        "LlamaForCausalLM" => Some(Arch::Llama),
        "MistralForCausalLM" => Some(Arch::Mistral),
        "Qwen2ForCausalLM" => Some(Arch::Qwen2),
        "GPT2LMHeadModel" => Some(Arch::Gpt2),
        _ => None,
    };
    let by_seq_cls_class = |c: &str| match c {
        "LlamaForSequenceClassification" => Some(Arch::Llama),
        "MistralForSequenceClassification" => Some(Arch::Mistral),
        "Qwen2ForSequenceClassification" => Some(Arch::Qwen2),
        "GPT2ForSequenceClassification" => Some(Arch::Gpt2),
        _ => None,
    };
    if let Some(first) = archs.first() {
        if let Some(a) = by_seq_cls_class(first) {
            return Ok((a, true));
        }
        return by_class(first).map(|a| (a, false)).ok_or_else(|| {
            format!(
                "unsupported architecture {first}; supported: {}",
                Arch::SUPPORTED
            )
        });
    }
    match model_type {
        "llama" => Ok((Arch::Llama, false)),
        "mistral" => Ok((Arch::Mistral, false)),
        "qwen2" => Ok((Arch::Qwen2, false)),
        "gpt2" => Ok((Arch::Gpt2, false)),
        "" => Err(format!(
            "neither \"architectures\" nor \"model_type\" is set; supported: {}",
            Arch::SUPPORTED
        )),
        other => Err(format!(
            "unsupported model_type {other}; supported: {}",
            Arch::SUPPORTED
        )),
    }
}

fn gpt2_config(r: &Reader, raw: Value, seq_cls: bool) -> std::result::Result<ModelConfig, String> {
    let hidden = r.usize("n_embd")?;
    let heads = r.usize("n_head")?;
    if heads == 0 || hidden % heads != 0 {
        return Err(format!(
            "n_embd {hidden} is not divisible by n_head {heads}"
        ));
    }
    for flag in [
        "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn",
        "add_cross_attention",
    ] {
        if r.opt_bool(flag)?.unwrap_or(false) {
            return Err(format!("{flag}=true is not supported"));
        }
    }
    if !r.opt_bool("scale_attn_weights")?.unwrap_or(true) {
        return Err("scale_attn_weights=false is not supported".into());
    }
    let layers = r.usize("n_layer")?;
    Ok(ModelConfig {
        arch: Arch::Gpt2,
        hidden,
        intermediate: r.opt_usize("n_inner")?.unwrap_or(4 * hidden),
        layers,
        heads,
        kv_heads: heads,
        head_dim: hidden / heads,
        vocab: r.usize("vocab_size")?,
        max_positions: r.usize("n_positions")?,
        norm: NormKind::Layer {
            eps: r.opt_f32("layer_norm_epsilon")?.unwrap_or(1e-5),
        },
        act: activation(r.opt_str("activation_function")?.unwrap_or("gelu_new"))?,
        rope: None,
        tie_embeddings: r.opt_bool("tie_word_embeddings")?.unwrap_or(true),
        qkv_bias: true,
        o_bias: true,
        mlp_bias: true,
        sliding_window: vec![None; layers],
        bos_token_id: r.opt_token("bos_token_id")?,
        eos_token_ids: r.token_list("eos_token_id")?,
        pad_token_id: r.opt_token("pad_token_id")?,
        dtype: dtype_name(r)?,
        seq_cls,
        raw,
    })
}

fn activation(name: &str) -> std::result::Result<Activation, String> {
    match name {
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        "gelu" => Ok(Activation::Gelu),
        other => Err(format!(
            "unsupported activation {other}; supported: silu, gelu, gelu_new, gelu_pytorch_tanh"
        )),
    }
}

/// Rotary settings: transformers ≥ 5 writes `rope_parameters`, older versions `rope_theta`
/// plus `rope_scaling`; both are accepted.
fn rope(raw: &Value) -> std::result::Result<Rope, String> {
    let params = raw.get("rope_parameters").filter(|v| !v.is_null());
    let scaling = raw.get("rope_scaling").filter(|v| !v.is_null());
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .or_else(|| raw.get("rope_theta"))
        .map(|v| v.as_f64().ok_or("rope_theta must be a number"))
        .transpose()?
        .unwrap_or(10000.0) as f32;
    let spec = scaling.or(params);
    let Some(spec) = spec else {
        return Ok(Rope {
            theta,
            scaling: RopeScaling::None,
        });
    };
    let kind = spec
        .get("rope_type")
        .or_else(|| spec.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> std::result::Result<f32, String> {
        spec.get(k)
            .and_then(Value::as_f64)
            .map(|v| v as f32)
            .ok_or_else(|| format!("rope scaling \"{kind}\" needs a numeric \"{k}\""))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => {
            return Err(format!(
                "unsupported rope scaling type {other}; supported: default, linear, llama3"
            ))
        }
    };
    Ok(Rope { theta, scaling })
}

/// Which layers use sliding-window attention. transformers ≥ 5 lists `layer_types`; older
/// configs give `sliding_window` (Mistral) or `use_sliding_window` + `max_window_layers` (Qwen2).
fn sliding_windows(
    r: &Reader,
    arch: Arch,
    layers: usize,
) -> std::result::Result<Vec<Option<usize>>, String> {
    let window = r.opt_usize("sliding_window")?;
    if let Some(types) = r.0.get("layer_types").and_then(Value::as_array) {
        if types.len() != layers {
            return Err(format!(
                "layer_types has {} entries, expected num_hidden_layers = {layers}",
                types.len()
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(None),
                Some("sliding_attention") => window.map(Some).ok_or_else(|| {
                    "layer_types names sliding_attention but sliding_window is not set".to_string()
                }),
                other => Err(format!(
                    "unsupported layer type {other:?}; supported: full_attention, sliding_attention"
                )),
            })
            .collect();
    }
    Ok(match arch {
        Arch::Mistral => vec![window; layers],
        Arch::Qwen2 if r.opt_bool("use_sliding_window")?.unwrap_or(false) => {
            let from = r.opt_usize("max_window_layers")?.unwrap_or(layers);
            (0..layers)
                .map(|l| if l >= from { window } else { None })
                .collect()
        }
        _ => vec![None; layers],
    })
}

fn dtype_name(r: &Reader) -> std::result::Result<Option<String>, String> {
    let d = r.opt_str("torch_dtype")?.or(r.opt_str("dtype")?);
    match d {
        None | Some("float32" | "float16" | "bfloat16" | "auto") => Ok(d.map(String::from)),
        Some(other) => Err(format!(
            "unknown dtype {other}; expected float32, float16 or bfloat16"
        )),
    }
}

struct Reader<'a>(&'a Value);

impl Reader<'_> {
    fn usize(&self, k: &str) -> std::result::Result<usize, String> {
        self.opt_usize(k)?
            .ok_or_else(|| format!("required field \"{k}\" is missing"))
    }
    fn opt_usize(&self, k: &str) -> std::result::Result<Option<usize>, String> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0 && n < (1 << 32))
                .map(|n| Some(n as usize))
                .ok_or_else(|| format!("\"{k}\" must be a positive integer, found {v}")),
        }
    }
    fn opt_f32(&self, k: &str) -> std::result::Result<Option<f32>, String> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|n| Some(n as f32))
                .ok_or_else(|| format!("\"{k}\" must be a number, found {v}")),
        }
    }
    fn opt_bool(&self, k: &str) -> std::result::Result<Option<bool>, String> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| format!("\"{k}\" must be true or false, found {v}")),
        }
    }
    fn opt_str(&self, k: &str) -> std::result::Result<Option<&str>, String> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| format!("\"{k}\" must be a string, found {v}")),
        }
    }
    fn opt_token(&self, k: &str) -> std::result::Result<Option<u32>, String> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => Ok(a.first().and_then(Value::as_u64).map(|n| n as u32)),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as u32))
                .ok_or_else(|| format!("\"{k}\" must be a token id, found {v}")),
        }
    }
    fn token_list(&self, k: &str) -> std::result::Result<Vec<u32>, String> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as u32)
                        .ok_or_else(|| format!("\"{k}\" must list token ids, found {v}"))
                })
                .collect(),
            Some(v) => v
                .as_u64()
                .map(|n| vec![n as u32])
                .ok_or_else(|| format!("\"{k}\" must be a token id, found {v}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_class(class: &str) -> std::result::Result<ModelConfig, String> {
        let mut v = if class.starts_with("GPT2") {
            serde_json::json!({"n_embd": 32, "n_head": 4, "n_layer": 1, "n_positions": 16,
                               "vocab_size": 16})
        } else {
            serde_json::json!({"hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 1, "num_attention_heads": 4,
                               "vocab_size": 16})
        };
        v["architectures"] = serde_json::json!([class]);
        ModelConfig::from_json(v)
    }

    #[test]
    fn sequence_classification_classes_map_to_their_architecture() {
        for (class, arch, seq_cls) in [
            ("LlamaForCausalLM", Arch::Llama, false),
            ("LlamaForSequenceClassification", Arch::Llama, true),
            ("MistralForSequenceClassification", Arch::Mistral, true),
            ("Qwen2ForSequenceClassification", Arch::Qwen2, true),
            ("GPT2LMHeadModel", Arch::Gpt2, false),
            ("GPT2ForSequenceClassification", Arch::Gpt2, true),
        ] {
            let c = with_class(class).unwrap();
            assert_eq!((c.arch, c.seq_cls), (arch, seq_cls), "{class}");
        }
        let e = with_class("BertForSequenceClassification").unwrap_err();
        assert!(
            e.contains("unsupported architecture BertForSequenceClassification"),
            "{e}"
        );
    }
}

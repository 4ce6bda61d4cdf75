//! GGUF → Hugging Face folder (config.json, model.safetensors, tokenizer files).
//!
//! Tensors are streamed one at a time (dequantize, rename, un-permute, encode, write, drop), so
//! peak memory stays about one f32 tensor plus the memory map.

use super::names::{hf_name, unpermute_rows};
use super::reader::{GgufFile, TensorInfo};
use super::tokenizer;
use crate::error::{Error, Result};
use crate::io::atomic::AtomicDir;
use crate::io::safetensors_file::{encode_f32, write_streaming, OutDtype, TensorSpec};
use serde::Serialize;
use serde_json::{json, Map, Value as J};
use std::collections::BTreeMap;
use std::path::Path;

/// Architectures (`general.architecture`) that can be imported.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2"];

/// What an import produced.
#[derive(Clone, Debug, Serialize)]
pub struct ImportSummary {
    pub architecture: String,
    pub tensors: usize,
    pub parameters: u64,
    pub dtype: String,
    pub out: String,
}

/// How to treat a GGUF tensor.
struct Plan<'a> {
    info: &'a TensorInfo,
    hf_name: String,
    shape: Vec<usize>,
    /// Undo llama.cpp's q/k row permutation with this many heads.
    unpermute_heads: Option<usize>,
}

/// Convert `gguf` into an HF model folder at `out`.
pub fn import_gguf(
    gguf: &Path,
    out: &Path,
    dtype: OutDtype,
    progress: bool,
) -> Result<ImportSummary> {
    let g = GgufFile::open(gguf)?;
    let arch = g
        .get_str("general.architecture")?
        .ok_or_else(|| g.err("metadata general.architecture is missing"))?
        .to_owned();
    if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(g.err(format!(
            "architecture {arch:?} is not supported; supported: {}",
            SUPPORTED_ARCHITECTURES.join(", ")
        )));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let n_layers = g.require_u64(&key("block_count"))? as usize;
    let hidden = g.require_u64(&key("embedding_length"))? as usize;
    let ffn = g.require_u64(&key("feed_forward_length"))? as usize;
    let n_heads = g.require_u64(&key("attention.head_count"))? as usize;
    let n_kv = g
        .get_u64(&key("attention.head_count_kv"))?
        .map(|v| v as usize)
        .unwrap_or(n_heads);
    if n_heads == 0 || n_kv == 0 || !n_heads.is_multiple_of(n_kv) {
        return Err(g.err(format!(
            "{n_heads} attention heads cannot be shared by {n_kv} key/value heads"
        )));
    }
    let head_dim = match g.get_u64(&key("attention.key_length"))? {
        Some(k) => k as usize,
        None => hidden / n_heads,
    };
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(g.err(format!(
            "head dimension {head_dim} is not a positive even number"
        )));
    }
    let eps = g
        .get_f64(&key("attention.layer_norm_rms_epsilon"))?
        .unwrap_or(1e-5);
    let rope_theta = g.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0);
    let ctx = g.get_u64(&key("context_length"))?;

    let tok = tokenizer::build(&g, ctx)?;

    // Plan every tensor before writing anything.
    let mut plans = vec![];
    for t in &g.tensors {
        if t.name == "rope_freqs.weight" {
            return Err(g.err(
                "tensor rope_freqs.weight (Llama 3 style rope scaling) is not supported yet",
            ));
        }
        let hf = hf_name(&t.name).ok_or_else(|| {
            g.err(format!(
                "tensor {} has no Hugging Face {arch} counterpart",
                t.name
            ))
        })?;
        let shape = t.shape();
        let unpermute_heads = if arch == "llama" {
            if t.name.ends_with(".attn_q.weight") || t.name.ends_with(".attn_q.bias") {
                Some(n_heads)
            } else if t.name.ends_with(".attn_k.weight") || t.name.ends_with(".attn_k.bias") {
                Some(n_kv)
            } else {
                None
            }
        } else {
            None
        };
        if let Some(h) = unpermute_heads {
            // checked: head counts and key_length come from the file, and their product could
            // overflow (found by fuzz/gguf_reader)
            if h.checked_mul(head_dim) != Some(shape[0]) {
                return Err(g.err(format!(
                    "tensor {} has {} rows, expected {h} heads × {head_dim}",
                    t.name, shape[0]
                )));
            }
        }
        plans.push(Plan {
            info: t,
            hf_name: hf,
            shape,
            unpermute_heads,
        });
    }
    let embed = plans
        .iter()
        .find(|p| p.hf_name == "model.embed_tokens.weight")
        .ok_or_else(|| g.err("tensor token_embd.weight is missing"))?;
    if embed.shape.len() != 2 || embed.shape[1] != hidden {
        return Err(g.err(format!(
            "tensor token_embd.weight has shape {:?}, expected [vocab, {hidden}]",
            embed.shape
        )));
    }
    let vocab_size = g
        .get_u64(&key("vocab_size"))?
        .map(|v| v as usize)
        .unwrap_or(embed.shape[0]);
    let tied = !plans.iter().any(|p| p.hf_name == "lm_head.weight");
    let has_bias = plans
        .iter()
        .any(|p| p.hf_name.ends_with("self_attn.q_proj.bias"));
    for l in 0..n_layers {
        for part in [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
            "attn_norm",
            "ffn_norm",
        ] {
            let n = format!("blk.{l}.{part}.weight");
            if g.tensor(&n).is_none() {
                return Err(g.err(format!(
                    "tensor {n} is missing ({n_layers} layers declared)"
                )));
            }
        }
    }
    // Everything is known: start the output.
    let dir = AtomicDir::create(out, &[gguf])?;
    let parameters: u64 = plans.iter().map(|p| p.info.n_elements() as u64).sum();

    let mut config = Map::new();
    let (class, model_type) = match arch.as_str() {
        "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
        _ => ("LlamaForCausalLM", "llama"),
    };
    config.insert("architectures".into(), json!([class]));
    config.insert("model_type".into(), json!(model_type));
    config.insert("hidden_size".into(), json!(hidden));
    config.insert("intermediate_size".into(), json!(ffn));
    config.insert("num_hidden_layers".into(), json!(n_layers));
    config.insert("num_attention_heads".into(), json!(n_heads));
    config.insert("num_key_value_heads".into(), json!(n_kv));
    config.insert("head_dim".into(), json!(head_dim));
    config.insert("hidden_act".into(), json!("silu"));
    config.insert("rms_norm_eps".into(), json!(eps));
    config.insert("rope_theta".into(), json!(rope_theta));
    if let Some(c) = ctx {
        config.insert("max_position_embeddings".into(), json!(c));
    }
    config.insert("vocab_size".into(), json!(vocab_size));
    config.insert("tie_word_embeddings".into(), json!(tied));
    if arch == "llama" {
        config.insert("attention_bias".into(), json!(has_bias));
        config.insert("mlp_bias".into(), json!(false));
    } else {
        config.insert("use_sliding_window".into(), json!(false));
    }
    config.insert("attention_dropout".into(), json!(0.0));
    config.insert("initializer_range".into(), json!(0.02));
    config.insert("bos_token_id".into(), json!(tok.bos_token_id));
    config.insert("eos_token_id".into(), json!(tok.eos_token_id));
    if let Some(p) = tok.pad_token_id {
        config.insert("pad_token_id".into(), json!(p));
    }
    config.insert("rope_scaling".into(), rope_scaling(&g, &arch)?);
    config.insert("torch_dtype".into(), json!(dtype.torch_name()));
    config.insert("use_cache".into(), json!(true));

    let pretty = |v: &J| serde_json::to_string_pretty(v).expect("json") + "\n";
    dir.write("config.json", pretty(&J::Object(config)).as_bytes())?;
    dir.write("tokenizer.json", tok.tokenizer_json.as_bytes())?;
    dir.write(
        "tokenizer_config.json",
        pretty(&tok.tokenizer_config).as_bytes(),
    )?;
    dir.write(
        "generation_config.json",
        pretty(&tok.generation_config).as_bytes(),
    )?;

    let specs: Vec<TensorSpec> = plans
        .iter()
        .map(|p| TensorSpec {
            name: p.hf_name.clone(),
            dtype: dtype.st(),
            shape: p.shape.clone(),
        })
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_owned(), "pt".to_owned());
    let bar = if progress && std::env::var_os("PEFTKIT_NO_PROGRESS").is_none() {
        let b = indicatif::ProgressBar::new(plans.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} tensors ({elapsed})",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        b.set_message("importing");
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    write_streaming(&dir.join("model.safetensors"), &specs, &meta, |i| {
        let p = &plans[i];
        let mut x = g.dequantize(p.info)?;
        if let Some(h) = p.unpermute_heads {
            let rows = p.shape[0];
            let cols = x.len() / rows;
            x = unpermute_rows(&x, rows, cols, h);
        }
        if let Some(bad) = x.iter().position(|v| !v.is_finite()) {
            return Err(g.err(format!(
                "tensor {}: value {bad} is not finite after dequantization",
                p.info.name
            )));
        }
        bar.inc(1);
        Ok(encode_f32(&x, dtype))
    })
    .map_err(|e| match e {
        // The temporary path inside the output is an implementation detail: name the output.
        Error::Io { source, .. } => Error::io(out.join("model.safetensors"), source),
        other => other,
    })?;
    bar.finish_and_clear();
    dir.commit()?;
    Ok(ImportSummary {
        architecture: arch,
        tensors: plans.len(),
        parameters,
        dtype: dtype.torch_name().to_owned(),
        out: out.display().to_string(),
    })
}

fn rope_scaling(g: &GgufFile, arch: &str) -> Result<J> {
    let ty = g.get_str(&format!("{arch}.rope.scaling.type"))?;
    let factor = g
        .get_f64(&format!("{arch}.rope.scaling.factor"))?
        .or(g.get_f64(&format!("{arch}.rope.scale_linear"))?);
    let orig = g.get_u64(&format!("{arch}.rope.scaling.original_context_length"))?;
    Ok(match (ty, factor) {
        (None | Some("none"), None) | (Some("none"), _) => J::Null,
        (Some("yarn"), Some(f)) => {
            let mut m = json!({"rope_type": "yarn", "factor": f});
            if let Some(o) = orig {
                m["original_max_position_embeddings"] = json!(o);
            }
            m
        }
        (Some("linear") | None, Some(f)) => json!({"rope_type": "linear", "factor": f}),
        (Some(t), _) => {
            return Err(g.err(format!(
                "rope scaling type {t:?} is not supported (supported: linear, yarn)"
            )))
        }
    })
}

//! A Hugging Face model folder (Llama, Mistral, Qwen2, GPT-2; plain or 4-bit) → one GGUF
//! file, the file llama.cpp's convert_hf_to_gguf.py writes for it.
//!
//! Tensors are streamed one at a time (read, decode a 4-bit weight, permute, encode, write),
//! so peak memory is a few copies of the largest tensor plus the tokenizer, whatever the
//! model's size.

use super::export::{file_type_of, ExportSummary, ExportType, GgufArch};
use super::export_vocab::add_vocab;
use super::names::permute_rows;
use super::naming::add_naming;
use super::reader::GgmlType;
use super::writer::{encode, GgufWriter, TensorEntry};
use crate::error::{Error, Result};
use crate::io::atomic::refuse_overwriting_inputs;
use crate::io::model_folder::ModelFolder;
use crate::io::safetensors_file::{to_f32, TensorRef};
use crate::model::config::{Arch, ModelConfig, NormKind, RopeScaling};
use crate::progress::Progress;
use crate::quant::checkpoint::{four_bit_weights, read_quantized};
use serde_json::Value as J;
use std::collections::HashSet;
use std::path::Path;

/// One output tensor and where its values come from.
struct Planned {
    entry: TensorEntry,
    source: Source,
    /// Permute rows for llama.cpp's RoPE with this many heads.
    permute_heads: Option<usize>,
    /// A GPT-2 Conv1D weight, stored `[in, out]`: written transposed.
    transpose: bool,
}

enum Source {
    /// A tensor of the folder (a 4-bit weight is decoded).
    Hf(String),
    /// llama3 RoPE's per-frequency factors (`rope_freqs.weight`).
    RopeFactors(Vec<f32>),
}

/// Write the model folder `model` to `out` as a GGUF of type `ty`. `pre` names llama.cpp's
/// pre-tokenizer where its hash table does not know the tokenizer.
pub fn export_model(
    model: &Path,
    out: &Path,
    ty: ExportType,
    pre: Option<&str>,
    show_progress: bool,
) -> Result<ExportSummary> {
    refuse_overwriting_inputs(out, &[model])?;
    let cfg = ModelConfig::load(model)?;
    let arch = GgufArch::of(&cfg);
    let cfg_path = model.join("config.json");
    if cfg.seq_cls {
        return Err(Error::bad_input(
            &cfg_path,
            "a sequence-classification model (score head): llama.cpp's converter writes causal LMs",
        ));
    }
    let folder = ModelFolder::open(model)?;
    let raw = &cfg.raw;

    // Tensors: per safetensors file (sorted by file name), names sorted, as the converter.
    let (quantized, components) = four_bit_weights(&folder.names);
    let mut names: Vec<(String, String)> = folder
        .names
        .iter()
        .filter(|n| !components.contains(*n))
        .map(|n| (folder.path_of(n).display().to_string(), n.clone()))
        .collect();
    names.sort();
    let mut plans: Vec<Planned> = Vec::new();
    if let Some(factors) = llama3_rope_factors(&cfg) {
        plans.push(Planned {
            entry: TensorEntry::new("rope_freqs.weight", &[factors.len()], GgmlType::F32),
            source: Source::RopeFactors(factors),
            permute_heads: None,
            transpose: false,
        });
    }
    for (_, name) in &names {
        let Some(gname) = arch.tensor_name(name) else {
            // Buffers, not weights (older checkpoints saved them).
            if name.ends_with(".rotary_emb.inv_freq")
                || name.ends_with(".attn.bias")
                || name.ends_with(".attn.masked_bias")
            {
                continue;
            }
            return Err(Error::bad_input(
                folder.path_of(name),
                format!("tensor {name} has no llama.cpp counterpart"),
            ));
        };
        let mut shape = if quantized.contains(name) {
            read_quantized(&folder.weights, name)?
                .expect("4-bit weight")
                .state
                .shape
                .clone()
        } else {
            folder.info(name).1
        };
        if arch.transposed(name) {
            shape.reverse();
        }
        // F32 whatever the type: norms, biases, and (the converter's list) position embeddings.
        let keep_f32 = gname.ends_with("_norm.weight")
            || !gname.ends_with(".weight")
            || gname == "position_embd.weight";
        let module = name.rsplit_once('.').map(|(m, _)| m).unwrap_or(name);
        let permute_heads = arch.permute_heads(&cfg, module);
        let out_ty = ty.type_for(&shape, keep_f32);
        plans.push(Planned {
            entry: TensorEntry::new(gname, &shape, out_ty),
            source: Source::Hf(name.clone()),
            permute_heads,
            transpose: arch.transposed(name),
        });
    }

    let mut w = GgufWriter::default();
    w.add_str("general.architecture", arch.name());
    w.add_str("general.type", "model");
    let params: usize = plans.iter().map(|p| p.entry.n_elements()).sum();
    add_naming(&mut w, model, Some(raw), params as i64);
    add_hparams(&mut w, arch, &cfg, raw, ty)?;
    w.add_u32("general.quantization_version", 2);
    add_vocab(&mut w, model, arch, cfg.vocab, pre)?;
    w.tensors = plans.iter().map(|p| p.entry.clone()).collect();

    let bar = Progress::new(!show_progress).bar(plans.len() as u64, "tensors");
    let bytes = w.write_file(out, |i, t| {
        let p = &plans[i];
        let encoded = match &p.source {
            Source::RopeFactors(v) => encode(v, t.ty),
            Source::Hf(name) => {
                let values = read_values(&folder, &quantized, name)?;
                let shape: Vec<usize> = t.ne.iter().rev().map(|&d| d as usize).collect();
                let values = if p.transpose {
                    // stored [in, out] = [shape[1], shape[0]]
                    crate::kernels::ops::transpose(&values, shape[1], shape[0])
                } else {
                    values
                };
                let values = match p.permute_heads {
                    Some(h) => {
                        let cols = values.len() / shape[0];
                        permute_rows(&values, shape[0], cols, h)
                    }
                    None => values,
                };
                encode(&values, t.ty)
            }
        };
        bar.inc(1);
        Ok(encoded)
    })?;
    bar.finish_and_clear();
    Ok(ExportSummary {
        kind: "model".into(),
        architecture: arch.name().into(),
        tensors: plans.len(),
        bytes,
        out_type: ty.name().into(),
        folded_scales: 0,
        out: out.display().to_string(),
    })
}

/// A tensor's values in f32 (a 4-bit weight decoded).
fn read_values(folder: &ModelFolder, quantized: &HashSet<String>, name: &str) -> Result<Vec<f32>> {
    if quantized.contains(name) {
        let q = read_quantized(&folder.weights, name)?.expect("4-bit weight");
        return Ok(q.dequantize());
    }
    // A positioned read, not the memory map: the page cache, not our RSS, holds the file.
    let (dtype, shape, _) = folder.info(name);
    let bytes = folder.read(name)?;
    let t = TensorRef {
        dtype,
        shape: &shape,
        bytes: &bytes,
    };
    to_f32(name, &t).map_err(|m| Error::bad_input(folder.path_of(name), m))
}

/// The hyperparameters in the converter's order. It reads config.json through transformers'
/// `AutoConfig`, so a key the file lacks still has the config class's default there (and a
/// Llama or Mistral config always has `head_dim`); ModelConfig's values, with the classes'
/// defaults where they differ, stand in for that.
fn add_hparams(
    w: &mut GgufWriter,
    arch: GgufArch,
    cfg: &ModelConfig,
    raw: &J,
    ty: ExportType,
) -> Result<()> {
    let a = arch.name();
    if arch == GgufArch::Gpt2 {
        // GPT2Model.set_gguf_parameters: n_ctx (transformers 5 configs only have
        // n_positions, on which the converter fails), 4·n_embd as the MLP width.
        let ctx = raw
            .get("n_ctx")
            .and_then(J::as_u64)
            .map(|v| v as usize)
            .unwrap_or(cfg.max_positions);
        w.add_u32("gpt2.block_count", cfg.layers as u32);
        w.add_u32("gpt2.context_length", ctx as u32);
        w.add_u32("gpt2.embedding_length", cfg.hidden as u32);
        w.add_u32("gpt2.feed_forward_length", 4 * cfg.hidden as u32);
        w.add_u32("gpt2.attention.head_count", cfg.heads as u32);
        if let NormKind::Layer { eps } = cfg.norm {
            w.add_f32("gpt2.attention.layer_norm_epsilon", eps);
        }
        w.add_u32("general.file_type", file_type_of(ty));
        return Ok(());
    }
    let context = match raw.get("max_position_embeddings").and_then(J::as_u64) {
        Some(n) => n as usize,
        None => match cfg.arch {
            Arch::Mistral => 4096 * 32,
            Arch::Qwen2 => 32768,
            _ => 2048,
        },
    };
    w.add_u32(&format!("{a}.block_count"), cfg.layers as u32);
    w.add_u32(&format!("{a}.context_length"), context as u32);
    w.add_u32(&format!("{a}.embedding_length"), cfg.hidden as u32);
    w.add_u32(&format!("{a}.feed_forward_length"), cfg.intermediate as u32);
    w.add_u32(&format!("{a}.attention.head_count"), cfg.heads as u32);
    w.add_u32(&format!("{a}.attention.head_count_kv"), cfg.kv_heads as u32);
    let rope = cfg.rope.as_ref();
    if let Some(RopeScaling::Linear { factor }) = rope.map(|r| &r.scaling) {
        w.add_str(&format!("{a}.rope.scaling.type"), "linear");
        w.add_f32(&format!("{a}.rope.scaling.factor"), *factor);
    }
    if let Some(r) = rope {
        w.add_f32(&format!("{a}.rope.freq_base"), r.theta);
    }
    if let NormKind::Rms { eps } = cfg.norm {
        w.add_f32(&format!("{a}.attention.layer_norm_rms_epsilon"), eps);
    }
    // Qwen2's config class has no head_dim: there it is only what the file says.
    let head_dim_key = match arch {
        GgufArch::Llama => Some(cfg.head_dim),
        GgufArch::Qwen2 | GgufArch::Gpt2 => {
            raw.get("head_dim").and_then(J::as_u64).map(|v| v as usize)
        }
    };
    if let Some(hd) = head_dim_key {
        w.add_u32(&format!("{a}.attention.key_length"), hd as u32);
        w.add_u32(&format!("{a}.attention.value_length"), hd as u32);
    }
    w.add_u32("general.file_type", file_type_of(ty));
    if arch == GgufArch::Llama {
        w.add_u32("llama.vocab_size", cfg.vocab as u32);
        w.add_u32("llama.rope.dimension_count", cfg.head_dim as u32);
    }
    Ok(())
}

/// llama3 RoPE's factors, as LlamaModel.generate_extra_tensors computes them (in f32).
fn llama3_rope_factors(cfg: &ModelConfig) -> Option<Vec<f32>> {
    let rope = cfg.rope.as_ref()?;
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings: old,
    } = rope.scaling
    else {
        return None;
    };
    let dim = cfg.head_dim;
    let low_wavelen = old / low_freq_factor;
    let high_wavelen = old / high_freq_factor;
    Some(
        (0..dim)
            .step_by(2)
            .map(|i| {
                let freq = 1.0 / rope.theta.powf(i as f32 / dim as f32);
                let wavelen = 2.0 * std::f32::consts::PI / freq;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect(),
    )
}

//! PEFT LoRA adapter → llama.cpp LoRA GGUF (`llama-cli --lora FILE`), the file
//! llama.cpp's `convert_lora_to_gguf.py` writes, without Python.
//!
//! llama.cpp scales every pair by `alpha / r`, with one alpha per file and r read from the
//! tensor's shape. Where PEFT's scale differs (rsLoRA's `alpha / √r`, `alpha_pattern`), the
//! difference is folded into `lora_b`, so the adapter computes what it computed in PEFT;
//! convert_lora_to_gguf.py ignores both and writes an adapter that is silently off. For GPT-2
//! it also swaps and transposes A and B (the Conv1D transpose of the weights applied to the
//! pair), which llama.cpp refuses; here A and B stay as they are.

use super::export::{ExportSummary, ExportType, GgufArch};
use super::names::permute_rows;
use super::naming::add_naming;
use super::writer::{encode, GgufWriter, TensorEntry};
use crate::error::{Error, Result};
use crate::io::atomic::refuse_overwriting_inputs;
use crate::merge::adapter_dir::{AdapterDir, LoraModule, PeftKind};
use crate::model::config::{Arch, ModelConfig};
use std::path::Path;

/// What one output tensor holds.
struct Out {
    entry: TensorEntry,
    values: Vec<f32>,
}

/// Write the LoRA adapter `adapter` (trained on the model folder `model`) to `out` as a
/// llama.cpp LoRA GGUF.
pub fn export_lora(
    adapter: &Path,
    model: &Path,
    out: &Path,
    ty: ExportType,
) -> Result<ExportSummary> {
    refuse_overwriting_inputs(out, &[adapter, model])?;
    let cfg = ModelConfig::load(model)?;
    let arch = GgufArch::of(&cfg);
    let dir = AdapterDir::open(adapter)?;
    let cfg_path = dir.config_path();
    match &dir.kind {
        PeftKind::Lora => {}
        other => {
            return Err(Error::bad_input(
                &cfg_path,
                format!(
                    "peft_type {}: llama.cpp loads only LoRA adapters; merge it into the base (adapter-merge) and convert the merged model (llama.cpp's convert_hf_to_gguf.py)",
                    other.name()
                ),
            ))
        }
    }
    let lcfg = dir.lora_config()?;
    if lcfg.dora {
        return Err(Error::bad_input(
            &cfg_path,
            "a DoRA adapter (use_dora): llama.cpp's LoRA files have no magnitude vectors; merge it into the base (adapter-merge) and convert the merged model (llama.cpp's convert_hf_to_gguf.py)",
        ));
    }
    let modules = dir.lora_modules()?;
    if modules.is_empty() {
        return Err(Error::bad_input(
            dir.weights_path(),
            "no lora_A/lora_B tensors in this adapter",
        ));
    }
    // llama.cpp's scale is file_alpha / r. The file keeps the config's alpha (so a plain
    // LoRA is byte-identical with the converter's); a module whose PEFT scale differs (rsLoRA,
    // alpha_pattern) gets the ratio folded into its lora_b.
    let file_alpha = lcfg.alpha;
    let mut folded = 0usize;
    let mut outs: Vec<Out> = Vec::new();
    for m in &modules {
        let target = format!("{}.weight", m.path);
        let bad = |msg: String| Error::bad_input(dir.weights_path(), msg);
        if m.embedding {
            return Err(bad(format!(
                "{}: LoRA on an embedding is not exported (llama.cpp reads it transposed and no reference converter checks it); merge the adapter instead",
                m.path
            )));
        }
        if m.bias.is_some() {
            return Err(bad(format!(
                "{}.lora_B.bias (lora_bias): llama.cpp's LoRA files have no bias; merge the adapter instead",
                m.path
            )));
        }
        let Some(name) = arch.tensor_name(&target) else {
            return Err(bad(format!(
                "{}: no llama.cpp tensor corresponds to this module (llama.cpp takes LoRA on the attention and MLP projections)",
                m.path
            )));
        };
        if let Some(want) = expected_shape(&cfg, &m.path) {
            if want != (m.out_features, m.in_features) {
                return Err(bad(format!(
                    "{}: lora_B·lora_A is [{}, {}] but the base model {} has [{}, {}] there: adapter for another base model?",
                    m.path, m.out_features, m.in_features, model.display(), want.0, want.1
                )));
            }
        } else {
            return Err(bad(format!(
                "{}: the base model {} has no such module (it has {} layers): adapter for another base model?",
                m.path,
                model.display(),
                cfg.layers
            )));
        }
        let llama_scale = if file_alpha == 0.0 {
            1.0
        } else {
            file_alpha / m.rank as f32
        };
        let mut b = m.b.clone();
        if m.scale != llama_scale {
            let k = m.scale / llama_scale;
            b.iter_mut().for_each(|v| *v *= k);
            folded += 1;
        }
        if let Some(heads) = arch.permute_heads(&cfg, &m.path) {
            b = permute_rows(&b, m.out_features, m.rank, heads);
        }
        push_pair(&mut outs, &name, m, b, ty);
    }
    // modules_to_save copies: llama.cpp's loader takes full norm tensors, nothing else.
    let replacements = dir.replacement_tensors();
    for (key, base) in &replacements {
        let Some(name) = arch
            .tensor_name(base)
            .filter(|n| n.ends_with("_norm.weight"))
        else {
            return Err(Error::bad_input(
                dir.weights_path(),
                format!(
                    "{key}: a full copy of {base} (modules_to_save, a trained bias or new tokens); llama.cpp's LoRA files take only norms; merge the adapter (adapter-merge) and convert the merged model"
                ),
            ));
        };
        let t = dir.file.require(key)?;
        let values = crate::io::safetensors_file::to_f32(key, &t)
            .map_err(|m| Error::bad_input(dir.weights_path(), m))?;
        let shape = t.shape.to_vec();
        outs.push(Out {
            entry: TensorEntry::new(name, &shape, ty.type_for(&shape, true)),
            values,
        });
    }

    let mut w = GgufWriter::default();
    // convert_lora_to_gguf.py's keys, in its order (no general.file_type: its LoRA model
    // class replaces the step that writes it).
    w.add_str("general.architecture", arch.name());
    w.add_str("general.type", "adapter");
    w.add_str("adapter.type", "lora");
    // gguf-py counts a LoRA file's parameters as ΔW's (out × in per pair), negated.
    let total: usize = modules
        .iter()
        .map(|m| m.out_features * m.in_features)
        .chain(
            outs.iter()
                .skip(2 * modules.len())
                .map(|o| o.entry.n_elements()),
        )
        .sum();
    add_naming(&mut w, adapter, None, -(total as i64));
    w.add_f32("adapter.lora.alpha", file_alpha);
    w.add_u32("general.quantization_version", 2);
    w.tensors = outs.iter().map(|o| o.entry.clone()).collect();
    let bytes = w.write_file(out, |i, t| Ok(encode(&outs[i].values, t.ty)))?;
    Ok(ExportSummary {
        kind: "lora".into(),
        architecture: arch.name().into(),
        tensors: outs.len(),
        bytes,
        out_type: ty.name().into(),
        folded_scales: folded,
        out: out.display().to_string(),
    })
}

/// `[out, in]` of a llama-family linear layer `model.layers.N.<module>`, from the config; None
/// for a layer the model does not have.
fn expected_shape(cfg: &ModelConfig, path: &str) -> Option<(usize, usize)> {
    if cfg.arch == Arch::Gpt2 {
        let rest = path.strip_prefix("transformer.").unwrap_or(path);
        let (layer, module) = rest.strip_prefix("h.")?.split_once('.')?;
        if layer.parse::<usize>().ok()? >= cfg.layers {
            return None;
        }
        let (h, ff) = (cfg.hidden, cfg.intermediate);
        return Some(match module {
            "attn.c_attn" => (3 * h, h),
            "attn.c_proj" => (h, h),
            "mlp.c_fc" => (ff, h),
            "mlp.c_proj" => (h, ff),
            _ => return None,
        });
    }
    let rest = path.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    if layer.parse::<usize>().ok()? >= cfg.layers {
        return None;
    }
    let (h, q, kv, ff) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate);
    Some(match module {
        "self_attn.q_proj" => (q, h),
        "self_attn.k_proj" | "self_attn.v_proj" => (kv, h),
        "self_attn.o_proj" => (h, q),
        "mlp.gate_proj" | "mlp.up_proj" => (ff, h),
        "mlp.down_proj" => (h, ff),
        _ => return None,
    })
}

/// `name.lora_a` (A `[r, in]`) and `name.lora_b` (B `[out, r]`), in convert_lora_to_gguf's
/// order.
fn push_pair(outs: &mut Vec<Out>, name: &str, m: &LoraModule, b: Vec<f32>, ty: ExportType) {
    let a_shape = [m.rank, m.in_features];
    let b_shape = [m.out_features, m.rank];
    outs.push(Out {
        entry: TensorEntry::new(
            format!("{name}.lora_a"),
            &a_shape,
            ty.type_for(&a_shape, false),
        ),
        values: m.a.clone(),
    });
    outs.push(Out {
        entry: TensorEntry::new(
            format!("{name}.lora_b"),
            &b_shape,
            ty.type_for(&b_shape, false),
        ),
        values: b,
    });
}

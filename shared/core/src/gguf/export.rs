//! What GGUF exports need besides the writer: the output types and their per-tensor rules,
//! the architectures llama.cpp knows ours by, `general.name`, and the summary a tool prints.

use super::reader::GgmlType;
use super::writer::{q8_0_fits, GgufWriter};
use crate::error::{Error, Result};
use crate::model::config::{Arch, ModelConfig};
use serde::Serialize;
use std::path::Path;

/// `--type`: what the tensors are stored as (llama.cpp's converters' `--outtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportType {
    F32,
    F16,
    Bf16,
    Q8_0,
}

impl ExportType {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::Bf16,
            "q8_0" => Self::Q8_0,
            other => {
                return Err(Error::usage(format!(
                    "--type {other:?}: expected f32, f16, bf16 or q8_0"
                )))
            }
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
        }
    }

    /// The ggml type of one tensor of row-major `shape`, by llama.cpp's converter's rules:
    /// vectors and norms stay F32; Q8_0 needs rows of whole 32-value blocks and falls back to
    /// F16 otherwise.
    pub fn type_for(self, shape: &[usize], is_norm: bool) -> GgmlType {
        if shape.len() <= 1 || is_norm {
            return GgmlType::F32;
        }
        match self {
            Self::F32 => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::Bf16 => GgmlType::BF16,
            Self::Q8_0 => {
                if q8_0_fits(*shape.last().expect("2-D")) {
                    GgmlType::Q8_0
                } else {
                    GgmlType::F16
                }
            }
        }
    }
}

/// `general.file_type` (llama.cpp's `LlamaFileType`).
pub fn file_type_of(ty: ExportType) -> u32 {
    match ty {
        ExportType::F32 => 0,
        ExportType::F16 => 1,
        ExportType::Q8_0 => 7,
        ExportType::Bf16 => 32,
    }
}

/// llama.cpp's architecture for one of ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufArch {
    /// Llama and Mistral (llama.cpp runs Mistral as `llama`)
    Llama,
    Qwen2,
}

impl GgufArch {
    pub fn of(cfg: &ModelConfig, model: &Path) -> Result<Self> {
        match cfg.arch {
            Arch::Llama | Arch::Mistral => Ok(Self::Llama),
            Arch::Qwen2 => Ok(Self::Qwen2),
            Arch::Gpt2 => Err(Error::bad_input(
                model.join("config.json"),
                "GPT-2 models are not exported to GGUF (supported: Llama, Mistral, Qwen2)",
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }
    /// llama.cpp permutes the rows of the `llama` architecture's q and k projections (and
    /// of their LoRA B) for its RoPE: by the query heads for q, the key/value heads for k.
    pub fn permute_heads(self, cfg: &ModelConfig, module: &str) -> Option<usize> {
        if self != Self::Llama {
            return None;
        }
        if module.ends_with("q_proj") {
            Some(cfg.heads)
        } else if module.ends_with("k_proj") {
            Some(cfg.kv_heads)
        } else {
            None
        }
    }
}

/// `general.name` as llama.cpp's converters derive it from a folder without a model card:
/// the folder's name through gguf-py's `Metadata.id_to_title` (`llama_gqa_lora` →
/// `Llama_Gqa_Lora`). Their other naming guesses (basename, size label, fine-tune, version)
/// are not made: llama.cpp only shows them.
pub fn add_general_name(w: &mut GgufWriter, src: &Path) {
    let folder = src
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    w.add_str("general.name", &id_to_title(&folder));
}

/// gguf-py's `Metadata.id_to_title`: '-' becomes a space, and every all-lowercase word that
/// is not a version (`v1.2`) or starts with a digit is title-cased the way Python's
/// `str.title` does it.
pub fn id_to_title(id: &str) -> String {
    let title = |w: &str| {
        let mut out = String::new();
        let mut prev_cased = false;
        for c in w.chars() {
            let cased = c.is_lowercase() || c.is_uppercase();
            if cased && prev_cased {
                out.extend(c.to_lowercase());
            } else if cased {
                out.extend(c.to_uppercase());
            } else {
                out.push(c);
            }
            prev_cased = cased;
        }
        out
    };
    let is_lower =
        |w: &str| w.chars().any(char::is_lowercase) && !w.chars().any(char::is_uppercase);
    let is_version = |w: &str| {
        w.starts_with(|c: char| c.is_ascii_digit())
            || w.strip_prefix('v').is_some_and(|v| {
                !v.is_empty()
                    && v.split('.')
                        .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
            })
    };
    id.trim()
        .replace('-', " ")
        .split_whitespace()
        .map(|w| {
            if is_lower(w) && !is_version(w) {
                title(w)
            } else {
                w.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What an export wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ExportSummary {
    /// "model" or "lora"
    pub kind: String,
    pub architecture: String,
    pub tensors: usize,
    pub bytes: u64,
    pub out_type: String,
    /// LoRA modules whose scale was folded into lora_b (rsLoRA, alpha_pattern).
    pub folded_scales: usize,
    pub out: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_like_gguf_py() {
        // Expected values printed by gguf-py's Metadata.id_to_title.
        assert_eq!(id_to_title("llama_gqa_lora"), "Llama_Gqa_Lora");
        assert_eq!(
            id_to_title("SmolLM2-135M-Instruct"),
            "SmolLM2 135M Instruct"
        );
        assert_eq!(id_to_title("smollm2-nf4"), "Smollm2 Nf4");
        assert_eq!(id_to_title("my-model-v1.2"), "My Model v1.2");
        assert_eq!(id_to_title("qwen2.5-7b"), "Qwen2.5 7b");
    }
}

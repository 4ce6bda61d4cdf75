//! What GGUF exports need besides the writer: the output types and their per-tensor rules,
//! the architectures llama.cpp knows ours by, and the summary a tool prints.

use super::reader::GgmlType;
use super::writer::q8_0_fits;
use crate::error::{Error, Result};
use crate::model::config::{Arch, ModelConfig};
use serde::Serialize;

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
    /// vectors and what the caller says must stay F32 (norms, biases...) are F32; Q8_0 needs
    /// rows of whole 32-value blocks and falls back to F16 otherwise.
    pub fn type_for(self, shape: &[usize], keep_f32: bool) -> GgmlType {
        if shape.len() <= 1 || keep_f32 {
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
    Gpt2,
}

impl GgufArch {
    pub fn of(cfg: &ModelConfig) -> Self {
        match cfg.arch {
            Arch::Llama | Arch::Mistral => Self::Llama,
            Arch::Qwen2 => Self::Qwen2,
            Arch::Gpt2 => Self::Gpt2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gpt2 => "gpt2",
        }
    }
    /// The GGUF name of an HF tensor of this architecture.
    pub fn tensor_name(self, hf: &str) -> Option<String> {
        match self {
            Self::Gpt2 => super::names::gpt2_gguf_name(hf),
            _ => super::names::gguf_name(hf),
        }
    }
    /// GPT-2's Conv1D weights are stored `[in, out]`; llama.cpp wants them as a Linear's.
    pub fn transposed(self, hf: &str) -> bool {
        self == Self::Gpt2
            && [".c_attn.weight", ".c_proj.weight", ".c_fc.weight"]
                .iter()
                .any(|s| hf.ends_with(s))
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

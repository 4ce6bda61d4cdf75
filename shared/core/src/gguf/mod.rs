//! GGUF reading, dequantization and import into HF folders; models and LoRA adapters
//! written as GGUF.
//!
//! - [`reader`]: parse and validate a GGUF v2/v3 file (memory-mapped).
//! - [`dequant`]: ggml block formats → f32, bit-exact with ggml's reference.
//! - [`tokenizer`]: `tokenizer.ggml.*` metadata → tokenizer.json and friends.
//! - [`import`]: the whole GGUF → HF folder conversion (`model-import`).
//! - [`names`]: GGUF ↔ HF tensor names and llama.cpp's q/k row order.
//! - [`naming`]: the `general.*` naming and sampling keys, as gguf-py derives them.
//! - [`writer`]: GGUF v3 files and the F32/F16/BF16/Q8_0 encodings.
//! - [`export`], [`export_lora`], [`export_model`], [`export_vocab`], [`pre_hashes`]: model
//!   folders and PEFT LoRA adapters → the GGUFs llama.cpp's converters write (`model-export`).

pub mod dequant;
pub mod export;
pub mod export_lora;
pub mod export_model;
pub mod export_vocab;
pub mod import;
pub mod names;
pub mod naming;
pub mod pre_hashes;
pub mod reader;
pub mod tokenizer;
pub mod writer;

pub use import::{import_gguf, ImportSummary, SUPPORTED_ARCHITECTURES};
pub use reader::{GgmlType, GgufFile, TensorInfo, Value};

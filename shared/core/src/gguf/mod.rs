//! GGUF reading, dequantization and import into HF folders.
//!
//! - [`reader`]: parse and validate a GGUF v2/v3 file (memory-mapped).
//! - [`dequant`]: ggml block formats → f32, bit-exact with ggml's reference.
//! - [`tokenizer`]: `tokenizer.ggml.*` metadata → tokenizer.json and friends.
//! - [`import`]: the whole GGUF → HF folder conversion (`model-import`).

pub mod dequant;
pub mod import;
pub mod reader;
pub mod tokenizer;

pub use import::{import_gguf, ImportSummary, SUPPORTED_ARCHITECTURES};
pub use reader::{GgmlType, GgufFile, TensorInfo, Value};

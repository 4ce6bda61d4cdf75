//! File formats and safe writing.

pub mod atomic;
pub mod safetensors_file;

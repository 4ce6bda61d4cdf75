//! File formats and safe writing.

pub mod atomic;
pub mod model_folder;
pub mod safetensors_file;

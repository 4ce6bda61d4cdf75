//! GGUF reading, dequantization and import into HF folders.

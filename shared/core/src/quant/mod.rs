//! bitsandbytes-compatible 4-bit quantization (NF4 / FP4, QLoRA's base-weight format).
//!
//! Bit-exact with bitsandbytes 0.50.2 on CPU (`bitsandbytes.functional.quantize_4bit` with and
//! without `compress_statistics`), and reading/writing the safetensors layout transformers uses
//! for 4-bit models, so `AutoModelForCausalLM.from_pretrained` loads what we write and we load
//! what it writes. Formats: shared/docs/formats.md §4; tool: docs/quantize-nf4.md.
//!
//! - [`codebook`]: the NF4 / FP4 / dynamic-map tables and the index rule;
//! - [`blockwise`]: 4-bit blockwise quantize / dequantize (any power-of-two block 32..4096);
//! - [`torch_mean`]: torch's float32 mean, which sets the double-quantization offset;
//! - [`double_quant`]: 8-bit quantization of the block maxima (bitsandbytes' CPU kernel);
//! - [`state`]: the quant state and its JSON blob;
//! - [`weight`]: one weight quantized and serialized as bitsandbytes' tensors;
//! - [`checkpoint`]: reading 4-bit weights back (ours or transformers'), `quantization_config`;
//! - [`convert`]: whole model folders in and out of 4-bit (`quantize-nf4`).

pub mod blockwise;
pub mod checkpoint;
pub mod codebook;
pub mod convert;
pub mod double_quant;
pub mod state;
pub mod torch_mean;
pub mod weight;

pub use blockwise::{dequantize_4bit, quantize_4bit, quantize_4bit_source, Source, SrcDtype};
pub use checkpoint::{dequantize, read_quantized, QuantizedTensor, TensorSource};
pub use codebook::QuantType;
pub use double_quant::{double_quantize, DoubleQuantized};
pub use state::QuantState;
pub use weight::{quantize_weight, QuantizedWeight, StoredAbsmax};

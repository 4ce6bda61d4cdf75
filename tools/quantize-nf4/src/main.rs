//! quantize-nf4: quantize a Hugging Face model folder to bitsandbytes 4-bit (NF4 / FP4), or
//! turn a 4-bit folder back into a plain one.

use clap::Parser;
use peftkit_core::io::safetensors_file::OutDtype;
use peftkit_core::quant::convert::{dequantize_model, quantize_model, QuantizeOptions};
use peftkit_core::quant::QuantType;
use peftkit_core::{cli, Error};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "quantize-nf4",
    version,
    about = "Quantize the linear layers of a Llama / Mistral / Qwen2 / GPT-2 model to 4 bits \
             exactly as bitsandbytes does, in the layout transformers loads with \
             load_in_4bit (or, with --dequantize, turn such a model back into a plain one)",
    after_help = "Examples:\n  \
        quantize-nf4 --model models/smollm2 --out models/smollm2-nf4\n  \
        quantize-nf4 --model models/smollm2 --out models/smollm2-fp4 --quant-type fp4 --no-double-quant\n  \
        quantize-nf4 --model models/smollm2-nf4 --out models/smollm2-back --dequantize\n\n\
        Defaults follow the QLoRA recipe: nf4, blocksize 64, double quantization, compute dtype bf16.\n\
        lm_head, embeddings and norms stay in the model dtype. The output folder is written \
        atomically: it appears complete or not at all, and never over the input."
)]
struct Args {
    /// Model folder (config.json, model.safetensors or a sharded index, tokenizer files)
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Output folder (replaced only once the new one is complete)
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// 4-bit data type: nf4 or fp4
    #[arg(long, default_value = "nf4", value_name = "TYPE")]
    quant_type: String,
    /// Elements per absmax block: a power of two from 32 to 4096
    #[arg(long, default_value_t = 64, value_name = "N")]
    blocksize: usize,
    /// Quantize the block maxima to 8 bits too (default)
    #[arg(long, overrides_with = "no_double_quant")]
    double_quant: bool,
    /// Keep the block maxima in float32
    #[arg(long)]
    no_double_quant: bool,
    /// Compute dtype recorded for loaders: bf16, f16 or f32
    #[arg(long, default_value = "bf16", value_name = "DTYPE")]
    compute_dtype: String,
    /// More modules to leave unquantized, comma-separated (names, prefixes or suffixes such as
    /// down_proj or model.layers.0); lm_head always is
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    skip: Vec<String>,
    /// Turn a 4-bit folder (ours or transformers') back into a plain model
    #[arg(long)]
    dequantize: bool,
    /// Print a one-line JSON summary on stdout
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    verbosity: cli::Verbosity,
}

fn main() {
    let args = cli::parse::<Args>();
    args.verbosity.apply();
    cli::show_options(&args);
    cli::run(|| {
        let summary = if args.dequantize {
            if !args.skip.is_empty() || args.no_double_quant {
                return Err(Error::usage(
                    "--skip and --no-double-quant apply to quantizing, not to --dequantize",
                ));
            }
            dequantize_model(&args.model, &args.out, cli::quiet())?
        } else {
            let opts = QuantizeOptions {
                quant_type: QuantType::parse(&args.quant_type)?,
                blocksize: args.blocksize,
                double_quant: !args.no_double_quant,
                compute_dtype: OutDtype::parse(&args.compute_dtype)?,
                skip: args.skip.clone(),
                quiet: cli::quiet(),
            };
            quantize_model(&args.model, &args.out, &opts)?
        };
        if args.json {
            println!("{}", serde_json::to_string(&summary).expect("json"));
        } else {
            let what = if summary.mode == "quantize" {
                format!("{} tensors quantized", summary.tensors_quantized)
            } else {
                format!("{} tensors dequantized", summary.tensors_dequantized)
            };
            cli::info(format!(
                "{what}, {} copied: {:.1} MB in, {:.1} MB written to {} in {:.2} s",
                summary.tensors_copied,
                summary.bytes_in as f64 / 1e6,
                summary.bytes_out as f64 / 1e6,
                summary.out,
                summary.seconds
            ));
        }
        Ok(())
    })
}

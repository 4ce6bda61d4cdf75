//! model-export: write a model folder, or a PEFT LoRA adapter, as the GGUF file llama.cpp's
//! converters write (for llama.cpp, and Ollama, LM Studio, ... which run on it).

use clap::Parser;
use peftkit_core::cli;
use peftkit_core::error::Error;
use peftkit_core::gguf::export::ExportType;
use peftkit_core::gguf::export_lora::export_lora;
use peftkit_core::gguf::export_model::export_model;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "model-export",
    version,
    about = "Write a model folder (Llama, Mistral, Qwen2, GPT-2; plain or 4-bit) or a LoRA \
             adapter as a GGUF file for llama.cpp: the files llama.cpp's convert_hf_to_gguf.py and \
             convert_lora_to_gguf.py write, without Python; rsLoRA and alpha_pattern scales \
             made exact",
    after_help = "Examples:\n  \
        model-export --model models/smollm2 --out smollm2-q8_0.gguf --type q8_0\n  \
        model-export --model models/smollm2-nf4 --adapter runs/qlora --out qlora.gguf\n  \
        llama-cli -m smollm2-q8_0.gguf --lora qlora.gguf -p 'Hello'\n\n  \
        adapter-merge --model models/smollm2-nf4 --adapter runs/dora --out runs/merged\n  \
        model-export --model runs/merged --out merged-f16.gguf\n\n\
        With --adapter, --model is the base the adapter was trained on (only its config.json \
        is read; a 4-bit base is fine). llama.cpp scales every LoRA pair by alpha / r, so \
        rsLoRA's alpha / √r and alpha_pattern scales are folded into lora_b; llama.cpp's own \
        converter ignores them. DoRA, IA3, prompt, prefix and bottleneck adapters have no \
        llama.cpp form: merge them (adapter-merge) and export the merged model. A 4-bit \
        model (quantize-nf4) is decoded exactly, then stored as --type. The output file is \
        written atomically: it appears complete or not at all."
)]
struct Args {
    /// Model folder (config.json, *.safetensors, tokenizer.json); with --adapter, its base
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Export this LoRA adapter (a PEFT directory) instead of the model
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Output GGUF file
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Tensor type: f32, f16, bf16 or q8_0, as the converters' --outtype (vectors and norms
    /// stay f32; q8_0 falls back to f16 for rows that are not whole 32-value blocks).
    /// Default: f16 for a model, f32 for an adapter (the converters' defaults)
    #[arg(long = "type", value_name = "TYPE")]
    out_type: Option<String>,
    /// llama.cpp's pre-tokenizer (tokenizer.ggml.pre) for a byte-level BPE tokenizer its
    /// converter does not recognise, e.g. default, llama-bpe, qwen2, smollm
    #[arg(long, value_name = "NAME")]
    tokenizer_pre: Option<String>,
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
        let default = if args.adapter.is_some() { "f32" } else { "f16" };
        let ty = ExportType::parse(args.out_type.as_deref().unwrap_or(default))?;
        let summary = match &args.adapter {
            Some(adapter) => {
                if args.tokenizer_pre.is_some() {
                    return Err(Error::usage(
                        "--tokenizer-pre applies to a model export; a LoRA GGUF has no tokenizer",
                    ));
                }
                export_lora(adapter, &args.model, &args.out, ty)?
            }
            None => export_model(
                &args.model,
                &args.out,
                ty,
                args.tokenizer_pre.as_deref(),
                !cli::quiet(),
            )?,
        };
        if args.json {
            println!("{}", serde_json::to_string(&summary).expect("json"));
        } else {
            let folded = if summary.folded_scales > 0 {
                format!(
                    "; the scales of {} modules folded into lora_b",
                    summary.folded_scales
                )
            } else {
                String::new()
            };
            let what = if summary.kind == "lora" {
                "LoRA"
            } else {
                "model"
            };
            cli::info(format!(
                "wrote {} ({} {what}, {} tensors, {}, {:.2} MB){folded}",
                summary.out,
                summary.architecture,
                summary.tensors,
                summary.out_type,
                summary.bytes as f64 / 1e6
            ));
        }
        Ok(())
    })
}

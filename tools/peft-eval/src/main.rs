//! peft-eval: loss, perplexity and per-token log-probabilities of a text file under a model.

use clap::Parser;
use peftkit_core::eval::{cpu_scorer, evaluate_with, gpu_scorer, EvalOptions};
use peftkit_core::gpu::DeviceSpec;
use peftkit_core::model::{ForwardOptions, Model};
use peftkit_core::progress::Progress;
use peftkit_core::tokenizer::TextTokenizer;
use peftkit_core::{cli, data, kernels, Result};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Loss and perplexity of a text file under a Hugging Face causal LM",
    after_help = "Examples:
  peft-eval --model models/smollm2 --data data/wiki.txt
  peft-eval --model models/smollm2 --data eval.jsonl --per-token --json > logprobs.json
  peft-eval --model models/smollm2 --adapter out/lora --data held-out.jsonl
  peft-eval --model models/smollm2 --data held-out.jsonl --compute-dtype bf16
  peft-eval --model models/smollm2 --adapter out/lora --data held-out.jsonl --device cuda:0

Data: JSON Lines with a \"text\" field per line, a JSON array of such objects, or a .txt file
with one sample per line. Tokenization follows the tokenizer's own config (BOS only where
add_bos_token says so). Loss is the mean negative log-likelihood per predicted token."
)]
struct Args {
    /// Model folder (config.json, model.safetensors, tokenizer.json)
    #[arg(long)]
    model: PathBuf,
    /// Text file (.jsonl with "text", .json array, or .txt one sample per line)
    #[arg(long)]
    data: PathBuf,
    /// Include each sample's token ids and per-token log-probabilities in the JSON
    #[arg(long)]
    per_token: bool,
    /// Print one JSON object instead of a summary line
    #[arg(long)]
    json: bool,
    /// Truncate samples to this many tokens (default: the model's context length)
    #[arg(long)]
    max_len: Option<usize>,
    /// Tokens per forward pass
    #[arg(long, default_value_t = 4096)]
    batch_tokens: usize,
    /// LoRA/DoRA adapter to apply, NAME=DIR or DIR (repeatable; the base is loaded once)
    #[arg(long)]
    adapter: Vec<String>,
    /// Which adapter to evaluate with (default: the last one given; "base" for none)
    #[arg(long = "use")]
    use_adapter: Option<String>,
    /// Quantize the model's linear weights to 4 bits while loading (nf4 or fp4), as
    /// peft-train --quantize does: evaluate an adapter on the base it was trained on
    #[arg(long)]
    quantize: Option<String>,
    /// Block size of --quantize
    #[arg(long, default_value_t = 64)]
    quant_blocksize: usize,
    /// --quantize without double quantization of the block scales
    #[arg(long)]
    no_double_quant: bool,
    /// f32, or bf16: the linear layers and the output head multiply bf16 weights with f32
    /// accumulation (AVX-512 BF16 or AMX where the CPU has them): half the bytes per token
    #[arg(long, default_value = "f32")]
    compute_dtype: String,
    /// Worker threads (0 = one per core)
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// cpu, or cuda:N: evaluate on an NVIDIA GPU in bf16 (the base model or an adapter of any
    /// type; a build with the cuda feature, docs/gpu.md); cuda-sim: the GPU code simulated on
    /// the CPU
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: String,
    #[command(flatten)]
    verbosity: cli::Verbosity,
}

fn main() {
    let args = cli::parse::<Args>();
    args.verbosity.apply();
    cli::show_options(&args);
    cli::run(|| run(args))
}

fn run(args: Args) -> Result<()> {
    kernels::set_threads(args.threads);
    let texts = data::read_text_samples(&args.data)?;
    let tok = TextTokenizer::load(&args.model)?;
    let quantize = peftkit_core::model::QuantizeOnLoad::from_options(
        args.quantize.as_deref(),
        args.quant_blocksize,
        !args.no_double_quant,
    )?;
    let mut model = Model::load_with(&args.model, quantize)?;
    let names = peftkit_core::train::lora::load_adapters(&mut model, &args.adapter)?;
    if cli::compute_dtype_is_bf16(&args.compute_dtype)? {
        model.use_bf16_forward();
    }
    let active = match args.use_adapter.as_deref() {
        Some("base") => None,
        Some(n) => Some(names.iter().position(|x| x == n).ok_or_else(|| {
            peftkit_core::Error::usage(format!(
                "--use {n}: no adapter of that name (given: {})",
                names.join(", ")
            ))
        })?),
        None => names.len().checked_sub(1),
    };
    let opts = EvalOptions {
        max_len: args.max_len.unwrap_or(model.config.max_positions).max(2),
        batch_tokens: args.batch_tokens.max(1),
        per_token: args.per_token,
        forward: ForwardOptions { adapter: active },
    };
    let device = DeviceSpec::parse(&args.device)?;
    let scorer = if device.is_gpu() {
        let dir = active.map(|i| peftkit_core::train::lora::parse_adapter_arg(&args.adapter[i]).1);
        gpu_scorer(device, &model, dir.as_deref())?
    } else {
        cpu_scorer(&model, &opts.forward)
    };
    let report = evaluate_with(&tok, &texts, &opts, &Progress::new(cli::quiet()), scorer)?;
    if report.truncated > 0 {
        cli::warn(format!(
            "{} sample(s) truncated to {} tokens",
            report.truncated, opts.max_len
        ));
    }
    if args.json {
        println!("{}", serde_json::to_string(&report).expect("json"));
    } else {
        println!(
            "loss {:.4}  perplexity {:.3}  tokens {}  samples {}  ({:.0} tokens/s)",
            report.loss, report.perplexity, report.tokens, report.samples, report.tokens_per_second
        );
    }
    Ok(())
}

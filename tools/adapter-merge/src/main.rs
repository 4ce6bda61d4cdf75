//! adapter-merge: merge adapters into a model's weights, or combine adapters into one.

use clap::Parser;
use peftkit_core::io::safetensors_file::OutDtype;
use peftkit_core::merge::combine::{combine_adapters, Combination, CombineOptions};
use peftkit_core::merge::into_base::{merge_into_base, MergeOptions};
use peftkit_core::merge::task_arithmetic::SignMethod;
use peftkit_core::train::lora::parse_adapter_arg;
use peftkit_core::{cli, Error};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "adapter-merge",
    version,
    about = "Merge LoRA, DoRA or IA3 adapters into a model's weights (a plain Hugging Face model \
             folder with the same logits), or combine several adapters into one as PEFT's \
             add_weighted_adapter does",
    after_help = "Examples:\n  \
        adapter-merge --model models/smollm2 --adapter runs/lora --out models/smollm2-merged\n  \
        adapter-merge --model models/smollm2-nf4 --adapter runs/qlora --out models/merged      # QLoRA: plain model\n  \
        adapter-merge --model models/smollm2-nf4 --adapter runs/qlora --out models/merged-nf4 --requantize\n  \
        adapter-merge --combine cat --adapter math=runs/a --adapter code=runs/b --weights 0.7,0.3 --out runs/mix\n  \
        adapter-merge --combine ties --density 0.5 --adapter runs/a --adapter runs/b --weights 1,1 --out runs/ties\n\n\
        Merging follows PEFT's merge_and_unload. On a 4-bit (bitsandbytes) base the adapter is added \
        to the dequantized 4-bit weights it was trained against; the result is a plain model in the \
        weights' original dtype, or a 4-bit model again with --requantize (lossy). Prefix, prompt and \
        bottleneck adapters have no weights to merge and are refused.\n\n\
        --combine follows PEFT 0.21.2's add_weighted_adapter: linear, cat, svd, ties, dare_linear, \
        dare_ties, magnitude_prune and the *_svd variants (docs/adapter-merge.md has the formulas). \
        Outputs are written atomically and never over an input."
)]
struct Args {
    /// Base model folder (merging only)
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Adapter directory; repeat to merge several in order, or to combine them (NAME=DIR names
    /// an adapter in the summary)
    #[arg(long, value_name = "[NAME=]DIR", required = true)]
    adapter: Vec<String>,
    /// Output folder (a model folder when merging, an adapter directory when combining)
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Output dtype of the merged model's floating-point tensors: f32, f16 or bf16
    /// (default: each tensor keeps its dtype; 4-bit weights get their original one)
    #[arg(long, value_name = "DTYPE")]
    dtype: Option<String>,
    /// On a 4-bit base, write a 4-bit model (changed weights re-quantized with their settings)
    #[arg(long)]
    requantize: bool,
    /// Combine the adapters instead of merging: linear, cat, svd, ties, ties_svd, dare_linear,
    /// dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd
    #[arg(long, value_name = "HOW")]
    combine: Option<String>,
    /// One weight per adapter, comma-separated (default: 1 each)
    #[arg(
        long,
        value_name = "W,W,...",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    weights: Vec<f32>,
    /// Fraction of entries kept by ties / dare_* / magnitude_prune
    #[arg(long, value_name = "D")]
    density: Option<f32>,
    /// Rank of svd results (default: the largest input rank)
    #[arg(long, value_name = "K")]
    svd_rank: Option<usize>,
    /// TIES sign election: total (sum of values) or frequency (count of signs)
    #[arg(long, default_value = "total", value_name = "HOW")]
    majority_sign: String,
    /// Seed of DARE's random masks
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
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
        let adapters: Vec<(String, PathBuf)> =
            args.adapter.iter().map(|a| parse_adapter_arg(a)).collect();
        if let Some(how) = &args.combine {
            if args.model.is_some() || args.requantize || args.dtype.is_some() {
                return Err(Error::usage(
                    "--combine writes an adapter: --model, --dtype and --requantize apply to merging",
                ));
            }
            let weights = if args.weights.is_empty() {
                vec![1.0; adapters.len()]
            } else {
                args.weights.clone()
            };
            let opts = CombineOptions {
                combination: Combination::parse(how)?,
                weights,
                density: args.density,
                sign_method: match args.majority_sign.as_str() {
                    "total" => SignMethod::Total,
                    "frequency" => SignMethod::Frequency,
                    other => {
                        return Err(Error::usage(format!(
                            "--majority-sign {other}: expected total or frequency"
                        )))
                    }
                },
                svd_rank: args.svd_rank,
                seed: args.seed,
            };
            let s = combine_adapters(&adapters, &args.out, &opts)?;
            if args.json {
                println!("{}", serde_json::to_string(&s).expect("json"));
            } else {
                for d in &s.dropped_tensors {
                    cli::warn(format!(
                        "not carried over (only LoRA/IA3 weights combine): {d}"
                    ));
                }
                cli::info(format!(
                    "{} {} adapters combined ({}{}, {} modules) into {} in {:.2} s",
                    s.adapters.len(),
                    s.peft_type,
                    s.combination,
                    s.rank.map(|r| format!(", rank {r}")).unwrap_or_default(),
                    s.modules,
                    s.out,
                    s.seconds
                ));
            }
            return Ok(());
        }
        if !args.weights.is_empty() || args.density.is_some() || args.svd_rank.is_some() {
            return Err(Error::usage(
                "--weights, --density and --svd-rank apply to --combine",
            ));
        }
        let Some(model) = &args.model else {
            return Err(Error::usage(
                "merging needs --model DIR (or give --combine HOW to combine adapters)",
            ));
        };
        let opts = MergeOptions {
            dtype: args.dtype.as_deref().map(OutDtype::parse).transpose()?,
            requantize: args.requantize,
            quiet: args.verbosity.quiet,
        };
        let paths: Vec<PathBuf> = adapters.into_iter().map(|(_, p)| p).collect();
        let s = merge_into_base(model, &paths, &args.out, &opts)?;
        if args.json {
            println!("{}", serde_json::to_string(&s).expect("json"));
        } else {
            cli::info(format!(
                "{} merged into {} weights ({} biases changed, {} tensors replaced{}): {:.1} MB written to {} in {:.2} s",
                s.methods.join("+"),
                s.weights_merged,
                s.biases_changed,
                s.tensors_replaced,
                if s.requantized {
                    format!(", {} re-quantized", s.tensors_requantized)
                } else if s.base_4bit {
                    format!(", {} dequantized", s.tensors_dequantized)
                } else {
                    String::new()
                },
                s.bytes_out as f64 / 1e6,
                s.out,
                s.seconds
            ));
        }
        Ok(())
    })
}

//! adapter-inspect: what is inside a PEFT adapter, a model folder or a training checkpoint;
//! check an adapter against its base model, compare two adapters, plot ‖ΔW‖ per layer.

use clap::Parser;
use peftkit_core::cli;
use peftkit_core::inspect::{run, Options};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "adapter-inspect",
    version,
    about = "Show what is inside a PEFT adapter directory, a safetensors file, a model folder \
             (4-bit ones included) or a peft-train checkpoint: method and config, parameter \
             counts, and per module the shapes, scale, dtype, ||dW||_F, effective rank and top \
             singular values",
    after_help = "Examples:\n  \
        adapter-inspect runs/lora\n  \
        adapter-inspect runs/lora --json | jq '.modules[] | {path, delta_norm}'\n  \
        adapter-inspect runs/lora --base models/smollm2 --strict     # exit 3 on problems\n  \
        adapter-inspect runs/lora --diff runs/lora-2                  # cosine, sign conflicts\n  \
        adapter-inspect runs/lora --plot lora-norms.svg               # or .png\n  \
        adapter-inspect models/smollm2-nf4                            # bits per parameter\n  \
        adapter-inspect runs/lora/checkpoints/step-200                # step, tokens, optimizer\n\n\
        LoRA norms and singular values come from the small factors (QR of B and A, an r x r \
        SVD); dense dW is formed only for --diff's sign conflicts, one module at a time. \
        num.rank counts singular values above 1e-3 x the largest; eff.rank is exp of the \
        entropy of sigma/sum(sigma). --base problem codes: missing_prefix, missing_module, \
        shape_mismatch, unknown_tensor, non_finite, unmatched_target (errors unless other \
        targets match), gguf_incompatible, untrained_target (warnings). Every --json key is documented in \
        docs/adapter-inspect.md."
)]
struct Args {
    /// Adapter directory, .safetensors file, model folder or training checkpoint directory
    #[arg(value_name = "PATH")]
    path: PathBuf,
    /// Print one JSON object on stdout instead of tables
    #[arg(long)]
    json: bool,
    /// Check the adapter against this base model folder (IA3 norms then use its weights)
    #[arg(long, value_name = "DIR")]
    base: Option<PathBuf>,
    /// With --base: exit with status 3 when the check finds errors
    #[arg(long)]
    strict: bool,
    /// Compare with another adapter: per-module cosine of dW and sign-conflict rate
    #[arg(long, value_name = "OTHER")]
    diff: Option<PathBuf>,
    /// Write a bar chart of ||dW||_F per module, grouped by layer (.svg or .png)
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    #[command(flatten)]
    verbosity: cli::Verbosity,
}

fn main() {
    let args = cli::parse::<Args>();
    args.verbosity.apply();
    cli::show_options(&args);
    cli::run(|| {
        run(&Options {
            path: args.path.clone(),
            base: args.base.clone(),
            diff: args.diff.clone(),
            plot: args.plot.clone(),
            json: args.json,
            strict: args.strict,
        })
    })
}

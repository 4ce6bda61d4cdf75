//! peft-train: LoRA / DoRA / full / frozen fine-tuning of a Hugging Face causal LM.

use clap::Parser;
use peftkit_core::train::trainer;
use peftkit_core::{cli, kernels};
use peftkit_train_cli::{command_line, plot_after_run, plot_log_only, to_options, TrainArgs};

#[derive(Parser)]
#[command(
    version,
    // A --config file's values come first on the command line; later flags override them.
    args_override_self = true,
    about = "Fine-tune a Hugging Face causal LM: LoRA, rsLoRA, DoRA, full or frozen",
    after_help = "Examples:
  # LoRA on q,v of SmolLM2 with alpaca data, 200 steps, adapter in out/
  peft-train --model models/smollm2 --data alpaca.json --method lora --rank 16 --alpha 32 \\
             --steps 200 --batch 4 --max-len 256 --lr 2e-4 --out out/ --log out/metrics.jsonl
  # all linear layers, rsLoRA, cosine schedule with warm-up, 10% held out for evaluation
  peft-train --model M --data chat.jsonl --method lora --target all-linear --rslora \\
             --schedule cosine --warmup 20 --val-split 0.1 --eval-every 50 --out out/
  # QLoRA: a 4-bit base written by quantize-nf4 (or by transformers), or quantized on load
  quantize-nf4 --model models/smollm2 --out models/smollm2-nf4
  peft-train --model models/smollm2-nf4 --data alpaca.json --method lora --target all-linear --out out/
  peft-train --model models/smollm2 --quantize nf4 --data alpaca.json --method lora --out out/
  # IA3 (PEFT's default targets: k_proj, v_proj, and down_proj scaled on its input)
  peft-train --model M --data alpaca.json --method ia3 --lr 3e-3 --out out/
  # prefix tuning (with its MLP) and P-Tuning v2 (per-layer prefixes trained directly)
  peft-train --model M --data alpaca.json --method prefix --num-virtual-tokens 20 --lr 1e-2 --out out/
  peft-train --model M --data alpaca.json --method ptuning-v2 --num-virtual-tokens 20 --lr 1e-2 --out out/
  # bottleneck adapters (Houlsby: after attention and after the MLP), width hidden/16
  peft-train --model M --data alpaca.json --method adapter --adapter-variant houlsby --lr 1e-3 --out out/
  # prompt tuning, virtual tokens initialised from a text
  peft-train --model M --data alpaca.json --method prompt --num-virtual-tokens 8 \\
             --prompt-init-text 'Answer the instruction:' --lr 3e-2 --out out/
  # frozen fine-tuning of the top 2 blocks and the norms
  peft-train --model M --data text.jsonl --method freeze --trainable last:2,norms --out out/
  # look before training
  peft-train --model M --data data.json --check-data 3
  peft-train --model M --data data.json --method lora --plan
  # options from a file (same keys as the long options); the command line wins
  peft-train --config run.json --model M --data data.json --out out/
  # the run's curves (loss, eval loss, lr) as a PNG or SVG; or draw an existing log
  peft-train --model M --data alpaca.json --val-split 0.05 --out out/ --plot out/loss.png
  peft-train --plot-log out/metrics.jsonl --plot loss.svg

The adapter (adapter_config.json + adapter_model.safetensors) loads with PEFT's
PeftModel.from_pretrained; full/freeze write an HF model folder. Checkpoints go to
OUT/checkpoints/step-N (atomically); Ctrl-C saves one and stops; --resume OUT continues
bit-identically."
)]
struct Args {
    #[command(flatten)]
    train: TrainArgs,
}

fn main() {
    cli::run(|| {
        let argv = command_line::<Args>()?;
        if plot_log_only("peft-train", &argv)? {
            return Ok(());
        }
        let args = Args::try_parse_from(argv).unwrap_or_else(|e| e.exit());
        args.train.verbosity.apply();
        kernels::set_threads(args.train.threads);
        let opts = to_options(&args.train)?;
        cli::show_options(&opts);
        let s = plot_after_run("peft-train", &args.train, &opts, trainer::run(&opts))?;
        if s.steps > 0 {
            cli::info(format!(
                "done: {} steps, final loss {:.4}",
                s.steps, s.final_loss
            ));
            if let (Some(g), Some(m)) = (s.gflops, s.mfu) {
                cli::info(format!(
                    "model FLOPs: {g:.1} GFLOP/s, {:.1}% of this machine's measured f32 FMA peak (MFU)",
                    100.0 * m
                ));
            }
        }
        if s.interrupted {
            std::process::exit(130);
        }
        Ok(())
    })
}

//! dpo-train: Direct Preference Optimization (and IPO, hinge, robust DPO) of a causal LM, as
//! TRL's DPOTrainer computes it; the reference is the base with the adapter switched off.

use clap::Parser;
use peftkit_core::train::pairs::PairOptions;
use peftkit_core::train::pref_trainer::{self, PrefOptions, PrefTask};
use peftkit_core::train::preference::DpoLoss;
use peftkit_core::{cli, kernels, Error};
use peftkit_train_cli::{command_line, plot_after_run, plot_log_only, to_options, TrainArgs};

#[derive(Parser)]
#[command(
    version,
    args_override_self = true,
    about = "Preference-tune a causal LM with DPO (sigmoid), IPO, hinge or robust DPO; log-probs \
             summed over completion tokens, the reference being the base model with the adapter off",
    after_help = "Examples:
  dpo-train --model models/smollm2 --data data/dpo_en_demo.json --method lora --rank 16 --alpha 32 \\
            --beta 0.1 --lr 5e-5 --batch 2 --max-len 512 --val-split 0.1 --out runs/dpo
  dpo-train --model M --data pairs.jsonl --loss ipo --beta 0.5 --out runs/ipo
  dpo-train --model M --data pairs.jsonl --loss robust --label-smoothing 0.1 --out runs/rdpo
  dpo-train --model M --data pairs.jsonl --val-split 0.1 --out runs/dpo --plot dpo.png   # curves
  dpo-train --plot-log runs/dpo/metrics.jsonl --plot dpo.svg      # an existing log

Data as rm-train's; records may carry precomputed reference log-probs (ref_chosen_logps,
ref_rejected_logps), otherwise they are computed once before training from the base model.
Logged: loss, implicit rewards β(π − ρ) of chosen and rejected, reward accuracy and margin.
The output is a PEFT adapter (CAUSAL_LM) or, for --method full, a model folder."
)]
struct Args {
    #[command(flatten)]
    train: TrainArgs,
    /// sigmoid (DPO), ipo, hinge or robust
    #[arg(long, default_value = "sigmoid", value_name = "KIND")]
    loss: String,
    /// β: strength of the implicit KL constraint
    #[arg(long, default_value_t = 0.1, value_name = "B")]
    beta: f32,
    /// ε of robust DPO (the share of flipped labels assumed)
    #[arg(long, default_value_t = 0.0, value_name = "E")]
    label_smoothing: f32,
}

fn main() {
    cli::run(|| {
        let argv = command_line::<Args>()?;
        if plot_log_only("dpo-train", &argv)? {
            return Ok(());
        }
        let a = Args::try_parse_from(argv).unwrap_or_else(|e| e.exit());
        a.train.verbosity.apply();
        kernels::set_threads(a.train.threads);
        if a.train.pack || a.train.plan || a.train.check_data.is_some() || a.train.train_on_prompt {
            return Err(Error::usage(
                "--pack, --plan, --check-data and --train-on-prompt apply to peft-train, not to preference pairs",
            ));
        }
        if a.beta <= 0.0 {
            return Err(Error::usage("--beta must be positive"));
        }
        if !(0.0..0.5).contains(&a.label_smoothing) {
            return Err(Error::usage("--label-smoothing must be in [0, 0.5)"));
        }
        let loss = DpoLoss::parse(&a.loss)?;
        if a.label_smoothing > 0.0 && loss != DpoLoss::Robust {
            return Err(Error::usage(
                "--label-smoothing applies to --loss robust (TRL 1.x ignores it for the others)",
            ));
        }
        let opts = PrefOptions {
            train: to_options(&a.train)?,
            task: PrefTask::Dpo {
                loss,
                beta: a.beta,
                label_smoothing: a.label_smoothing,
            },
            pairs: PairOptions {
                max_len: a.train.max_len.max(2),
                drop_long: a.train.drop_long,
                margin_column: None,
                skip_bad_lines: a.train.skip_bad_lines,
            },
        };
        cli::show_options(&opts);
        let s = plot_after_run("dpo-train", &a.train, &opts.train, pref_trainer::run(&opts))?;
        cli::info(format!(
            "done: {} steps, final loss {:.4}",
            s.steps, s.final_loss
        ));
        // Data parallel: rank 0 alone prints the result.
        if let Some(m) = s.eval_after.filter(|_| s.rank0) {
            println!(
                "held-out reward accuracy {:.3} (before training {}), margin {:.4}, {} pairs",
                m.accuracy,
                s.eval_before
                    .map(|b| format!("{:.3}", b.accuracy))
                    .unwrap_or_else(|| "-".into()),
                m.margin,
                m.pairs
            );
        }
        if s.interrupted {
            std::process::exit(130);
        }
        Ok(())
    })
}

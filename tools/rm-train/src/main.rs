//! rm-train: a reward model (base + scalar `score` head) from preference pairs, as TRL's
//! RewardTrainer trains it.

use clap::Parser;
use peftkit_core::train::pairs::PairOptions;
use peftkit_core::train::pref_trainer::{self, PrefOptions, PrefTask};
use peftkit_core::{cli, kernels, Error};
use peftkit_train_cli::{command_line, plot_after_run, plot_log_only, to_options, TrainArgs};

#[derive(Parser)]
#[command(
    version,
    args_override_self = true,
    about = "Train a reward model from preference pairs: the base plus a scalar score head read at \
             the last non-pad token, loss −log σ(r_chosen − r_rejected − margin)",
    after_help = "Examples:
  rm-train --model models/smollm2 --data data/dpo_en_demo.json --method lora --target all-linear \\
           --rank 16 --alpha 32 --lr 1e-4 --batch 4 --max-len 512 --val-split 0.1 --out runs/rm
  rm-train --model M --data pairs.jsonl --margin-column margin --center-rewards 0.01 --out runs/rm
  rm-train --model M --data pairs.jsonl --val-split 0.1 --eval-every 10 --out runs/rm --plot rm.png
  rm-train --plot-log runs/rm/metrics.jsonl --plot rm.svg          # an existing log
  rm-score --model models/smollm2 --adapter runs/rm --data held-out.jsonl --json

Data: {prompt?, chosen, rejected} as strings or message lists (chat template), or LLaMA-Factory's
{conversations, chosen, rejected}. Pairs longer than --max-len are truncated (keeping the start),
or dropped with --drop-long (TRL's behaviour); both are counted in the log. The output is a PEFT
adapter with task_type SEQ_CLS and `score` in modules_to_save (AutoModelForSequenceClassification
+ PeftModel load it with the same scores); --method full writes a ...ForSequenceClassification
folder. The batch counts pairs. Metrics (JSONL with --log): loss, accuracy, margin, rewards."
)]
struct Args {
    #[command(flatten)]
    train: TrainArgs,
    /// Record field with a per-pair margin subtracted inside the sigmoid
    #[arg(long, value_name = "NAME")]
    margin_column: Option<String>,
    /// Add C·mean((r_chosen + r_rejected)²) to keep rewards centred (TRL's
    /// center_rewards_coefficient)
    #[arg(long, value_name = "C")]
    center_rewards: Option<f32>,
}

fn main() {
    cli::run(|| {
        let argv = command_line::<Args>()?;
        if plot_log_only("rm-train", &argv)? {
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
        let opts = PrefOptions {
            train: to_options(&a.train)?,
            task: PrefTask::Reward {
                center: a.center_rewards,
            },
            pairs: PairOptions {
                max_len: a.train.max_len.max(2),
                drop_long: a.train.drop_long,
                margin_column: a.margin_column.clone(),
                skip_bad_lines: a.train.skip_bad_lines,
            },
        };
        cli::show_options(&opts);
        let s = plot_after_run("rm-train", &a.train, &opts.train, pref_trainer::run(&opts))?;
        cli::info(format!(
            "done: {} steps, final loss {:.4}",
            s.steps, s.final_loss
        ));
        // Data parallel: rank 0 alone prints the result.
        if let Some(m) = s.eval_after.filter(|_| s.rank0) {
            println!(
                "held-out accuracy {:.3} (before training {}), margin {:.4}, {} pairs",
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

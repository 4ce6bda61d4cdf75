//! ppo-train: RLHF with PPO on one machine: a LoRA policy, the base with the adapter off as
//! the reference, a value head on the policy's backbone, and a reward model from rm-train or
//! any one-label sequence-classification checkpoint.

use clap::{CommandFactory, FromArgMatches, Parser};
use peftkit_core::train::ppo_math::KlEstimator;
use peftkit_core::train::ppo_trainer::{self, PpoOptions};
use peftkit_core::{cli, kernels, Error};
use peftkit_train_cli::{command_line, plot_after_run, plot_log_only, to_options, TrainArgs};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    version,
    args_override_self = true,
    about = "Fine-tune a causal LM with PPO against a reward model (RLHF): LoRA policy, \
             reference = the base with the adapter off, value head on the policy's backbone",
    after_help = "Examples:
  # reward model from rm-train (a LoRA adapter on the same base: no second copy of the weights)
  rm-train --model models/smollm2 --data data/dpo_en_demo.json --out runs/rm
  ppo-train --model models/smollm2 --reward-model runs/rm --prompts data/dpo_en_demo.json \\
            --out runs/ppo --steps 20 --batch 8 --response-length 48 --lr 1e-4 --log ppo.jsonl
  # a full reward model (…ForSequenceClassification, one label), adaptive KL, k3 estimator
  ppo-train --model M --reward-model runs/rm-full --prompts prompts.jsonl --out runs/ppo \\
            --adaptive-kl --kl-target 6 --kl-horizon 10000 --kl-estimator k3
  # start from an SFT adapter (the reference keeps it), then generate with the result
  ppo-train --model M --init-adapter runs/sft --reward-model runs/rm --prompts p.jsonl --out runs/ppo
  peft-generate --model M --adapter runs/ppo --prompt \"Tell me a joke\"
  ppo-train --model M --reward-model runs/rm --prompts p.jsonl --out runs/ppo --plan
  # curves (score, KL, response length, lr) as a PNG; or draw an existing log
  ppo-train --model M --reward-model runs/rm --prompts p.jsonl --out runs/ppo --plot ppo.png
  ppo-train --plot-log ppo.jsonl --plot ppo.svg

--prompts is the same option as --data. Prompt records: {\"prompt\": text or messages},
{\"query\"}, {\"messages\"} or {\"conversations\"} (rendered with the chat template and the
generation prompt; trailing assistant turns dropped, so preference and SFT files work),
Alpaca {\"instruction\", \"input\"}, {\"text\"}, or a .txt file with one prompt per line.
--batch is the number of prompts sampled per step; --steps counts these rollout steps, each
followed by --ppo-epochs passes over --mini-batches mini-batches (one optimizer step each).
Defaults follow TRL's current PPO trainer (kl-coef 0.05, k1, γ 1, λ 0.95, clip 0.2, vf-coef
0.1, temperature 0.7, 4 epochs) except the learning rate (legacy TRL's 1.41e-5) and
--ratio-threshold (legacy TRL's 10); docs/ppo-train.md has the formulas.
Logged per step (--log, JSONL): score mean/std, KL, entropy, clip fraction, approx-KL,
value loss, explained variance, response length, tokens/s of rollout and update.
Output: the policy adapter (PEFT, loadable by peft-generate and PEFT) and
value_head.safetensors (v_head.summary.weight/bias); checkpoints resume exactly."
)]
struct Args {
    #[command(flatten)]
    train: TrainArgs,
    /// rm-train output: a reward adapter, a …ForSequenceClassification folder, or the base of
    /// --reward-adapter
    #[arg(long, value_name = "DIR")]
    reward_model: PathBuf,
    /// Reward-model adapter (SEQ_CLS LoRA) on --reward-model
    #[arg(long, value_name = "DIR")]
    reward_adapter: Option<PathBuf>,
    /// SFT LoRA adapter the policy starts from (and the reference keeps)
    #[arg(long, value_name = "DIR")]
    init_adapter: Option<PathBuf>,
    /// Most tokens sampled per response
    #[arg(long, default_value_t = 53, value_name = "N")]
    response_length: usize,
    #[arg(long, default_value_t = 0.7, value_name = "T")]
    temperature: f32,
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    top_p: f32,
    /// 0 = off
    #[arg(long, default_value_t = 0, value_name = "K")]
    top_k: usize,
    /// β: weight of the per-token KL penalty (initial value with --adaptive-kl)
    #[arg(long, default_value_t = 0.05, value_name = "B")]
    kl_coef: f64,
    /// k1 (log p − log p_ref), k3 ((r − 1) − log r), abs or mse
    #[arg(long, default_value = "k1", value_name = "K")]
    kl_estimator: String,
    /// Adapt β towards --kl-target (Ziegler et al.; legacy TRL)
    #[arg(long)]
    adaptive_kl: bool,
    #[arg(long, default_value_t = 6.0, value_name = "X")]
    kl_target: f64,
    #[arg(long, default_value_t = 10000.0, value_name = "H")]
    kl_horizon: f64,
    #[arg(long, default_value_t = 1.0, value_name = "G")]
    gamma: f64,
    #[arg(long, default_value_t = 0.95, value_name = "L")]
    lam: f64,
    #[arg(long, default_value_t = 0.2, value_name = "E")]
    cliprange: f64,
    #[arg(long, default_value_t = 0.2, value_name = "E")]
    cliprange_value: f64,
    #[arg(long, default_value_t = 0.1, value_name = "C")]
    vf_coef: f64,
    #[arg(long, default_value_t = 4, value_name = "K")]
    ppo_epochs: usize,
    #[arg(long, default_value_t = 1, value_name = "M")]
    mini_batches: usize,
    /// Subtracted from the score of a response that ends without EOS
    #[arg(long, value_name = "P")]
    missing_eos_penalty: Option<f64>,
    /// Whiten the per-token rewards (scale only) before GAE
    #[arg(long)]
    whiten_rewards: bool,
    /// Skip a mini-batch whose mean ratio π/π_old exceeds this (0 = never)
    #[arg(long, default_value_t = 10.0, value_name = "R")]
    ratio_threshold: f64,
    /// Prompts longer than this many tokens are dropped
    #[arg(long, default_value_t = 512, value_name = "N")]
    max_prompt_len: usize,
    /// Prompts sampled before and after training to report score and KL (0 = skip)
    #[arg(long, default_value_t = 16, value_name = "N")]
    eval_prompts: usize,
}

fn main() {
    cli::run(|| {
        let argv = command_line::<Args>()?;
        if plot_log_only("ppo-train", &argv)? {
            return Ok(());
        }
        let matches = Args::command()
            .try_get_matches_from(argv)
            .unwrap_or_else(|e| e.exit());
        let a = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        let given =
            |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        a.train.verbosity.apply();
        kernels::set_threads(a.train.threads);
        if a.train.pack || a.train.check_data.is_some() || a.train.train_on_prompt {
            return Err(Error::usage(
                "--pack, --check-data and --train-on-prompt apply to peft-train, not to PPO",
            ));
        }
        if a.response_length == 0 {
            return Err(Error::usage("--response-length must be at least 1"));
        }
        if !(0.0..=1.0).contains(&a.top_p) || a.top_p == 0.0 {
            return Err(Error::usage("--top-p must be in (0, 1]"));
        }
        if a.ppo_epochs == 0 {
            return Err(Error::usage("--ppo-epochs must be at least 1"));
        }
        if a.kl_coef < 0.0 || a.kl_target <= 0.0 || a.kl_horizon <= 0.0 {
            return Err(Error::usage(
                "--kl-coef must be ≥ 0, --kl-target and --kl-horizon positive",
            ));
        }
        let kl_estimator = KlEstimator::parse(&a.kl_estimator).ok_or_else(|| {
            Error::usage(format!(
                "unknown --kl-estimator {}; supported: k1, k3, abs, mse",
                a.kl_estimator
            ))
        })?;
        let mut train = to_options(&a.train)?;
        if !given("lr") {
            train.optim.lr = 1.41e-5;
        }
        if !given("clip") && train.clip.is_none() {
            train.clip = Some(1.0);
        }
        let opts = PpoOptions {
            train,
            reward_model: a.reward_model,
            reward_adapter: a.reward_adapter,
            init_adapter: a.init_adapter,
            response_length: a.response_length,
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            kl_coef: a.kl_coef,
            kl_estimator,
            adaptive_kl: a.adaptive_kl.then_some((a.kl_target, a.kl_horizon)),
            gamma: a.gamma,
            lam: a.lam,
            cliprange: a.cliprange,
            cliprange_value: a.cliprange_value,
            vf_coef: a.vf_coef,
            ppo_epochs: a.ppo_epochs,
            mini_batches: a.mini_batches,
            missing_eos_penalty: a.missing_eos_penalty,
            whiten_rewards: a.whiten_rewards,
            ratio_threshold: (a.ratio_threshold > 0.0).then_some(a.ratio_threshold),
            max_prompt_len: a.max_prompt_len,
            eval_prompts: a.eval_prompts,
        };
        cli::show_options(&opts);
        let s = plot_after_run("ppo-train", &a.train, &opts.train, ppo_trainer::run(&opts))?;
        if opts.train.plan {
            return Ok(());
        }
        cli::info(format!("done: {} steps", s.steps));
        if let (Some(b), Some(a), true) = (s.before, s.after, s.rank0) {
            println!(
                "mean score {:.4} -> {:.4}, KL to the reference {:.4} -> {:.4}, response length {:.1} -> {:.1}",
                b.score, a.score, b.kl, a.kl, b.response_length, a.response_length
            );
        }
        if s.interrupted {
            std::process::exit(130);
        }
        Ok(())
    })
}

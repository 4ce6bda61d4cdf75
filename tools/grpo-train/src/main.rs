//! grpo-train: Group Relative Policy Optimization (TRL's GRPOTrainer) on one machine: a LoRA
//! policy, several completions per prompt scored by reward functions (a reward model, a regular
//! expression, the record's reference answer, or any command), no value model.

use clap::{CommandFactory, FromArgMatches, Parser};
use peftkit_core::train::grpo_math::{
    Aggregation, GrpoLoss, LossType, RatioLevel, RewardScale, Vespo,
};
use peftkit_core::train::grpo_trainer::{self, GrpoOptions};
use peftkit_core::train::rewards::RewardSpec;
use peftkit_core::{cli, kernels, Error};
use peftkit_train_cli::{command_line, plot_after_run, plot_log_only, to_options, TrainArgs};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    version,
    args_override_self = true,
    about = "Fine-tune a causal LM with GRPO: several completions per prompt, rewards from a reward \
             model, a regex, a reference answer or any command, advantages relative to each \
             prompt's group; LoRA policy, no value model",
    after_help = "Examples:
  # verifiable rewards (GSM8K-style records {\"prompt\": ..., \"answer\": \"... #### 72\"}):
  # 1 when the completion's final answer is right, plus 0.5 for the asked-for format
  grpo-train --model models/smollm2 --prompts gsm8k.jsonl --out runs/grpo \\
             --reward answer:answer --reward 'regex:(?s)<answer>.*</answer>' --reward-weights 1,0.5 \\
             --num-generations 8 --max-completion-length 256 --steps 100 --log grpo.jsonl
  # any program as the reward: JSON lines in ({\"prompt\", \"completion\", \"stopped\", \"record\"}),
  # one number per line out (null: cannot score)
  grpo-train --model M --prompts p.jsonl --out runs/grpo --reward 'cmd:python3 score.py'
  # the same protocol from a program started once and kept running (loads its judge once)
  grpo-train --model M --prompts p.jsonl --out runs/grpo --reward 'serve:python3 -u judge.py'
  # a reward model from rm-train, a KL penalty to the base (DeepSeek-R1's β)
  grpo-train --model M --prompts p.jsonl --out runs/grpo --reward model:runs/rm --beta 0.001
  # Dr. GRPO (no std scaling, constant normalizer), DAPO's clip-higher, GSPO's sequence ratio
  grpo-train ... --loss-type dr_grpo --scale-rewards none
  grpo-train ... --epsilon-high 0.28 --mask-truncated-completions
  grpo-train ... --importance-sampling-level sequence --loss-type grpo --epsilon 3e-4 --epsilon-high 4e-4
  grpo-train --model M --prompts p.jsonl --out runs/grpo --reward answer:answer --plan
  grpo-train --plot-log grpo.jsonl --plot grpo.svg

--prompts is the same option as --data; records as for ppo-train ({\"prompt\": text or messages},
{\"messages\"}, Alpaca, {\"text\"}, .txt lines); their other fields reach the reward functions.
--batch is the number of prompts per step (default 1: TRL's 8 completions of one prompt);
each step samples --num-generations completions of each, then runs --num-iterations optimizer
steps over them, each split into --grad-accum micro-batches.
Defaults follow TRL 1.16's GRPOConfig (loss dapo, β 0, ε 0.2, temperature 1, group scaling,
KL bias correction) except the learning rate (5e-6 for LoRA, as Unsloth's GRPO recipes; TRL's
1e-6 is for full fine-tuning) and --max-completion-length (256; TRL 512); docs/grpo-train.md
has the formulas. Logged per step (--log, JSONL): reward mean/std and per function, fraction of
groups with zero spread, loss, KL, clip ratios, completion length, truncated fraction, tokens/s.
Output: the policy adapter (PEFT, loadable by peft-generate and PEFT); checkpoints resume exactly."
)]
struct Args {
    #[command(flatten)]
    train: TrainArgs,
    /// A reward function, KIND:ARGUMENT (repeatable): model:DIR (rm-train adapter or
    /// sequence-classification folder), regex:PATTERN (1 if the completion matches),
    /// answer:FIELD (1 if its final answer equals the record's FIELD), cmd:COMMAND (run per
    /// step: JSON lines in, a number per line out), serve:COMMAND (started once: a line per
    /// completion in, a line out, flushed)
    #[arg(long = "reward", value_name = "KIND:ARG", required_unless_present_any = ["plot_log"])]
    rewards: Vec<String>,
    /// One weight per --reward, comma-separated (default: all 1)
    #[arg(long, value_name = "W,W,...", value_delimiter = ',')]
    reward_weights: Vec<f64>,
    /// SFT LoRA adapter the policy starts from (and the reference keeps)
    #[arg(long, value_name = "DIR")]
    init_adapter: Option<PathBuf>,
    /// Completions sampled per prompt (the group)
    #[arg(long, default_value_t = 8, value_name = "G")]
    num_generations: usize,
    /// Most tokens sampled per completion
    #[arg(
        long,
        alias = "response-length",
        default_value_t = 256,
        value_name = "N"
    )]
    max_completion_length: usize,
    #[arg(long, default_value_t = 1.0, value_name = "T")]
    temperature: f32,
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    top_p: f32,
    /// 0 = off
    #[arg(long, default_value_t = 0, value_name = "K")]
    top_k: usize,
    /// β: weight of the KL to the reference (0: no reference pass at all)
    #[arg(long, default_value_t = 0.0, value_name = "B")]
    beta: f64,
    /// grpo, bnpo, dr_grpo, dapo (how clipped token losses are averaged), cispo (MiniMax-M1:
    /// the ratio capped at --epsilon-high and detached, no token loses its gradient), sapo (a
    /// soft gate instead of the clip), luspo (per-completion sums; use sequence ratios) or
    /// vespo (a detached gamma weight of each completion's whole ratio)
    #[arg(long, default_value = "dapo", value_name = "TYPE")]
    loss_type: String,
    /// SAPO's gate temperature for tokens with a positive advantage
    #[arg(long, default_value_t = 1.0, value_name = "T")]
    sapo_temperature_pos: f64,
    /// SAPO's gate temperature for the other tokens
    #[arg(long, default_value_t = 1.05, value_name = "T")]
    sapo_temperature_neg: f64,
    /// VESPO's gamma weight φ(w) = e^λ·w^k·e^(−λw): k and λ for A ≥ 0, then for A < 0
    #[arg(long, value_name = "K,L,K,L", value_delimiter = ',', num_args = 4, default_values_t = [2.0, 3.0, 3.0, 2.0])]
    vespo_k_lambda: Vec<f64>,
    /// DeepSeek-V3.2's off-policy sequence mask: completions with a negative advantage whose
    /// mean log p_old − log p exceeds this lose their policy term (needs --num-iterations > 1)
    #[arg(long, value_name = "D")]
    off_policy_mask_threshold: Option<f64>,
    /// Entropy bonus: the loss minus this times the mean entropy of the tokens the policy term
    /// acts on (TRL's static entropy_coef; encourages exploration)
    #[arg(long, default_value_t = 0.0, value_name = "C")]
    entropy_coef: f64,
    /// ρ: only the top-ρ fraction of each micro-batch's tokens by entropy keep their policy
    /// term ("Beyond the 80/20 rule"; 0.2 there; 1 = all)
    #[arg(long, default_value_t = 1.0, value_name = "RHO")]
    top_entropy_quantile: f64,
    /// Lower clip: the ratio is kept above 1 − ε
    #[arg(long, default_value_t = 0.2, value_name = "E")]
    epsilon: f64,
    /// Upper clip (default: --epsilon; DAPO recommends 0.28)
    #[arg(long, value_name = "E")]
    epsilon_high: Option<f64>,
    /// Two-sided clipping: cap the unclipped ratio at this (INTELLECT-2; > 1 + ε)
    #[arg(long, value_name = "D")]
    delta: Option<f64>,
    /// token (GRPO) or sequence (GSPO) importance ratios
    #[arg(long, default_value = "token", value_name = "LEVEL")]
    importance_sampling_level: String,
    /// group, batch or none: what the advantages are divided by
    #[arg(long, default_value = "group", value_name = "S")]
    scale_rewards: String,
    /// sum_then_normalize, or normalize_then_sum (GDPO) for several rewards
    #[arg(long, default_value = "sum_then_normalize", value_name = "A")]
    multi_objective_aggregation: String,
    /// Optimizer steps on each batch of completions (μ)
    #[arg(long, default_value_t = 1, value_name = "N")]
    num_iterations: usize,
    /// Completions cut at the length limit count in no loss (DAPO)
    #[arg(long)]
    mask_truncated_completions: bool,
    /// Plain k3 KL, not multiplied by the importance ratio (TRL's use_bias_correction_kl=False)
    #[arg(long)]
    no_kl_bias_correction: bool,
    /// Prompts longer than this many tokens are dropped
    #[arg(long, default_value_t = 512, value_name = "N")]
    max_prompt_len: usize,
    /// Prompts sampled before and after training to report the mean reward (0 = skip)
    #[arg(long, default_value_t = 16, value_name = "N")]
    eval_prompts: usize,
}

fn parse<T>(what: &str, v: &str, f: fn(&str) -> Option<T>, choices: &str) -> Result<T, Error> {
    f(v).ok_or_else(|| Error::usage(format!("unknown {what} {v}; supported: {choices}")))
}

fn main() {
    cli::run(|| {
        let argv = command_line::<Args>()?;
        if plot_log_only("grpo-train", &argv)? {
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
                "--pack, --check-data and --train-on-prompt apply to peft-train, not to GRPO",
            ));
        }
        if a.max_completion_length == 0 {
            return Err(Error::usage("--max-completion-length must be at least 1"));
        }
        if !(0.0..=1.0).contains(&a.top_p) || a.top_p == 0.0 {
            return Err(Error::usage("--top-p must be in (0, 1]"));
        }
        if a.num_iterations == 0 {
            return Err(Error::usage("--num-iterations must be at least 1"));
        }
        let eps_high = a.epsilon_high.unwrap_or(a.epsilon);
        if a.beta < 0.0 || a.epsilon < 0.0 || eps_high < 0.0 || a.delta.is_some_and(|d| d <= 0.0) {
            return Err(Error::usage(
                "--beta, --epsilon and --epsilon-high must be ≥ 0 and --delta positive",
            ));
        }
        let rewards = a
            .rewards
            .iter()
            .map(|s| RewardSpec::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let reward_weights = if a.reward_weights.is_empty() {
            vec![1.0; rewards.len()]
        } else {
            a.reward_weights.clone()
        };
        let loss = GrpoLoss {
            loss_type: parse(
                "--loss-type",
                &a.loss_type,
                LossType::parse,
                "grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo",
            )?,
            epsilon_low: a.epsilon,
            epsilon_high: eps_high,
            delta: a.delta,
            beta: a.beta,
            kl_ratio: !a.no_kl_bias_correction,
            level: parse(
                "--importance-sampling-level",
                &a.importance_sampling_level,
                |s| match s {
                    "token" => Some(RatioLevel::Token),
                    "sequence" => Some(RatioLevel::Sequence),
                    _ => None,
                },
                "token, sequence",
            )?,
            max_completion_len: a.max_completion_length,
            sapo_temperature_pos: a.sapo_temperature_pos,
            sapo_temperature_neg: a.sapo_temperature_neg,
            top_entropy_quantile: a.top_entropy_quantile,
            vespo: Vespo {
                k_pos: a.vespo_k_lambda[0],
                lambda_pos: a.vespo_k_lambda[1],
                k_neg: a.vespo_k_lambda[2],
                lambda_neg: a.vespo_k_lambda[3],
            },
            entropy_coef: a.entropy_coef,
            off_policy_threshold: a.off_policy_mask_threshold,
        };
        if !(a.top_entropy_quantile > 0.0 && a.top_entropy_quantile <= 1.0) {
            return Err(Error::usage(format!(
                "--top-entropy-quantile {}: expected a fraction in (0, 1]",
                a.top_entropy_quantile
            )));
        }
        if a.sapo_temperature_pos <= 0.0 || a.sapo_temperature_neg <= 0.0 {
            return Err(Error::usage("SAPO's temperatures must be positive"));
        }
        let mut train = to_options(&a.train)?;
        if !given("lr") {
            train.optim.lr = 5e-6;
        }
        if !given("batch") {
            train.batch = 1;
        }
        if !given("clip") && train.clip.is_none() {
            train.clip = Some(1.0);
        }
        let opts = GrpoOptions {
            train,
            rewards,
            reward_weights,
            init_adapter: a.init_adapter,
            num_generations: a.num_generations,
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            loss,
            scale: parse(
                "--scale-rewards",
                &a.scale_rewards,
                RewardScale::parse,
                "group, batch, none",
            )?,
            aggregation: parse(
                "--multi-objective-aggregation",
                &a.multi_objective_aggregation,
                Aggregation::parse,
                "sum_then_normalize, normalize_then_sum",
            )?,
            iterations: a.num_iterations,
            mask_truncated: a.mask_truncated_completions,
            max_prompt_len: a.max_prompt_len,
            eval_prompts: a.eval_prompts,
        };
        cli::show_options(&opts);
        let s = plot_after_run(
            "grpo-train",
            &a.train,
            &opts.train,
            grpo_trainer::run(&opts),
        )?;
        if opts.train.plan {
            return Ok(());
        }
        cli::info(format!("done: {} steps", s.steps));
        if let (Some(b), Some(a), true) = (s.before, s.after, s.rank0) {
            println!(
                "mean reward {:.4} -> {:.4}, completion length {:.1} -> {:.1}",
                b.reward, a.reward, b.response_length, a.response_length
            );
        }
        if s.interrupted {
            std::process::exit(130);
        }
        Ok(())
    })
}

//! rm-score: score texts or preference pairs with a reward model: a base model plus an
//! rm-train / PEFT SEQ_CLS adapter, or a transformers `…ForSequenceClassification` folder
//! (rm-train `--method full` writes one).

use clap::Parser;
use peftkit_core::data::read_records;
use peftkit_core::gpu::DeviceSpec;
use peftkit_core::model::Model;
use peftkit_core::tokenizer::TextTokenizer;
use peftkit_core::train::backend::Backend;
use peftkit_core::train::pairs::{load_pairs, PairOptions};
use peftkit_core::train::preference::{
    load_reward_adapter, load_reward_model, reward_pad, score_sequences_on,
};
use peftkit_core::{cli, kernels, Error};
use serde_json::json;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Score texts or preference pairs with a reward model: a base model plus an rm-train / \
             PEFT SEQ_CLS adapter, or a ...ForSequenceClassification folder (num_labels 1)",
    after_help = "Examples:
  rm-score --model models/smollm2 --adapter runs/rm --data held-out.json            # pairs: accuracy
  rm-score --model models/smollm2 --adapter runs/rm --data answers.jsonl --json     # {\"text\"} lines
  rm-score --model runs/rm-full --data held-out.json      # rm-train --method full output
  rm-score --model models/qwen2-rm --data answers.jsonl --json   # ...ForSequenceClassification
  rm-score --model models/smollm2 --adapter runs/rm --data held-out.json --device cuda:0

Without --adapter, --model is a Llama/Mistral/Qwen2/GPT2ForSequenceClassification folder with one
label (as rm-train --method full or transformers' save_pretrained writes it): its score.weight is
the head and its config pad_token_id the pad, as transformers reads them.

Pairs ({prompt?, chosen, rejected}, message lists or LLaMA-Factory records) print the held-out
accuracy; with --json one line per pair {\"chosen\", \"rejected\", \"margin\", \"correct\"} or per text
{\"score\"} goes to stdout. The score is read at the last non-pad token, as transformers does."
)]
struct Args {
    /// Base model folder (with --adapter), or a ...ForSequenceClassification folder
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Reward-model adapter directory (adapter_config.json + adapter_model.safetensors with
    /// score); without it, --model must be a sequence-classification folder
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// JSON / JSONL: preference pairs, or records with a "text" field
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Longest sequence in tokens (longer ones are truncated, keeping the start)
    #[arg(long, default_value_t = 1024, value_name = "N")]
    max_len: usize,
    /// Sequences per forward pass
    #[arg(long, default_value_t = 8, value_name = "N")]
    batch: usize,
    /// One JSON line per record on stdout
    #[arg(long)]
    json: bool,
    /// cpu, or cuda:N: score on an NVIDIA GPU in bf16 (a build with the cuda feature,
    /// docs/gpu.md); cuda-sim: the GPU code simulated on the CPU
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: String,
    /// Worker threads (0 = one per core)
    #[arg(long, default_value_t = 0, value_name = "N")]
    threads: usize,
    #[command(flatten)]
    verbosity: cli::Verbosity,
}

fn main() {
    let a = cli::parse::<Args>();
    a.verbosity.apply();
    cli::show_options(&a);
    cli::run(|| {
        kernels::set_threads(a.threads);
        let tok = TextTokenizer::load(&a.model)?;
        let (model, mut state) = match &a.adapter {
            Some(adapter) => {
                let model = Model::load(&a.model)?;
                let state = load_reward_adapter(&model, adapter)?;
                (model, state)
            }
            None => load_reward_model(&a.model, None)?,
        };
        let pad = reward_pad(&model, &tok);
        let device = DeviceSpec::parse(&a.device)?;
        let mut backend = Backend::for_eval(device, &model, &state)?;
        let mut score = |seqs: &[Vec<u32>]| {
            score_sequences_on(&mut backend, &model, &mut state, seqs, pad, a.batch)
        };
        let (records, _) = read_records(&a.data, false)?;
        let is_pairs = records
            .first()
            .is_some_and(|r| r.value.get("chosen").is_some());
        if is_pairs {
            let opts = PairOptions {
                max_len: a.max_len.max(2),
                drop_long: false,
                margin_column: None,
                skip_bad_lines: false,
            };
            let (pairs, _) = load_pairs(&a.data, &tok, &opts)?;
            let mut seqs: Vec<Vec<u32>> = pairs.iter().map(|p| p.chosen.ids.clone()).collect();
            seqs.extend(pairs.iter().map(|p| p.rejected.ids.clone()));
            let s = score(&seqs)?;
            let n = pairs.len();
            let mut correct = 0;
            for k in 0..n {
                let (c, r) = (s[k], s[k + n]);
                correct += usize::from(c > r);
                if a.json {
                    println!(
                        "{}",
                        json!({"chosen": c, "rejected": r, "margin": c - r, "correct": c > r})
                    );
                }
            }
            let acc = correct as f64 / n as f64;
            if a.json {
                cli::info(format!("accuracy {acc:.4} over {n} pairs"));
            } else {
                println!("accuracy {acc:.4} over {n} pairs");
            }
        } else {
            let mut seqs = Vec::new();
            for r in &records {
                let text = r
                    .value
                    .get("text")
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| {
                        Error::bad_input(
                            &a.data,
                            format!(
                                "line {}: expected {{\"text\": ...}} or a preference pair",
                                r.line
                            ),
                        )
                    })?;
                let mut ids = tok.encode(text)?;
                ids.truncate(a.max_len.max(1));
                seqs.push(ids);
            }
            let s = score(&seqs)?;
            for v in s {
                if a.json {
                    println!("{}", json!({ "score": v }));
                } else {
                    println!("{v:.6}");
                }
            }
        }
        Ok(())
    })
}

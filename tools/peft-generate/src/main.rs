//! peft-generate: text generation with the KV cache, streamed to stdout or as JSON lines.

use clap::Parser;
use peftkit_core::data::{keys_hint, read_records};
use peftkit_core::generate::{stop_tokens, Generator, SamplingParams};
use peftkit_core::gpu::DeviceSpec;
use peftkit_core::model::Model;
use peftkit_core::rng::Rng;
use peftkit_core::tokenizer::{Message, TextTokenizer};
use peftkit_core::train::rollout::row_rngs;
use peftkit_core::{cli, kernels, Error, Result};
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Generate text with a Hugging Face causal LM (KV cache; greedy or sampling)",
    after_help = "Examples:
  peft-generate --model models/smollm2 --chat --prompt 'What is the capital of France?'
  peft-generate --model models/smollm2 --prompt 'Once upon a time' --temperature 0.8 --top-p 0.9 --seed 1
  peft-generate --model models/smollm2 --prompts prompts.jsonl --chat --json > out.jsonl
  # 16 prompts at a time: several times the tokens per second of one by one on a CPU
  peft-generate --model models/smollm2 --prompts prompts.jsonl --chat --json --batch 16 > out.jsonl
  # bf16 weights (f32 accumulation): half the bytes read per token
  peft-generate --model models/smollm2 --chat --prompt 'Hi!' --compute-dtype bf16

With --adapter NAME=DIR (repeatable) a prompts line may pick its adapter: \"adapter\": NAME,
or null for the base model; switching adapters never reloads the base weights.
A prompts file has one JSON object per line: {\"prompt\": \"...\"} (or \"text\"), or
{\"messages\": [{\"role\": \"user\", \"content\": \"...\"}]} for chat. Temperature 0 (the
default) is greedy decoding; top-k and top-p apply after the temperature, as in transformers."
)]
struct Args {
    /// Model folder
    #[arg(long)]
    model: PathBuf,
    /// Prompt text (repeatable)
    #[arg(long, conflicts_with = "prompts")]
    prompt: Vec<String>,
    /// JSON Lines file of prompts
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Apply the model's chat template (each prompt becomes a user message)
    #[arg(long)]
    chat: bool,
    /// System message for --chat
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = off
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// One JSON object per prompt: prompt, text, token_ids, stop_reason
    #[arg(long)]
    json: bool,
    /// Keep generating past EOS until --max-new-tokens (benchmarks)
    #[arg(long)]
    ignore_eos: bool,
    /// LoRA/DoRA adapter, NAME=DIR or DIR (repeatable; switching never reloads the base)
    #[arg(long)]
    adapter: Vec<String>,
    /// Adapter for prompts that do not name one (default: the first given; "base" for none)
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
    /// Prompts decoded together (CPU or GPU): on a CPU a batch of up to 32 costs about what one
    /// prompt costs per token, since the weights are read once for all of them. Consecutive
    /// prompts with the same adapter share a batch; answers come out in prompt order once
    /// their batch is done (no streaming). Answers equal --batch 1's, greedy or sampled
    /// with the same --seed (a generator per prompt)
    #[arg(long, default_value_t = 1, value_name = "N")]
    batch: usize,
    /// Worker threads (0 = one per core)
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// cpu, or cuda:N: generate on an NVIDIA GPU in bf16 (the base model or adapters of any
    /// type; a build with the cuda feature, docs/gpu.md); cuda-sim: the GPU code simulated on
    /// the CPU
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: String,
    #[command(flatten)]
    verbosity: cli::Verbosity,
}

/// A prompt as given: plain text or chat messages.
enum PromptBody {
    Text(String),
    Chat(Vec<Message>),
}

/// Which adapter a prompt asks for: the default, the base model (null), or a name.
enum Choice {
    Default,
    Base,
    Named(String),
}

struct Prompt {
    body: PromptBody,
    adapter: Choice,
}

fn main() {
    let args = cli::parse::<Args>();
    args.verbosity.apply();
    cli::show_options(&args);
    cli::run(|| run(args))
}

fn run(args: Args) -> Result<()> {
    kernels::set_threads(args.threads);
    let temperature_ok = args.temperature >= 0.0; // false for NaN too
    let top_p_ok = args.top_p > 0.0 && args.top_p <= 1.0;
    if !temperature_ok || !top_p_ok {
        return Err(Error::usage(
            "--temperature must be ≥ 0 and --top-p in (0, 1]",
        ));
    }
    let prompts = collect_prompts(&args)?;
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
    let slot_of = |name: &str| -> Result<Option<usize>> {
        if name == "base" {
            return Ok(None);
        }
        names
            .iter()
            .position(|n| n == name)
            .map(Some)
            .ok_or_else(|| {
                Error::usage(format!(
                    "adapter {name} is not loaded (given: {})",
                    names.join(", ")
                ))
            })
    };
    let default_slot = match args.use_adapter.as_deref() {
        Some(n) => slot_of(n)?,
        None => (!names.is_empty()).then_some(0),
    };
    let eos = if args.ignore_eos {
        Vec::new()
    } else {
        stop_tokens(&args.model, &model.config, &tok)?
    };
    let params = SamplingParams {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
    };
    let mut rng = Rng::new(args.seed);
    let device = DeviceSpec::parse(&args.device)?;
    let dirs: Vec<std::path::PathBuf> = args
        .adapter
        .iter()
        .map(|a| peftkit_core::train::lora::parse_adapter_arg(a).1)
        .collect();
    let mut generator = Generator::new(device, &model, &dirs)?;
    let stdout = std::io::stdout();
    if args.batch == 0 {
        return Err(Error::usage("--batch must be at least 1"));
    }
    let resolve = |c: &Choice| -> Result<Option<usize>> {
        match c {
            Choice::Default => Ok(default_slot),
            Choice::Base => Ok(None),
            Choice::Named(n) => slot_of(n),
        }
    };
    if args.batch > 1 {
        // consecutive prompts with the same adapter, up to --batch at a time
        let mut i = 0;
        while i < prompts.len() {
            let adapter = resolve(&prompts[i].adapter)?;
            let mut j = i + 1;
            while j < prompts.len()
                && j - i < args.batch
                && resolve(&prompts[j].adapter)? == adapter
            {
                j += 1;
            }
            let encoded: Vec<(String, Vec<u32>)> = prompts[i..j]
                .iter()
                .map(|p| encode_prompt(&p.body, &args, &tok))
                .collect::<Result<_>>()?;
            let ids: Vec<&[u32]> = encoded.iter().map(|(_, ids)| ids.as_slice()).collect();
            let start = std::time::Instant::now();
            let mut rngs = row_rngs(&mut rng, ids.len());
            let outs = generator.generate_batch(&ids, &params, &eos, &mut rngs, adapter)?;
            let secs = start.elapsed().as_secs_f64();
            for ((shown, ids), (out, reason)) in encoded.iter().zip(outs) {
                let text = tok.decode(&out, true)?;
                emit(
                    &args,
                    &stdout,
                    shown,
                    ids.len(),
                    &text,
                    &out,
                    reason,
                    adapter.map(|s| names[s].as_str()),
                    secs,
                )?;
            }
            i = j;
        }
        return Ok(());
    }
    for prompt in prompts {
        let adapter = resolve(&prompt.adapter)?;
        let (shown, ids) = encode_prompt(&prompt.body, &args, &tok)?;
        let start = std::time::Instant::now();
        let mut printed = String::new();
        let mut generated: Vec<u32> = Vec::new();
        // a generator of its own per prompt, as in batches: a seed gives the same text at any --batch
        let mut prompt_rng = row_rngs(&mut rng, 1).remove(0);
        let (out, reason) =
            generator.generate(&ids, &params, &eos, &mut prompt_rng, adapter, |t| {
                if args.json {
                    return;
                }
                // Stream: print what decoding added, once it is no longer a partial character.
                generated.push(t);
                if let Ok(text) = tok.decode(&generated, true) {
                    if !text.ends_with('\u{FFFD}')
                        && text.len() > printed.len()
                        && text.starts_with(&printed)
                    {
                        let mut lock = stdout.lock();
                        let _ = lock.write_all(&text.as_bytes()[printed.len()..]);
                        let _ = lock.flush();
                        printed = text;
                    }
                }
            })?;
        let text = tok.decode(&out, true)?;
        let secs = start.elapsed().as_secs_f64();
        // the streamed part is out already: print the rest
        let rest = if !args.json && text.len() > printed.len() && text.starts_with(&printed) {
            &text[printed.len()..]
        } else if args.json {
            text.as_str()
        } else {
            ""
        };
        emit(
            &args,
            &stdout,
            &shown,
            ids.len(),
            rest,
            &out,
            reason,
            adapter.map(|s| names[s].as_str()),
            secs,
        )?;
    }
    Ok(())
}

/// One answer: a JSON line, or the text (what was not streamed yet) and a newline.
#[allow(clippy::too_many_arguments)]
fn emit(
    args: &Args,
    stdout: &std::io::Stdout,
    shown: &str,
    prompt_tokens: usize,
    text: &str,
    out: &[u32],
    reason: peftkit_core::generate::StopReason,
    adapter: Option<&str>,
    secs: f64,
) -> Result<()> {
    let mut lock = stdout.lock();
    if args.json {
        let line = json!({
            "prompt": shown,
            "text": text,
            "token_ids": out,
            "stop_reason": reason,
            "adapter": adapter,
            "prompt_tokens": prompt_tokens,
            "tokens_per_second": out.len() as f64 / secs.max(1e-9),
        });
        writeln!(lock, "{line}").map_err(|e| Error::io("stdout", e))
    } else {
        let _ = lock.write_all(text.as_bytes());
        writeln!(lock).map_err(|e| Error::io("stdout", e))
    }
}

fn collect_prompts(args: &Args) -> Result<Vec<Prompt>> {
    if let Some(path) = &args.prompts {
        let (records, _) = read_records(path, false)?;
        return records
            .into_iter()
            .map(|r| {
                let v = &r.value;
                let adapter = match v.get("adapter") {
                    None => Choice::Default,
                    Some(Value::Null) => Choice::Base,
                    Some(Value::String(s)) => Choice::Named(s.clone()),
                    Some(other) => {
                        return Err(Error::bad_input(
                            path,
                            format!(
                                "line {}: \"adapter\" must be a name or null, found {other}",
                                r.line
                            ),
                        ))
                    }
                };
                if let Some(s) = v
                    .get("prompt")
                    .or_else(|| v.get("text"))
                    .and_then(Value::as_str)
                {
                    return Ok(Prompt {
                        body: PromptBody::Text(s.to_string()),
                        adapter,
                    });
                }
                if let Some(m) = v.get("messages") {
                    let msgs: Vec<Message> = serde_json::from_value(m.clone()).map_err(|e| {
                        Error::bad_input(path, format!("line {}: bad \"messages\": {e}", r.line))
                    })?;
                    return Ok(Prompt {
                        body: PromptBody::Chat(msgs),
                        adapter,
                    });
                }
                Err(Error::bad_input(
                    path,
                    format!(
                        "line {}: expected \"prompt\", \"text\" or \"messages\"{}",
                        r.line,
                        keys_hint(v)
                    ),
                ))
            })
            .collect();
    }
    if args.prompt.is_empty() {
        return Err(Error::usage(
            "give --prompt TEXT (repeatable) or --prompts FILE.jsonl",
        ));
    }
    Ok(args
        .prompt
        .iter()
        .map(|t| Prompt {
            body: PromptBody::Text(t.clone()),
            adapter: Choice::Default,
        })
        .collect())
}

/// The text shown as "prompt" in JSON output and the token ids fed to the model.
fn encode_prompt(p: &PromptBody, args: &Args, tok: &TextTokenizer) -> Result<(String, Vec<u32>)> {
    let messages = match p {
        PromptBody::Text(t) if !args.chat => return Ok((t.clone(), tok.encode(t)?)),
        PromptBody::Text(t) => {
            let mut m = Vec::new();
            if let Some(s) = &args.system {
                m.push(Message {
                    role: "system".into(),
                    content: s.clone(),
                });
            }
            m.push(Message {
                role: "user".into(),
                content: t.clone(),
            });
            m
        }
        PromptBody::Chat(m) => m.clone(),
    };
    let rendered = tok.apply_chat_template(&messages, true)?;
    // The template already holds BOS where the model wants it.
    let ids = tok.encode_plain(&rendered)?;
    Ok((rendered, ids))
}

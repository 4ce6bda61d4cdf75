//! The training options shared by peft-train, rm-train, dpo-train and ppo-train: one clap
//! argument group (flattened into each tool's own parser), `--config FILE` expansion, the
//! conversion into the core's [`TrainOptions`], and `--plot` / `--plot-log` (the run's curves).

use peftkit_core::cli::{self, Verbosity};
use peftkit_core::model::QuantizeOnLoad;
use peftkit_core::train::bottleneck::{Activation, BottleneckConfig, Variant};
use peftkit_core::train::data::{DataFormat, DataOptions};
use peftkit_core::train::ia3::Ia3Config;
use peftkit_core::train::lora::{LoraConfig, Targets};
use peftkit_core::train::optim::{AdamW, Schedule};
use peftkit_core::train::prefix::PrefixConfig;
use peftkit_core::train::trainer::{Method, TrainOptions};
use peftkit_core::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone, Debug)]
pub struct TrainArgs {
    /// JSON file with the same keys as the long options (e.g. {"rank": 16, "target": "all-linear",
    /// "rslora": true}); options given on the command line win
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub model: PathBuf,
    /// Training data (ppo-train, grpo-train: the prompts; --prompts is the same option)
    #[arg(long, alias = "prompts")]
    pub data: PathBuf,
    /// auto, text, alpaca, prompt-completion, messages, sharegpt
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// lora, dora, ia3, adapter, prefix, ptuning-v2, prompt, full, freeze
    #[arg(long, default_value = "lora")]
    pub method: String,
    #[arg(long)]
    pub out: PathBuf,
    /// Target modules: names (q_proj,v_proj), all-linear, or re:REGEX (default: PEFT's per architecture)
    #[arg(long)]
    pub target: Option<String>,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// Per-module rank, e.g. k_proj=4,o_proj=16
    #[arg(long)]
    pub rank_pattern: Option<String>,
    /// Per-module alpha, e.g. o_proj=32
    #[arg(long)]
    pub alpha_pattern: Option<String>,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
    #[arg(long)]
    pub rslora: bool,
    /// none, all, lora_only
    #[arg(long, default_value = "none")]
    pub bias: String,
    /// Modules trained fully and saved with the adapter (e.g. lm_head)
    #[arg(long, value_delimiter = ',')]
    pub modules_to_save: Vec<String>,
    /// Only these block indices get adapters (e.g. 0-3,8)
    #[arg(long)]
    pub layers: Option<String>,
    /// freeze: tensors to train (last:N, lm_head, norms, embed, or regexes)
    #[arg(long, value_delimiter = ',')]
    pub trainable: Vec<String>,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f32,
    /// constant, linear, cosine
    #[arg(long, default_value = "linear")]
    pub schedule: String,
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
    /// Drop over-long samples instead of truncating them
    #[arg(long)]
    pub drop_long: bool,
    /// Pack several samples into each row (attention never crosses samples)
    #[arg(long)]
    pub pack: bool,
    #[arg(long, default_value_t = 1.0)]
    pub epochs: f64,
    /// Optimizer steps (overrides --epochs)
    #[arg(long)]
    pub steps: Option<u64>,
    /// Gradient-norm clipping
    #[arg(long)]
    pub clip: Option<f32>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    #[arg(long, default_value_t = 0.0)]
    pub val_split: f64,
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    /// Continue from OUT (or a checkpoint directory)
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// JSON Lines metrics log
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Draw the run's curves (loss, eval loss, lr; reward accuracy and margin; PPO score, KL)
    /// into FILE.png or FILE.svg at the end of the run, from --log (without --log the log is
    /// written to OUT/metrics.jsonl)
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Only draw an existing metrics log into --plot FILE and exit (no training; takes no
    /// other option)
    #[arg(long, value_name = "LOG", requires = "plot")]
    pub plot_log: Option<PathBuf>,
    /// Print the memory and time plan and exit
    #[arg(long)]
    pub plan: bool,
    /// Print N rendered samples with the loss-bearing tokens marked, and exit
    #[arg(long)]
    pub check_data: Option<usize>,
    /// Loss on prompt tokens too (instruction formats)
    #[arg(long)]
    pub train_on_prompt: bool,
    /// Skip malformed data lines instead of stopping
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// QLoRA on a plain model: quantize its linear weights to 4 bits while loading (nf4 or
    /// fp4; a model already stored 4-bit, e.g. by quantize-nf4, needs no flag)
    #[arg(long)]
    pub quantize: Option<String>,
    /// prefix / ptuning-v2 / prompt: virtual tokens in front of every sequence
    #[arg(long, default_value_t = 20)]
    pub num_virtual_tokens: usize,
    /// adapter: houlsby (after attention and MLP), pfeiffer (after the MLP) or parallel
    #[arg(long, default_value = "houlsby")]
    pub adapter_variant: String,
    /// adapter: bottleneck width (default hidden / --reduction-factor)
    #[arg(long, default_value_t = 0)]
    pub adapter_size: usize,
    /// adapter: hidden size divided by this gives the bottleneck width
    #[arg(long, default_value_t = 16)]
    pub reduction_factor: usize,
    /// adapter: relu or silu
    #[arg(long, default_value = "relu")]
    pub adapter_activation: String,
    /// prompt: initialize the virtual tokens from this text's token embeddings (implies
    /// --prompt-init text)
    #[arg(long)]
    pub prompt_init_text: Option<String>,
    /// prompt: random (N(0,1)), text (--prompt-init-text's token embeddings) or sample-vocab
    /// (embeddings of token ids drawn uniformly from the vocabulary) [default: text with
    /// --prompt-init-text, else random]
    #[arg(long)]
    pub prompt_init: Option<String>,
    /// prefix: hidden size of the reparameterization MLP (default: the model's kv dimension)
    #[arg(long)]
    pub prefix_hidden: Option<usize>,
    /// IA3: target modules whose input (not output) is scaled (default: PEFT's, down_proj)
    #[arg(long)]
    pub feedforward: Option<String>,
    /// Block size of --quantize
    #[arg(long, default_value_t = 64)]
    pub quant_blocksize: usize,
    /// --quantize without double quantization of the block scales
    #[arg(long)]
    pub no_double_quant: bool,
    /// f32, or bf16: frozen linear weights multiply in bf16 with f32 accumulation (torch
    /// autocast; AMX or AVX-512 BF16 when the CPU has them); adapters and the loss stay f32
    #[arg(long, default_value = "f32")]
    pub compute_dtype: String,
    /// cpu, or cuda:N: train on an NVIDIA GPU (every method, QLoRA too, on Llama-family
    /// models in bf16, for peft-train, rm-train and dpo-train; a build with the
    /// cuda feature, see docs/gpu.md); cuda-sim: the GPU code simulated on the CPU (a cuda-sim
    /// build, for tests)
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: String,
    /// Worker threads (0 = one per core)
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub verbosity: Verbosity,
}

/// The command line of a training tool `A`: the hidden `--completions SHELL` / `--man`
/// answered (the process exits), `--config FILE` expanded.
pub fn command_line<A: clap::CommandFactory>() -> Result<Vec<String>> {
    let argv: Vec<String> = std::env::args().collect();
    cli::meta::handle::<A>(&argv);
    with_config_file(argv)
}

/// `TOOL --plot-log LOG --plot FILE`: draw an existing metrics log and nothing else. Returns
/// whether `argv` asked for it (the chart is then written).
pub fn plot_log_only(tool: &'static str, argv: &[String]) -> Result<bool> {
    if !argv
        .iter()
        .skip(1)
        .any(|a| a == "--plot-log" || a.starts_with("--plot-log="))
    {
        return Ok(false);
    }
    use clap::{Arg, Args, FromArgMatches};
    let cmd = clap::Command::new(tool)
        .about("Draw an existing metrics log (--log of a run) into a PNG or SVG chart")
        .arg(
            Arg::new("plot_log")
                .long("plot-log")
                .value_name("LOG")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf)),
        )
        .arg(
            Arg::new("plot")
                .long("plot")
                .value_name("FILE")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf)),
        );
    let m = Verbosity::augment_args(cmd)
        .try_get_matches_from(argv)
        .unwrap_or_else(|e| e.exit());
    Verbosity::from_arg_matches(&m)
        .unwrap_or_else(|e| e.exit())
        .apply();
    let log = m.get_one::<PathBuf>("plot_log").expect("required");
    let out = m.get_one::<PathBuf>("plot").expect("required");
    let title = format!("{tool}: {}", log.display());
    let s = peftkit_core::train::plot::plot_log(log, out, &title)?;
    report_plot(out, &s);
    Ok(true)
}

fn report_plot(out: &Path, s: &peftkit_core::train::plot::PlotSummary) {
    cli::info(format!("plot: {} ({})", out.display(), s.panels.join(", ")));
    cli::detail(format!(
        "plot: series {} ({} points)",
        s.series.join(", "),
        s.points
    ));
}

/// After a run: draw `--plot` from the run's log (also after an interrupted or failed run,
/// from what was logged). A chart that cannot be drawn is a warning, not a failed run: the
/// trained output is complete either way.
pub fn plot_after_run<T>(
    tool: &str,
    a: &TrainArgs,
    opts: &TrainOptions,
    run: Result<T>,
) -> Result<T> {
    let (Some(out), Some(log)) = (&a.plot, &opts.log) else {
        return run;
    };
    // Data parallel: rank 0 alone writes files (docs/distributed.md).
    let other_rank = peftkit_core::dist::DistEnv::from_env().is_ok_and(|e| e.rank != 0);
    if a.plan || a.check_data.is_some() || !log.is_file() || other_rank {
        return run;
    }
    let title = format!("{tool} ({}) {}", a.method, opts.out.display());
    match peftkit_core::train::plot::plot_log(log, out, &title) {
        Ok(s) => report_plot(out, &s),
        Err(e) => cli::warn(format!("--plot: {e}")),
    }
    run
}

/// Expand `--config FILE` into command-line options placed before the user's own, so that
/// options given explicitly override the file.
pub fn with_config_file(argv: Vec<String>) -> Result<Vec<String>> {
    let Some(pos) = argv
        .iter()
        .position(|a| a == "--config" || a.starts_with("--config="))
    else {
        return Ok(argv);
    };
    let path = match argv[pos].strip_prefix("--config=") {
        Some(p) => p.to_string(),
        None => argv
            .get(pos + 1)
            .cloned()
            .ok_or_else(|| Error::usage("--config needs a file"))?,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_input(&path, format!("invalid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| {
        Error::bad_input(&path, "expected a JSON object of option names and values")
    })?;
    let mut from_file = Vec::new();
    for (k, val) in obj {
        let flag = format!("--{}", k.replace('_', "-"));
        match val {
            serde_json::Value::Bool(true) => from_file.push(flag),
            serde_json::Value::Bool(false) | serde_json::Value::Null => {}
            serde_json::Value::String(s) => from_file.extend([flag, s.clone()]),
            serde_json::Value::Number(n) => from_file.extend([flag, n.to_string()]),
            serde_json::Value::Array(items) => {
                let parts: Vec<String> = items
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .map(String::from)
                            .unwrap_or_else(|| x.to_string())
                    })
                    .collect();
                from_file.extend([flag, parts.join(",")]);
            }
            serde_json::Value::Object(_) => {
                return Err(Error::bad_input(
                    &path,
                    format!("option {k}: nested objects are not options"),
                ))
            }
        }
    }
    let skip = if argv[pos].starts_with("--config=") {
        1
    } else {
        2
    };
    let mut out = vec![argv[0].clone()];
    out.extend(from_file);
    out.extend(argv[1..pos].iter().cloned());
    out.extend(argv[pos + skip..].iter().cloned());
    Ok(out)
}

fn parse_layers(s: &str) -> Result<Vec<usize>> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || Error::usage(format!("--layers {s}: expected e.g. 0-3,8"));
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                v.extend(a..=b);
            }
            None => v.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(v)
}

fn parse_pattern<T: std::str::FromStr>(
    s: &Option<String>,
    what: &str,
) -> Result<BTreeMap<String, T>> {
    let mut m = BTreeMap::new();
    if let Some(s) = s {
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| Error::usage(format!("{what} {part}: expected NAME=VALUE")))?;
            let v = v
                .parse()
                .map_err(|_| Error::usage(format!("{what} {part}: bad value")))?;
            m.insert(k.to_string(), v);
        }
    }
    Ok(m)
}

/// The training options these arguments describe.
pub fn to_options(a: &TrainArgs) -> Result<TrainOptions> {
    if let Some(p) = &a.plot {
        peftkit_core::train::plot::check_path(p)?;
    }
    if a.rank == 0 {
        return Err(Error::usage("--rank must be at least 1"));
    }
    // Zero would silently mean one before; say so instead.
    for (flag, v) in [
        ("--batch", a.batch),
        ("--grad-accum", a.grad_accum),
        ("--max-len", a.max_len),
        ("--reduction-factor", a.reduction_factor),
    ] {
        if v == 0 {
            return Err(Error::usage(format!("{flag} must be at least 1")));
        }
    }
    if !(0.0..1.0).contains(&a.dropout) {
        return Err(Error::usage("--dropout must be in [0, 1)"));
    }
    if !["none", "all", "lora_only"].contains(&a.bias.as_str()) {
        return Err(Error::usage("--bias must be none, all or lora_only"));
    }
    let method = Method::parse(&a.method)?;
    let config = peftkit_core::model::ModelConfig::load(&a.model)?;
    let targets = match &a.target {
        Some(t) => Targets::parse(t),
        None => Targets::default_for(config.arch),
    };
    let format: DataFormat = a.format.parse().map_err(Error::usage)?;
    let opts = TrainOptions {
        model: a.model.clone(),
        data: a.data.clone(),
        out: a.out.clone(),
        method,
        lora: LoraConfig {
            rank: a.rank,
            alpha: a.alpha,
            dropout: a.dropout,
            targets,
            rslora: a.rslora,
            dora: method == Method::Dora,
            bias: a.bias.clone(),
            modules_to_save: a.modules_to_save.clone(),
            layers_to_transform: a.layers.as_deref().map(parse_layers).transpose()?,
            rank_pattern: parse_pattern(&a.rank_pattern, "--rank-pattern")?,
            alpha_pattern: parse_pattern(&a.alpha_pattern, "--alpha-pattern")?,
            base_model_name_or_path: None,
        },
        trainable: a.trainable.clone(),
        data_opts: DataOptions {
            format,
            max_len: a.max_len.max(2),
            train_on_prompt: a.train_on_prompt,
            skip_bad_lines: a.skip_bad_lines,
            drop_long: a.drop_long,
        },
        pack: a.pack,
        optim: AdamW {
            lr: a.lr,
            weight_decay: a.weight_decay,
            ..AdamW::default()
        },
        schedule: Schedule::parse(&a.schedule)
            .ok_or_else(|| Error::usage("--schedule must be constant, linear or cosine"))?,
        warmup: a.warmup,
        batch: a.batch.max(1),
        grad_accum: a.grad_accum.max(1),
        epochs: a.epochs,
        steps: a.steps,
        clip: a.clip,
        seed: a.seed,
        val_data: a.val_data.clone(),
        val_split: a.val_split,
        eval_every: a.eval_every,
        save_every: a.save_every,
        resume: a.resume.clone(),
        log: match (&a.log, &a.plot) {
            (Some(l), _) => Some(l.clone()),
            (None, Some(_)) => Some(a.out.join("metrics.jsonl")),
            (None, None) => None,
        },
        plan: a.plan,
        check_data: a.check_data,
        quiet: a.verbosity.quiet,
        quantize: quantize_option(a)?,
        compute_bf16: peftkit_core::cli::compute_dtype_is_bf16(&a.compute_dtype)?,
        device: peftkit_core::gpu::DeviceSpec::parse(&a.device)?,
        prompt_init_text: a.prompt_init_text.clone(),
        prompt_init: a
            .prompt_init
            .as_deref()
            .map(peftkit_core::train::prompt::PromptInit::parse)
            .transpose()?,
        bottleneck: BottleneckConfig {
            variant: Variant::parse(&a.adapter_variant)?,
            size: a.adapter_size,
            reduction_factor: a.reduction_factor.max(1),
            activation: Activation::parse(&a.adapter_activation)?,
            base_model_name_or_path: None,
        },
        prefix: PrefixConfig {
            num_virtual_tokens: a.num_virtual_tokens,
            projection: a.prefix_hidden,
            base_model_name_or_path: None,
        },
        ia3: (method == Method::Ia3).then(|| {
            let mut c = Ia3Config::default_for(config.arch);
            if let Some(t) = &a.target {
                c.targets = Targets::parse(t);
            }
            if let Some(ff) = &a.feedforward {
                c.feedforward = ff
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
            }
            c
        }),
    };
    Ok(opts)
}

fn quantize_option(a: &TrainArgs) -> Result<Option<QuantizeOnLoad>> {
    QuantizeOnLoad::from_options(a.quantize.as_deref(), a.quant_blocksize, !a.no_double_quant)
}

//! The training loop of peft-train: data order, micro-batches and gradient accumulation,
//! optimizer steps with schedule and clipping, evaluation, JSONL metrics, checkpoints, resume,
//! Ctrl-C, and the final output (a PEFT adapter or an HF model folder).

use super::checkpoint::{self, Progress as CkptProgress};
use super::data::{self, DataOptions, Example};
use super::engine::{Batch, Engine};
use super::lora::{self, LoraConfig};
use super::optim::{AdamW, Schedule};
use super::params::{Slot, TrainState};
use super::{full, output};
use crate::error::{Error, Result};
use crate::kernels::gemm;
use crate::model::Model;
use crate::progress::Progress;
use crate::rng::Rng;
use crate::tokenizer::TextTokenizer;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Lora,
    Dora,
    Full,
    Freeze,
    Ia3,
    /// Prefix tuning with the reparameterization MLP (Li & Liang).
    Prefix,
    /// Prompt tuning: virtual input tokens.
    Prompt,
    /// Bottleneck adapters (Houlsby, Pfeiffer, parallel).
    Adapter,
    /// P-Tuning v2: per-layer prefixes trained directly.
    PtuningV2,
}

impl Method {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "lora" => Ok(Self::Lora),
            "dora" => Ok(Self::Dora),
            "full" => Ok(Self::Full),
            "freeze" => Ok(Self::Freeze),
            "ia3" => Ok(Self::Ia3),
            "prefix" => Ok(Self::Prefix),
            "ptuning-v2" => Ok(Self::PtuningV2),
            "prompt" => Ok(Self::Prompt),
            "adapter" => Ok(Self::Adapter),
            _ => Err(Error::usage(format!(
                "unknown --method {s}; supported: lora, dora, ia3, adapter, prefix, ptuning-v2, prompt, full, freeze"
            ))),
        }
    }
}

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub model: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub method: Method,
    pub lora: LoraConfig,
    /// freeze: which base tensors train (regexes over HF tensor names, or `last:N`,
    /// `lm_head`, `norms`, `embed`).
    pub trainable: Vec<String>,
    pub data_opts: DataOptions,
    pub pack: bool,
    pub optim: AdamW,
    pub schedule: Schedule,
    pub warmup: u64,
    pub batch: usize,
    pub grad_accum: usize,
    pub epochs: f64,
    pub steps: Option<u64>,
    pub clip: Option<f32>,
    pub seed: u64,
    pub val_data: Option<PathBuf>,
    pub val_split: f64,
    pub eval_every: u64,
    pub save_every: u64,
    pub resume: Option<PathBuf>,
    pub log: Option<PathBuf>,
    pub plan: bool,
    pub check_data: Option<usize>,
    pub quiet: bool,
    /// Quantize the base's linear weights to 4 bits while loading (QLoRA on a plain model).
    pub quantize: Option<crate::model::QuantizeOnLoad>,
    /// IA3 targets and feed-forward modules (None = PEFT's defaults for the architecture).
    pub ia3: Option<super::ia3::Ia3Config>,
    /// Prefix tuning / P-Tuning v2: virtual tokens and the MLP's hidden size (prefix only).
    pub prefix: super::prefix::PrefixConfig,
    /// Prompt tuning: text to initialize the virtual tokens from (None = random).
    pub prompt_init_text: Option<String>,
    /// Prompt tuning: how the virtual tokens start (None = text when `prompt_init_text` is
    /// set, else random).
    pub prompt_init: Option<super::prompt::PromptInit>,
    /// Bottleneck adapters.
    pub bottleneck: super::bottleneck::BottleneckConfig,
    /// `--compute-dtype bf16`: frozen f32 linear weights multiply in bf16 with f32
    /// accumulation (torch autocast's semantics); adapters, norms, attention and the LM head
    /// stay f32.
    pub compute_bf16: bool,
    /// Where the forward and backward passes run (`--device`; the GPU computes in bf16).
    pub device: crate::gpu::DeviceSpec,
}

pub struct TrainSummary {
    pub steps: u64,
    pub final_loss: f64,
    pub eval_loss_before: Option<f64>,
    pub eval_loss_after: Option<f64>,
    pub interrupted: bool,
    /// Model FLOPs per second of the training steps and their fraction of the measured FMA
    /// peak (train::flops, kernels::peak); None when no step ran.
    pub gflops: Option<f64>,
    pub mfu: Option<f64>,
}

/// Train, then write the output (see [`run_steps`]); a failed run leaves no empty output folder.
pub fn run(opts: &TrainOptions) -> Result<TrainSummary> {
    remove_empty_output_on_error(&opts.out, || run_steps(opts))
}

/// Run `body`, which writes into `out`. If it fails and `out` did not exist before, remove the
/// folders it left empty (`OUT/checkpoints`, `OUT`): a run that failed before writing anything,
/// e.g. on a full disk, leaves nothing behind. Folders with files (checkpoints, a log) stay.
pub(crate) fn remove_empty_output_on_error<T>(
    out: &Path,
    body: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let existed = out.exists();
    let r = body();
    if r.is_err() && !existed {
        // remove_dir only removes empty folders
        let _ = std::fs::remove_dir(out.join("checkpoints"));
        let _ = std::fs::remove_dir(out);
    }
    r
}

/// Everything a run needs, in the order the loop uses it.
fn run_steps(opts: &TrainOptions) -> Result<TrainSummary> {
    check_options(opts)?;
    // Data parallel (docs/distributed.md): the launcher's RANK/WORLD_SIZE/MASTER_* (a no-op
    // for one process). Every rank runs this whole function on the same data in the same
    // order; each trains on its share of every window, the gradients are summed, every rank
    // steps identically. Only rank 0 prints and writes files.
    let mut comm = crate::dist::from_env()?;
    let comm = comm.as_mut();
    let rank0 = crate::dist::only_rank0_speaks(comm);
    // Models with learned positions (GPT-2) cannot take sequences longer than their position
    // table: truncate (or pack) to that length instead of failing in the middle of training.
    let config = crate::model::ModelConfig::load(&opts.model)?;
    let clamped;
    let opts = if config.rope.is_none() && opts.data_opts.max_len > config.max_positions {
        crate::cli::warn(format!(
            "--max-len {} exceeds the model's {} positions; using {}",
            opts.data_opts.max_len, config.max_positions, config.max_positions
        ));
        let mut o = opts.clone();
        o.data_opts.max_len = config.max_positions;
        clamped = o;
        &clamped
    } else {
        opts
    };
    let progress = Progress::new(opts.quiet);
    let tok = TextTokenizer::load(&opts.model)?;
    let (mut examples, stats) = data::load_examples(&opts.data, &tok, &opts.data_opts)?;
    if let Some(n) = opts.check_data {
        if rank0 {
            print!("{}", data::check_data_report(&examples, &tok, n));
        }
        return Ok(TrainSummary {
            steps: 0,
            final_loss: f64::NAN,
            eval_loss_before: None,
            eval_loss_after: None,
            interrupted: false,
            gflops: None,
            mfu: None,
        });
    }
    crate::cli::info(format!(
        "data: {} examples ({} format), {} tokens, {} with loss; {} truncated, {} dropped, {} bad lines skipped",
        examples.len(),
        stats.format,
        stats.tokens,
        stats.loss_tokens,
        stats.truncated,
        stats.dropped,
        stats.skipped_bad_lines
    ));
    let val: Vec<Example> = match &opts.val_data {
        Some(p) => data::load_examples(p, &tok, &opts.data_opts)?.0,
        None if opts.val_split > 0.0 => {
            let (train, val) = split_validation(examples, opts.val_split, opts.seed);
            examples = train;
            val
        }
        None => Vec::new(),
    };

    let mut model = Model::load_with(&opts.model, opts.quantize)?;
    if model.has_4bit_weights() && !opts.quiet {
        let (n, b) = model.linear_weight_memory();
        crate::cli::info(format!(
            "4-bit base: {:.1} MB for {:.1}M linear weights ({:.3} byte/param; embeddings, norms and head in f32)",
            b as f64 / 1e6,
            n as f64 / 1e6,
            b as f64 / n.max(1) as f64
        ));
    }
    let mut state = TrainState::new(model.linears().len());
    let mut init_rng = Rng::new(opts.seed);
    let attached = attach_method(opts, &model, &mut state, &tok, &mut init_rng)?;
    apply_compute_dtype(opts, &mut model, &state, true);
    full::refuse_4bit_trainables(&model, &state, &opts.model)?;
    let trainable = state.trainable_count();
    let all = model.config.param_count()
        + if matches!(
            opts.method,
            Method::Lora
                | Method::Dora
                | Method::Ia3
                | Method::Prefix
                | Method::PtuningV2
                | Method::Prompt
                | Method::Adapter
        ) {
            trainable
        } else {
            0
        };
    if rank0 {
        println!(
            "trainable params: {trainable} || all params: {all} || trainable%: {:.4}",
            100.0 * trainable as f64 / all as f64
        );
    }

    // Micro-batches: rows of examples (one example each, or packed groups).
    let rows: Vec<Vec<usize>> = if opts.pack {
        data::pack(&examples, opts.data_opts.max_len)
    } else {
        (0..examples.len()).map(|i| vec![i]).collect()
    };
    let batches_per_epoch = rows.len().div_ceil(opts.batch.max(1)) as u64;
    let steps_per_epoch = batches_per_epoch.div_ceil(opts.grad_accum.max(1) as u64);
    let total_steps = opts
        .steps
        .unwrap_or(((steps_per_epoch as f64) * opts.epochs).ceil() as u64)
        .max(1);
    if opts.plan {
        if rank0 {
            print!(
                "{}",
                super::plan::report(&model, &state, opts, &examples, total_steps)
            );
        }
        return Ok(TrainSummary {
            steps: 0,
            final_loss: f64::NAN,
            eval_loss_before: None,
            eval_loss_after: None,
            interrupted: false,
            gflops: None,
            mfu: None,
        });
    }

    let mut prog = start_progress(opts.seed);
    // The step whose checkpoint is on disk in OUT (the final save is not repeated).
    let mut saved_at = None;
    if let Some(r) = &opts.resume {
        let dir = checkpoint::resolve(r)?;
        prog = checkpoint::load(&dir, &mut model, &mut state)?;
        crate::cli::info(format!(
            "resumed from {} at step {}",
            dir.display(),
            prog.step
        ));
        saved_at = resumed_in_place(&opts.out, &dir).then_some(prog.step);
    }
    // Data parallel: the ranks must agree on data, options and (resumed) trainable values
    // before rank 0 touches OUT (and its checkpoints, which the others may still be reading).
    crate::dist::check_same_job(
        comm,
        &model,
        &state,
        &[
            ("rows", rows.len() as u64),
            ("tokens", stats.tokens as u64),
            ("total steps", total_steps),
            ("step", prog.step),
            ("global batch", (opts.batch * opts.grad_accum) as u64),
            ("seed", opts.seed),
        ],
    )?;
    // Refuse before creating anything: `--out` naming the data file must not fail on
    // create_dir_all with a confusing I/O error, and must leave nothing behind.
    let mut log = if rank0 {
        prepare_output(&opts.out, &[&opts.model, &opts.data], opts.log.as_deref())?
    } else {
        None
    };
    let stop = stop_on_ctrl_c();
    // Test hook (undocumented for users): behave as if Ctrl-C arrived during step N, so that
    // the interrupt-and-resume path can be tested without racing a signal against the loop.
    let stop_after: Option<u64> = std::env::var("PEFTKIT_STOP_AFTER_STEP")
        .ok()
        .and_then(|s| s.trim().parse().ok());

    // The LM head packed for the loss's forward product: once per run when the head is
    // frozen, again after each optimizer step when it trains.
    let head_trains = state.is_trainable(Slot::lm_head(&model));
    let mut head_pack = gemm::PackedWeight::default();
    let mut head_pack_fresh = false;
    let refresh_head = |p: &mut gemm::PackedWeight, fresh: &mut bool, model: &Model| {
        if !*fresh {
            pack_head(p, model);
            *fresh = true;
        }
    };

    // Data parallel: each rank evaluates its share of the batches and the sums are added up.
    // On a GPU the evaluation runs there too (the backend's forward pass, no gradients).
    let eval = |model: &Model,
                state: &TrainState,
                head: &gemm::PackedWeight,
                backend: &mut super::backend::Backend,
                comm: &mut dyn crate::dist::Communicator|
     -> Result<Option<f64>> {
        if val.is_empty() {
            return Ok(None);
        }
        let engine = Engine::for_eval(model).with_head_pack(head);
        // The evaluation engine only reads the adapters; it runs on a copy of them (small)
        // so that no gradient or moment of the run can change.
        let mut st = state.adapters_only();
        let (mut nll, mut n) = (0.0, 0usize);
        let chunks: Vec<&[Example]> = val.chunks(opts.batch.max(1)).collect();
        let mine = crate::dist::shard_range(chunks.len(), comm.rank(), comm.world());
        for chunk in &chunks[mine] {
            let batch = Batch {
                ids: chunk.iter().map(|e| &e.ids[..]).collect(),
                labels: chunk.iter().map(|e| &e.labels[..]).collect(),
            };
            if let Ok(s) = backend.eval(&engine, &mut st, &batch) {
                nll += s.nll_sum;
                n += s.loss_tokens;
            }
        }
        let mut sums = [nll, n as f64];
        comm.all_reduce_sum_f64(&mut sums)?;
        Ok((sums[1] > 0.0).then(|| sums[0] / sums[1]))
    };
    // Data parallel: `--device cuda` is this rank's GPU (dist::rank_device).
    let device = crate::dist::rank_device(opts.device);
    // (Data parallel on GPUs: AdamW stays on the device; the gradients it keeps there are summed
    // over the ranks after each window, `Backend::all_reduce_device_grads`.)
    let mut backend = super::backend::Backend::new(device, &model, &state)?;
    let eval_before = if prog.step == 0 && !val.is_empty() {
        refresh_head(&mut head_pack, &mut head_pack_fresh, &model);
        eval(&model, &state, &head_pack, &mut backend, comm)?
    } else {
        None
    };
    if let Some(l) = eval_before {
        crate::cli::info(format!(
            "eval loss before training: {l:.4} (perplexity {:.2})",
            l.exp()
        ));
        write_log(
            &mut log,
            json!({"step": 0, "eval_loss": l, "eval_perplexity": l.exp()}),
        )?;
    }

    let bar = progress.bar(total_steps, "train");
    bar.set_position(prog.step);
    let mut dropout_rng = Rng::from_state(prog.rng);
    let mut last_loss = f64::NAN;
    let mut interrupted = false;
    let start = std::time::Instant::now();
    let mut tokens_since = 0u64;
    // MFU: model FLOPs of the steps against the machine's measured FMA peak.
    // (On a GPU the CPU's peak means nothing: the log then has the rate without a fraction.)
    let peak = match opts.device {
        crate::gpu::DeviceSpec::Cpu => crate::kernels::peak::fma_peak_gflops(),
        crate::gpu::DeviceSpec::Cuda(_) | crate::gpu::DeviceSpec::Sim => f64::NAN,
    };
    let (mut flops_since, mut gflops) = (0.0f64, 0.0f64);
    let mut order: (u64, Vec<usize>) = (u64::MAX, Vec::new());
    while prog.step < total_steps {
        // This window's micro-batches (following the epoch's shuffled order). Data parallel:
        // `window` is this rank's share; the whole window's tokens normalise the loss.
        let rows_window = next_window(&mut prog, &mut order, rows.len(), opts);
        let examples_of = |w: &[Vec<usize>]| -> Vec<Vec<usize>> {
            w.iter()
                .map(|mb| mb.iter().flat_map(|&r| rows[r].iter().copied()).collect())
                .collect()
        };
        let window = examples_of(&crate::dist::shard_window(
            &rows_window,
            opts.batch,
            comm.rank(),
            comm.world(),
        ));
        let window_tokens: usize = examples_of(&rows_window)
            .iter()
            .flat_map(|b| b.iter())
            .map(|&i| {
                // With prompt tuning the first token is predicted too (by the last virtual one).
                examples[i]
                    .labels
                    .iter()
                    .skip(usize::from(state.prompt.is_none()))
                    .filter(|&&l| l != -100)
                    .count()
            })
            .sum();
        state.zero_grads();
        let mut nll = 0.0;
        let mut step_tokens = 0u64;
        let mut step_flops = 0.0f64;
        // Data parallel: this step's dropout masks come from a stream of this rank's own; the
        // shared stream (the one checkpoints save) is put back after the micro-batches.
        let shared_rng = crate::dist::rank_rng(&mut dropout_rng, comm)
            .map(|own| std::mem::replace(&mut dropout_rng, own));
        {
            refresh_head(&mut head_pack, &mut head_pack_fresh, &model);
            let engine = Engine::new(&model, &state).with_head_pack(&head_pack);
            for mb in &window {
                let batch = Batch {
                    ids: mb.iter().map(|&i| &examples[i].ids[..]).collect(),
                    labels: mb.iter().map(|&i| &examples[i].labels[..]).collect(),
                };
                step_tokens += batch.ids.iter().map(|s| s.len() as u64).sum::<u64>();
                step_flops += engine.flops(&state, &batch).total();
                let _p = crate::profile::scope("step.forward_backward");
                let s = backend
                    .forward_backward(
                        &engine,
                        &mut state,
                        &batch,
                        1.0 / window_tokens.max(1) as f32,
                        &mut dropout_rng,
                    )
                    .map_err(|e| match e {
                        // The engine does not know the step; the user needs it (and to know
                        // that the checkpoints on disk predate the failure).
                        Error::Numeric(m) => Error::Numeric(format!(
                            "at step {}: {m} (the last checkpoint is intact)",
                            prog.step + 1
                        )),
                        e => e,
                    })?;
                nll += s.nll_sum;
            }
        }
        if let Some(r) = shared_rng {
            dropout_rng = r;
        }
        // Data parallel: sum the gradients and the loss statistics over the ranks.
        let mut sums = [nll, step_tokens as f64, step_flops];
        crate::dist::all_reduce_grads(comm, &mut state, &mut sums)?;
        backend.all_reduce_device_grads(comm)?;
        let (nll, step_tokens, step_flops) = (sums[0], sums[1] as u64, sums[2]);
        let loss = nll / window_tokens.max(1) as f64;
        if !loss.is_finite() {
            return Err(Error::Numeric(format!(
                "loss is {loss} at step {}; stopped (the last checkpoint is intact)",
                prog.step + 1
            )));
        }
        let _p = crate::profile::scope("step.optimizer");
        let lr = opts.optim.lr * opts.schedule.factor(prog.step, opts.warmup, total_steps);
        prog.step += 1;
        let grad_norm = backend.clip_and_step(
            &opts.optim,
            &mut model,
            &mut state,
            opts.clip,
            lr,
            prog.step,
        )?;
        // (Only the CPU engine reads the packs; a GPU has the head on the device.)
        head_pack_fresh &= !head_trains || !backend.is_cpu();
        drop(_p);
        prog.tokens += step_tokens;
        tokens_since += step_tokens;
        prog.rng = dropout_rng.state();
        last_loss = loss;
        flops_since += step_flops;
        let tps = tokens_since as f64 / start.elapsed().as_secs_f64().max(1e-9);
        gflops = flops_since / start.elapsed().as_secs_f64().max(1e-9) / 1e9;
        bar.set_position(prog.step);
        bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
        write_log(
            &mut log,
            json!({"step": prog.step, "epoch": prog.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": prog.tokens, "tokens_per_second": tps, "gflops": gflops, "mfu": gflops / peak}),
        )?;
        if opts.eval_every > 0 && prog.step.is_multiple_of(opts.eval_every) {
            refresh_head(&mut head_pack, &mut head_pack_fresh, &model);
            if let Some(l) = eval(&model, &state, &head_pack, &mut backend, comm)? {
                write_log(
                    &mut log,
                    json!({"step": prog.step, "eval_loss": l, "eval_perplexity": l.exp()}),
                )?;
                bar.println(format!("step {}: eval loss {l:.4}", prog.step));
            }
        }
        // Data parallel: Ctrl-C reaches the ranks at different moments; all stop together.
        let interrupted_now =
            crate::dist::any(comm, stop.load(Ordering::SeqCst))? || stop_after == Some(prog.step);
        checkpoint_if_due(
            &opts.out,
            opts.save_every,
            interrupted_now,
            rank0,
            &mut backend,
            &mut model,
            &mut state,
            &prog,
            &mut saved_at,
        )?;
        if interrupted_now {
            interrupted = true;
            break;
        }
    }
    bar.finish_and_clear();
    backend.sync_to_host(&mut model, &mut state)?;
    if !interrupted && rank0 {
        final_checkpoint(&opts.out, &model, &state, &prog, saved_at)?;
    }
    refresh_head(&mut head_pack, &mut head_pack_fresh, &model);
    let eval_after = eval(&model, &state, &head_pack, &mut backend, comm)?;
    if let Some(l) = eval_after {
        crate::cli::info(format!(
            "eval loss after training: {l:.4} (perplexity {:.2})",
            l.exp()
        ));
        write_log(
            &mut log,
            json!({"step": prog.step, "eval_loss": l, "eval_perplexity": l.exp()}),
        )?;
    }
    if interrupted {
        crate::cli::info(format!(
            "interrupted: checkpoint saved at step {}; continue with --resume {}",
            prog.step,
            opts.out.display()
        ));
    } else if rank0 {
        save_output(opts, &attached, &model, &state, "CAUSAL_LM")?;
    }
    Ok(TrainSummary {
        steps: prog.step,
        final_loss: last_loss,
        eval_loss_before: eval_before,
        eval_loss_after: eval_after,
        interrupted,
        gflops: (flops_since > 0.0).then_some(gflops),
        mfu: (flops_since > 0.0 && peak.is_finite()).then_some(gflops / peak),
    })
}

/// The method's settings as attached (what the output writer needs).
pub struct Attached {
    pub lora: LoraConfig,
    pub ia3: super::ia3::Ia3Config,
    pub prefix: super::prefix::PrefixConfig,
    pub prompt: super::prompt::PromptConfig,
    pub prompt_init: super::prompt::PromptInit,
    pub bottleneck: super::bottleneck::BottleneckConfig,
}

/// Attach the method's trainable tensors (adapters, or base tensors for full/freeze) to
/// `state`.
pub fn attach_method(
    opts: &TrainOptions,
    model: &Model,
    state: &mut TrainState,
    tok: &TextTokenizer,
    init_rng: &mut Rng,
) -> Result<Attached> {
    let mut lora_cfg = opts.lora.clone();
    let mut prefix_cfg = opts.prefix.clone();
    let mut bottleneck_cfg = opts.bottleneck.clone();
    let mut prompt_cfg = super::prompt::PromptConfig {
        num_virtual_tokens: opts.prefix.num_virtual_tokens,
        init_text: None,
        base_model_name_or_path: None,
    };
    let mut prompt_init = super::prompt::PromptInit::default();
    let mut ia3_cfg = opts
        .ia3
        .clone()
        .unwrap_or_else(|| super::ia3::Ia3Config::default_for(model.config.arch));
    match opts.method {
        Method::Lora | Method::Dora => {
            lora_cfg.dora = opts.method == Method::Dora;
            if lora_cfg.base_model_name_or_path.is_none() {
                lora_cfg.base_model_name_or_path = Some(opts.model.display().to_string());
            }
            lora::attach(model, state, &lora_cfg, init_rng)?;
            if !lora_cfg.modules_to_save.is_empty() {
                let mts = lora_cfg.modules_to_save.clone();
                full::register(
                    model,
                    state,
                    |n| {
                        mts.iter().any(|m| {
                            n.starts_with(&format!("{m}.")) || n.contains(&format!(".{m}."))
                        })
                    },
                    false,
                );
                // Saved under the PEFT names (base_model.model.<path>).
                for (slot, p) in &mut state.params {
                    if !matches!(
                        slot,
                        super::params::Slot::LoraA(_)
                            | super::params::Slot::LoraB(_)
                            | super::params::Slot::LoraMagnitude(_)
                    ) && !p.name.starts_with("base_model.model.")
                    {
                        p.name = format!("base_model.model.{}", p.name);
                    }
                }
            }
        }
        Method::Ia3 => {
            ia3_cfg.base_model_name_or_path = Some(opts.model.display().to_string());
            super::ia3::attach(model, state, &ia3_cfg)?;
        }
        Method::Prefix | Method::PtuningV2 => {
            prefix_cfg.base_model_name_or_path = Some(opts.model.display().to_string());
            if opts.method == Method::PtuningV2 {
                prefix_cfg.projection = None;
            } else if prefix_cfg.projection.is_none() {
                // PEFT's default encoder_hidden_size is the token dimension.
                prefix_cfg.projection = Some(model.config.kv_dim());
            }
            super::prefix::attach(model, state, &prefix_cfg, init_rng)?;
        }
        Method::Adapter => {
            bottleneck_cfg.base_model_name_or_path = Some(opts.model.display().to_string());
            super::bottleneck::attach(model, state, &bottleneck_cfg, init_rng)?;
        }
        Method::Prompt => {
            prompt_cfg.base_model_name_or_path = Some(opts.model.display().to_string());
            if let Some(t) = &opts.prompt_init_text {
                prompt_cfg.init_text = Some((t.clone(), tok.encode(t)?));
            }
            prompt_init = opts
                .prompt_init
                .unwrap_or_else(|| super::prompt::PromptInit::of(&prompt_cfg));
            super::prompt::attach_with(model, state, &prompt_cfg, prompt_init, init_rng)?;
        }
        Method::Full => {
            full::register(model, state, |_| true, false);
        }
        Method::Freeze => {
            let sel = full::Selector::parse(&opts.trainable, model.blocks.len())?;
            let n = full::register(model, state, |name| sel.matches(name), false);
            if n == 0 {
                return Err(Error::usage(
                    "--trainable selects no tensor; see --help for the forms",
                ));
            }
        }
    }
    Ok(Attached {
        lora: lora_cfg,
        ia3: ia3_cfg,
        prefix: prefix_cfg,
        prompt: prompt_cfg,
        prompt_init,
        bottleneck: bottleneck_cfg,
    })
}

/// Apply `--compute-dtype`: with bf16, every frozen f32 linear weight gets its bf16 packs
/// (trainable base weights of full/freeze runs stay f32, since the packs are not refreshed).
/// Pack the current LM head into `p` for the loss's f32 forward product
/// ([`super::engine::Engine::with_head_pack`]); nothing to do when the model's bf16 head packs
/// carry the loss's products ([`Model::use_bf16_head`]).
pub(crate) fn pack_head(p: &mut gemm::PackedWeight, model: &Model) {
    if model.head_bf16.is_none() {
        let (w, vocab, h) = (model.head_weight(), model.config.vocab, model.config.hidden);
        p.repack(w, vocab, h);
        // The loss's input gradient multiplies by the head once per chunk of rows: one
        // packing per step instead of one per chunk (a sixth of a small model's step).
        p.repack_input_grad(w, vocab, h);
    }
}

/// `lm_loss`: the objective multiplies by the LM head (not a reward model's score head).
pub(crate) fn apply_compute_dtype(
    opts: &TrainOptions,
    model: &mut Model,
    state: &TrainState,
    lm_loss: bool,
) {
    if !opts.compute_bf16 {
        return;
    }
    let _p = crate::profile::scope("bf16.pack");
    for (i, l) in model.linears_mut().into_iter().enumerate() {
        if !state.is_trainable(Slot::LinearWeight(i)) {
            l.use_bf16();
        }
    }
    // The loss's head products (a quarter of a small model's step), unless the head (or the
    // embedding it is tied to) trains.
    let head_slot = Slot::lm_head(model);
    if lm_loss && !state.is_trainable(head_slot) {
        model.use_bf16_head();
    }
}

/// Write the run's result: a PEFT adapter (`task_type` as given) or, for full/freeze, a model
/// folder.
pub fn save_output(
    opts: &TrainOptions,
    a: &Attached,
    model: &Model,
    state: &TrainState,
    task_type: &str,
) -> Result<()> {
    state.check_synced()?;
    match opts.method {
        Method::Lora | Method::Dora => {
            lora::save_adapter(&opts.out, &a.lora, model, state, task_type)?
        }
        Method::Ia3 => super::ia3::save_adapter(&opts.out, &a.ia3, model, state, task_type)?,
        Method::Prefix | Method::PtuningV2 => {
            super::prefix::save_adapter(&opts.out, &a.prefix, model, state, task_type)?
        }
        Method::Prompt => super::prompt::save_adapter(
            &opts.out,
            &a.prompt,
            a.prompt_init,
            model,
            state,
            task_type,
        )?,
        Method::Adapter => super::bottleneck::save_adapter(&opts.out, &a.bottleneck, model, state)?,
        Method::Full | Method::Freeze => output::save_model(&opts.out, &opts.model, model)?,
    }
    Ok(())
}

/// Hold out `frac` of `items` (at least one, leaving at least one) for evaluation, chosen by a
/// seeded shuffle; order within each part is kept. Fewer than two items are all for training.
/// Options that parse but cannot mean anything (the loops clamp a zero batch to 1 and would
/// happily step a negative learning rate): refuse them before any file is read. Shared by
/// peft-train, rm-train, dpo-train and ppo-train.
pub(crate) fn check_options(opts: &TrainOptions) -> Result<()> {
    // Before anything is loaded: a build without the cuda feature cannot use a GPU.
    opts.device.check_available()?;
    let lr = opts.optim.lr;
    if !lr.is_finite() || lr < 0.0 {
        return Err(Error::usage(format!(
            "--lr {lr}: expected a learning rate >= 0"
        )));
    }
    if opts.batch == 0 || opts.grad_accum == 0 {
        return Err(Error::usage("--batch and --grad-accum must be at least 1"));
    }
    if opts.steps.is_none() && !(opts.epochs.is_finite() && opts.epochs > 0.0) {
        return Err(Error::usage(format!(
            "--epochs {}: expected a positive number (or give --steps)",
            opts.epochs
        )));
    }
    if !(0.0..1.0).contains(&opts.val_split) {
        return Err(Error::usage(format!(
            "--val-split {}: expected a fraction in [0, 1)",
            opts.val_split
        )));
    }
    Ok(())
}

pub(crate) fn split_validation<T>(items: Vec<T>, frac: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    if items.len() < 2 {
        return (items, Vec::new());
    }
    let mut idx: Vec<usize> = (0..items.len()).collect();
    Rng::new(seed ^ 0x5EED_DA7A).shuffle(&mut idx);
    let n_val = ((items.len() as f64 * frac).round() as usize).clamp(1, items.len() - 1);
    let mut is_val = vec![false; items.len()];
    idx[..n_val].iter().for_each(|&i| is_val[i] = true);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (item, v) in items.into_iter().zip(is_val) {
        if v {
            val.push(item)
        } else {
            train.push(item)
        }
    }
    (train, val)
}

/// The row indices of the next accumulation window's micro-batches, following each epoch's
/// shuffled order (a short last window ends an epoch when training by epochs), advancing `prog`.
pub(crate) fn next_window(
    prog: &mut CkptProgress,
    order: &mut (u64, Vec<usize>),
    n_rows: usize,
    opts: &TrainOptions,
) -> Vec<Vec<usize>> {
    let batches_per_epoch = n_rows.div_ceil(opts.batch.max(1)) as u64;
    let mut window: Vec<Vec<usize>> = Vec::new();
    while window.len() < opts.grad_accum.max(1) {
        if prog.batch_in_epoch >= batches_per_epoch {
            prog.epoch += 1;
            prog.batch_in_epoch = 0;
            if opts.steps.is_none() && !window.is_empty() {
                break;
            }
        }
        if order.0 != prog.epoch {
            *order = (prog.epoch, epoch_order(n_rows, opts.seed, prog.epoch));
        }
        let b = prog.batch_in_epoch as usize * opts.batch;
        window.push(order.1[b..(b + opts.batch).min(order.1.len())].to_vec());
        prog.batch_in_epoch += 1;
    }
    window
}

/// The permutation of rows for an epoch: a fixed function of seed and epoch, so that a resumed
/// run sees the same order.
pub(crate) fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xDA7A).shuffle(&mut order);
    order
}

/// At the end of a step: a checkpoint in `out` when the step is a multiple of `save_every` or
/// the run stops after it, written by `writer` (rank 0; the other ranks only note the step).
/// A GPU's optimizer holds the current values and moments, so they come back first.
#[allow(clippy::too_many_arguments)]
pub(crate) fn checkpoint_if_due(
    out: &Path,
    save_every: u64,
    stopping: bool,
    writer: bool,
    backend: &mut super::backend::Backend,
    model: &mut Model,
    state: &mut TrainState,
    prog: &CkptProgress,
    saved_at: &mut Option<u64>,
) -> Result<()> {
    if (save_every > 0 && prog.step.is_multiple_of(save_every)) || stopping {
        if writer {
            backend.sync_to_host(model, state)?;
            save_checkpoint(out, model, state, prog)?;
        }
        *saved_at = Some(prog.step);
    }
    Ok(())
}

pub(crate) fn save_checkpoint(
    out: &Path,
    model: &Model,
    state: &TrainState,
    prog: &CkptProgress,
) -> Result<()> {
    state.check_synced()?;
    let dir = out.join("checkpoints");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    checkpoint::save(&dir.join(format!("step-{}", prog.step)), model, state, prog)?;
    prune_checkpoints(&dir);
    Ok(())
}

/// The checkpoint at the end of a run: written unless `saved_at` says this step's is already
/// in OUT (saved by the loop, or the one the run resumed from in place). Writing it twice
/// replaced the folder with the same bytes, the one moment it was briefly absent.
pub(crate) fn final_checkpoint(
    out: &Path,
    model: &Model,
    state: &TrainState,
    prog: &CkptProgress,
    saved_at: Option<u64>,
) -> Result<()> {
    if saved_at == Some(prog.step) {
        // A run killed between its last save and its pruning left one checkpoint too many.
        prune_checkpoints(&out.join("checkpoints"));
        return Ok(());
    }
    save_checkpoint(out, model, state, prog)
}

/// Keep the two newest checkpoints. An old one is renamed away before it is deleted: removed
/// in place, a kill mid-way left a step-N folder with some of its files gone (found by
/// tests/tests/kill_resume.rs).
fn prune_checkpoints(dir: &Path) {
    let all = checkpoint::list(dir);
    for old in all.iter().take(all.len().saturating_sub(2)) {
        let _ = crate::io::atomic::remove_dir_atomically(old);
    }
}

/// Whether `ckpt` (the checkpoint a run resumed from) is `out`'s own `checkpoints/step-N`: then
/// the run's final checkpoint need not be written again when no step is left to train.
pub(crate) fn resumed_in_place(out: &Path, ckpt: &Path) -> bool {
    match (
        ckpt.parent().map(Path::canonicalize),
        out.join("checkpoints").canonicalize(),
    ) {
        (Some(Ok(a)), Ok(b)) => a == b,
        _ => false,
    }
}

/// Progress of a run that starts at step 0 (the dropout RNG seeded from `seed`).
pub(crate) fn start_progress(seed: u64) -> CkptProgress {
    CkptProgress {
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        rng: Rng::new(seed.wrapping_add(1)).state(),
        tokens: 0,
        extra: None,
    }
}

/// Refuse an output that would overwrite an input (before creating anything, so that `--out`
/// naming an input leaves nothing behind), create the output folder and open the JSONL log for
/// appending.
pub(crate) fn prepare_output(
    out: &Path,
    inputs: &[&Path],
    log: Option<&Path>,
) -> Result<Option<std::fs::File>> {
    crate::io::atomic::refuse_overwriting_inputs(out, inputs)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    // What killed runs left behind: output files and checkpoint folders they were writing,
    // old checkpoints they were deleting (checkpoint folders can be large).
    crate::io::atomic::remove_stale_temps(out);
    crate::io::atomic::remove_stale_temps(&out.join("checkpoints"));
    log.map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| Error::io(p, e))
    })
    .transpose()
}

/// A flag that Ctrl-C sets: the loops save a checkpoint and stop at the end of the step. A
/// second Ctrl-C while saving falls through to the default (the checkpoint on disk stays whole
/// either way: it is written to a temporary name first).
pub(crate) fn stop_on_ctrl_c() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let _ = ctrlc::set_handler(move || s.store(true, Ordering::SeqCst));
    stop
}

pub(crate) fn write_log(log: &mut Option<std::fs::File>, v: serde_json::Value) -> Result<()> {
    if let Some(f) = log {
        // One write per record: `writeln!` on the unbuffered file issued a write per JSON
        // token, so a kill could leave half a record for the resumed run to append to.
        let line = format!("{v}\n");
        f.write_all(line.as_bytes())
            .map_err(|e| Error::io("metrics log", e))?;
    }
    Ok(())
}

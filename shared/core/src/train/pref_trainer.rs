//! The training loop of rm-train and dpo-train: preference pairs in micro-batches (chosen rows
//! then rejected rows), gradient accumulation, AdamW with schedule and clipping, held-out
//! accuracy, JSONL metrics, checkpoints and resume, and the output (a PEFT adapter or a model
//! folder). Methods attach exactly as in peft-train ([`super::trainer::attach_method`]).

use super::backend::Backend;
use super::checkpoint;
use super::engine::{Batch, Engine};
use super::pairs::{load_pairs, Pair, PairOptions};
use super::params::{ParamState, Slot, TrainState};
use super::preference::{DpoLoss, DpoObjective, RewardLoss, SeqLogprobs};
use super::trainer::{
    attach_method, checkpoint_if_due, final_checkpoint, next_window, prepare_output,
    resumed_in_place, save_output, split_validation, start_progress, stop_on_ctrl_c, write_log,
    Method, TrainOptions,
};
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::kernels::gemm;
use crate::model::Model;
use crate::progress::Progress;
use crate::rng::Rng;
use crate::tokenizer::TextTokenizer;
use serde_json::json;
use std::sync::atomic::Ordering;

#[derive(Clone, Debug)]
pub enum PrefTask {
    /// A reward model: score head on the last non-pad token, pairwise loss.
    Reward { center: Option<f32> },
    /// DPO against the base model with the adapter off (or given reference log-probs).
    Dpo {
        loss: DpoLoss,
        beta: f32,
        label_smoothing: f32,
    },
}

#[derive(Clone, Debug)]
pub struct PrefOptions {
    /// Model, data, method, optimizer, schedule, batch (in pairs), steps, evaluation,
    /// checkpoints and logging, as peft-train takes them.
    pub train: TrainOptions,
    pub task: PrefTask,
    pub pairs: PairOptions,
}

pub struct PrefSummary {
    pub steps: u64,
    pub final_loss: f64,
    pub eval_before: Option<Metrics>,
    pub eval_after: Option<Metrics>,
    pub interrupted: bool,
    /// Data parallel: whether this process prints results (rank 0, or the only process).
    pub rank0: bool,
}

/// Loss and preference metrics over a set of pairs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Metrics {
    pub loss: f64,
    /// Fraction of pairs where the chosen one scores higher (reward, or DPO's implicit reward).
    pub accuracy: f64,
    /// Mean of (chosen − rejected) reward.
    pub margin: f64,
    pub chosen: f64,
    pub rejected: f64,
    pub pairs: usize,
}

impl Metrics {
    fn add(&mut self, loss_sum: f64, rewards: &[(f64, f64)]) {
        self.loss += loss_sum;
        for &(c, r) in rewards {
            self.accuracy += f64::from(u8::from(c > r));
            self.margin += c - r;
            self.chosen += c;
            self.rejected += r;
        }
        self.pairs += rewards.len();
    }

    /// Data parallel: the sums as numbers for the reduction over the ranks, and back.
    fn sums(&self) -> [f64; 6] {
        [
            self.loss,
            self.accuracy,
            self.margin,
            self.chosen,
            self.rejected,
            self.pairs as f64,
        ]
    }

    fn from_sums(s: &[f64]) -> Self {
        Self {
            loss: s[0],
            accuracy: s[1],
            margin: s[2],
            chosen: s[3],
            rejected: s[4],
            pairs: s[5] as usize,
        }
    }

    fn finish(mut self) -> Self {
        let n = self.pairs.max(1) as f64;
        self.loss /= n;
        self.accuracy /= n;
        self.margin /= n;
        self.chosen /= n;
        self.rejected /= n;
        self
    }

    fn json(&self, prefix: &str) -> serde_json::Value {
        json!({
            format!("{prefix}loss"): self.loss,
            format!("{prefix}accuracy"): self.accuracy,
            format!("{prefix}margin"): self.margin,
            format!("{prefix}rewards_chosen"): self.chosen,
            format!("{prefix}rewards_rejected"): self.rejected,
        })
    }
}

/// Rows of a micro-batch: chosen sequences of `pairs`, then their rejected ones.
fn pair_batch<'a>(data: &'a [Pair], pairs: &[usize]) -> Batch<'a> {
    let mut ids: Vec<&[u32]> = pairs.iter().map(|&i| &data[i].chosen.ids[..]).collect();
    ids.extend(pairs.iter().map(|&i| &data[i].rejected.ids[..]));
    let mut labels: Vec<&[i32]> = pairs.iter().map(|&i| &data[i].chosen.labels[..]).collect();
    labels.extend(pairs.iter().map(|&i| &data[i].rejected.labels[..]));
    Batch { ids, labels }
}

/// Run one micro-batch of `pairs` with the task's objective; returns (loss sum, rewards).
/// `train`: a training pass (dropout, gradients); else evaluation. `engine` is the CPU
/// engine of the same kind; on a GPU the backend runs it (train::backend).
#[allow(clippy::too_many_arguments)]
fn run_pairs(
    backend: &mut Backend,
    engine: &Engine,
    model: &Model,
    train: bool,
    state: &mut TrainState,
    task: &PrefTask,
    data: &[Pair],
    reference: &[(f64, f64)],
    pairs: &[usize],
    pad: Option<u32>,
    loss_scale: f32,
    rng: &mut Rng,
) -> Result<(f64, Vec<(f64, f64)>)> {
    let batch = pair_batch(data, pairs);
    match task {
        PrefTask::Reward { center } => {
            let mut obj = RewardLoss {
                pad,
                margins: pairs.iter().map(|&i| data[i].margin).collect(),
                center: *center,
                loss_scale,
                rewards: Vec::new(),
            };
            let s = backend
                .forward_backward_with(engine, model, state, &batch, rng, train, &mut obj)?;
            let r = obj
                .rewards
                .iter()
                .map(|&(c, r)| (c as f64, r as f64))
                .collect();
            Ok((s.nll_sum, r))
        }
        PrefTask::Dpo {
            loss,
            beta,
            label_smoothing,
        } => {
            let refs: Vec<(f64, f64)> = pairs.iter().map(|&i| reference[i]).collect();
            let mut obj = DpoObjective {
                kind: *loss,
                beta: *beta,
                label_smoothing: *label_smoothing,
                reference: refs.clone(),
                loss_scale,
                policy: Vec::new(),
            };
            let s = backend
                .forward_backward_with(engine, model, state, &batch, rng, train, &mut obj)?;
            let b = *beta as f64;
            let r = obj
                .policy
                .iter()
                .zip(&refs)
                .map(|(&(pc, pr), &(rc, rr))| (b * (pc - rc), b * (pr - rr)))
                .collect();
            Ok((s.nll_sum, r))
        }
    }
}

/// DPO's reference: log-probabilities of every pair under the base model (no adapter), in
/// batches, unless the data gave them.
///
/// Data parallel: every rank needs all of them (each pair may fall on any rank in a later
/// epoch). Each rank computes a contiguous share of the batches, the very batches of one
/// process (so the very values), leaves the rest 0, and one sum over the ranks fills them in
/// on every rank: adding zeros is exact, so all ranks hold the single-process values.
#[allow(clippy::too_many_arguments)]
fn reference_logps(
    backend: &mut Backend,
    model: &Model,
    policy: &mut TrainState,
    data: &[Pair],
    batch: usize,
    head: &gemm::PackedWeight,
    comm: &mut dyn Communicator,
) -> Result<Vec<(f64, f64)>> {
    let engine = Engine::for_eval(model).with_head_pack(head);
    let mut base = TrainState::new(model.linears().len());
    let mut out = vec![(0.0, 0.0); data.len()];
    let todo: Vec<usize> = (0..data.len())
        .filter(|&i| data[i].reference.is_none())
        .collect();
    for i in 0..data.len() {
        if let Some(r) = data[i].reference {
            out[i] = r;
        }
    }
    let chunks: Vec<&[usize]> = todo.chunks(batch.max(1)).collect();
    let mine = crate::dist::shard_range(chunks.len(), comm.rank(), comm.world());
    let mut got = vec![0.0f64; 2 * todo.len()];
    let mut at: usize = chunks[..mine.start].iter().map(|c| c.len()).sum();
    for chunk in &chunks[mine] {
        let b = pair_batch(data, chunk);
        let mut obj = SeqLogprobs::default();
        backend.reference_with(&engine, model, &mut base, policy, &b, &mut obj)?;
        let n = chunk.len();
        for k in 0..n {
            got[2 * (at + k)] = obj.logps[k];
            got[2 * (at + k) + 1] = obj.logps[k + n];
        }
        at += n;
    }
    if !got.is_empty() {
        comm.all_reduce_sum_f64(&mut got)?;
    }
    for (k, &i) in todo.iter().enumerate() {
        out[i] = (got[2 * k], got[2 * k + 1]);
    }
    Ok(out)
}

/// Train a reward model or a DPO policy (a failed run leaves no empty output folder).
pub fn run(opts: &PrefOptions) -> Result<PrefSummary> {
    super::trainer::remove_empty_output_on_error(&opts.train.out, || run_steps(opts))
}

fn run_steps(opts: &PrefOptions) -> Result<PrefSummary> {
    let t = &opts.train;
    super::trainer::check_options(t)?;

    // Data parallel (docs/distributed.md), as in peft-train: every rank loads the same model
    // and pairs and walks the same windows; each runs its share of every window, the
    // gradients and the metric sums are added up, every rank steps identically; only rank 0
    // prints and writes files.
    let mut comm = crate::dist::from_env()?;
    let comm = comm.as_mut();
    let rank0 = crate::dist::only_rank0_speaks(comm);
    let progress = Progress::new(t.quiet);
    let tok = TextTokenizer::load(&t.model)?;
    let (mut data, stats) = load_pairs(&t.data, &tok, &opts.pairs)?;
    crate::cli::info(format!(
        "data: {} pairs from {} records; {} truncated, {} dropped as longer than {} tokens, {} lost their completion, {} bad records skipped",
        stats.pairs,
        stats.records,
        stats.truncated,
        stats.dropped_long,
        opts.pairs.max_len,
        stats.dropped_empty,
        stats.skipped_bad_lines
    ));
    let val: Vec<Pair> = match &t.val_data {
        Some(p) => load_pairs(p, &tok, &opts.pairs)?.0,
        None if t.val_split > 0.0 => {
            let (train, val) = split_validation(data, t.val_split, t.seed);
            data = train;
            val
        }
        None => Vec::new(),
    };

    let mut model = Model::load_with(&t.model, t.quantize)?;
    let pad = tok.pad_id().or(model.config.pad_token_id).or(tok.eos_id());
    let mut state = TrainState::new(model.linears().len());
    let mut init_rng = Rng::new(t.seed);
    let mut topts = t.clone();
    let is_reward = matches!(opts.task, PrefTask::Reward { .. });
    if is_reward {
        // what PEFT writes for task_type SEQ_CLS
        for m in ["classifier", "score"] {
            if !topts.lora.modules_to_save.iter().any(|x| x == m) {
                topts.lora.modules_to_save.push(m.to_string());
            }
        }
    }
    let attached = attach_method(&topts, &model, &mut state, &tok, &mut init_rng)?;
    super::trainer::apply_compute_dtype(&topts, &mut model, &state, !is_reward);
    super::full::refuse_4bit_trainables(&model, &state, &t.model)?;
    if is_reward {
        // transformers initialises the head with N(0, initializer_range = 0.02)
        let h = model.config.hidden;
        state.score = Some((0..h).map(|_| init_rng.normal() * 0.02).collect());
        let name = if matches!(t.method, Method::Full | Method::Freeze) {
            "score.weight"
        } else {
            "base_model.model.score.weight"
        };
        state.add(Slot::Score, ParamState::new(name.into(), vec![1, h], true));
    }
    if rank0 {
        println!(
            "trainable params: {} || all params: {}",
            state.trainable_count(),
            model.config.param_count() + state.trainable_count()
        );
    }

    // Where the passes run: the CPU engine or the GPU (`--device`; data parallel: this rank's).
    let mut backend = Backend::new(crate::dist::rank_device(t.device), &model, &state)?;
    let mut head_pack = gemm::PackedWeight::default();
    super::trainer::pack_head(&mut head_pack, &model);
    let (reference, val_reference) = match opts.task {
        PrefTask::Dpo { .. } => {
            let _p = crate::profile::scope("dpo.reference");
            let b = &mut backend;
            (
                reference_logps(b, &model, &mut state, &data, t.batch, &head_pack, comm)?,
                reference_logps(b, &model, &mut state, &val, t.batch, &head_pack, comm)?,
            )
        }
        PrefTask::Reward { .. } => (Vec::new(), Vec::new()),
    };
    let head_trains = state.is_trainable(Slot::lm_head(&model));

    let batches_per_epoch = data.len().div_ceil(t.batch.max(1)) as u64;
    let steps_per_epoch = batches_per_epoch.div_ceil(t.grad_accum.max(1) as u64);
    let total_steps = t
        .steps
        .unwrap_or(((steps_per_epoch as f64) * t.epochs).ceil() as u64)
        .max(1);
    let mut prog = start_progress(t.seed);
    // The step whose checkpoint is on disk in OUT (the final save is not repeated).
    let mut saved_at = None;
    if let Some(r) = &t.resume {
        let dir = checkpoint::resolve(r)?;
        prog = checkpoint::load(&dir, &mut model, &mut state)?;
        crate::cli::info(format!(
            "resumed from {} at step {}",
            dir.display(),
            prog.step
        ));
        saved_at = resumed_in_place(&t.out, &dir).then_some(prog.step);
        // The device took the base weights before the checkpoint replaced them (DPO's
        // reference passes, just above, must see the starting ones).
        backend.after_optimizer_step(&model)?;
        if head_trains {
            super::trainer::pack_head(&mut head_pack, &model);
        }
    }
    // Data parallel: the ranks must agree on the job before rank 0 touches OUT (and its
    // checkpoints, which the others may still be reading).
    let pair_tokens: usize = data.iter().map(|p| p.chosen.len() + p.rejected.len()).sum();
    crate::dist::check_same_job(
        comm,
        &model,
        &state,
        &[
            ("pairs", data.len() as u64),
            ("tokens", pair_tokens as u64),
            ("validation pairs", val.len() as u64),
            ("total steps", total_steps),
            ("step", prog.step),
            ("global batch", (t.batch * t.grad_accum) as u64),
            ("seed", t.seed),
        ],
    )?;
    let mut log = if rank0 {
        prepare_output(&t.out, &[&t.model, &t.data], t.log.as_deref())?
    } else {
        None
    };
    write_log(
        &mut log,
        json!({"data": {"pairs": stats.pairs, "records": stats.records, "truncated": stats.truncated, "dropped_long": stats.dropped_long, "dropped_empty": stats.dropped_empty, "skipped_bad_lines": stats.skipped_bad_lines, "val_pairs": val.len()}}),
    )?;
    let stop = stop_on_ctrl_c();
    // Test hook (undocumented for users, as in peft-train): behave as if Ctrl-C arrived
    // during step N.
    let stop_after: Option<u64> = std::env::var("PEFTKIT_STOP_AFTER_STEP")
        .ok()
        .and_then(|s| s.trim().parse().ok());

    // Data parallel: each rank evaluates its share of the batches and the sums are added up.
    let evaluate = |model: &Model,
                    state: &TrainState,
                    head: &gemm::PackedWeight,
                    backend: &mut Backend,
                    comm: &mut dyn Communicator|
     -> Result<Option<Metrics>> {
        if val.is_empty() {
            return Ok(None);
        }
        let engine = Engine::for_eval(model).with_head_pack(head);
        let mut st = state.adapters_only();
        let mut m = Metrics::default();
        let idx: Vec<usize> = (0..val.len()).collect();
        let chunks: Vec<&[usize]> = idx.chunks(t.batch.max(1)).collect();
        let mine = crate::dist::shard_range(chunks.len(), comm.rank(), comm.world());
        for chunk in &chunks[mine] {
            let (l, r) = run_pairs(
                backend,
                &engine,
                model,
                false,
                &mut st,
                &opts.task,
                &val,
                &val_reference,
                chunk,
                pad,
                1.0,
                &mut Rng::new(0),
            )?;
            m.add(l, &r);
        }
        let mut sums = m.sums();
        comm.all_reduce_sum_f64(&mut sums)?;
        Ok(Some(Metrics::from_sums(&sums).finish()))
    };
    let report = |when: &str, m: &Metrics| {
        crate::cli::info(format!(
            "eval {when}: loss {:.4}, accuracy {:.3}, margin {:.4} ({} pairs)",
            m.loss, m.accuracy, m.margin, m.pairs
        ));
    };
    let eval_before = if prog.step == 0 {
        evaluate(&model, &state, &head_pack, &mut backend, comm)?
    } else {
        None
    };
    if let Some(m) = &eval_before {
        report("before training", m);
        let mut v = m.json("eval_");
        v["step"] = json!(0);
        write_log(&mut log, v)?;
    }

    let bar = progress.bar(total_steps, "train");
    bar.set_position(prog.step);
    let mut dropout_rng = Rng::from_state(prog.rng);
    let mut last_loss = f64::NAN;
    let mut interrupted = false;
    let start = std::time::Instant::now();
    let mut tokens_since = 0u64;
    let mut order: (u64, Vec<usize>) = (u64::MAX, Vec::new());
    while prog.step < total_steps {
        let window = next_window(&mut prog, &mut order, data.len(), t);
        let window_pairs: usize = window.iter().map(Vec::len).sum();
        // Data parallel: this rank's contiguous share of the window's pairs, in micro-batches
        // of at most --batch pairs (dist::shard_window); the whole window's pair count still
        // normalises the loss, so the global batch is batch × grad-accum pairs.
        let window = crate::dist::shard_window(&window, t.batch, comm.rank(), comm.world());
        state.zero_grads();
        let mut metrics = Metrics::default();
        let mut step_tokens = 0u64;
        // Data parallel: this step's dropout masks come from a stream of this rank's own; the
        // shared stream (the one checkpoints save) is put back after the micro-batches.
        let shared_rng = crate::dist::rank_rng(&mut dropout_rng, comm)
            .map(|own| std::mem::replace(&mut dropout_rng, own));
        {
            let engine = Engine::new(&model, &state).with_head_pack(&head_pack);
            for mb in &window {
                step_tokens += mb
                    .iter()
                    .map(|&i| (data[i].chosen.len() + data[i].rejected.len()) as u64)
                    .sum::<u64>();
                let (l, r) = run_pairs(
                    &mut backend,
                    &engine,
                    &model,
                    true,
                    &mut state,
                    &opts.task,
                    &data,
                    &reference,
                    mb,
                    pad,
                    1.0 / window_pairs.max(1) as f32,
                    &mut dropout_rng,
                )
                .map_err(|e| match e {
                    Error::Numeric(m) => Error::Numeric(format!(
                        "at step {}: {m} (the last checkpoint is intact)",
                        prog.step + 1
                    )),
                    e => e,
                })?;
                metrics.add(l, &r);
            }
        }
        if let Some(r) = shared_rng {
            dropout_rng = r;
        }
        // Data parallel: sum the gradients, the metric sums and the tokens over the ranks.
        let mut sums = [0.0; 7];
        sums[..6].copy_from_slice(&metrics.sums());
        sums[6] = step_tokens as f64;
        crate::dist::all_reduce_grads(comm, &mut state, &mut sums)?;
        backend.all_reduce_device_grads(comm)?;
        let step_tokens = sums[6] as u64;
        let m = Metrics::from_sums(&sums[..6]).finish();
        let lr = t.optim.lr * t.schedule.factor(prog.step, t.warmup, total_steps);
        prog.step += 1;
        let grad_norm =
            backend.clip_and_step(&t.optim, &mut model, &mut state, t.clip, lr, prog.step)?;
        // (Only the CPU engine reads the packs; a GPU has the head on the device.)
        if head_trains && backend.is_cpu() {
            super::trainer::pack_head(&mut head_pack, &model);
        }
        prog.tokens += step_tokens;
        tokens_since += step_tokens;
        prog.rng = dropout_rng.state();
        last_loss = m.loss;
        let tps = tokens_since as f64 / start.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(prog.step);
        bar.set_message(format!(
            "loss {:.4} acc {:.2} {tps:.0} tok/s",
            m.loss, m.accuracy
        ));
        let mut v = m.json("");
        for (k, x) in [
            ("step", json!(prog.step)),
            ("epoch", json!(prog.epoch)),
            ("lr", json!(lr)),
            ("grad_norm", json!(grad_norm)),
            ("pairs", json!(m.pairs)),
            ("tokens", json!(prog.tokens)),
            ("tokens_per_second", json!(tps)),
        ] {
            v[k] = x;
        }
        write_log(&mut log, v)?;
        if t.eval_every > 0 && prog.step.is_multiple_of(t.eval_every) {
            if let Some(e) = evaluate(&model, &state, &head_pack, &mut backend, comm)? {
                let mut v = e.json("eval_");
                v["step"] = json!(prog.step);
                write_log(&mut log, v)?;
                bar.println(format!(
                    "step {}: eval loss {:.4}, accuracy {:.3}",
                    prog.step, e.loss, e.accuracy
                ));
            }
        }
        // Data parallel: Ctrl-C reaches the ranks at different moments; all stop together.
        let interrupted_now =
            crate::dist::any(comm, stop.load(Ordering::SeqCst))? || stop_after == Some(prog.step);
        checkpoint_if_due(
            &t.out,
            t.save_every,
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
        final_checkpoint(&t.out, &model, &state, &prog, saved_at)?;
    }
    let eval_after = evaluate(&model, &state, &head_pack, &mut backend, comm)?;
    if let Some(m) = &eval_after {
        report("after training", m);
        let mut v = m.json("eval_");
        v["step"] = json!(prog.step);
        write_log(&mut log, v)?;
    }
    if interrupted {
        crate::cli::info(format!(
            "interrupted: checkpoint saved at step {}; continue with --resume {}",
            prog.step,
            t.out.display()
        ));
    } else if !rank0 {
        // Data parallel: rank 0 alone writes the output.
    } else if is_reward {
        if matches!(t.method, Method::Full | Method::Freeze) {
            super::output::save_reward_model(&t.out, &t.model, &model, &state, pad)?;
        } else {
            save_output(&topts, &attached, &model, &state, "SEQ_CLS")?;
        }
    } else {
        save_output(&topts, &attached, &model, &state, "CAUSAL_LM")?;
    }
    Ok(PrefSummary {
        steps: prog.step,
        final_loss: last_loss,
        eval_before,
        eval_after,
        interrupted,
        rank0,
    })
}

//! The loop of grpo-train: Group Relative Policy Optimization (DeepSeekMath; TRL's
//! `GRPOTrainer`) on one machine, with one copy of the base weights and no value model.
//!
//! Each step: take `batch` prompts, sample `num_generations` completions of each with the KV
//! cache, score every completion with the reward functions (a reward model, a regular
//! expression, the record's reference answer, or an external command), turn the weighted
//! rewards into advantages relative to each prompt's group, then `iterations` optimizer steps
//! on the clipped surrogate (+ β·KL to the reference when β ≠ 0), each over `grad_accum`
//! micro-batches. The formulas and TRL's defaults are in docs/grpo-train.md.

use super::backend::Backend;
use super::checkpoint;
use super::engine::{Batch, Engine};
use super::grpo_math::{
    advantages, nanmean, nanstd, Aggregation, GrpoLoss, LossType, RewardScale, StepShare,
};
use super::grpo_objective::{GrpoObjective, GrpoSeq};
use super::lora;
use super::params::TrainState;
use super::prompts::{load_prompts, Prompt, PromptOptions};
use super::rewards::{RewardFn, RewardSpec, Scored};
use super::rollout::{row_rngs, Response};
use super::rollout_eval::{eval_rollouts, Under};
use super::trainer::{
    attach_method, checkpoint_if_due, final_checkpoint, next_window, prepare_output,
    resumed_in_place, save_output, split_validation, start_progress, stop_on_ctrl_c, write_log,
    Method, TrainOptions,
};
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::generate::SamplingParams;
use crate::kernels::gemm;
use crate::model::Model;
use crate::progress::Progress;
use crate::rng::Rng;
use crate::tokenizer::TextTokenizer;
use serde_json::{json, Map, Value};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

/// GRPO's settings (model, prompts, adapter, optimizer, batch = prompts per step, steps,
/// checkpoints and logging come from `train`).
#[derive(Clone, Debug)]
pub struct GrpoOptions {
    pub train: TrainOptions,
    pub rewards: Vec<RewardSpec>,
    /// One weight per reward function.
    pub reward_weights: Vec<f64>,
    /// An SFT LoRA adapter the policy starts from (and the reference keeps).
    pub init_adapter: Option<PathBuf>,
    /// Completions sampled per prompt (the group).
    pub num_generations: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    /// The loss (its `max_completion_len` is the sampling limit too).
    pub loss: GrpoLoss,
    pub scale: RewardScale,
    pub aggregation: Aggregation,
    /// Optimizer steps on each batch of completions (TRL's μ, `num_iterations`).
    pub iterations: usize,
    /// Completions cut at the length limit count in no loss (DAPO).
    pub mask_truncated: bool,
    pub max_prompt_len: usize,
    /// Prompts sampled before and after training to report the mean reward (0 = none).
    pub eval_prompts: usize,
}

/// Mean reward and completion length of the policy's samples on the evaluation prompts.
#[derive(Clone, Copy, Debug)]
pub struct PolicyEval {
    pub reward: f64,
    pub response_length: f64,
}

pub struct GrpoSummary {
    pub steps: u64,
    pub before: Option<PolicyEval>,
    pub after: Option<PolicyEval>,
    pub interrupted: bool,
    /// Data parallel: whether this process prints results (rank 0, or the only process).
    pub rank0: bool,
}

/// The reward functions and their weights.
struct Rewards {
    fns: Vec<RewardFn>,
    names: Vec<String>,
    weights: Vec<f64>,
}

/// One step's completions and what the update needs. Data parallel: `seqs` and `data` are
/// this rank's share; the rest covers all `total` completions of the step.
struct Rollouts {
    total: usize,
    /// prompt + completion per completion (prompt i's group is rows i·G .. (i+1)·G)
    seqs: Vec<Vec<u32>>,
    data: Vec<GrpoSeq>,
    /// per completion, per reward function
    per_func: Vec<Vec<f64>>,
    /// weighted sum per completion (NaN: no function could score it)
    rewards: Vec<f64>,
    std_zero: Vec<bool>,
    response_len: Vec<usize>,
    stopped: Vec<bool>,
    /// prompt + completion tokens of the step
    tokens: usize,
    /// completion tokens counted in the loss (DAPO's denominator)
    step_tokens: usize,
}

fn sampling(o: &GrpoOptions) -> SamplingParams {
    SamplingParams {
        max_new_tokens: o.loss.max_completion_len,
        temperature: o.temperature,
        top_p: o.top_p,
        top_k: o.top_k,
    }
}

/// Sampled completions: prompt + completion ids, the completions, and each one's rewards per
/// function.
type Sampled = (Vec<Vec<u32>>, Vec<Response>, Vec<Vec<f64>>);

/// Sample and score completions `rows` of the step (completion `i` is one of prompt `i / g`'s
/// `g`; data parallel: this rank's share), completion `rows.start + k` drawn from `rngs[k]`.
#[allow(clippy::too_many_arguments)]
fn sample_and_score(
    o: &GrpoOptions,
    backend: &mut Backend,
    model: &mut Model,
    state: &TrainState,
    rewards: &mut Rewards,
    tok: &TextTokenizer,
    (prompts, file): (&[&Prompt], &Path),
    (g, rows): (usize, Range<usize>),
    stop: &[u32],
    rngs: &mut [Rng],
) -> Result<Sampled> {
    let of = |i: usize| prompts[i / g];
    let rep: Vec<&[u32]> = rows.clone().map(|i| of(i).ids.as_slice()).collect();
    let responses = {
        let _p = crate::profile::scope("grpo.sample");
        backend.sample(model, state, &rep, &sampling(o), stop, rngs)?
    };
    let model: &Model = model;
    let mut seqs = Vec::with_capacity(rep.len());
    for (p, r) in rep.iter().zip(&responses) {
        if r.ids.is_empty() {
            return Err(Error::usage(format!(
                "a prompt of {} tokens leaves no room to respond within the model's {} positions; lower --max-prompt-len",
                p.len(),
                model.config.max_positions
            )));
        }
        let mut s = p.to_vec();
        s.extend_from_slice(&r.ids);
        seqs.push(s);
    }
    let _p = crate::profile::scope("grpo.reward");
    let prompt_text: Vec<String> = rows
        .clone()
        .map(|i| tok.decode(&of(i).ids, false))
        .collect::<Result<_>>()?;
    let completion_text: Vec<String> = responses
        .iter()
        .map(|r| tok.decode(&r.ids, true))
        .collect::<Result<_>>()?;
    let items: Vec<Scored> = rows
        .clone()
        .enumerate()
        .map(|(k, i)| Scored {
            prompt: &prompt_text[k],
            completion: &completion_text[k],
            stopped: responses[k].stopped,
            record: &of(i).record,
            file,
            line: of(i).line,
            ids: &seqs[k],
        })
        .collect();
    let mut per_func = vec![Vec::with_capacity(rewards.fns.len()); rep.len()];
    // a reward model scores a training micro-batch's worth of completions per pass
    let micro = (o.train.batch * o.num_generations).div_ceil(o.train.grad_accum.max(1));
    for f in rewards.fns.iter_mut() {
        let r = f.score(model, &items, micro.max(1))?;
        for (row, v) in per_func.iter_mut().zip(r) {
            row.push(v);
        }
    }
    Ok((seqs, responses, per_func))
}

/// Sample, score and evaluate one step's prompts; build advantages and masks.
///
/// Data parallel: each rank samples, scores and evaluates its contiguous share of the step's
/// completions; the rewards, lengths and stop flags of all of them are gathered on every rank
/// (advantages are relative to a prompt's group, or to the whole batch), so every rank holds
/// the advantages a single process computes, and keeps its own rows'. Completion `i` samples
/// from the `i`-th of the step's generators ([`row_rngs`]) wherever it runs, so the ranks
/// together sample what one process samples.
#[allow(clippy::too_many_arguments)]
fn collect(
    o: &GrpoOptions,
    backend: &mut Backend,
    model: &mut Model,
    head: &gemm::PackedWeight,
    state: &mut TrainState,
    reference: &mut TrainState,
    rewards: &mut Rewards,
    tok: &TextTokenizer,
    prompts: &[&Prompt],
    stop: &[u32],
    rng: &mut Rng,
    comm: &mut dyn Communicator,
) -> Result<Rollouts> {
    let g = o.num_generations;
    let total = prompts.len() * g;
    let mine = crate::dist::shard_range(total, comm.rank(), comm.world());
    let mut rngs = row_rngs(rng, total);
    let (seqs, responses, local_rewards) = sample_and_score(
        o,
        backend,
        model,
        state,
        rewards,
        tok,
        (prompts, &o.train.data),
        (g, mine.clone()),
        stop,
        &mut rngs[mine.clone()],
    )?;
    // every completion's rewards (one per function), length and stop flag, on every rank
    let f = rewards.fns.len();
    let local: Vec<f64> = local_rewards
        .iter()
        .zip(&responses)
        .flat_map(|(r, resp)| {
            r.iter()
                .copied()
                .chain([resp.ids.len() as f64, f64::from(u8::from(resp.stopped))])
        })
        .collect();
    let all = crate::dist::gather_rows(comm, total, f + 2, mine.clone(), &local)?;
    let per_func: Vec<Vec<f64>> = all.chunks(f + 2).map(|r| r[..f].to_vec()).collect();
    let response_len: Vec<usize> = all.chunks(f + 2).map(|r| r[f] as usize).collect();
    let stopped: Vec<bool> = all.chunks(f + 2).map(|r| r[f + 1] > 0.5).collect();
    let adv = advantages(&per_func, &rewards.weights, g, o.scale, o.aggregation);
    let counted = |i: usize| !o.mask_truncated || stopped[i];
    let step_tokens = (0..total)
        .filter(|&i| counted(i))
        .map(|i| response_len[i])
        .sum();
    let model: &Model = model;
    let shape: Vec<(usize, usize, bool)> = seqs
        .iter()
        .zip(&responses)
        .map(|(s, r)| (s.len() - r.ids.len(), r.ids.len(), false))
        .collect();
    let micro = micro_size(total, o.train.grad_accum);
    let ref_logp = if o.loss.beta != 0.0 {
        let _p = crate::profile::scope("grpo.reference_eval");
        let under = if o.init_adapter.is_some() {
            Under::FrozenStart(reference)
        } else {
            Under::AdaptersOff(reference)
        };
        let e = eval_rollouts(
            backend,
            model,
            head,
            state,
            under,
            &seqs,
            &shape,
            (o.temperature, false),
            micro,
        )?;
        Some(e.logp)
    } else {
        None
    };
    // With one iteration the policy that sampled is the one being trained: ratio 1, no pass.
    let old_logp = if o.iterations > 1 {
        let _p = crate::profile::scope("grpo.policy_eval");
        let e = eval_rollouts(
            backend,
            model,
            head,
            state,
            Under::Policy,
            &seqs,
            &shape,
            (o.temperature, false),
            micro,
        )?;
        Some(e.logp)
    } else {
        None
    };
    let data = mine
        .clone()
        .enumerate()
        .map(|(k, i)| GrpoSeq {
            prompt_len: shape[k].0,
            mask: vec![counted(i); responses[k].ids.len()],
            advantage: adv.advantages[i],
            old_logp: old_logp.as_ref().map(|l| l[k].clone()),
            ref_logp: ref_logp.as_ref().map(|l| l[k].clone()),
        })
        .collect();
    let prompt_tokens: usize = prompts.iter().map(|p| p.ids.len() * g).sum();
    Ok(Rollouts {
        total,
        seqs,
        data,
        per_func,
        rewards: adv.rewards,
        std_zero: adv.std_zero,
        tokens: prompt_tokens + response_len.iter().sum::<usize>(),
        response_len,
        stopped,
        step_tokens,
    })
}

/// Completions per micro-batch: a step's `total` split into `grad_accum` parts.
fn micro_size(total: usize, grad_accum: usize) -> usize {
    total.div_ceil(grad_accum.max(1)).max(1)
}

/// What the optimizer steps of one batch report.
#[derive(Default)]
struct UpdateStats {
    loss: f64,
    kl_sum: f64,
    /// Σ entropy over the counted tokens of the first iteration
    entropy_sum: f64,
    low: f64,
    high: f64,
    region: f64,
    /// the count the clip metrics are over (tokens, or completions for sequence-level ratios)
    clip_count: usize,
    tokens_counted: usize,
    /// VESPO: Σ φ over the completions of every iteration
    phi_sum: f64,
    grad_norm: f64,
    updates: usize,
    tokens: u64,
}

impl UpdateStats {
    /// Data parallel: the sums over the ranks (one process: unchanged).
    fn all_reduce(&mut self, comm: &mut dyn Communicator) -> Result<()> {
        if comm.world() == 1 {
            return Ok(());
        }
        let mut v = [
            self.loss,
            self.kl_sum,
            self.entropy_sum,
            self.low,
            self.high,
            self.region,
            self.clip_count as f64,
            self.tokens_counted as f64,
            self.tokens as f64,
            self.phi_sum,
        ];
        comm.all_reduce_sum_f64(&mut v)?;
        let [loss, kl, ent, low, high, region, cc, tc, tokens, phi] = v;
        self.phi_sum = phi;
        (self.loss, self.kl_sum, self.entropy_sum) = (loss, kl, ent);
        (self.low, self.high, self.region) = (low, high, region);
        self.clip_count = cc as usize;
        self.tokens_counted = tc as usize;
        self.tokens = tokens as u64;
        Ok(())
    }
}

/// `iterations` optimizer steps over the batch, each split into `grad_accum` micro-batches.
#[allow(clippy::too_many_arguments)]
fn update(
    o: &GrpoOptions,
    backend: &mut Backend,
    model: &mut Model,
    head: &gemm::PackedWeight,
    state: &mut TrainState,
    ro: &Rollouts,
    (step, lr): (u64, f32),
    dropout_rng: &mut Rng,
    comm: &mut dyn Communicator,
) -> Result<UpdateStats> {
    let t = &o.train;
    let n = ro.seqs.len();
    let micro = micro_size(ro.total, t.grad_accum);
    let parts: Vec<Range<usize>> = (0..n)
        .step_by(micro)
        .map(|s| s..(s + micro).min(n))
        .collect();
    // Data parallel: every rank cuts its share into micro-batches of the single-process size;
    // each micro-batch's loss is a share of all ranks' micro-batches (TRL's DDP mean).
    let world = comm.world();
    let all_parts: usize = (0..world)
        .map(|r| {
            crate::dist::shard_range(ro.total, r, world)
                .len()
                .div_ceil(micro)
        })
        .sum();
    let share = StepShare {
        grad_accum: all_parts,
        step_tokens: ro.step_tokens,
    };
    let mut st = UpdateStats::default();
    for it in 0..o.iterations {
        state.zero_grads();
        {
            let engine = Engine::new(model, state).with_head_pack(head);
            for part in &parts {
                let labels: Vec<Vec<i32>> =
                    part.clone().map(|i| vec![-100; ro.seqs[i].len()]).collect();
                let b = Batch {
                    ids: part.clone().map(|i| ro.seqs[i].as_slice()).collect(),
                    labels: labels.iter().map(Vec::as_slice).collect(),
                };
                let mut obj = GrpoObjective::new(
                    ro.data[part.clone()].to_vec(),
                    o.loss,
                    share,
                    o.temperature,
                );
                backend.forward_backward_with(
                    &engine,
                    model,
                    state,
                    &b,
                    dropout_rng,
                    true,
                    &mut obj,
                )?;
                let out = &obj.out;
                if !out.loss.is_finite() {
                    return Err(Error::Numeric(format!(
                        "GRPO loss is not finite at step {} ({}); lower the learning rate",
                        step + 1,
                        out.loss
                    )));
                }
                st.loss += out.loss;
                st.kl_sum += out.kl_sum;
                if it == 0 {
                    st.entropy_sum += obj.entropy_sum;
                }
                st.low += out.low_clipped;
                st.high += out.high_clipped;
                st.region += out.region_clipped;
                st.clip_count += match o.loss.level {
                    super::grpo_math::RatioLevel::Token => out.tokens,
                    super::grpo_math::RatioLevel::Sequence => out.completions,
                };
                st.tokens_counted += out.tokens;
                st.phi_sum += out.phi_sum;
                st.tokens += b.ids.iter().map(|s| s.len() as u64).sum::<u64>();
            }
        }
        // Data parallel: the adapter gradients summed over the ranks
        crate::dist::all_reduce_grads(comm, state, &mut [])?;
        backend.all_reduce_device_grads(comm)?;
        let opt_step = step * o.iterations as u64 + it as u64 + 1;
        st.grad_norm = backend.clip_and_step(&t.optim, model, state, t.clip, lr, opt_step)? as f64;
        st.updates += 1;
    }
    st.loss /= o.iterations as f64;
    st.all_reduce(comm)?;
    Ok(st)
}

/// Sample one completion of each evaluation prompt with a fixed seed: mean reward and length.
/// Data parallel: each rank takes its share of every chunk of prompts, and the sums are added.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    o: &GrpoOptions,
    backend: &mut Backend,
    model: &mut Model,
    state: &TrainState,
    rewards: &mut Rewards,
    tok: &TextTokenizer,
    prompts: &[Prompt],
    stop: &[u32],
    comm: &mut dyn Communicator,
) -> Result<Option<PolicyEval>> {
    if prompts.is_empty() {
        return Ok(None);
    }
    let mut rng = Rng::new(o.train.seed ^ 0xE7A1);
    let mut sums = [0.0f64; 3]; // weighted reward, completions scored, completion tokens
    for chunk in prompts.chunks(o.train.batch.max(1) * o.num_generations) {
        let refs: Vec<&Prompt> = chunk.iter().collect();
        let mine = crate::dist::shard_range(refs.len(), comm.rank(), comm.world());
        let mut rngs = row_rngs(&mut rng, refs.len());
        let (_, responses, per_func) = sample_and_score(
            o,
            backend,
            model,
            state,
            rewards,
            tok,
            (&refs, o.train.val_data.as_deref().unwrap_or(&o.train.data)),
            (1, mine.clone()),
            stop,
            &mut rngs[mine],
        )?;
        for (row, r) in per_func.iter().zip(&responses) {
            if row.iter().any(|v| !v.is_nan()) {
                sums[0] += row
                    .iter()
                    .zip(&rewards.weights)
                    .filter(|(v, _)| !v.is_nan())
                    .map(|(v, w)| v * w)
                    .sum::<f64>();
                sums[1] += 1.0;
            }
            sums[2] += r.ids.len() as f64;
        }
    }
    if comm.world() > 1 {
        comm.all_reduce_sum_f64(&mut sums)?;
    }
    let [sum, scored, len] = sums;
    Ok(Some(PolicyEval {
        reward: if scored == 0.0 {
            f64::NAN
        } else {
            sum / scored
        },
        response_length: len / prompts.len() as f64,
    }))
}

/// Train a policy with GRPO (a failed run leaves no empty output folder).
pub fn run(o: &GrpoOptions) -> Result<GrpoSummary> {
    super::trainer::remove_empty_output_on_error(&o.train.out, || run_steps(o))
}

fn check(o: &GrpoOptions) -> Result<()> {
    let t = &o.train;
    if !matches!(t.method, Method::Lora | Method::Dora) {
        return Err(Error::usage(
            "grpo-train trains LoRA or DoRA adapters (--method lora|dora)",
        ));
    }
    if o.temperature <= 0.0 {
        return Err(Error::usage(
            "--temperature must be positive: GRPO samples its completions",
        ));
    }
    if o.num_generations < 2 {
        return Err(Error::usage(
            "--num-generations must be at least 2: advantages are relative to a prompt's group",
        ));
    }
    if o.rewards.is_empty() {
        return Err(Error::usage(
            "give at least one --reward (model:DIR, regex:PATTERN, answer:FIELD, cmd:COMMAND or serve:COMMAND)",
        ));
    }
    if o.reward_weights.len() != o.rewards.len() {
        return Err(Error::usage(format!(
            "--reward-weights has {} values for {} --reward functions",
            o.reward_weights.len(),
            o.rewards.len()
        )));
    }
    if t.grad_accum > t.batch * o.num_generations {
        return Err(Error::usage(format!(
            "--grad-accum {} splits {} completions per step into empty micro-batches",
            t.grad_accum,
            t.batch * o.num_generations
        )));
    }
    Ok(())
}

fn run_steps(o: &GrpoOptions) -> Result<GrpoSummary> {
    let t = &o.train;
    super::trainer::check_options(t)?;
    check(o)?;
    t.device.check_available()?;
    // Data parallel (docs/distributed.md), as in peft-train: every rank loads the same model
    // and prompts and walks the same order; each samples, scores and trains on its share of
    // every step's completions; rewards are gathered and gradients summed, every rank steps
    // identically; only rank 0 prints and writes files.
    let mut comm = crate::dist::from_env()?;
    let comm = comm.as_mut();
    let rank0 = crate::dist::only_rank0_speaks(comm);
    let device = crate::dist::rank_device(t.device);
    let progress = Progress::new(t.quiet);
    let tok = TextTokenizer::load(&t.model)?;
    let config = crate::model::ModelConfig::load(&t.model)?;
    let max_prompt = o.max_prompt_len.min(
        config
            .max_positions
            .saturating_sub(o.loss.max_completion_len),
    );
    let popts = PromptOptions {
        max_len: max_prompt,
        skip_bad_lines: t.data_opts.skip_bad_lines,
    };
    let (mut prompts, stats) = load_prompts(&t.data, &tok, &popts)?;
    crate::cli::info(format!(
        "prompts: {} from {} records; {} dropped as longer than {max_prompt} tokens, {} bad records skipped",
        stats.prompts, stats.records, stats.dropped_long, stats.skipped_bad_lines
    ));
    let eval_set: Vec<Prompt> = match &t.val_data {
        Some(p) => load_prompts(p, &tok, &popts)?.0,
        None if t.val_split > 0.0 => {
            let (train, val) = split_validation(prompts, t.val_split, t.seed);
            prompts = train;
            val
        }
        None => prompts.iter().take(o.eval_prompts).cloned().collect(),
    };

    let mut model = Model::load_with(&t.model, t.quantize)?;
    let mut state = TrainState::new(model.linears().len());
    let mut init_rng = Rng::new(t.seed);
    let mut topts = t.clone();
    // the ratio compares the sampling policy with the trained one: dropout would make them differ
    topts.lora.dropout = 0.0;
    let attached = match &o.init_adapter {
        Some(dir) => {
            let mut loaded = TrainState::new(model.linears().len());
            let mut cfg = lora::load_adapter(dir, &model, &mut loaded)?;
            cfg.dropout = 0.0;
            topts.lora = cfg.clone();
            topts.method = if cfg.dora { Method::Dora } else { Method::Lora };
            let a = attach_method(&topts, &model, &mut state, &tok, &mut init_rng)?;
            state.lora = loaded.lora;
            a
        }
        None => attach_method(&topts, &model, &mut state, &tok, &mut init_rng)?,
    };
    // the reference: the starting adapter frozen (none: the bare base)
    let mut reference = TrainState::new(model.linears().len());
    if o.init_adapter.is_some() {
        reference.lora = state.lora.clone();
    }
    super::full::refuse_4bit_trainables(&model, &state, &t.model)?;
    super::trainer::apply_compute_dtype(&topts, &mut model, &state, true);
    let mut rewards = Rewards {
        fns: o
            .rewards
            .iter()
            .map(|s| RewardFn::new(s, device, &t.model, &model, &tok))
            .collect::<Result<_>>()?,
        names: o
            .rewards
            .iter()
            .enumerate()
            .map(|(i, s)| s.name(i))
            .collect(),
        weights: o.reward_weights.clone(),
    };
    let eval_file = t.val_data.as_deref().unwrap_or(&t.data);
    for f in &rewards.fns {
        for p in &prompts {
            f.check_record(&p.record, &t.data, p.line)?;
        }
        for p in &eval_set {
            f.check_record(&p.record, eval_file, p.line)?;
        }
    }
    let stop = crate::generate::stop_tokens(&t.model, &model.config, &tok)?;
    if rank0 {
        println!(
            "trainable params: {} || all params: {}",
            state.trainable_count(),
            model.config.param_count() + state.trainable_count()
        );
    }
    if t.plan {
        let separate = rewards.fns.iter().find_map(|f| match f {
            RewardFn::Model(m) => m.own_model(),
            _ => None,
        });
        let n = t.batch * o.num_generations;
        print!(
            "{}",
            super::plan::on_policy_report(
                &model,
                &state,
                &super::plan::OnPolicyShape {
                    tool: "grpo-train",
                    model_dir: &t.model,
                    trainable: "adapter",
                    sequences: n,
                    micro: n.div_ceil(t.grad_accum.max(1)) as f64,
                    response_length: o.loss.max_completion_len,
                    separate_reward: separate,
                    per_step: format!(
                        "{} prompts × {} completions, ≤ {} tokens each, {} optimizer step(s)",
                        t.batch, o.num_generations, o.loss.max_completion_len, o.iterations
                    ),
                },
                &prompts,
            )
        );
        return Ok(GrpoSummary {
            steps: 0,
            before: None,
            after: None,
            interrupted: false,
            rank0,
        });
    }
    let mut head_pack = gemm::PackedWeight::default();
    super::trainer::pack_head(&mut head_pack, &model);
    let mut backend = Backend::new(device, &model, &state)?;

    let total_steps = t
        .steps
        .unwrap_or_else(|| (prompts.len().div_ceil(t.batch.max(1)) as f64 * t.epochs).ceil() as u64)
        .max(1);
    let mut sample_rng = Rng::new(t.seed.wrapping_add(2));
    let mut prog = start_progress(t.seed);
    // The step whose checkpoint is on disk in OUT (the final save is not repeated).
    let mut saved_at = None;
    if let Some(r) = &t.resume {
        let dir = checkpoint::resolve(r)?;
        prog = checkpoint::load(&dir, &mut model, &mut state)?;
        saved_at = resumed_in_place(&t.out, &dir).then_some(prog.step);
        let extra = prog.extra.clone().unwrap_or_default();
        match (
            extra.get("trainer").and_then(Value::as_str),
            extra
                .get("sample_rng")
                .and_then(|v| serde_json::from_value::<[u64; 4]>(v.clone()).ok()),
        ) {
            (Some("grpo-train"), Some(s)) => sample_rng = Rng::from_state(s),
            _ => {
                return Err(Error::bad_input(
                    &dir,
                    "not a grpo-train checkpoint (no sampling state)",
                ))
            }
        }
        crate::cli::info(format!(
            "resumed from {} at step {}",
            dir.display(),
            prog.step
        ));
    }
    let mut inputs: Vec<&Path> = vec![&t.model, &t.data];
    inputs.extend(o.init_adapter.as_deref());
    for r in &o.rewards {
        if let RewardSpec::Model(d) = r {
            inputs.push(d);
        }
    }
    // Data parallel: the ranks must agree on the job before rank 0 touches OUT (and its
    // checkpoints, which the others may still be reading).
    crate::dist::check_same_job(
        comm,
        &model,
        &state,
        &[
            ("prompts", prompts.len() as u64),
            ("total steps", total_steps),
            ("step", prog.step),
            ("completions per step", (t.batch * o.num_generations) as u64),
            ("seed", t.seed),
        ],
    )?;
    let mut log = if rank0 {
        prepare_output(&t.out, &inputs, t.log.as_deref())?
    } else {
        None
    };
    let stop_flag = stop_on_ctrl_c();
    // Test hook (as in peft-train): behave as if Ctrl-C arrived during step N.
    let stop_after: Option<u64> = std::env::var("PEFTKIT_STOP_AFTER_STEP")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let before = if prog.step == 0 {
        let e = evaluate(
            o,
            &mut backend,
            &mut model,
            &state,
            &mut rewards,
            &tok,
            &eval_set,
            &stop,
            comm,
        )?;
        if let Some(e) = &e {
            report_eval(&mut log, "before", 0, e, eval_set.len())?;
        }
        e
    } else {
        None
    };

    let bar = progress.bar(total_steps, "grpo");
    bar.set_position(prog.step);
    let mut dropout_rng = Rng::from_state(prog.rng);
    let mut order: (u64, Vec<usize>) = (u64::MAX, Vec::new());
    let mut select = t.clone();
    select.grad_accum = 1;
    select.steps = Some(total_steps);
    let mut interrupted = false;
    while prog.step < total_steps {
        let window = next_window(&mut prog, &mut order, prompts.len(), &select);
        let batch_prompts: Vec<&Prompt> = window[0].iter().map(|&i| &prompts[i]).collect();
        let t0 = std::time::Instant::now();
        let ro = collect(
            o,
            &mut backend,
            &mut model,
            &head_pack,
            &mut state,
            &mut reference,
            &mut rewards,
            &tok,
            &batch_prompts,
            &stop,
            &mut sample_rng,
            comm,
        )?;
        let rollout_s = t0.elapsed().as_secs_f64();
        let lr = t.optim.lr * t.schedule.factor(prog.step, t.warmup, total_steps);
        let t1 = std::time::Instant::now();
        let up = update(
            o,
            &mut backend,
            &mut model,
            &head_pack,
            &mut state,
            &ro,
            (prog.step, lr),
            &mut dropout_rng,
            comm,
        )?;
        let update_s = t1.elapsed().as_secs_f64();
        prog.step += 1;
        let n = ro.total as f64;
        let resp_tokens: usize = ro.response_len.iter().sum();
        prog.tokens += ro.tokens as u64;
        prog.rng = dropout_rng.state();
        prog.extra = Some(json!({"trainer": "grpo-train", "sample_rng": sample_rng.state()}));
        let reward = nanmean(&ro.rewards);
        let len_mean = resp_tokens as f64 / n;
        bar.set_position(prog.step);
        bar.set_message(format!("reward {reward:.3} len {len_mean:.1}"));
        let mut rec = Map::new();
        rec.insert("step".into(), json!(prog.step));
        rec.insert("epoch".into(), json!(prog.epoch));
        rec.insert("lr".into(), json!(lr));
        rec.insert("reward".into(), finite(reward));
        rec.insert("reward_std".into(), finite(nanstd(&ro.rewards)));
        for (k, name) in rewards.names.iter().enumerate() {
            let col: Vec<f64> = ro.per_func.iter().map(|r| r[k]).collect();
            rec.insert(format!("reward_{name}"), finite(nanmean(&col)));
        }
        let zero = ro.std_zero.iter().filter(|&&z| z).count() as f64 / n;
        rec.insert("frac_reward_zero_std".into(), json!(zero));
        rec.insert("loss".into(), json!(up.loss));
        if o.loss.beta != 0.0 {
            rec.insert(
                "kl".into(),
                json!(up.kl_sum / up.tokens_counted.max(1) as f64),
            );
        }
        rec.insert(
            "entropy".into(),
            json!(up.entropy_sum / (up.tokens_counted / o.iterations).max(1) as f64),
        );
        // TRL's clip metrics: CISPO's capped fraction instead, none for SAPO's soft gate
        let cc = up.clip_count.max(1) as f64;
        match o.loss.loss_type {
            LossType::Cispo => {
                rec.insert("cispo_clip_ratio".into(), json!(up.high / cc));
            }
            LossType::Sapo => {}
            LossType::Vespo => {
                rec.insert(
                    "vespo_phi_mean".into(),
                    json!(up.phi_sum / ro.total as f64 / o.iterations as f64),
                );
            }
            _ => {
                rec.insert("clip_ratio_low".into(), json!(up.low / cc));
                rec.insert("clip_ratio_high".into(), json!(up.high / cc));
                rec.insert("clip_ratio_region".into(), json!(up.region / cc));
            }
        }
        rec.insert("response_length".into(), json!(len_mean));
        rec.insert(
            "truncated_fraction".into(),
            json!(ro.stopped.iter().filter(|&&s| !s).count() as f64 / n),
        );
        if o.loss.entropy_coef != 0.0 {
            rec.insert("entropy_coef".into(), json!(o.loss.entropy_coef));
        }
        rec.insert("grad_norm".into(), json!(up.grad_norm));
        rec.insert("optimizer_steps".into(), json!(up.updates));
        rec.insert(
            "rollout_tokens_per_second".into(),
            json!(resp_tokens as f64 / rollout_s.max(1e-9)),
        );
        rec.insert(
            "update_tokens_per_second".into(),
            json!(up.tokens as f64 / update_s.max(1e-9)),
        );
        rec.insert("rollout_seconds".into(), json!(rollout_s));
        rec.insert("update_seconds".into(), json!(update_s));
        write_log(&mut log, Value::Object(rec))?;
        // Data parallel: Ctrl-C reaches the ranks at different moments; all stop together.
        let stop_now = crate::dist::any(comm, stop_flag.load(Ordering::SeqCst))?
            || stop_after == Some(prog.step);
        checkpoint_if_due(
            &t.out,
            t.save_every,
            stop_now,
            rank0,
            &mut backend,
            &mut model,
            &mut state,
            &prog,
            &mut saved_at,
        )?;
        if stop_now {
            interrupted = true;
            break;
        }
    }
    bar.finish_and_clear();
    if interrupted {
        crate::cli::info(format!(
            "interrupted: checkpoint saved at step {}; continue with --resume {}",
            prog.step,
            t.out.display()
        ));
        return Ok(GrpoSummary {
            steps: prog.step,
            before,
            after: None,
            interrupted,
            rank0,
        });
    }
    backend.sync_to_host(&mut model, &mut state)?;
    if rank0 {
        final_checkpoint(&t.out, &model, &state, &prog, saved_at)?;
    }
    let after = evaluate(
        o,
        &mut backend,
        &mut model,
        &state,
        &mut rewards,
        &tok,
        &eval_set,
        &stop,
        comm,
    )?;
    if let Some(e) = &after {
        report_eval(&mut log, "after", prog.step, e, eval_set.len())?;
    }
    if rank0 {
        save_output(&topts, &attached, &model, &state, "CAUSAL_LM")?;
    }
    Ok(GrpoSummary {
        steps: prog.step,
        before,
        after,
        interrupted,
        rank0,
    })
}

/// Prints an evaluation of the policy (`when`: before or after training) and logs it.
fn report_eval(
    log: &mut Option<std::fs::File>,
    when: &str,
    step: u64,
    e: &PolicyEval,
    prompts: usize,
) -> Result<()> {
    crate::cli::info(format!(
        "{when} training: mean reward {:.4}, completion length {:.1} ({prompts} prompts)",
        e.reward, e.response_length
    ));
    write_log(
        log,
        json!({"step": step, "eval_reward": finite(e.reward), "eval_response_length": e.response_length}),
    )
}

/// JSON has no NaN: a quantity nothing could score is logged as null.
fn finite(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

//! The loop of ppo-train: RLHF with PPO on one machine, with one copy of the base weights.
//!
//! - Policy: the base plus a LoRA/DoRA adapter (optionally starting from an SFT adapter).
//! - Reference: the same base with the adapter switched off, or with the starting adapter
//!   frozen (a copy of the adapter tensors only).
//! - Value model: a value head (`v_head.summary`, hidden → 1) on the policy's own backbone,
//!   as legacy TRL's `AutoModelForCausalLMWithValueHead`: one forward pass serves both losses.
//! - Reward: an rm-train / PEFT SEQ_CLS adapter on the same base (no second copy when it is
//!   the policy's base), or a separate `…ForSequenceClassification` checkpoint.
//!
//! Each step: sample responses for a batch of prompts with the KV cache, score them, compute
//! per-token rewards (−β·KL plus the score), GAE and whitened advantages, then several PPO
//! epochs over mini-batches of the clipped policy and value losses. The formulas and which
//! TRL generation each default follows are in docs/ppo-train.md.

use super::backend::Backend;
use super::checkpoint;
use super::engine::{Batch, Engine};
use super::lora;
use super::params::{ParamState, Slot, TrainState};
use super::ppo_math::{gae, masked_mean, masked_var, masked_whiten, KlController, KlEstimator};
use super::ppo_objective::{PpoObjective, RolloutSeq};
use super::prompts::{load_prompts, Prompt, PromptOptions};
use super::rewards::RewardModel;
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
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

/// PPO's settings (the model, prompts, adapter, optimizer, batch = prompts per step, steps,
/// checkpoints and logging come from `train`).
#[derive(Clone, Debug)]
pub struct PpoOptions {
    pub train: TrainOptions,
    /// A reward adapter directory, a `…ForSequenceClassification` folder, or the base the
    /// reward adapter belongs to.
    pub reward_model: PathBuf,
    pub reward_adapter: Option<PathBuf>,
    /// An SFT LoRA adapter the policy starts from (and the reference keeps).
    pub init_adapter: Option<PathBuf>,
    pub response_length: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    /// (target, horizon) for the adaptive controller.
    pub adaptive_kl: Option<(f64, f64)>,
    pub gamma: f64,
    pub lam: f64,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    pub ppo_epochs: usize,
    pub mini_batches: usize,
    pub missing_eos_penalty: Option<f64>,
    pub whiten_rewards: bool,
    pub ratio_threshold: Option<f64>,
    pub max_prompt_len: usize,
    /// Prompts sampled for the before/after evaluation (0 = none).
    pub eval_prompts: usize,
}

/// Mean score and KL of the policy's samples on the evaluation prompts.
#[derive(Clone, Copy, Debug)]
pub struct PolicyEval {
    pub score: f64,
    pub kl: f64,
    pub response_length: f64,
}

pub struct PpoSummary {
    pub steps: u64,
    pub before: Option<PolicyEval>,
    pub after: Option<PolicyEval>,
    pub interrupted: bool,
    /// Data parallel: whether this process prints results (rank 0, or the only process).
    pub rank0: bool,
}

/// One step's rollouts and everything the update needs.
struct Rollouts {
    /// query + response per sequence
    seqs: Vec<Vec<u32>>,
    data: Vec<RolloutSeq>,
    scores: Vec<f64>,
    /// per sequence: Σ_t KL_t (estimator) and Σ_t (log p − log p_ref)
    kl_penalty: Vec<f64>,
    kl_k1: Vec<f64>,
    entropy: f64,
    response_len: Vec<usize>,
    stopped: Vec<bool>,
    explained_variance: f64,
    values: Vec<f64>,
    returns: Vec<f64>,
    vmask: Vec<bool>,
}

fn sampling(o: &PpoOptions) -> SamplingParams {
    SamplingParams {
        max_new_tokens: o.response_length,
        temperature: o.temperature,
        top_p: o.top_p,
        top_k: o.top_k,
    }
}

/// One batch's sampled responses with what the policy, the reference and the reward model say
/// of them (every rank holds all of them after [`gather`]).
struct Evaluated {
    responses: Vec<Response>,
    /// per response: log-probs, entropies (its tokens), values (its positions), reference log-probs
    logp: Vec<Vec<f64>>,
    entropies: Vec<Vec<f64>>,
    values: Vec<Vec<f64>>,
    ref_logp: Vec<Vec<f64>>,
    scores: Vec<f32>,
}

/// Data parallel: every rank's responses and their evaluations on every rank, packed one row
/// per response (length, stop flag, score, then `w` tokens and four `w`-long series, zeros
/// past the response) and gathered exactly (`dist::gather_rows`).
fn gather(
    comm: &mut dyn Communicator,
    n: usize,
    mine: std::ops::Range<usize>,
    w: usize,
    e: Evaluated,
) -> Result<Evaluated> {
    if comm.world() == 1 {
        return Ok(e);
    }
    let width = 3 + 5 * w;
    let mut local = vec![0.0; mine.len() * width];
    for (k, row) in local.chunks_mut(width).enumerate() {
        let r = &e.responses[k];
        row[0] = r.ids.len() as f64;
        row[1] = f64::from(u8::from(r.stopped));
        row[2] = f64::from(e.scores[k]);
        let series: [&[f64]; 4] = [&e.logp[k], &e.entropies[k], &e.values[k], &e.ref_logp[k]];
        for (t, &id) in r.ids.iter().enumerate() {
            row[3 + t] = f64::from(id);
        }
        for (j, x) in series.iter().enumerate() {
            row[3 + (j + 1) * w..][..x.len()].copy_from_slice(x);
        }
    }
    let all = crate::dist::gather_rows(comm, n, width, mine, &local)?;
    let mut out = Evaluated {
        responses: Vec::with_capacity(n),
        logp: Vec::with_capacity(n),
        entropies: Vec::with_capacity(n),
        values: Vec::with_capacity(n),
        ref_logp: Vec::with_capacity(n),
        scores: Vec::with_capacity(n),
    };
    for row in all.chunks(width) {
        let r = row[0] as usize;
        let stopped = row[1] > 0.5;
        // a value per position: the response's tokens, and the score's position past them
        // when the window has room
        let npos = r + usize::from(r < w);
        out.responses.push(Response {
            ids: row[3..3 + r].iter().map(|&x| x as u32).collect(),
            stopped,
        });
        out.scores.push(row[2] as f32);
        out.logp.push(row[3 + w..][..r].to_vec());
        out.entropies.push(row[3 + 2 * w..][..r].to_vec());
        out.values.push(row[3 + 3 * w..][..npos].to_vec());
        out.ref_logp.push(row[3 + 4 * w..][..r].to_vec());
    }
    Ok(out)
}

/// Sample, score and evaluate one batch of prompts; build rewards, advantages and returns.
///
/// Data parallel: each rank samples and evaluates its contiguous share of the batch's prompts
/// (prompt `i` sampling from the `i`-th of the step's generators, [`row_rngs`], so the ranks
/// sample what one process samples) and every rank gathers all of them: the whitening and
/// GAE over the batch, and the mini-batches the update shuffles, are the single process's.
#[allow(clippy::too_many_arguments)]
fn collect(
    o: &PpoOptions,
    backend: &mut Backend,
    model: &mut Model,
    head: &gemm::PackedWeight,
    state: &mut TrainState,
    reference: &mut TrainState,
    reward: &mut RewardModel,
    prompts: &[&[u32]],
    stop: &[u32],
    rng: &mut Rng,
    kl_coef: f64,
    comm: &mut dyn Communicator,
) -> Result<Rollouts> {
    let n = prompts.len();
    let mine = crate::dist::shard_range(n, comm.rank(), comm.world());
    let mut rngs = row_rngs(rng, n);
    let e = evaluate_share(
        o,
        backend,
        model,
        head,
        state,
        reference,
        reward,
        &prompts[mine.clone()],
        stop,
        &mut rngs[mine.clone()],
    )?;
    let e = gather(comm, n, mine, o.response_length, e)?;
    Ok(rollouts_of(o, kl_coef, prompts, e))
}

/// Sample responses to `prompts` (prompt `i` from `rngs[i]`) and evaluate them under the
/// policy (log-probs, entropies, values), the reference and the reward model.
#[allow(clippy::too_many_arguments)]
fn evaluate_share(
    o: &PpoOptions,
    backend: &mut Backend,
    model: &mut Model,
    head: &gemm::PackedWeight,
    state: &mut TrainState,
    reference: &mut TrainState,
    reward: &mut RewardModel,
    prompts: &[&[u32]],
    stop: &[u32],
    rngs: &mut [Rng],
) -> Result<Evaluated> {
    let responses: Vec<Response> = {
        let _p = crate::profile::scope("ppo.sample");
        backend.sample(model, state, prompts, &sampling(o), stop, rngs)?
    };
    let model: &Model = model;
    let w = o.response_length;
    let mut seqs = Vec::new();
    let mut shape = Vec::new();
    for (p, r) in prompts.iter().zip(&responses) {
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
        // PPOv2: the score lands one past the last token when the window has room
        shape.push((p.len(), r.ids.len(), r.ids.len() < w));
    }
    let b = o.train.batch;
    let pol = {
        let _p = crate::profile::scope("ppo.policy_eval");
        eval_rollouts(
            backend,
            model,
            head,
            state,
            Under::Policy,
            &seqs,
            &shape,
            (o.temperature, true),
            b,
        )?
    };
    let refe = {
        let _p = crate::profile::scope("ppo.reference_eval");
        eval_rollouts(
            backend,
            model,
            head,
            state,
            if o.init_adapter.is_some() {
                Under::FrozenStart(reference)
            } else {
                Under::AdaptersOff(reference)
            },
            &seqs,
            &shape,
            (o.temperature, false),
            b,
        )?
    };
    let scores = {
        let _p = crate::profile::scope("ppo.reward");
        reward.score(model, &seqs, b)?
    };
    Ok(Evaluated {
        responses,
        logp: pol.logp,
        entropies: pol.entropies,
        values: pol.values,
        ref_logp: refe.logp,
        scores,
    })
}

/// The rewards (score and KL penalty), advantages and returns of a batch of evaluated
/// responses to `prompts`.
fn rollouts_of(o: &PpoOptions, kl_coef: f64, prompts: &[&[u32]], e: Evaluated) -> Rollouts {
    let w = o.response_length;
    let responses = e.responses;
    let mut seqs = Vec::new();
    let mut shape = Vec::new();
    for (p, r) in prompts.iter().zip(&responses) {
        let mut s = p.to_vec();
        s.extend_from_slice(&r.ids);
        seqs.push(s);
        // PPOv2: the score lands one past the last token when the window has room
        shape.push((p.len(), r.ids.len(), r.ids.len() < w));
    }
    let scores_raw = e.scores;
    let n = seqs.len();
    let mut scores: Vec<f64> = scores_raw.iter().map(|&s| s as f64).collect();
    if let Some(pen) = o.missing_eos_penalty {
        for (s, r) in scores.iter_mut().zip(&responses) {
            if !r.stopped {
                *s -= pen;
            }
        }
    }
    // rewards, values and masks on a [n, w] grid (zeros past each sequence's positions)
    let mut rewards = vec![0f64; n * w];
    let mut values = vec![0f64; n * w];
    let mut pmask = vec![false; n * w];
    let mut vmask = vec![false; n * w];
    let mut kl_penalty = vec![0f64; n];
    let mut kl_k1 = vec![0f64; n];
    let (mut ent_sum, mut ent_n) = (0f64, 0usize);
    for i in 0..n {
        let (_, r, terminal) = shape[i];
        let npos = r + usize::from(terminal);
        for t in 0..r {
            let (lp, rp) = (e.logp[i][t], e.ref_logp[i][t]);
            let kl = o.kl_estimator.estimate(lp, rp);
            kl_penalty[i] += kl;
            kl_k1[i] += lp - rp;
            rewards[i * w + t] = -kl_coef * kl;
            pmask[i * w + t] = true;
        }
        ent_sum += e.entropies[i].iter().sum::<f64>();
        ent_n += r;
        rewards[i * w + npos - 1] += scores[i];
        for t in 0..npos {
            vmask[i * w + t] = true;
            values[i * w + t] = e.values[i][t];
        }
    }
    if o.whiten_rewards {
        rewards = masked_whiten(&rewards, &vmask, false);
        for (r, &m) in rewards.iter_mut().zip(&vmask) {
            if !m {
                *r = 0.0;
            }
        }
    }
    let (adv_raw, returns) = gae(&values, &rewards, w, o.gamma, o.lam);
    let mut adv = masked_whiten(&adv_raw, &pmask, true);
    for (a, &m) in adv.iter_mut().zip(&pmask) {
        if !m {
            *a = 0.0;
        }
    }
    let explained_variance = super::ppo_math::explained_variance(&values, &returns, &vmask);
    let data = (0..n)
        .map(|i| {
            let (q, r, terminal) = shape[i];
            let npos = r + usize::from(terminal);
            let row = |v: &[f64]| v[i * w..i * w + npos].to_vec();
            let mut old_logp = e.logp[i].clone();
            if terminal {
                old_logp.push(1.0); // TRL's INVALID_LOGPROB; never counted
            }
            RolloutSeq {
                query_len: q,
                old_logp,
                old_value: row(&values),
                advantage: row(&adv),
                returns: row(&returns),
                policy_mask: pmask[i * w..i * w + npos].to_vec(),
                value_mask: vmask[i * w..i * w + npos].to_vec(),
            }
        })
        .collect();
    Rollouts {
        seqs,
        data,
        scores,
        kl_penalty,
        kl_k1,
        entropy: ent_sum / ent_n.max(1) as f64,
        response_len: responses.iter().map(|r| r.ids.len()).collect(),
        stopped: responses.iter().map(|r| r.stopped).collect(),
        explained_variance,
        values,
        returns,
        vmask,
    }
}

/// What the PPO epochs of one step report.
#[derive(Default)]
struct UpdateStats {
    pg_loss: f64,
    vf_loss: f64,
    clipfrac: f64,
    vf_clipfrac: f64,
    approx_kl: f64,
    ratio: f64,
    micro: usize,
    skipped: usize,
    grad_norm: f64,
    updates: usize,
    tokens: u64,
}

/// PPO epochs over mini-batches of the rollouts (each mini-batch one optimizer step, split
/// into `grad_accum` micro-batches).
#[allow(clippy::too_many_arguments)]
fn update(
    o: &PpoOptions,
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
    let mb_size = n.div_ceil(o.mini_batches.max(1));
    let mut st = UpdateStats::default();
    let mut opt_step = step * (o.ppo_epochs * o.mini_batches) as u64;
    for epoch in 0..o.ppo_epochs {
        let mut order: Vec<usize> = (0..n).collect();
        Rng::new(t.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (epoch as u64) << 32)
            .shuffle(&mut order);
        for mb in order.chunks(mb_size) {
            state.zero_grads();
            // Data parallel: each rank takes a contiguous share of the mini-batch in
            // micro-batches of the single-process size; each counts as one of all ranks'.
            let micro_size = mb.len().div_ceil(t.grad_accum.max(1));
            let world = comm.world();
            let share = &mb[crate::dist::shard_range(mb.len(), comm.rank(), world)];
            let micro: Vec<&[usize]> = share.chunks(micro_size).collect();
            let all_micro: usize = (0..world)
                .map(|r| {
                    crate::dist::shard_range(mb.len(), r, world)
                        .len()
                        .div_ceil(micro_size)
                })
                .sum();
            {
                let engine = Engine::new(model, state).with_head_pack(head);
                for part in &micro {
                    let labels: Vec<Vec<i32>> =
                        part.iter().map(|&i| vec![-100; ro.seqs[i].len()]).collect();
                    let b = Batch {
                        ids: part.iter().map(|&i| ro.seqs[i].as_slice()).collect(),
                        labels: labels.iter().map(Vec::as_slice).collect(),
                    };
                    let mut obj = PpoObjective::new(
                        part.iter().map(|&i| ro.data[i].clone()).collect(),
                        o.cliprange,
                        o.cliprange_value,
                        o.vf_coef,
                    );
                    obj.loss_scale = 1.0 / all_micro as f32;
                    obj.temperature = o.temperature;
                    obj.ratio_threshold = o.ratio_threshold;
                    backend.forward_backward_with(
                        &engine,
                        model,
                        state,
                        &b,
                        dropout_rng,
                        true,
                        &mut obj,
                    )?;
                    if !(obj.pg_loss + obj.vf_loss).is_finite() {
                        return Err(Error::Numeric(format!(
                            "PPO loss is not finite at step {} (policy {}, value {}); lower the learning rate",
                            step + 1,
                            obj.pg_loss,
                            obj.vf_loss
                        )));
                    }
                    st.pg_loss += obj.pg_loss;
                    st.vf_loss += obj.vf_loss;
                    st.clipfrac += obj.clipfrac;
                    st.vf_clipfrac += obj.vf_clipfrac;
                    st.approx_kl += obj.approx_kl;
                    st.ratio += obj.mean_ratio;
                    st.micro += 1;
                    st.skipped += usize::from(obj.skipped);
                    st.tokens += b.ids.iter().map(|s| s.len() as u64).sum::<u64>();
                }
            }
            // Data parallel: the adapter and value-head gradients summed over the ranks
            crate::dist::all_reduce_grads(comm, state, &mut [])?;
            backend.all_reduce_device_grads(comm)?;
            opt_step += 1;
            st.grad_norm =
                backend.clip_and_step(&t.optim, model, state, t.clip, lr, opt_step)? as f64;
            st.updates += 1;
        }
    }
    if comm.world() > 1 {
        let mut v = [
            st.pg_loss,
            st.vf_loss,
            st.clipfrac,
            st.vf_clipfrac,
            st.approx_kl,
            st.ratio,
            st.micro as f64,
            st.skipped as f64,
            st.tokens as f64,
        ];
        comm.all_reduce_sum_f64(&mut v)?;
        let [pg, vf, cf, vcf, akl, ratio, micro, skipped, tokens] = v;
        (st.pg_loss, st.vf_loss, st.clipfrac, st.vf_clipfrac) = (pg, vf, cf, vcf);
        (st.approx_kl, st.ratio) = (akl, ratio);
        st.micro = micro as usize;
        st.skipped = skipped as usize;
        st.tokens = tokens as u64;
    }
    let k = st.micro.max(1) as f64;
    st.pg_loss /= k;
    st.vf_loss /= k;
    st.clipfrac /= k;
    st.vf_clipfrac /= k;
    st.approx_kl /= k;
    st.ratio /= k;
    Ok(st)
}

/// Sample the evaluation prompts with a fixed seed and report mean score and KL.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    o: &PpoOptions,
    backend: &mut Backend,
    model: &mut Model,
    head: &gemm::PackedWeight,
    state: &mut TrainState,
    reference: &mut TrainState,
    reward: &mut RewardModel,
    prompts: &[&[u32]],
    stop: &[u32],
    comm: &mut dyn Communicator,
) -> Result<Option<PolicyEval>> {
    if prompts.is_empty() {
        return Ok(None);
    }
    let mut rng = Rng::new(o.train.seed ^ 0xE7A1);
    let mut sum = (0.0, 0.0, 0.0);
    for chunk in prompts.chunks(o.train.batch.max(1)) {
        let ro = collect(
            o, backend, model, head, state, reference, reward, chunk, stop, &mut rng, 0.0, comm,
        )?;
        sum.0 += ro.scores.iter().sum::<f64>();
        sum.1 += ro.kl_k1.iter().sum::<f64>();
        sum.2 += ro.response_len.iter().sum::<usize>() as f64;
    }
    let n = prompts.len() as f64;
    Ok(Some(PolicyEval {
        score: sum.0 / n,
        kl: sum.1 / n,
        response_length: sum.2 / n,
    }))
}

fn mean_std(x: &[f64]) -> (f64, f64) {
    let all = vec![true; x.len()];
    let m = masked_mean(x, &all);
    let v = if x.len() > 1 {
        masked_var(x, &all, true)
    } else {
        0.0
    };
    (m, v.sqrt())
}

/// Train a policy with PPO (a failed run leaves no empty output folder).
pub fn run(o: &PpoOptions) -> Result<PpoSummary> {
    super::trainer::remove_empty_output_on_error(&o.train.out, || run_steps(o))
}

fn run_steps(o: &PpoOptions) -> Result<PpoSummary> {
    let t = &o.train;
    super::trainer::check_options(t)?;
    t.device.check_available()?;
    if !matches!(t.method, Method::Lora | Method::Dora) {
        return Err(Error::usage(
            "ppo-train trains LoRA or DoRA adapters (--method lora|dora)",
        ));
    }
    if o.temperature <= 0.0 {
        return Err(Error::usage(
            "--temperature must be positive: PPO samples its responses",
        ));
    }
    if o.mini_batches == 0 || o.mini_batches > t.batch {
        return Err(Error::usage(format!(
            "--mini-batches must be between 1 and --batch ({})",
            t.batch
        )));
    }
    // Data parallel (docs/distributed.md): every rank loads the same model and prompts and
    // walks the same order; each samples and evaluates its share of every batch, all gather
    // the whole batch, each trains on its share of every mini-batch and the gradients are
    // summed; only rank 0 prints and writes files.
    let mut comm = crate::dist::from_env()?;
    let comm = comm.as_mut();
    let rank0 = crate::dist::only_rank0_speaks(comm);
    let device = crate::dist::rank_device(t.device);
    let progress = Progress::new(t.quiet);
    let tok = TextTokenizer::load(&t.model)?;
    let config = crate::model::ModelConfig::load(&t.model)?;
    let max_prompt = o
        .max_prompt_len
        .min(config.max_positions.saturating_sub(o.response_length));
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
    let h = model.config.hidden;
    let mut state = TrainState::new(model.linears().len());
    let mut init_rng = Rng::new(t.seed);
    let mut topts = t.clone();
    // PPO compares the sampling policy with the trained one: dropout would make them differ
    topts.lora.dropout = 0.0;
    let attached = match &o.init_adapter {
        Some(dir) => {
            let mut loaded = TrainState::new(model.linears().len());
            let cfg = lora::load_adapter(dir, &model, &mut loaded)?;
            let mut cfg = cfg;
            cfg.dropout = 0.0;
            topts.lora = cfg.clone();
            topts.method = if cfg.dora { Method::Dora } else { Method::Lora };
            let a = attach_method(&topts, &model, &mut state, &tok, &mut init_rng)?;
            for (i, (dst, src)) in state.lora.iter_mut().zip(&loaded.lora).enumerate() {
                match (dst, src) {
                    (Some(d), Some(s)) => *d = s.clone(),
                    (None, None) => {}
                    _ => {
                        return Err(Error::bad_input(
                            dir,
                            format!("adapter layout of linear {i} differs from its own config"),
                        ))
                    }
                }
            }
            a
        }
        None => attach_method(&topts, &model, &mut state, &tok, &mut init_rng)?,
    };
    // the reference: the starting adapter frozen (none: the bare base)
    let mut reference = TrainState::new(model.linears().len());
    if o.init_adapter.is_some() {
        reference.lora = state.lora.clone();
    }
    // value head, zero-initialised: values start at 0 and learn from the returns
    state.value_head = Some(vec![0.0; h]);
    state.value_bias = Some(0.0);
    state.add(
        Slot::ValueHead,
        ParamState::new("v_head.summary.weight".into(), vec![1, h], true),
    );
    state.add(
        Slot::ValueBias,
        ParamState::new("v_head.summary.bias".into(), vec![1], false),
    );
    super::full::refuse_4bit_trainables(&model, &state, &t.model)?;
    super::trainer::apply_compute_dtype(&topts, &mut model, &state, true);
    let mut reward = RewardModel::load(
        &o.reward_model,
        o.reward_adapter.as_deref(),
        device,
        &t.model,
        &model,
        &tok,
    )?;
    let stop = crate::generate::stop_tokens(&t.model, &model.config, &tok)?;
    if rank0 {
        println!(
            "trainable params: {} || all params: {}",
            state.trainable_count(),
            model.config.param_count() + state.trainable_count()
        );
    }
    if t.plan {
        print!(
            "{}",
            super::plan::ppo_report(&model, &state, o, reward.own_model(), &prompts)
        );
        return Ok(PpoSummary {
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
    let mut kl = KlController {
        value: o.kl_coef,
        adaptive: o.adaptive_kl,
    };
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
            extra.get("kl_coef").and_then(|v| v.as_f64()),
            extra
                .get("sample_rng")
                .and_then(|v| serde_json::from_value::<[u64; 4]>(v.clone()).ok()),
        ) {
            (Some(k), Some(s)) => {
                kl.value = k;
                sample_rng = Rng::from_state(s);
            }
            _ => {
                return Err(Error::bad_input(
                    &dir,
                    "not a ppo-train checkpoint (no KL coefficient or sampling state)",
                ))
            }
        }
        crate::cli::info(format!(
            "resumed from {} at step {}",
            dir.display(),
            prog.step
        ));
    }
    let mut inputs: Vec<&Path> = vec![&t.model, &t.data, &o.reward_model];
    inputs.extend(o.init_adapter.as_deref());
    inputs.extend(o.reward_adapter.as_deref());
    // Data parallel: the ranks must agree on the job before rank 0 touches OUT.
    crate::dist::check_same_job(
        comm,
        &model,
        &state,
        &[
            ("prompts", prompts.len() as u64),
            ("total steps", total_steps),
            ("step", prog.step),
            ("batch", t.batch as u64),
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
    let eval_ids: Vec<&[u32]> = eval_set.iter().map(|p| p.ids.as_slice()).collect();
    let before = if prog.step == 0 {
        let e = evaluate(
            o,
            &mut backend,
            &mut model,
            &head_pack,
            &mut state,
            &mut reference,
            &mut reward,
            &eval_ids,
            &stop,
            comm,
        )?;
        if let Some(e) = &e {
            crate::cli::info(format!(
                "before training: mean score {:.4}, KL {:.4}, response length {:.1} ({} prompts)",
                e.score,
                e.kl,
                e.response_length,
                eval_ids.len()
            ));
            write_log(
                &mut log,
                json!({"step": 0, "eval_score": e.score, "eval_kl": e.kl, "eval_response_length": e.response_length}),
            )?;
        }
        e
    } else {
        None
    };

    let bar = progress.bar(total_steps, "ppo");
    bar.set_position(prog.step);
    let mut dropout_rng = Rng::from_state(prog.rng);
    let mut order: (u64, Vec<usize>) = (u64::MAX, Vec::new());
    let mut select = t.clone();
    select.grad_accum = 1;
    select.steps = Some(total_steps);
    let mut interrupted = false;
    while prog.step < total_steps {
        let window = next_window(&mut prog, &mut order, prompts.len(), &select);
        let batch_prompts: Vec<&[u32]> = window[0]
            .iter()
            .map(|&i| prompts[i].ids.as_slice())
            .collect();
        let t0 = std::time::Instant::now();
        let beta = kl.value;
        let ro = collect(
            o,
            &mut backend,
            &mut model,
            &head_pack,
            &mut state,
            &mut reference,
            &mut reward,
            &batch_prompts,
            &stop,
            &mut sample_rng,
            beta,
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
        let (score_mean, score_std) = mean_std(&ro.scores);
        let n = ro.seqs.len() as f64;
        let kl_mean = ro.kl_k1.iter().sum::<f64>() / n;
        let penalty_mean = ro.kl_penalty.iter().sum::<f64>() / n;
        kl.update(kl_mean, ro.seqs.len());
        prog.step += 1;
        let resp_tokens: usize = ro.response_len.iter().sum();
        prog.tokens += ro.seqs.iter().map(|s| s.len() as u64).sum::<u64>();
        prog.rng = dropout_rng.state();
        prog.extra = Some(json!({"kl_coef": kl.value, "sample_rng": sample_rng.state()}));
        let len_mean = resp_tokens as f64 / n;
        bar.set_position(prog.step);
        bar.set_message(format!(
            "score {score_mean:.3} kl {kl_mean:.3} len {len_mean:.1}"
        ));
        let (vals_mean, _) = {
            let v: Vec<f64> = ro
                .values
                .iter()
                .zip(&ro.vmask)
                .filter(|(_, &m)| m)
                .map(|(v, _)| *v)
                .collect();
            mean_std(&v)
        };
        let ret_mean = masked_mean(&ro.returns, &ro.vmask);
        write_log(
            &mut log,
            json!({
                "step": prog.step,
                "epoch": prog.epoch,
                "lr": lr,
                "kl_coef": beta,
                "score_mean": score_mean,
                "score_std": score_std,
                "kl": kl_mean,
                "kl_penalty": penalty_mean,
                "non_score_reward": -beta * penalty_mean,
                "rlhf_reward": score_mean - beta * penalty_mean,
                "entropy": ro.entropy,
                "response_length": len_mean,
                "eos_fraction": ro.stopped.iter().filter(|&&s| s).count() as f64 / n,
                "pg_loss": up.pg_loss,
                "vf_loss": up.vf_loss,
                "clipfrac": up.clipfrac,
                "vf_clipfrac": up.vf_clipfrac,
                "approx_kl": up.approx_kl,
                "ratio_mean": up.ratio,
                "skipped_batches": up.skipped,
                "explained_variance": ro.explained_variance,
                "value_mean": vals_mean,
                "return_mean": ret_mean,
                "grad_norm": up.grad_norm,
                "optimizer_steps": up.updates,
                "rollout_tokens_per_second": resp_tokens as f64 / rollout_s.max(1e-9),
                "update_tokens_per_second": up.tokens as f64 / update_s.max(1e-9),
                "rollout_seconds": rollout_s,
                "update_seconds": update_s,
            }),
        )?;
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
        return Ok(PpoSummary {
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
        &head_pack,
        &mut state,
        &mut reference,
        &mut reward,
        &eval_ids,
        &stop,
        comm,
    )?;
    if let Some(e) = &after {
        crate::cli::info(format!(
            "after training: mean score {:.4}, KL {:.4}, response length {:.1} ({} prompts)",
            e.score,
            e.kl,
            e.response_length,
            eval_ids.len()
        ));
        write_log(
            &mut log,
            json!({"step": prog.step, "eval_score": e.score, "eval_kl": e.kl, "eval_response_length": e.response_length}),
        )?;
    }
    if rank0 {
        save_output(&topts, &attached, &model, &state, "CAUSAL_LM")?;
        save_value_head(&t.out, &state)?;
    }
    Ok(PpoSummary {
        steps: prog.step,
        before,
        after,
        interrupted,
        rank0,
    })
}

/// The value head next to the adapter, under TRL's names (`v_head.summary.weight [1, h]`,
/// `v_head.summary.bias [1]`).
pub fn save_value_head(out: &Path, state: &TrainState) -> Result<()> {
    let (Some(w), Some(b)) = (&state.value_head, state.value_bias) else {
        return Err(Error::usage("internal: no value head to save"));
    };
    let tensors = vec![
        (
            "v_head.summary.weight".to_string(),
            vec![1, w.len()],
            w.clone(),
        ),
        ("v_head.summary.bias".to_string(), vec![1], vec![b]),
    ];
    let meta = [("format".to_string(), "pt".to_string())].into();
    let path = out.join(VALUE_HEAD_FILE);
    crate::io::safetensors_file::write_f32_tensors(
        &path,
        &tensors,
        crate::io::safetensors_file::OutDtype::F32,
        &meta,
    )
}

pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";

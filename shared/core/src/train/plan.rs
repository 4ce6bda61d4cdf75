//! `--plan`: the memory and time a run will take, before it starts.

use super::data::Example;
use super::params::TrainState;
use super::trainer::TrainOptions;
use crate::model::Model;

fn gb(bytes: f64) -> String {
    format!("{:.2} GB", bytes / 1e9)
}

pub fn report(
    model: &Model,
    state: &TrainState,
    opts: &TrainOptions,
    examples: &[Example],
    steps: u64,
) -> String {
    let c = &model.config;
    // Linear weights as stored (4-bit ones at about half a byte each), everything else f32.
    let (linear_params, linear_bytes) = model.linear_weight_memory();
    let weights = (c.param_count() - linear_params) as f64 * 4.0 + linear_bytes as f64;
    let weights_label = if model.has_4bit_weights() {
        "weights (4-bit linear)"
    } else {
        "weights (f32)         "
    };
    let trainable = state.trainable_count() as f64;
    let lens: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let mean_len = lens.iter().sum::<usize>() as f64 / lens.len().max(1) as f64;
    let max_len = lens.iter().copied().max().unwrap_or(0) as f64;
    let tokens_mb = if opts.pack {
        opts.data_opts.max_len as f64 * opts.batch as f64
    } else {
        max_len * opts.batch as f64
    };
    // Saved per token and layer: residual in/mid, two norm outputs, q, k, v, attention output,
    // gate, up, activation (f32); attention probabilities per head and sequence.
    let per_token_layer =
        (4 * c.hidden + 2 * c.q_dim() + 2 * c.kv_dim() + 3 * c.intermediate) as f64 * 4.0;
    let seq = if opts.pack {
        opts.data_opts.max_len as f64
    } else {
        max_len
    };
    let probs_layer = c.heads as f64 * seq * seq * 4.0 * opts.batch as f64;
    let activations = (per_token_layer * tokens_mb + probs_layer) * c.layers as f64;
    let logits = 256.0 * c.vocab as f64 * 4.0 * 2.0;
    let optimizer = trainable * 4.0 * 3.0;
    let total = weights + trainable * 4.0 + optimizer + activations + logits;
    let tokens_per_step = mean_len * (opts.batch * opts.grad_accum) as f64;
    // 6·N FLOPs per token for a full backward; LoRA skips weight gradients (≈ 4·N).
    let flops_per_token = if trainable > 0.5 * c.param_count() as f64 {
        6.0
    } else {
        4.0
    } * c.param_count() as f64;
    let seconds = steps as f64 * tokens_per_step * flops_per_token / 120e9;
    format!(
        "plan for {} ({} layers, {} parameters)\n  {} {}\n  trainable parameters   {} ({})\n  gradients + AdamW      {}\n  activations (micro-batch of ~{:.0} tokens) {}\n  logits chunk           {}\n  total (estimate)       {}\n  steps {}  tokens/step ~{:.0}  time at ~120 GFLOP/s ~{:.0} min\n",
        opts.model.display(),
        c.layers,
        c.param_count(),
        weights_label,
        gb(weights),
        trainable as u64,
        gb(trainable * 4.0),
        gb(optimizer),
        tokens_mb,
        gb(activations),
        gb(logits),
        gb(total),
        steps,
        tokens_per_step,
        seconds / 60.0
    )
}

/// ppo-train's `--plan`: what stays resident (one base shared by policy, reference and, when
/// it is an adapter on the same base, the reward model) and what one step adds.
pub fn ppo_report(
    model: &Model,
    state: &TrainState,
    o: &super::ppo_trainer::PpoOptions,
    separate_reward: Option<&Model>,
    prompts: &[super::prompts::Prompt],
) -> String {
    let b = o.train.batch as f64;
    on_policy_report(
        model,
        state,
        &OnPolicyShape {
            tool: "ppo-train",
            model_dir: &o.train.model,
            trainable: "adapter + value head",
            sequences: o.train.batch,
            micro: (b / o.mini_batches.max(1) as f64 / o.train.grad_accum.max(1) as f64).ceil(),
            response_length: o.response_length,
            separate_reward,
            per_step: format!(
                "{} prompts, ≤ {} response tokens each, {} PPO epochs × {} mini-batches",
                o.train.batch, o.response_length, o.ppo_epochs, o.mini_batches
            ),
        },
        prompts,
    )
}

/// What an on-policy trainer holds at once, for [`on_policy_report`].
pub struct OnPolicyShape<'a> {
    pub tool: &'a str,
    pub model_dir: &'a std::path::Path,
    /// What the trainable parameters are.
    pub trainable: &'a str,
    /// Sequences sampled together per step (their KV caches are resident at once).
    pub sequences: usize,
    /// Sequences per forward-backward micro-batch.
    pub micro: f64,
    pub response_length: usize,
    /// A reward model with its own weights (None: on the policy's base, or none at all).
    pub separate_reward: Option<&'a Model>,
    /// One line on what a step does.
    pub per_step: String,
}

/// Memory of an on-policy run (PPO, GRPO): one base serving policy, reference and reward
/// adapters, the KV caches of a step's samples, and a micro-batch's activations.
pub fn on_policy_report(
    model: &Model,
    state: &TrainState,
    o: &OnPolicyShape,
    prompts: &[super::prompts::Prompt],
) -> String {
    let c = &model.config;
    let base_bytes = |m: &Model| {
        let (lp, lb) = m.linear_weight_memory();
        (m.config.param_count() - lp) as f64 * 4.0 + lb as f64
    };
    let weights = base_bytes(model);
    let reward = o.separate_reward.map_or(0.0, base_bytes);
    let trainable = state.trainable_count() as f64;
    let adapter_copies = trainable * 4.0 * 2.0; // sampling hooks + reference (at most)
    let max_prompt = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0) as f64;
    let seq = max_prompt + o.response_length as f64;
    let kv = o.sequences as f64 * seq * c.layers as f64 * 2.0 * c.kv_dim() as f64 * 4.0;
    let micro = o.micro;
    let per_token_layer =
        (4 * c.hidden + 2 * c.q_dim() + 2 * c.kv_dim() + 3 * c.intermediate) as f64 * 4.0;
    let activations = (per_token_layer * micro * seq + c.heads as f64 * seq * seq * 4.0 * micro)
        * c.layers as f64;
    let logits = 256.0 * c.vocab as f64 * 4.0 * 2.0;
    let optimizer = trainable * 4.0 * 3.0;
    let total =
        weights + reward + adapter_copies + trainable * 4.0 + optimizer + kv + activations + logits;
    format!(
        "plan for {} on {} ({} layers, {} parameters)\n  base weights (policy, reference{}) {}\n  reward model           {}\n  trainable ({}) {} ({})\n  gradients + AdamW      {}\n  adapter copies (sampling, reference) {}\n  KV cache ({} sequences × {:.0} tokens) {}\n  activations (micro-batch of {:.0} sequences) {}\n  logits chunk           {}\n  total (estimate)       {}\n  per step: {}\n",
        o.tool,
        o.model_dir.display(),
        c.layers,
        c.param_count(),
        if o.separate_reward.is_none() { ", reward" } else { "" },
        gb(weights),
        if o.separate_reward.is_some() { gb(reward) } else { "shared with the policy's base (or none)".into() },
        o.trainable,
        trainable as u64,
        gb(trainable * 4.0),
        gb(optimizer),
        gb(adapter_copies),
        o.sequences,
        seq,
        gb(kv),
        micro,
        gb(activations),
        gb(logits),
        gb(total),
        o.per_step,
    )
}

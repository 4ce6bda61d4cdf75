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

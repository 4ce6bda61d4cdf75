//! Model FLOPs of a training step: the multiply-adds of the products a step needs (linear
//! layers and their adapters, attention, the LM head on loss-bearing rows), counted the way
//! MFU is usually counted (2 FLOPs per multiply-add; elementwise work and recomputation not
//! counted). With the measured FMA peak ([`crate::kernels::peak`]) this gives the fraction of
//! peak a run reaches.

use super::engine::Batch;
use super::params::{linears_per_block, Slot, TrainState};
use crate::model::Model;

/// FLOPs of one step, by kind of product.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Flops {
    pub linear_forward: f64,
    pub linear_backward: f64,
    pub attention_forward: f64,
    pub attention_backward: f64,
    /// LM head (forward and backward) over the rows that carry a loss.
    pub head: f64,
}

impl Flops {
    pub fn total(&self) -> f64 {
        self.linear_forward
            + self.linear_backward
            + self.attention_forward
            + self.attention_backward
            + self.head
    }

    pub fn add(&mut self, o: &Flops) {
        self.linear_forward += o.linear_forward;
        self.linear_backward += o.linear_backward;
        self.attention_forward += o.attention_forward;
        self.attention_backward += o.attention_backward;
        self.head += o.head;
    }
}

/// FLOPs of a forward (and, with `backward`, backward) pass over `batch`, where the backward
/// pass runs through blocks `stop_layer..` (the engine stops at the lowest trainable block).
pub fn batch_flops(
    model: &Model,
    state: &TrainState,
    batch: &Batch,
    stop_layer: usize,
    backward: bool,
) -> Flops {
    let c = &model.config;
    let lpb = linears_per_block(model);
    let n_prompt = state.prompt.as_ref().map_or(0, |p| p.n);
    let lens: Vec<usize> = batch.ids.iter().map(|s| s.len() + n_prompt).collect();
    let tokens: f64 = lens.iter().sum::<usize>() as f64;
    let mut f = Flops::default();
    for (i, l) in model.linears().iter().enumerate() {
        let (inp, out) = (l.in_features as f64, l.out_features as f64);
        let lora = state.lora[i]
            .as_ref()
            .map_or(0.0, |lo| lo.rank as f64 * (inp + out));
        f.linear_forward += tokens * 2.0 * (inp * out + lora);
        if backward && i / lpb >= stop_layer {
            // input gradient, the adapter's three products, and the weight gradient when the
            // base weight itself trains
            let dw = if state.is_trainable(Slot::LinearWeight(i)) {
                inp * out
            } else {
                0.0
            };
            f.linear_backward += tokens * 2.0 * (inp * out + 2.0 * lora + dw);
        }
    }
    // Causal attention: each query meets the keys at or before it (within a sliding window).
    let per_pair = 2.0 * (c.heads * c.head_dim) as f64; // one product: 2·heads·head_dim per pair
    for (layer, window) in (0..c.layers).map(|l| (l, c.sliding_window.get(l).copied().flatten())) {
        let pairs: f64 = lens
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|t| window.map_or(t + 1, |w| (t + 1).min(w)) as f64)
                    .sum::<f64>()
            })
            .sum();
        f.attention_forward += 2.0 * per_pair * pairs; // Q·Kᵀ and P·V
        if backward && layer >= stop_layer {
            f.attention_backward += 4.0 * per_pair * pairs; // dP, dV, dQ, dK
        }
    }
    let loss_rows = batch.loss_tokens() as f64;
    let head = 2.0 * (c.vocab * c.hidden) as f64 * loss_rows;
    let head_trains = state.is_trainable(Slot::lm_head(model));
    f.head = head * (1.0 + if backward { 1.0 } else { 0.0 } + if head_trains { 1.0 } else { 0.0 });
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand count for a one-block toy: every term of the formula, once.
    #[test]
    fn counts_products_by_hand() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/llama_gqa");
        let model = Model::load(&dir).unwrap();
        let c = &model.config;
        let mut state = TrainState::new(model.linears().len());
        let ids = [1u32, 2, 3, 4];
        let labels = [1i32, 2, 3, 4];
        let batch = Batch {
            ids: vec![&ids[..]],
            labels: vec![&labels[..]],
        };
        let f = batch_flops(&model, &state, &batch, c.layers, true);
        let lin: f64 = model
            .linears()
            .iter()
            .map(|l| 2.0 * (l.in_features * l.out_features) as f64)
            .sum();
        assert_eq!(f.linear_forward, 4.0 * lin);
        // stop_layer = layers: no block runs backward
        assert_eq!(f.linear_backward, 0.0);
        assert_eq!(f.attention_backward, 0.0);
        let pairs = (1 + 2 + 3 + 4) as f64;
        let per_pair = 2.0 * (c.heads * c.head_dim) as f64;
        assert_eq!(
            f.attention_forward,
            c.layers as f64 * 2.0 * per_pair * pairs
        );
        // 3 loss rows (the first token predicts nothing), forward + input gradient
        assert_eq!(f.head, 2.0 * 2.0 * (c.vocab * c.hidden) as f64 * 3.0);
        // With a backward pass through every block the linear backward equals the forward.
        state.lora.iter_mut().for_each(|l| *l = None);
        let g = batch_flops(&model, &state, &batch, 0, true);
        assert_eq!(g.linear_backward, g.linear_forward);
        assert_eq!(g.attention_backward, 2.0 * g.attention_forward);
    }
}

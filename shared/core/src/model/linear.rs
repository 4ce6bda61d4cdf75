//! Linear layers with a pluggable weight storage and adapter slots.

use super::hooks::{ForwardOptions, LinearAdapter};
use crate::kernels::{gemm, ops};

/// Storage of a frozen base weight `[out, in]`.
pub enum Weight {
    F32(Vec<f32>),
}

pub struct Linear {
    /// Hugging Face module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub weight: Weight,
    pub bias: Option<Vec<f32>>,
    /// GPT-2 `Conv1D`: stored `[in, out]` on disk (we keep `[out, in]` in memory).
    pub conv1d: bool,
    /// Adapter per slot (index = slot of [`ForwardOptions::adapter`]).
    pub adapters: Vec<Option<Box<dyn LinearAdapter>>>,
}

impl Linear {
    pub fn new(
        name: String,
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
        out: usize,
        inp: usize,
    ) -> Self {
        Self {
            name,
            in_features: inp,
            out_features: out,
            weight: Weight::F32(weight),
            bias,
            conv1d: false,
            adapters: Vec::new(),
        }
    }

    pub fn adapter(&self, opts: &ForwardOptions) -> Option<&dyn LinearAdapter> {
        opts.adapter
            .and_then(|s| self.adapters.get(s))
            .and_then(|a| a.as_deref())
    }

    /// y[rows, out] = x[rows, in] · Wᵀ + b, then the active adapter's contribution.
    pub fn forward(&self, x: &[f32], rows: usize, y: &mut [f32], opts: &ForwardOptions) {
        self.forward_with(x, rows, y, opts, None);
    }

    /// Pack the base weight for [`Linear::forward_with`] into `dst` (reusing its memory).
    pub fn pack_into(&self, dst: &mut gemm::PackedWeight) {
        match &self.weight {
            Weight::F32(w) => dst.repack(w, self.out_features, self.in_features),
        }
    }

    /// [`Linear::forward`] with the base weight optionally prepacked by
    /// [`Linear::pack_into`] (same result, no packing of the weight in the product).
    pub fn forward_with(
        &self,
        x: &[f32],
        rows: usize,
        y: &mut [f32],
        opts: &ForwardOptions,
        packed: Option<&gemm::PackedWeight>,
    ) {
        let adapter = self.adapter(opts);
        let scaled;
        let xin = match adapter.and_then(|a| a.input_scale()) {
            Some(s) => {
                scaled = scale_columns(x, s);
                &scaled[..]
            }
            None => x,
        };
        match (&self.weight, packed) {
            (_, Some(p)) => {
                assert_eq!(
                    (p.n(), p.k()),
                    (self.out_features, self.in_features),
                    "packed weight shape"
                );
                gemm::matmul_nt_packed(xin, p, &mut y[..rows * self.out_features], rows, false)
            }
            (Weight::F32(w), None) => gemm::matmul_nt(
                xin,
                w,
                &mut y[..rows * self.out_features],
                rows,
                self.out_features,
                self.in_features,
                false,
            ),
        }
        if let Some(b) = &self.bias {
            ops::add_bias(&mut y[..rows * self.out_features], b);
        }
        if let Some(a) = adapter {
            a.forward_output(
                xin,
                rows,
                &mut y[..rows * self.out_features],
                self.bias.as_deref(),
            );
        }
    }

    pub fn forward_alloc(&self, x: &[f32], rows: usize, opts: &ForwardOptions) -> Vec<f32> {
        let mut y = vec![0.0; rows * self.out_features];
        self.forward(x, rows, &mut y, opts);
        y
    }
}

fn scale_columns(x: &[f32], s: &[f32]) -> Vec<f32> {
    x.chunks_exact(s.len())
        .flat_map(|row| row.iter().zip(s).map(|(a, b)| a * b))
        .collect()
}

//! Linear layers with a pluggable weight storage and adapter slots.

use super::hooks::{ForwardOptions, LinearAdapter};
use crate::kernels::{gemm, ops};
use crate::quant::QuantizedTensor;

/// Storage of a frozen base weight `[out, in]`.
pub enum Weight {
    F32(Vec<f32>),
    /// 4-bit NF4/FP4 (bitsandbytes layout, Linear orientation): decoded block by block
    /// inside every product, never expanded to a full-precision copy.
    Q4(Box<QuantizedTensor>),
}

impl Weight {
    /// The weight as a plain f32 matrix, if that is how it is stored.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Weight::F32(w) => Some(w),
            Weight::Q4(_) => None,
        }
    }

    /// Bytes the weight occupies in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::F32(w) => w.len() * 4,
            Weight::Q4(q) => q.packed.len() + q.absmax.len() * 4,
        }
    }
}

/// Rows up to which a 4-bit layer with bf16 compute keeps the f32 path: decoding the whole
/// weight into bf16 panels only pays off over many rows (not for generation's few).
const Q4_BF16_MIN_ROWS: usize = 16;

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
    /// bf16 compute (`--compute-dtype bf16`): the frozen f32 weight packed as bf16 for the
    /// training products, as torch autocast computes them (bf16 inputs, f32 accumulation).
    pub bf16: Option<Box<Bf16Packs>>,
    /// bf16 compute of a frozen 4-bit weight: each product decodes it into bf16 panels
    /// (bitsandbytes dequantizes to the compute dtype the same way) instead of f32 ones.
    pub q4_bf16: bool,
}

/// A frozen weight in bf16, packed for the forward product and (for training) for the input
/// gradient.
pub struct Bf16Packs {
    pub nt: gemm::PackedBf16,
    /// None for inference ([`Bf16Packs::forward_only`]): the input gradient then uses the f32
    /// weight.
    pub nn: Option<gemm::PackedBf16>,
}

impl Bf16Packs {
    /// Round and pack `w` (`[n, k]`) for both products.
    pub fn new(w: &[f32], n: usize, k: usize) -> Self {
        let nt = gemm::PackedBf16::for_nt(w, n, k);
        let nn = Some(nt.for_nn_of(w, n, k));
        Self { nt, nn }
    }

    /// Round and pack `w` (`[n, k]`) for the forward product only (generation, evaluation).
    pub fn forward_only(w: &[f32], n: usize, k: usize) -> Self {
        let nt = gemm::PackedBf16::for_nt(w, n, k);
        Self { nt, nn: None }
    }
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
            bf16: None,
            q4_bf16: false,
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

    /// A linear layer with a 4-bit base weight.
    pub fn new_q4(name: String, weight: QuantizedTensor, bias: Option<Vec<f32>>) -> Self {
        let (out, inp) = (weight.shape()[0], weight.shape()[1]);
        Self {
            name,
            in_features: inp,
            out_features: out,
            weight: Weight::Q4(Box::new(weight)),
            bias,
            conv1d: false,
            adapters: Vec::new(),
            bf16: None,
            q4_bf16: false,
        }
    }

    /// The 4-bit weight `q` (this layer's) as a GEMM operand.
    fn q4<'a>(&self, q: &'a QuantizedTensor) -> gemm::Q4Weight<'a> {
        gemm::Q4Weight {
            packed: &q.packed,
            absmax: &q.absmax,
            code: &q.code,
            blocksize: q.blocksize(),
            n: self.out_features,
            k: self.in_features,
        }
    }

    /// Pack the base weight for [`Linear::forward_with`] into `dst` (reusing its memory).
    pub fn pack_into(&self, dst: &mut gemm::PackedWeight) {
        match &self.weight {
            Weight::F32(w) => dst.repack(w, self.out_features, self.in_features),
            Weight::Q4(q) => dst.repack_q4(&self.q4(q)),
        }
    }

    /// Compute this layer's base products in bf16 from now on. The weight must stay frozen:
    /// an f32 one is rounded and packed once (the packs are not refreshed); a 4-bit one is
    /// decoded into bf16 panels per product.
    pub fn use_bf16(&mut self) {
        match &self.weight {
            Weight::F32(w) => {
                let (n, k) = (self.out_features, self.in_features);
                self.bf16 = Some(Box::new(Bf16Packs::new(w, n, k)));
            }
            Weight::Q4(_) => self.q4_bf16 = true,
        }
    }

    /// [`Linear::use_bf16`] for inference: the forward product only, so the layer holds one
    /// bf16 copy of an f32 weight instead of two.
    pub fn use_bf16_forward(&mut self) {
        match &self.weight {
            Weight::F32(w) => {
                let (n, k) = (self.out_features, self.in_features);
                self.bf16 = Some(Box::new(Bf16Packs::forward_only(w, n, k)));
            }
            Weight::Q4(_) => self.q4_bf16 = true,
        }
    }

    /// y[rows, out] (+)= x[rows, in] · Wᵀ with the base weight only (no bias, no adapter).
    pub fn matmul_base(&self, x: &[f32], rows: usize, y: &mut [f32], acc: bool) {
        let (out, inp) = (self.out_features, self.in_features);
        if let Some(p) = &self.bf16 {
            return gemm::matmul_nt_bf16(x, &p.nt, &mut y[..rows * out], rows, acc);
        }
        match &self.weight {
            Weight::F32(w) => gemm::matmul_nt(x, w, &mut y[..rows * out], rows, out, inp, acc),
            Weight::Q4(q) if self.q4_bf16 && rows > Q4_BF16_MIN_ROWS => {
                gemm::matmul_nt_q4_bf16(x, &self.q4(q), &mut y[..rows * out], rows, acc)
            }
            Weight::Q4(q) => gemm::matmul_nt_q4(x, &self.q4(q), &mut y[..rows * out], rows, acc),
        }
    }

    /// dx[rows, in] (+)= dy[rows, out] · W: the base weight's share of the input gradient.
    pub fn matmul_base_backward(&self, dy: &[f32], rows: usize, dx: &mut [f32], acc: bool) {
        let (out, inp) = (self.out_features, self.in_features);
        if let Some(nn) = self.bf16.as_ref().and_then(|p| p.nn.as_ref()) {
            return gemm::matmul_nn_bf16(dy, nn, &mut dx[..rows * inp], rows, acc);
        }
        match &self.weight {
            Weight::F32(w) => gemm::matmul_nn(dy, w, &mut dx[..rows * inp], rows, inp, out, acc),
            Weight::Q4(q) if self.q4_bf16 && rows > Q4_BF16_MIN_ROWS => {
                gemm::matmul_nn_q4_bf16(dy, &self.q4(q), &mut dx[..rows * inp], rows, acc)
            }
            Weight::Q4(q) => gemm::matmul_nn_q4(dy, &self.q4(q), &mut dx[..rows * inp], rows, acc),
        }
    }

    /// Row `o` of the base weight in f32 (DoRA's weight norms, merging).
    pub fn weight_row(&self, o: usize, out: &mut [f32]) {
        let k = self.in_features;
        match &self.weight {
            Weight::F32(w) => out.copy_from_slice(&w[o * k..(o + 1) * k]),
            Weight::Q4(q) => gemm::decode_q4(&self.q4(q), o * k, &mut out[..k]),
        }
    }

    /// The whole base weight in f32 (a temporary copy for 4-bit weights).
    pub fn weight_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        match &self.weight {
            Weight::F32(w) => std::borrow::Cow::Borrowed(&w[..]),
            Weight::Q4(q) => std::borrow::Cow::Owned(q.dequantize()),
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
                scaled = ops::scale_columns(x, s);
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
            (_, None) => self.matmul_base(xin, rows, y, false),
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

//! Extension points through which PEFT methods attach to the model without changes to the
//! model code (see docs/architecture.md).
//!
//! - [`LinearAdapter`]: every linear layer (LoRA, DoRA, IA3; a quantized base is a different
//!   [`super::linear::Weight`] instead).
//! - [`BlockAdapter`]: the output of each block's attention and MLP sub-layers (bottleneck
//!   adapters).
//! - [`KvPrefix`]: extra keys/values in front of every sequence (prefix tuning, P-Tuning v2).
//! - [`InputPrefix`]: virtual token embeddings in front of the input (prompt tuning).
//!
//! Adapters are loaded into named slots; [`ForwardOptions::adapter`] chooses which slot is
//! active for a call, so switching adapters never reloads or copies the base weights.

/// Addition to one linear layer: `y = base(x ⊙ s_in) (then modified by forward_output)`.
pub trait LinearAdapter: Send + Sync {
    /// Per-input-feature scale applied before the base product (IA3 on feed-forward layers).
    fn input_scale(&self) -> Option<&[f32]> {
        None
    }
    /// Modify the base output `y [rows, out]` (bias included) given the layer input
    /// `x [rows, in]` and the layer's bias (DoRA rescales only the bias-free part).
    fn forward_output(&self, x: &[f32], rows: usize, y: &mut [f32], bias: Option<&[f32]>);
}

/// Addition to a block's sub-layer output `h`, applied before the residual add; `input` is
/// the sub-layer's (normalized) input, for adapters that run parallel to it.
pub trait BlockAdapter: Send + Sync {
    fn after_attention(&self, _input: &[f32], _h: &mut [f32], _rows: usize) {}
    fn after_mlp(&self, _input: &[f32], _h: &mut [f32], _rows: usize) {}
}

/// Keys and values prepended to every sequence in one layer: `[n, kv_dim]` each, already in
/// the post-RoPE key space (as PEFT's past_key_values are).
pub trait KvPrefix: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn keys_values(&self, layer: usize) -> (&[f32], &[f32]);
}

/// Virtual token embeddings `[n, hidden]` put in front of each sequence's input embeddings.
pub trait InputPrefix: Send + Sync {
    fn embeddings(&self) -> (&[f32], usize);
}

/// Per-call choices.
#[derive(Clone, Debug, Default)]
pub struct ForwardOptions {
    /// Active adapter slot (None = the bare base model).
    pub adapter: Option<usize>,
}

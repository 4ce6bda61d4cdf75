//! Hugging Face causal LMs (Llama family, Mistral, Qwen2, GPT-2) in one block structure.
//!
//! The architectures differ only in a few places (norm kind, gated or plain MLP, rotary or
//! learned positions, fused or separate q/k/v); these are data here, not separate model types,
//! so PEFT methods attach to one structure (see `hooks`).

pub mod config;
pub mod forward;
pub mod hooks;
pub mod linear;
pub mod load;
pub mod rope;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use forward::{KvCache, SeqInput};
pub use hooks::ForwardOptions;
pub use linear::Linear;
pub use load::QuantizeOnLoad;

/// A normalisation layer's parameters.
pub struct Norm {
    pub name: String,
    pub weight: Vec<f32>,
    /// LayerNorm only.
    pub bias: Option<Vec<f32>>,
}

// One per layer: the size difference between variants costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
pub enum QkvProj {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// GPT-2's `c_attn`: one product giving [q | k | v].
    Fused(Linear),
}

pub struct Attention {
    pub qkv: QkvProj,
    pub o: Linear,
    /// Prefix keys/values per adapter slot.
    pub prefixes: Vec<Option<Box<dyn hooks::KvPrefix>>>,
}

pub enum Mlp {
    /// down(act(gate(x)) · up(x))
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    /// proj(act(fc(x))) — GPT-2
    Plain { fc: Linear, proj: Linear },
}

pub struct Block {
    pub attn_norm: Norm,
    pub attn: Attention,
    pub mlp_norm: Norm,
    pub mlp: Mlp,
    pub adapters: Vec<Option<Box<dyn hooks::BlockAdapter>>>,
}

pub struct Model {
    pub config: ModelConfig,
    /// `[vocab, hidden]`
    pub embed: Vec<f32>,
    pub embed_name: String,
    /// GPT-2 learned positions `[max_positions, hidden]`.
    pub pos_embed: Option<Vec<f32>>,
    pub blocks: Vec<Block>,
    pub final_norm: Norm,
    /// None when tied to the input embeddings, and for a sequence-classification checkpoint
    /// (`config.seq_cls`), which has no LM head: its LM logits ([`Model::head_weight`] then
    /// gives the embeddings) are meaningless and must not be used; score it with
    /// `train::preference::load_reward_model` / `score_sequences`.
    pub lm_head: Option<Linear>,
    pub inv_freq: Vec<f32>,
    /// Virtual input tokens per adapter slot.
    pub input_prefixes: Vec<Option<Box<dyn hooks::InputPrefix>>>,
    /// bf16 compute (`--compute-dtype bf16`) of a frozen LM head (tied or not): its weight
    /// packed as bf16 for the logits and for the hidden-state gradient of the loss.
    pub head_bf16: Option<Box<linear::Bf16Packs>>,
}

impl Model {
    /// Every linear layer with its module path (the targets PEFT methods choose from).
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = Vec::new();
        for b in &self.blocks {
            match &b.attn.qkv {
                QkvProj::Separate { q, k, v } => out.extend([q, k, v]),
                QkvProj::Fused(l) => out.push(l),
            }
            out.push(&b.attn.o);
            match &b.mlp {
                Mlp::Gated { gate, up, down } => out.extend([gate, up, down]),
                Mlp::Plain { fc, proj } => out.extend([fc, proj]),
            }
        }
        out
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        for b in &mut self.blocks {
            match &mut b.attn.qkv {
                QkvProj::Separate { q, k, v } => out.extend([q, k, v]),
                QkvProj::Fused(l) => out.push(l),
            }
            out.push(&mut b.attn.o);
            match &mut b.mlp {
                Mlp::Gated { gate, up, down } => out.extend([gate, up, down]),
                Mlp::Plain { fc, proj } => out.extend([fc, proj]),
            }
        }
        out
    }

    /// (parameters, bytes in memory) of the linear layers' base weights (4-bit or f32).
    pub fn linear_weight_memory(&self) -> (usize, usize) {
        self.linears().iter().fold((0, 0), |(n, b), l| {
            (n + l.in_features * l.out_features, b + l.weight.bytes())
        })
    }

    /// True when some linear weight is stored 4-bit.
    pub fn has_4bit_weights(&self) -> bool {
        self.linears()
            .iter()
            .any(|l| matches!(l.weight, linear::Weight::Q4(_)))
    }

    /// Output-head weight `[vocab, hidden]` (the embeddings when tied).
    /// Compute the loss's LM-head products in bf16 from now on. Only for a frozen head: the
    /// packs are a snapshot of the weight.
    pub fn use_bf16_head(&mut self) {
        let (n, k) = (self.config.vocab, self.config.hidden);
        let w = self.head_weight();
        self.head_bf16 = Some(Box::new(linear::Bf16Packs::new(w, n, k)));
    }

    /// Inference in bf16 (`peft-generate` / `peft-eval --compute-dtype bf16`): every linear
    /// layer and the output head multiply bf16 weights with f32 accumulation, forward only.
    /// Generation reads half the bytes per token; the f32 weights stay for adapters that need
    /// them (DoRA's norms, merging).
    pub fn use_bf16_forward(&mut self) {
        for l in self.linears_mut() {
            l.use_bf16_forward();
        }
        match &mut self.lm_head {
            Some(l) => l.use_bf16_forward(),
            None => {
                let (n, k) = (self.config.vocab, self.config.hidden);
                self.head_bf16 = Some(Box::new(linear::Bf16Packs::forward_only(&self.embed, n, k)));
            }
        }
    }

    pub fn head_weight(&self) -> &[f32] {
        match &self.lm_head {
            // The output head is never stored 4-bit (quantize-nf4 and transformers skip it).
            Some(l) => l.weight.as_f32().expect("the LM head is stored in f32"),
            None => &self.embed,
        }
    }
}

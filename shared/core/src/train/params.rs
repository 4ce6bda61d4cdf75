//! Trainable tensors: which parameters a run trains, their gradients and optimizer moments.
//!
//! Frozen base weights stay in the [`Model`] and never get a gradient buffer. A trainable
//! tensor is a [`Slot`]: either an adapter tensor owned here (LoRA A/B, DoRA magnitude) or a
//! base tensor that full/frozen fine-tuning updates in place inside the model.

use crate::model::{linear::Weight, Mlp, Model, QkvProj};
use std::collections::HashMap;

/// Where a trainable tensor lives. Linear and norm indices follow [`Model::linears`] and
/// [`norm_names`] order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    LoraA(usize),
    LoraB(usize),
    LoraMagnitude(usize),
    /// IA3 vector of linear layer i.
    Ia3(usize),
    /// Prompt tuning: the virtual token embeddings.
    PromptEmbedding,
    /// Bottleneck adapter of (block, site 0 = attention / 1 = MLP, part 0..4 = down weight,
    /// down bias, up weight, up bias).
    Bottleneck(usize, usize, usize),
    /// Prefix tuning: the prefix (or its embedding) and the reparameterization MLP.
    PrefixEmbedding,
    PrefixW1,
    PrefixB1,
    PrefixW2,
    PrefixB2,
    LinearWeight(usize),
    LinearBias(usize),
    NormWeight(usize),
    NormBias(usize),
    Embedding,
    PositionEmbedding,
    /// Untied LM head weight.
    Head,
    /// A reward model's scalar head (`score`, Linear hidden → 1 without bias).
    Score,
    /// PPO's value head on the policy backbone (`v_head.summary`, Linear hidden → 1 with bias).
    ValueHead,
    ValueBias,
}

impl Slot {
    /// The slot holding the LM head's weight: the untied head, or the embeddings it is tied to.
    pub fn lm_head(model: &Model) -> Slot {
        if model.lm_head.is_some() {
            Slot::Head
        } else {
            Slot::Embedding
        }
    }
}

/// Gradient and AdamW moments of one trainable tensor.
#[derive(Clone, Debug)]
pub struct ParamState {
    /// Name in the output file (PEFT key or HF tensor name).
    pub name: String,
    pub shape: Vec<usize>,
    pub grad: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Whether AdamW's weight decay applies (HF Trainer exempts biases and norm weights).
    pub decay: bool,
}

impl ParamState {
    pub fn new(name: String, shape: Vec<usize>, decay: bool) -> Self {
        let n = shape.iter().product();
        Self {
            name,
            shape,
            grad: vec![0.0; n],
            m: vec![0.0; n],
            v: vec![0.0; n],
            decay,
        }
    }
    pub fn numel(&self) -> usize {
        self.grad.len()
    }
}

/// One LoRA (or DoRA) adapter on a linear layer: y += s·B·A·dropout(x).
#[derive(Clone, Debug)]
pub struct LoraParams {
    pub rank: usize,
    pub alpha: f32,
    pub scale: f32,
    pub dropout: f32,
    pub in_features: usize,
    pub out_features: usize,
    /// `[rank, in]`
    pub a: Vec<f32>,
    /// `[out, rank]`
    pub b: Vec<f32>,
    /// DoRA magnitude `[out]`.
    pub magnitude: Option<Vec<f32>>,
}

/// Identity of a run's adapter values: fresh for every new state, shared by its evaluation
/// copies ([`TrainState::adapters_only`]). A GPU whose optimizer holds the current values
/// (gpu/engine/optim.rs) tells by it the run's own passes from those of another state (PPO's
/// frozen reference).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateId(u64);

impl Default for StateId {
    fn default() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

/// All trainable state of a run.
#[derive(Default)]
pub struct TrainState {
    /// LoRA adapter per linear index (None = no adapter).
    pub lora: Vec<Option<LoraParams>>,
    /// IA3 vector per linear index.
    pub ia3: Vec<Option<super::ia3::Ia3Params>>,
    /// Prefix tuning / P-Tuning v2.
    pub prefix: Option<super::prefix::PrefixParams>,
    /// Prompt tuning.
    pub prompt: Option<super::prompt::PromptParams>,
    /// Bottleneck adapters.
    pub bottleneck: Option<super::bottleneck::BottleneckParams>,
    /// Reward model head `[hidden]` (saved as `score.weight` `[1, hidden]`).
    pub score: Option<Vec<f32>>,
    /// PPO value head `[hidden]` and its bias.
    pub value_head: Option<Vec<f32>>,
    pub value_bias: Option<f32>,
    pub params: Vec<(Slot, ParamState)>,
    index: HashMap<Slot, usize>,
    pub id: StateId,
    /// Set while a GPU's optimizer holds newer values and moments than these (until
    /// `Backend::sync_to_host`): nothing may be saved from them then.
    pub host_stale: bool,
}

impl TrainState {
    pub fn new(linears: usize) -> Self {
        Self {
            lora: vec![None; linears],
            ia3: vec![None; linears],
            prefix: None,
            prompt: None,
            bottleneck: None,
            score: None,
            value_head: None,
            value_bias: None,
            params: Vec::new(),
            index: HashMap::new(),
            id: StateId::default(),
            host_stale: false,
        }
    }

    /// A copy of the adapters (LoRA, IA3, prefix, prompt) without gradients or optimizer
    /// state: what evaluation needs, and nothing it could change. It keeps the state's
    /// [`StateId`]: on a GPU whose optimizer holds newer values, the evaluation uses those.
    pub fn adapters_only(&self) -> Self {
        Self {
            lora: self.lora.clone(),
            ia3: self.ia3.clone(),
            prefix: self.prefix.clone(),
            prompt: self.prompt.clone(),
            bottleneck: self.bottleneck.clone(),
            score: self.score.clone(),
            value_head: self.value_head.clone(),
            value_bias: self.value_bias,
            params: Vec::new(),
            index: HashMap::new(),
            // The same values: a GPU holding newer ones evaluates those.
            id: self.id,
            host_stale: self.host_stale,
        }
    }

    /// Refuses to let stale values be saved: while a GPU's optimizer holds newer ones,
    /// `Backend::sync_to_host` must bring them back first.
    pub fn check_synced(&self) -> crate::error::Result<()> {
        if self.host_stale {
            return Err(crate::error::Error::Device(
                "internal: the GPU holds newer values than the host; they were not brought back before saving".into(),
            ));
        }
        Ok(())
    }

    pub fn add(&mut self, slot: Slot, state: ParamState) {
        self.index.insert(slot, self.params.len());
        self.params.push((slot, state));
    }

    pub fn is_trainable(&self, slot: Slot) -> bool {
        self.index.contains_key(&slot)
    }

    pub fn grad_mut(&mut self, slot: Slot) -> Option<&mut Vec<f32>> {
        let i = *self.index.get(&slot)?;
        Some(&mut self.params[i].1.grad)
    }

    /// Where `slot` is in `params`, when it trains.
    pub fn index_of(&self, slot: Slot) -> Option<usize> {
        self.index.get(&slot).copied()
    }

    pub fn get(&self, slot: Slot) -> Option<&ParamState> {
        self.index.get(&slot).map(|&i| &self.params[i].1)
    }

    pub fn zero_grads(&mut self) {
        for (_, p) in &mut self.params {
            p.grad.iter_mut().for_each(|g| *g = 0.0);
        }
    }

    pub fn trainable_count(&self) -> usize {
        self.params.iter().map(|(_, p)| p.numel()).sum()
    }

    /// The current value of a trainable tensor (adapter tensors here, base tensors in the model).
    pub fn value<'a>(&'a self, model: &'a Model, slot: Slot) -> &'a [f32] {
        match slot {
            Slot::LoraA(i) => &self.lora[i].as_ref().expect("lora").a,
            Slot::LoraB(i) => &self.lora[i].as_ref().expect("lora").b,
            Slot::LoraMagnitude(i) => self.lora[i]
                .as_ref()
                .and_then(|l| l.magnitude.as_deref())
                .expect("dora"),
            Slot::Ia3(i) => &self.ia3[i].as_ref().expect("ia3").l,
            Slot::PrefixEmbedding => &self.prefix.as_ref().expect("prefix").emb,
            Slot::PromptEmbedding => &self.prompt.as_ref().expect("prompt").emb,
            Slot::Score => self.score.as_deref().expect("score head"),
            Slot::ValueHead => self.value_head.as_deref().expect("value head"),
            Slot::ValueBias => std::slice::from_ref(self.value_bias.as_ref().expect("value bias")),
            Slot::Bottleneck(b, site, part) => {
                let u = self
                    .bottleneck
                    .as_ref()
                    .and_then(|p| p.unit(b, site))
                    .expect("adapter unit");
                [&u.down_w, &u.down_b, &u.up_w, &u.up_b][part]
            }
            Slot::PrefixW1 | Slot::PrefixB1 | Slot::PrefixW2 | Slot::PrefixB2 => {
                let m = self
                    .prefix
                    .as_ref()
                    .and_then(|p| p.mlp.as_ref())
                    .expect("prefix mlp");
                match slot {
                    Slot::PrefixW1 => &m.w1,
                    Slot::PrefixB1 => &m.b1,
                    Slot::PrefixW2 => &m.w2,
                    _ => &m.b2,
                }
            }
            _ => base_tensor(model, slot),
        }
    }

    /// Mutable value and the optimizer state of parameter `k` (for the update step).
    pub fn value_and_state_mut<'a>(
        &'a mut self,
        model: &'a mut Model,
        k: usize,
    ) -> (&'a mut [f32], &'a mut ParamState) {
        let (slot, state) = &mut self.params[k];
        let value: &mut [f32] = match *slot {
            Slot::LoraA(i) => &mut self.lora[i].as_mut().expect("lora").a,
            Slot::LoraB(i) => &mut self.lora[i].as_mut().expect("lora").b,
            Slot::LoraMagnitude(i) => self.lora[i]
                .as_mut()
                .and_then(|l| l.magnitude.as_deref_mut())
                .expect("dora"),
            Slot::Ia3(i) => &mut self.ia3[i].as_mut().expect("ia3").l,
            Slot::PrefixEmbedding => &mut self.prefix.as_mut().expect("prefix").emb,
            Slot::PromptEmbedding => &mut self.prompt.as_mut().expect("prompt").emb,
            Slot::Score => self.score.as_deref_mut().expect("score head"),
            Slot::ValueHead => self.value_head.as_deref_mut().expect("value head"),
            Slot::ValueBias => std::slice::from_mut(self.value_bias.as_mut().expect("value bias")),
            Slot::Bottleneck(b, site, part) => {
                let u = self
                    .bottleneck
                    .as_mut()
                    .and_then(|p| p.units.get_mut(b))
                    .and_then(|s| s[site].as_mut())
                    .expect("adapter unit");
                match part {
                    0 => &mut u.down_w,
                    1 => &mut u.down_b,
                    2 => &mut u.up_w,
                    _ => &mut u.up_b,
                }
            }
            s @ (Slot::PrefixW1 | Slot::PrefixB1 | Slot::PrefixW2 | Slot::PrefixB2) => {
                let m = self
                    .prefix
                    .as_mut()
                    .and_then(|p| p.mlp.as_mut())
                    .expect("prefix mlp");
                match s {
                    Slot::PrefixW1 => &mut m.w1,
                    Slot::PrefixB1 => &mut m.b1,
                    Slot::PrefixW2 => &mut m.w2,
                    _ => &mut m.b2,
                }
            }
            s => base_tensor_mut(model, s),
        };
        (value, state)
    }
}

/// Norm layers in a fixed order: per block (attention norm, MLP norm), then the final norm.
pub fn norm_names(model: &Model) -> Vec<String> {
    let mut v: Vec<String> = model
        .blocks
        .iter()
        .flat_map(|b| [b.attn_norm.name.clone(), b.mlp_norm.name.clone()])
        .collect();
    v.push(model.final_norm.name.clone());
    v
}

fn norm_mut(model: &mut Model, i: usize) -> &mut crate::model::Norm {
    let nb = model.blocks.len();
    if i == 2 * nb {
        &mut model.final_norm
    } else if i.is_multiple_of(2) {
        &mut model.blocks[i / 2].attn_norm
    } else {
        &mut model.blocks[i / 2].mlp_norm
    }
}

pub fn norm_ref(model: &Model, i: usize) -> &crate::model::Norm {
    let nb = model.blocks.len();
    if i == 2 * nb {
        &model.final_norm
    } else if i.is_multiple_of(2) {
        &model.blocks[i / 2].attn_norm
    } else {
        &model.blocks[i / 2].mlp_norm
    }
}

// Trainable base weights are f32: selecting a 4-bit weight for training is refused when the
// trainable set is built (train::full).
fn weight_vec(w: &Weight) -> &Vec<f32> {
    match w {
        Weight::F32(v) => v,
        Weight::Q4(_) => unreachable!("a 4-bit weight is never a trainable tensor"),
    }
}

fn weight_vec_mut(w: &mut Weight) -> &mut Vec<f32> {
    match w {
        Weight::F32(v) => v,
        Weight::Q4(_) => unreachable!("a 4-bit weight is never a trainable tensor"),
    }
}

/// A base tensor of the model (not an adapter tensor).
pub(crate) fn base_tensor(model: &Model, slot: Slot) -> &[f32] {
    match slot {
        Slot::LinearWeight(i) => weight_vec(&model.linears()[i].weight),
        Slot::LinearBias(i) => model.linears()[i].bias.as_deref().expect("bias"),
        Slot::NormWeight(i) => &norm_ref(model, i).weight,
        Slot::NormBias(i) => norm_ref(model, i).bias.as_deref().expect("bias"),
        Slot::Embedding => &model.embed,
        Slot::PositionEmbedding => model.pos_embed.as_deref().expect("positions"),
        Slot::Head => weight_vec(&model.lm_head.as_ref().expect("head").weight),
        _ => unreachable!("adapter slot"),
    }
}

fn base_tensor_mut(model: &mut Model, slot: Slot) -> &mut [f32] {
    match slot {
        Slot::LinearWeight(i) => weight_vec_mut(&mut model.linears_mut().swap_remove(i).weight),
        Slot::LinearBias(i) => model
            .linears_mut()
            .swap_remove(i)
            .bias
            .as_deref_mut()
            .expect("bias"),
        Slot::NormWeight(i) => &mut norm_mut(model, i).weight,
        Slot::NormBias(i) => norm_mut(model, i).bias.as_deref_mut().expect("bias"),
        Slot::Embedding => &mut model.embed,
        Slot::PositionEmbedding => model.pos_embed.as_deref_mut().expect("positions"),
        Slot::Head => weight_vec_mut(&mut model.lm_head.as_mut().expect("head").weight),
        _ => unreachable!("adapter slot"),
    }
}

/// Number of linear layers per block, in [`Model::linears`] order.
pub fn linears_per_block(model: &Model) -> usize {
    let b = &model.blocks[0];
    let attn = match b.attn.qkv {
        QkvProj::Separate { .. } => 4,
        QkvProj::Fused(_) => 2,
    };
    let mlp = match b.mlp {
        Mlp::Gated { .. } => 3,
        Mlp::Plain { .. } => 2,
    };
    attn + mlp
}

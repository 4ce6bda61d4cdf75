//! Full and frozen fine-tuning: base tensors selected by name train in place.
//!
//! Names are the Hugging Face tensor names of the model's own checkpoint
//! (`model.layers.3.mlp.up_proj.weight`, `lm_head.weight`, ...).

use super::params::{norm_ref, ParamState, Slot, TrainState};
use crate::model::Model;

/// Every base tensor of the model with its slot, HF name and shape (stored orientation is
/// [out, in] in memory; GPT-2 Conv1D weights are transposed on save).
pub fn base_tensors(model: &Model) -> Vec<(Slot, String, Vec<usize>)> {
    let mut v = Vec::new();
    let h = model.config.hidden;
    v.push((
        Slot::Embedding,
        format!("{}.weight", model.embed_name),
        vec![model.config.vocab, h],
    ));
    if model.pos_embed.is_some() {
        let name = model.embed_name.replace("wte", "wpe");
        v.push((
            Slot::PositionEmbedding,
            format!("{name}.weight"),
            vec![model.config.max_positions, h],
        ));
    }
    for (i, l) in model.linears().iter().enumerate() {
        v.push((
            Slot::LinearWeight(i),
            format!("{}.weight", l.name),
            vec![l.out_features, l.in_features],
        ));
        if let Some(b) = &l.bias {
            v.push((
                Slot::LinearBias(i),
                format!("{}.bias", l.name),
                vec![b.len()],
            ));
        }
    }
    for i in 0..2 * model.blocks.len() + 1 {
        let n = norm_ref(model, i);
        v.push((
            Slot::NormWeight(i),
            format!("{}.weight", n.name),
            vec![n.weight.len()],
        ));
        if let Some(b) = &n.bias {
            v.push((Slot::NormBias(i), format!("{}.bias", n.name), vec![b.len()]));
        }
    }
    if let Some(l) = &model.lm_head {
        v.push((
            Slot::Head,
            "lm_head.weight".into(),
            vec![l.out_features, l.in_features],
        ));
    }
    v
}

/// 4-bit base weights stay frozen (QLoRA trains adapters on them): a request to train one
/// directly is an error naming the first such tensor.
pub fn refuse_4bit_trainables(
    model: &Model,
    state: &TrainState,
    model_dir: &std::path::Path,
) -> crate::Result<()> {
    for (i, l) in model.linears().iter().enumerate() {
        if state.is_trainable(Slot::LinearWeight(i))
            && matches!(l.weight, crate::model::linear::Weight::Q4(_))
        {
            return Err(crate::Error::usage(format!(
                "{}.weight in {} is stored 4-bit and cannot be trained directly; train LoRA \
                 on it (QLoRA) or dequantize the model first (quantize-nf4 --dequantize)",
                l.name,
                model_dir.display()
            )));
        }
    }
    Ok(())
}

/// Make every base tensor whose HF name passes `select` trainable. `decay_all` applies weight
/// decay to every tensor (torch AdamW's default); otherwise biases and norm weights are
/// exempt, as transformers' Trainer does. Returns the number of tensors selected.
pub fn register(
    model: &Model,
    state: &mut TrainState,
    select: impl Fn(&str) -> bool,
    decay_all: bool,
) -> usize {
    let mut n = 0;
    for (slot, name, shape) in base_tensors(model) {
        if !select(&name) || state.is_trainable(slot) {
            continue;
        }
        let decay = decay_all
            || !(matches!(
                slot,
                Slot::LinearBias(_) | Slot::NormWeight(_) | Slot::NormBias(_)
            ));
        state.add(slot, ParamState::new(name, shape, decay));
        n += 1;
    }
    n
}

/// Which base tensors `--method freeze --trainable ...` trains. Forms (comma-separated):
/// `last:N` (the top N blocks), `lm_head`, `norms`, `embed`, or a regular expression searched
/// in the HF tensor name (e.g. `layers\.(28|29)\.mlp`).
pub struct Selector {
    layers_from: Option<usize>,
    head: bool,
    norms: bool,
    embed: bool,
    res: Vec<regex::Regex>,
}

impl Selector {
    pub fn parse(specs: &[String], layers: usize) -> crate::Result<Self> {
        let mut s = Selector {
            layers_from: None,
            head: false,
            norms: false,
            embed: false,
            res: Vec::new(),
        };
        for spec in specs
            .iter()
            .flat_map(|x| x.split(','))
            .map(str::trim)
            .filter(|x| !x.is_empty())
        {
            if let Some(n) = spec.strip_prefix("last:") {
                let n: usize = n.parse().map_err(|_| {
                    crate::Error::usage(format!("--trainable {spec}: expected last:N"))
                })?;
                s.layers_from = Some(layers.saturating_sub(n));
            } else if spec == "lm_head" {
                s.head = true;
            } else if spec == "norms" {
                s.norms = true;
            } else if spec == "embed" {
                s.embed = true;
            } else {
                s.res.push(regex::Regex::new(spec).map_err(|e| {
                    crate::Error::usage(format!("--trainable {spec}: not a valid regex: {e}"))
                })?);
            }
        }
        Ok(s)
    }

    pub fn matches(&self, name: &str) -> bool {
        let layer = super::lora::layer_index(name);
        if let (Some(from), Some(l)) = (self.layers_from, layer) {
            if l >= from {
                return true;
            }
        }
        if self.head && name == "lm_head.weight" {
            return true;
        }
        let is_embed = name.ends_with("embed_tokens.weight") || name.ends_with("wte.weight");
        if self.embed && is_embed {
            return true;
        }
        if self.norms && (name.contains("norm") || name.contains("ln_")) {
            return true;
        }
        self.res.iter().any(|r| r.is_match(name))
    }
}

//! Grouping the tensors of an adapter-like file into adapted modules by their key suffixes,
//! tolerating what a strict reader refuses (keys without PEFT's `base_model.model.` prefix,
//! incomplete pairs), so that inspection and `--base` checks can name the problem instead of
//! stopping at the first one.

use crate::io::model_folder::natural_key;
use crate::io::safetensors_file::{to_f32, SafetensorsFile};
use crate::merge::adapter_dir::PREFIX;
use crate::{Error, Result};
use std::collections::BTreeMap;

/// The role of a tensor inside an adapted module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    LoraA,
    LoraB,
    LoraBias,
    Magnitude,
    EmbeddingA,
    EmbeddingB,
    Ia3,
    DownWeight,
    DownBias,
    UpWeight,
    UpBias,
}

const LORA_SUFFIXES: &[(&str, Part)] = &[
    (".lora_A.weight", Part::LoraA),
    (".lora_B.weight", Part::LoraB),
    (".lora_B.bias", Part::LoraBias),
    (".lora_magnitude_vector", Part::Magnitude),
    (".lora_embedding_A", Part::EmbeddingA),
    (".lora_embedding_B", Part::EmbeddingB),
    (".ia3_l", Part::Ia3),
];

/// Bottleneck units (docs/adapters.md): `<block>.{attention,mlp}_adapter.{down,up}.{weight,bias}`.
const BOTTLENECK_SUFFIXES: &[(&str, Part)] = &[
    (".down.weight", Part::DownWeight),
    (".down.bias", Part::DownBias),
    (".up.weight", Part::UpWeight),
    (".up.bias", Part::UpBias),
];

/// One adapted module: its path in the base model and its tensors by role.
#[derive(Clone, Debug)]
pub struct Group {
    pub path: String,
    /// Every tensor key of the module starts with `base_model.model.`.
    pub prefixed: bool,
    pub parts: BTreeMap<Part, String>,
}

impl Group {
    pub fn is_lora(&self) -> bool {
        self.parts.keys().any(|p| {
            matches!(
                p,
                Part::LoraA | Part::LoraB | Part::EmbeddingA | Part::EmbeddingB
            )
        })
    }
    pub fn is_ia3(&self) -> bool {
        self.parts.contains_key(&Part::Ia3)
    }
    pub fn is_bottleneck(&self) -> bool {
        self.parts.contains_key(&Part::DownWeight) || self.parts.contains_key(&Part::UpWeight)
    }
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.parts.values()
    }
}

/// A file's tensors: the adapted modules (natural order) and everything else (file order).
#[derive(Clone, Debug, Default)]
pub struct Grouped {
    pub modules: Vec<Group>,
    pub others: Vec<String>,
}

/// `name` without PEFT's prefix, and whether it had it.
pub fn strip_prefix(name: &str) -> (&str, bool) {
    match name.strip_prefix(PREFIX) {
        Some(rest) => (rest, true),
        None => (name, false),
    }
}

fn classify(rest: &str) -> Option<(&str, Part)> {
    for (suffix, part) in LORA_SUFFIXES {
        if let Some(path) = rest.strip_suffix(suffix) {
            return Some((path, *part));
        }
    }
    for (suffix, part) in BOTTLENECK_SUFFIXES {
        if let Some(path) = rest.strip_suffix(suffix) {
            if path.ends_with("attention_adapter") || path.ends_with("mlp_adapter") {
                return Some((path, *part));
            }
        }
    }
    None
}

/// Group tensor names into modules.
pub fn group(names: &[String]) -> Grouped {
    let mut modules: BTreeMap<String, Group> = BTreeMap::new();
    let mut others = Vec::new();
    for name in names {
        let (rest, prefixed) = strip_prefix(name);
        match classify(rest) {
            Some((path, part)) if !path.is_empty() => {
                let g = modules.entry(path.to_string()).or_insert_with(|| Group {
                    path: path.to_string(),
                    prefixed: true,
                    parts: BTreeMap::new(),
                });
                g.prefixed &= prefixed;
                g.parts.insert(part, name.clone());
            }
            _ => others.push(name.clone()),
        }
    }
    let mut modules: Vec<Group> = modules.into_values().collect();
    modules.sort_by_cached_key(|g| natural_key(&g.path));
    Grouped { modules, others }
}

/// Tensor `name` of `file` as f32 with its shape, or an error naming file and tensor.
pub fn read_f32(file: &SafetensorsFile, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let t = file.require(name)?;
    let numel: usize = t.shape.iter().product();
    let v = to_f32(name, &t).map_err(|m| Error::bad_input(file.path(), m))?;
    if v.len() != numel {
        return Err(Error::bad_input(
            file.path(),
            format!(
                "tensor {name} holds {} values, its shape {:?} needs {numel}",
                v.len(),
                t.shape
            ),
        ));
    }
    Ok((v, t.shape.to_vec()))
}

/// Name of the dtype as safetensors writes it ("F32", "BF16", ...).
pub fn dtype_name(d: safetensors::Dtype) -> String {
    format!("{d:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_suffix() {
        let names: Vec<String> = [
            "base_model.model.model.layers.10.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.10.self_attn.q_proj.lora_B.weight",
            "model.layers.2.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight",
            "base_model.model.lm_head.weight",
            "prompt_embeddings",
            "model.layers.0.mlp_adapter.down.weight",
            "base_model.model.model.layers.0.mlp.down_proj.ia3_l",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let g = group(&names);
        let paths: Vec<&str> = g.modules.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "model.layers.0.mlp.down_proj",
                "model.layers.0.mlp_adapter",
                "model.layers.2.self_attn.q_proj",
                "model.layers.10.self_attn.q_proj"
            ]
        );
        assert!(g.modules[0].is_ia3() && g.modules[0].prefixed);
        assert!(g.modules[1].is_bottleneck() && !g.modules[1].prefixed);
        assert!(g.modules[2].is_lora() && !g.modules[2].prefixed);
        assert!(g.modules[3].prefixed && g.modules[3].parts.len() == 2);
        assert_eq!(
            g.others,
            ["base_model.model.lm_head.weight", "prompt_embeddings"]
        );
    }
}

//! IA3 (Liu et al. 2022, "(IA)³"): learned vectors that rescale the keys, the values and the
//! feed-forward input, with PEFT's semantics and file format (`peft_type: "IA3"`, tensors
//! `base_model.model.<path>.ia3_l`).
//!
//! On a target layer that is not feed-forward the vector scales the layer's output (bias
//! included), shape `[out, 1]`; on a feed-forward layer it scales the input, shape `[1, in]`
//! (PEFT's `IA3Layer`). Vectors start at one, so training starts from the base model.

use super::adapter_files::{sorted_json, trainable_tensors, write_adapter};
use super::lora::{is_target_module, layer_index, Targets};
use super::params::{ParamState, Slot, TrainState};
use crate::error::{Error, Result};
use crate::io::safetensors_file::{to_f32, SafetensorsFile};
use crate::model::hooks::LinearAdapter;
use crate::model::{Arch, Model};
use serde_json::{json, Value};
use std::path::Path;

/// One IA3 vector on a linear layer.
#[derive(Clone, Debug)]
pub struct Ia3Params {
    /// `[in]` when `feedforward` (scales the input), else `[out]` (scales the output).
    pub l: Vec<f32>,
    pub feedforward: bool,
}

#[derive(Clone, Debug)]
pub struct Ia3Config {
    pub targets: Targets,
    /// Targets whose input (not output) is scaled; must be among `targets`.
    pub feedforward: Vec<String>,
    pub base_model_name_or_path: Option<String>,
}

impl Ia3Config {
    /// PEFT's defaults per architecture (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and
    /// the feed-forward mapping).
    pub fn default_for(arch: Arch) -> Self {
        let (t, ff): (&[&str], &[&str]) = match arch {
            Arch::Gpt2 => (&["c_attn", "mlp.c_proj"], &["mlp.c_proj"]),
            _ => (&["k_proj", "v_proj", "down_proj"], &["down_proj"]),
        };
        Self {
            targets: Targets::Names(t.iter().map(|s| s.to_string()).collect()),
            feedforward: ff.iter().map(|s| s.to_string()).collect(),
            base_model_name_or_path: None,
        }
    }

    pub(crate) fn is_feedforward(&self, path: &str) -> bool {
        self.feedforward
            .iter()
            .any(|t| path == t || path.ends_with(&format!(".{t}")))
    }
}

fn key(path: &str) -> String {
    format!("base_model.model.{path}.ia3_l")
}

fn shape(p: &Ia3Params) -> Vec<usize> {
    if p.feedforward {
        vec![1, p.l.len()]
    } else {
        vec![p.l.len(), 1]
    }
}

/// Attach IA3 vectors (all ones) to every targeted linear layer and register them.
pub fn attach(model: &Model, state: &mut TrainState, cfg: &Ia3Config) -> Result<usize> {
    let mut n = 0;
    for (i, l) in model.linears().iter().enumerate() {
        if !is_target_module(&cfg.targets, None, &l.name)? {
            continue;
        }
        let feedforward = cfg.is_feedforward(&l.name);
        let dim = if feedforward {
            l.in_features
        } else {
            l.out_features
        };
        let p = Ia3Params {
            l: vec![1.0; dim],
            feedforward,
        };
        state.add(Slot::Ia3(i), ParamState::new(key(&l.name), shape(&p), true));
        state.ia3[i] = Some(p);
        n += 1;
    }
    if n == 0 {
        let names: Vec<String> = model
            .linears()
            .iter()
            .filter(|l| layer_index(&l.name) == Some(0))
            .map(|l| l.name.rsplit('.').next().unwrap_or("").to_string())
            .collect();
        return Err(Error::usage(format!(
            "no linear layer matches the IA3 targets {:?}; available module names: {}",
            cfg.targets,
            names.join(", ")
        )));
    }
    Ok(n)
}

/// adapter_config.json as PEFT 0.21 writes it for IA3 (sorted keys).
pub fn config_json(cfg: &Ia3Config, model: &Model, task_type: &str) -> String {
    let targets = match &cfg.targets {
        Targets::AllLinear => json!(model
            .linears()
            .iter()
            .map(|l| l.name.clone())
            .collect::<Vec<_>>()),
        Targets::Names(n) => json!(n),
        Targets::Regex(r) => json!(r),
    };
    let conv1d = model.linears().first().is_some_and(|l| l.conv1d);
    let v = json!({
        "auto_mapping": null,
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "exclude_modules": null,
        "fan_in_fan_out": conv1d,
        "feedforward_modules": cfg.feedforward,
        "inference_mode": true,
        "init_ia3_weights": true,
        "modules_to_save": null,
        "peft_type": "IA3",
        "revision": null,
        "target_modules": targets,
        "task_type": task_type,
    });
    sorted_json(v)
}

/// Write adapter_config.json and adapter_model.safetensors into `dir`.
pub fn save_adapter(
    dir: &Path,
    cfg: &Ia3Config,
    model: &Model,
    state: &TrainState,
    task_type: &str,
) -> Result<()> {
    write_adapter(
        dir,
        &trainable_tensors(model, state),
        &config_json(cfg, model, task_type),
    )
}

pub(crate) fn config_from_json(v: &Value) -> std::result::Result<Ia3Config, String> {
    let strings = |k: &str| -> Vec<String> {
        match v.get(k) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => Vec::new(),
        }
    };
    let targets = match v.get("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => Targets::AllLinear,
        Some(Value::String(s)) => Targets::Regex(s.clone()),
        Some(Value::Array(_)) => Targets::Names(strings("target_modules")),
        _ => return Err("target_modules is missing".into()),
    };
    Ok(Ia3Config {
        targets,
        feedforward: strings("feedforward_modules"),
        base_model_name_or_path: v
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(String::from),
    })
}

/// Read a PEFT IA3 adapter directory (config already parsed as JSON) into `state`.
pub fn load_adapter(
    dir: &Path,
    cfg_json: &Value,
    model: &Model,
    state: &mut TrainState,
) -> Result<Ia3Config> {
    let cfg_path = dir.join("adapter_config.json");
    let cfg = config_from_json(cfg_json).map_err(|m| Error::bad_input(&cfg_path, m))?;
    let st_path = dir.join("adapter_model.safetensors");
    let file = SafetensorsFile::open(&st_path)?;
    let mut used = 0;
    for (i, l) in model.linears().iter().enumerate() {
        let k = key(&l.name);
        let Some(t) = file.get(&k) else { continue };
        let feedforward = cfg.is_feedforward(&l.name);
        let p = Ia3Params {
            l: to_f32(&k, &t).map_err(|m| Error::bad_input(&st_path, m))?,
            feedforward,
        };
        if *t.shape != shape(&p)[..]
            || p.l.len()
                != if feedforward {
                    l.in_features
                } else {
                    l.out_features
                }
        {
            return Err(Error::bad_input(
                &st_path,
                format!(
                    "{k}: shape {:?} does not fit {} ([out {}, in {}], {}): adapter for another base model?",
                    t.shape,
                    l.name,
                    l.out_features,
                    l.in_features,
                    if feedforward { "feed-forward" } else { "not feed-forward" }
                ),
            ));
        }
        state.add(Slot::Ia3(i), ParamState::new(k, shape(&p), true));
        state.ia3[i] = Some(p);
        used += 1;
    }
    let total = file
        .names()
        .iter()
        .filter(|n| n.ends_with(".ia3_l"))
        .count();
    if used != total || total == 0 {
        return Err(Error::bad_input(
            &st_path,
            format!(
                "{} of {total} IA3 vectors belong to a linear layer of this model",
                used
            ),
        ));
    }
    Ok(cfg)
}

/// An IA3 vector as an inference hook.
pub struct Ia3Hook {
    p: Ia3Params,
}

impl LinearAdapter for Ia3Hook {
    fn input_scale(&self) -> Option<&[f32]> {
        self.p.feedforward.then_some(&self.p.l[..])
    }
    fn forward_output(&self, _x: &[f32], _rows: usize, y: &mut [f32], _bias: Option<&[f32]>) {
        if !self.p.feedforward {
            for row in y.chunks_exact_mut(self.p.l.len()) {
                row.iter_mut().zip(&self.p.l).for_each(|(v, s)| *v *= s);
            }
        }
    }
}

/// Install the IA3 vectors of `state` into adapter slot `slot` of the model.
pub fn install(model: &mut Model, state: TrainState, slot: usize) {
    for (l, p) in model.linears_mut().into_iter().zip(state.ia3) {
        if let Some(p) = p {
            if l.adapters.len() <= slot {
                l.adapters.resize_with(slot + 1, || None);
            }
            l.adapters[slot] = Some(Box::new(Ia3Hook { p }));
        }
    }
}

//! LoRA, rsLoRA and DoRA with PEFT's semantics and PEFT's file format.
//!
//! Targets, rank/alpha patterns and layer selection follow PEFT 0.21 (docs: formats.md §1);
//! adapters are read from and written to `adapter_config.json` + `adapter_model.safetensors`
//! with `base_model.model.` keys, so PEFT loads ours and we load PEFT's.

use super::adapter_files::{sorted_json, trainable_tensors, write_adapter};
use super::engine::dora_weight_norm;
use super::params::{LoraParams, ParamState, Slot, TrainState};
use crate::error::{Error, Result};
use crate::io::safetensors_file::{check_finite, to_f32, SafetensorsFile};
use crate::model::hooks::LinearAdapter;
use crate::model::linear::Linear;
use crate::model::{Arch, Model};
use crate::rng::Rng;
use regex::Regex;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Which linear layers get an adapter.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Module names or suffixes: `q_proj` matches `model.layers.0.self_attn.q_proj`.
    Names(Vec<String>),
    /// A regular expression that must match the whole module path.
    Regex(String),
    /// Every linear layer except the output head.
    AllLinear,
}

impl Targets {
    /// Parse the CLI form: `all-linear`, a comma list of names, or `re:PATTERN`.
    pub fn parse(s: &str) -> Self {
        if s == "all-linear" {
            Targets::AllLinear
        } else if let Some(re) = s.strip_prefix("re:") {
            Targets::Regex(re.to_string())
        } else {
            Targets::Names(
                s.split(',')
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
                    .collect(),
            )
        }
    }

    /// PEFT's default targets per architecture.
    pub fn default_for(arch: Arch) -> Self {
        match arch {
            Arch::Gpt2 => Targets::Names(vec!["c_attn".into()]),
            _ => Targets::Names(vec!["q_proj".into(), "v_proj".into()]),
        }
    }
}

#[derive(Clone, Debug)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub targets: Targets,
    pub rslora: bool,
    pub dora: bool,
    /// "none", "all" or "lora_only"
    pub bias: String,
    pub modules_to_save: Vec<String>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f32>,
    pub base_model_name_or_path: Option<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: Targets::Names(vec!["q_proj".into(), "v_proj".into()]),
            rslora: false,
            dora: false,
            bias: "none".into(),
            modules_to_save: Vec::new(),
            layers_to_transform: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            base_model_name_or_path: None,
        }
    }
}

/// PEFT's `check_target_module_exists` for one module path.
pub fn is_target(cfg: &LoraConfig, path: &str) -> Result<bool> {
    is_target_module(&cfg.targets, cfg.layers_to_transform.as_deref(), path)
}

/// [`is_target`] for any method: target list plus an optional layer selection.
pub fn is_target_module(targets: &Targets, layers: Option<&[usize]>, path: &str) -> Result<bool> {
    let hit = match targets {
        Targets::AllLinear => true,
        Targets::Names(names) => names
            .iter()
            .any(|t| path == t || path.ends_with(&format!(".{t}"))),
        Targets::Regex(re) => Regex::new(&format!("^(?:{re})$"))
            .map_err(|e| Error::usage(format!("--target regex {re:?}: {e}")))?
            .is_match(path),
    };
    if !hit {
        return Ok(false);
    }
    if let Some(layers) = layers {
        return Ok(layer_index(path).is_some_and(|l| layers.contains(&l)));
    }
    Ok(true)
}

/// Index of the block a module belongs to: the first numeric path segment.
pub fn layer_index(path: &str) -> Option<usize> {
    path.split('.').find_map(|s| s.parse().ok())
}

/// First pattern key matching `(.*\.)?(key)$` wins (PEFT's get_pattern_key).
pub(crate) fn pattern_value<T: Copy>(
    patterns: &BTreeMap<String, T>,
    path: &str,
) -> Result<Option<T>> {
    for (k, v) in patterns {
        let re = Regex::new(&format!("^(.*\\.)?(?:{k})$"))
            .map_err(|e| Error::usage(format!("pattern {k:?}: {e}")))?;
        if re.is_match(path) {
            return Ok(Some(*v));
        }
    }
    Ok(None)
}

pub(crate) fn scale_of(cfg: &LoraConfig, r: usize, alpha: f32) -> f32 {
    if cfg.rslora {
        alpha / (r as f32).sqrt()
    } else {
        alpha / r as f32
    }
}

/// Attach freshly initialised adapters (A kaiming-uniform(a=√5), B = 0, DoRA magnitude = row
/// norms of W) to every targeted linear layer and register their trainable tensors.
pub fn attach(
    model: &Model,
    state: &mut TrainState,
    cfg: &LoraConfig,
    rng: &mut Rng,
) -> Result<usize> {
    if cfg.rank == 0 {
        return Err(Error::usage("--rank must be at least 1"));
    }
    let mut n = 0;
    for (i, l) in model.linears().iter().enumerate() {
        if !is_target(cfg, &l.name)? {
            continue;
        }
        let r = pattern_value(&cfg.rank_pattern, &l.name)?.unwrap_or(cfg.rank);
        let alpha = pattern_value(&cfg.alpha_pattern, &l.name)?.unwrap_or(cfg.alpha);
        if r == 0 {
            return Err(Error::usage(format!(
                "rank for {} must be at least 1",
                l.name
            )));
        }
        let bound = 1.0 / (l.in_features as f32).sqrt();
        let a: Vec<f32> = (0..r * l.in_features)
            .map(|_| rng.uniform_range(-bound, bound))
            .collect();
        let mut lp = LoraParams {
            rank: r,
            alpha,
            scale: scale_of(cfg, r, alpha),
            dropout: cfg.dropout,
            in_features: l.in_features,
            out_features: l.out_features,
            a,
            b: vec![0.0; l.out_features * r],
            magnitude: None,
        };
        if cfg.dora {
            lp.magnitude = Some(dora_weight_norm(l, &lp));
        }
        state.lora[i] = Some(lp);
        register(model, state, cfg, i);
        n += 1;
    }
    if n == 0 {
        let names: Vec<String> = model
            .linears()
            .iter()
            .filter(|l| layer_index(&l.name) == Some(0))
            .map(|l| l.name.rsplit('.').next().unwrap_or("").to_string())
            .collect();
        // Say the targets as the user wrote them, not as a Rust Debug value.
        let targets = match &cfg.targets {
            Targets::Names(n) => n.join(","),
            Targets::Regex(r) => format!("re:{r}"),
            Targets::AllLinear => "all-linear".into(),
        };
        return Err(Error::usage(format!(
            "no linear layer matches --target {targets}; available module names: {}",
            names.join(", ")
        )));
    }
    register_biases(model, state, cfg);
    Ok(n)
}

fn key(model_path: &str, suffix: &str) -> String {
    format!("base_model.model.{model_path}.{suffix}")
}

fn register(model: &Model, state: &mut TrainState, cfg: &LoraConfig, i: usize) {
    let l = &model.linears()[i];
    let lp = state.lora[i].as_ref().expect("lora");
    let (r, inp, out) = (lp.rank, lp.in_features, lp.out_features);
    let dora = lp.magnitude.is_some();
    state.add(
        Slot::LoraA(i),
        ParamState::new(key(&l.name, "lora_A.weight"), vec![r, inp], true),
    );
    state.add(
        Slot::LoraB(i),
        ParamState::new(key(&l.name, "lora_B.weight"), vec![out, r], true),
    );
    if dora {
        state.add(
            Slot::LoraMagnitude(i),
            ParamState::new(key(&l.name, "lora_magnitude_vector"), vec![out], true),
        );
    }
    let _ = cfg;
}

/// bias="all": every bias of the model trains; "lora_only": biases of targeted layers.
fn register_biases(model: &Model, state: &mut TrainState, cfg: &LoraConfig) {
    for (i, l) in model.linears().iter().enumerate() {
        let Some(b) = &l.bias else { continue };
        let on = match cfg.bias.as_str() {
            "all" => true,
            "lora_only" => state.lora[i].is_some(),
            _ => false,
        };
        if on && !state.is_trainable(Slot::LinearBias(i)) {
            let name = if state.lora[i].is_some() {
                key(&l.name, "base_layer.bias")
            } else {
                key(&l.name, "bias")
            };
            state.add(
                Slot::LinearBias(i),
                ParamState::new(name, vec![b.len()], false),
            );
        }
    }
}

/// Read a PEFT LoRA adapter directory into `state` (adapters on the matching linears).
pub fn load_adapter(dir: &Path, model: &Model, state: &mut TrainState) -> Result<LoraConfig> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_input(&cfg_path, format!("invalid JSON: {e}")))?;
    let cfg = config_from_json(&v).map_err(|m| Error::bad_input(&cfg_path, m))?;
    let st_path = dir.join("adapter_model.safetensors");
    let file = SafetensorsFile::open(&st_path)?;
    let names = file.names();
    if !names.iter().any(|n| n.starts_with("base_model.model.")) && !names.is_empty() {
        return Err(Error::bad_input(
            &st_path,
            "tensor names lack the \"base_model.model.\" prefix; PEFT would silently ignore this adapter",
        ));
    }
    let mut used = 0;
    for (i, l) in model.linears().iter().enumerate() {
        let ka = key(&l.name, "lora_A.weight");
        let Some(ta) = file.get(&ka) else { continue };
        let kb = key(&l.name, "lora_B.weight");
        let tb = file.require(&kb)?;
        let r = ta.shape.first().copied().unwrap_or(0);
        if ta.shape != [r, l.in_features] || tb.shape != [l.out_features, r] {
            return Err(Error::bad_input(
                &st_path,
                format!(
                    "{ka}: shapes {:?} / {:?} do not fit {} ([out {}, in {}]): adapter for another base model?",
                    ta.shape, tb.shape, l.name, l.out_features, l.in_features
                ),
            ));
        }
        let alpha = pattern_value(&cfg.alpha_pattern, &l.name)?.unwrap_or(cfg.alpha);
        // PEFT's config and the tensors must agree on the rank (PEFT refuses to load
        // otherwise; here alpha / r would silently use the wrong r).
        if v.get("r").is_some() {
            let want = pattern_value(&cfg.rank_pattern, &l.name)?.unwrap_or(cfg.rank);
            if r != want {
                return Err(Error::bad_input(
                    &st_path,
                    format!("{ka} has rank {r} but adapter_config.json says r = {want}"),
                ));
            }
        }
        let a = to_f32(&ka, &ta).map_err(|m| Error::bad_input(&st_path, m))?;
        let b = to_f32(&kb, &tb).map_err(|m| Error::bad_input(&st_path, m))?;
        // A NaN in an adapter poisons every output it touches.
        check_finite(&ka, &a)
            .and_then(|()| check_finite(&kb, &b))
            .map_err(|m| Error::bad_input(&st_path, m))?;
        let km = key(&l.name, "lora_magnitude_vector");
        let magnitude = match file.get(&km) {
            Some(t) => Some(to_f32(&km, &t).map_err(|m| Error::bad_input(&st_path, m))?),
            None if cfg.dora => {
                return Err(Error::bad_input(
                    &st_path,
                    format!("use_dora is set but {km} is missing"),
                ))
            }
            None => None,
        };
        state.lora[i] = Some(LoraParams {
            rank: r,
            alpha,
            scale: scale_of(&cfg, r, alpha),
            dropout: cfg.dropout,
            in_features: l.in_features,
            out_features: l.out_features,
            a,
            b,
            magnitude,
        });
        register(model, state, &cfg, i);
        used += 2;
    }
    let lora_keys = names
        .iter()
        .filter(|n| n.contains(".lora_A.") || n.contains(".lora_B."))
        .count();
    if used != lora_keys {
        return Err(Error::bad_input(
            &st_path,
            format!(
                "{} LoRA tensors do not belong to any linear layer of this model",
                lora_keys - used
            ),
        ));
    }
    Ok(cfg)
}

pub(crate) fn config_from_json(v: &Value) -> std::result::Result<LoraConfig, String> {
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != "LORA" {
        return Err(format!("peft_type is {peft_type:?}; expected \"LORA\""));
    }
    let targets = match v.get("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => Targets::AllLinear,
        Some(Value::String(s)) => Targets::Regex(s.clone()),
        Some(Value::Array(a)) => Targets::Names(
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
        ),
        _ => Targets::Names(vec![]),
    };
    let num_map = |k: &str| -> BTreeMap<String, f64> {
        v.get(k)
            .and_then(Value::as_object)
            .map(|o| {
                o.iter()
                    .filter_map(|(k, x)| x.as_f64().map(|f| (k.clone(), f)))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(LoraConfig {
        rank: v.get("r").and_then(Value::as_u64).unwrap_or(8) as usize,
        alpha: v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0) as f32,
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32,
        targets,
        rslora: v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        dora: v.get("use_dora").and_then(Value::as_bool).unwrap_or(false),
        bias: v
            .get("bias")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string(),
        modules_to_save: v
            .get("modules_to_save")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        layers_to_transform: match v.get("layers_to_transform") {
            Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as usize]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .filter_map(|x| x.as_u64().map(|n| n as usize))
                    .collect(),
            ),
            _ => None,
        },
        rank_pattern: num_map("rank_pattern")
            .into_iter()
            .map(|(k, f)| (k, f as usize))
            .collect(),
        alpha_pattern: num_map("alpha_pattern")
            .into_iter()
            .map(|(k, f)| (k, f as f32))
            .collect(),
        base_model_name_or_path: v
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(String::from),
    })
}

/// adapter_config.json as PEFT writes it (sorted keys, indent 2).
pub fn config_json(cfg: &LoraConfig, model: &Model, task_type: &str) -> String {
    let targets = match &cfg.targets {
        // PEFT 0.21 expands all-linear into the module paths on save.
        Targets::AllLinear => json!(model
            .linears()
            .iter()
            .filter(|l| cfg
                .layers_to_transform
                .as_ref()
                .is_none_or(|ls| layer_index(&l.name).is_some_and(|i| ls.contains(&i))))
            .map(|l| l.name.clone())
            .collect::<Vec<_>>()),
        Targets::Names(n) => json!(n),
        Targets::Regex(r) => json!(r),
    };
    let conv1d = model.linears().first().is_some_and(|l| l.conv1d);
    let v = json!({
        "alpha_pattern": cfg.alpha_pattern,
        "auto_mapping": null,
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "bias": cfg.bias,
        "fan_in_fan_out": conv1d,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": cfg.layers_to_transform,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "modules_to_save": if cfg.modules_to_save.is_empty() { Value::Null } else { json!(cfg.modules_to_save) },
        "peft_type": "LORA",
        "r": cfg.rank,
        "rank_pattern": cfg.rank_pattern,
        "revision": null,
        "target_modules": targets,
        "task_type": task_type,
        "use_dora": cfg.dora,
        "use_rslora": cfg.rslora,
    });
    sorted_json(v)
}

/// Write adapter_config.json and adapter_model.safetensors into `dir` (an existing directory).
pub fn save_adapter(
    dir: &Path,
    cfg: &LoraConfig,
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

/// A LoRA/DoRA adapter as an inference hook (peft-generate / peft-eval `--adapter`).
pub struct LoraHook {
    pub p: LoraParams,
    /// DoRA: m / ‖W + sBA‖ per output feature.
    dora_factor: Option<Vec<f32>>,
}

impl LoraHook {
    pub fn new(p: LoraParams, base: &Linear) -> Self {
        let dora_factor = p.magnitude.as_ref().map(|m| {
            let n = dora_weight_norm(base, &p);
            m.iter().zip(&n).map(|(m, n)| m / n).collect()
        });
        Self { p, dora_factor }
    }
}

impl LinearAdapter for LoraHook {
    fn forward_output(&self, x: &[f32], rows: usize, y: &mut [f32], bias: Option<&[f32]>) {
        use crate::kernels::gemm;
        let p = &self.p;
        let mut u = vec![0.0f32; rows * p.rank];
        gemm::matmul_nt(x, &p.a, &mut u, rows, p.rank, p.in_features, false);
        let mut d = vec![0.0f32; rows * p.out_features];
        gemm::matmul_nt(&u, &p.b, &mut d, rows, p.out_features, p.rank, false);
        let out = p.out_features;
        match &self.dora_factor {
            None => y.iter_mut().zip(&d).for_each(|(a, b)| *a += p.scale * b),
            Some(f) => {
                // y holds x·Wᵀ + b: rescale the bias-free part, keep the bias once.
                for (yr, dr) in y.chunks_exact_mut(out).zip(d.chunks_exact(out)) {
                    for o in 0..out {
                        let b = bias.map_or(0.0, |b| b[o]);
                        yr[o] = f[o] * (yr[o] - b + p.scale * dr[o]) + b;
                    }
                }
            }
        }
    }
}

/// Install the adapters of `state` into adapter slot `slot` of the model (for inference).
pub fn install(model: &mut Model, state: TrainState, slot: usize) {
    let lora = state.lora;
    for (l, p) in model.linears_mut().into_iter().zip(lora) {
        if let Some(p) = p {
            let hook = LoraHook::new(p, l);
            if l.adapters.len() <= slot {
                l.adapters.resize_with(slot + 1, || None);
            }
            l.adapters[slot] = Some(Box::new(hook));
        }
    }
}

/// Load a PEFT LoRA/DoRA adapter directory into adapter slot `slot` of `model` for inference
/// (the base weights are shared by every slot; nothing is copied or merged). Other PEFT types
/// (IA3, prefix and prompt tuning, bottleneck adapters) load too.
pub fn load_for_inference(model: &mut Model, dir: &Path, slot: usize) -> Result<()> {
    let (state, kind) = load_any_adapter(dir, model)?;
    match kind {
        AdapterKind::Ia3 => super::ia3::install(model, state, slot),
        AdapterKind::Prefix => super::prefix::install(model, state, slot),
        AdapterKind::Bottleneck => super::bottleneck::install(model, state, slot),
        AdapterKind::Prompt => super::prompt::install(model, state, slot),
        AdapterKind::Lora => install(model, state, slot),
    }
    Ok(())
}

/// The PEFT types an adapter folder may hold (for inference).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterKind {
    Lora,
    Ia3,
    Prefix,
    Bottleneck,
    Prompt,
}

/// Reads a PEFT adapter folder of any supported type into a fresh state (its tensors, as
/// trained) for `model`.
pub fn load_any_adapter(dir: &Path, model: &Model) -> Result<(TrainState, AdapterKind)> {
    let mut state = TrainState::new(model.linears().len());
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_input(&cfg_path, format!("invalid JSON: {e}")))?;
    let kind = match v.get("peft_type").and_then(Value::as_str) {
        Some("IA3") => {
            super::ia3::load_adapter(dir, &v, model, &mut state)?;
            AdapterKind::Ia3
        }
        Some("PREFIX_TUNING") => {
            super::prefix::load_adapter(dir, &v, model, &mut state)?;
            AdapterKind::Prefix
        }
        Some("BOTTLENECK") => {
            super::bottleneck::load_adapter(dir, &v, model, &mut state)?;
            AdapterKind::Bottleneck
        }
        Some("PROMPT_TUNING") => {
            super::prompt::load_adapter(dir, &v, model, &mut state)?;
            AdapterKind::Prompt
        }
        Some(t @ ("P_TUNING" | "ADAPTION_PROMPT" | "MULTITASK_PROMPT_TUNING")) => {
            return Err(Error::bad_input(
                &cfg_path,
                format!("peft_type {t} is not supported (LORA, IA3, PREFIX_TUNING and PROMPT_TUNING are)"),
            ))
        }
        _ => {
            load_adapter(dir, model, &mut state)?;
            AdapterKind::Lora
        }
    };
    Ok((state, kind))
}

/// Parse `NAME=DIR` (or a bare `DIR`, named after its last path component).
pub fn parse_adapter_arg(s: &str) -> (String, std::path::PathBuf) {
    match s.split_once('=') {
        Some((n, d)) if !n.is_empty() && !n.contains('/') => (n.to_string(), d.into()),
        _ => {
            let p = std::path::PathBuf::from(s);
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| s.to_string());
            (name, p)
        }
    }
}

/// Load every `--adapter` argument into consecutive slots; returns the names by slot.
pub fn load_adapters(model: &mut Model, args: &[String]) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for a in args {
        let (name, dir) = parse_adapter_arg(a);
        if names.contains(&name) {
            return Err(Error::usage(format!("adapter name {name} given twice")));
        }
        load_for_inference(model, &dir, names.len())?;
        names.push(name);
    }
    Ok(names)
}

//! `--base DIR`: does the adapter fit the base model, will PEFT apply all of it, and will
//! llama.cpp's convert_lora_to_gguf take it? Each problem has a stable code
//! (docs/adapter-inspect.md).

use super::adapter::Analysis;
use super::base::{has_module, logical_shape, module_paths, module_shape};
use super::config::Context;
use super::report::{CheckReport, Problem};
use super::tensors::{strip_prefix, Group, Part};
use crate::io::model_folder::ModelFolder;
use crate::merge::adapter_dir::{PeftKind, PREFIX};
use crate::model::config::ModelConfig;
use crate::train::lora::{is_target_module, Targets};
use crate::Result;
use serde_json::Value;
use std::collections::BTreeMap;

pub const MISSING_PREFIX: &str = "missing_prefix";
pub const MISSING_MODULE: &str = "missing_module";
pub const SHAPE_MISMATCH: &str = "shape_mismatch";
pub const UNKNOWN_TENSOR: &str = "unknown_tensor";
pub const GGUF_INCOMPATIBLE: &str = "gguf_incompatible";
pub const UNMATCHED_TARGET: &str = "unmatched_target";
pub const UNTRAINED_TARGET: &str = "untrained_target";
pub const NON_FINITE: &str = "non_finite";

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(
        &mut self,
        code: &str,
        error: bool,
        module: Option<&str>,
        tensor: Option<&str>,
        message: String,
    ) {
        self.0.push(Problem {
            code: code.into(),
            severity: if error { "error" } else { "warning" }.into(),
            module: module.map(String::from),
            tensor: tensor.map(String::from),
            message,
        });
    }
}

/// Expected shape of each tensor of a LoRA / IA3 module on a base weight `[out, in]`
/// (embeddings `[num_embeddings, dim]`).
fn expected_shape(part: Part, r: usize, out: usize, inp: usize) -> Option<Vec<usize>> {
    Some(match part {
        Part::LoraA => vec![r, inp],
        Part::LoraB => vec![out, r],
        Part::LoraBias | Part::Magnitude => vec![out],
        // embedding: weight [num, dim]; A [r, num], B [dim, r]
        Part::EmbeddingA => vec![r, out],
        Part::EmbeddingB => vec![inp, r],
        _ => return None,
    })
}

fn check_module(a: &Analysis, g: &Group, base: &ModelFolder, p: &mut Problems) -> Result<()> {
    // bottleneck adapters are ours and keyed by the block's own path (docs/adapters.md)
    if !g.prefixed && !g.is_bottleneck() {
        for name in g.names().filter(|n| !n.starts_with(PREFIX)) {
            p.add(
                MISSING_PREFIX,
                true,
                Some(&g.path),
                Some(name),
                format!(
                    "tensor {name} lacks the \"{PREFIX}\" prefix: PEFT only warns about missing adapter keys and leaves this module untrained"
                ),
            );
        }
    }
    if g.is_bottleneck() {
        let block = g.path.rsplit_once('.').map(|(b, _)| b).unwrap_or(&g.path);
        let exists = base
            .names
            .iter()
            .any(|n| n.starts_with(&format!("{block}.")));
        if !exists {
            p.add(
                MISSING_MODULE,
                true,
                Some(&g.path),
                None,
                format!("the base model has no block {block}"),
            );
        }
        if let (Some(h), Some(m)) = (hidden_size(base), module_of(a, &g.path)) {
            if m.in_features != Some(h) {
                p.add(
                    SHAPE_MISMATCH,
                    true,
                    Some(&g.path),
                    g.parts.get(&Part::DownWeight).map(String::as_str),
                    format!(
                        "adapter hidden size {} but the base model's hidden_size is {h}",
                        m.in_features.unwrap_or(0)
                    ),
                );
            }
        }
        return Ok(());
    }
    let Some(shape) = module_shape(base, &g.path)? else {
        p.add(
            MISSING_MODULE,
            true,
            Some(&g.path),
            None,
            format!(
                "the base model has no module {} (no {}.weight)",
                g.path, g.path
            ),
        );
        return Ok(());
    };
    if shape.len() != 2 {
        p.add(
            SHAPE_MISMATCH,
            true,
            Some(&g.path),
            None,
            format!(
                "base weight of {} has shape {shape:?}; expected a matrix",
                g.path
            ),
        );
        return Ok(());
    }
    let (out, inp) = (shape[0], shape[1]);
    let rank = g
        .parts
        .get(&Part::LoraA)
        .or(g.parts.get(&Part::EmbeddingA))
        .and_then(|n| a.file.info(n))
        .and_then(|i| i.shape.first().copied())
        .unwrap_or(0);
    for (&part, name) in &g.parts {
        let Some(info) = a.file.info(name) else {
            continue;
        };
        let got = info.shape.clone();
        let want = if part == Part::Ia3 {
            let ff = module_of(a, &g.path).and_then(|m| m.feedforward) == Some(true);
            Some(if ff { vec![1, inp] } else { vec![out, 1] })
        } else {
            expected_shape(part, rank, out, inp)
        };
        if let Some(want) = want {
            if got != want {
                p.add(
                    SHAPE_MISMATCH,
                    true,
                    Some(&g.path),
                    Some(name),
                    format!(
                        "tensor {name} has shape {got:?}; the base weight [{out}, {inp}] needs {want:?}"
                    ),
                );
            }
        }
    }
    Ok(())
}

/// PEFT refuses an adapter whose lora_A rank differs from its config's `r` (or rank_pattern):
/// report it as a shape mismatch.
fn check_rank(a: &Analysis, ctx: &Context, g: &Group, p: &mut Problems) -> Result<()> {
    let (Some(cfg), Some(raw)) = (&ctx.lora, &ctx.config) else {
        return Ok(());
    };
    let Some(name) = g.parts.get(&Part::LoraA).or(g.parts.get(&Part::EmbeddingA)) else {
        return Ok(());
    };
    let Some(rank) = a.file.info(name).and_then(|i| i.shape.first().copied()) else {
        return Ok(());
    };
    if !raw.contains_key("r") {
        return Ok(());
    }
    let want = crate::train::lora::pattern_value(&cfg.rank_pattern, &g.path)?.unwrap_or(cfg.rank);
    if rank != want {
        p.add(
            SHAPE_MISMATCH,
            true,
            Some(&g.path),
            Some(name),
            format!("tensor {name} has rank {rank} but adapter_config.json says r = {want}"),
        );
    }
    Ok(())
}

fn module_of<'a>(a: &'a Analysis, path: &str) -> Option<&'a super::report::ModuleReport> {
    a.modules.iter().find(|m| m.path == path)
}

fn hidden_size(base: &ModelFolder) -> Option<usize> {
    ["hidden_size", "n_embd"]
        .iter()
        .find_map(|k| base.config.get(*k).and_then(Value::as_u64))
        .map(|h| h as usize)
}

/// Tensors outside the adapted modules: prompt embeddings, modules_to_save copies, anything
/// else.
fn check_others(a: &Analysis, ctx: &Context, base: &ModelFolder, p: &mut Problems) -> Result<()> {
    for name in &a.grouped.others {
        if name == "prompt_embeddings" {
            check_prompt(a, ctx, base, p);
            continue;
        }
        let (rest, prefixed) = strip_prefix(name);
        let base_key = rest.replace(".base_layer.", ".");
        let module = base_key.rsplit_once('.').map(|(m, _)| m).unwrap_or("");
        let base_name = if base.weights.contains(&base_key) {
            Some(base_key.clone())
        } else if base_key.ends_with(".weight") && has_module(base, module) {
            super::base::weight_name(base, module)
        } else {
            None
        };
        if !prefixed {
            p.add(
                MISSING_PREFIX,
                true,
                None,
                Some(name),
                format!("tensor {name} lacks the \"{PREFIX}\" prefix: PEFT does not load it"),
            );
        }
        let Some(base_name) = base_name else {
            p.add(
                UNKNOWN_TENSOR,
                true,
                None,
                Some(name),
                format!(
                    "tensor {name} is neither an adapter tensor nor a copy of a base tensor ({base_key} is not in the base model)"
                ),
            );
            continue;
        };
        let want = logical_shape(base, module, &base_name)?;
        let got = a.file.info(name).map(|i| i.shape.clone());
        if let (Some(want), Some(got)) = (want, got) {
            let transposed: Vec<usize> = want.iter().rev().copied().collect();
            let conv1d = base.is_conv1d(module) && got == transposed;
            if got != want && !conv1d {
                p.add(
                    SHAPE_MISMATCH,
                    true,
                    None,
                    Some(name),
                    format!("tensor {name} has shape {got:?}; base tensor {base_name} is {want:?}"),
                );
            }
        }
    }
    Ok(())
}

fn check_prompt(a: &Analysis, ctx: &Context, base: &ModelFolder, p: &mut Problems) {
    let Ok(mc) = ModelConfig::from_json(Value::Object(base.config.clone())) else {
        return;
    };
    let Some(shape) = a.file.info("prompt_embeddings").map(|i| i.shape.clone()) else {
        return;
    };
    let (want_dim, what) = match ctx.kind {
        Some(PeftKind::PrefixTuning) => (
            mc.layers * 2 * mc.kv_dim(),
            format!("num_layers·2·kv_dim = {}·2·{}", mc.layers, mc.kv_dim()),
        ),
        Some(PeftKind::PromptTuning) | Some(PeftKind::PTuning) => {
            (mc.hidden, format!("hidden_size {}", mc.hidden))
        }
        _ => return,
    };
    if shape.len() != 2 || shape[1] != want_dim {
        p.add(
            SHAPE_MISMATCH,
            true,
            None,
            Some("prompt_embeddings"),
            format!(
                "tensor prompt_embeddings has shape {shape:?}; this base model needs rows of {want_dim} ({what})"
            ),
        );
    }
}

/// Targets in adapter_config.json that match no module of the base, and targeted linear
/// layers the adapter has no tensors for.
fn check_targets(a: &Analysis, ctx: &Context, base: &ModelFolder, p: &mut Problems) -> Result<()> {
    let (targets, layers) = match (&ctx.lora, &ctx.ia3) {
        (Some(l), _) => (l.targets.clone(), l.layers_to_transform.clone()),
        (None, Some(i)) => (i.targets.clone(), None),
        _ => return Ok(()),
    };
    let paths = module_paths(base);
    let mut any = false;
    for path in &paths {
        if is_target_module(&targets, layers.as_deref(), path)? {
            any = true;
            break;
        }
    }
    match &targets {
        Targets::Names(names) => {
            for t in names {
                let hit = paths
                    .iter()
                    .any(|m| m == t || m.ends_with(&format!(".{t}")));
                if !hit {
                    p.add(
                        UNMATCHED_TARGET,
                        !any,
                        None,
                        None,
                        format!("target_modules entry {t:?} matches no module of the base model"),
                    );
                }
            }
        }
        Targets::Regex(re) if !any => p.add(
            UNMATCHED_TARGET,
            true,
            None,
            None,
            format!("target_modules regex {re:?} matches no module of the base model"),
        ),
        _ => {}
    }
    let adapted: std::collections::BTreeSet<&str> =
        a.grouped.modules.iter().map(|g| g.path.as_str()).collect();
    for path in &paths {
        let linear = base.is_linear(path);
        if linear
            && !adapted.contains(path.as_str())
            && is_target_module(&targets, layers.as_deref(), path)?
        {
            p.add(
                UNTRAINED_TARGET,
                false,
                Some(path),
                None,
                format!(
                    "{path} is targeted by the config but the adapter has no tensors for it (PEFT keeps its initial value)"
                ),
            );
        }
    }
    Ok(())
}

fn is_embedding_or_head(name: &str) -> bool {
    ["embed_tokens", "lm_head", "wte", "wpe"]
        .iter()
        .any(|m| name.contains(&format!(".{m}.")) || name.starts_with(&format!("{m}.")))
}

/// What llama.cpp's convert_lora_to_gguf accepts: lora_A/lora_B (and lora_embedding_A/B)
/// pairs, norm tensors (kept), `.base_layer.weight` (skipped); anything else stops it. And
/// what it gets wrong without a word: scales other than alpha / r, GPT-2's Conv1D pairs.
fn check_gguf(a: &Analysis, ctx: &Context, p: &mut Problems) {
    if let Some(cfg) = &ctx.lora {
        if cfg.rslora {
            p.add(GGUF_INCOMPATIBLE, false, None, None, "use_rslora: llama.cpp scales a pair by alpha / r and convert_lora_to_gguf ignores rsLoRA's alpha / √r, so its GGUF applies ΔW divided by √r; model-export folds the scale into lora_b".to_string());
        }
        if !cfg.alpha_pattern.is_empty() {
            p.add(GGUF_INCOMPATIBLE, false, None, None, "alpha_pattern: convert_lora_to_gguf writes one alpha for every module, so the patterned modules get the wrong scale; model-export folds their scales into lora_b".to_string());
        }
    }
    for path in a.lora.keys() {
        if [".c_attn", ".c_proj", ".c_fc"]
            .iter()
            .any(|m| path.ends_with(m))
        {
            p.add(GGUF_INCOMPATIBLE, false, Some(path), None, format!("LoRA on GPT-2's Conv1D {path}: convert_lora_to_gguf swaps and transposes A and B, and llama.cpp refuses the file; model-export writes one it loads"));
        }
    }
    for name in a.file.names() {
        let pair = [
            ".lora_A.weight",
            ".lora_B.weight",
            ".lora_embedding_A",
            ".lora_embedding_B",
        ]
        .iter()
        .any(|s| name.ends_with(s));
        if pair {
            continue;
        }
        let msg = if name.contains(".base_layer.weight") {
            if !is_embedding_or_head(&name) {
                continue;
            }
            format!("full embedding/lm_head tensor {name}: convert_lora_to_gguf skips it silently, so the resized or trained embeddings are lost")
        } else if name.contains("_layernorm") || name.contains(".norm") {
            continue;
        } else if is_embedding_or_head(&name) {
            format!("full embedding/lm_head tensor {name}: llama.cpp's convert_lora_to_gguf rejects adapters with embeddings")
        } else {
            format!("tensor {name} is not a lora_A/lora_B tensor: llama.cpp's convert_lora_to_gguf rejects it")
        };
        p.add(GGUF_INCOMPATIBLE, false, None, Some(&name), msg);
    }
}

/// Check an analysed adapter against a base model folder.
pub fn check(a: &Analysis, ctx: &Context, base: &ModelFolder) -> Result<CheckReport> {
    let mut p = Problems::default();
    for g in &a.grouped.modules {
        check_module(a, g, base, &mut p)?;
        check_rank(a, ctx, g, &mut p)?;
    }
    check_others(a, ctx, base, &mut p)?;
    check_targets(a, ctx, base, &mut p)?;
    let lora = ctx.kind == Some(PeftKind::Lora)
        || (ctx.kind.is_none() && a.grouped.modules.iter().any(Group::is_lora));
    if lora {
        check_gguf(a, ctx, &mut p);
    }
    // Without --base a NaN is only shown (non_finite, null norms); against a base it is an
    // error: merged or applied, it turns the base's outputs into NaN.
    for m in a.modules.iter().filter(|m| m.non_finite > 0) {
        p.add(
            NON_FINITE,
            true,
            Some(&m.path),
            None,
            format!(
                "{} NaN / infinite value(s) in the module's tensors",
                m.non_finite
            ),
        );
    }
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for x in &p.0 {
        *counts.entry(x.code.clone()).or_default() += 1;
    }
    let errors = p.0.iter().filter(|x| x.severity == "error").count() as u64;
    let warnings = p.0.len() as u64 - errors;
    Ok(CheckReport {
        base: base.dir.display().to_string(),
        ok: errors == 0,
        errors,
        warnings,
        counts,
        problems: p.0,
    })
}

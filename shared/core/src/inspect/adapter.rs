//! Per-module analysis of an adapter's tensors (an adapter directory, a checkpoint's
//! params.safetensors or a lone safetensors file): shapes, scales, ‖ΔW‖_F, spectra.

use super::base::ia3_weight_norm;
use super::config::Context;
use super::report::{FilesSummary, ModuleReport, PrefixLayerReport, PromptReport, TensorReport};
use super::spectrum::{lora_spectrum, norm};
use super::tensors::{dtype_name, group, read_f32, Group, Grouped, Part};
use crate::io::model_folder::ModelFolder;
use crate::io::safetensors_file::{to_f32, SafetensorsFile};
use crate::merge::adapter_dir::{Ia3Module, LoraModule, PeftKind, PREFIX};
use crate::train::lora::{layer_index, pattern_value, scale_of};
use crate::{Error, Result};
use std::collections::BTreeMap;

/// Everything read from an adapter-like file.
pub struct Analysis {
    pub file: SafetensorsFile,
    pub grouped: Grouped,
    pub files: FilesSummary,
    pub trainable_params: u64,
    pub modules: Vec<ModuleReport>,
    pub other_tensors: Vec<TensorReport>,
    pub prompt: Option<PromptReport>,
    /// LoRA factors by module path (scale 1 when there is no config).
    pub lora: BTreeMap<String, LoraModule>,
    pub ia3: BTreeMap<String, Ia3Module>,
}

/// Tensor count, elements, bytes and dtypes of one file.
pub fn files_summary(file: &SafetensorsFile) -> FilesSummary {
    let mut s = FilesSummary::default();
    for name in file.names() {
        if let Some(info) = file.info(&name) {
            s.tensors += 1;
            s.elements += info.shape.iter().product::<usize>() as u64;
            s.bytes += (info.data_offsets.1 - info.data_offsets.0) as u64;
            *s.dtypes.entry(dtype_name(info.dtype)).or_default() += 1;
        }
    }
    s
}

/// Report of one tensor; `with_norm` computes its Frobenius norm (float dtypes only).
pub fn tensor_report(file: &SafetensorsFile, name: &str, with_norm: bool) -> TensorReport {
    let t = file.get(name);
    let shape = t.map(|t| t.shape.to_vec()).unwrap_or_default();
    TensorReport {
        name: name.to_string(),
        params: shape.iter().product::<usize>() as u64,
        dtype: t.map(|t| dtype_name(t.dtype)).unwrap_or_default(),
        norm: t
            .filter(|_| with_norm)
            .and_then(|t| to_f32(name, &t).ok())
            .map(|v| norm(&v)),
        shape,
    }
}

fn non_finite(v: &[f32]) -> u64 {
    v.iter().filter(|x| !x.is_finite()).count() as u64
}

fn module_dtype(tensors: &[TensorReport]) -> String {
    let first = tensors.first().map(|t| t.dtype.clone()).unwrap_or_default();
    if tensors.iter().all(|t| t.dtype == first) {
        first
    } else {
        "mixed".into()
    }
}

fn empty_module(g: &Group, method: &str, tensors: Vec<TensorReport>) -> ModuleReport {
    ModuleReport {
        path: g.path.clone(),
        layer: layer_index(&g.path),
        method: method.into(),
        prefixed: g.prefixed,
        dtype: module_dtype(&tensors),
        params: tensors.iter().map(|t| t.params).sum(),
        tensors,
        rank: None,
        alpha: None,
        scale: None,
        in_features: None,
        out_features: None,
        delta_norm: None,
        delta_norm_of: None,
        singular_values: Vec::new(),
        numerical_rank: None,
        effective_rank: None,
        magnitude_norm: None,
        lora_bias: false,
        feedforward: None,
        vector_min: None,
        vector_max: None,
        non_finite: 0,
    }
}

/// The name a missing partner tensor would have.
fn partner(g: &Group, suffix: &str) -> String {
    let pre = if g.prefixed { PREFIX } else { "" };
    format!("{pre}{}.{suffix}", g.path)
}

fn lora_module(
    file: &SafetensorsFile,
    g: &Group,
    ctx: &Context,
) -> Result<(ModuleReport, LoraModule)> {
    let bad = |m: String| Error::bad_input(file.path(), m);
    let embedding =
        g.parts.contains_key(&Part::EmbeddingA) || g.parts.contains_key(&Part::EmbeddingB);
    let (pa, pb, sa_name, sb_name) = if embedding {
        (
            Part::EmbeddingA,
            Part::EmbeddingB,
            "lora_embedding_A",
            "lora_embedding_B",
        )
    } else {
        (Part::LoraA, Part::LoraB, "lora_A.weight", "lora_B.weight")
    };
    let a_name = g
        .parts
        .get(&pa)
        .cloned()
        .unwrap_or_else(|| partner(g, sa_name));
    let b_name = g
        .parts
        .get(&pb)
        .cloned()
        .unwrap_or_else(|| partner(g, sb_name));
    for (have, want) in [(&b_name, &a_name), (&a_name, &b_name)] {
        if !file.contains(want) {
            return Err(bad(format!(
                "tensor {want} is missing (its partner {have} is there)"
            )));
        }
    }
    let (a, sa) = read_f32(file, &a_name)?;
    let (b, sb) = read_f32(file, &b_name)?;
    if sa.len() != 2 || sb.len() != 2 || sa[0] != sb[1] {
        return Err(bad(format!(
            "{a_name} {sa:?} and {b_name} {sb:?} are not [r, in] and [out, r]"
        )));
    }
    let (rank, inp, out) = (sa[0], sa[1], sb[0]);
    let vector = |part: Part, what: &str| -> Result<Option<Vec<f32>>> {
        let Some(name) = g.parts.get(&part) else {
            return Ok(None);
        };
        let (v, _) = read_f32(file, name)?;
        if v.len() != out {
            return Err(bad(format!(
                "{what} {name} has {} values; expected {out} (lora_B rows)",
                v.len()
            )));
        }
        Ok(Some(v))
    };
    let magnitude = vector(Part::Magnitude, "DoRA magnitude")?;
    let bias = vector(Part::LoraBias, "LoRA bias")?;
    let (alpha, scale) = match &ctx.lora {
        Some(cfg) => {
            let alpha = pattern_value(&cfg.alpha_pattern, &g.path)?.unwrap_or(cfg.alpha);
            (Some(alpha), Some(scale_of(cfg, rank, alpha)))
        }
        None => (None, None),
    };
    let bad_values = non_finite(&a)
        + non_finite(&b)
        + magnitude.as_deref().map_or(0, non_finite)
        + bias.as_deref().map_or(0, non_finite);
    let tensors: Vec<TensorReport> = g.names().map(|n| tensor_report(file, n, true)).collect();
    let method = if embedding {
        "lora_embedding"
    } else if magnitude.is_some() {
        "dora"
    } else {
        "lora"
    };
    let mut m = empty_module(g, method, tensors);
    m.rank = Some(rank);
    m.alpha = alpha.map(f64::from);
    m.scale = scale.map(f64::from);
    m.in_features = Some(inp);
    m.out_features = Some(out);
    m.magnitude_norm = magnitude.as_deref().map(norm);
    m.lora_bias = bias.is_some();
    m.non_finite = bad_values;
    if bad_values == 0 {
        let sp = lora_spectrum(&b, &a, out, rank, inp, scale.unwrap_or(1.0) as f64);
        m.delta_norm = Some(sp.norm);
        m.delta_norm_of = Some(if scale.is_some() { "s*B*A" } else { "B*A" }.into());
        m.numerical_rank = Some(sp.numerical_rank());
        m.effective_rank = Some(sp.effective_rank());
        m.singular_values = sp.top();
    }
    let module = LoraModule {
        path: g.path.clone(),
        rank,
        alpha: alpha.unwrap_or(rank as f32),
        scale: scale.unwrap_or(1.0),
        a,
        b,
        in_features: inp,
        out_features: out,
        bias,
        magnitude,
        embedding,
    };
    Ok((m, module))
}

fn ia3_module(
    file: &SafetensorsFile,
    g: &Group,
    ctx: &Context,
    base: Option<&ModelFolder>,
) -> Result<(ModuleReport, Ia3Module)> {
    let name = &g.parts[&Part::Ia3];
    let (l, shape) = read_f32(file, name)?;
    let feedforward = match &ctx.ia3 {
        Some(cfg) => cfg.is_feedforward(&g.path),
        None => shape.first() == Some(&1) && shape.get(1).is_some_and(|&n| n != 1),
    };
    let ok = matches!(
        (feedforward, shape.as_slice()),
        (true, [1, _]) | (false, [_, 1])
    );
    if !ok {
        return Err(Error::bad_input(
            file.path(),
            format!(
                "{name} has shape {shape:?}; expected {} for a {} target",
                if feedforward { "[1, in]" } else { "[out, 1]" },
                if feedforward {
                    "feed-forward"
                } else {
                    "non-feed-forward"
                }
            ),
        ));
    }
    let tensors = vec![tensor_report(file, name, true)];
    let mut m = empty_module(g, "ia3", tensors);
    m.feedforward = Some(feedforward);
    m.non_finite = non_finite(&l);
    if feedforward {
        m.in_features = Some(l.len());
    } else {
        m.out_features = Some(l.len());
    }
    if m.non_finite == 0 {
        m.vector_min = l.iter().map(|&x| x as f64).reduce(f64::min);
        m.vector_max = l.iter().map(|&x| x as f64).reduce(f64::max);
        let with_base = match base {
            Some(b) => ia3_weight_norm(b, &g.path, &l, feedforward)?,
            None => None,
        };
        let (n, of) = match with_base {
            Some(n) => (n, "(l-1)*W"),
            None => {
                let d: Vec<f32> = l.iter().map(|x| x - 1.0).collect();
                (norm(&d), "l-1")
            }
        };
        m.delta_norm = Some(n);
        m.delta_norm_of = Some(of.into());
    }
    let module = Ia3Module {
        path: g.path.clone(),
        l,
        feedforward,
    };
    Ok((m, module))
}

fn bottleneck_module(file: &SafetensorsFile, g: &Group) -> Result<ModuleReport> {
    let need = |part: Part, suffix: &str| -> Result<(Vec<f32>, Vec<usize>)> {
        let name = g
            .parts
            .get(&part)
            .cloned()
            .unwrap_or_else(|| partner(g, suffix));
        read_f32(file, &name)
    };
    let (down, sd) = need(Part::DownWeight, "down.weight")?;
    let (up, su) = need(Part::UpWeight, "up.weight")?;
    if sd.len() != 2 || su.len() != 2 || sd[0] != su[1] || sd[1] != su[0] {
        return Err(Error::bad_input(
            file.path(),
            format!(
                "{}: down.weight {sd:?} and up.weight {su:?} are not [size, hidden] and [hidden, size]",
                g.path
            ),
        ));
    }
    let tensors: Vec<TensorReport> = g.names().map(|n| tensor_report(file, n, true)).collect();
    let mut m = empty_module(g, "bottleneck", tensors);
    m.rank = Some(sd[0]);
    m.in_features = Some(sd[1]);
    m.out_features = Some(su[0]);
    m.non_finite = non_finite(&down) + non_finite(&up);
    Ok(m)
}

fn prompt_report(file: &SafetensorsFile, ctx: &Context) -> Result<Option<PromptReport>> {
    let name = "prompt_embeddings";
    if !file.contains(name) {
        return Ok(None);
    }
    let (v, shape) = read_f32(file, name)?;
    if shape.len() != 2 {
        return Err(Error::bad_input(
            file.path(),
            format!("{name} has shape {shape:?}; expected [num_virtual_tokens, dim]"),
        ));
    }
    let (n, d) = (shape[0], shape[1]);
    let token_norms = (0..n).map(|t| norm(&v[t * d..(t + 1) * d])).collect();
    let mut layers = Vec::new();
    if ctx.kind == Some(PeftKind::PrefixTuning) {
        let nl = ctx.get_u64("num_layers").unwrap_or(0) as usize;
        let td = ctx.get_u64("token_dim").unwrap_or(0) as usize;
        // checked: num_layers and token_dim come from adapter_config.json and their product
        // could overflow (found by fuzz/adapter_config)
        if nl > 0 && td > 0 && nl.checked_mul(2).and_then(|x| x.checked_mul(td)) == Some(d) {
            // row layout: [(layer·2 + kv)·token_dim + j] (formats.md §2.3)
            let slice_norm = |l: usize, kv: usize| -> f64 {
                let start = (l * 2 + kv) * td;
                (0..n)
                    .flat_map(|t| &v[t * d + start..t * d + start + td])
                    .map(|&x| (x as f64) * (x as f64))
                    .sum::<f64>()
                    .sqrt()
            };
            layers = (0..nl)
                .map(|l| PrefixLayerReport {
                    layer: l,
                    key_norm: slice_norm(l, 0),
                    value_norm: slice_norm(l, 1),
                })
                .collect();
        }
    }
    Ok(Some(PromptReport {
        num_virtual_tokens: n,
        shape,
        norm: norm(&v),
        token_norms,
        layers,
    }))
}

/// Analyse every module of `file` (IA3 norms against `base` when given).
pub fn analyze(
    file: SafetensorsFile,
    ctx: &Context,
    base: Option<&ModelFolder>,
) -> Result<Analysis> {
    let names = file.names();
    let grouped = group(&names);
    let mut modules = Vec::new();
    let mut lora = BTreeMap::new();
    let mut ia3 = BTreeMap::new();
    for g in &grouped.modules {
        if g.is_lora() {
            let (m, l) = lora_module(&file, g, ctx)?;
            modules.push(m);
            lora.insert(g.path.clone(), l);
        } else if g.is_ia3() {
            let (m, v) = ia3_module(&file, g, ctx, base)?;
            modules.push(m);
            ia3.insert(g.path.clone(), v);
        } else if g.is_bottleneck() {
            modules.push(bottleneck_module(&file, g)?);
        } else {
            // only a lora_B.bias / magnitude without A and B
            let first = g.names().next().cloned().unwrap_or_default();
            return Err(Error::bad_input(
                file.path(),
                format!(
                    "tensor {first} belongs to no LoRA pair ({} is missing)",
                    partner(g, "lora_A.weight")
                ),
            ));
        }
    }
    let other_tensors = grouped
        .others
        .iter()
        .map(|n| tensor_report(&file, n, true))
        .collect();
    let prompt = prompt_report(&file, ctx)?;
    let files = files_summary(&file);
    Ok(Analysis {
        trainable_params: files.elements,
        files,
        grouped,
        modules,
        other_tensors,
        prompt,
        lora,
        ia3,
        file,
    })
}

/// The method a file without a config seems to hold.
pub fn guess_method(a: &Analysis) -> Option<String> {
    let has = |m: &str| a.modules.iter().any(|x| x.method == m);
    let name = if has("dora") {
        "DoRA"
    } else if has("lora") || has("lora_embedding") {
        "LoRA"
    } else if has("ia3") {
        "IA3"
    } else if has("bottleneck") {
        "bottleneck adapter"
    } else if a.prompt.is_some() {
        "prompt learning"
    } else {
        return None;
    };
    Some(format!("{name} (no adapter_config.json)"))
}

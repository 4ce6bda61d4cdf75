//! Merging LoRA, DoRA and IA3 adapters into the base weights (`adapter-merge --adapter`).
//!
//! The output is a plain Hugging Face model folder with the same logits as base + adapter.
//! Math follows PEFT 0.21 `merge_and_unload` (formats.md §1.5, §3.1):
//! * LoRA: `W ← W + s·B·A` (Conv1D weights are `[in, out]` on disk: ΔW is transposed to fit);
//!   `lora_bias`: `b ← b + s·lora_B.bias`.
//! * DoRA: `W ← (m / ‖W + ΔW‖_row) ⊙ (W + ΔW)`, the norm taken per output row.
//! * IA3: `W ← W ⊙ l` over output rows (and `b ← b ⊙ l`), or over input columns for
//!   feed-forward targets.
//! * `modules_to_save` copies and trained biases replace the base tensors.
//!
//! Values are combined in f32 and rounded once to the output dtype (the base tensor's dtype
//! unless `--dtype`), as PyTorch's in-place `W += ΔW` on a bf16 weight does.
//!
//! A 4-bit base (bitsandbytes NF4/FP4) is merged into the dequantized weights the adapter was
//! trained against, not into the original full-precision ones (which this tool never sees): the
//! QLoRA-correct merge. The result is a plain model, or, with `requantize`, a 4-bit model again
//! whose changed weights are re-quantized with their original settings (PEFT's Linear4bit
//! merge does the same; the re-quantization is lossy, so prefer the plain output for accuracy).
//!
//! Tensors stream one at a time from the input files to the output file, so the peak memory
//! is about the largest tensor.

use super::adapter_dir::{AdapterDir, Ia3Module, LoraModule, PeftKind};
use crate::error::{Error, Result};
use crate::io::atomic::AtomicDir;
use crate::io::model_folder::{
    copy_side_files, insert_sorted, transpose, write_config, ModelFolder,
};
use crate::io::safetensors_file::{
    encode_f32, to_f32, write_streaming, OutDtype, TensorRef, TensorSpec,
};
use crate::progress::Progress;
use crate::quant::blockwise::{block_absmax, Source};
use crate::quant::checkpoint::{component_suffixes, four_bit_weights, read_quantized};
use crate::quant::state::{NestedState, QuantState};
use crate::quant::torch_mean::{torch_mean_f32, TorchReduce};
use crate::quant::weight::{quantize_weight, serialized_specs};
use safetensors::Dtype;
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug, Default)]
pub struct MergeOptions {
    /// Output dtype of every floating-point tensor (default: each tensor keeps its own).
    pub dtype: Option<OutDtype>,
    /// On a 4-bit base: write a 4-bit model (changed weights re-quantized).
    pub requantize: bool,
    pub quiet: bool,
}

/// What a merge did (`adapter-merge --json`).
#[derive(Clone, Debug, Serialize)]
pub struct MergeSummary {
    pub mode: String,
    /// peft_type of each adapter, in merge order
    pub methods: Vec<String>,
    pub adapters: Vec<String>,
    /// Base weights changed by an adapter.
    pub weights_merged: usize,
    /// Biases changed (lora_bias, IA3) or replaced.
    pub biases_changed: usize,
    /// Tensors replaced by an adapter's full copy (modules_to_save, trained biases).
    pub tensors_replaced: usize,
    pub tensors_dequantized: usize,
    pub tensors_requantized: usize,
    pub tensors_copied: usize,
    /// 4-bit base model
    pub base_4bit: bool,
    pub requantized: bool,
    pub bytes_out: u64,
    pub seconds: f64,
    pub out: String,
}

/// One change to a base tensor, applied in adapter order.
enum Op {
    Lora(usize),
    Ia3(usize),
    /// `b += s · lora_B.bias`
    LoraBias(usize),
    /// `b *= l`
    Ia3Bias(usize),
}

/// Everything the adapters do to one base tensor.
#[derive(Default)]
struct Edit {
    /// (adapter index, adapter tensor key) whose values replace the base tensor
    replace: Option<(usize, String)>,
    ops: Vec<Op>,
}

struct Adapters {
    dirs: Vec<AdapterDir>,
    lora: Vec<(usize, LoraModule)>,
    ia3: Vec<(usize, Ia3Module)>,
}

impl Adapters {
    fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut a = Adapters {
            dirs: Vec::new(),
            lora: Vec::new(),
            ia3: Vec::new(),
        };
        for (i, p) in paths.iter().enumerate() {
            let dir = AdapterDir::open(p)?;
            match &dir.kind {
                PeftKind::Lora => a
                    .lora
                    .extend(dir.lora_modules()?.into_iter().map(|m| (i, m))),
                PeftKind::Ia3 => a.ia3.extend(dir.ia3_modules()?.into_iter().map(|m| (i, m))),
                PeftKind::PrefixTuning | PeftKind::PTuning | PeftKind::PromptTuning => {
                    return Err(Error::usage(format!(
                        "{}: {} adds virtual tokens at run time and has no weights to merge; \
                         use it with --adapter in peft-generate or peft-eval",
                        p.display(),
                        dir.kind.name()
                    )))
                }
                PeftKind::Bottleneck => {
                    return Err(Error::usage(format!(
                        "{}: bottleneck adapters add layers (with a non-linearity) the base model \
                         does not have, so they cannot be merged; use it with --adapter in \
                         peft-generate or peft-eval",
                        p.display()
                    )))
                }
                PeftKind::Other(t) => {
                    return Err(Error::bad_input(
                        dir.config_path(),
                        format!("peft_type {t:?} cannot be merged (LORA, IA3 can)"),
                    ))
                }
            }
            a.dirs.push(dir);
        }
        Ok(a)
    }
}

/// A base tensor's shape and storage as the merge sees it.
struct BaseTensor {
    /// `[out, in]` for a linear weight (Conv1D transposed), the stored shape otherwise
    logical: Vec<usize>,
    conv1d: bool,
    /// The quant state when the tensor is a 4-bit weight.
    q4: Option<QuantState>,
}

fn float_dtype(d: Dtype) -> Option<OutDtype> {
    match d {
        Dtype::F32 => Some(OutDtype::F32),
        Dtype::F16 => Some(OutDtype::F16),
        Dtype::BF16 => Some(OutDtype::BF16),
        _ => None,
    }
}

fn bytes_to_f32(
    path: &Path,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
    bytes: &[u8],
) -> Result<Vec<f32>> {
    to_f32(
        name,
        &TensorRef {
            dtype,
            shape,
            bytes,
        },
    )
    .map_err(|m| Error::bad_input(path, m))
}

/// Merge `adapters` (in order) into the model folder `model`, writing `out`.
pub fn merge_into_base(
    model: &Path,
    adapter_paths: &[PathBuf],
    out: &Path,
    opts: &MergeOptions,
) -> Result<MergeSummary> {
    let t0 = Instant::now();
    if adapter_paths.is_empty() {
        return Err(Error::usage("give at least one --adapter DIR to merge"));
    }
    let mut inputs: Vec<&Path> = vec![model];
    inputs.extend(adapter_paths.iter().map(PathBuf::as_path));
    crate::io::atomic::refuse_overwriting_inputs(out, &inputs)?;
    let folder = ModelFolder::open(model)?;
    let adapters = Adapters::open(adapter_paths)?;

    // 4-bit weights and their parts
    let (quantized, components) = four_bit_weights(&folder.names);
    let base_4bit = !quantized.is_empty();
    if opts.requantize && !base_4bit {
        return Err(Error::usage(format!(
            "--requantize: {} is not a 4-bit model; merge, then run quantize-nf4 on the result",
            model.display()
        )));
    }
    let base_info = |name: &str| -> Result<Option<BaseTensor>> {
        if quantized.contains(name) {
            let q = read_quantized(&folder.weights, name)?.expect("4-bit weight");
            let module = name.strip_suffix(".weight").unwrap_or(name);
            let conv1d = folder.is_conv1d(module);
            return Ok(Some(BaseTensor {
                logical: q.state.shape.clone(),
                conv1d,
                q4: Some(q.state),
            }));
        }
        if !folder.weights.contains(name) {
            return Ok(None);
        }
        let (_, shape, _) = folder.info(name);
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let conv1d = name.ends_with(".weight") && folder.is_conv1d(module) && shape.len() == 2;
        let logical = if conv1d {
            vec![shape[1], shape[0]]
        } else {
            shape
        };
        Ok(Some(BaseTensor {
            logical,
            conv1d,
            q4: None,
        }))
    };

    // What happens to each base tensor.
    let mut edits: BTreeMap<String, Edit> = BTreeMap::new();
    let no_module = |ai: usize, path: &str, what: &str| {
        Error::bad_input(
            adapters.dirs[ai].weights_path(),
            format!(
                "{what} for module {path}, but the base model {} has no tensor {path}.weight: adapter for another base model?",
                model.display()
            ),
        )
    };
    for (k, (ai, m)) in adapters.lora.iter().enumerate() {
        let w = format!("{}.weight", m.path);
        let Some(bt) = base_info(&w)? else {
            return Err(no_module(*ai, &m.path, "LoRA weights"));
        };
        let want = if m.embedding {
            vec![m.in_features, m.out_features]
        } else {
            vec![m.out_features, m.in_features]
        };
        if bt.logical != want {
            return Err(Error::bad_input(
                adapters.dirs[*ai].weights_path(),
                format!(
                    "LoRA module {} (lora_A [{}, {}], lora_B [{}, {}]) does not fit base tensor {w} {:?}: adapter for another base model?",
                    m.path, m.rank, m.in_features, m.out_features, m.rank, bt.logical
                ),
            ));
        }
        if m.embedding && m.magnitude.is_some() {
            return Err(Error::usage(format!(
                "{}: DoRA on an embedding is not supported",
                m.path
            )));
        }
        edits.entry(w).or_default().ops.push(Op::Lora(k));
        if m.bias.is_some() {
            let b = format!("{}.bias", m.path);
            if base_info(&b)?.is_none() {
                return Err(Error::bad_input(
                    adapters.dirs[*ai].weights_path(),
                    format!("{}.lora_B.bias (lora_bias) needs a bias in the base layer, but {b} does not exist", m.path),
                ));
            }
            edits.entry(b).or_default().ops.push(Op::LoraBias(k));
        }
    }
    for (k, (ai, m)) in adapters.ia3.iter().enumerate() {
        let w = format!("{}.weight", m.path);
        let Some(bt) = base_info(&w)? else {
            return Err(no_module(*ai, &m.path, "an IA3 vector"));
        };
        let dim = if m.feedforward { 1 } else { 0 };
        if bt.logical.len() != 2 || bt.logical[dim] != m.l.len() {
            return Err(Error::bad_input(
                adapters.dirs[*ai].weights_path(),
                format!(
                    "IA3 vector of {} has {} values; base tensor {w} {:?} needs {} ({})",
                    m.path,
                    m.l.len(),
                    bt.logical,
                    bt.logical.get(dim).copied().unwrap_or(0),
                    if m.feedforward {
                        "inputs, feed-forward"
                    } else {
                        "outputs"
                    }
                ),
            ));
        }
        edits.entry(w).or_default().ops.push(Op::Ia3(k));
        let b = format!("{}.bias", m.path);
        if !m.feedforward && base_info(&b)?.is_some() {
            edits.entry(b).or_default().ops.push(Op::Ia3Bias(k));
        }
    }
    // Full replacements; a tied model gets its own lm_head when an adapter trained one.
    let tied_head = folder
        .config
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        != Some(false)
        && !folder.weights.contains("lm_head.weight");
    let mut added: Vec<(String, Vec<usize>, Dtype)> = Vec::new();
    for (ai, dir) in adapters.dirs.iter().enumerate() {
        for (key, base) in dir.replacement_tensors() {
            let t = dir.file.require(&key)?;
            match base_info(&base)? {
                Some(bt) if bt.q4.is_some() => {
                    return Err(Error::usage(format!(
                        "{key}: replacing a 4-bit weight ({base}) is not supported"
                    )))
                }
                Some(_) => {
                    let (_, shape, _) = folder.info(&base);
                    if t.shape != shape.as_slice() {
                        return Err(Error::bad_input(
                            dir.weights_path(),
                            format!(
                                "{key} has shape {:?}; base tensor {base} is {shape:?}",
                                t.shape
                            ),
                        ));
                    }
                }
                None if base == "lm_head.weight" && tied_head => {
                    added.push((base.clone(), t.shape.to_vec(), t.dtype));
                }
                None => {
                    return Err(Error::bad_input(
                        dir.weights_path(),
                        format!(
                            "{key} replaces {base}, which the base model {} does not have",
                            model.display()
                        ),
                    ))
                }
            }
            let e = edits.entry(base).or_default();
            if e.replace.is_some() {
                return Err(Error::usage(format!(
                    "two adapters replace {key}; merge them one at a time or combine them first"
                )));
            }
            e.replace = Some((ai, key));
        }
    }

    // Output layout.
    let out_float = |d: Dtype| -> Dtype {
        match (opts.dtype, float_dtype(d)) {
            (Some(o), Some(_)) => o.st(),
            _ => d,
        }
    };
    let reduce = TorchReduce::detect();
    let mut specs: Vec<TensorSpec> = Vec::new();
    let mut jobs: Vec<Job> = Vec::new();
    let mut requant_states: HashMap<String, QuantState> = HashMap::new();
    let mut summary = MergeSummary {
        mode: "merge".into(),
        methods: adapters
            .dirs
            .iter()
            .map(|d| d.kind.name().to_string())
            .collect(),
        adapters: adapter_paths
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        weights_merged: 0,
        biases_changed: 0,
        tensors_replaced: 0,
        tensors_dequantized: 0,
        tensors_requantized: 0,
        tensors_copied: 0,
        base_4bit,
        requantized: opts.requantize,
        bytes_out: 0,
        seconds: 0.0,
        out: out.display().to_string(),
    };
    let merger = Merger {
        folder: &folder,
        adapters: &adapters,
        edits: &edits,
    };
    let progress = Progress::new(opts.quiet);
    let scan = progress.bar(
        if opts.requantize {
            edits.len() as u64
        } else {
            0
        },
        "scanning",
    );
    for name in &folder.names {
        let changed = edits
            .get(name)
            .is_some_and(|e| e.replace.is_some() || !e.ops.is_empty());
        if changed {
            if name.ends_with(".bias") {
                summary.biases_changed += 1;
            } else if edits[name].ops.is_empty() {
                summary.tensors_replaced += 1;
            } else {
                summary.weights_merged += 1;
            }
        }
        if components.contains(name) {
            // parts of a 4-bit weight: kept only when that weight stays 4-bit and unchanged
            let owner = component_suffixes()
                .iter()
                .find_map(|s| name.strip_suffix(&format!(".{s}")))
                .expect("component");
            if opts.requantize && !edits.contains_key(owner) {
                let (dtype, shape, _) = folder.info(name);
                specs.push(TensorSpec {
                    name: name.clone(),
                    dtype,
                    shape,
                });
                jobs.push(Job::Copy(name.clone()));
            }
            continue;
        }
        if quantized.contains(name) {
            let bt = base_info(name)?.expect("listed");
            let state = bt.q4.clone().expect("4-bit");
            if opts.requantize {
                if changed {
                    // the header needs the new nested offset: merge once now for the maxima
                    let merged = merger.merged_logical(name, &bt)?;
                    let nested = state.nested.as_ref().map(|n| NestedState {
                        offset: torch_mean_f32(
                            &block_absmax(Source::F32(&merged), state.blocksize),
                            reduce,
                        ),
                        ..*n
                    });
                    scan.inc(1);
                    let new_state = QuantState {
                        nested,
                        ..state.clone()
                    };
                    let parts = serialized_specs(name, &new_state);
                    for (k, s) in parts.into_iter().enumerate() {
                        specs.push(s);
                        jobs.push(Job::QuantPart(name.clone(), k));
                    }
                    requant_states.insert(name.clone(), new_state);
                    summary.tensors_requantized += 1;
                } else {
                    let (dtype, shape, _) = folder.info(name);
                    specs.push(TensorSpec {
                        name: name.clone(),
                        dtype,
                        shape,
                    });
                    jobs.push(Job::Copy(name.clone()));
                    summary.tensors_copied += 1;
                }
            } else {
                let shape = if bt.conv1d {
                    vec![state.shape[1], state.shape[0]]
                } else {
                    state.shape.clone()
                };
                specs.push(TensorSpec {
                    name: name.clone(),
                    dtype: out_float(state.dtype.st()),
                    shape,
                });
                jobs.push(Job::Compute(name.clone()));
                summary.tensors_dequantized += 1;
            }
            continue;
        }
        let (dtype, shape, _) = folder.info(name);
        let out_dtype = out_float(dtype);
        specs.push(TensorSpec {
            name: name.clone(),
            dtype: out_dtype,
            shape,
        });
        if changed || out_dtype != dtype {
            jobs.push(Job::Compute(name.clone()));
        } else {
            jobs.push(Job::Copy(name.clone()));
            summary.tensors_copied += 1;
        }
    }
    scan.finish_and_clear();
    for (name, shape, dtype) in &added {
        specs.push(TensorSpec {
            name: name.clone(),
            dtype: out_float(*dtype),
            shape: shape.clone(),
        });
        jobs.push(Job::Compute(name.clone()));
        summary.tensors_replaced += 1;
    }

    let dir = AtomicDir::create(out, &inputs)?;
    let st_path = dir.join("model.safetensors");
    let bar = progress.bar(specs.len() as u64, "merge");
    let mut pending: VecDeque<Vec<u8>> = VecDeque::new();
    let metadata: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    write_streaming(&st_path, &specs, &metadata, |i| {
        bar.inc(1);
        match &jobs[i] {
            Job::Copy(name) => folder.read(name),
            Job::Compute(name) => {
                let spec = &specs[i];
                let out_dtype = float_dtype(spec.dtype).expect("float output");
                let values = match base_info(name)? {
                    Some(bt) => {
                        let v = merger.merged_logical(name, &bt)?;
                        if bt.conv1d {
                            transpose(&v, bt.logical[0], bt.logical[1])
                        } else {
                            v
                        }
                    }
                    // a tensor only the adapter has (untied lm_head)
                    None => merger.replacement(name)?.expect("added tensor"),
                };
                Ok(encode_f32(&values, out_dtype))
            }
            Job::QuantPart(name, 0) => {
                let bt = base_info(name)?.expect("listed");
                let merged = merger.merged_logical(name, &bt)?;
                let state = &requant_states[name];
                let w = quantize_weight(
                    Source::F32(&merged),
                    &state.shape,
                    state.dtype,
                    state.quant_type,
                    state.blocksize,
                    state.nested.is_some(),
                    reduce,
                )
                .map_err(|nf| {
                    Error::Numeric(format!(
                        "merged {name} has a non-finite value ({} at flat index {}); the adapter is broken",
                        nf.value, nf.index
                    ))
                })?;
                if w.state != *state {
                    return Err(Error::Numeric(format!(
                        "internal: {name} re-quantized differently in the two passes"
                    )));
                }
                let mut parts: VecDeque<Vec<u8>> = w.tensors(name).into_iter().map(|(_, b)| b).collect();
                let first = parts.pop_front().expect("packed weight");
                pending = parts;
                Ok(first)
            }
            Job::QuantPart(_, _) => Ok(pending.pop_front().expect("quantized part")),
        }
    })
    .map_err(|e| dir.rename_error(e))?;
    bar.finish_and_clear();

    let mut config = folder.config.clone();
    if !opts.requantize {
        config.remove("quantization_config");
    }
    if !added.is_empty() {
        insert_sorted(&mut config, "tie_word_embeddings", Value::Bool(false));
    }
    if let Some(d) = opts.dtype {
        let key = if config.contains_key("torch_dtype") && !config.contains_key("dtype") {
            "torch_dtype"
        } else {
            "dtype"
        };
        insert_sorted(&mut config, key, Value::String(d.torch_name().to_string()));
    }
    write_config(&dir, &config)?;
    copy_side_files(&folder.dir, &dir)?;
    summary.bytes_out = std::fs::metadata(&st_path)
        .map_err(|e| Error::io(&st_path, e))?
        .len();
    dir.commit()?;
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
}

/// Where an output tensor's bytes come from.
enum Job {
    Copy(String),
    /// Base value (dequantized if 4-bit) with the edits applied, in the output dtype.
    Compute(String),
    /// Part `k` of a re-quantized merged weight.
    QuantPart(String, usize),
}

struct Merger<'a> {
    folder: &'a ModelFolder,
    adapters: &'a Adapters,
    edits: &'a BTreeMap<String, Edit>,
}

impl Merger<'_> {
    /// The adapter's replacement values for `name`, if any.
    fn replacement(&self, name: &str) -> Result<Option<Vec<f32>>> {
        let Some((ai, key)) = self.edits.get(name).and_then(|e| e.replace.as_ref()) else {
            return Ok(None);
        };
        let dir = &self.adapters.dirs[*ai];
        let t = dir.file.require(key)?;
        Ok(Some(
            to_f32(key, &t).map_err(|m| Error::bad_input(dir.weights_path(), m))?,
        ))
    }

    /// Base tensor `name` in f32 (`[out, in]` for a linear weight) with every edit applied.
    fn merged_logical(&self, name: &str, bt: &BaseTensor) -> Result<Vec<f32>> {
        let mut w = match self.replacement(name)? {
            Some(v) => v,
            None if bt.q4.is_some() => read_quantized(&self.folder.weights, name)?
                .expect("4-bit weight")
                .dequantize(),
            None => {
                let bytes = self.folder.read(name)?;
                let (dtype, shape, _) = self.folder.info(name);
                let v = bytes_to_f32(&self.folder.path_of(name), name, dtype, &shape, &bytes)?;
                // A NaN in the base would spread through the merged weight: refuse it.
                crate::io::safetensors_file::check_finite(name, &v)
                    .map_err(|m| Error::bad_input(self.folder.path_of(name), m))?;
                if bt.conv1d {
                    transpose(&v, shape[0], shape[1])
                } else {
                    v
                }
            }
        };
        let Some(edit) = self.edits.get(name) else {
            return Ok(w);
        };
        for op in &edit.ops {
            match *op {
                Op::Lora(k) => apply_lora(&mut w, &self.adapters.lora[k].1),
                Op::Ia3(k) => {
                    let m = &self.adapters.ia3[k].1;
                    let cols = bt.logical[1];
                    for (r, row) in w.chunks_exact_mut(cols).enumerate() {
                        if m.feedforward {
                            row.iter_mut().zip(&m.l).for_each(|(x, l)| *x *= l);
                        } else {
                            row.iter_mut().for_each(|x| *x *= m.l[r]);
                        }
                    }
                }
                Op::LoraBias(k) => {
                    let m = &self.adapters.lora[k].1;
                    let b = m.bias.as_ref().expect("lora bias");
                    w.iter_mut().zip(b).for_each(|(x, b)| *x += m.scale * b);
                }
                Op::Ia3Bias(k) => {
                    let m = &self.adapters.ia3[k].1;
                    w.iter_mut().zip(&m.l).for_each(|(x, l)| *x *= l);
                }
            }
        }
        Ok(w)
    }
}

/// `W += ΔW`, or DoRA's `W ← m/‖W + ΔW‖ · (W + ΔW)` per output row (`w` is `[out, in]`, an
/// embedding's `[num, dim]`).
fn apply_lora(w: &mut [f32], m: &LoraModule) {
    let d = m.delta();
    w.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
    if let Some(mag) = &m.magnitude {
        for (row, &g) in w.chunks_exact_mut(m.in_features).zip(mag) {
            let norm = row
                .iter()
                .map(|&x| (x as f64) * (x as f64))
                .sum::<f64>()
                .sqrt() as f32;
            let f = g / norm;
            row.iter_mut().for_each(|x| *x *= f);
        }
    }
}

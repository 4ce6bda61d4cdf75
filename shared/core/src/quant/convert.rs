//! Model folders in and out of 4-bit (the body of the `quantize-nf4` tool).
//!
//! Quantizing: every linear weight of a Llama / Mistral / Qwen2 / GPT-2 model (`q_proj`,
//! `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`; GPT-2 `c_attn`, `c_proj`,
//! `c_fc`, whose Conv1D `[in, out]` weights are transposed to `[out, in]` first, as transformers
//! does) is written as bitsandbytes' six tensors; everything else (embeddings, norms, biases,
//! the output head, skipped modules) is copied byte for byte. config.json gains the
//! `quantization_config` block; tokenizer and generation files are copied.
//!
//! Dequantizing turns such a folder (ours or one transformers wrote) back into a plain model in
//! the dtype recorded in each quant state, GPT-2 weights back in Conv1D layout, without the
//! `quantization_config` block.
//!
//! Tensors are read with positioned reads (not through the memory map), one at a time, and the
//! output streams through `write_streaming`, so the peak memory is about the largest tensor.
//! With double quantization the header needs every `nested_offset` (its digits set the length of
//! the JSON tensor) before any data is written, so a first pass computes only the block maxima.

use super::blockwise::{block_absmax, valid_blocksize, Source, SrcDtype};
use super::checkpoint::{
    component_suffixes, quantization_config, read_quantized, weight_of_quant_state,
};
use super::codebook::QuantType;
use super::state::{NestedState, QuantState};
use super::torch_mean::{torch_mean_f32, TorchReduce};
use super::weight::{quantize_weight, serialized_specs};
use crate::error::{Error, Result};
use crate::io::atomic::AtomicDir;
use crate::io::model_folder::{
    copy_side_files, insert_sorted, transpose, write_config, ModelFolder,
};
use crate::io::safetensors_file::{encode_f32, write_streaming, OutDtype, TensorSpec};
use crate::progress::Progress;
use safetensors::Dtype;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::time::Instant;

/// What to quantize and how (defaults: the QLoRA recipe).
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub double_quant: bool,
    /// Recorded in `quantization_config.bnb_4bit_compute_dtype` (used by loaders).
    pub compute_dtype: OutDtype,
    /// Extra modules left unquantized (`lm_head` always is): a module name, a prefix ending at a
    /// module boundary (`model.layers.0`) or a suffix (`down_proj`), as transformers matches
    /// `llm_int8_skip_modules`.
    pub skip: Vec<String>,
    pub quiet: bool,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        Self {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            double_quant: true,
            compute_dtype: OutDtype::BF16,
            skip: Vec::new(),
            quiet: false,
        }
    }
}

/// What a conversion did (`quantize-nf4 --json`).
#[derive(Clone, Debug, Serialize)]
pub struct ConvertSummary {
    /// "quantize" or "dequantize"
    pub mode: String,
    pub model_type: String,
    pub quant_type: Option<String>,
    pub blocksize: Option<usize>,
    pub double_quant: Option<bool>,
    pub tensors_quantized: usize,
    pub tensors_dequantized: usize,
    pub tensors_copied: usize,
    /// Tensor data read from the input (each tensor counted once).
    pub bytes_in: u64,
    /// Size of the written model.safetensors.
    pub bytes_out: u64,
    pub seconds: f64,
    /// bytes_in / seconds / 1e9
    pub gb_per_s: f64,
    pub out: String,
}

/// transformers' `should_convert_module` for literal patterns: the whole name, a prefix ending
/// at a module boundary, or a plain suffix.
fn skipped(module: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| {
        module.ends_with(p.as_str())
            || module
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || p.ends_with('.'))
    })
}

fn src_dtype(d: Dtype) -> Option<(SrcDtype, OutDtype)> {
    match d {
        Dtype::F32 => Some((SrcDtype::F32, OutDtype::F32)),
        Dtype::F16 => Some((SrcDtype::F16, OutDtype::F16)),
        Dtype::BF16 => Some((SrcDtype::BF16, OutDtype::BF16)),
        _ => None,
    }
}

/// Row-major `[rows, cols]` f32 values of raw bytes, transposed to `[cols, rows]`.
fn transposed_f32(bytes: &[u8], dtype: SrcDtype, rows: usize, cols: usize) -> Vec<f32> {
    let mut x = vec![0f32; rows * cols];
    Source::Bytes(bytes, dtype).load(0, &mut x);
    transpose(&x, rows, cols)
}

/// What to do with one input tensor.
enum Plan {
    Copy {
        name: String,
    },
    Quantize {
        name: String,
        /// Conv1D `[in, out]` on disk
        conv1d: bool,
        state: QuantState,
        parts: usize,
    },
}

/// Where an output tensor comes from.
enum Job {
    Copy(String),
    /// Part `k` of the quantized tensor planned at index `plan`.
    Part(usize, usize),
}

/// Quantize the model folder `model` into `out` (written atomically; never over the input).
pub fn quantize_model(model: &Path, out: &Path, opts: &QuantizeOptions) -> Result<ConvertSummary> {
    let t0 = Instant::now();
    if !valid_blocksize(opts.blocksize) {
        return Err(Error::usage(format!(
            "--blocksize {} is not supported; use a power of two from 32 to 4096",
            opts.blocksize
        )));
    }
    crate::io::atomic::refuse_overwriting_inputs(out, &[model])?;
    let input = ModelFolder::open(model)?;
    if input.config.contains_key("quantization_config")
        || input
            .names
            .iter()
            .any(|n| weight_of_quant_state(n).is_some())
    {
        return Err(Error::usage(format!(
            "{}: the model is already quantized; use --dequantize to get a plain model back",
            model.display()
        )));
    }
    let progress = Progress::new(opts.quiet);
    let reduce = TorchReduce::detect();
    let mut skip = vec!["lm_head".to_string()];
    skip.extend(opts.skip.iter().filter(|s| !s.is_empty()).cloned());

    // Plan: which tensors are quantized, and their states (the offsets need the block maxima).
    let mut plans = Vec::new();
    let mut scan_bytes = 0u64;
    for name in &input.names {
        let (dtype, shape, (s, e)) = input.info(name);
        let module = name.strip_suffix(".weight");
        let quantize =
            module.is_some_and(|m| input.is_linear(m) && !skipped(m, &skip)) && shape.len() == 2;
        if quantize {
            if src_dtype(dtype).is_none() {
                return Err(Error::bad_input(
                    input.path_of(name),
                    format!("tensor {name} has dtype {dtype:?}; 4-bit quantization takes F32, F16 or BF16"),
                ));
            }
            scan_bytes += (e - s) as u64;
        }
        plans.push((name.clone(), quantize, dtype, shape));
    }
    let scan_bar = progress.bytes_bar(if opts.double_quant { scan_bytes } else { 0 }, "scanning");
    let mut planned = Vec::with_capacity(plans.len());
    for (name, quantize, dtype, shape) in plans {
        if !quantize {
            planned.push(Plan::Copy { name });
            continue;
        }
        let module = name.strip_suffix(".weight").unwrap_or(&name);
        let conv1d = input.is_conv1d(module);
        let (_, out_dtype) = src_dtype(dtype).expect("checked");
        let qshape = if conv1d {
            vec![shape[1], shape[0]]
        } else {
            shape.clone()
        };
        let nested = if opts.double_quant {
            let bytes = input.read(&name)?;
            scan_bar.inc(bytes.len() as u64);
            let absmax =
                weight_absmax(&input, &name, &bytes, dtype, &shape, conv1d, opts.blocksize)?;
            Some(NestedState {
                blocksize: super::double_quant::NESTED_BLOCKSIZE,
                dtype: OutDtype::F32,
                offset: torch_mean_f32(&absmax, reduce),
            })
        } else {
            None
        };
        let state = QuantState {
            quant_type: opts.quant_type,
            blocksize: opts.blocksize,
            dtype: out_dtype,
            shape: qshape,
            nested,
        };
        let parts = serialized_specs(&name, &state).len();
        planned.push(Plan::Quantize {
            name,
            conv1d,
            state,
            parts,
        });
    }
    scan_bar.finish_and_clear();

    let mut specs = Vec::new();
    let mut jobs = Vec::new();
    let mut total_in = 0u64;
    for (i, p) in planned.iter().enumerate() {
        match p {
            Plan::Copy { name } => {
                let (dtype, shape, (s, e)) = input.info(name);
                total_in += (e - s) as u64;
                specs.push(TensorSpec {
                    name: name.clone(),
                    dtype,
                    shape,
                });
                jobs.push(Job::Copy(name.clone()));
            }
            Plan::Quantize { name, state, .. } => {
                let (_, _, (s, e)) = input.info(name);
                total_in += (e - s) as u64;
                for (k, spec) in serialized_specs(name, state).into_iter().enumerate() {
                    specs.push(spec);
                    jobs.push(Job::Part(i, k));
                }
            }
        }
    }

    let dir = AtomicDir::create(out, &[model])?;
    let st_path = dir.join("model.safetensors");
    let bar = progress.bytes_bar(total_in, "quantize");
    let mut pending: VecDeque<Vec<u8>> = VecDeque::new();
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    write_streaming(&st_path, &specs, &metadata, |i| match &jobs[i] {
        Job::Copy(name) => {
            let b = input.read(name)?;
            bar.inc(b.len() as u64);
            Ok(b)
        }
        Job::Part(p, 0) => {
            let Plan::Quantize {
                name,
                conv1d,
                state,
                parts,
            } = &planned[*p]
            else {
                unreachable!("quantize job for a copied tensor")
            };
            let bytes = input.read(name)?;
            bar.inc(bytes.len() as u64);
            let (dtype, shape, _) = input.info(name);
            let (sd, _) = src_dtype(dtype).expect("checked");
            let tvals;
            let src = if *conv1d {
                tvals = transposed_f32(&bytes, sd, shape[0], shape[1]);
                Source::F32(&tvals)
            } else {
                Source::Bytes(&bytes, sd)
            };
            let w = quantize_weight(
                src,
                &state.shape,
                state.dtype,
                state.quant_type,
                state.blocksize,
                state.nested.is_some(),
                reduce,
            )
            .map_err(|nf| non_finite(&input, name, *conv1d, &shape, nf))?;
            if w.state != *state {
                return Err(Error::Numeric(format!(
                    "internal: tensor {name} quantized differently in the two passes"
                )));
            }
            let mut parts_bytes: VecDeque<Vec<u8>> =
                w.tensors(name).into_iter().map(|(_, b)| b).collect();
            debug_assert_eq!(parts_bytes.len(), *parts);
            let first = parts_bytes.pop_front().expect("packed weight");
            pending = parts_bytes;
            Ok(first)
        }
        Job::Part(_, _) => Ok(pending.pop_front().expect("quantized part")),
    })
    .map_err(|e| dir.rename_error(e))?;
    bar.finish_and_clear();

    let mut config = input.config.clone();
    let skip_modules = (!opts.skip.is_empty()).then_some(skip.as_slice());
    insert_sorted(
        &mut config,
        "quantization_config",
        quantization_config(
            opts.quant_type,
            opts.double_quant,
            opts.compute_dtype,
            skip_modules,
        ),
    );
    write_config(&dir, &config)?;
    copy_side_files(&input.dir, &dir)?;
    let bytes_out = std::fs::metadata(&st_path)
        .map_err(|e| Error::io(&st_path, e))?
        .len();
    dir.commit()?;

    let n_quant = planned
        .iter()
        .filter(|p| matches!(p, Plan::Quantize { .. }))
        .count();
    let seconds = t0.elapsed().as_secs_f64();
    Ok(ConvertSummary {
        mode: "quantize".into(),
        model_type: input.model_type.clone(),
        quant_type: Some(opts.quant_type.name().into()),
        blocksize: Some(opts.blocksize),
        double_quant: Some(opts.double_quant),
        tensors_quantized: n_quant,
        tensors_dequantized: 0,
        tensors_copied: planned.len() - n_quant,
        bytes_in: total_in,
        bytes_out,
        seconds,
        gb_per_s: total_in as f64 / seconds.max(1e-9) / 1e9,
        out: out.display().to_string(),
    })
}

/// Block maxima of one weight (first pass), refusing NaN / inf.
fn weight_absmax(
    input: &ModelFolder,
    name: &str,
    bytes: &[u8],
    dtype: Dtype,
    shape: &[usize],
    conv1d: bool,
    blocksize: usize,
) -> Result<Vec<f32>> {
    let (sd, _) = src_dtype(dtype).expect("checked");
    let absmax = if conv1d {
        let t = transposed_f32(bytes, sd, shape[0], shape[1]);
        block_absmax(Source::F32(&t), blocksize)
    } else {
        block_absmax(Source::Bytes(bytes, sd), blocksize)
    };
    if let Some(b) = super::blockwise::first_non_finite(&absmax) {
        let vals = if conv1d {
            transposed_f32(bytes, sd, shape[0], shape[1])
        } else {
            let mut v = vec![0f32; bytes.len() / sd.size()];
            Source::Bytes(bytes, sd).load(0, &mut v);
            v
        };
        let start = b * blocksize;
        let end = (start + blocksize).min(vals.len());
        let i = (start..end)
            .find(|&i| vals[i].is_nan())
            .or_else(|| (start..end).find(|&i| !vals[i].is_finite()))
            .expect("non-finite block");
        return Err(non_finite(
            input,
            name,
            conv1d,
            shape,
            super::weight::NonFinite {
                index: i,
                value: vals[i],
            },
        ));
    }
    Ok(absmax)
}

/// Error for a NaN / inf weight, naming the file, tensor and element (in file layout).
fn non_finite(
    input: &ModelFolder,
    name: &str,
    conv1d: bool,
    shape: &[usize],
    nf: super::weight::NonFinite,
) -> Error {
    // index in the quantized [out, in] layout; for Conv1D that is the transpose of the file's
    let (r, c) = if conv1d {
        let rows = shape[0];
        (nf.index % rows, nf.index / rows)
    } else {
        let cols = shape[1];
        (nf.index / cols, nf.index % cols)
    };
    Error::bad_input(
        input.path_of(name),
        format!(
            "tensor {name} has a non-finite value ({} at [{r}, {c}]); cannot quantize it",
            nf.value
        ),
    )
}

/// Dequantize the 4-bit model folder `model` into a plain one at `out`.
pub fn dequantize_model(model: &Path, out: &Path, quiet: bool) -> Result<ConvertSummary> {
    let t0 = Instant::now();
    crate::io::atomic::refuse_overwriting_inputs(out, &[model])?;
    let input = ModelFolder::open(model)?;
    let quantized: HashSet<String> = input
        .names
        .iter()
        .filter_map(|n| weight_of_quant_state(n).map(String::from))
        .collect();
    if quantized.is_empty() {
        return Err(Error::usage(format!(
            "{}: no 4-bit weights (no *.quant_state.bitsandbytes__nf4/fp4 tensors); nothing to dequantize",
            model.display()
        )));
    }
    let components: HashSet<String> = quantized
        .iter()
        .flat_map(|w| component_suffixes().map(|s| format!("{w}.{s}")))
        .collect();
    let progress = Progress::new(quiet);

    let mut specs = Vec::new();
    let mut states = HashMap::new();
    let mut total_in = 0u64;
    for name in &input.names {
        if components.contains(name) {
            let (_, _, (s, e)) = input.info(name);
            total_in += (e - s) as u64;
            continue;
        }
        let (dtype, shape, (s, e)) = input.info(name);
        total_in += (e - s) as u64;
        if quantized.contains(name) {
            // the state alone gives the output header (read fully, and checked, when written)
            let qs = super::checkpoint::quant_state_tensor(&input.weights, name).expect("state");
            let raw = input.weights.get(&qs).expect("state tensor");
            let state = QuantState::from_json(raw.bytes)
                .map_err(|m| Error::bad_input(input.path_of(&qs), format!("tensor {qs}: {m}")))?;
            let module = name.strip_suffix(".weight").unwrap_or(name);
            let conv1d = input.is_conv1d(module) && state.shape.len() == 2;
            let shape = if conv1d {
                vec![state.shape[1], state.shape[0]]
            } else {
                state.shape.clone()
            };
            specs.push(TensorSpec {
                name: name.clone(),
                dtype: state.dtype.st(),
                shape,
            });
            states.insert(name.clone(), (state, conv1d));
        } else {
            specs.push(TensorSpec {
                name: name.clone(),
                dtype,
                shape,
            });
        }
    }

    let dir = AtomicDir::create(out, &[model])?;
    let st_path = dir.join("model.safetensors");
    let bar = progress.bar(specs.len() as u64, "dequantize");
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    write_streaming(&st_path, &specs, &metadata, |i| {
        let name = &specs[i].name;
        bar.inc(1);
        let Some((state, conv1d)) = states.get(name) else {
            return input.read(name);
        };
        let q = read_quantized(&input.weights, name)?.expect("4-bit weight");
        if q.state != *state {
            return Err(Error::bad_input(
                input.path_of(name),
                format!("tensor {name}: quant state changed while reading"),
            ));
        }
        let mut x = q.dequantize();
        if *conv1d {
            x = transpose(&x, state.shape[0], state.shape[1]);
        }
        Ok(encode_f32(&x, state.dtype))
    })
    .map_err(|e| dir.rename_error(e))?;
    bar.finish_and_clear();

    let mut config = input.config.clone();
    config.remove("quantization_config");
    write_config(&dir, &config)?;
    copy_side_files(&input.dir, &dir)?;
    let bytes_out = std::fs::metadata(&st_path)
        .map_err(|e| Error::io(&st_path, e))?
        .len();
    dir.commit()?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok(ConvertSummary {
        mode: "dequantize".into(),
        model_type: input.model_type.clone(),
        quant_type: None,
        blocksize: None,
        double_quant: None,
        tensors_quantized: 0,
        tensors_dequantized: states.len(),
        tensors_copied: specs.len() - states.len(),
        bytes_in: total_in,
        bytes_out,
        seconds,
        gb_per_s: total_in as f64 / seconds.max(1e-9) / 1e9,
        out: out.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_patterns_follow_transformers() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(skipped("lm_head", &p(&["lm_head"])));
        assert!(skipped("model.layers.1.mlp.down_proj", &p(&["down_proj"])));
        assert!(skipped(
            "model.layers.1.mlp.down_proj",
            &p(&["model.layers.1"])
        ));
        assert!(!skipped(
            "model.layers.11.mlp.down_proj",
            &p(&["model.layers.1"])
        ));
        assert!(skipped(
            "model.layers.11.mlp.down_proj",
            &p(&["model.layers."])
        ));
        assert!(!skipped("model.layers.1.mlp.gate_proj", &p(&["mlp.gate"])));
    }
}

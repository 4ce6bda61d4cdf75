//! What an inspection needs from a base model folder: module shapes in PEFT's orientation
//! (`[out, in]` for linear layers, also GPT-2's Conv1D and 4-bit weights) and, for IA3 norms,
//! one weight at a time in f32.

use crate::io::model_folder::ModelFolder;
use crate::io::safetensors_file::to_f32;
use crate::quant::checkpoint::{quant_state_tensor, read_quantized};
use crate::quant::state::QuantState;
use crate::{Error, Result};

/// The base tensor that stands for module `path`'s weight: `path.weight`, or the input
/// embeddings for a tied `lm_head`.
pub fn weight_name(base: &ModelFolder, path: &str) -> Option<String> {
    let w = format!("{path}.weight");
    if base.weights.contains(&w) {
        return Some(w);
    }
    let tied = base
        .config
        .get("tie_word_embeddings")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    if tied && path.rsplit('.').next() == Some("lm_head") {
        return ["model.embed_tokens.weight", "transformer.wte.weight"]
            .into_iter()
            .find(|n| base.weights.contains(n))
            .map(String::from);
    }
    None
}

/// Whether the base has a module at `path` (a weight of its own, or a tied head).
pub fn has_module(base: &ModelFolder, path: &str) -> bool {
    weight_name(base, path).is_some()
}

/// Shape of tensor `name` as the model sees it: a 4-bit weight's original shape, a Conv1D
/// weight transposed to `[out, in]`, otherwise the stored shape.
pub fn logical_shape(base: &ModelFolder, module: &str, name: &str) -> Result<Option<Vec<usize>>> {
    if let Some(qs) = quant_state_tensor(&base.weights, name) {
        let t = base.weights.get(&qs).expect("listed tensor");
        let st = QuantState::from_json(t.bytes)
            .map_err(|m| Error::bad_input(base.path_of(&qs), format!("tensor {qs}: {m}")))?;
        return Ok(Some(st.shape));
    }
    let Some(t) = base.weights.get(name) else {
        return Ok(None);
    };
    let mut shape = t.shape.to_vec();
    if base.is_conv1d(module) && shape.len() == 2 && name.ends_with(".weight") {
        shape.reverse();
    }
    Ok(Some(shape))
}

/// `[out, in]` of module `path`'s weight (embeddings: `[num_embeddings, dim]`).
pub fn module_shape(base: &ModelFolder, path: &str) -> Result<Option<Vec<usize>>> {
    match weight_name(base, path) {
        Some(w) => logical_shape(base, path, &w),
        None => Ok(None),
    }
}

/// Module `path`'s weight in f32 as `[rows = out, cols = in]` (4-bit weights dequantized,
/// Conv1D transposed); None when the base has no such 2-D weight.
pub fn weight_f32(base: &ModelFolder, path: &str) -> Result<Option<(Vec<f32>, usize, usize)>> {
    let Some(name) = weight_name(base, path) else {
        return Ok(None);
    };
    if let Some(q) = read_quantized(&base.weights, &name)? {
        let s = q.shape().to_vec();
        if s.len() != 2 {
            return Ok(None);
        }
        return Ok(Some((q.dequantize(), s[0], s[1])));
    }
    let t = base.weights.get(&name).expect("listed tensor");
    if t.shape.len() != 2 {
        return Ok(None);
    }
    let v = to_f32(&name, &t).map_err(|m| Error::bad_input(base.path_of(&name), m))?;
    let (r, c) = (t.shape[0], t.shape[1]);
    if base.is_conv1d(path) {
        Ok(Some((crate::io::model_folder::transpose(&v, r, c), c, r)))
    } else {
        Ok(Some((v, r, c)))
    }
}

/// ‖(l − 1) ⊙ W‖_F: the change IA3 makes to the weight (`feedforward`: l scales W's columns,
/// otherwise its rows). None when the base has no matching weight.
pub fn ia3_weight_norm(
    base: &ModelFolder,
    path: &str,
    l: &[f32],
    feedforward: bool,
) -> Result<Option<f64>> {
    let Some((w, rows, cols)) = weight_f32(base, path)? else {
        return Ok(None);
    };
    let n = if feedforward { cols } else { rows };
    if l.len() != n {
        return Ok(None);
    }
    let mut sum = 0f64;
    for r in 0..rows {
        for c in 0..cols {
            let li = if feedforward { l[c] } else { l[r] } as f64;
            let x = (li - 1.0) * w[r * cols + c] as f64;
            sum += x * x;
        }
    }
    Ok(Some(sum.sqrt()))
}

/// Module paths of the base: every tensor `<path>.weight` (4-bit parts excluded).
pub fn module_paths(base: &ModelFolder) -> Vec<String> {
    base.names
        .iter()
        .filter_map(|n| n.strip_suffix(".weight").map(String::from))
        .collect()
}

//! Checkpoints: trainable tensors, AdamW moments, step, RNG states and data position, written
//! atomically (temporary directory + rename) so that a kill at any moment leaves the previous
//! checkpoint whole. Resuming from one continues bit-identically.

use super::params::TrainState;
use crate::error::{Error, Result};
use crate::io::atomic::AtomicDir;
use crate::io::safetensors_file::{to_f32, write_f32_tensors, OutDtype, SafetensorsFile};
use crate::model::Model;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    /// Optimizer steps done.
    pub step: u64,
    pub epoch: u64,
    /// Next micro-batch index within the epoch's order.
    pub batch_in_epoch: u64,
    /// Dropout RNG state.
    pub rng: [u64; 4],
    /// Tokens trained on so far.
    pub tokens: u64,
    /// What a loop keeps beyond these (ppo-train: KL coefficient and sampling RNG).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<serde_json::Value>,
}

const STATE: &str = "trainer_state.json";
const PARAMS: &str = "params.safetensors";
const OPTIM: &str = "optimizer.safetensors";

/// Write `dir` (replacing an older checkpoint there only once the new one is complete).
pub fn save(dir: &Path, model: &Model, state: &TrainState, progress: &Progress) -> Result<()> {
    let out = AtomicDir::create(dir, &[])?;
    let meta = BTreeMap::new();
    let values: Vec<(String, Vec<usize>, Vec<f32>)> = state
        .params
        .iter()
        .map(|(s, p)| {
            (
                p.name.clone(),
                p.shape.clone(),
                state.value(model, *s).to_vec(),
            )
        })
        .collect();
    write_f32_tensors(&out.join(PARAMS), &values, OutDtype::F32, &meta)
        .map_err(|e| out.rename_error(e))?;
    let moments: Vec<(String, Vec<usize>, Vec<f32>)> = state
        .params
        .iter()
        .flat_map(|(_, p)| {
            [
                (format!("{}.exp_avg", p.name), p.shape.clone(), p.m.clone()),
                (
                    format!("{}.exp_avg_sq", p.name),
                    p.shape.clone(),
                    p.v.clone(),
                ),
            ]
        })
        .collect();
    write_f32_tensors(&out.join(OPTIM), &moments, OutDtype::F32, &meta)
        .map_err(|e| out.rename_error(e))?;
    out.write(
        STATE,
        serde_json::to_string_pretty(progress)
            .expect("json")
            .as_bytes(),
    )?;
    out.commit()
}

/// Restore trainable values and moments into `state` (whose tensors must have the same names
/// and shapes, i.e. the same run configuration) and return the progress.
pub fn load(dir: &Path, model: &mut Model, state: &mut TrainState) -> Result<Progress> {
    let sp = dir.join(STATE);
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
    let progress: Progress = serde_json::from_str(&text)
        .map_err(|e| Error::bad_input(&sp, format!("invalid trainer state: {e}")))?;
    let params = SafetensorsFile::open(&dir.join(PARAMS))?;
    let optim = SafetensorsFile::open(&dir.join(OPTIM))?;
    for k in 0..state.params.len() {
        let (value, p) = state.value_and_state_mut(model, k);
        let name = p.name.clone();
        let read = |f: &SafetensorsFile, n: &str| -> Result<Vec<f32>> {
            let t = f.require(n)?;
            if t.shape != p.shape.as_slice() {
                return Err(Error::bad_input(
                    f.path(),
                    format!(
                        "{n} has shape {:?}, this run expects {:?}: resume with the same options",
                        t.shape, p.shape
                    ),
                ));
            }
            to_f32(n, &t).map_err(|m| Error::bad_input(f.path(), m))
        };
        value.copy_from_slice(&read(&params, &name)?);
        p.m = read(&optim, &format!("{name}.exp_avg"))?;
        p.v = read(&optim, &format!("{name}.exp_avg_sq"))?;
    }
    if params.names().len() != state.params.len() {
        return Err(Error::bad_input(
            params.path(),
            format!(
                "checkpoint has {} tensors, this run trains {}: resume with the same options",
                params.names().len(),
                state.params.len()
            ),
        ));
    }
    Ok(progress)
}

/// The checkpoint to resume from: `path` itself, or the newest `checkpoints/step-N` under it.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(STATE).exists() {
        return Ok(path.to_path_buf());
    }
    let dir = path.join("checkpoints");
    let newest = list(&dir).into_iter().last();
    newest.ok_or_else(|| {
        Error::bad_input(
            path,
            "no checkpoint here (expected trainer_state.json or checkpoints/step-N)",
        )
    })
}

/// Checkpoint directories under `dir`, oldest first.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join(STATE).exists().then(|| (n, e.path()))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, p)| p).collect()
}

//! Training checkpoints written by peft-train (`OUT/checkpoints/step-N/`: trainer_state.json,
//! params.safetensors, optimizer.safetensors; train/checkpoint.rs): progress, what is trained
//! and whether the optimizer state is complete.

use super::config::Context;
use super::report::{CheckpointReport, OptimizerReport};
use crate::io::safetensors_file::SafetensorsFile;
use crate::merge::adapter_dir::AdapterDir;
use crate::train::checkpoint::Progress;
use crate::{Error, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub const STATE: &str = "trainer_state.json";
pub const PARAMS: &str = "params.safetensors";
pub const OPTIM: &str = "optimizer.safetensors";
/// AdamW moments stored per trainable tensor (`<name>.exp_avg`, `<name>.exp_avg_sq`).
pub const MOMENTS: &[&str] = &["exp_avg", "exp_avg_sq"];

pub fn read_progress(dir: &Path) -> Result<Progress> {
    let p = dir.join(STATE);
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::bad_input(&p, format!("invalid trainer state: {e}")))
}

/// The run's adapter config for a checkpoint `OUT/checkpoints/step-N` (written into OUT when
/// the run finished), if there is one.
pub fn run_config(dir: &Path) -> Result<Option<(PathBuf, Context)>> {
    let Some(out) = dir.parent().and_then(Path::parent) else {
        return Ok(None);
    };
    let in_checkpoints = dir
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|n| n == "checkpoints");
    if !in_checkpoints
        || !out.join("adapter_config.json").exists()
        || !out.join("adapter_model.safetensors").exists()
    {
        return Ok(None);
    }
    let adapter = AdapterDir::open(out)?;
    Ok(Some((adapter.config_path(), Context::of(&adapter)?)))
}

fn optimizer_report(dir: &Path, params: &SafetensorsFile) -> Result<OptimizerReport> {
    let path = dir.join(OPTIM);
    if !path.exists() {
        return Ok(OptimizerReport {
            present: false,
            file: None,
            tensors: 0,
            params: 0,
            states: Vec::new(),
            complete: false,
            missing: params.names(),
        });
    }
    let f = SafetensorsFile::open(&path)?;
    let names = f.names();
    let mut states = BTreeSet::new();
    let mut count = 0u64;
    for n in &names {
        if let Some(info) = f.info(n) {
            count += info.shape.iter().product::<usize>() as u64;
        }
        if let Some((_, s)) = n.rsplit_once('.') {
            if MOMENTS.contains(&s) {
                states.insert(s.to_string());
            }
        }
    }
    let missing: Vec<String> = params
        .names()
        .into_iter()
        .filter(|p| MOMENTS.iter().any(|m| !f.contains(&format!("{p}.{m}"))))
        .collect();
    Ok(OptimizerReport {
        present: true,
        file: Some(path.display().to_string()),
        tensors: names.len() as u64,
        params: count,
        states: states.into_iter().collect(),
        complete: missing.is_empty(),
        missing,
    })
}

/// The checkpoint part of the report; the caller analyses params.safetensors like an adapter.
pub fn checkpoint_report(
    dir: &Path,
    params: &SafetensorsFile,
    config_file: Option<&Path>,
) -> Result<CheckpointReport> {
    let p = read_progress(dir)?;
    Ok(CheckpointReport {
        dir: dir.display().to_string(),
        step: p.step,
        epoch: p.epoch,
        batch_in_epoch: p.batch_in_epoch,
        tokens: p.tokens,
        params_file: params.path().display().to_string(),
        trainable_tensors: params.names().len() as u64,
        config_file: config_file.map(|p| p.display().to_string()),
        optimizer: optimizer_report(dir, params)?,
    })
}

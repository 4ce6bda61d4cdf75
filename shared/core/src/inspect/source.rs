//! What the path given to adapter-inspect is: an adapter directory, a training checkpoint, a
//! model folder or a lone safetensors file.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// adapter_config.json + adapter_model.safetensors
    Adapter(PathBuf),
    /// trainer_state.json + params.safetensors (+ optimizer.safetensors)
    Checkpoint(PathBuf),
    /// config.json + model.safetensors (or shards)
    Model(PathBuf),
    /// any other .safetensors file
    File(PathBuf),
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Adapter(_) => "adapter",
            Source::Checkpoint(_) => "checkpoint",
            Source::Model(_) => "model",
            Source::File(_) => "safetensors",
        }
    }
}

fn classify_dir(dir: &Path) -> Option<Source> {
    if dir.join("adapter_config.json").exists() || dir.join("adapter_model.bin").exists() {
        Some(Source::Adapter(dir.to_path_buf()))
    } else if dir.join(super::checkpoint::STATE).exists() {
        Some(Source::Checkpoint(dir.to_path_buf()))
    } else if dir.join("config.json").exists() {
        Some(Source::Model(dir.to_path_buf()))
    } else {
        None
    }
}

/// Classify `path` (a missing path is an I/O error naming it).
pub fn detect(path: &Path) -> Result<Source> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        if let Some(s) = classify_dir(path) {
            return Ok(s);
        }
        // a run's output folder without a final adapter: its newest checkpoint
        if let Some(newest) = crate::train::checkpoint::list(&path.join("checkpoints")).pop() {
            return Ok(Source::Checkpoint(newest));
        }
        return Err(Error::bad_input(
            path,
            "not an adapter directory, checkpoint or model folder (expected adapter_config.json, trainer_state.json or config.json)",
        ));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = path.parent().unwrap_or(Path::new("."));
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let sibling = |f: &str| parent.join(f).exists();
    Ok(match name.as_str() {
        "adapter_config.json" => Source::Adapter(parent.to_path_buf()),
        "adapter_model.safetensors" if sibling("adapter_config.json") => {
            Source::Adapter(parent.to_path_buf())
        }
        "trainer_state.json" => Source::Checkpoint(parent.to_path_buf()),
        "params.safetensors" if sibling(super::checkpoint::STATE) => {
            Source::Checkpoint(parent.to_path_buf())
        }
        "config.json" => Source::Model(parent.to_path_buf()),
        "model.safetensors" | "model.safetensors.index.json" if sibling("config.json") => {
            Source::Model(parent.to_path_buf())
        }
        _ => Source::File(path.to_path_buf()),
    })
}

//! The safetensors files of a model folder (single file or sharded with an index), looked up
//! by tensor name.

use crate::error::{Error, Result};
use crate::io::safetensors_file::{SafetensorsFile, TensorRef};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct WeightFiles {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// tensor name → index into `files`
    index: HashMap<String, usize>,
}

impl WeightFiles {
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let sharded = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if sharded.exists() {
            shard_paths(dir, &sharded)?
        } else if dir.join("pytorch_model.bin").exists() {
            return Err(Error::bad_input(
                dir.join("pytorch_model.bin"),
                "PyTorch pickle checkpoints are not read (unsafe to load); re-save the model with safetensors (save_pretrained(safe_serialization=True))",
            ));
        } else {
            return Err(Error::bad_input(
                &single,
                "no model.safetensors or model.safetensors.index.json in the model folder",
            ));
        };
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for p in paths {
            let f = SafetensorsFile::open(&p)?;
            for name in f.names() {
                if index.insert(name.clone(), files.len()).is_some() {
                    return Err(Error::bad_input(
                        &p,
                        format!("tensor {name} appears in more than one shard"),
                    ));
                }
            }
            files.push(f);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn file_of(&self, name: &str) -> Option<&SafetensorsFile> {
        self.index.get(name).map(|&i| &self.files[i])
    }

    pub fn get(&self, name: &str) -> Option<TensorRef<'_>> {
        self.file_of(name).and_then(|f| f.get(name))
    }

    /// Tensor as f32 with the expected shape, or an error naming file and tensor.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match self.file_of(name) {
            Some(f) => f.f32_checked(name, shape),
            None => Err(Error::bad_input(
                self.files
                    .first()
                    .map(|f| f.path().to_path_buf())
                    .unwrap_or_else(|| self.dir.clone()),
                format!("tensor {name} is missing"),
            )),
        }
    }
}

fn shard_paths(dir: &Path, index_path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_input(index_path, format!("invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::bad_input(index_path, "missing \"weight_map\" object"))?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|s| s.as_str().map(String::from))
        .collect();
    shards.sort();
    shards.dedup();
    for s in &shards {
        if s.contains('/') || s.contains("..") {
            return Err(Error::bad_input(
                index_path,
                format!("shard name {s:?} must be a plain file name"),
            ));
        }
    }
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}

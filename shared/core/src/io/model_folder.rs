//! A Hugging Face model folder read tensor by tensor: config.json, the (possibly sharded)
//! safetensors files, and positioned reads of one tensor at a time.
//!
//! The tools that rewrite whole models (quantize-nf4, adapter-merge) stream through this so
//! that their peak memory is about one tensor, whatever the model size; reads go through
//! `pread` rather than the memory map so the page cache, not our RSS, holds the file.

use crate::error::{Error, Result};
use crate::io::atomic::AtomicDir;
use crate::model::weights::WeightFiles;
use safetensors::Dtype;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub const LLAMA_LINEARS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
pub const GPT2_CONV1D: &[&str] = &["c_attn", "c_proj", "c_fc"];
pub const SUPPORTED: &str = "llama, mistral, qwen2, gpt2";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    LlamaLike,
    Gpt2,
}

/// The files of a model folder: config, tensors and positioned reads of tensor data.
pub struct ModelFolder {
    pub dir: PathBuf,
    pub config: Map<String, Value>,
    pub model_type: String,
    pub family: Family,
    pub weights: WeightFiles,
    /// tensor names in natural order (layer 2 before layer 10)
    pub names: Vec<String>,
    reader: RawReader,
}

impl ModelFolder {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
        if !dir.is_dir() {
            return Err(Error::bad_input(dir, "not a model folder"));
        }
        let cfg_path = dir.join("config.json");
        // A folder without config.json is not a model folder (bad input, as Model::load says).
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::bad_input(
                &cfg_path,
                "config.json is missing: is this a Hugging Face model folder?",
            ),
            _ => Error::io(&cfg_path, e),
        })?;
        let config = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(Error::bad_input(&cfg_path, "not a JSON object")),
            Err(e) => return Err(Error::bad_input(&cfg_path, format!("invalid JSON: {e}"))),
        };
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::bad_input(&cfg_path, "missing \"model_type\""))?
            .to_string();
        let family = match model_type.as_str() {
            "llama" | "mistral" | "qwen2" => Family::LlamaLike,
            "gpt2" => Family::Gpt2,
            other => {
                return Err(Error::bad_input(
                    &cfg_path,
                    format!("model_type {other:?} is not supported; supported: {SUPPORTED}"),
                ))
            }
        };
        let weights = WeightFiles::open(dir)?;
        let mut names: Vec<String> = weights.names().map(String::from).collect();
        names.sort_by_cached_key(|n| natural_key(n));
        check_shapes(&config, family, &weights)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            model_type,
            family,
            weights,
            names,
            reader: RawReader::default(),
        })
    }

    pub fn path_of(&self, name: &str) -> PathBuf {
        self.weights
            .file_of(name)
            .map(|f| f.path().to_path_buf())
            .unwrap_or_else(|| self.dir.clone())
    }

    pub fn info(&self, name: &str) -> (Dtype, Vec<usize>, (usize, usize)) {
        let f = self.weights.file_of(name).expect("listed tensor");
        let i = f.info(name).expect("listed tensor");
        (i.dtype, i.shape.clone(), i.data_offsets)
    }

    /// The bytes of tensor `name`, read from its file (not through the memory map).
    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        let (_, _, (start, end)) = self.info(name);
        self.reader.read(&self.path_of(name), start, end)
    }

    pub fn is_conv1d(&self, module: &str) -> bool {
        self.family == Family::Gpt2 && ends_with_any(module, GPT2_CONV1D)
    }

    pub fn is_linear(&self, module: &str) -> bool {
        match self.family {
            Family::LlamaLike => ends_with_any(module, LLAMA_LINEARS),
            Family::Gpt2 => ends_with_any(module, GPT2_CONV1D),
        }
    }
}

/// The tools that stream a model (quantize-nf4, adapter-merge, adapter-inspect --base) never
/// build the model, so nothing else compares the float weights' shapes with config.json: a
/// tensor of the wrong shape would otherwise be quantized or merged into a model that no loader
/// accepts. 4-bit tensors (U8) are checked by their quant states.
fn check_shapes(config: &Map<String, Value>, family: Family, w: &WeightFiles) -> Result<()> {
    let Ok(c) = crate::model::ModelConfig::from_json(Value::Object(config.clone())) else {
        return Ok(()); // the loaders that need the config report its problems
    };
    let (h, kv, q, i, v) = (c.hidden, c.kv_dim(), c.q_dim(), c.intermediate, c.vocab);
    for name in w.names() {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        let last = module.rsplit('.').next().unwrap_or(module);
        let expected: Option<[usize; 2]> = match family {
            Family::LlamaLike => match last {
                "q_proj" => Some([q, h]),
                "k_proj" | "v_proj" => Some([kv, h]),
                "o_proj" => Some([h, q]),
                "gate_proj" | "up_proj" => Some([i, h]),
                "down_proj" => Some([h, i]),
                "embed_tokens" => Some([v, h]),
                _ => None,
            },
            // Conv1D weights are stored [in, out].
            Family::Gpt2 => match last {
                "c_attn" => Some([h, 3 * h]),
                "c_proj" if module.contains(".attn.") => Some([h, h]),
                "c_fc" => Some([h, i]),
                "c_proj" if module.contains(".mlp.") => Some([i, h]),
                "wte" => Some([v, h]),
                _ => None,
            },
        };
        let (Some(expected), Some(t)) = (expected, w.get(name)) else {
            continue;
        };
        let float = matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64);
        if float && t.shape != expected {
            return Err(Error::bad_input(
                w.file_of(name).map(|f| f.path()).unwrap_or(Path::new("")),
                format!(
                    "tensor {name} has shape {:?}, expected {expected:?} from config.json",
                    t.shape
                ),
            ));
        }
    }
    Ok(())
}

pub fn ends_with_any(module: &str, names: &[&str]) -> bool {
    let last = module.rsplit('.').next().unwrap_or(module);
    names.contains(&last)
}

/// Sort key that orders embedded numbers by value.
pub fn natural_key(s: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_ascii_digit() {
            let mut num = String::new();
            while let Some(&d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                num.push(d);
                chars.next();
            }
            out.push((num.parse().unwrap_or(u64::MAX), String::new()));
        } else {
            let mut text = String::new();
            while let Some(&d) = chars.peek().filter(|d| !d.is_ascii_digit()) {
                text.push(d);
                chars.next();
            }
            out.push((0, text));
        }
    }
    out
}

/// Positioned reads of tensor data, one open handle and data offset per file.
#[derive(Default)]
struct RawReader {
    files: std::sync::Mutex<HashMap<PathBuf, (std::sync::Arc<File>, u64)>>,
}

impl RawReader {
    pub fn read(&self, path: &Path, start: usize, end: usize) -> Result<Vec<u8>> {
        let (file, data_start) = {
            let mut files = self.files.lock().expect("reader lock");
            match files.get(path) {
                Some((f, s)) => (f.clone(), *s),
                None => {
                    let f = File::open(path).map_err(|e| Error::io(path, e))?;
                    let mut len = [0u8; 8];
                    read_at(&f, &mut len, 0).map_err(|e| Error::io(path, e))?;
                    let s = 8 + u64::from_le_bytes(len);
                    let f = std::sync::Arc::new(f);
                    files.insert(path.to_path_buf(), (f.clone(), s));
                    (f, s)
                }
            }
        };
        let mut buf = vec![0u8; end - start];
        read_at(&file, &mut buf, data_start + start as u64).map_err(|e| Error::io(path, e))?;
        Ok(buf)
    }
}

#[cfg(unix)]
fn read_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    f.read_exact_at(buf, offset)
}

#[cfg(not(unix))]
fn read_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = f;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

pub fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

/// Insert `key` before the first key that sorts after it (config.json keys are sorted by
/// transformers; an unsorted file keeps its order and gets the key at the end).
pub fn insert_sorted(map: &mut Map<String, Value>, key: &str, value: Value) {
    map.remove(key);
    let old = std::mem::take(map);
    let mut placed = false;
    for (k, v) in old {
        if !placed && k.as_str() > key {
            map.insert(key.to_string(), value.clone());
            placed = true;
        }
        map.insert(k, v);
    }
    if !placed {
        map.insert(key.to_string(), value);
    }
}

pub fn write_config(dir: &AtomicDir, config: &Map<String, Value>) -> Result<()> {
    let mut text = serde_json::to_string_pretty(config).expect("json");
    text.push('\n');
    dir.write("config.json", text.as_bytes())
}

/// Copy the other files of the model folder (tokenizer, generation config, chat template, ...):
/// every regular top-level file except config.json, safetensors files and their index, and
/// weights in other formats.
pub fn copy_side_files(src: &Path, dir: &AtomicDir) -> Result<()> {
    let entries = std::fs::read_dir(src).map_err(|e| Error::io(src, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(src, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        let skip = name.starts_with('.')
            || name == "config.json"
            || name == "model.safetensors.index.json"
            || [
                ".safetensors",
                ".bin",
                ".pt",
                ".pth",
                ".ckpt",
                ".h5",
                ".msgpack",
                ".gguf",
            ]
            .iter()
            .any(|ext| name.ends_with(ext));
        if !is_file || skip {
            continue;
        }
        std::fs::copy(entry.path(), dir.join(&name))
            .map_err(|e| dir.rename_error(Error::io(dir.join(&name), e)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = vec!["m.layers.10.a", "m.layers.2.a", "m.layers.1.b", "lm_head"];
        v.sort_by_cached_key(|n| natural_key(n));
        assert_eq!(
            v,
            ["lm_head", "m.layers.1.b", "m.layers.2.a", "m.layers.10.a"]
        );
    }

    #[test]
    fn config_key_inserted_in_order() {
        let mut m: Map<String, Value> = serde_json::from_str(r#"{"a":1,"pad":2,"rms":3}"#).unwrap();
        insert_sorted(&mut m, "quantization_config", Value::Null);
        let keys: Vec<&String> = m.keys().collect();
        assert_eq!(keys, ["a", "pad", "quantization_config", "rms"]);
    }

    #[test]
    fn transpose_roundtrip() {
        let x: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let t = transpose(&x, 2, 3);
        assert_eq!(t, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(transpose(&t, 3, 2), x);
    }
}

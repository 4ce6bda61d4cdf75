//! A PEFT adapter directory read without a model: its config and, per adapted module, the
//! tensors a merge, a combination or an inspection needs.
//!
//! Module paths are the base model's (`model.layers.0.self_attn.q_proj`), i.e. the saved key
//! without PEFT's `base_model.model.` prefix and without the tensor suffix.

use crate::error::{Error, Result};
use crate::io::safetensors_file::{check_finite, to_f32, SafetensorsFile};
use crate::train::ia3::Ia3Config;
use crate::train::lora::{pattern_value, scale_of, LoraConfig};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const PREFIX: &str = "base_model.model.";

/// The PEFT method of an adapter directory (`peft_type` in adapter_config.json; ours for
/// bottleneck adapters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeftKind {
    Lora,
    Ia3,
    PrefixTuning,
    PTuning,
    PromptTuning,
    Bottleneck,
    Other(String),
}

impl PeftKind {
    fn parse(s: &str) -> Self {
        match s {
            "LORA" => PeftKind::Lora,
            "IA3" => PeftKind::Ia3,
            "PREFIX_TUNING" => PeftKind::PrefixTuning,
            "P_TUNING" => PeftKind::PTuning,
            "PROMPT_TUNING" => PeftKind::PromptTuning,
            "BOTTLENECK" => PeftKind::Bottleneck,
            other => PeftKind::Other(other.to_string()),
        }
    }

    /// The `peft_type` string.
    pub fn name(&self) -> &str {
        match self {
            PeftKind::Lora => "LORA",
            PeftKind::Ia3 => "IA3",
            PeftKind::PrefixTuning => "PREFIX_TUNING",
            PeftKind::PTuning => "P_TUNING",
            PeftKind::PromptTuning => "PROMPT_TUNING",
            PeftKind::Bottleneck => "BOTTLENECK",
            PeftKind::Other(s) => s,
        }
    }
}

/// One LoRA (or DoRA) module of an adapter, in f32.
#[derive(Clone, Debug)]
pub struct LoraModule {
    pub path: String,
    pub rank: usize,
    pub alpha: f32,
    /// `alpha / r` (or `alpha / √r` with rsLoRA)
    pub scale: f32,
    /// `[r, in]` (for an embedding `[r, num_embeddings]`)
    pub a: Vec<f32>,
    /// `[out, r]` (for an embedding `[embedding_dim, r]`)
    pub b: Vec<f32>,
    pub in_features: usize,
    pub out_features: usize,
    /// `lora_B.bias` (`lora_bias = true`), `[out]`
    pub bias: Option<Vec<f32>>,
    /// DoRA magnitude `[out]`
    pub magnitude: Option<Vec<f32>>,
    /// An embedding (`lora_embedding_A/B`): ΔW is stored transposed, `[num_embeddings, dim]`.
    pub embedding: bool,
}

impl LoraModule {
    /// ΔW = s · B · A as `[out, in]` (for an embedding: `[in = num_embeddings, out = dim]`,
    /// the embedding's own layout).
    pub fn delta(&self) -> Vec<f32> {
        let (o, i, r) = (self.out_features, self.in_features, self.rank);
        let mut d = vec![0f32; o * i];
        if r > 0 {
            crate::kernels::gemm::matmul_nn(&self.b, &self.a, &mut d, o, i, r, false);
        }
        d.iter_mut().for_each(|x| *x *= self.scale);
        if self.embedding {
            crate::kernels::ops::transpose(&d, o, i)
        } else {
            d
        }
    }
}

/// One IA3 vector.
#[derive(Clone, Debug)]
pub struct Ia3Module {
    pub path: String,
    pub l: Vec<f32>,
    /// Scales the input (`[1, in]`) rather than the output (`[out, 1]`).
    pub feedforward: bool,
}

/// An adapter directory: `adapter_config.json` + `adapter_model.safetensors`.
pub struct AdapterDir {
    pub dir: PathBuf,
    pub config: Map<String, Value>,
    pub kind: PeftKind,
    pub file: SafetensorsFile,
}

impl AdapterDir {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
            return Err(Error::bad_input(
                dir,
                "not an adapter directory (expected adapter_config.json + adapter_model.safetensors)",
            ));
        }
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(Error::bad_input(&cfg_path, "not a JSON object")),
            Err(e) => return Err(Error::bad_input(&cfg_path, format!("invalid JSON: {e}"))),
        };
        let kind = match config.get("peft_type").and_then(Value::as_str) {
            Some(t) => PeftKind::parse(t),
            None => return Err(Error::bad_input(&cfg_path, "missing \"peft_type\"")),
        };
        let st = dir.join("adapter_model.safetensors");
        if !st.exists() && dir.join("adapter_model.bin").exists() {
            return Err(Error::bad_input(
                dir.join("adapter_model.bin"),
                "pickled adapters are not read (they can run code); re-save it with safe_serialization=True",
            ));
        }
        let file = SafetensorsFile::open(&st)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            kind,
            file,
        })
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("adapter_config.json")
    }

    pub fn weights_path(&self) -> &Path {
        self.file.path()
    }

    fn bad(&self, msg: impl Into<String>) -> Error {
        Error::bad_input(self.file.path(), msg)
    }

    fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self.file.require(name)?;
        let v = to_f32(name, &t).map_err(|m| self.bad(m))?;
        // Merged or combined, a NaN would spread through a whole weight matrix.
        check_finite(name, &v).map_err(|m| self.bad(m))?;
        Ok((v, t.shape.to_vec()))
    }

    /// The LoRA settings of the config (peft_type must be LORA).
    pub fn lora_config(&self) -> Result<LoraConfig> {
        crate::train::lora::config_from_json(&Value::Object(self.config.clone()))
            .map_err(|m| Error::bad_input(self.config_path(), m))
    }

    pub fn ia3_config(&self) -> Result<Ia3Config> {
        crate::train::ia3::config_from_json(&Value::Object(self.config.clone()))
            .map_err(|m| Error::bad_input(self.config_path(), m))
    }

    /// Every LoRA module, in file order, with shapes checked against each other.
    pub fn lora_modules(&self) -> Result<Vec<LoraModule>> {
        let cfg = self.lora_config()?;
        let mut out = Vec::new();
        for name in self.file.names() {
            let (path, embedding) = if let Some(p) = name.strip_suffix(".lora_A.weight") {
                (p, false)
            } else if let Some(p) = name.strip_suffix(".lora_embedding_A") {
                (p, true)
            } else {
                continue;
            };
            let Some(path) = path.strip_prefix(PREFIX) else {
                return Err(self.bad(format!(
                    "tensor {name} lacks the \"{PREFIX}\" prefix; PEFT would silently ignore this adapter"
                )));
            };
            let b_name = if embedding {
                format!("{PREFIX}{path}.lora_embedding_B")
            } else {
                format!("{PREFIX}{path}.lora_B.weight")
            };
            let (a, sa) = self.f32(&name)?;
            let (b, sb) = self.f32(&b_name)?;
            if sa.len() != 2 || sb.len() != 2 || sa[0] != sb[1] {
                return Err(self.bad(format!(
                    "{name} {sa:?} and {b_name} {sb:?} are not [r, in] and [out, r]"
                )));
            }
            let rank = sa[0];
            // PEFT refuses an adapter whose tensors disagree with its config's r; here
            // alpha / r would silently be computed with the wrong r.
            if self.config.contains_key("r") {
                let want = pattern_value(&cfg.rank_pattern, path)?.unwrap_or(cfg.rank);
                if rank != want {
                    return Err(self.bad(format!(
                        "{name} has rank {rank} but adapter_config.json says r = {want}"
                    )));
                }
            }
            let alpha = pattern_value(&cfg.alpha_pattern, path)?.unwrap_or(cfg.alpha);
            let opt = |suffix: &str| -> Result<Option<Vec<f32>>> {
                let k = format!("{PREFIX}{path}.{suffix}");
                match self.file.get(&k) {
                    Some(t) => {
                        let v = to_f32(&k, &t).map_err(|m| self.bad(m))?;
                        check_finite(&k, &v).map_err(|m| self.bad(m))?;
                        if v.len() != sb[0] {
                            return Err(self.bad(format!(
                                "{k} has {} values; expected {} (lora_B rows)",
                                v.len(),
                                sb[0]
                            )));
                        }
                        Ok(Some(v))
                    }
                    None => Ok(None),
                }
            };
            let magnitude = opt("lora_magnitude_vector")?;
            if cfg.dora && magnitude.is_none() {
                return Err(self.bad(format!(
                    "use_dora is set but {PREFIX}{path}.lora_magnitude_vector is missing"
                )));
            }
            out.push(LoraModule {
                path: path.to_string(),
                rank,
                alpha,
                scale: scale_of(&cfg, rank, alpha),
                a,
                b,
                in_features: sa[1],
                out_features: sb[0],
                bias: opt("lora_B.bias")?,
                magnitude,
                embedding,
            });
        }
        let b_count = self
            .file
            .names()
            .iter()
            .filter(|n| n.ends_with(".lora_B.weight") || n.ends_with(".lora_embedding_B"))
            .count();
        if b_count != out.len() {
            return Err(self.bad(format!(
                "{} lora_B tensors but {} lora_A tensors",
                b_count,
                out.len()
            )));
        }
        Ok(out)
    }

    /// Every IA3 vector, in file order.
    pub fn ia3_modules(&self) -> Result<Vec<Ia3Module>> {
        let cfg = self.ia3_config()?;
        let mut out = Vec::new();
        for name in self.file.names() {
            let Some(path) = name.strip_suffix(".ia3_l") else {
                continue;
            };
            let Some(path) = path.strip_prefix(PREFIX) else {
                return Err(self.bad(format!(
                    "tensor {name} lacks the \"{PREFIX}\" prefix; PEFT would silently ignore this adapter"
                )));
            };
            let (l, shape) = self.f32(&name)?;
            let feedforward = cfg.is_feedforward(path);
            let ok = match (feedforward, shape.as_slice()) {
                (true, [1, _]) | (false, [_, 1]) => true,
                // a 1-element vector cannot tell; trust the config
                _ => false,
            };
            if !ok {
                return Err(self.bad(format!(
                    "{name} has shape {shape:?}; expected {} for a {} target",
                    if feedforward { "[1, in]" } else { "[out, 1]" },
                    if feedforward {
                        "feed-forward"
                    } else {
                        "non-feed-forward"
                    }
                )));
            }
            out.push(Ia3Module {
                path: path.to_string(),
                l,
                feedforward,
            });
        }
        Ok(out)
    }

    /// Tensors that replace base-model tensors outright (`modules_to_save` copies, trained
    /// biases): adapter key → base-model key (`base_layer.` dropped).
    pub fn replacement_tensors(&self) -> BTreeMap<String, String> {
        let method = [
            ".lora_A.weight",
            ".lora_B.weight",
            ".lora_B.bias",
            ".lora_embedding_A",
            ".lora_embedding_B",
            ".lora_magnitude_vector",
            ".ia3_l",
        ];
        self.file
            .names()
            .into_iter()
            .filter(|n| !method.iter().any(|m| n.ends_with(m)))
            .filter_map(|n| {
                let base = n.strip_prefix(PREFIX)?.replace(".base_layer.", ".");
                Some((n, base))
            })
            .collect()
    }
}

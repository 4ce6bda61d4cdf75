//! The report `adapter-inspect` prints: one structure, serialized as the `--json` object and
//! rendered as tables by [`super::text`]. Every key is always present (`null` or `[]` where it
//! does not apply); docs/adapter-inspect.md documents each one.

use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The path given on the command line.
    pub path: String,
    /// "adapter", "safetensors", "model" or "checkpoint".
    pub kind: String,
    /// Human name of the method ("LoRA", "DoRA", "rsLoRA", "IA3", ...), null for models.
    pub method: Option<String>,
    pub files: FilesSummary,
    pub config: Option<ConfigSummary>,
    /// Values stored in the adapter file (adapters, checkpoints' params.safetensors).
    pub trainable_params: Option<u64>,
    pub modules: Vec<ModuleReport>,
    pub other_tensors: Vec<TensorReport>,
    pub prompt: Option<PromptReport>,
    pub model: Option<ModelSummary>,
    pub quantization: Option<QuantReport>,
    pub checkpoint: Option<CheckpointReport>,
    pub check: Option<CheckReport>,
    pub diff: Option<DiffReport>,
    /// The chart written by `--plot`.
    pub plot: Option<String>,
}

/// The tensors read (all safetensors files of the input together).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FilesSummary {
    pub tensors: u64,
    /// Elements of all tensors as stored (4-bit weights: bytes of the packed tensor).
    pub elements: u64,
    /// Bytes of tensor data (headers excluded).
    pub bytes: u64,
    /// Tensor count per safetensors dtype ("F32": 12).
    pub dtypes: BTreeMap<String, u64>,
}

/// The adapter_config.json fields that matter, as found (null when absent).
#[derive(Clone, Debug, Serialize)]
pub struct ConfigSummary {
    pub file: String,
    pub peft_type: String,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    pub r: Option<u64>,
    pub lora_alpha: Option<f64>,
    pub use_rslora: bool,
    pub use_dora: bool,
    /// As written: a list of names, a regex string or "all-linear".
    pub target_modules: Value,
    pub modules_to_save: Vec<String>,
    pub rank_pattern: Value,
    pub alpha_pattern: Value,
    pub layers_to_transform: Value,
    pub feedforward_modules: Value,
    pub num_virtual_tokens: Option<u64>,
    pub variant: Option<String>,
    pub adapter_size: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TensorReport {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub params: u64,
    /// Frobenius norm (null for non-float tensors).
    pub norm: Option<f64>,
}

/// One adapted module (LoRA/DoRA, IA3 vector or bottleneck unit).
#[derive(Clone, Debug, Serialize)]
pub struct ModuleReport {
    /// Module path in the base model (`base_model.model.` removed).
    pub path: String,
    /// First numeric path segment (the block index).
    pub layer: Option<usize>,
    /// "lora", "dora", "lora_embedding", "ia3", "bottleneck".
    pub method: String,
    /// Whether the tensor keys carry PEFT's `base_model.model.` prefix.
    pub prefixed: bool,
    pub tensors: Vec<TensorReport>,
    /// dtype of the module's tensors ("mixed" when they differ).
    pub dtype: String,
    pub params: u64,
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
    /// LoRA scaling s (alpha/r, alpha/√r with rsLoRA); null without a config.
    pub scale: Option<f64>,
    pub in_features: Option<usize>,
    pub out_features: Option<usize>,
    pub delta_norm: Option<f64>,
    /// What `delta_norm` measures: "s*B*A", "B*A" (no config), "l-1", "(l-1)*W".
    pub delta_norm_of: Option<String>,
    /// Largest singular values of ΔW (at most 8), descending.
    pub singular_values: Vec<f64>,
    /// #{σᵢ > σ₁·1e-3}.
    pub numerical_rank: Option<usize>,
    /// exp(H(σ/Σσ)) (Roy & Vetterli).
    pub effective_rank: Option<f64>,
    /// DoRA: ‖m‖₂ of the magnitude vector.
    pub magnitude_norm: Option<f64>,
    pub lora_bias: bool,
    /// IA3: scales the input ([1, in]) rather than the output ([out, 1]).
    pub feedforward: Option<bool>,
    /// IA3: smallest / largest entry of l.
    pub vector_min: Option<f64>,
    pub vector_max: Option<f64>,
    /// NaN or infinite values in the module's tensors (spectrum skipped when > 0).
    pub non_finite: u64,
}

/// Prompt-learning adapters: the `prompt_embeddings` tensor.
#[derive(Clone, Debug, Serialize)]
pub struct PromptReport {
    pub num_virtual_tokens: usize,
    pub shape: Vec<usize>,
    pub norm: f64,
    /// ‖row‖ of each virtual token.
    pub token_norms: Vec<f64>,
    /// Prefix tuning: per layer, ‖keys‖ and ‖values‖ of the prefix (needs num_layers and
    /// token_dim in the config); empty otherwise.
    pub layers: Vec<PrefixLayerReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PrefixLayerReport {
    pub layer: usize,
    pub key_norm: f64,
    pub value_norm: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelSummary {
    pub model_type: String,
    pub architectures: Value,
    pub hidden_size: Option<u64>,
    pub num_hidden_layers: Option<u64>,
    pub vocab_size: Option<u64>,
    pub dtype: Option<String>,
    /// Parameters (4-bit weights counted at their original size; quantization statistics
    /// are not parameters).
    pub parameters: u64,
    /// Bytes of tensor data on disk.
    pub stored_bytes: u64,
    /// stored_bytes × 8 / parameters.
    pub bits_per_param: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct QuantReport {
    /// "bitsandbytes" (from config.json, or inferred from the tensors).
    pub quant_method: String,
    /// "nf4", "fp4" or "mixed".
    pub quant_type: String,
    /// Block size (null when the weights differ).
    pub blocksize: Option<usize>,
    pub double_quant: Option<bool>,
    /// `bnb_4bit_compute_dtype` of config.json.
    pub compute_dtype: Option<String>,
    /// `bnb_4bit_quant_storage` of config.json.
    pub quant_storage: Option<String>,
    /// dtype of the original weights (from the quant states).
    pub original_dtype: Option<String>,
    pub weights_4bit: u64,
    pub params_4bit: u64,
    /// Bytes of every tensor that makes up the 4-bit weights (packed data, absmax, code tables,
    /// nested statistics, JSON states).
    pub bytes_4bit: u64,
    pub bits_per_param_4bit: f64,
    /// Weights of the linear layers not stored 4-bit (e.g. lm_head).
    pub unquantized_linears: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckpointReport {
    pub dir: String,
    pub step: u64,
    pub epoch: u64,
    pub batch_in_epoch: u64,
    pub tokens: u64,
    pub params_file: String,
    pub trainable_tensors: u64,
    /// The adapter_config.json used for scales (the run's output folder), if found.
    pub config_file: Option<String>,
    pub optimizer: OptimizerReport,
}

#[derive(Clone, Debug, Serialize)]
pub struct OptimizerReport {
    pub present: bool,
    pub file: Option<String>,
    pub tensors: u64,
    pub params: u64,
    /// Moment names found (suffixes: "exp_avg", "exp_avg_sq").
    pub states: Vec<String>,
    /// Every trainable tensor has every moment.
    pub complete: bool,
    /// Trainable tensors lacking a moment.
    pub missing: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    /// Stable code: missing_prefix, missing_module, shape_mismatch, unknown_tensor,
    /// gguf_incompatible, unmatched_target, untrained_target.
    pub code: String,
    /// "error" (breaks or silently disables loading) or "warning".
    pub severity: String,
    pub module: Option<String>,
    pub tensor: Option<String>,
    pub message: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub base: String,
    pub ok: bool,
    pub errors: u64,
    pub warnings: u64,
    /// Problems per code.
    pub counts: BTreeMap<String, u64>,
    pub problems: Vec<Problem>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiffModule {
    pub path: String,
    pub layer: Option<usize>,
    /// ⟨ΔW₁, ΔW₂⟩ / (‖ΔW₁‖ ‖ΔW₂‖); null when a norm is 0 or the shapes differ.
    pub cosine: Option<f64>,
    /// Entries where both are non-zero with opposite signs, over all entries.
    pub sign_conflict_rate: Option<f64>,
    pub norm: f64,
    pub other_norm: f64,
    /// Why the module was not compared (shapes differ), else null.
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiffReport {
    pub other: String,
    pub compared: u64,
    pub mean_cosine: Option<f64>,
    pub mean_sign_conflict_rate: Option<f64>,
    pub modules: Vec<DiffModule>,
    pub only_here: Vec<String>,
    pub only_other: Vec<String>,
}

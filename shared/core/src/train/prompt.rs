//! Prompt tuning (Lester et al. 2021): trainable virtual token embeddings put in front of every
//! sequence's input, with PEFT's semantics and file format (`PROMPT_TUNING`,
//! `prompt_embeddings [n, hidden]`).
//!
//! The virtual tokens take positions 0..n and the sequence's tokens follow them; the last
//! virtual token predicts the first real one (PEFT pads the labels with n × −100 in front).
//! Initialization ([`PromptInit`]): random N(0, 1) (PEFT's `RANDOM`, torch.nn.Embedding's
//! init), the embeddings of a text's tokens (`TEXT`: cut to n, or repeated when shorter), or the
//! embeddings of n token ids drawn uniformly, with replacement, from the whole embedding matrix
//! (`SAMPLE_VOCAB`, PEFT's `torch.randint(0, num_embeddings, (n,))`; our generator, not torch's).

use super::adapter_files::{sorted_json, write_adapter};
use super::params::{ParamState, Slot, TrainState};
use crate::error::{Error, Result};
use crate::io::safetensors_file::{to_f32, SafetensorsFile};
use crate::model::hooks::InputPrefix;
use crate::model::Model;
use crate::rng::Rng;
use serde_json::{json, Value};
use std::path::Path;

/// How the virtual tokens start (PEFT's `prompt_tuning_init`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PromptInit {
    #[default]
    Random,
    /// From [`PromptConfig::init_text`] (which must be set).
    Text,
    SampleVocab,
}

impl PromptInit {
    /// `random`, `text` or `sample-vocab` (PEFT's names, any case, `_` for `-`, also work).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "random" => Ok(Self::Random),
            "text" => Ok(Self::Text),
            "sample-vocab" => Ok(Self::SampleVocab),
            _ => Err(Error::usage(format!(
                "unknown --prompt-init {s}; supported: random, text, sample-vocab"
            ))),
        }
    }

    /// The value of `prompt_tuning_init` in adapter_config.json.
    pub fn peft_name(self) -> &'static str {
        match self {
            Self::Random => "RANDOM",
            Self::Text => "TEXT",
            Self::SampleVocab => "SAMPLE_VOCAB",
        }
    }

    /// What [`attach`] and [`config_json`] use for `cfg`: `TEXT` when it has an init text,
    /// else `RANDOM`.
    pub fn of(cfg: &PromptConfig) -> Self {
        if cfg.init_text.is_some() {
            Self::Text
        } else {
            Self::Random
        }
    }
}

#[derive(Clone, Debug)]
pub struct PromptConfig {
    pub num_virtual_tokens: usize,
    /// `TEXT` initialization: the text and its token ids (tokenized without special tokens).
    pub init_text: Option<(String, Vec<u32>)>,
    pub base_model_name_or_path: Option<String>,
}

/// The trainable virtual tokens of a run.
#[derive(Clone, Debug)]
pub struct PromptParams {
    pub n: usize,
    /// `[n, hidden]`
    pub emb: Vec<f32>,
}

const PARAM: &str = "prompt_encoder.default.embedding.weight";

/// Token ids of the text initialization as PEFT takes them: cut to n, or repeated then cut.
pub fn init_ids(text_ids: &[u32], n: usize) -> Vec<u32> {
    text_ids.iter().copied().cycle().take(n).collect()
}

/// `SAMPLE_VOCAB`: n token ids drawn uniformly, with replacement, from `0..vocab`.
pub fn sample_vocab_ids(vocab: usize, n: usize, rng: &mut Rng) -> Vec<u32> {
    (0..n).map(|_| rng.below(vocab) as u32).collect()
}

/// Build the virtual tokens (`TEXT` when `cfg` has an init text, else `RANDOM`) and register
/// them.
pub fn attach(
    model: &Model,
    state: &mut TrainState,
    cfg: &PromptConfig,
    rng: &mut Rng,
) -> Result<()> {
    attach_with(model, state, cfg, PromptInit::of(cfg), rng)
}

/// Build the virtual tokens with initialization `init` and register them.
pub fn attach_with(
    model: &Model,
    state: &mut TrainState,
    cfg: &PromptConfig,
    init: PromptInit,
    rng: &mut Rng,
) -> Result<()> {
    let (n, h) = (cfg.num_virtual_tokens, model.config.hidden);
    if n == 0 {
        return Err(Error::usage("--num-virtual-tokens must be at least 1"));
    }
    let rows = |ids: &[u32]| -> Vec<f32> {
        ids.iter()
            .flat_map(|&id| model.embed[id as usize * h..(id as usize + 1) * h].to_vec())
            .collect()
    };
    let emb = match (init, &cfg.init_text) {
        (PromptInit::Text, Some((text, ids))) => {
            if ids.is_empty() {
                return Err(Error::usage(format!(
                    "--prompt-init-text {text:?} has no tokens"
                )));
            }
            rows(&init_ids(ids, n))
        }
        (PromptInit::Text, None) => {
            return Err(Error::usage("--prompt-init text needs --prompt-init-text"))
        }
        (_, Some(_)) => {
            return Err(Error::usage(format!(
                "--prompt-init-text goes with --prompt-init text, not {}",
                init.peft_name().to_ascii_lowercase().replace('_', "-")
            )))
        }
        // PEFT samples from word_embeddings.num_embeddings: the embedding matrix's rows.
        (PromptInit::SampleVocab, None) => rows(&sample_vocab_ids(model.embed.len() / h, n, rng)),
        (PromptInit::Random, None) => (0..n * h).map(|_| rng.normal()).collect(),
    };
    set_trainable(state, PromptParams { n, emb });
    Ok(())
}

/// Make `p` the run's trainable prompt.
pub fn set_trainable(state: &mut TrainState, p: PromptParams) {
    let h = p.emb.len() / p.n.max(1);
    state.add(
        Slot::PromptEmbedding,
        ParamState::new(PARAM.to_string(), vec![p.n, h], true),
    );
    state.prompt = Some(p);
}

/// adapter_config.json as PEFT 0.21 writes it for prompt tuning (`prompt_tuning_init_text` and
/// `tokenizer_name_or_path` are set for `TEXT` only, as PEFT's config requires).
pub fn config_json(cfg: &PromptConfig, init: PromptInit, model: &Model, task_type: &str) -> String {
    let c = &model.config;
    let text = cfg.init_text.as_ref().filter(|_| init == PromptInit::Text);
    let v = json!({
        "auto_mapping": null,
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "inference_mode": true,
        "modules_to_save": null,
        "num_attention_heads": c.heads,
        "num_layers": c.layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": init.peft_name(),
        "prompt_tuning_init_text": text.map(|(t, _)| t.clone()),
        "revision": null,
        "task_type": task_type,
        "token_dim": c.hidden,
        "tokenizer_kwargs": null,
        "tokenizer_name_or_path": text.and(cfg.base_model_name_or_path.clone()),
    });
    sorted_json(v)
}

/// Write the adapter (`prompt_embeddings`).
pub fn save_adapter(
    dir: &Path,
    cfg: &PromptConfig,
    init: PromptInit,
    model: &Model,
    state: &TrainState,
    task_type: &str,
) -> Result<()> {
    let p = state.prompt.as_ref().expect("prompt");
    let tensor = (
        "prompt_embeddings".to_string(),
        vec![p.n, model.config.hidden],
        p.emb.clone(),
    );
    write_adapter(dir, &[tensor], &config_json(cfg, init, model, task_type))
}

/// Read a PEFT prompt-tuning adapter into `state` (trainable).
pub fn load_adapter(dir: &Path, cfg: &Value, model: &Model, state: &mut TrainState) -> Result<()> {
    let h = model.config.hidden;
    let cfg_path = dir.join("adapter_config.json");
    let st_path = dir.join("adapter_model.safetensors");
    let n = cfg
        .get("num_virtual_tokens")
        .and_then(Value::as_u64)
        .ok_or_else(|| Error::bad_input(&cfg_path, "num_virtual_tokens is missing"))?
        as usize;
    let file = SafetensorsFile::open(&st_path)?;
    let t = file.require("prompt_embeddings")?;
    if *t.shape != [n, h] {
        return Err(Error::bad_input(
            &st_path,
            format!(
                "prompt_embeddings has shape {:?}, expected [{n}, {h}] (num_virtual_tokens × hidden)",
                t.shape
            ),
        ));
    }
    let emb = to_f32("prompt_embeddings", &t).map_err(|m| Error::bad_input(&st_path, m))?;
    set_trainable(state, PromptParams { n, emb });
    Ok(())
}

/// The virtual tokens as an inference hook.
pub struct PromptHook {
    p: PromptParams,
}

impl InputPrefix for PromptHook {
    fn embeddings(&self) -> (&[f32], usize) {
        (&self.p.emb, self.p.n)
    }
}

/// Install the prompt of `state` into adapter slot `slot`.
pub fn install(model: &mut Model, state: TrainState, slot: usize) {
    let Some(p) = state.prompt else { return };
    if model.input_prefixes.len() <= slot {
        model.input_prefixes.resize_with(slot + 1, || None);
    }
    model.input_prefixes[slot] = Some(Box::new(PromptHook { p }));
}

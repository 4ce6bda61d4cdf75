//! The adapter's configuration as an inspection uses it: the method, the parsed LoRA / IA3
//! settings (scales, feed-forward targets) and the summary shown to the user.

use super::report::ConfigSummary;
use crate::merge::adapter_dir::{AdapterDir, PeftKind};
use crate::train::ia3::Ia3Config;
use crate::train::lora::LoraConfig;
use crate::Result;
use serde_json::{Map, Value};
use std::path::PathBuf;

/// What is known about the method of the tensors being inspected.
#[derive(Clone, Debug, Default)]
pub struct Context {
    pub config_path: Option<PathBuf>,
    pub config: Option<Map<String, Value>>,
    pub kind: Option<PeftKind>,
    pub lora: Option<LoraConfig>,
    pub ia3: Option<Ia3Config>,
}

impl Context {
    /// The context of an opened adapter directory (its config parsed for its method).
    pub fn of(adapter: &AdapterDir) -> Result<Self> {
        let (lora, ia3) = match adapter.kind {
            PeftKind::Lora => (Some(adapter.lora_config()?), None),
            PeftKind::Ia3 => (None, Some(adapter.ia3_config()?)),
            _ => (None, None),
        };
        Ok(Self {
            config_path: Some(adapter.config_path()),
            config: Some(adapter.config.clone()),
            kind: Some(adapter.kind.clone()),
            lora,
            ia3,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.config.as_ref().and_then(|c| c.get(key))
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    pub fn summary(&self) -> Option<ConfigSummary> {
        let cfg = self.config.as_ref()?;
        let s = |k: &str| cfg.get(k).and_then(Value::as_str).map(String::from);
        let b = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
        let v = |k: &str| cfg.get(k).cloned().unwrap_or(Value::Null);
        Some(ConfigSummary {
            file: self
                .config_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            peft_type: self.kind.as_ref().map(|k| k.name().to_string())?,
            task_type: s("task_type"),
            base_model_name_or_path: s("base_model_name_or_path"),
            r: cfg.get("r").and_then(Value::as_u64),
            lora_alpha: cfg.get("lora_alpha").and_then(Value::as_f64),
            use_rslora: b("use_rslora"),
            use_dora: b("use_dora"),
            target_modules: v("target_modules"),
            modules_to_save: cfg
                .get("modules_to_save")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            rank_pattern: v("rank_pattern"),
            alpha_pattern: v("alpha_pattern"),
            layers_to_transform: v("layers_to_transform"),
            feedforward_modules: v("feedforward_modules"),
            num_virtual_tokens: cfg.get("num_virtual_tokens").and_then(Value::as_u64),
            variant: s("variant"),
            adapter_size: cfg.get("adapter_size").and_then(Value::as_u64),
        })
    }

    /// Human name of the method.
    pub fn method(&self) -> Option<String> {
        let kind = self.kind.as_ref()?;
        Some(match kind {
            PeftKind::Lora => {
                let lora = self.lora.as_ref();
                let dora = lora.is_some_and(|c| c.dora);
                let rs = lora.is_some_and(|c| c.rslora);
                match (dora, rs) {
                    (true, true) => "DoRA (rsLoRA scaling)",
                    (true, false) => "DoRA",
                    (false, true) => "rsLoRA",
                    (false, false) => "LoRA",
                }
                .to_string()
            }
            PeftKind::Ia3 => "IA3".into(),
            PeftKind::PrefixTuning => "prefix tuning (P-Tuning v2)".into(),
            PeftKind::PTuning => "P-tuning".into(),
            PeftKind::PromptTuning => "prompt tuning".into(),
            PeftKind::Bottleneck => match self.get("variant").and_then(Value::as_str) {
                Some(v) => format!("bottleneck adapter ({v})"),
                None => "bottleneck adapter".into(),
            },
            PeftKind::Other(s) => s.clone(),
        })
    }
}

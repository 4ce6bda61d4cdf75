//! A model folder's tokenizer: tokenizer.json (fast tokenizer), the special tokens and BOS/EOS
//! rules of tokenizer_config.json, and its chat template (rendered with minijinja, configured
//! like transformers' Jinja environment).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// Some(flag) when tokenizer_config.json says whether to add BOS/EOS; None = leave it to
    /// tokenizer.json's post-processor (transformers ≥ 5 writes no flags).
    add_bos: Option<bool>,
    add_eos: Option<bool>,
    pub chat_template: Option<String>,
}

impl TextTokenizer {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::bad_input(
                &path,
                "tokenizer.json is missing (peftkit reads Hugging Face fast tokenizers)",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::bad_input(&path, format!("cannot read tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| Error::bad_input(&cfg_path, format!("invalid JSON: {e}")))?
        } else {
            Value::Null
        };
        let token = |k: &str| -> Option<String> {
            match cfg.get(k)? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content")?.as_str().map(String::from),
                _ => None,
            }
        };
        let mut chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: use "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(String::from)),
            _ => None,
        };
        if chat_template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            if jinja.exists() {
                chat_template =
                    Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
            }
        }
        Ok(Self {
            inner,
            path,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            pad_token: token("pad_token"),
            add_bos: cfg.get("add_bos_token").and_then(Value::as_bool),
            add_eos: cfg.get("add_eos_token").and_then(Value::as_bool),
            chat_template,
        })
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_id(t))
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.token_id(t))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokenize as transformers' `tokenizer(text)` does: BOS/EOS as the tokenizer's config says.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if self.add_bos.is_none() && self.add_eos.is_none() {
            return self.encode_raw(text, true);
        }
        let mut ids = self.encode_raw(text, false)?;
        if self.add_bos == Some(true) {
            if let Some(b) = self.bos_id() {
                ids.insert(0, b);
            }
        }
        if self.add_eos == Some(true) {
            if let Some(e) = self.eos_id() {
                ids.push(e);
            }
        }
        Ok(ids)
    }

    /// Tokenize text that already holds its special tokens (e.g. a rendered chat template),
    /// as `tokenizer(text, add_special_tokens=False)`.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_raw(text, false)
    }

    fn encode_raw(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::bad_input(&self.path, format!("tokenization failed: {e}")))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::bad_input(&self.path, format!("decoding failed: {e}")))
    }

    /// Render the chat template, as transformers' `apply_chat_template(tokenize=False)`.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::bad_input(
                &self.path,
                "the tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)",
            )
        })?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
        .map_err(|e| Error::bad_input(&self.path, format!("chat template: {e}")))
    }
}

/// Render a Hugging Face chat template. transformers uses Jinja2 with trim_blocks and
/// lstrip_blocks, `raise_exception` and `strftime_now`; templates call Python string methods,
/// which minijinja-contrib's pycompat layer provides.
pub fn render_chat_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> std::result::Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| e.to_string())?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_function("strftime_now", |_fmt: String| -> String {
        // Templates use it to print today's date in system prompts; a fixed, documented value
        // keeps rendering reproducible.
        "26 Jul 2024".to_string()
    });
    env.add_template("chat", template)
        .map_err(|e| e.to_string())?;
    let tmpl = env.get_template("chat").map_err(|e| e.to_string())?;
    tmpl.render(minijinja::context! {
        messages => minijinja::Value::from(minijinja::value::Serde(messages)),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| e.to_string())
}

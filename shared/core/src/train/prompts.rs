//! Prompts for on-policy training (ppo-train): the query half of a conversation, tokenized
//! the way the policy will see it at generation time.
//!
//! Accepted records (JSONL, JSON array, or .txt with one prompt per line):
//! - `{"prompt": "..."}` or `{"query": "..."}` (TRL), `{"text": "..."}`, or a bare JSON string:
//!   plain text, tokenized with the tokenizer's BOS/EOS settings;
//! - `{"prompt": [{role, content}, ...]}` or `{"messages": [...]}`: rendered with the chat
//!   template and the generation prompt, trailing assistant turns dropped;
//! - `{"conversations": [{from, value}, ...]}` (ShareGPT, LLaMA-Factory pairs): as messages;
//! - `{"instruction", "input"?}` (Alpaca): the Stanford prompt.

use super::data::{alpaca_prompt, parse_messages, parse_sharegpt, tok_err};
use crate::data::{keys_hint, read_records, read_utf8};
use crate::error::{Error, Result};
use crate::tokenizer::{Message, TextTokenizer};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct Prompt {
    pub ids: Vec<u32>,
    /// Line (or array element) of the file it came from.
    pub line: usize,
    /// The record itself (grpo-train's reward functions read its other fields).
    pub record: Value,
}

#[derive(Clone, Debug)]
pub struct PromptOptions {
    /// Prompts longer than this many tokens are dropped (TRL filters them the same way).
    pub max_len: usize,
    pub skip_bad_lines: bool,
}

#[derive(Clone, Debug, Default)]
pub struct PromptStats {
    pub records: usize,
    pub prompts: usize,
    pub dropped_long: usize,
    pub skipped_bad_lines: usize,
}

type RecResult<T> = std::result::Result<T, String>;

/// Load and tokenize every prompt of `path`.
pub fn load_prompts(
    path: &Path,
    tok: &TextTokenizer,
    opts: &PromptOptions,
) -> Result<(Vec<Prompt>, PromptStats)> {
    let is_txt = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("txt"));
    let mut stats = PromptStats::default();
    let records: Vec<(usize, Value)> = if is_txt {
        read_utf8(path)?
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, Value::String(l.to_string())))
            .collect()
    } else {
        let (r, skipped) = read_records(path, opts.skip_bad_lines)?;
        stats.skipped_bad_lines = skipped;
        r.into_iter().map(|r| (r.line, r.value)).collect()
    };
    stats.records = records.len();
    let mut out = Vec::new();
    for (line, v) in records {
        match prompt_ids(tok, &v) {
            Ok(ids) if ids.len() > opts.max_len => stats.dropped_long += 1,
            Ok(ids) => out.push(Prompt {
                ids,
                line,
                record: v,
            }),
            Err(_) if opts.skip_bad_lines => stats.skipped_bad_lines += 1,
            Err(e) => {
                return Err(Error::bad_input(
                    path,
                    format!("line {line}: {e}; fix the record or pass --skip-bad-lines"),
                ))
            }
        }
    }
    stats.prompts = out.len();
    if out.is_empty() {
        return Err(Error::bad_input(
            path,
            format!(
                "no usable prompt ({} records, {} longer than {} tokens)",
                stats.records, stats.dropped_long, opts.max_len
            ),
        ));
    }
    Ok((out, stats))
}

/// The token ids of one record's prompt.
pub fn prompt_ids(tok: &TextTokenizer, v: &Value) -> RecResult<Vec<u32>> {
    let ids = match v {
        Value::String(s) => text(tok, s)?,
        Value::Object(o) => {
            if let Some(p) = o.get("prompt").or_else(|| o.get("query")) {
                match p {
                    Value::String(s) => text(tok, s)?,
                    Value::Array(list) => chat(tok, parse_messages(list, "prompt")?)?,
                    _ => return Err("\"prompt\" must be a string or a list of messages".into()),
                }
            } else if let Some(Value::Array(list)) = o.get("messages") {
                chat(tok, parse_messages(list, "messages")?)?
            } else if let Some(Value::Array(list)) = o.get("conversations") {
                chat(tok, parse_sharegpt(list)?)?
            } else if let Some(instr) = o.get("instruction") {
                let instr = instr.as_str().ok_or("\"instruction\" must be a string")?;
                let input = match o.get("input") {
                    None | Some(Value::Null) => "",
                    Some(Value::String(s)) => s.as_str(),
                    Some(_) => return Err("\"input\" must be a string".into()),
                };
                text(tok, &alpaca_prompt(instr, input))?
            } else if let Some(Value::String(s)) = o.get("text") {
                text(tok, s)?
            } else {
                return Err(format!(
                    "expected \"prompt\", \"query\", \"messages\", \"conversations\", \
                     \"instruction\" or \"text\"{}",
                    keys_hint(v)
                ));
            }
        }
        _ => return Err("a prompt record must be a JSON object or string".into()),
    };
    if ids.is_empty() {
        return Err("the prompt is empty".into());
    }
    Ok(ids)
}

fn text(tok: &TextTokenizer, s: &str) -> RecResult<Vec<u32>> {
    tok.encode(s).map_err(tok_err)
}

/// A conversation up to the last non-assistant turn, rendered with the generation prompt.
fn chat(tok: &TextTokenizer, mut msgs: Vec<Message>) -> RecResult<Vec<u32>> {
    while msgs.last().is_some_and(|m| m.role == "assistant") {
        msgs.pop();
    }
    if msgs.is_empty() {
        return Err("the conversation has no user turn to answer".into());
    }
    let rendered = tok.apply_chat_template(&msgs, true).map_err(tok_err)?;
    tok.encode_plain(&rendered).map_err(tok_err)
}

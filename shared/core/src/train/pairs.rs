//! Preference data: pairs of a chosen and a rejected completion of one prompt, for reward
//! models and DPO (TRL's preference dataset type, formats.md §6).
//!
//! Accepted records (JSON list or JSON lines):
//! * `{"prompt"?: str, "chosen": str, "rejected": str, "margin"?: number}` — text; the prompt
//!   is tokenized with BOS as configured, each completion gets EOS appended (as TRL does);
//! * `{"prompt"?: [messages], "chosen": [messages], "rejected": [messages]}` — conversational,
//!   rendered with the model's chat template (without an explicit prompt the shared leading
//!   messages are the prompt);
//! * LLaMA-Factory's `{"conversations": [{from, value}], "chosen": {from, value},
//!   "rejected": {from, value}}` (its dpo_en_demo.json).
//!
//! Labels are −100 on the prompt, so a sequence's labelled tokens are its completion (what DPO
//! sums log-probabilities over). Precomputed reference log-probabilities can ride along as
//! `ref_chosen_logps` / `ref_rejected_logps` (TRL's column names).

use super::data::{chat_example, parse_messages, parse_sharegpt, prompt_target_example, Example};
use crate::data::read_records;
use crate::error::{Error, Result};
use crate::tokenizer::{Message, TextTokenizer};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct Pair {
    pub chosen: Example,
    pub rejected: Example,
    pub margin: f32,
    /// Reference log-probabilities (chosen, rejected) given in the data.
    pub reference: Option<(f64, f64)>,
}

#[derive(Clone, Debug)]
pub struct PairOptions {
    pub max_len: usize,
    /// Drop over-long pairs (TRL's reward trainer) instead of truncating them (keeping the start).
    pub drop_long: bool,
    /// Record field holding a per-pair margin (reward models).
    pub margin_column: Option<String>,
    pub skip_bad_lines: bool,
}

#[derive(Clone, Debug, Default)]
pub struct PairStats {
    pub records: usize,
    pub pairs: usize,
    pub truncated: usize,
    pub dropped_long: usize,
    /// Pairs whose completion lost every token to truncation.
    pub dropped_empty: usize,
    pub skipped_bad_lines: usize,
}

type RecResult<T> = std::result::Result<T, String>;

fn single_message(v: &Value, what: &str) -> RecResult<Message> {
    match v {
        Value::Object(_) => parse_sharegpt(std::slice::from_ref(v))
            .map(|mut m| m.remove(0))
            .map_err(|e| format!("{what}: {e}")),
        _ => Err(format!("{what} must be a {{\"from\", \"value\"}} object")),
    }
}

/// Messages of a conversational field (role/content or from/value lists).
fn messages(v: &[Value], what: &str) -> RecResult<Vec<Message>> {
    if v.first().is_some_and(|m| m.get("from").is_some()) {
        parse_sharegpt(v)
    } else {
        parse_messages(v, what)
    }
}

fn convert(tok: &TextTokenizer, v: &Value, margin_column: Option<&str>) -> RecResult<Pair> {
    let obj = v
        .as_object()
        .ok_or("a preference record must be a JSON object")?;
    let margin = match margin_column {
        Some(col) => match obj.get(col) {
            Some(m) => {
                m.as_f64()
                    .ok_or_else(|| format!("\"{col}\" must be a number"))? as f32
            }
            None => return Err(format!("no \"{col}\" (the --margin-column)")),
        },
        None => 0.0,
    };
    let reference = match (obj.get("ref_chosen_logps"), obj.get("ref_rejected_logps")) {
        (Some(c), Some(r)) => Some((
            c.as_f64().ok_or("ref_chosen_logps must be a number")?,
            r.as_f64().ok_or("ref_rejected_logps must be a number")?,
        )),
        _ => None,
    };
    let (chosen, rejected) = match (obj.get("chosen"), obj.get("rejected")) {
        (Some(c), Some(r)) => (c, r),
        _ => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            return Err(format!(
                "a preference record needs \"chosen\" and \"rejected\" (found keys {keys:?})"
            ));
        }
    };
    let (c, r) = if let Some(conv) = obj.get("conversations") {
        // LLaMA-Factory: the conversation so far, then one chosen / rejected message each.
        let list = conv.as_array().ok_or("\"conversations\" must be a list")?;
        let prompt = parse_sharegpt(list)?;
        let mut cm = prompt.clone();
        cm.push(single_message(chosen, "chosen")?);
        let mut rm = prompt.clone();
        rm.push(single_message(rejected, "rejected")?);
        (
            chat_example(tok, &cm, prompt.len(), false)?,
            chat_example(tok, &rm, prompt.len(), false)?,
        )
    } else {
        match (obj.get("prompt"), chosen, rejected) {
            (p, Value::String(c), Value::String(r)) => {
                let prompt = match p {
                    Some(Value::String(s)) => s.as_str(),
                    None => "",
                    Some(_) => {
                        return Err("\"prompt\" must be a string when chosen/rejected are".into())
                    }
                };
                (
                    prompt_target_example(tok, prompt, c, false)?,
                    prompt_target_example(tok, prompt, r, false)?,
                )
            }
            (p, Value::Array(c), Value::Array(r)) => {
                let c = messages(c, "chosen")?;
                let r = messages(r, "rejected")?;
                let (cm, rm, n_prompt) = match p {
                    Some(Value::Array(p)) => {
                        let p = messages(p, "prompt")?;
                        let n = p.len();
                        let mut cm = p.clone();
                        cm.extend(c);
                        let mut rm = p;
                        rm.extend(r);
                        (cm, rm, n)
                    }
                    None => {
                        // implicit prompt: the messages both share
                        let n = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
                        (c, r, n)
                    }
                    Some(_) => {
                        return Err(
                            "\"prompt\" must be a message list when chosen/rejected are".into()
                        )
                    }
                };
                if tok.chat_template.is_none() {
                    return Err("conversational pairs need the model's chat template, and the tokenizer has none".into());
                }
                (
                    chat_example(tok, &cm, n_prompt, false)?,
                    chat_example(tok, &rm, n_prompt, false)?,
                )
            }
            _ => {
                return Err(
                    "\"chosen\" and \"rejected\" must both be strings or both message lists".into(),
                )
            }
        }
    };
    Ok(Pair {
        chosen: c,
        rejected: r,
        margin,
        reference,
    })
}

/// Truncate an example to `max_len` (keeping the start); false when no label survives.
fn fit(ex: &mut Example, max_len: usize) -> bool {
    ex.ids.truncate(max_len);
    ex.labels.truncate(max_len);
    ex.labels.iter().skip(1).any(|&l| l != -100)
}

/// Read, tokenize and length-limit a preference data file.
pub fn load_pairs(
    path: &Path,
    tok: &TextTokenizer,
    opts: &PairOptions,
) -> Result<(Vec<Pair>, PairStats)> {
    let (records, skipped) = read_records(path, opts.skip_bad_lines)?;
    let mut stats = PairStats {
        skipped_bad_lines: skipped,
        ..Default::default()
    };
    let mut pairs = Vec::new();
    for rec in &records {
        let mut pair = match convert(tok, &rec.value, opts.margin_column.as_deref()) {
            Ok(p) => p,
            Err(_) if opts.skip_bad_lines => {
                stats.skipped_bad_lines += 1;
                continue;
            }
            Err(m) => {
                return Err(Error::bad_input(
                    path,
                    format!(
                        "line {}: {m}; fix the record or pass --skip-bad-lines",
                        rec.line
                    ),
                ))
            }
        };
        stats.records += 1;
        let long = pair.chosen.len() > opts.max_len || pair.rejected.len() > opts.max_len;
        if long {
            if opts.drop_long {
                stats.dropped_long += 1;
                continue;
            }
            stats.truncated += 1;
            let ok = fit(&mut pair.chosen, opts.max_len) & fit(&mut pair.rejected, opts.max_len);
            if !ok {
                stats.dropped_empty += 1;
                continue;
            }
            // the given reference log-probs were for the whole completions
            pair.reference = None;
        }
        pairs.push(pair);
    }
    stats.pairs = pairs.len();
    if pairs.is_empty() {
        return Err(Error::bad_input(
            path,
            format!(
                "no preference pairs left ({} records, {} dropped as longer than {} tokens, {} lost their completion to truncation, {} bad records skipped)",
                stats.records, stats.dropped_long, opts.max_len, stats.dropped_empty, stats.skipped_bad_lines
            ),
        ));
    }
    Ok((pairs, stats))
}

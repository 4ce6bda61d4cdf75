//! Training data: read SFT data files, tokenize them and build loss masks.
//!
//! Formats (docs/formats.md §7): plain `text`, Stanford `alpaca`, TRL `prompt-completion`,
//! conversational `messages` and `sharegpt`. Every example is a token sequence with labels
//! aligned to it in the Hugging Face convention: `labels[i] == ids[i]` when token `i` is a
//! training target (predicted from the tokens before it), −100 otherwise. Token 0 has no prefix
//! and is never a target.
//!
//! Masking rules:
//! * `text`: every token but the first is a target; EOS is appended (when the tokenizer has one
//!   and the text does not already end with it) and is a target.
//! * `alpaca`, `prompt-completion` (strings): ids = `tok.encode(prompt)` (BOS as the tokenizer
//!   config says) followed by `tok.encode_plain(target)` and the EOS id; the prompt part is −100
//!   unless `train_on_prompt`.
//! * `messages`, `sharegpt`, `prompt-completion` with message lists: rendered with the chat
//!   template and tokenized once with `encode_plain` (the template writes its own BOS). Targets
//!   are the assistant turns: the text the template adds for the turn after the generation
//!   prompt, i.e. `render(msgs[..=i])` minus `render(msgs[..i], add_generation_prompt=true)`,
//!   with trailing whitespace (the newline after `<|im_end|>`) left out. The end-of-turn token
//!   (`<|im_end|>`, `</s>`, `<|eot_id|>`) is therefore a target, even when pad == eos. For
//!   prompt-completion message lists only the completion's assistant turns are targets.
//!   Character spans become token spans by tokenizing the rendering's prefix up to each span
//!   boundary: when those tokens are a prefix of the full tokenization the boundary is exact;
//!   when a token straddles the boundary (a merge across it) the straddling token is counted as
//!   a target. When the template is not prefix-stable (a prefix rendering is not a prefix of
//!   the full rendering) the assistant content is searched for in the full rendering instead,
//!   and the span runs to the end of the content plus an EOS token written right after it.

use crate::data::{keys_hint, read_records, read_utf8, Record};
use crate::error::{Error, Result};
use crate::tokenizer::{Message, TextTokenizer};
use serde_json::Value;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// Label of a token that carries no loss.
pub const IGNORE_INDEX: i32 = -100;

/// How many leading records auto-detection looks at.
const DETECT_RECORDS: usize = 8;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DataFormat {
    #[default]
    Auto,
    Text,
    Alpaca,
    PromptCompletion,
    Messages,
    ShareGpt,
}

impl DataFormat {
    pub const NAMES: &'static [&'static str] = &[
        "auto",
        "text",
        "alpaca",
        "prompt-completion",
        "messages",
        "sharegpt",
    ];

    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Auto => "auto",
            DataFormat::Text => "text",
            DataFormat::Alpaca => "alpaca",
            DataFormat::PromptCompletion => "prompt-completion",
            DataFormat::Messages => "messages",
            DataFormat::ShareGpt => "sharegpt",
        }
    }

    /// What a record of this format looks like, for error messages.
    fn shape(self) -> &'static str {
        match self {
            DataFormat::Auto => "any of the formats",
            DataFormat::Text => "{\"text\": str}",
            DataFormat::Alpaca => "{\"instruction\": str, \"input\": str (optional), \"output\": str}",
            DataFormat::PromptCompletion => "{\"prompt\": str, \"completion\": str}",
            DataFormat::Messages => "{\"messages\": [{\"role\": str, \"content\": str}, ...]}",
            DataFormat::ShareGpt => "{\"conversations\": [{\"from\": \"human\"|\"gpt\"|\"system\", \"value\": str}, ...]}",
        }
    }
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DataFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        Ok(match norm.as_str() {
            "auto" => DataFormat::Auto,
            "text" | "lm" => DataFormat::Text,
            "alpaca" => DataFormat::Alpaca,
            "prompt-completion" | "promptcompletion" | "completion" => DataFormat::PromptCompletion,
            "messages" | "chat" | "conversational" => DataFormat::Messages,
            "sharegpt" | "share-gpt" | "conversations" => DataFormat::ShareGpt,
            _ => {
                return Err(format!(
                    "unknown data format '{s}' (expected one of: {})",
                    DataFormat::NAMES.join(", ")
                ))
            }
        })
    }
}

#[derive(Clone, Debug)]
pub struct DataOptions {
    pub format: DataFormat,
    /// Longest sequence in tokens; longer samples are truncated (keeping the start) or dropped.
    pub max_len: usize,
    /// Put loss on the prompt / non-assistant tokens too.
    pub train_on_prompt: bool,
    /// Skip (and count) malformed records instead of failing on the first one.
    pub skip_bad_lines: bool,
    /// Drop over-long samples instead of truncating them.
    pub drop_long: bool,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            format: DataFormat::Auto,
            max_len: 512,
            train_on_prompt: false,
            skip_bad_lines: false,
            drop_long: false,
        }
    }
}

/// One tokenized training sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// Aligned with `ids`: `labels[i] == ids[i] as i32` for targets, −100 elsewhere.
    pub labels: Vec<i32>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of loss-bearing tokens.
    pub fn loss_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// What loading did. `records` counts the records that were read and converted (bad ones that
/// were skipped are in `skipped_bad_lines` only); `examples.len() == records - dropped`.
/// `truncated` counts every sample cut to `max_len` (including those that then lost their
/// whole target); `dropped` counts samples removed after conversion: over-long ones with
/// `drop_long`, those whose targets were all cut off (`lost_whole_target`) and those with no
/// target at all. `tokens` and `loss_tokens` are totals over the kept examples.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataStats {
    pub format: DataFormat,
    pub records: usize,
    pub skipped_bad_lines: usize,
    pub truncated: usize,
    pub dropped: usize,
    pub lost_whole_target: usize,
    pub loss_tokens: usize,
    pub tokens: usize,
}

impl fmt::Display for DataStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} records ({}), {} examples, {} tokens, {} loss tokens",
            self.records,
            self.format,
            self.records - self.dropped,
            self.tokens,
            self.loss_tokens
        )?;
        if self.skipped_bad_lines > 0 {
            write!(f, ", {} bad records skipped", self.skipped_bad_lines)?;
        }
        if self.truncated > 0 {
            write!(f, ", {} truncated", self.truncated)?;
        }
        if self.dropped > 0 {
            write!(f, ", {} dropped", self.dropped)?;
            if self.lost_whole_target > 0 {
                write!(
                    f,
                    " ({} lost their whole target to truncation)",
                    self.lost_whole_target
                )?;
            }
        }
        Ok(())
    }
}

/// Read, tokenize and mask a training data file.
pub fn load_examples(
    path: &Path,
    tok: &TextTokenizer,
    opts: &DataOptions,
) -> Result<(Vec<Example>, DataStats)> {
    if opts.max_len < 2 {
        return Err(Error::usage(format!(
            "max_len must be at least 2 tokens (got {})",
            opts.max_len
        )));
    }
    let is_txt = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("txt"));
    let mut stats = DataStats::default();
    // (line, converted example or per-record error)
    let mut converted: Vec<(usize, std::result::Result<Example, String>)> = Vec::new();

    if is_txt {
        if !matches!(opts.format, DataFormat::Auto | DataFormat::Text) {
            return Err(Error::bad_input(
                path,
                format!(
                    "a .txt file holds plain text (one sample per line), not {} data; use a \
                     .jsonl or .json file for that format",
                    opts.format
                ),
            ));
        }
        stats.format = DataFormat::Text;
        let text = read_utf8(path)?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            converted.push((i + 1, text_example(tok, line)));
        }
        if converted.is_empty() {
            return Err(Error::bad_input(path, "the file is empty: no samples"));
        }
    } else {
        let (records, skipped) = read_records(path, opts.skip_bad_lines)?;
        stats.skipped_bad_lines = skipped;
        let format = match opts.format {
            DataFormat::Auto => detect_format(&records).map_err(|m| Error::bad_input(path, m))?,
            f => f,
        };
        stats.format = format;
        if matches!(format, DataFormat::Messages | DataFormat::ShareGpt)
            && tok.chat_template.is_none()
        {
            return Err(Error::bad_input(
                path,
                format!(
                    "{format} data is rendered with the model's chat template, but the tokenizer \
                     has no chat_template (tokenizer_config.json or chat_template.jinja)"
                ),
            ));
        }
        for r in &records {
            converted.push((r.line, convert_record(format, &r.value, tok, opts)));
        }
    }

    let mut examples = Vec::with_capacity(converted.len());
    for (line, ex) in converted {
        let ex = match ex {
            Ok(ex) => ex,
            Err(msg) if opts.skip_bad_lines => {
                let _ = msg;
                stats.skipped_bad_lines += 1;
                continue;
            }
            Err(msg) => {
                return Err(Error::bad_input(
                    path,
                    format!("line {line}: {msg}; fix the record or pass --skip-bad-lines"),
                ))
            }
        };
        stats.records += 1;
        if let Some(ex) = fit_length(ex, opts, &mut stats) {
            stats.tokens += ex.ids.len();
            stats.loss_tokens += ex.loss_tokens();
            examples.push(ex);
        } else {
            stats.dropped += 1;
        }
    }

    if examples.is_empty() {
        let mut why = format!(
            "no training examples left ({} records read as {}",
            stats.records, stats.format
        );
        if stats.skipped_bad_lines > 0 {
            why += &format!(", {} bad records skipped", stats.skipped_bad_lines);
        }
        if stats.dropped > 0 {
            why += &format!(", {} dropped", stats.dropped);
            if stats.lost_whole_target > 0 {
                why += &format!(
                    ", {} of them lost their whole target to truncation at max_len {}",
                    stats.lost_whole_target, opts.max_len
                );
            } else if opts.drop_long {
                why += &format!(" as longer than max_len {}", opts.max_len);
            }
        }
        why += ")";
        return Err(Error::bad_input(path, why));
    }
    Ok((examples, stats))
}

/// Truncate (or drop) an over-long example; None when it is dropped.
fn fit_length(mut ex: Example, opts: &DataOptions, stats: &mut DataStats) -> Option<Example> {
    if ex.ids.len() > opts.max_len {
        if opts.drop_long {
            return None;
        }
        stats.truncated += 1;
        ex.ids.truncate(opts.max_len);
        ex.labels.truncate(opts.max_len);
        if ex.loss_tokens() == 0 {
            stats.lost_whole_target += 1;
            return None;
        }
    }
    if ex.loss_tokens() == 0 {
        return None;
    }
    Some(ex)
}

/// The format of a data file from the keys of its first records.
pub fn detect_format(records: &[Record]) -> std::result::Result<DataFormat, String> {
    let accepted = [
        DataFormat::Text,
        DataFormat::Alpaca,
        DataFormat::PromptCompletion,
        DataFormat::Messages,
        DataFormat::ShareGpt,
    ]
    .iter()
    .map(|f| format!("{f} {}", f.shape()))
    .collect::<Vec<_>>()
    .join("; ");
    let mut found: Option<(DataFormat, usize)> = None;
    for r in records.iter().take(DETECT_RECORDS) {
        let Some(obj) = r.value.as_object() else {
            return Err(format!(
                "line {}: cannot detect the data format: the record is not a JSON object \
                 (accepted: {accepted})",
                r.line
            ));
        };
        let has = |k: &str| obj.contains_key(k);
        let mut structured = Vec::new();
        if has("messages") {
            structured.push(DataFormat::Messages);
        }
        if has("conversations") {
            structured.push(DataFormat::ShareGpt);
        }
        if has("instruction") && has("output") {
            structured.push(DataFormat::Alpaca);
        }
        if has("prompt") && has("completion") {
            structured.push(DataFormat::PromptCompletion);
        }
        let format = match structured.as_slice() {
            [f] => *f,
            [] if has("text") => DataFormat::Text,
            [] => {
                return Err(format!(
                    "line {}: cannot detect the data format from the keys{}; accepted: \
                     {accepted}; or pass the format explicitly",
                    r.line,
                    keys_hint_or_none(&r.value)
                ))
            }
            many => {
                return Err(format!(
                    "line {}: the keys{} fit several formats ({}); pass the format explicitly",
                    r.line,
                    keys_hint_or_none(&r.value),
                    many.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
                ))
            }
        };
        match found {
            None => found = Some((format, r.line)),
            Some((f, line)) if f != format => {
                return Err(format!(
                    "cannot detect the data format: line {line} looks like {f} but line {} \
                     looks like {format}; pass the format explicitly",
                    r.line
                ))
            }
            Some(_) => {}
        }
    }
    found
        .map(|(f, _)| f)
        .ok_or_else(|| format!("cannot detect the data format: no records (accepted: {accepted})"))
}

fn keys_hint_or_none(v: &Value) -> String {
    let h = keys_hint(v);
    if h.is_empty() {
        " (found no keys)".to_string()
    } else {
        h
    }
}

// ---------------------------------------------------------------------------------------------
// Per-record conversion. Errors are the message after "path: line N: ".

type RecResult<T> = std::result::Result<T, String>;

fn convert_record(
    format: DataFormat,
    v: &Value,
    tok: &TextTokenizer,
    opts: &DataOptions,
) -> RecResult<Example> {
    if !v.is_object() {
        return Err(format!(
            "expected a JSON object {}, found {}",
            format.shape(),
            type_name(v)
        ));
    }
    match format {
        DataFormat::Auto => Err("internal: format not resolved".into()),
        DataFormat::Text => {
            let text = str_field(v, "text", format)?;
            text_example(tok, text)
        }
        DataFormat::Alpaca => {
            let instruction = str_field(v, "instruction", format)?;
            let input = match v.get("input") {
                None | Some(Value::Null) => "",
                Some(Value::String(s)) => s.as_str(),
                Some(other) => {
                    return Err(format!(
                        "\"input\" must be a string, found {}",
                        type_name(other)
                    ))
                }
            };
            let output = str_field(v, "output", format)?;
            let prompt = alpaca_prompt(instruction, input);
            prompt_target_example(tok, &prompt, output, opts.train_on_prompt)
        }
        DataFormat::PromptCompletion => {
            let prompt = v
                .get("prompt")
                .ok_or_else(|| missing("prompt", v, format))?;
            let completion = v
                .get("completion")
                .ok_or_else(|| missing("completion", v, format))?;
            match (prompt, completion) {
                (Value::String(p), Value::String(c)) => {
                    prompt_target_example(tok, p, c, opts.train_on_prompt)
                }
                (Value::Array(p), Value::Array(c)) => {
                    let mut msgs = parse_messages(p, "prompt")?;
                    let n_prompt = msgs.len();
                    msgs.extend(parse_messages(c, "completion")?);
                    chat_example(tok, &msgs, n_prompt, opts.train_on_prompt)
                }
                (p, c) => Err(format!(
                    "\"prompt\" and \"completion\" must both be strings or both be message \
                     lists, found {} and {}",
                    type_name(p),
                    type_name(c)
                )),
            }
        }
        DataFormat::Messages => {
            let list = match v.get("messages") {
                Some(Value::Array(a)) => a,
                Some(other) => {
                    return Err(format!(
                    "\"messages\" must be a list of {{\"role\", \"content\"}} objects, found {}",
                    type_name(other)
                ))
                }
                None => return Err(missing("messages", v, format)),
            };
            let msgs = parse_messages(list, "messages")?;
            chat_example(tok, &msgs, 0, opts.train_on_prompt)
        }
        DataFormat::ShareGpt => {
            let list = match v.get("conversations") {
                Some(Value::Array(a)) => a,
                Some(other) => {
                    return Err(format!(
                        "\"conversations\" must be a list of {{\"from\", \"value\"}} objects, \
                         found {}",
                        type_name(other)
                    ))
                }
                None => return Err(missing("conversations", v, format)),
            };
            let msgs = parse_sharegpt(list)?;
            chat_example(tok, &msgs, 0, opts.train_on_prompt)
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn missing(key: &str, v: &Value, format: DataFormat) -> String {
    format!(
        "{format} record has no \"{key}\" field{} (expected {})",
        keys_hint_or_none(v),
        format.shape()
    )
}

fn str_field<'a>(v: &'a Value, key: &str, format: DataFormat) -> RecResult<&'a str> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!(
            "\"{key}\" must be a string, found {}",
            type_name(other)
        )),
        None => Err(missing(key, v, format)),
    }
}

/// The Stanford Alpaca prompt (docs/formats.md §7.1).
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
        )
    }
}

pub(crate) fn tok_err(e: Error) -> String {
    match e {
        Error::BadInput { msg, .. } => msg,
        other => other.to_string(),
    }
}

fn text_example(tok: &TextTokenizer, text: &str) -> RecResult<Example> {
    if text.trim().is_empty() {
        return Err("the \"text\" is empty".into());
    }
    let mut ids = tok.encode(text).map_err(tok_err)?;
    if let Some(eos) = tok.eos_id() {
        if ids.last() != Some(&eos) {
            ids.push(eos);
        }
    }
    let mut labels: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    labels[0] = IGNORE_INDEX;
    Ok(Example { ids, labels })
}

/// Prompt (with BOS as configured) + target + EOS; the prompt is masked unless train_on_prompt.
pub(crate) fn prompt_target_example(
    tok: &TextTokenizer,
    prompt: &str,
    target: &str,
    train_on_prompt: bool,
) -> RecResult<Example> {
    let prompt_ids = tok.encode(prompt).map_err(tok_err)?;
    let mut target_ids = tok.encode_plain(target).map_err(tok_err)?;
    if let Some(eos) = tok.eos_id() {
        target_ids.push(eos);
    }
    if target_ids.is_empty() {
        return Err("the target is empty and the tokenizer has no EOS token".into());
    }
    let n_prompt = prompt_ids.len();
    let mut ids = prompt_ids;
    ids.extend_from_slice(&target_ids);
    let mut labels: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    if !train_on_prompt {
        labels[..n_prompt].fill(IGNORE_INDEX);
    }
    labels[0] = IGNORE_INDEX;
    Ok(Example { ids, labels })
}

pub(crate) fn parse_messages(list: &[Value], what: &str) -> RecResult<Vec<Message>> {
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.get("role") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => {
                    return Err(format!(
                        "{what}[{i}].role must be a string, found {}",
                        type_name(other)
                    ))
                }
                None => {
                    return Err(format!(
                        "{what}[{i}] has no \"role\"{}",
                        keys_hint_or_none(m)
                    ))
                }
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => {
                    return Err(format!(
                        "{what}[{i}].content must be a string, found {}",
                        type_name(other)
                    ))
                }
                None => {
                    return Err(format!(
                        "{what}[{i}] has no \"content\"{}",
                        keys_hint_or_none(m)
                    ))
                }
            };
            Ok(Message { role, content })
        })
        .collect()
}

pub(crate) fn parse_sharegpt(list: &[Value]) -> RecResult<Vec<Message>> {
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let from = match m.get("from") {
                Some(Value::String(s)) => s.as_str(),
                Some(other) => {
                    return Err(format!(
                        "conversations[{i}].from must be a string, found {}",
                        type_name(other)
                    ))
                }
                None => {
                    return Err(format!(
                        "conversations[{i}] has no \"from\"{}",
                        keys_hint_or_none(m)
                    ))
                }
            };
            let role = match from {
                "human" | "user" => "user",
                "gpt" | "assistant" | "model" | "chatgpt" => "assistant",
                "system" => "system",
                other => {
                    return Err(format!(
                        "conversations[{i}].from is \"{other}\"; expected \"human\", \"gpt\" or \
                         \"system\""
                    ))
                }
            };
            let content = match m.get("value") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => {
                    return Err(format!(
                        "conversations[{i}].value must be a string, found {}",
                        type_name(other)
                    ))
                }
                None => {
                    return Err(format!(
                        "conversations[{i}] has no \"value\"{}",
                        keys_hint_or_none(m)
                    ))
                }
            };
            Ok(Message {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

fn render(tok: &TextTokenizer, msgs: &[Message], gen: bool) -> RecResult<String> {
    tok.apply_chat_template(msgs, gen).map_err(tok_err)
}

/// Render a conversation with the chat template and put loss on the assistant turns at index
/// `first_target` or later (all tokens but the first with `train_on_prompt`).
pub(crate) fn chat_example(
    tok: &TextTokenizer,
    msgs: &[Message],
    first_target: usize,
    train_on_prompt: bool,
) -> RecResult<Example> {
    if msgs.is_empty() {
        return Err("the conversation is empty".into());
    }
    let targets: Vec<usize> = (first_target..msgs.len())
        .filter(|&i| msgs[i].role == "assistant")
        .collect();
    if targets.is_empty() && !train_on_prompt {
        return Err(if first_target > 0 {
            "the completion has no assistant message: nothing to train on".into()
        } else {
            "the conversation has no assistant message: nothing to train on".into()
        });
    }
    let full = render(tok, msgs, false)?;
    let ids = tok.encode_plain(&full).map_err(tok_err)?;
    if ids.is_empty() {
        return Err("the chat template rendered an empty text".into());
    }
    let mut labels = vec![IGNORE_INDEX; ids.len()];
    if train_on_prompt {
        for (l, &i) in labels.iter_mut().zip(&ids) {
            *l = i as i32;
        }
    } else {
        let spans = assistant_char_spans(tok, msgs, &targets, &full)?;
        for (start, end) in spans {
            let t0 = token_boundary(tok, &full, start, &ids, false)?;
            let t1 = token_boundary(tok, &full, end, &ids, true)?;
            for t in t0..t1.max(t0) {
                labels[t] = ids[t] as i32;
            }
        }
    }
    labels[0] = IGNORE_INDEX;
    Ok(Example { ids, labels })
}

/// Character (byte) spans of the assistant turns `targets` in the full rendering `full`.
fn assistant_char_spans(
    tok: &TextTokenizer,
    msgs: &[Message],
    targets: &[usize],
    full: &str,
) -> RecResult<Vec<(usize, usize)>> {
    let mut spans = Vec::with_capacity(targets.len());
    let mut cursor = 0;
    for &i in targets {
        let before = render(tok, &msgs[..i], true)?;
        let upto = render(tok, &msgs[..=i], false)?;
        let (start, end) = if upto.starts_with(&before) && full.starts_with(&upto) {
            let end = upto.trim_end().len().max(before.len());
            (before.len(), end)
        } else {
            // Not prefix-stable (the template renders earlier turns differently once later
            // ones exist): find the content itself, plus an EOS written right after it.
            let content = msgs[i].content.trim();
            let rel = full[cursor..].find(content).ok_or_else(|| {
                format!(
                    "cannot find assistant message {i} in the chat template's rendering \
                     (the template changes it)"
                )
            })?;
            let start = cursor + rel;
            let mut end = start + content.len();
            if let Some(eos) = tok.eos_token.as_deref().filter(|e| !e.is_empty()) {
                let rest = &full[end..];
                let trimmed = rest.trim_start_matches([' ', '\t']);
                if trimmed.starts_with(eos) {
                    end += rest.len() - trimmed.len() + eos.len();
                }
            }
            (start, end)
        };
        cursor = end.max(cursor);
        spans.push((start, end));
    }
    Ok(spans)
}

/// Token index of character position `pos` of `full` (tokenized as `ids`): the number of
/// tokens of `full[..pos]` when they are a prefix of `ids`. When a token straddles `pos`, it
/// goes to the target side: `at_end == false` (a span start) rounds down, `at_end == true`
/// rounds up.
fn token_boundary(
    tok: &TextTokenizer,
    full: &str,
    pos: usize,
    ids: &[u32],
    at_end: bool,
) -> RecResult<usize> {
    if pos == 0 {
        return Ok(0);
    }
    if pos >= full.len() {
        return Ok(ids.len());
    }
    let prefix = tok.encode_plain(&full[..pos]).map_err(tok_err)?;
    let common = prefix.iter().zip(ids).take_while(|(a, b)| a == b).count();
    if common == prefix.len() {
        return Ok(common);
    }
    Ok(if at_end {
        (common + 1).min(ids.len())
    } else {
        common
    })
}

// ---------------------------------------------------------------------------------------------
// Packing and the --check-data report.

/// Group examples into bins of at most `max_len` tokens, first-fit decreasing (longest first,
/// ties by index; deterministic). Each group lists its example indices in ascending order;
/// groups are ordered by their first index. An example longer than `max_len` is its own group.
/// Every index appears exactly once.
pub fn pack(examples: &[Example], max_len: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by(|&a, &b| examples[b].len().cmp(&examples[a].len()).then(a.cmp(&b)));
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new(); // (used tokens, members)
    for i in order {
        let len = examples[i].len();
        if len > max_len {
            groups.push((len, vec![i]));
            continue;
        }
        match groups.iter_mut().find(|g| g.0 + len <= max_len) {
            Some((used, members)) => {
                *used += len;
                members.push(i);
            }
            None => groups.push((len, vec![i])),
        }
    }
    let mut out: Vec<Vec<usize>> = groups
        .into_iter()
        .map(|(_, mut m)| {
            m.sort_unstable();
            m
        })
        .collect();
    out.sort_by_key(|g| g[0]);
    out
}

/// Marker that opens a run of loss-bearing tokens in the check-data report.
pub const TARGET_OPEN: &str = "[[";
/// Marker that closes a run of loss-bearing tokens in the check-data report.
pub const TARGET_CLOSE: &str = "]]";

/// The `--check-data N` report: the first `n` examples decoded with the loss-bearing tokens
/// wrapped in `[[` `]]`, their token counts, and warnings for common masking mistakes.
pub fn check_data_report(examples: &[Example], tok: &TextTokenizer, n: usize) -> String {
    let shown = n.min(examples.len());
    let mut out = format!(
        "check-data: {shown} of {} examples; loss-bearing tokens are wrapped in {TARGET_OPEN} \
         {TARGET_CLOSE}\n",
        examples.len()
    );
    let bos = tok.bos_id();
    let eos = tok.eos_id();
    let mut warned = 0;
    for (k, ex) in examples.iter().take(shown).enumerate() {
        let loss = ex.loss_tokens();
        out += &format!(
            "--- example {k}: {} tokens, {loss} loss tokens, {} masked ---\n",
            ex.ids.len(),
            ex.ids.len() - loss
        );
        out += &marked_text(ex, tok);
        out.push('\n');
        let mut warnings = Vec::new();
        if let Some(b) = bos {
            if ex.ids.len() >= 2 && ex.ids[0] == b && ex.ids[1] == b {
                warnings.push(
                    "double BOS at the start (the text or chat template already has BOS and the \
                     tokenizer added another)"
                        .to_string(),
                );
            }
        }
        if let Some(e) = eos {
            let masked_eos = (1..ex.ids.len()).any(|i| {
                ex.ids[i] == e && ex.labels[i] == IGNORE_INDEX && ex.labels[i - 1] != IGNORE_INDEX
            });
            if masked_eos {
                warnings.push(
                    "EOS masked: an EOS token right after a target has label -100, so the model \
                     will not learn to stop (pad == eos masking?)"
                        .to_string(),
                );
            }
            if loss > 0
                && !(0..ex.ids.len()).any(|i| ex.ids[i] == e && ex.labels[i] != IGNORE_INDEX)
            {
                warnings.push("no EOS among the targets (truncated, or no EOS appended)".into());
            }
        }
        if loss == 0 {
            warnings.push(
                "no loss-bearing tokens: the sample lost its whole target (truncation) and \
                 trains nothing"
                    .to_string(),
            );
        }
        for w in &warnings {
            out += &format!("warning: example {k}: {w}\n");
        }
        warned += warnings.len();
    }
    out += &format!("check-data: {warned} warnings\n");
    out
}

/// Decoded text of an example with runs of targets wrapped in markers. Prefixes are decoded
/// at each run boundary and the differences taken, so that decoders that depend on context
/// (leading-space handling) print the text as it reads in full.
fn marked_text(ex: &Example, tok: &TextTokenizer) -> String {
    let mut bounds = vec![0];
    for i in 1..ex.ids.len() {
        let a = ex.labels[i - 1] != IGNORE_INDEX;
        let b = ex.labels[i] != IGNORE_INDEX;
        if a != b {
            bounds.push(i);
        }
    }
    bounds.push(ex.ids.len());
    let mut out = String::new();
    let mut prev = String::new();
    for w in bounds.windows(2) {
        let (s, e) = (w[0], w[1]);
        if s == e {
            continue;
        }
        let whole = tok.decode(&ex.ids[..e], false).unwrap_or_default();
        let piece = match whole.strip_prefix(prev.as_str()) {
            Some(p) => p.to_string(),
            None => tok.decode(&ex.ids[s..e], false).unwrap_or_default(),
        };
        if ex.labels[s] != IGNORE_INDEX {
            out += TARGET_OPEN;
            out += &piece;
            out += TARGET_CLOSE;
        } else {
            out += &piece;
        }
        prev = whole;
    }
    out
}

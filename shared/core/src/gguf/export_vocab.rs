//! A model folder's tokenizer as GGUF metadata (`tokenizer.ggml.*`), as llama.cpp's
//! convert_hf_to_gguf.py writes it from tokenizer.json and tokenizer_config.json:
//!
//! - byte-level BPE (`_set_vocab_gpt2`): model `gpt2`, the pre-tokenizer named by the hash of
//!   the ids of a fixed text ([`super::pre_hashes`]), tokens, token types, merges;
//! - BPE with byte fallback and a `Sequence` decoder (`_set_vocab_llama_hf`, SentencePiece
//!   vocabularies saved as tokenizer.json): model `llama`, pre `default`, tokens, scores
//!   (all -1000, as the converter writes them), token types;
//! - then gguf-py's `SpecialVocab`: special token ids, whether BOS/EOS are added, the chat
//!   template.
//!
//! - a SentencePiece `tokenizer.model` (Llama 2, Mistral), the converter's first choice
//!   (`_set_vocab_sentencepiece`): model `llama`, the pieces' scores and types read from the
//!   protobuf, added tokens over them, `[PADn]` up to the config's vocabulary size.

use super::export::GgufArch;
use super::pre_hashes::{CHKTXT, PRE_HASHES};
use super::reader::Value;
use super::writer::GgufWriter;
use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;
use serde_json::Value as J;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// Special token types in SpecialVocab's order, with their GGUF keys.
const SPECIAL_TYPES: [(&str, &str); 7] = [
    ("bos", "tokenizer.ggml.bos_token_id"),
    ("eos", "tokenizer.ggml.eos_token_id"),
    ("unk", "tokenizer.ggml.unknown_token_id"),
    ("sep", "tokenizer.ggml.seperator_token_id"),
    ("pad", "tokenizer.ggml.padding_token_id"),
    ("cls", "tokenizer.ggml.cls_token_id"),
    ("mask", "tokenizer.ggml.mask_token_id"),
];

fn read_json(path: &Path) -> Result<Option<J>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::bad_input(path, format!("invalid JSON: {e}")))
}

/// The added tokens of tokenizer.json: (content, id, special, normalized).
struct Added {
    content: String,
    id: u64,
    special: bool,
}

fn added_tokens(tok: &J) -> Vec<Added> {
    tok.get("added_tokens")
        .and_then(J::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|t| {
                    Some(Added {
                        content: t.get("content")?.as_str()?.to_owned(),
                        id: t.get("id")?.as_u64()?,
                        special: t.get("special").and_then(J::as_bool).unwrap_or(false),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer: the hash of the ids
/// `tokenizer(CHKTXT)` gives (Python's list repr), looked up in its table.
pub fn pre_tokenizer_hash(dir: &Path) -> Result<String> {
    let tok = TextTokenizer::load(dir)?;
    let ids = tok.encode(CHKTXT)?;
    let repr = format!(
        "[{}]",
        ids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Sha256::digest(repr.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Writes the tokenizer keys of the model folder `dir` into `w`. `vocab_size` is the
/// config's; `pre` overrides the hash lookup of a byte-level BPE's pre-tokenizer.
pub fn add_vocab(
    w: &mut GgufWriter,
    dir: &Path,
    arch: GgufArch,
    vocab_size: usize,
    pre: Option<&str>,
) -> Result<()> {
    let tok_path = dir.join("tokenizer.json");
    let tok_json = read_json(&tok_path)?;
    let cfg_path = dir.join("tokenizer_config.json");
    let tcfg = read_json(&cfg_path)?;
    if arch == GgufArch::Llama {
        if let Some(b) = tcfg
            .as_ref()
            .and_then(|c| c.get("add_prefix_space"))
            .and_then(J::as_bool)
        {
            w.add("tokenizer.ggml.add_space_prefix", Value::Bool(b));
        }
    }
    let spm = dir.join("tokenizer.model");
    // The vocabulary, by the converter's first path that applies; then SpecialVocab reads
    // tokenizer.json (merges only for byte-level BPE) and the configs.
    let (tok, load_merges, n_vocab) = if spm.is_file() && arch != GgufArch::Gpt2 {
        // `_set_vocab_sentencepiece`, tried first for Llama and Qwen2 (GPT-2 goes straight to
        // byte-level BPE); tokenizer.json, if any, only lends SpecialVocab its added tokens.
        let n = add_sentencepiece(w, &spm, tcfg.as_ref(), dir, vocab_size)?;
        (tok_json.unwrap_or(J::Null), false, Some(n))
    } else {
        let tok = tok_json.ok_or_else(|| {
            Error::bad_input(
                &tok_path,
                "tokenizer.json is missing (the GGUF needs the tokenizer)",
            )
        })?;
        let model = &tok["model"];
        let byte_fallback = model.get("byte_fallback").and_then(J::as_bool);
        let is_llama3 = model["type"] == "BPE"
            && model.get("ignore_merges").and_then(J::as_bool) == Some(true)
            && !byte_fallback.unwrap_or(true);
        let llama_hf = arch == GgufArch::Llama
            && !is_llama3
            && model["type"] == "BPE"
            && byte_fallback == Some(true)
            && tok["decoder"]["type"] == "Sequence";
        if llama_hf {
            let n = add_llama_hf(w, &tok, tcfg.as_ref(), &tok_path)?;
            (tok, false, Some(n))
        } else {
            add_gpt2(w, dir, &tok, vocab_size, pre, &tok_path)?;
            (tok, true, None)
        }
    };
    let config = read_json(&dir.join("config.json"))?;
    special_vocab(w, dir, &tok, tcfg, config.as_ref(), load_merges, n_vocab)?;
    // convert_hf_to_gguf's "granite small models" rule, which SmolLM2's 49152 tokens meet.
    if arch == GgufArch::Llama && vocab_size == 49152 {
        set_or_add(w, "tokenizer.ggml.add_bos_token", Value::Bool(false));
    }
    Ok(())
}

/// A key that exists keeps its place and takes the new value (gguf-py's writer is a dict).
fn set_or_add(w: &mut GgufWriter, key: &str, v: Value) {
    match w.metadata.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = v,
        None => w.add(key, v),
    }
}

fn strings(v: Vec<String>) -> Value {
    Value::Array(v.into_iter().map(Value::String).collect())
}

/// `get_vocab_base` + `_set_vocab_gpt2`.
fn add_gpt2(
    w: &mut GgufWriter,
    dir: &Path,
    tok: &J,
    vocab_size: usize,
    pre: Option<&str>,
    tok_path: &Path,
) -> Result<()> {
    let mut reverse: HashMap<u64, String> = HashMap::new();
    if let Some(v) = tok["model"]["vocab"].as_object() {
        for (t, id) in v {
            if let Some(id) = id.as_u64() {
                reverse.insert(id, t.clone());
            }
        }
    } else {
        return Err(Error::bad_input(
            tok_path,
            "model.vocab is not a token → id map (a byte-level BPE was expected)",
        ));
    }
    let added = added_tokens(tok);
    for a in &added {
        reverse.insert(a.id, a.content.clone());
    }
    if let Some(max) = reverse.keys().max() {
        if *max as usize >= vocab_size {
            return Err(Error::bad_input(
                tok_path,
                format!("token id {max} is not below the config's vocab_size {vocab_size}"),
            ));
        }
    }
    let added_by_content: HashMap<&str, &Added> =
        added.iter().map(|a| (a.content.as_str(), a)).collect();
    let pre = match pre {
        Some(p) => p.to_owned(),
        None => {
            let hash = pre_tokenizer_hash(dir)?;
            match PRE_HASHES.iter().find(|(h, _)| *h == hash) {
                Some((_, name)) => (*name).to_owned(),
                None => {
                    return Err(Error::bad_input(
                        tok_path,
                        format!(
                            "llama.cpp does not know this pre-tokenizer (hash {hash}); name the closest one with --tokenizer-pre (e.g. default, llama-bpe, qwen2, smollm)"
                        ),
                    ))
                }
            }
        }
    };
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for i in 0..vocab_size as u64 {
        match reverse.get(&i) {
            None => {
                tokens.push(format!("[PAD{i}]"));
                types.push(UNUSED);
            }
            Some(t) => match added_by_content.get(t.as_str()) {
                Some(a) if a.special || looks_special(t) => {
                    tokens.push(t.clone());
                    types.push(CONTROL);
                }
                Some(_) => {
                    tokens.push(t.replace('\u{2581}', " "));
                    types.push(USER_DEFINED);
                }
                None => {
                    tokens.push(t.clone());
                    types.push(NORMAL);
                }
            },
        }
    }
    w.add_str("tokenizer.ggml.model", "gpt2");
    w.add_str("tokenizer.ggml.pre", &pre);
    w.add("tokenizer.ggml.tokens", strings(tokens));
    w.add(
        "tokenizer.ggml.token_type",
        Value::Array(types.into_iter().map(Value::I32).collect()),
    );
    Ok(())
}

/// The converter's `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// gguf-py's `LlamaHfVocab` through `_set_vocab_llama_hf`. Returns the number of tokens.
fn add_llama_hf(w: &mut GgufWriter, tok: &J, tcfg: Option<&J>, tok_path: &Path) -> Result<usize> {
    let vocab = tok["model"]["vocab"]
        .as_object()
        .ok_or_else(|| Error::bad_input(tok_path, "model.vocab is not a token → id map"))?;
    let base = vocab.len();
    let mut reverse: Vec<Option<&str>> = vec![None; base];
    for (t, id) in vocab {
        match id.as_u64().map(|i| i as usize) {
            Some(i) if i < base => reverse[i] = Some(t),
            _ => {
                return Err(Error::bad_input(
                    tok_path,
                    format!("vocabulary id of {t:?} is not below its size {base}"),
                ))
            }
        }
    }
    let added = added_tokens(tok);
    // transformers' all_special_ids: the named special tokens and the extra ones.
    let content = |v: &J| -> Option<String> {
        match v {
            J::String(s) => Some(s.clone()),
            J::Object(o) => o.get("content")?.as_str().map(String::from),
            _ => None,
        }
    };
    let mut special_tokens: Vec<String> = Vec::new();
    if let Some(c) = tcfg {
        for (typ, _) in SPECIAL_TYPES {
            if let Some(t) = c.get(format!("{typ}_token")).and_then(content) {
                special_tokens.push(t);
            }
        }
        for key in ["additional_special_tokens", "extra_special_tokens"] {
            if let Some(list) = c.get(key).and_then(J::as_array) {
                special_tokens.extend(list.iter().filter_map(content));
            }
        }
    }
    let id_of = |t: &str| -> Option<u64> {
        vocab
            .get(t)
            .and_then(J::as_u64)
            .or_else(|| added.iter().find(|a| a.content == t).map(|a| a.id))
    };
    let special_ids: Vec<u64> = special_tokens.iter().filter_map(|t| id_of(t)).collect();
    let byte_re = |t: &str| {
        t.len() == 6
            && t.starts_with("<0x")
            && t.ends_with('>')
            && t[3..5].chars().all(|c| c.is_ascii_hexdigit())
    };
    let mut tokens = Vec::new();
    let mut types = Vec::new();
    for (i, t) in reverse.iter().enumerate() {
        let t = t.ok_or_else(|| {
            Error::bad_input(tok_path, format!("no token has id {i} in model.vocab"))
        })?;
        tokens.push(t.to_owned());
        types.push(if byte_re(t) {
            BYTE
        } else if special_ids.contains(&(i as u64)) {
            CONTROL
        } else {
            NORMAL
        });
    }
    let mut extra: Vec<&Added> = added.iter().filter(|a| a.id as usize >= base).collect();
    extra.sort_by_key(|a| a.id);
    for a in extra {
        tokens.push(a.content.clone());
        types.push(if special_tokens.contains(&a.content) {
            if byte_re(&a.content) {
                BYTE
            } else if special_ids.contains(&a.id) {
                CONTROL
            } else {
                NORMAL
            }
        } else {
            USER_DEFINED
        });
    }
    let n = tokens.len();
    w.add_str("tokenizer.ggml.model", "llama");
    w.add_str("tokenizer.ggml.pre", "default");
    w.add("tokenizer.ggml.tokens", strings(tokens));
    w.add(
        "tokenizer.ggml.scores",
        Value::Array(vec![Value::F32(-1000.0); n]),
    );
    w.add(
        "tokenizer.ggml.token_type",
        Value::Array(types.into_iter().map(Value::I32).collect()),
    );
    Ok(n)
}

/// One piece of a SentencePiece model: text, score, type (1 normal, 2 unknown, 3 control,
/// 4 user-defined, 5 unused, 6 byte).
struct Piece {
    text: String,
    score: f32,
    kind: u64,
}

/// The pieces of a SentencePiece `ModelProto` (field 1: repeated `SentencePiece` with piece = 1,
/// score = 2, type = 3), read with a minimal protobuf decoder.
fn sentencepiece_pieces(path: &Path) -> Result<Vec<Piece>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |what: &str| Error::bad_input(path, format!("not a SentencePiece model: {what}"));
    let mut pieces = Vec::new();
    for (field, value) in protobuf_fields(&bytes).map_err(|m| bad(&m))? {
        let Field::Bytes(msg) = value else { continue };
        if field != 1 {
            continue;
        }
        let mut piece = Piece {
            text: String::new(),
            score: 0.0,
            kind: 1,
        };
        for (f, v) in protobuf_fields(msg).map_err(|m| bad(&m))? {
            match (f, v) {
                (1, Field::Bytes(b)) => {
                    piece.text =
                        String::from_utf8(b.to_vec()).map_err(|_| bad("a piece is not UTF-8"))?
                }
                (2, Field::Fixed32(x)) => piece.score = f32::from_bits(x),
                (3, Field::Varint(x)) => piece.kind = x,
                _ => {}
            }
        }
        pieces.push(piece);
    }
    if pieces.is_empty() {
        return Err(bad("no pieces"));
    }
    Ok(pieces)
}

enum Field<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

fn protobuf_fields(mut b: &[u8]) -> std::result::Result<Vec<(u64, Field<'_>)>, String> {
    fn varint(b: &mut &[u8]) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first().ok_or("truncated varint")?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let field = key >> 3;
        let value = match key & 7 {
            0 => Field::Varint(varint(&mut b)?),
            1 => {
                b = b.get(8..).ok_or("truncated 64-bit field")?;
                Field::Fixed64
            }
            2 => {
                let n = varint(&mut b)? as usize;
                let v = b.get(..n).ok_or("truncated field")?;
                b = &b[n..];
                Field::Bytes(v)
            }
            5 => {
                let v = b.get(..4).ok_or("truncated 32-bit field")?;
                b = &b[4..];
                Field::Fixed32(u32::from_le_bytes(v.try_into().expect("4 bytes")))
            }
            w => return Err(format!("wire type {w}")),
        };
        out.push((field, value));
    }
    Ok(out)
}

/// The converter's `_create_vocab_sentencepiece` + `_set_vocab_sentencepiece`: the pieces
/// with their scores and types, added_tokens.json and tokenizer_config.json's
/// added_tokens_decoder over them, `[PADn]` up to the config's vocab_size. Returns the number
/// of tokens.
fn add_sentencepiece(
    w: &mut GgufWriter,
    spm: &Path,
    tcfg: Option<&J>,
    dir: &Path,
    vocab_size: usize,
) -> Result<usize> {
    let pieces = sentencepiece_pieces(spm)?;
    let n = if vocab_size > 0 {
        vocab_size
    } else {
        pieces.len()
    };
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000f32; n];
    let mut types = vec![UNUSED; n];
    for (i, p) in pieces.iter().enumerate().take(n) {
        tokens[i] = p.text.clone();
        scores[i] = p.score;
        types[i] = match p.kind {
            2 => 2,
            3 => CONTROL,
            5 => UNUSED,
            6 => BYTE,
            _ => NORMAL,
        };
    }
    if let Some(added) = read_json(&dir.join("added_tokens.json"))? {
        for (t, id) in added.as_object().into_iter().flatten() {
            if let Some(i) = id.as_u64().map(|i| i as usize).filter(|&i| i < n) {
                tokens[i] = t.clone();
                scores[i] = -1000.0;
                types[i] = USER_DEFINED;
            }
        }
    }
    if let Some(dec) = tcfg
        .and_then(|c| c.get("added_tokens_decoder"))
        .and_then(J::as_object)
    {
        for (id, data) in dec {
            let (Ok(i), Some(t)) = (id.parse::<usize>(), data["content"].as_str()) else {
                continue;
            };
            if i >= n {
                continue;
            }
            let special = data["special"].as_bool().unwrap_or(false);
            if special || looks_special(t) {
                types[i] = CONTROL;
                tokens[i] = t.to_owned();
            } else {
                types[i] = USER_DEFINED;
                tokens[i] = t.replace('\u{2581}', " ");
            }
            scores[i] = -1000.0;
        }
    }
    w.add_str("tokenizer.ggml.model", "llama");
    w.add_str("tokenizer.ggml.pre", "default");
    w.add("tokenizer.ggml.tokens", strings(tokens));
    w.add(
        "tokenizer.ggml.scores",
        Value::Array(scores.into_iter().map(Value::F32).collect()),
    );
    w.add(
        "tokenizer.ggml.token_type",
        Value::Array(types.into_iter().map(Value::I32).collect()),
    );
    Ok(n)
}

/// gguf-py's `SpecialVocab(dir, load_merges, n_vocab).add_to_gguf`.
fn special_vocab(
    w: &mut GgufWriter,
    dir: &Path,
    tok: &J,
    mut tcfg: Option<J>,
    config: Option<&J>,
    load_merges: bool,
    n_vocab: Option<usize>,
) -> Result<()> {
    let mut merges: Vec<String> = Vec::new();
    if load_merges {
        if let Some(list) = tok["model"].get("merges").and_then(J::as_array) {
            for m in list {
                match m {
                    J::String(s) => merges.push(s.clone()),
                    J::Array(pair) if pair.len() == 2 => {
                        let part = |v: &J| -> String {
                            v.as_str()
                                .unwrap_or_default()
                                .chars()
                                .map(|c| if c == ' ' { '\u{120}' } else { c })
                                .collect()
                        };
                        merges.push(format!("{} {}", part(&pair[0]), part(&pair[1])));
                    }
                    _ => {
                        return Err(Error::bad_input(
                            dir.join("tokenizer.json"),
                            "unknown merges format (expected \"a b\" strings or [a, b] pairs)",
                        ))
                    }
                }
            }
        }
    }
    let added = added_tokens(tok);
    // Insertion-ordered maps, as the Python dicts.
    let mut ids: Vec<(String, u64)> = Vec::new();
    let mut add_special: Vec<(String, bool)> = Vec::new();
    let set_add = |add: &mut Vec<(String, bool)>, typ: &str, v: bool, overwrite: bool| match add
        .iter_mut()
        .find(|(t, _)| t == typ)
    {
        Some(slot) if overwrite => slot.1 = v,
        Some(_) => {}
        None => add.push((typ.to_owned(), v)),
    };
    let mut types: Vec<&str> = SPECIAL_TYPES.iter().map(|(t, _)| *t).collect();
    let cfg_str = |c: &Option<J>, k: &str| -> Option<String> {
        match c.as_ref()?.get(k)? {
            J::String(s) if !s.is_empty() => Some(s.clone()),
            J::Object(o) => o.get("content")?.as_str().map(String::from),
            _ => None,
        }
    };
    let mut special_bos = cfg_str(&tcfg, "bos_token");
    let special_cls = cfg_str(&tcfg, "cls_token");
    let mut special_eos = cfg_str(&tcfg, "eos_token");
    let special_sep = cfg_str(&tcfg, "sep_token");
    if special_bos.is_none() && special_cls.is_some() {
        if let Some(J::Object(c)) = tcfg.as_mut() {
            c.insert("bos_token".into(), J::String(special_cls.clone().unwrap()));
            special_bos = special_cls.clone();
        }
    }
    if special_eos.is_none() && special_sep.is_some() {
        if let Some(J::Object(c)) = tcfg.as_mut() {
            c.insert("eos_token".into(), J::String(special_sep.clone().unwrap()));
            special_eos = special_sep.clone();
        }
    }
    if let Some(pp) = tok.get("post_processor").filter(|p| !p.is_null()) {
        let procs: Vec<&J> = match pp.get("processors").and_then(J::as_array) {
            Some(list) => list.iter().collect(),
            None => vec![pp],
        };
        for p in procs {
            match p["type"].as_str() {
                Some("ByteLevel") => {
                    set_add(&mut add_special, "bos", false, false);
                    set_add(&mut add_special, "eos", false, false);
                }
                Some("TemplateProcessing") => {
                    let single = p["single"].as_array().cloned().unwrap_or_default();
                    let special_id =
                        |item: &J| item["SpecialToken"]["id"].as_str().map(String::from);
                    if single.len() > 1 {
                        if let Some(first) = special_id(&single[0]) {
                            if tcfg.is_none() {
                                special_bos = Some(first.clone());
                            }
                            let is_bos = Some(&first) == special_bos.as_ref()
                                || Some(&first) == special_cls.as_ref();
                            if !is_bos && special_bos.is_none() {
                                if let Some(J::Object(c)) = tcfg.as_mut() {
                                    c.insert("bos_token".into(), J::String(first.clone()));
                                }
                                special_bos = Some(first.clone());
                            }
                            let is_bos = Some(&first) == special_bos.as_ref()
                                || Some(&first) == special_cls.as_ref();
                            set_add(&mut add_special, "bos", is_bos, true);
                        }
                        if let Some(last) = special_id(&single[single.len() - 1]) {
                            if tcfg.is_none() {
                                special_eos = Some(last.clone());
                            } else if Some(&last) != special_eos.as_ref() {
                                // The old EOS becomes EOT (or EOM), the template's last
                                // token the EOS.
                                let slot = if !types.contains(&"eot") {
                                    Some("eot")
                                } else if !types.contains(&"eom") {
                                    Some("eom")
                                } else {
                                    None
                                };
                                if let (Some(slot), Some(J::Object(c))) = (slot, tcfg.as_mut()) {
                                    types.push(slot);
                                    if let Some(e) = &special_eos {
                                        c.insert(format!("{slot}_token"), J::String(e.clone()));
                                    }
                                }
                                if let Some(J::Object(c)) = tcfg.as_mut() {
                                    c.insert("eos_token".into(), J::String(last.clone()));
                                }
                                special_eos = Some(last.clone());
                            }
                            set_add(
                                &mut add_special,
                                "eos",
                                Some(&last) == special_eos.as_ref(),
                                true,
                            );
                        }
                    }
                    if let Some(pair) = p["pair"].as_array() {
                        if let Some(add_sep) =
                            pair_separator(&single, pair, &special_sep, &special_eos)
                        {
                            set_add(&mut add_special, "sep", add_sep, true);
                        }
                    }
                }
                Some("RobertaProcessing") => {
                    for t in ["bos", "eos", "sep"] {
                        set_add(&mut add_special, t, true, true);
                    }
                }
                _ => {}
            }
        }
    }
    if let Some(c) = tcfg.as_ref() {
        for typ in &types {
            if let Some(b) = c.get(format!("add_{typ}_token")).and_then(J::as_bool) {
                set_add(&mut add_special, typ, b, false);
            }
            let content = match c.get(format!("{typ}_token")) {
                Some(J::String(s)) => Some(s.as_str()),
                Some(J::Object(o)) => o.get("content").and_then(J::as_str),
                _ => None,
            };
            if let Some(content) = content {
                if let Some(a) = added.iter().find(|a| a.content == content) {
                    set_special(&mut ids, typ, a.id, n_vocab);
                }
            }
        }
    }
    if let Some(cfg) = config {
        for typ in &types {
            let key = format!("{typ}_token_id");
            let id = cfg
                .get(&key)
                .or_else(|| cfg.get("text_config").and_then(|t| t.get(&key)));
            if let Some(id) = id.and_then(J::as_u64) {
                set_special(&mut ids, typ, id, n_vocab);
            }
        }
    }
    let chat_template = chat_template(dir, tcfg.as_ref())?;

    if !merges.is_empty() {
        w.add("tokenizer.ggml.merges", strings(merges));
    }
    for (typ, id) in ids {
        let key = SPECIAL_TYPES
            .iter()
            .find(|(t, _)| *t == typ)
            .map(|(_, k)| (*k).to_owned())
            .unwrap_or_else(|| format!("tokenizer.ggml.{typ}_token_id"));
        w.add(&key, Value::U32(id as u32));
    }
    for (typ, v) in add_special {
        // gguf-py has setters for these three only; others are skipped with a warning there.
        if matches!(typ.as_str(), "bos" | "eos" | "sep") {
            w.add(&format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(v));
        }
    }
    if let Some(t) = chat_template {
        w.add_str("tokenizer.chat_template", &t);
    }
    let (lower, strip) = normalizer_flags(&tok["normalizer"]);
    if let Some(b) = lower {
        w.add("tokenizer.ggml.normalizer.lowercase", Value::Bool(b));
    }
    if let Some(b) = strip {
        w.add("tokenizer.ggml.normalizer.strip_accents", Value::Bool(b));
    }
    Ok(())
}

fn set_special(ids: &mut Vec<(String, u64)>, typ: &str, id: u64, n_vocab: Option<usize>) {
    if n_vocab.is_some_and(|n| id as usize >= n) || ids.iter().any(|(t, _)| t == typ) {
        return;
    }
    ids.push((typ.to_owned(), id));
}

/// SpecialVocab's reading of a `pair` template: with the single template's leading and
/// trailing special tokens stripped, `A ... B` with something between decides
/// `add_sep_token` (true when a separator or EOS token sits there); None when it says nothing.
fn pair_separator(
    single: &[J],
    pair: &[J],
    sep: &Option<String>,
    eos: &Option<String>,
) -> Option<bool> {
    let special = |item: &J| item["SpecialToken"]["id"].as_str().map(String::from);
    let (first, last) = if single.len() > 1 {
        (special(&single[0]), special(&single[single.len() - 1]))
    } else {
        (None, None)
    };
    let start = usize::from(first.is_some() && pair.first().and_then(special) == first);
    let stop = if last.is_some() && pair.last().and_then(special) == last {
        pair.len().checked_sub(1)?
    } else {
        pair.len()
    };
    if start >= stop {
        return None;
    }
    let inner = &pair[start..stop];
    let seq = |item: &J| item["Sequence"]["id"].as_str().map(String::from);
    if seq(&inner[0]).as_deref() != Some("A")
        || seq(&inner[inner.len() - 1]).as_deref() != Some("B")
    {
        return None;
    }
    if inner.len() < 3 {
        return None;
    }
    let middle = &inner[1..inner.len() - 1];
    let is_sep = |item: &J| {
        let s = special(item);
        s.is_some() && (s == *sep || s == *eos)
    };
    let mut add = is_sep(&middle[0]) && last.is_none();
    if middle.len() == 2 && is_sep(&middle[1]) {
        add = true;
    }
    Some(add)
}

/// tokenizer_config's `chat_template`, else chat_template.jinja, else chat_template.json.
fn chat_template(dir: &Path, tcfg: Option<&J>) -> Result<Option<String>> {
    let Some(c) = tcfg else { return Ok(None) };
    match c.get("chat_template") {
        Some(J::String(s)) => return Ok(Some(s.clone())),
        Some(J::Array(list)) => {
            return Ok(list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str().map(String::from)))
        }
        _ => {}
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| Error::io(&jinja, e));
    }
    let json = dir.join("chat_template.json");
    Ok(read_json(&json)?.and_then(|j| j["chat_template"].as_str().map(String::from)))
}

/// gguf-py's `_parse_normalizer`.
fn normalizer_flags(n: &J) -> (Option<bool>, Option<bool>) {
    let mut lower = None;
    let mut strip = None;
    fn walk(n: &J, lower: &mut Option<bool>, strip: &mut Option<bool>) {
        match n["type"].as_str() {
            Some("Lowercase") => *lower = Some(true),
            Some("StripAccents") => *strip = Some(true),
            Some("BertNormalizer") => {
                if let Some(b) = n.get("lowercase").and_then(J::as_bool) {
                    *lower = Some(b);
                }
                if let Some(b) = n.get("strip_accents").and_then(J::as_bool) {
                    *strip = Some(b);
                }
            }
            Some("Sequence") => {
                for m in n["normalizers"].as_array().into_iter().flatten() {
                    walk(m, lower, strip);
                }
            }
            _ => {}
        }
    }
    walk(n, &mut lower, &mut strip);
    (lower, strip)
}

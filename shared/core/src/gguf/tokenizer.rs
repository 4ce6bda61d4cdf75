//! Rebuild a Hugging Face `tokenizer.json` (plus tokenizer_config.json and
//! generation_config.json) from the `tokenizer.ggml.*` metadata of a GGUF file.
//!
//! Follows transformers' GGUF converter (integrations/gguf/gguf_tokenizer_mapping.py):
//! `gpt2` files become a byte-level BPE with the pre-tokenizer named by `tokenizer.ggml.pre`;
//! `llama` (SentencePiece) files become a BPE with byte fallback, merges taken from the file or
//! derived from the vocabulary and the scores, a Metaspace pre-tokenizer and the usual
//! Replace/ByteFallback/Fuse/Strip decoder. Control tokens become special added tokens.

use super::reader::{GgufFile, Value};
use crate::error::Result;
use serde_json::{json, Map, Value as J};
use std::collections::{HashMap, HashSet};

const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;
const UNKNOWN: u64 = 2;

/// Everything written next to the weights.
pub struct TokenizerFiles {
    pub tokenizer_json: String,
    pub tokenizer_config: J,
    pub generation_config: J,
    pub bos_token_id: Option<u64>,
    pub eos_token_id: Option<u64>,
    pub pad_token_id: Option<u64>,
    pub vocab_size: usize,
}

/// GPT-2's byte → printable character table.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            let c = char::from_u32(256 + n).unwrap();
            n += 1;
            c
        };
    }
    table
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(add_prefix_space: bool, use_regex: bool) -> J {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": use_regex})
}

/// Pre-tokenizer for a byte-level vocabulary, by `tokenizer.ggml.pre`.
fn gpt2_pre_tokenizer(pre: Option<&str>) -> J {
    let split = |re: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            byte_level(false, false),
        ]})
    };
    match pre {
        Some("smollm") => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(false, true),
        ]}),
        Some(
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe" | "pixtral",
        ) => split(LLAMA3_SPLIT),
        Some("qwen2" | "deepseek-r1-qwen" | "megrez") => split(QWEN2_SPLIT),
        _ => byte_level(false, true),
    }
}

fn strings(g: &GgufFile, key: &str) -> Result<Option<Vec<String>>> {
    let Some(arr) = g.get_array(key)? else {
        return Ok(None);
    };
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| g.err(format!("metadata {key}[{i}] is not a string")))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn post_processor(bos: Option<&(String, u64)>, eos: Option<&(String, u64)>) -> Option<J> {
    if bos.is_none() && eos.is_none() {
        return None;
    }
    let mut single = vec![];
    let mut pair = vec![];
    let mut special = Map::new();
    if let Some((t, id)) = bos {
        single.push(json!({"SpecialToken": {"id": t, "type_id": 0}}));
        pair.push(json!({"SpecialToken": {"id": t, "type_id": 0}}));
        special.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    pair.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if let Some((t, id)) = eos {
        single.push(json!({"SpecialToken": {"id": t, "type_id": 0}}));
        pair.push(json!({"SpecialToken": {"id": t, "type_id": 0}}));
        special.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    if let Some((t, _)) = bos {
        pair.push(json!({"SpecialToken": {"id": t, "type_id": 1}}));
    }
    pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
    if let Some((t, _)) = eos {
        pair.push(json!({"SpecialToken": {"id": t, "type_id": 1}}));
    }
    Some(
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}),
    )
}

/// SentencePiece merges recovered from the vocabulary, as transformers' `generate_merges`
/// (with scores: best score first, ties by longer left piece, then longer right piece).
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    // Python dict semantics: the last index wins, the first occurrence keeps its position.
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut score: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if index.insert(t.as_str(), i).is_none() {
            order.push(t.as_str());
        }
        score.insert(t.as_str(), scores.get(i).copied().unwrap_or(0.0));
    }
    let mut merges: Vec<(&str, &str, f32)> = vec![];
    for t in order {
        let s = score[t];
        let mut local = vec![];
        for (pos, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(pos);
            if index.contains_key(l) && index.contains_key(r) {
                local.push((l, r, s));
            }
        }
        local.sort_by_key(|(l, r, _)| (index[l], index[r]));
        merges.extend(local);
    }
    // Python's sorted(..., reverse=True) is stable: equal keys keep their order.
    merges.sort_by(|a, b| {
        let ka = (a.2, a.0.chars().count(), a.1.chars().count());
        let kb = (b.2, b.0.chars().count(), b.1.chars().count());
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_owned(), r.to_owned()))
        .collect()
}

/// Build the tokenizer files. `context_length` fills `model_max_length`.
pub fn build(g: &GgufFile, context_length: Option<u64>) -> Result<TokenizerFiles> {
    let model = g
        .get_str("tokenizer.ggml.model")?
        .ok_or_else(|| {
            g.err("metadata tokenizer.ggml.model is missing: the file carries no tokenizer")
        })?
        .to_owned();
    let mut tokens = strings(g, "tokenizer.ggml.tokens")?
        .ok_or_else(|| g.err("metadata tokenizer.ggml.tokens is missing"))?;
    let n = tokens.len();
    let token_type: Vec<u64> = match g.get_array("tokenizer.ggml.token_type")? {
        Some(a) => {
            if a.len() != n {
                return Err(g.err(format!(
                    "tokenizer.ggml.token_type has {} entries for {n} tokens",
                    a.len()
                )));
            }
            a.iter().map(|v| v.as_u64().unwrap_or(1)).collect()
        }
        None => vec![1; n],
    };
    let id_key = |k: &str| -> Result<Option<u64>> {
        let id = g.get_u64(&format!("tokenizer.ggml.{k}"))?;
        if let Some(id) = id {
            if id as usize >= n {
                return Err(g.err(format!(
                    "tokenizer.ggml.{k} is {id}, past the {n} tokens of the vocabulary"
                )));
            }
        }
        Ok(id)
    };
    let bos_id = id_key("bos_token_id")?;
    let eos_id = id_key("eos_token_id")?;
    let unk_id = id_key("unknown_token_id")?;
    let pad_id = id_key("padding_token_id")?;
    let is_llama = model == "llama";
    let add_bos = g
        .get_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(is_llama);
    let add_eos = g.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);

    let mut added: Vec<J> = vec![];
    let added_token = |id: usize, content: &str, special: bool| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": special})
    };

    let (model_json, normalizer, pre_tokenizer, decoder, base_processor) = match model.as_str() {
        "gpt2" => {
            let table = bytes_to_unicode();
            let alphabet: HashSet<char> = table.iter().copied().collect();
            for t in tokens.iter_mut() {
                if !t.chars().all(|c| alphabet.contains(&c)) {
                    *t = t.bytes().map(|b| table[b as usize]).collect();
                }
            }
            for (i, (t, &ty)) in tokens.iter().zip(&token_type).enumerate() {
                if ty == CONTROL {
                    added.push(added_token(i, t, true));
                } else if ty == USER_DEFINED {
                    added.push(added_token(i, t, false));
                }
            }
            let merges: Vec<J> = strings(g, "tokenizer.ggml.merges")?
                .ok_or_else(|| g.err("metadata tokenizer.ggml.merges is missing (needed for a gpt2 tokenizer)"))?
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let mut parts = m.splitn(2, ' ');
                    match (parts.next(), parts.next()) {
                        (Some(a), Some(b)) if !b.contains(' ') => Ok(json!([a, b])),
                        _ => Err(g.err(format!(
                            "tokenizer.ggml.merges[{i}] {m:?} is not two tokens separated by a space"
                        ))),
                    }
                })
                .collect::<Result<_>>()?;
            let vocab: Map<String, J> = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), json!(i)))
                .collect();
            let m = json!({"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges});
            let pre = g.get_str("tokenizer.ggml.pre")?;
            (
                m,
                J::Null,
                gpt2_pre_tokenizer(pre),
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                Some(byte_level(false, true)),
            )
        }
        "llama" => {
            let scores: Vec<f32> = match g.get_array("tokenizer.ggml.scores")? {
                Some(a) => a
                    .iter()
                    .map(|v| match v {
                        Value::F32(f) => *f,
                        other => other.as_f64().unwrap_or(0.0) as f32,
                    })
                    .collect(),
                None => vec![0.0; n],
            };
            let merges: Vec<J> = match strings(g, "tokenizer.ggml.merges")? {
                Some(ms) => ms
                    .iter()
                    .map(|m| {
                        let (a, b) = m.split_once(' ').unwrap_or((m.as_str(), ""));
                        json!([a, b])
                    })
                    .collect(),
                None => merges_from_scores(&tokens, &scores)
                    .into_iter()
                    .map(|(a, b)| json!([a, b]))
                    .collect(),
            };
            for (i, (t, &ty)) in tokens.iter().zip(&token_type).enumerate() {
                if ty == CONTROL || (ty == UNKNOWN && Some(i as u64) == unk_id) {
                    added.push(added_token(i, t, true));
                } else if ty == USER_DEFINED {
                    added.push(added_token(i, t, false));
                }
            }
            let vocab: Map<String, J> = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), json!(i)))
                .collect();
            let unk = unk_id.map(|i| tokens[i as usize].clone());
            let m = json!({"type": "BPE", "dropout": null, "unk_token": unk,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges});
            let add_prefix_space = g.get_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            let scheme = if add_prefix_space { "first" } else { "never" };
            let mut dec = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_prefix_space {
                dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            (
                m,
                J::Null,
                json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": scheme, "split": false}),
                json!({"type": "Sequence", "decoders": dec}),
                None,
            )
        }
        other => {
            return Err(g.err(format!(
                "tokenizer.ggml.model {other:?} is not supported; supported: gpt2 (byte-level BPE), llama (SentencePiece)"
            )))
        }
    };

    let tok = |id: Option<u64>| id.map(|i| tokens[i as usize].clone());
    let bos_pair = if add_bos {
        bos_id.map(|i| (tokens[i as usize].clone(), i))
    } else {
        None
    };
    let eos_pair = if add_eos {
        eos_id.map(|i| (tokens[i as usize].clone(), i))
    } else {
        None
    };
    let template = post_processor(bos_pair.as_ref(), eos_pair.as_ref());
    let post = match (base_processor, template) {
        (Some(b), Some(t)) => json!({"type": "Sequence", "processors": [b, t]}),
        (Some(b), None) => b,
        (None, Some(t)) => t,
        (None, None) => J::Null,
    };
    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "model": model_json,
        "post_processor": post,
        "decoder": decoder,
    });
    // Round-trip through the tokenizers crate: validates the structure and writes it in the
    // library's canonical form.
    let text = serde_json::to_string(&tokenizer_json).expect("json");
    let tk = text.parse::<tokenizers::Tokenizer>().map_err(|e| {
        g.err(format!(
            "could not build a tokenizer from the GGUF metadata: {e}"
        ))
    })?;
    let tokenizer_json = tk
        .to_string(true)
        .map_err(|e| g.err(format!("could not serialize the tokenizer: {e}")))?;

    let mut cfg = Map::new();
    cfg.insert("add_bos_token".into(), json!(add_bos));
    cfg.insert("add_eos_token".into(), json!(add_eos));
    cfg.insert("bos_token".into(), json!(tok(bos_id)));
    cfg.insert("eos_token".into(), json!(tok(eos_id)));
    cfg.insert("pad_token".into(), json!(tok(pad_id)));
    cfg.insert("unk_token".into(), json!(tok(unk_id)));
    if let Some(t) = g.get_str("tokenizer.chat_template")? {
        cfg.insert("chat_template".into(), json!(t));
    }
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(c) = context_length {
        cfg.insert("model_max_length".into(), json!(c));
    }
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));

    let mut gen = Map::new();
    if let Some(b) = bos_id {
        gen.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = eos_id {
        gen.insert("eos_token_id".into(), json!(e));
    }
    if let Some(p) = pad_id {
        gen.insert("pad_token_id".into(), json!(p));
    }
    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config: J::Object(cfg),
        generation_config: J::Object(gen),
        bos_token_id: bos_id,
        eos_token_id: eos_id,
        pad_token_id: pad_id,
        vocab_size: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
    }

    #[test]
    fn spm_merges_follow_scores() {
        let tokens: Vec<String> = ["<unk>", "a", "b", "c", "ab", "abc", "bc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, -1.0, -2.0, -3.0, -0.5, -0.2, -0.7];
        let m = merges_from_scores(&tokens, &scores);
        assert_eq!(
            m,
            vec![
                ("ab".into(), "c".into()),
                ("a".into(), "bc".into()),
                ("a".into(), "b".into()),
                ("b".into(), "c".into()),
            ]
        );
    }
}

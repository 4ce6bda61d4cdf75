//! The `general.*` naming keys llama.cpp's converters write, derived as gguf-py's `Metadata`
//! derives them without a model card: from config.json's `_name_or_path` (when it looks like a
//! hub id), then from the folder's name (`SmolLM2-135M-Instruct` → name
//! `SmolLM2 135M Instruct`, basename `SmolLM2`, size label `135M`, fine-tune `Instruct`), and
//! the default sampling parameters of generation_config.json (`general.sampling.*`).
//!
//! A model card (README.md front matter: license, tags, languages, base models) is not read.

use super::reader::Value;
use super::writer::GgufWriter;
use regex::Regex;
use serde_json::Value as J;
use std::path::Path;
use std::sync::LazyLock;

/// What the name heuristics found.
#[derive(Debug, Default, PartialEq)]
pub struct Naming {
    pub name: Option<String>,
    pub organization: Option<String>,
    pub basename: Option<String>,
    pub finetune: Option<String>,
    pub version: Option<String>,
    pub size_label: Option<String>,
}

/// Adds, in gguf-py's order: the sampling keys, `general.name`, version, organization,
/// fine-tune, basename and size label (`total_params` gives it when the name does not; a
/// negative count, a LoRA's, gives none).
pub fn add_naming(w: &mut GgufWriter, dir: &Path, config: Option<&J>, total_params: i64) {
    let mut n = Naming::default();
    if let Some(id) = config
        .and_then(|c| c.get("_name_or_path"))
        .and_then(J::as_str)
        .filter(|id| id.matches('/').count() <= 1)
    {
        fill(&mut n, id, total_params);
    }
    // The path's last component as given (a symlink keeps its own name, as in Python);
    // `.` and the like fall back to the directory it stands for.
    let folder = dir
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .or_else(|| {
            dir.canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| "model".into());
    fill(&mut n, &folder, total_params);
    if n.size_label.is_none() && total_params > 0 {
        n.size_label = Some(size_label(total_params as u64));
    }
    add_sampling(w, dir);
    w.add_str("general.name", n.name.as_deref().unwrap_or(&folder));
    for (key, v) in [
        ("general.version", &n.version),
        ("general.organization", &n.organization),
        ("general.finetune", &n.finetune),
        ("general.basename", &n.basename),
        ("general.size_label", &n.size_label),
    ] {
        if let Some(v) = v {
            w.add_str(key, v);
        }
    }
}

/// `apply_metadata_heuristic` for one model id: fills what is still unknown.
fn fill(n: &mut Naming, id: &str, total_params: i64) {
    let c = model_id_components(id, total_params);
    let keep = |slot: &mut Option<String>, v: Option<String>| {
        if slot.is_none() {
            *slot = v;
        }
    };
    keep(&mut n.name, c.name.map(|s| id_to_title(&s)));
    keep(&mut n.organization, c.organization.map(|s| id_to_title(&s)));
    keep(&mut n.basename, c.basename);
    keep(&mut n.finetune, c.finetune);
    keep(&mut n.version, c.version);
    keep(&mut n.size_label, c.size_label);
}

/// generation_config.json's defaults as `general.sampling.*` (gguf-py's `Metadata.load`).
fn add_sampling(w: &mut GgufWriter, dir: &Path) {
    let Some(g) = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<J>(&t).ok())
        .filter(|g| g.as_object().is_some_and(|o| !o.is_empty()))
    else {
        return;
    };
    // The first source key present wins, even when it is null (Python's nested dict.get).
    let get = |keys: &[&str]| keys.iter().find_map(|k| g.get(*k)).filter(|v| !v.is_null());
    // gguf-py's setters: int32, float32 or string.
    enum Kind {
        Int,
        Float,
        Text,
    }
    let fields: [(&str, &[&str], Kind); 12] = [
        ("sequence", &["sequence"], Kind::Text),
        ("top_k", &["top_k"], Kind::Int),
        ("top_p", &["top_p"], Kind::Float),
        ("min_p", &["min_p"], Kind::Float),
        ("xtc_probability", &["xtc_probability"], Kind::Float),
        ("xtc_threshold", &["xtc_threshold"], Kind::Float),
        ("temp", &["temperature"], Kind::Float),
        ("penalty_last_n", &["penalty_last_n"], Kind::Int),
        (
            "penalty_repeat",
            &["penalty_repeat", "repetition_penalty"],
            Kind::Float,
        ),
        ("mirostat", &["mirostat"], Kind::Int),
        ("mirostat_tau", &["mirostat_tau"], Kind::Float),
        ("mirostat_eta", &["mirostat_eta"], Kind::Float),
    ];
    for (key, sources, kind) in fields {
        let Some(v) = get(sources) else { continue };
        let value = match kind {
            Kind::Int => v.as_i64().map(|x| Value::I32(x as i32)),
            Kind::Float => v.as_f64().map(|x| Value::F32(x as f32)),
            Kind::Text => v.as_str().map(|x| Value::String(x.to_owned())),
        };
        if let Some(value) = value {
            w.add(&format!("general.sampling.{key}"), value);
        }
    }
}

static VERSION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^(v|iter)?\d+([.]\d+)*$").unwrap());
static QUANT_TYPE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^(i?q\d(_\w)*|b?fp?(16|32))$").unwrap());
static SIZE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)^(([A]|\d+[x])?\d+([._]\d+)?[KMBT][\d]?|small|mini|medium|large|x?xl)$")
        .unwrap()
});
static FINETUNE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^(chat|instruct|vision|lora)$").unwrap());

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Basename,
    SizeLabel,
    Finetune,
    Version,
    Type,
}

/// gguf-py's `Metadata.get_model_id_components` (name, organization, basename, fine-tune,
/// version, size label of an `org/Name-7B-Instruct-v0.1`-style id).
pub fn model_id_components(id: &str, total_params: i64) -> Naming {
    if id.contains(' ') {
        return Naming {
            name: Some(id.to_owned()),
            ..Naming::default()
        };
    }
    let (org, full) = match id.split_once('/') {
        Some((o, f)) => (Some(o).filter(|o| !o.starts_with('.')), f),
        None => (None, id),
    };
    let mut parts: Vec<String> = full
        .split('-')
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect();
    let mut kinds: Vec<Vec<Kind>> = vec![Vec::new(); parts.len()];
    for i in 0..parts.len() {
        let part = parts[i].clone();
        if VERSION.is_match(&part) {
            kinds[i].push(Kind::Version);
        } else if QUANT_TYPE.is_match(&part) {
            kinds[i].push(Kind::Type);
            parts[i] = part.to_uppercase();
        } else if i > 0 && SIZE.is_match(&part) {
            let mut p: Vec<char> = part.replace('_', ".").chars().collect();
            if p.last().is_some_and(|c| c.is_numeric()) && p.len() >= 2 {
                // bloom-7b1 → 7.1b
                let (a, b) = (p[p.len() - 1], p[p.len() - 2]);
                p.truncate(p.len() - 2);
                p.extend(['.', a, b]);
            }
            if p.len() > 1 && p[p.len() - 2].is_numeric() && "kmbt".contains(p[p.len() - 1]) {
                let last = p.len() - 1;
                p[last] = p[last].to_ascii_uppercase();
            }
            if total_params != 0 {
                let head: String = p[..p.len() - 1].iter().collect();
                if let Ok(x) = head.parse::<f64>() {
                    let unit = " KMBT".find(p[p.len() - 1]).map(|e| e as i32).unwrap_or(-1);
                    let label = x * 1000f64.powi(unit);
                    let t = total_params;
                    let context_length = (t < 0 && label < (t.abs() / 8) as f64)
                        || (t > 0 && (label - t as f64).abs() > (7 * t / 8) as f64);
                    if context_length {
                        kinds[i].push(Kind::Finetune);
                        let last = p.len() - 1;
                        p[last] = p[last].to_ascii_lowercase();
                    }
                }
            }
            if kinds[i].is_empty() {
                kinds[i].push(Kind::SizeLabel);
            }
            parts[i] = p.into_iter().collect();
        } else if i > 0 && FINETUNE.is_match(&part) {
            kinds[i].push(if total_params < 0 && part.eq_ignore_ascii_case("lora") {
                Kind::Type
            } else {
                Kind::Finetune
            });
        }
    }
    // Word sizes (small, xl, ...) give way to a numeric one.
    let numeric_size = parts
        .iter()
        .zip(&kinds)
        .any(|(p, k)| k.contains(&Kind::SizeLabel) && p.chars().any(|c| c.is_numeric()));
    if numeric_size {
        for (p, k) in parts.iter().zip(kinds.iter_mut()) {
            if k.contains(&Kind::SizeLabel) && p.chars().all(char::is_alphabetic) {
                k.retain(|x| *x != Kind::SizeLabel);
            }
        }
    }
    let mut at_start = true;
    for (p, k) in parts.iter().zip(kinds.iter_mut()) {
        let alpha_start = p.chars().next().is_some_and(char::is_alphabetic);
        if at_start && ((k.is_empty() && alpha_start) || k.contains(&Kind::Version)) {
            k.push(Kind::Basename);
        } else {
            at_start = false;
            if k.is_empty() {
                k.push(Kind::Finetune);
            }
        }
    }
    for k in kinds.iter_mut().rev() {
        if k.contains(&Kind::Basename) && k.len() > 1 {
            k.retain(|x| *x != Kind::Basename);
        } else {
            break;
        }
    }
    let join = |f: &dyn Fn(&[Kind]) -> bool| -> Option<String> {
        let mut seen: Vec<&str> = Vec::new();
        for (p, k) in parts.iter().zip(&kinds) {
            if f(k) {
                seen.push(p);
            }
        }
        (!seen.is_empty()).then(|| seen.join("-"))
    };
    let mut basename = join(&|k| k.contains(&Kind::Basename));
    let size_label = {
        let mut uniq: Vec<&str> = Vec::new();
        for (p, k) in parts.iter().zip(&kinds) {
            if k.contains(&Kind::SizeLabel) && !uniq.contains(&p.as_str()) {
                uniq.push(p);
            }
        }
        (!uniq.is_empty()).then(|| uniq.join("-"))
    };
    let finetune = join(&|k| k.contains(&Kind::Finetune));
    let version = join(&|k| k.contains(&Kind::Version) && !k.contains(&Kind::Basename));
    if size_label.is_none() && finetune.is_none() && version.is_none() {
        basename = None;
    }
    Naming {
        name: Some(full.to_owned()),
        organization: org.map(String::from),
        basename,
        finetune,
        version,
        size_label,
    }
}

/// gguf-py's `Metadata.id_to_title`: '-' becomes a space, and every all-lowercase word that
/// is not a version (`v1.2`) or starts with a digit is title-cased the way Python's
/// `str.title` does it.
pub fn id_to_title(id: &str) -> String {
    let title = |w: &str| {
        let mut out = String::new();
        let mut prev_cased = false;
        for c in w.chars() {
            let cased = c.is_lowercase() || c.is_uppercase();
            if cased && prev_cased {
                out.extend(c.to_lowercase());
            } else if cased {
                out.extend(c.to_uppercase());
            } else {
                out.push(c);
            }
            prev_cased = cased;
        }
        out
    };
    let is_lower =
        |w: &str| w.chars().any(char::is_lowercase) && !w.chars().any(char::is_uppercase);
    let is_version = |w: &str| {
        w.starts_with(|c: char| c.is_ascii_digit())
            || w.strip_prefix('v').is_some_and(|v| {
                !v.is_empty()
                    && v.split('.')
                        .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
            })
    };
    id.trim()
        .replace('-', " ")
        .split_whitespace()
        .map(|w| {
            if is_lower(w) && !is_version(w) {
                title(w)
            } else {
                w.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// gguf-py's `size_label` (`model_weight_count_rounded_notation` with 2 digits): 103104 →
/// `103K`, 134515008 → `135M`, 1235814400 → `1.2B`.
pub fn size_label(n: u64) -> String {
    let n = n as f64;
    let (scaled, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    let digits = format!("{}", scaled.round_ties_even() as u64);
    let digits = digits.trim_start_matches('0').len();
    let fix = 2usize.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_like_gguf_py() {
        // Expected values printed by gguf-py's Metadata.id_to_title.
        assert_eq!(id_to_title("llama_gqa_lora"), "Llama_Gqa_Lora");
        assert_eq!(
            id_to_title("SmolLM2-135M-Instruct"),
            "SmolLM2 135M Instruct"
        );
        assert_eq!(id_to_title("smollm2-nf4"), "Smollm2 Nf4");
        assert_eq!(id_to_title("my-model-v1.2"), "My Model v1.2");
        assert_eq!(id_to_title("qwen2.5-7b"), "Qwen2.5 7b");
    }

    #[test]
    fn size_labels_like_gguf_py() {
        // Expected values printed by gguf.size_label.
        assert_eq!(size_label(103_104), "103K");
        assert_eq!(size_label(134_515_008), "135M");
        assert_eq!(size_label(1_235_814_400), "1.2B");
        assert_eq!(size_label(7_241_732_096), "7.2B");
        assert_eq!(size_label(999), "1.0K");
    }

    #[test]
    fn model_ids_split_like_gguf_py() {
        // (id, params) → (basename, finetune, version, size label), as printed by gguf-py's
        // Metadata.get_model_id_components.
        let cases: &[(&str, i64, [Option<&str>; 4])] = &[
            (
                "SmolLM2-135M-Instruct",
                134515008,
                [Some("SmolLM2"), Some("Instruct"), None, Some("135M")],
            ),
            (
                "Llama-3.2-1B-Instruct",
                1235814400,
                [Some("Llama-3.2"), Some("Instruct"), None, Some("1B")],
            ),
            (
                "Mistral-7B-Instruct-v0.3",
                7248023552,
                [Some("Mistral"), Some("Instruct"), Some("v0.3"), Some("7B")],
            ),
            (
                "Qwen2.5-0.5B-Instruct",
                494032768,
                [Some("Qwen2.5"), Some("Instruct"), None, Some("0.5B")],
            ),
            (
                "bloom-7b1",
                7069016064,
                [Some("bloom"), None, None, Some("7.1B")],
            ),
            ("smollm2", 134515008, [None, None, None, None]),
            ("llama_gqa", 103104, [None, None, None, None]),
            (
                "my-model-v1.2",
                1000,
                [Some("my-model"), None, Some("v1.2"), None],
            ),
            (
                "TinyLlama-1.1B-Chat-v1.0",
                1100048384,
                [Some("TinyLlama"), Some("Chat"), Some("v1.0"), Some("1.1B")],
            ),
            (
                "Phi-3-mini-4k-instruct",
                3821079552,
                [Some("Phi-3"), Some("4k-instruct"), None, Some("mini")],
            ),
            (
                "Meta-Llama-3-8B",
                8030261248,
                [Some("Meta-Llama-3"), None, None, Some("8B")],
            ),
            (
                "gemma-2-9b-it-Q4_K_M",
                9241705984,
                [Some("gemma-2"), Some("it"), None, Some("9B")],
            ),
            (
                "model-32k",
                135000000,
                [Some("model"), Some("32k"), None, None],
            ),
            ("smollm2-nf4", 134515008, [None, None, None, None]),
            (
                "run-2024-05-01",
                1000,
                [Some("run"), None, Some("2024-05-01"), None],
            ),
        ];
        for (id, params, [basename, finetune, version, size]) in cases {
            let n = model_id_components(id, *params);
            let got = [
                n.basename.as_deref(),
                n.finetune.as_deref(),
                n.version.as_deref(),
                n.size_label.as_deref(),
            ];
            assert_eq!(got, [*basename, *finetune, *version, *size], "{id}");
            assert_eq!(n.name.as_deref(), Some(*id));
        }
    }
}

//! Where on-policy training gets its rewards from.
//!
//! - [`RewardModel`]: an rm-train / PEFT SEQ_CLS adapter on the policy's base (no second copy
//!   of the weights), or a separate one-label `…ForSequenceClassification` checkpoint.
//!   ppo-train's only source, and grpo-train's `--reward model:DIR`.
//! - grpo-train's verifiable rewards ([`RewardFn`]): a regular expression the completion must
//!   match, the record's reference answer, or any program that reads the completions as JSON
//!   lines and prints one number per line (TRL's reward functions, as a Unix filter).

use super::params::TrainState;
use super::reward_command::{run_command, RewardServer};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenizer::TextTokenizer;
use crate::train::backend::Backend;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The reward model resident for the run.
pub struct RewardModel {
    /// None: the policy's own base model.
    model: Option<Model>,
    state: TrainState,
    pad: Option<u32>,
    /// Where its passes run (on a GPU: its own copy of the weights on the device).
    backend: Backend,
}

impl RewardModel {
    /// `dir`: a reward adapter, a `…ForSequenceClassification` folder, or the base that
    /// `adapter` belongs to; `policy_dir` and `policy_base`: the policy's folder and model.
    pub fn load(
        dir: &Path,
        adapter: Option<&Path>,
        device: crate::gpu::DeviceSpec,
        policy_dir: &Path,
        policy_base: &Model,
        tok: &TextTokenizer,
    ) -> Result<Self> {
        let is_adapter = dir.join("adapter_config.json").exists();
        let (base, adapter): (Option<&Path>, Option<&Path>) = match (adapter, is_adapter) {
            (Some(_), true) => {
                return Err(Error::usage(format!(
                    "--reward-model {} is an adapter; give its base with --reward-model and the adapter with --reward-adapter, or the adapter alone",
                    dir.display()
                )))
            }
            (Some(a), false) => (Some(dir), Some(a)),
            (None, true) => (None, Some(dir)),
            (None, false) => (Some(dir), None),
        };
        let shared = base.is_none_or(|b| same_dir(b, policy_dir));
        let reward = match adapter {
            Some(a) => {
                let model = if shared {
                    None
                } else {
                    Some(Model::load(base.expect("base"))?)
                };
                let m = model.as_ref().unwrap_or(policy_base);
                let state = super::preference::load_reward_adapter(m, a)?;
                let pad = super::preference::reward_pad(m, tok);
                let backend = Backend::for_eval(device, m, &state)?;
                RewardModel {
                    model,
                    state,
                    pad,
                    backend,
                }
            }
            None => {
                let dir = base.expect("reward model folder");
                let (m, state) = super::preference::load_reward_model(dir, None)?;
                let pad = super::preference::reward_pad(&m, tok);
                let backend = Backend::for_eval(device, &m, &state)?;
                RewardModel {
                    model: Some(m),
                    state,
                    pad,
                    backend,
                }
            }
        };
        let vocab = reward
            .model
            .as_ref()
            .map_or(policy_base.config.vocab, |m| m.config.vocab);
        if vocab != policy_base.config.vocab {
            return Err(Error::bad_input(
                dir,
                format!(
                    "the reward model's vocabulary has {vocab} tokens, the policy's {}: it must share the policy's tokenizer",
                    policy_base.config.vocab
                ),
            ));
        }
        Ok(reward)
    }

    /// A separate model of its own (None: it runs on the policy's base).
    pub fn own_model(&self) -> Option<&Model> {
        self.model.as_ref()
    }

    /// The score of every token sequence (prompt + response).
    pub fn score(
        &mut self,
        policy_base: &Model,
        seqs: &[Vec<u32>],
        batch: usize,
    ) -> Result<Vec<f32>> {
        let m = self.model.as_ref().unwrap_or(policy_base);
        super::preference::score_sequences_on(
            &mut self.backend,
            m,
            &mut self.state,
            seqs,
            self.pad,
            batch,
        )
    }
}

pub fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// A reward function as given on the command line: `KIND:ARGUMENT`.
#[derive(Clone, Debug, PartialEq)]
pub enum RewardSpec {
    /// `model:DIR`: a reward model (rm-train adapter or sequence-classification folder).
    Model(PathBuf),
    /// `regex:PATTERN`: 1 when the completion contains a match, else 0.
    Regex(String),
    /// `answer:FIELD`: 1 when the completion's final answer equals the record's FIELD.
    Answer(String),
    /// `cmd:COMMAND`: a shell command run once per step; JSON lines in, one number per line out.
    Command(String),
    /// `serve:COMMAND`: a shell command started once, answering each completion with a line.
    Serve(String),
}

impl RewardSpec {
    pub fn parse(s: &str) -> Result<Self> {
        let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
        if arg.is_empty() {
            return Err(Error::usage(format!(
                "--reward {s}: expected KIND:ARGUMENT with KIND model, regex, answer, cmd or serve (e.g. answer:answer, cmd:'python3 score.py')"
            )));
        }
        Ok(match kind {
            "model" => Self::Model(PathBuf::from(arg)),
            "regex" => Self::Regex(arg.to_string()),
            "answer" => Self::Answer(arg.to_string()),
            "cmd" => Self::Command(arg.to_string()),
            "serve" => Self::Serve(arg.to_string()),
            _ => {
                return Err(Error::usage(format!(
                "--reward {s}: unknown kind {kind:?}; expected model, regex, answer, cmd or serve"
            )))
            }
        })
    }

    /// The name its mean is logged under (`reward_<name>`).
    pub fn name(&self, index: usize) -> String {
        let kind = match self {
            Self::Model(_) => "model",
            Self::Regex(_) => "regex",
            Self::Answer(_) => "answer",
            Self::Command(_) => "cmd",
            Self::Serve(_) => "serve",
        };
        format!("{kind}{index}")
    }
}

/// One completion as the reward functions see it.
pub struct Scored<'a> {
    /// The prompt as the model saw it (chat template included) and the completion, decoded
    /// without special tokens.
    pub prompt: &'a str,
    pub completion: &'a str,
    /// Whether it ended with a stop token (false: cut at the length limit).
    pub stopped: bool,
    /// The prompt's record, the file it is in and its line there.
    pub record: &'a Value,
    pub file: &'a Path,
    pub line: usize,
    /// Prompt and completion token ids (what a reward model scores).
    pub ids: &'a [u32],
}

/// A reward function ready to score.
pub enum RewardFn {
    Model(Box<RewardModel>),
    Regex(regex::Regex),
    Answer(String),
    Command(String),
    /// Started at its first use (not for `--plan`), stopped when dropped.
    Serve(String, Option<Box<RewardServer>>),
}

impl RewardFn {
    pub fn new(
        spec: &RewardSpec,
        device: crate::gpu::DeviceSpec,
        policy_dir: &Path,
        policy_base: &Model,
        tok: &TextTokenizer,
    ) -> Result<Self> {
        Ok(match spec {
            RewardSpec::Model(dir) => Self::Model(Box::new(RewardModel::load(
                dir,
                None,
                device,
                policy_dir,
                policy_base,
                tok,
            )?)),
            RewardSpec::Regex(p) => Self::Regex(
                regex::Regex::new(p)
                    .map_err(|e| Error::usage(format!("--reward regex:{p}: {e}")))?,
            ),
            RewardSpec::Answer(f) => Self::Answer(f.clone()),
            RewardSpec::Command(c) => Self::Command(c.clone()),
            RewardSpec::Serve(c) => Self::Serve(c.clone(), None),
        })
    }

    /// Refuses, before any training, a record this function could never read (an answer
    /// field that is neither text nor a number).
    pub fn check_record(&self, record: &Value, file: &Path, line: usize) -> Result<()> {
        if let Self::Answer(field) = self {
            reference_answer(record, field)
                .map_err(|e| Error::bad_input(file, format!("line {line}: {e}")))?;
        }
        Ok(())
    }

    /// One reward per completion (NaN: this function cannot score it).
    pub fn score(
        &mut self,
        policy_base: &Model,
        items: &[Scored],
        batch: usize,
    ) -> Result<Vec<f64>> {
        match self {
            Self::Model(rm) => {
                let seqs: Vec<Vec<u32>> = items.iter().map(|s| s.ids.to_vec()).collect();
                Ok(rm
                    .score(policy_base, &seqs, batch)?
                    .into_iter()
                    .map(f64::from)
                    .collect())
            }
            Self::Regex(re) => Ok(items
                .iter()
                .map(|s| f64::from(u8::from(re.is_match(s.completion))))
                .collect()),
            Self::Answer(field) => items
                .iter()
                .map(|s| {
                    let gold = reference_answer(s.record, field)
                        .map_err(|e| Error::bad_input(s.file, format!("line {}: {e}", s.line)))?;
                    Ok(match gold {
                        None => f64::NAN,
                        Some(g) => f64::from(u8::from(
                            final_answer(s.completion).is_some_and(|a| same_answer(&a, &g)),
                        )),
                    })
                })
                .collect(),
            Self::Command(cmd) => run_command(cmd, items),
            Self::Serve(cmd, server) => {
                let server = match server {
                    Some(s) => s,
                    None => server.insert(Box::new(RewardServer::start(cmd)?)),
                };
                server.score(items)
            }
        }
    }
}

/// The record's reference answer: FIELD as a string or number; a GSM8K-style solution keeps
/// only what follows its last `####`. None when the record has no such field (or it is null).
fn reference_answer(record: &Value, field: &str) -> std::result::Result<Option<String>, String> {
    let v = match record.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v,
    };
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => {
            return Err(format!(
                "{field:?} must be a string or a number for --reward answer:{field}"
            ))
        }
    };
    Ok(Some(match s.rfind("####") {
        Some(i) => s[i + 4..].trim().to_string(),
        None => s.trim().to_string(),
    }))
}

/// The final answer a completion gives: the last `\boxed{…}`, else the last
/// `<answer>…</answer>`, else what follows the last `####` (to the end of its line), else the
/// last number in the text.
pub fn final_answer(text: &str) -> Option<String> {
    if let Some(i) = text.rfind("\\boxed{") {
        let rest = &text[i + 7..];
        let mut depth = 1;
        for (j, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(rest[..j].trim().to_string());
                    }
                }
                _ => {}
            }
        }
    }
    if let Some(end) = text.rfind("</answer>") {
        if let Some(start) = text[..end].rfind("<answer>") {
            return Some(text[start + 8..end].trim().to_string());
        }
    }
    if let Some(i) = text.rfind("####") {
        let line = text[i + 4..].lines().next().unwrap_or("").trim();
        if !line.is_empty() {
            return Some(line.to_string());
        }
    }
    last_number(text)
}

/// The last number in `text` (digits with optional sign, thousands commas and decimals).
fn last_number(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut end = b.len();
    while end > 0 && !b[end - 1].is_ascii_digit() {
        end -= 1;
    }
    if end == 0 {
        return None;
    }
    let mut start = end;
    while start > 0 {
        let c = b[start - 1];
        let digit_follows = start < end && b[start].is_ascii_digit();
        let digit_before = start >= 2 && b[start - 2].is_ascii_digit();
        if c.is_ascii_digit() || ((c == b',' || c == b'.') && digit_follows && digit_before) {
            start -= 1;
        } else {
            break;
        }
    }
    if start > 0 && b[start - 1] == b'-' {
        start -= 1;
    }
    Some(text[start..end].to_string())
}

/// Answers compare as numbers when both are numbers (1,000 = 1000.0), else as trimmed,
/// lower-cased text without surrounding `$` and a final period.
pub fn same_answer(a: &str, b: &str) -> bool {
    fn norm(s: &str) -> String {
        let s = s
            .trim()
            .trim_matches('$')
            .trim()
            .trim_end_matches('.')
            .trim();
        s.to_lowercase()
    }
    fn number(s: &str) -> Option<f64> {
        norm(s).replace(',', "").parse::<f64>().ok()
    }
    match (number(a), number(b)) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-6 * y.abs().max(1.0),
        _ => norm(a) == norm(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn final_answers_are_found_where_solutions_put_them() {
        assert_eq!(
            final_answer("so \\boxed{\\frac{1}{2}} done").as_deref(),
            Some("\\frac{1}{2}")
        );
        assert_eq!(final_answer("<answer> 42 </answer>").as_deref(), Some("42"));
        assert_eq!(
            final_answer("She pays 3*4=12.\n#### 12\n").as_deref(),
            Some("12")
        );
        assert_eq!(
            final_answer("it costs $1,250.50.").as_deref(),
            Some("1,250.50")
        );
        assert_eq!(final_answer("down to -7 degrees").as_deref(), Some("-7"));
        assert_eq!(final_answer("no digits here"), None);
    }

    #[test]
    fn answers_compare_as_numbers_or_text() {
        assert!(same_answer("1,000", "1000.0"));
        assert!(same_answer("$5.", "5"));
        assert!(!same_answer("5", "6"));
        assert!(same_answer(" Paris ", "paris"));
        let rec = json!({"answer": "Natalia sold 48/2 = 24 clips.\n#### 72"});
        assert_eq!(
            reference_answer(&rec, "answer").unwrap().as_deref(),
            Some("72")
        );
        assert_eq!(reference_answer(&json!({"x": 3}), "answer").unwrap(), None);
    }

    #[test]
    fn specs_parse_and_name_themselves() {
        assert_eq!(
            RewardSpec::parse("cmd:python3 -c 'print(1)'").unwrap(),
            RewardSpec::Command("python3 -c 'print(1)'".into())
        );
        assert_eq!(RewardSpec::parse("regex:^a").unwrap().name(2), "regex2");
        assert!(RewardSpec::parse("answer").is_err());
        assert!(RewardSpec::parse("bogus:x").is_err());
    }

    #[test]
    fn a_command_scores_json_lines() {
        let rec = json!({"answer": 3});
        let items: Vec<Scored> = ["a", "bb", "ccc"]
            .iter()
            .map(|c| Scored {
                prompt: "p",
                completion: c,
                stopped: true,
                record: &rec,
                file: Path::new("p.jsonl"),
                line: 1,
                ids: &[],
            })
            .collect();
        // the length of each completion, except "null" for the second
        let cmd = r#"n=0; while IFS= read -r l; do n=$((n+1)); if [ $n = 2 ]; then echo null; else echo "$l" | sed 's/.*"completion":"\([a-z]*\)".*/\1/' | awk '{print length($0)}'; fi; done"#;
        let r = run_command(cmd, &items).unwrap();
        assert_eq!(r[0], 1.0);
        assert!(r[1].is_nan());
        assert_eq!(r[2], 3.0);
        let e = run_command("echo 1", &items).unwrap_err().to_string();
        assert!(e.contains("printed 1 lines for 3 completions"), "{e}");
        let e = run_command("exit 3", &items).unwrap_err().to_string();
        assert!(e.contains("exited with"), "{e}");
    }
}

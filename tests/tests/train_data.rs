//! The training data pipeline: formats, loss masks, truncation, auto-detection, bad records,
//! packing and the --check-data report.

use peftkit_core::data::Record;
use peftkit_core::tokenizer::{Message, TextTokenizer};
use peftkit_core::train::data::{
    check_data_report, detect_format, load_examples, pack, DataFormat, DataOptions, Example,
};
use peftkit_tests::fixtures;
use serde_json::json;
use std::path::{Path, PathBuf};

const IGN: i32 = -100;

fn tok(name: &str) -> TextTokenizer {
    TextTokenizer::load(&fixtures().join("models").join(name)).unwrap()
}

fn opts(format: DataFormat, max_len: usize) -> DataOptions {
    DataOptions {
        format,
        max_len,
        train_on_prompt: false,
        skip_bad_lines: false,
        drop_long: false,
    }
}

fn write(dir: &tempfile::TempDir, name: &str, content: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn jsonl(values: &[serde_json::Value]) -> String {
    values
        .iter()
        .map(|v| v.to_string() + "\n")
        .collect::<String>()
}

fn load(
    path: &Path,
    t: &TextTokenizer,
    o: &DataOptions,
) -> (Vec<Example>, peftkit_core::train::data::DataStats) {
    load_examples(path, t, o).unwrap_or_else(|e| panic!("load failed: {e}"))
}

fn err(path: &Path, t: &TextTokenizer, o: &DataOptions) -> String {
    match load_examples(path, t, o) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn as_labels(ids: &[u32]) -> Vec<i32> {
    ids.iter().map(|&i| i as i32).collect()
}

/// Expected labels: the first `masked` positions −100 (and always position 0), the rest = ids.
fn masked_labels(ids: &[u32], masked: usize) -> Vec<i32> {
    let mut l = as_labels(ids);
    for x in l.iter_mut().take(masked.max(1)) {
        *x = IGN;
    }
    l
}

/// Runs of target positions as (start, end) token ranges.
fn target_runs(labels: &[i32]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < labels.len() {
        if labels[i] != IGN {
            let s = i;
            while i < labels.len() && labels[i] != IGN {
                i += 1;
            }
            runs.push((s, i));
        } else {
            i += 1;
        }
    }
    runs
}

fn check_aligned(ex: &Example) {
    assert_eq!(ex.ids.len(), ex.labels.len());
    assert_eq!(ex.labels[0], IGN, "token 0 is never a target");
    for (&i, &l) in ex.ids.iter().zip(&ex.labels) {
        assert!(l == IGN || l == i as i32);
    }
}

const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:";
const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:";

// ---------------------------------------------------------------------------------------------
// Formats

#[test]
fn format_names_parse_and_display() {
    for (s, f) in [
        ("auto", DataFormat::Auto),
        ("text", DataFormat::Text),
        ("alpaca", DataFormat::Alpaca),
        ("prompt-completion", DataFormat::PromptCompletion),
        ("prompt_completion", DataFormat::PromptCompletion),
        ("messages", DataFormat::Messages),
        ("sharegpt", DataFormat::ShareGpt),
        ("ShareGPT", DataFormat::ShareGpt),
    ] {
        assert_eq!(s.parse::<DataFormat>().unwrap(), f);
    }
    for f in [
        DataFormat::Auto,
        DataFormat::Text,
        DataFormat::Alpaca,
        DataFormat::PromptCompletion,
        DataFormat::Messages,
        DataFormat::ShareGpt,
    ] {
        assert_eq!(f.to_string().parse::<DataFormat>().unwrap(), f);
    }
    let e = "jsonl".parse::<DataFormat>().unwrap_err();
    assert!(e.contains("'jsonl'") && e.contains("prompt-completion") && e.contains("sharegpt"));
}

#[test]
fn text_all_tokens_are_targets_and_eos_appended() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "t.jsonl", &jsonl(&[json!({"text": "hello world"})]));
    // ChatML tokenizer: no BOS; EOS = <|im_end|>.
    let t = tok("llama_gqa");
    let (ex, st) = load(&p, &t, &opts(DataFormat::Text, 64));
    let mut ids = t.encode("hello world").unwrap();
    ids.push(t.eos_id().unwrap());
    assert_eq!(ex[0].ids, ids);
    assert_eq!(ex[0].labels, masked_labels(&ids, 1));
    assert_eq!(st.records, 1);
    assert_eq!(st.tokens, ids.len());
    assert_eq!(st.loss_tokens, ids.len() - 1);
    assert_eq!(st.format, DataFormat::Text);

    // Llama-2 tokenizer: BOS from the config, which is masked (token 0).
    let t = tok("llama_untied");
    let (ex, _) = load(&p, &t, &opts(DataFormat::Auto, 64));
    let mut ids = t.encode("hello world").unwrap();
    assert_eq!(ids[0], t.bos_id().unwrap());
    ids.push(t.eos_id().unwrap());
    assert_eq!(ex[0].ids, ids);
    assert_eq!(ex[0].labels, masked_labels(&ids, 1));

    // A text that already ends with EOS gets no second one.
    let p = write(
        &dir,
        "e.jsonl",
        &jsonl(&[json!({"text": "hello world</s>"})]),
    );
    let (ex, _) = load(&p, &t, &opts(DataFormat::Text, 64));
    assert_eq!(ex[0].ids, t.encode("hello world</s>").unwrap());
}

#[test]
fn text_txt_file_one_sample_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "t.txt", "first line\n\nsecond line\n");
    let t = tok("llama_gqa");
    let (ex, st) = load(&p, &t, &opts(DataFormat::Auto, 64));
    assert_eq!(ex.len(), 2);
    assert_eq!(st.format, DataFormat::Text);
    let mut ids = t.encode("second line").unwrap();
    ids.push(t.eos_id().unwrap());
    assert_eq!(ex[1].ids, ids);
    let e = err(&p, &t, &opts(DataFormat::Alpaca, 64));
    assert!(e.contains("t.txt") && e.contains("plain text"), "{e}");
}

#[test]
fn alpaca_prompt_masked_and_eos_target() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "a.json",
        &json!([
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        ])
        .to_string(),
    );
    for name in ["llama_gqa", "llama_untied"] {
        let t = tok(name);
        let eos = t.eos_id().unwrap();
        let (ex, st) = load(&p, &t, &opts(DataFormat::Auto, 256));
        assert_eq!(st.format, DataFormat::Alpaca);
        assert_eq!(ex.len(), 2);
        for (e, (prompt, out)) in ex
            .iter()
            .zip([(ALPACA_WITH_INPUT, "5"), (ALPACA_NO_INPUT, "Hi!")])
        {
            let p_ids = t.encode(prompt).unwrap();
            let mut ids = p_ids.clone();
            ids.extend(t.encode_plain(out).unwrap());
            ids.push(eos);
            assert_eq!(e.ids, ids, "{name}");
            assert_eq!(e.labels, masked_labels(&ids, p_ids.len()), "{name}");
            assert_eq!(*e.labels.last().unwrap(), eos as i32, "EOS is a target");
            check_aligned(e);
        }
        // train_on_prompt: everything but token 0.
        let mut o = opts(DataFormat::Alpaca, 256);
        o.train_on_prompt = true;
        let (ex2, st2) = load(&p, &t, &o);
        assert_eq!(ex2[0].ids, ex[0].ids);
        assert_eq!(ex2[0].labels, masked_labels(&ex[0].ids, 1));
        assert!(st2.loss_tokens > st.loss_tokens);
    }
}

#[test]
fn alpaca_jsonl_and_missing_input() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "a.jsonl",
        &jsonl(&[json!({"instruction": "Say hi.", "output": "Hi!"})]),
    );
    let t = tok("llama_gqa");
    let (ex, _) = load(&p, &t, &opts(DataFormat::Auto, 256));
    let p_ids = t.encode(ALPACA_NO_INPUT).unwrap();
    assert_eq!(&ex[0].ids[..p_ids.len()], &p_ids[..]);
}

#[test]
fn prompt_completion_strings() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "pc.jsonl",
        &jsonl(&[json!({"prompt": "The capital of France is", "completion": " Paris."})]),
    );
    for name in ["llama_gqa", "llama_untied"] {
        let t = tok(name);
        let (ex, st) = load(&p, &t, &opts(DataFormat::Auto, 64));
        assert_eq!(st.format, DataFormat::PromptCompletion);
        let p_ids = t.encode("The capital of France is").unwrap();
        let mut ids = p_ids.clone();
        ids.extend(t.encode_plain(" Paris.").unwrap());
        ids.push(t.eos_id().unwrap());
        assert_eq!(ex[0].ids, ids);
        assert_eq!(ex[0].labels, masked_labels(&ids, p_ids.len()));
        let mut o = opts(DataFormat::PromptCompletion, 64);
        o.train_on_prompt = true;
        let (ex, _) = load(&p, &t, &o);
        assert_eq!(ex[0].labels, masked_labels(&ids, 1));
    }
}

fn msg(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

#[test]
fn messages_chatml_assistant_only() {
    let t = tok("llama_gqa");
    let eos = t.eos_id().unwrap();
    assert_eq!(t.pad_id(), Some(eos), "fixture has pad == eos");
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "m.jsonl",
        &jsonl(&[json!({"messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you"},
        ]})]),
    );
    let (ex, st) = load(&p, &t, &opts(DataFormat::Auto, 256));
    assert_eq!(st.format, DataFormat::Messages);
    let ex = &ex[0];
    check_aligned(ex);
    let msgs = [
        msg("user", "Hi"),
        msg("assistant", "Hello there"),
        msg("user", "Bye"),
        msg("assistant", "See you"),
    ];
    let full = t.apply_chat_template(&msgs, false).unwrap();
    assert_eq!(ex.ids, t.encode_plain(&full).unwrap());

    // Expected target runs: the assistant content + <|im_end|>, starting right after the
    // generation prompt; the newline after <|im_end|> is not a target.
    let mut expected = Vec::new();
    for i in [1, 3] {
        let before = t.apply_chat_template(&msgs[..i], true).unwrap();
        let start = t.encode_plain(&before).unwrap().len();
        let turn = t
            .encode_plain(&format!("{}<|im_end|>", msgs[i].content))
            .unwrap();
        assert_eq!(&ex.ids[start..start + turn.len()], &turn[..]);
        assert_eq!(*turn.last().unwrap(), eos);
        expected.push((start, start + turn.len()));
    }
    assert_eq!(target_runs(&ex.labels), expected);
    // The <|im_end|> of the system and user turns stays masked; every assistant one is a target.
    let eos_targets = ex
        .ids
        .iter()
        .zip(&ex.labels)
        .filter(|(&i, &l)| i == eos && l != IGN)
        .count();
    assert_eq!(eos_targets, 2);
    assert_eq!(*ex.labels.last().unwrap(), IGN, "trailing newline masked");

    // train_on_prompt: everything but token 0.
    let mut o = opts(DataFormat::Messages, 256);
    o.train_on_prompt = true;
    let (ex2, _) = load(&p, &t, &o);
    assert_eq!(ex2[0].labels, masked_labels(&ex.ids, 1));
}

#[test]
fn messages_llama2_template_bos_once_eos_target() {
    let t = tok("llama_untied");
    let bos = t.bos_id().unwrap();
    let eos = t.eos_id().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "m.jsonl",
        &jsonl(&[json!({"messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"},
        ]})]),
    );
    let (ex, _) = load(&p, &t, &opts(DataFormat::Messages, 256));
    let ex = &ex[0];
    check_aligned(ex);
    let full = t
        .apply_chat_template(&[msg("user", "Hi"), msg("assistant", "Hello there")], false)
        .unwrap();
    assert_eq!(full, "<s>[INST] Hi [/INST] Hello there </s>");
    assert_eq!(ex.ids, t.encode_plain(&full).unwrap());
    assert_eq!(ex.ids[0], bos);
    assert_eq!(ex.ids.iter().filter(|&&i| i == bos).count(), 1, "one BOS");
    let start = t.encode_plain("<s>[INST] Hi [/INST]").unwrap().len();
    assert_eq!(target_runs(&ex.labels), vec![(start, ex.ids.len())]);
    assert_eq!(*ex.labels.last().unwrap(), eos as i32);
    let target_text = t.decode(&ex.ids[start..], false).unwrap();
    assert!(target_text.contains("Hello there"), "{target_text:?}");
    let report = check_data_report(std::slice::from_ref(ex), &t, 1);
    assert!(!report.contains("double BOS"), "{report}");
    assert!(!report.contains("EOS masked"), "{report}");
}

#[test]
fn sharegpt_and_message_list_prompt_completion_match_messages() {
    let t = tok("llama_gqa");
    let dir = tempfile::tempdir().unwrap();
    let m = write(
        &dir,
        "m.jsonl",
        &jsonl(&[json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "4"},
        ]})]),
    );
    let s = write(
        &dir,
        "s.jsonl",
        &jsonl(&[json!({"conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "2 + 2?"},
            {"from": "gpt", "value": "4"},
        ]})]),
    );
    let pc = write(
        &dir,
        "pc.jsonl",
        &jsonl(&[json!({
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2 + 2?"},
            ],
            "completion": [{"role": "assistant", "content": "4"}],
        })]),
    );
    let (a, sa) = load(&m, &t, &opts(DataFormat::Auto, 256));
    let (b, sb) = load(&s, &t, &opts(DataFormat::Auto, 256));
    let (c, sc) = load(&pc, &t, &opts(DataFormat::Auto, 256));
    assert_eq!(sa.format, DataFormat::Messages);
    assert_eq!(sb.format, DataFormat::ShareGpt);
    assert_eq!(sc.format, DataFormat::PromptCompletion);
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_eq!(target_runs(&a[0].labels).len(), 1);

    // An assistant turn inside a message-list prompt is not a target.
    let pc2 = write(
        &dir,
        "pc2.jsonl",
        &jsonl(&[json!({
            "prompt": [
                {"role": "user", "content": "1 + 1?"},
                {"role": "assistant", "content": "2"},
                {"role": "user", "content": "2 + 2?"},
            ],
            "completion": [{"role": "assistant", "content": "4"}],
        })]),
    );
    let (d, _) = load(&pc2, &t, &opts(DataFormat::Auto, 256));
    assert_eq!(target_runs(&d[0].labels).len(), 1);
    let (s0, e0) = target_runs(&d[0].labels)[0];
    assert_eq!(t.decode(&d[0].ids[s0..e0], false).unwrap(), "4<|im_end|>");
}

#[test]
fn messages_without_chat_template_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let src = fixtures().join("models/llama_gqa");
    std::fs::copy(src.join("tokenizer.json"), model.join("tokenizer.json")).unwrap();
    std::fs::write(
        model.join("tokenizer_config.json"),
        r#"{"eos_token": "<|im_end|>", "add_bos_token": false}"#,
    )
    .unwrap();
    let t = TextTokenizer::load(&model).unwrap();
    let p = write(
        &dir,
        "m.jsonl",
        &jsonl(&[
            json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}),
        ]),
    );
    let e = err(&p, &t, &opts(DataFormat::Auto, 64));
    assert!(e.contains("m.jsonl") && e.contains("chat_template"), "{e}");
}

/// A template that renders the last assistant turn differently (an empty think block, as
/// Qwen3 does) is not prefix-stable: earlier assistant turns are found by their content.
#[test]
fn messages_template_not_prefix_stable_falls_back_to_content_search() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let src = fixtures().join("models/llama_gqa");
    std::fs::copy(src.join("tokenizer.json"), model.join("tokenizer.json")).unwrap();
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    std::fs::write(
        model.join("tokenizer_config.json"),
        json!({"eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "add_bos_token": false,
               "chat_template": template})
        .to_string(),
    )
    .unwrap();
    let t = TextTokenizer::load(&model).unwrap();
    let p = write(
        &dir,
        "m.jsonl",
        &jsonl(&[json!({"messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you"},
        ]})]),
    );
    let (ex, _) = load(&p, &t, &opts(DataFormat::Messages, 256));
    let ex = &ex[0];
    check_aligned(ex);
    let runs: Vec<String> = target_runs(&ex.labels)
        .into_iter()
        .map(|(s, e)| t.decode(&ex.ids[s..e], false).unwrap())
        .collect();
    assert_eq!(
        runs,
        vec![
            "Hello<|im_end|>".to_string(),
            "<think>\n\n</think>\n\nSee you<|im_end|>".to_string()
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Length handling

#[test]
fn truncation_and_lost_targets() {
    let t = tok("llama_gqa");
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "pc.jsonl",
        &jsonl(&[
            json!({"prompt": "a b c d e f", "completion": " g h i j"}),
            json!({"prompt": "x", "completion": " y"}),
        ]),
    );
    let p_len = t.encode("a b c d e f").unwrap().len();
    let full_len = p_len + t.encode_plain(" g h i j").unwrap().len() + 1;
    let short_len = t.encode("x").unwrap().len() + t.encode_plain(" y").unwrap().len() + 1;
    assert!(short_len < p_len);

    // Cut inside the target: kept, truncated, keeps the start.
    let (ex, st) = load(&p, &t, &opts(DataFormat::Auto, p_len + 1));
    assert_eq!(st.truncated, 1);
    assert_eq!(st.dropped, 0);
    assert_eq!(st.lost_whole_target, 0);
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].ids.len(), p_len + 1);
    assert_eq!(ex[0].loss_tokens(), 1);
    let (full, _) = load(&p, &t, &opts(DataFormat::Auto, 1000));
    assert_eq!(full[0].ids.len(), full_len);
    assert_eq!(&full[0].ids[..p_len + 1], &ex[0].ids[..]);

    // Cut at the end of the prompt: the whole target is lost, the sample dropped.
    let (ex, st) = load(&p, &t, &opts(DataFormat::Auto, p_len));
    assert_eq!(ex.len(), 1);
    assert_eq!(
        (st.records, st.truncated, st.lost_whole_target, st.dropped),
        (2, 1, 1, 1)
    );
    assert_eq!(st.tokens, short_len);

    // drop_long drops instead of truncating.
    let mut o = opts(DataFormat::Auto, p_len + 1);
    o.drop_long = true;
    let (ex, st) = load(&p, &t, &o);
    assert_eq!(ex.len(), 1);
    assert_eq!((st.truncated, st.dropped, st.lost_whole_target), (0, 1, 0));

    // Nothing left: a clear error.
    let p = write(
        &dir,
        "pc.jsonl",
        &jsonl(&[json!({"prompt": "a b c d e f", "completion": " g h i j"})]),
    );
    let e = err(&p, &t, &opts(DataFormat::Auto, p_len));
    assert!(
        e.contains("pc.jsonl") && e.contains("no training examples") && e.contains("whole target"),
        "{e}"
    );
}

#[test]
fn messages_truncated_inside_second_turn() {
    let t = tok("llama_gqa");
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "m.jsonl",
        &jsonl(&[json!({"messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Tell me a long story please"},
            {"role": "assistant", "content": "Once upon a time"},
        ]})]),
    );
    let (full, _) = load(&p, &t, &opts(DataFormat::Messages, 1000));
    let runs = target_runs(&full[0].labels);
    assert_eq!(runs.len(), 2);
    let cut = runs[1].0 + 1;
    let (ex, st) = load(&p, &t, &opts(DataFormat::Messages, cut));
    assert_eq!(st.truncated, 1);
    assert_eq!(ex[0].ids, full[0].ids[..cut]);
    assert_eq!(ex[0].labels, full[0].labels[..cut]);
    // Cut before the first assistant turn: nothing left to train on.
    let e = err(&p, &t, &opts(DataFormat::Messages, runs[0].0));
    assert!(e.contains("lost their whole target"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Auto-detection

fn records(values: &[serde_json::Value]) -> Vec<Record> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| Record {
            line: i + 1,
            value: v.clone(),
        })
        .collect()
}

#[test]
fn auto_detection() {
    let cases = [
        (json!({"text": "x"}), DataFormat::Text),
        (
            json!({"instruction": "i", "input": "", "output": "o"}),
            DataFormat::Alpaca,
        ),
        // The HF alpaca dataset also carries "text": the structured keys win.
        (
            json!({"instruction": "i", "input": "", "output": "o", "text": "t"}),
            DataFormat::Alpaca,
        ),
        (
            json!({"prompt": "p", "completion": "c"}),
            DataFormat::PromptCompletion,
        ),
        (json!({"messages": []}), DataFormat::Messages),
        (json!({"conversations": []}), DataFormat::ShareGpt),
    ];
    for (v, f) in cases {
        assert_eq!(detect_format(&records(&[v.clone(), v])).unwrap(), f);
    }
    let e = detect_format(&records(&[json!({"question": "q", "answer": "a"})])).unwrap_err();
    assert!(
        e.contains("line 1") && e.contains("question") && e.contains("answer"),
        "{e}"
    );
    for name in [
        "text",
        "alpaca",
        "prompt-completion",
        "messages",
        "sharegpt",
    ] {
        assert!(e.contains(name), "{e}");
    }
    let e = detect_format(&records(&[
        json!({"text": "a"}),
        json!({"prompt": "p", "completion": "c"}),
    ]))
    .unwrap_err();
    assert!(
        e.contains("line 1") && e.contains("line 2") && e.contains("explicitly"),
        "{e}"
    );
    let e = detect_format(&records(&[
        json!({"messages": [], "prompt": "p", "completion": "c"}),
    ]))
    .unwrap_err();
    assert!(e.contains("several formats"), "{e}");
    let e = detect_format(&records(&[json!([1, 2])])).unwrap_err();
    assert!(e.contains("not a JSON object"), "{e}");

    // Through load_examples the error names the file.
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "q.jsonl", &jsonl(&[json!({"question": "q"})]));
    let e = err(&p, &tok("llama_gqa"), &opts(DataFormat::Auto, 64));
    assert!(
        e.starts_with(&p.display().to_string()) && e.contains("question"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Bad records

#[test]
fn bad_records_name_file_and_line() {
    let t = tok("llama_gqa");
    let dir = tempfile::tempdir().unwrap();
    let good = json!({"instruction": "i", "input": "", "output": "o"});
    let cases = [
        (json!({"instruction": "i", "input": ""}), "\"output\""),
        (json!({"instruction": "i", "output": 3}), "must be a string"),
        (
            json!({"instruction": "i", "input": ["x"], "output": "o"}),
            "\"input\"",
        ),
        (json!("just a string"), "JSON object"),
    ];
    for (bad, needle) in cases {
        let p = write(&dir, "a.jsonl", &jsonl(&[good.clone(), bad, good.clone()]));
        let e = err(&p, &t, &opts(DataFormat::Alpaca, 256));
        assert!(e.starts_with(&format!("{}: line 2: ", p.display())), "{e}");
        assert!(e.contains(needle), "{e}");
        assert!(!e.contains('\n'));
    }
    // Messages: semantic errors.
    let gm = json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]});
    for (bad, needle) in [
        (json!({"messages": "hi"}), "list"),
        (json!({"messages": [{"role": "user"}]}), "content"),
        (
            json!({"messages": [{"role": "user", "content": "only a question"}]}),
            "no assistant",
        ),
    ] {
        let p = write(&dir, "m.jsonl", &jsonl(&[gm.clone(), gm.clone(), bad]));
        let e = err(&p, &t, &opts(DataFormat::Messages, 256));
        assert!(e.contains("m.jsonl: line 3: ") && e.contains(needle), "{e}");
    }
    let p = write(
        &dir,
        "s.jsonl",
        &jsonl(&[json!({"conversations": [{"from": "robot", "value": "x"}]})]),
    );
    let e = err(&p, &t, &opts(DataFormat::ShareGpt, 256));
    assert!(e.contains("line 1") && e.contains("robot"), "{e}");
    // A JSON array file: the line is the element's position.
    let p = write(
        &dir,
        "a.json",
        &json!([good.clone(), good.clone(), {"instruction": "i"}]).to_string(),
    );
    let e = err(&p, &t, &opts(DataFormat::Auto, 256));
    assert!(
        e.contains("a.json: line 3: ") && e.contains("\"output\""),
        "{e}"
    );
    // Invalid JSON on line 2.
    let p = write(
        &dir,
        "j.jsonl",
        &format!("{good}\n{{\"instruction\": \n{good}\n"),
    );
    let e = err(&p, &t, &opts(DataFormat::Alpaca, 256));
    assert!(
        e.contains("j.jsonl: line 2") && e.contains("skip-bad-lines"),
        "{e}"
    );
}

#[test]
fn skip_bad_lines_counts_syntax_and_semantic_errors() {
    let t = tok("llama_gqa");
    let dir = tempfile::tempdir().unwrap();
    let good = json!({"prompt": "p", "completion": " c"});
    let content = format!(
        "{good}\nnot json at all\n{}\n{good}\n{}\n",
        json!({"prompt": "p"}),
        json!({"prompt": 1, "completion": "c"})
    );
    let p = write(&dir, "pc.jsonl", &content);
    let mut o = opts(DataFormat::PromptCompletion, 64);
    o.skip_bad_lines = true;
    let (ex, st) = load(&p, &t, &o);
    assert_eq!(ex.len(), 2);
    assert_eq!(st.records, 2);
    assert_eq!(st.skipped_bad_lines, 3);
    // Without the flag, the first bad line fails.
    o.skip_bad_lines = false;
    let e = err(&p, &t, &o);
    assert!(e.contains("line 2"), "{e}");
    // All bad: a clear error even when skipping.
    let p = write(&dir, "bad.jsonl", &jsonl(&[json!({"prompt": "p"})]));
    o.skip_bad_lines = true;
    let e = err(&p, &t, &o);
    assert!(
        e.contains("no training examples") && e.contains("1 bad records skipped"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Packing

fn ex_of_len(n: usize) -> Example {
    Example {
        ids: vec![1; n],
        labels: vec![1; n],
    }
}

#[test]
fn pack_respects_max_len_and_keeps_every_example_once() {
    let lens = [5usize, 3, 8, 1, 7, 2, 2, 6, 4, 12, 9, 1, 3];
    let examples: Vec<Example> = lens.iter().map(|&n| ex_of_len(n)).collect();
    let max_len = 10;
    let groups = pack(&examples, max_len);
    let mut seen = vec![0; examples.len()];
    for g in &groups {
        assert!(!g.is_empty());
        let total: usize = g.iter().map(|&i| lens[i]).sum();
        if g.len() > 1 {
            assert!(total <= max_len, "{g:?}");
        } else {
            assert!(total <= max_len || lens[g[0]] > max_len);
        }
        for &i in g {
            seen[i] += 1;
            if lens[i] > max_len {
                assert_eq!(g.len(), 1, "an over-long example is its own group");
            }
        }
    }
    assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
    // First-fit decreasing fits these into the minimum number of bins (ceil(51/10) + the
    // over-long one).
    let total: usize = lens.iter().filter(|&&n| n <= max_len).sum();
    assert!(groups.len() <= total.div_ceil(max_len) + 2);
    // Deterministic.
    assert_eq!(pack(&examples, max_len), groups);
    assert!(pack(&[], 10).is_empty());
}

// ---------------------------------------------------------------------------------------------
// --check-data

#[test]
fn check_data_report_marks_targets_and_warns() {
    let t = tok("llama_gqa");
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "m.jsonl",
        &jsonl(&[
            json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}),
            json!({"messages": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "Sup"}]}),
        ]),
    );
    let (ex, _) = load(&p, &t, &opts(DataFormat::Messages, 256));
    let r = check_data_report(&ex, &t, 1);
    assert!(r.contains("[[Hello there<|im_end|>]]"), "{r}");
    assert!(r.contains("<|im_start|>user\nHi<|im_end|>"), "{r}");
    assert!(r.contains(&format!("{} tokens", ex[0].ids.len())), "{r}");
    assert!(r.contains("1 of 2 examples"), "{r}");
    assert!(!r.contains("Sup"), "only the first N");
    assert!(r.contains("0 warnings"), "{r}");

    // Double BOS, masked EOS, no targets.
    let tl = tok("llama_untied");
    let bos = tl.bos_id().unwrap();
    let eos = tl.eos_id().unwrap();
    let mut body = tl.encode_plain("hello world").unwrap();
    let mut ids = vec![bos, bos];
    ids.append(&mut body);
    ids.push(eos);
    let n = ids.len();
    let mut labels = as_labels(&ids);
    labels[0] = IGN;
    labels[n - 1] = IGN; // the EOS after the target is masked
    let double_bos_masked_eos = Example {
        ids: ids.clone(),
        labels,
    };
    let no_target = Example {
        ids: ids.clone(),
        labels: vec![IGN; n],
    };
    let r = check_data_report(&[double_bos_masked_eos, no_target], &tl, 5);
    assert!(r.contains("double BOS"), "{r}");
    assert!(r.contains("EOS masked"), "{r}");
    assert!(r.contains("whole target"), "{r}");
    assert!(r.contains("example 1"), "{r}");
    assert!(r.contains("[[") && r.contains("]]"), "{r}");
}

#[test]
fn committed_data_fixtures_load() {
    let t = tok("llama_gqa");
    let dir = fixtures().join("data");
    for (file, f, n) in [
        ("alpaca.json", DataFormat::Alpaca, 4),
        ("text.jsonl", DataFormat::Text, 3),
        ("prompt_completion.jsonl", DataFormat::PromptCompletion, 3),
        ("messages.jsonl", DataFormat::Messages, 3),
        ("sharegpt.jsonl", DataFormat::ShareGpt, 2),
    ] {
        let (ex, st) = load(&dir.join(file), &t, &opts(DataFormat::Auto, 512));
        assert_eq!(st.format, f, "{file}");
        assert_eq!(ex.len(), n, "{file}");
        assert_eq!(st.records, n);
        assert_eq!(st.tokens, ex.iter().map(|e| e.ids.len()).sum::<usize>());
        assert_eq!(
            st.loss_tokens,
            ex.iter().map(|e| e.loss_tokens()).sum::<usize>()
        );
        for e in &ex {
            check_aligned(e);
            assert!(e.loss_tokens() > 0);
        }
    }
}

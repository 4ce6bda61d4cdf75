//! The training-data readers, on whole data files: JSON Lines / JSON array / plain-text
//! records, format auto-detection and the text, alpaca, prompt-completion, messages and
//! sharegpt converters with loss masks (peft-train), preference pairs (rm-train, dpo-train)
//! and PPO prompts (ppo-train), tokenized with a real tokenizer that has a chat template
//! (tests/fixtures/models/llama_gqa). The readers open files by name, so the input is written
//! to a file first.
//!
//! Input layout: byte 0 picks the reader / format (bits 0-2), the file extension (bits 3-4)
//! and the flags skip_bad_lines (bit 5), train_on_prompt (bit 6), drop_long (bit 7); byte 1
//! is max_len - 2 (mod 64); the rest is the file content.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peftkit_core::tokenizer::TextTokenizer;
use peftkit_core::train::data::{check_data_report, load_examples, pack, DataFormat, DataOptions};
use peftkit_core::train::pairs::{load_pairs, PairOptions};
use peftkit_core::train::prompts::{load_prompts, PromptOptions};
use std::path::Path;
use std::sync::OnceLock;

struct Env {
    tok: TextTokenizer,
    dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
        Env {
            tok: TextTokenizer::load(&models.join("llama_gqa")).expect("fixture tokenizer"),
            dir: tempfile::tempdir().expect("temp dir"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (sel, len, content) = (data[0], data[1], &data[2..]);
    let env = env();
    let ext = ["jsonl", "json", "txt", "jsonl"][((sel >> 3) & 3) as usize];
    let path = env.dir.path().join(format!("data.{ext}"));
    std::fs::write(&path, content).expect("write input");
    let skip_bad_lines = sel & 0x20 != 0;
    let max_len = 2 + (len % 64) as usize;
    let format = match sel & 7 {
        0 => DataFormat::Auto,
        1 => DataFormat::Text,
        2 => DataFormat::Alpaca,
        3 => DataFormat::PromptCompletion,
        4 => DataFormat::Messages,
        5 => DataFormat::ShareGpt,
        6 => {
            let opts = PairOptions {
                max_len,
                drop_long: sel & 0x80 != 0,
                margin_column: (sel & 0x40 != 0).then(|| "margin".to_string()),
                skip_bad_lines,
            };
            let _ = load_pairs(&path, &env.tok, &opts);
            return;
        }
        _ => {
            let opts = PromptOptions {
                max_len,
                skip_bad_lines,
            };
            let _ = load_prompts(&path, &env.tok, &opts);
            return;
        }
    };
    let opts = DataOptions {
        format,
        max_len,
        train_on_prompt: sel & 0x40 != 0,
        skip_bad_lines,
        drop_long: sel & 0x80 != 0,
    };
    if let Ok((examples, stats)) = load_examples(&path, &env.tok, &opts) {
        assert_eq!(examples.len(), stats.records - stats.dropped);
        for ex in &examples {
            assert_eq!(ex.ids.len(), ex.labels.len());
            assert!(ex.ids.len() <= max_len);
        }
        let _ = stats.to_string();
        let _ = pack(&examples, max_len);
        let _ = check_data_report(&examples, &env.tok, 2);
    }
});

//! Helpers shared by the workspace tests: find the built tools, run them, check their errors.
//!
//! The tools are separate packages, so Cargo's `CARGO_BIN_EXE_*` does not reach them from here;
//! they are found next to the test executable (`target/<profile>/`). `make test` builds them
//! first (`cargo build --release --bins`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Directory of the built binaries of the profile these tests were built with.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Path of a tool binary; panics with the command to run when it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built; run `cargo build --release --bins` (make test does)",
        p.display()
    );
    p
}

/// Run a tool with arguments and return its output.
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name))
        .args(args)
        .env("PEFTKIT_NO_PROGRESS", "1")
        .output()
        .expect("spawn tool")
}

/// Committed fixtures (tests/fixtures).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Assert that a failed run ended the way every peftkit tool must: non-zero exit, a single
/// line on stderr that starts with "error:" and contains `needle`, and no panic.
pub fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "tool panicked instead of reporting an error: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(
        lines[0].contains(needle),
        "error line {:?} does not mention {needle:?}",
        lines[0]
    );
}

/// Copy a fixture directory into a fresh temporary directory (for tests that corrupt it).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// reference.json of a fixture model (tests/fixtures/models/NAME).
pub fn model_reference(name: &str) -> serde_json::Value {
    let p = fixtures().join("models").join(name).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("reference.json")).expect("json")
}

/// A JSON array of token ids.
pub fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The fixture models of every supported architecture.
pub const FIXTURE_MODELS: &[&str] = &[
    "llama_gqa",
    "llama_untied",
    "llama3_rope",
    "qwen2",
    "mistral",
    "gpt2",
];

/// A JSON file (panics with the path on error: test fixtures).
pub fn read_json(p: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every tensor of a safetensors file as (name, shape, f32 values), in file order.
pub fn read_tensors(p: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    use peftkit_core::io::safetensors_file::{to_f32, SafetensorsFile};
    let f = SafetensorsFile::open(p).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let t = f.get(&n).unwrap();
            (n.clone(), t.shape.to_vec(), to_f32(&n, &t).unwrap())
        })
        .collect()
}

/// A fixture batch.json: the sequences' `input_ids` and `labels` (unpadded).
pub fn read_batch(p: &Path) -> (Vec<Vec<u32>>, Vec<Vec<i32>>) {
    let b = read_json(p);
    let rows = |k: &str| -> Vec<Vec<i64>> {
        b[k].as_array()
            .unwrap()
            .iter()
            .map(|s| {
                s.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .collect()
            })
            .collect()
    };
    let ids = rows("input_ids")
        .into_iter()
        .map(|s| s.into_iter().map(|v| v as u32).collect())
        .collect();
    let labels = rows("labels")
        .into_iter()
        .map(|s| s.into_iter().map(|v| v as i32).collect())
        .collect();
    (ids, labels)
}

/// The held-out loss peft-train printed `before` or `after` training (from its stderr).
pub fn eval_loss(stderr: &str, when: &str) -> f64 {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix(&format!("eval loss {when} training: ")))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no eval loss {when} training in: {stderr}"))
        .parse()
        .unwrap()
}

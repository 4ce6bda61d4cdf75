//! `--plot FILE.png|svg` of the four trainers and `--plot-log` (an existing metrics log): the
//! chart is a valid PNG or SVG with the expected series, written also without `--log`, and a
//! bad file name is a clean usage error (exit 2) before any training.
//!
//! The tools must be built first: `cargo build --release --bins` (make test does).

use peftkit_tests::{assert_clean_error, fixtures, run};
use serde_json::json;
use std::path::{Path, PathBuf};

fn model() -> PathBuf {
    fixtures().join("models").join("llama_gqa")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn alpaca(dir: &Path) -> PathBuf {
    let recs: Vec<_> = (0..12)
        .map(|i| json!({"instruction": format!("Say {i}."), "input": "", "output": format!("It is {i}.")}))
        .collect();
    let p = dir.join("alpaca.json");
    std::fs::write(&p, serde_json::to_string(&recs).unwrap()).unwrap();
    p
}

fn pairs(dir: &Path) -> PathBuf {
    let mut lines = String::new();
    for i in 0..12 {
        lines +=
            &json!({"prompt": format!("item {i}:"), "chosen": " yes yes", "rejected": " no no"})
                .to_string();
        lines.push('\n');
    }
    let p = dir.join("pairs.jsonl");
    std::fs::write(&p, lines).unwrap();
    p
}

fn ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{tool} failed: {stderr}");
    stderr
}

fn is_png(p: &Path) -> bool {
    let b = std::fs::read(p).unwrap();
    b.len() > 100 && b.starts_with(b"\x89PNG\r\n\x1a\n")
}

/// The texts of an SVG chart, each wrapped as `>TEXT<` (so that `>loss<` finds the series
/// `loss` and not `eval_loss`).
fn svg_text(p: &Path) -> String {
    let t = std::fs::read_to_string(p).unwrap();
    assert!(
        t.starts_with("<svg") && t.trim_end().ends_with("</svg>"),
        "not an SVG: {}",
        p.display()
    );
    t.split("<text")
        .skip(1)
        .filter_map(|chunk| {
            let body = chunk.split_once('>')?.1;
            Some(format!(">{}<", body.split_once("</text>")?.0.trim()))
        })
        .collect()
}

fn no_temp_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with(".peftkit-tmp"), "left behind: {name}");
    }
}

#[test]
fn peft_train_plots_png_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let data = alpaca(dir.path());
    let (out, log) = (dir.path().join("lora"), dir.path().join("log.jsonl"));
    let png = dir.path().join("curves.png");
    let m = model();
    let stderr = ok(
        "peft-train",
        &[
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--log",
            s(&log),
            "--steps",
            "4",
            "--batch",
            "2",
            "--val-split",
            "0.25",
            "--eval-every",
            "2",
            "--threads",
            "1",
            "--plot",
            s(&png),
        ],
    );
    assert!(is_png(&png), "no PNG at {}", png.display());
    assert!(stderr.contains("plot: "), "{stderr}");
    no_temp_files(dir.path());
    // the same log drawn as SVG without training: every series by its log name
    let svg = dir.path().join("curves.svg");
    ok("peft-train", &["--plot-log", s(&log), "--plot", s(&svg)]);
    let t = svg_text(&svg);
    for name in [">loss<", ">eval_loss<", ">lr<", ">learning rate<"] {
        assert!(t.contains(name), "{name} missing from the SVG");
    }
}

#[test]
fn plot_without_log_writes_the_log_into_out() {
    let dir = tempfile::tempdir().unwrap();
    let data = alpaca(dir.path());
    let out = dir.path().join("run");
    let svg = dir.path().join("run.svg");
    let m = model();
    let stderr = ok(
        "peft-train",
        &[
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            "2",
            "--batch",
            "2",
            "--threads",
            "1",
            "--plot",
            s(&svg),
            "--quiet",
        ],
    );
    assert!(out.join("metrics.jsonl").is_file());
    assert!(svg_text(&svg).contains(">loss<"));
    assert!(
        !stderr.contains("plot: "),
        "--quiet shows no info line: {stderr}"
    );
}

#[test]
fn rm_and_dpo_plot_accuracy_and_margin() {
    let dir = tempfile::tempdir().unwrap();
    let data = pairs(dir.path());
    let m = model();
    for tool in ["rm-train", "dpo-train"] {
        let out = dir.path().join(tool);
        let svg = dir.path().join(format!("{tool}.svg"));
        ok(
            tool,
            &[
                "--model",
                s(&m),
                "--data",
                s(&data),
                "--out",
                s(&out),
                "--steps",
                "2",
                "--batch",
                "4",
                "--val-split",
                "0.25",
                "--threads",
                "1",
                "--plot",
                s(&svg),
            ],
        );
        let t = svg_text(&svg);
        for name in [
            ">loss<",
            ">eval_loss<",
            ">accuracy<",
            ">margin<",
            ">eval_accuracy<",
            ">lr<",
        ] {
            assert!(t.contains(name), "{tool}: {name} missing from the SVG");
        }
    }
}

#[test]
fn ppo_plot_log_shows_score_and_kl() {
    // the chart of a PPO log (written here: a real run needs a reward model first, which
    // ppo_cli.rs covers)
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ppo.jsonl");
    let mut lines = String::new();
    lines += &json!({"step": 0, "eval_score": 0.1, "eval_kl": 0.0, "eval_response_length": 8.0})
        .to_string();
    lines.push('\n');
    for step in 1..=5 {
        let x = f64::from(step);
        lines += &json!({"step": step, "lr": 1e-4, "score_mean": 0.1 * x, "rlhf_reward": 0.09 * x,
                         "kl": 0.01 * x, "response_length": 8.0 + x})
        .to_string();
        lines.push('\n');
    }
    std::fs::write(&log, lines).unwrap();
    let svg = dir.path().join("ppo.svg");
    ok("ppo-train", &["--plot-log", s(&log), "--plot", s(&svg)]);
    let t = svg_text(&svg);
    for name in [
        ">score_mean<",
        ">eval_score<",
        ">kl<",
        ">eval_kl<",
        ">KL to the reference<",
    ] {
        assert!(t.contains(name), "{name} missing from the SVG");
    }
    let png = dir.path().join("ppo.png");
    ok("ppo-train", &["--plot-log", s(&log), "--plot", s(&png)]);
    assert!(is_png(&png));
}

#[test]
fn bad_plot_names_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = alpaca(dir.path());
    let out = dir.path().join("never");
    let m = model();
    for tool in ["peft-train", "rm-train", "dpo-train"] {
        let r = run(
            tool,
            &[
                "--model",
                s(&m),
                "--data",
                s(&data),
                "--out",
                s(&out),
                "--plot",
                "curves.jpg",
            ],
        );
        assert_eq!(r.status.code(), Some(2), "{tool}");
        assert_clean_error(&r, "--plot curves.jpg");
        assert!(
            !out.exists(),
            "{tool} created its output before refusing --plot"
        );
    }
    let r = run(
        "ppo-train",
        &[
            "--model",
            s(&m),
            "--prompts",
            s(&data),
            "--reward-model",
            s(&m),
            "--out",
            s(&out),
            "--plot",
            "curves.pdf",
        ],
    );
    assert_eq!(r.status.code(), Some(2));
    assert_clean_error(&r, "must end in .svg or .png");
    // --plot-log: a bad extension, a missing log, a log with nothing to draw, no --plot
    let log = dir.path().join("log.jsonl");
    std::fs::write(&log, "{\"step\": 1, \"loss\": 1.0}\n").unwrap();
    let r = run("peft-train", &["--plot-log", s(&log), "--plot", "x.gif"]);
    assert_eq!(r.status.code(), Some(2));
    assert_clean_error(&r, "must end in .svg or .png");
    let r = run(
        "peft-train",
        &["--plot-log", "/nonexistent/log.jsonl", "--plot", "x.svg"],
    );
    assert_eq!(r.status.code(), Some(4));
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "{\"data\": {}}\n").unwrap();
    let r = run(
        "peft-train",
        &[
            "--plot-log",
            s(&empty),
            "--plot",
            s(&dir.path().join("e.svg")),
        ],
    );
    assert_eq!(r.status.code(), Some(3));
    assert_clean_error(&r, "no metrics to plot");
    let r = run("peft-train", &["--plot-log", s(&log)]);
    assert_eq!(r.status.code(), Some(2));
}

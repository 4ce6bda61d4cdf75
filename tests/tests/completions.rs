//! Every tool answers the hidden `--completions SHELL` and `--man` flags (as
//! scripts/gen-completions.sh uses them), has `--quiet` / `--verbose` and a worked example in
//! `--help`; a bad shell name is a clean usage error.
//!
//! The tools must be built first: `cargo build --release --bins` (make test does).

use peftkit_tests::run;

const TOOLS: [&str; 14] = [
    "model-import",
    "model-export",
    "quantize-nf4",
    "peft-train",
    "peft-eval",
    "peft-generate",
    "adapter-merge",
    "adapter-inspect",
    "rm-train",
    "rm-score",
    "dpo-train",
    "ppo-train",
    "grpo-train",
    "gpu-check",
];

fn stdout_of(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn every_tool_prints_completions() {
    for tool in TOOLS {
        let bash = stdout_of(tool, &["--completions", "bash"]);
        assert!(
            bash.contains("complete") && bash.contains(tool),
            "{tool}: no bash completion"
        );
        assert!(
            bash.contains("--quiet") && bash.contains("--verbose"),
            "{tool}"
        );
        for shell in ["zsh", "fish", "elvish", "powershell"] {
            assert!(
                !stdout_of(tool, &["--completions", shell]).is_empty(),
                "{tool} {shell}"
            );
        }
    }
}

#[test]
fn every_tool_prints_a_man_page_with_examples() {
    for tool in TOOLS {
        let man = stdout_of(tool, &["--man"]);
        assert!(
            man.starts_with(".ie") || man.contains(".TH"),
            "{tool}: not roff"
        );
        assert!(man.contains(".SH NAME") && man.contains(tool), "{tool}");
        assert!(man.contains(".SH EXAMPLES"), "{tool}: no EXAMPLES section");
        assert!(
            man.contains(".SH OPTIONS") && man.contains("quiet"),
            "{tool}"
        );
    }
}

#[test]
fn every_help_has_examples_and_the_shared_flags() {
    for tool in TOOLS {
        let help = stdout_of(tool, &["--help"]);
        assert!(help.contains("Examples:"), "{tool}: --help has no examples");
        assert!(
            help.contains(&format!("  {tool} ")),
            "{tool}: no worked example of the tool itself in --help"
        );
        for flag in ["-q, --quiet", "-v, --verbose"] {
            assert!(help.contains(flag), "{tool}: {flag} missing from --help");
        }
        assert!(
            !help.contains("--completions") && !help.contains("--man"),
            "{tool}: hidden flags shown"
        );
    }
}

#[test]
fn bad_shell_is_a_usage_error() {
    let out = run("peft-eval", &["--completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: --completions"), "{stderr}");
}

#[test]
fn quiet_and_verbose_conflict() {
    let out = run("peft-eval", &["--model", "m", "--data", "d", "-q", "-v"]);
    assert_eq!(out.status.code(), Some(2));
}

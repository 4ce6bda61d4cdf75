//! What every tool's `main` shares: one error style, exit codes, `--quiet` / `--verbose`, and
//! the hidden `--completions SHELL` / `--man` flags ([`meta`]).
//!
//! Output style: results go to stdout; on stderr, info lines (suppressed by `--quiet`),
//! `warning: ...` lines, detail lines (only with `--verbose`) and one `error: ...` line on
//! failure.

pub mod meta;

use crate::error::Result;
use std::sync::atomic::{AtomicBool, Ordering};

static QUIET: AtomicBool = AtomicBool::new(false);
static VERBOSE: AtomicBool = AtomicBool::new(false);

/// `--quiet` / `--verbose`, the same two flags on every tool (flatten into its parser).
#[derive(clap::Args, Clone, Copy, Debug, Default)]
pub struct Verbosity {
    /// No progress bars and no info lines (warnings and errors still show)
    #[arg(long, short, conflicts_with = "verbose")]
    pub quiet: bool,
    /// More detail on stderr: resolved options, timings
    #[arg(long, short)]
    pub verbose: bool,
}

impl Verbosity {
    /// Make these settings the process-wide ones ([`info`], [`detail`], progress bars).
    pub fn apply(&self) {
        QUIET.store(self.quiet, Ordering::Relaxed);
        VERBOSE.store(self.verbose && !self.quiet, Ordering::Relaxed);
    }
}

/// Whether `--quiet` is in force.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Whether `--verbose` is in force.
pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// An info line on stderr (progress, summaries), hidden by `--quiet`.
pub fn info(msg: impl std::fmt::Display) {
    if !quiet() {
        eprintln!("{msg}");
    }
}

/// A detail line on stderr, shown only with `--verbose`.
pub fn detail(msg: impl std::fmt::Display) {
    if verbose() {
        eprintln!("{msg}");
    }
}

/// With `--verbose`: the options the tool resolved from its command line (and config file).
pub fn show_options(options: &impl std::fmt::Debug) {
    detail(format_args!("options: {options:?}"));
}

/// Run a tool body; on error print `error: <one line>` to stderr and exit with the error's
/// code (documented in docs/exit-codes.md). Panics are turned into the same one-line form so a
/// bug never shows a backtrace to a pipeline.
pub fn run(body: impl FnOnce() -> Result<()>) -> ! {
    crate::kernels::allocator::use_huge_pages();
    crate::kernels::allocator::keep_freed_buffers();
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        let loc = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal error{loc}: {msg} (please report this)");
    }));
    let start = std::time::Instant::now();
    let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
        Err(_) => 70,
    };
    crate::profile::report();
    if code == 0 {
        detail(format_args!(
            "finished in {:.2} s",
            start.elapsed().as_secs_f64()
        ));
    }
    std::process::exit(code)
}

/// Parse the command line into `A`, after handling the hidden `--completions SHELL` and
/// `--man` flags ([`meta::handle`]); clap's own errors exit with status 2.
pub fn parse<A: clap::Parser>() -> A {
    crate::kernels::allocator::use_huge_pages();
    let argv: Vec<String> = std::env::args().collect();
    meta::handle::<A>(&argv);
    A::parse_from(argv)
}

/// `--compute-dtype` of every tool: true for bf16, false for f32.
pub fn compute_dtype_is_bf16(s: &str) -> Result<bool> {
    match s {
        "f32" | "float32" => Ok(false),
        "bf16" | "bfloat16" => Ok(true),
        other => Err(crate::Error::usage(format!(
            "unknown --compute-dtype {other}; supported: f32, bf16"
        ))),
    }
}

/// Print a warning in the shared style (shown with `--quiet` too).
pub fn warn(msg: impl std::fmt::Display) {
    eprintln!("warning: {msg}");
}

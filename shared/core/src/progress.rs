//! Progress bars on stderr (indicatif), off when stderr is not a terminal, with --quiet (the
//! tool's own flag or the process-wide [`crate::cli::quiet`]), or
//! when PEFTKIT_NO_PROGRESS is set (tests).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

#[derive(Clone, Copy, Debug)]
pub struct Progress {
    enabled: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        let enabled = !quiet
            && !crate::cli::quiet()
            && std::env::var_os("PEFTKIT_NO_PROGRESS").is_none()
            && std::io::stderr().is_terminal();
        Self { enabled }
    }

    pub fn disabled() -> Self {
        Self { enabled: false }
    }

    pub fn bar(&self, len: u64, what: &str) -> ProgressBar {
        if !self.enabled {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new(len);
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta}) {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        pb.set_prefix(what.to_string());
        pb
    }

    pub fn bytes_bar(&self, len: u64, what: &str) -> ProgressBar {
        if !self.enabled {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new(len);
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}) {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        pb.set_prefix(what.to_string());
        pb
    }
}

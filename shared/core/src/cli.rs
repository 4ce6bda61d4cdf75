//! What every tool's `main` shares: one error style, exit codes, thread setup.

use crate::error::Result;

/// Run a tool body; on error print `error: <one line>` to stderr and exit with the error's
/// code (documented in docs/exit-codes.md). Panics are turned into the same one-line form so a
/// bug never shows a backtrace to a pipeline.
pub fn run(body: impl FnOnce() -> Result<()>) -> ! {
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
    let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
        Err(_) => 70,
    };
    crate::profile::report();
    std::process::exit(code)
}

/// Print a warning in the shared style.
pub fn warn(msg: impl std::fmt::Display) {
    eprintln!("warning: {msg}");
}

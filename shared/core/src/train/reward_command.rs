//! Rewards from other programs, which see each completion as one JSON line
//! (`{"prompt", "completion", "stopped", "record"}`) and answer one reward per line (`null`,
//! `nan` or an empty line: cannot score).
//!
//! - `cmd:COMMAND` ([`run_command`]) runs under `sh -c` once per step, with the step's
//!   completions on its standard input, and exits.
//! - `serve:COMMAND` ([`RewardServer`]) is started once and kept running: every step writes
//!   the completions to it and reads as many lines back. A reward that loads a model, a
//!   tokenizer or a heavy library (sympy, a math verifier) pays that once per run, not once
//!   per step.

use super::rewards::Scored;
use crate::error::{Error, Result};
use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

/// The step's completions as JSON lines.
fn completion_lines(items: &[Scored]) -> Vec<u8> {
    let mut input = Vec::new();
    for s in items {
        let line = json!({
            "prompt": s.prompt,
            "completion": s.completion,
            "stopped": s.stopped,
            "record": s.record,
        });
        serde_json::to_writer(&mut input, &line).expect("JSON to memory");
        input.push(b'\n');
    }
    input
}

/// One reward per line: a number, or `null` / `None` / `nan` / an empty line for "cannot
/// score" (NaN).
fn parse_rewards(lines: &[&str], fail: impl Fn(String) -> Error) -> Result<Vec<f64>> {
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let t = l.trim();
            match t {
                "" | "null" | "None" | "nan" | "NaN" => Ok(f64::NAN),
                _ => t
                    .parse::<f64>()
                    .map_err(|_| fail(format!("line {}: {t:?} is not a number (or null)", i + 1))),
            }
        })
        .collect()
}

/// Runs `sh -c cmd` with one JSON object per completion on its standard input and reads one
/// reward per line from its standard output.
pub fn run_command(cmd: &str, items: &[Scored]) -> Result<Vec<f64>> {
    let fail = |what: String| Error::usage(format!("--reward cmd:{cmd}: {what}"));
    let input = completion_lines(items);
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start: {e}")))?;
    // Write from a thread: a command that answers line by line would otherwise deadlock
    // against a full pipe.
    let mut stdin = child.stdin.take().expect("piped stdin");
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("cannot read its output: {e}")))?;
    let wrote = writer.join().expect("writer thread");
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(fail(format!(
            "exited with {} ({})",
            out.status,
            last.trim()
        )));
    }
    // A command that answers without reading everything (a constant reward) is fine.
    if let Err(e) = wrote {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(fail(format!("cannot write its input: {e}")));
        }
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines: Vec<&str> = text.lines().collect();
    while lines.len() > items.len() && lines.last().is_some_and(|l| l.trim().is_empty()) {
        lines.pop();
    }
    if lines.len() != items.len() {
        return Err(fail(format!(
            "printed {} lines for {} completions; expected one reward per line",
            lines.len(),
            items.len()
        )));
    }
    parse_rewards(&lines, fail)
}

/// How long a reward server may take to answer one completion before the run stops
/// (`PEFTKIT_REWARD_TIMEOUT` seconds, default 600).
fn answer_timeout() -> Result<Duration> {
    match std::env::var("PEFTKIT_REWARD_TIMEOUT") {
        Err(_) => Ok(Duration::from_secs(600)),
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                Error::usage(format!(
                    "PEFTKIT_REWARD_TIMEOUT={v}: expected a positive number of seconds"
                ))
            }),
    }
}

/// `serve:COMMAND`: a reward program started once (under `sh -c`, its standard error shown
/// as is) that reads a completion per line and prints its reward per line, flushing each.
pub struct RewardServer {
    cmd: String,
    child: Child,
    /// None while a step's writer thread holds it.
    stdin: Option<ChildStdin>,
    /// Its output, line by line, from a reader thread (closed when it ends).
    lines: Receiver<std::io::Result<String>>,
    timeout: Duration,
}

impl RewardServer {
    pub fn start(cmd: &str) -> Result<Self> {
        let fail = |what: String| Error::usage(format!("--reward serve:{cmd}: {what}"));
        let timeout = answer_timeout()?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| fail(format!("cannot start: {e}")))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let end = line.is_err();
                if tx.send(line).is_err() || end {
                    break;
                }
            }
        });
        Ok(Self {
            cmd: cmd.to_string(),
            stdin: child.stdin.take(),
            child,
            lines: rx,
            timeout,
        })
    }

    fn fail(&self, what: String) -> Error {
        Error::usage(format!("--reward serve:{}: {what}", self.cmd))
    }

    /// Why the server stopped answering: its exit status when it has ended.
    fn ended(&mut self) -> Error {
        // the reader saw the end of its output; give the process a moment to exit
        for _ in 0..50 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return self.fail(format!(
                    "exited with {status} before answering every completion"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.fail("closed its output before answering every completion".into())
    }

    /// Writes the step's completions and reads one reward per completion.
    pub fn score(&mut self, items: &[Scored]) -> Result<Vec<f64>> {
        // lines left over from the last step would pair rewards with the wrong completions
        if let Ok(Ok(extra)) = self.lines.try_recv() {
            return Err(self.fail(format!(
                "printed more lines than completions (an extra {extra:?}); expected exactly one reward per completion"
            )));
        }
        let input = completion_lines(items);
        let Some(mut stdin) = self.stdin.take() else {
            return Err(self.ended());
        };
        // Write from a thread: the server answers while it reads, and nobody would read its
        // answers while this thread blocks on a full pipe.
        let writer = std::thread::spawn(move || {
            let r = stdin.write_all(&input).and_then(|()| stdin.flush());
            (stdin, r)
        });
        let mut got = Vec::with_capacity(items.len());
        for i in 0..items.len() {
            match self.lines.recv_timeout(self.timeout) {
                Ok(Ok(line)) => got.push(line),
                Ok(Err(e)) => return Err(self.fail(format!("cannot read its output: {e}"))),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.fail(format!(
                        "no answer for completion {} of {} within {} s (PEFTKIT_REWARD_TIMEOUT); it must print one line per completion and flush it (python3 -u, or print(..., flush=True))",
                        i + 1,
                        items.len(),
                        self.timeout.as_secs_f64()
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.ended()),
            }
        }
        let (stdin, wrote) = writer.join().expect("writer thread");
        if let Err(e) = wrote {
            return Err(self.fail(format!("cannot write its input: {e}")));
        }
        self.stdin = Some(stdin);
        let lines: Vec<&str> = got.iter().map(String::as_str).collect();
        parse_rewards(&lines, |w| self.fail(w))
    }
}

impl Drop for RewardServer {
    /// End of input tells the server to finish; one that lingers is stopped.
    fn drop(&mut self) {
        self.stdin.take();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

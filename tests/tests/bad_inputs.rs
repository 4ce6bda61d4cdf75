//! The bad-input corpus (issue 10): every tool, fed broken files and impossible options, must
//! fail the way docs/exit-codes.md promises.
//!
//! Cases live in tests/bad_inputs/cases.json. Each one builds its inputs in a fresh temporary
//! folder (copies of committed fixtures, then the mutations of [`setup_step`]: truncate, patch
//! bytes, replace text, edit JSON or a safetensors header, re-lay a tensor, write a NaN, ...),
//! runs one tool (optionally under RLIMIT_FSIZE: a full disk, or with a read-only bind mount:
//! a read-only folder even for root), and checks:
//!
//! - the exit code is the expected one (2 usage, 3 bad input, 4 I/O, 5 numeric);
//! - stderr ends with exactly one `error:` line that contains every expected substring (the
//!   file, tensor or line, and the problem); before it only `warning:` lines and the one-line
//!   reports of stages that finished; no panic and no "internal error";
//! - the case folder is byte-for-byte what it was before the run: inputs unchanged, no partial
//!   output, no stray temporary file; committed fixtures named in the arguments unchanged.
//!
//! Cases run on two threads and every failure is reported at once.
//! `PEFTKIT_BAD_INPUTS=substr` runs only the cases whose name contains `substr`;
//! `PEFTKIT_WRITE_BAD_INPUT_TABLE=path` writes the Markdown table of cases and the error lines
//! actually printed (docs/reliability-bad-inputs.md is generated that way).

use peftkit_tests::{bin, fixtures};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const TOOLS: &[&str] = &[
    "adapter-inspect",
    "adapter-merge",
    "dpo-train",
    "gpu-check",
    "grpo-train",
    "model-export",
    "model-import",
    "peft-eval",
    "peft-generate",
    "peft-train",
    "ppo-train",
    "quantize-nf4",
    "rm-score",
    "rm-train",
];

/// A case running longer than this is a failure (a tool that hangs on bad input).
const TIMEOUT: Duration = Duration::from_secs(120);

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bad_inputs")
}

struct Case {
    name: String,
    tool: String,
    what: String,
    setup: Vec<Value>,
    args: Vec<String>,
    code: i32,
    contains: Vec<String>,
    /// Run under RLIMIT_FSIZE of this many bytes with SIGXFSZ ignored (a full disk).
    fsize: Option<u64>,
    /// A folder made genuinely read-only for the run: a read-only bind mount in a private
    /// mount namespace (`unshare -m`; chmod does not stop root). Skipped where that is not
    /// permitted.
    readonly: Option<String>,
    /// Paths the run may leave behind: known, documented leftovers owned by other work.
    known_leftovers: Vec<String>,
}

fn parse_case(v: &Value) -> Result<Case, String> {
    let s = |k: &str| -> Result<String, String> {
        v.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("case {v}: missing string {k:?}"))
    };
    let strs = |k: &str| -> Vec<String> {
        v.get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|x| x.as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(Case {
        name: s("name")?,
        tool: s("tool")?,
        what: s("what")?,
        setup: v
            .get("setup")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        args: strs("args"),
        code: v
            .get("code")
            .and_then(Value::as_i64)
            .ok_or_else(|| format!("case {v}: missing code"))? as i32,
        contains: strs("contains"),
        fsize: v.get("fsize").and_then(Value::as_u64),
        known_leftovers: strs("known_leftovers"),
        readonly: v.get("readonly").and_then(Value::as_str).map(String::from),
    })
}

/// Placeholders of the manifest: {fixtures}, {bad} (tests/bad_inputs) and {case} (the case's
/// temporary folder; {tmp} is the same).
struct Places {
    fixtures: String,
    bad: String,
    case: String,
}

impl Places {
    fn expand(&self, s: &str) -> String {
        s.replace("{fixtures}", &self.fixtures)
            .replace("{bad}", &self.bad)
            .replace("{case}", &self.case)
            .replace("{tmp}", &self.case)
    }

    /// The reverse, so that the table and the substring checks do not depend on temp names.
    fn shorten(&self, s: &str) -> String {
        s.replace(&self.case, "{case}")
            .replace(&self.fixtures, "{fixtures}")
            .replace(&self.bad, "{bad}")
    }
}

fn copy_any(from: &Path, to: &Path) -> std::io::Result<()> {
    if from.is_dir() {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            copy_any(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(())
    } else {
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::copy(from, to).map(|_| ())
    }
}

fn hex_bytes(h: &str) -> Result<Vec<u8>, String> {
    let h: String = h.chars().filter(|c| !c.is_whitespace()).collect();
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).map_err(|e| format!("hex {h}: {e}")))
        .collect()
}

/// (header JSON, data bytes) of a safetensors file.
fn st_split(bytes: &[u8]) -> Result<(Value, Vec<u8>), String> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value =
        serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| format!("st header: {e}"))?;
    Ok((header, bytes[8 + n..].to_vec()))
}

fn st_join(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// Bytes of one element `value` ("nan", "inf", "-inf" or a number) in a safetensors dtype.
fn element_bytes(dtype: &str, value: &Value) -> Result<Vec<u8>, String> {
    let x: f32 = match value {
        Value::String(s) => s.parse().map_err(|e| format!("value {s}: {e}"))?,
        Value::Number(n) => n.as_f64().unwrap() as f32,
        _ => return Err(format!("value {value}")),
    };
    Ok(match dtype {
        "F32" => x.to_le_bytes().to_vec(),
        "F16" => half::f16::from_f32(x).to_le_bytes().to_vec(),
        "BF16" => half::bf16::from_f32(x).to_le_bytes().to_vec(),
        other => return Err(format!("st_value: dtype {other} not supported")),
    })
}

fn json_pointer_parent<'a>(
    root: &'a mut Value,
    pointer: &str,
) -> Result<(&'a mut Value, String), String> {
    let (parent, key) = pointer
        .rsplit_once('/')
        .ok_or_else(|| format!("bad pointer {pointer}"))?;
    let key = key.replace("~1", "/").replace("~0", "~");
    let p = if parent.is_empty() {
        root
    } else {
        root.pointer_mut(parent)
            .ok_or_else(|| format!("no {parent} in JSON"))?
    };
    Ok((p, key))
}

fn json_edit(v: &mut Value, pointer: &str, new: Option<&Value>) -> Result<(), String> {
    let (parent, key) = json_pointer_parent(v, pointer)?;
    match parent {
        Value::Object(m) => {
            match new {
                Some(n) => {
                    m.insert(key, n.clone());
                }
                None => {
                    m.remove(&key).ok_or_else(|| format!("no key {pointer}"))?;
                }
            };
        }
        Value::Array(a) => {
            let i: usize = key.parse().map_err(|_| format!("index {key}"))?;
            match new {
                Some(n) => *a.get_mut(i).ok_or_else(|| format!("no {pointer}"))? = n.clone(),
                None => {
                    a.remove(i);
                }
            }
        }
        _ => return Err(format!("{pointer}: parent is not an object or array")),
    }
    Ok(())
}

/// Carry out one setup step of a case.
fn setup_step(step: &Value, pl: &Places) -> Result<(), String> {
    let op = step["op"].as_str().ok_or("setup step without op")?;
    let path = |k: &str| -> Result<PathBuf, String> {
        step[k]
            .as_str()
            .map(|p| PathBuf::from(pl.expand(p)))
            .ok_or_else(|| format!("{op}: missing {k}"))
    };
    let num = |k: &str| -> Result<i64, String> {
        step[k]
            .as_i64()
            .ok_or_else(|| format!("{op}: missing number {k}"))
    };
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let write = |p: &Path, b: &[u8]| {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        std::fs::write(p, b).map_err(|e| format!("{}: {e}", p.display()))
    };
    let bytes_arg = || -> Result<Vec<u8>, String> {
        if let Some(t) = step.get("text").and_then(Value::as_str) {
            Ok(t.as_bytes().to_vec())
        } else if let Some(h) = step.get("hex").and_then(Value::as_str) {
            hex_bytes(h)
        } else {
            Err(format!("{op}: needs text or hex"))
        }
    };
    match op {
        // copy a fixture file or folder
        "copy" => {
            let (from, to) = (path("from")?, path("to")?);
            copy_any(&from, &to).map_err(|e| format!("copy {}: {e}", from.display()))
        }
        // keep the first `len` bytes, or drop the last `cut` bytes
        "truncate" => {
            let p = path("path")?;
            let mut b = read(&p)?;
            let n = if step.get("cut").is_some() {
                b.len() - num("cut")? as usize
            } else {
                num("len")? as usize
            };
            b.truncate(n);
            write(&p, &b)
        }
        // overwrite bytes at an offset (negative: from the end)
        "patch" => {
            let p = path("path")?;
            let mut b = read(&p)?;
            let off = num("offset")?;
            let off = if off < 0 {
                (b.len() as i64 + off) as usize
            } else {
                off as usize
            };
            let new = bytes_arg()?;
            b[off..off + new.len()].copy_from_slice(&new);
            write(&p, &b)
        }
        "write" => write(&path("path")?, &bytes_arg()?),
        // replace the first occurrence of a text by another of the same length (offsets stay)
        "replace" => {
            let p = path("path")?;
            let mut b = read(&p)?;
            let from = step["from"].as_str().ok_or("replace: from")?.as_bytes();
            let to = step["to"].as_str().ok_or("replace: to")?.as_bytes();
            if from.len() != to.len() {
                return Err("replace: from and to must have the same length".into());
            }
            let at = b
                .windows(from.len())
                .position(|w| w == from)
                .ok_or_else(|| format!("replace: {:?} not found", step["from"]))?;
            b[at..at + to.len()].copy_from_slice(to);
            write(&p, &b)
        }
        "append" => {
            let p = path("path")?;
            let mut b = read(&p)?;
            b.extend(bytes_arg()?);
            write(&p, &b)
        }
        "remove" => {
            let p = path("path")?;
            if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            }
            .map_err(|e| format!("remove {}: {e}", p.display()))
        }
        "mkdir" => {
            let p = path("path")?;
            std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))
        }
        "chmod" => {
            use std::os::unix::fs::PermissionsExt;
            let p = path("path")?;
            let mode = u32::from_str_radix(step["mode"].as_str().ok_or("chmod: mode")?, 8)
                .map_err(|e| e.to_string())?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("{}: {e}", p.display()))
        }
        // set (or with "remove": true, delete) a JSON value by pointer in a JSON file
        "json_set" | "json_remove" => {
            let p = path("path")?;
            let mut v: Value = serde_json::from_slice(&read(&p)?).map_err(|e| e.to_string())?;
            let ptr = step["pointer"].as_str().ok_or("json: pointer")?;
            json_edit(&mut v, ptr, (op == "json_set").then(|| &step["value"]))?;
            write(&p, &serde_json::to_vec_pretty(&v).unwrap())
        }
        // the same on a safetensors header (the data is kept as is)
        "st_set" | "st_remove" => {
            let p = path("path")?;
            let (mut h, data) = st_split(&read(&p)?)?;
            let ptr = step["pointer"].as_str().ok_or("st: pointer")?;
            json_edit(&mut h, ptr, (op == "st_set").then(|| &step["value"]))?;
            write(&p, &st_join(&h, &data))
        }
        // rename tensors: replace a substring of every name
        "st_rename" => {
            let p = path("path")?;
            let (h, data) = st_split(&read(&p)?)?;
            let from = step["from"].as_str().ok_or("st_rename: from")?;
            let to = step["to"].as_str().ok_or("st_rename: to")?;
            let m: serde_json::Map<String, Value> = h
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.replace(from, to), v.clone()))
                .collect();
            write(&p, &st_join(&Value::Object(m), &data))
        }
        // give one tensor a new shape and/or dtype, keeping a consistent file: its bytes are
        // cut or zero-padded to the new size and every offset is laid out again
        "st_relayout" => {
            let p = path("path")?;
            let (mut h, data) = st_split(&read(&p)?)?;
            let t = step["tensor"].as_str().ok_or("st_relayout: tensor")?;
            let info = h
                .get_mut(t)
                .ok_or_else(|| format!("st_relayout: no tensor {t}"))?;
            if let Some(shape) = step.get("shape") {
                info["shape"] = shape.clone();
            }
            if let Some(dtype) = step.get("dtype") {
                info["dtype"] = dtype.clone();
            }
            let mut names: Vec<(u64, String)> = h
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| *k != "__metadata__")
                .map(|(k, v)| (v["data_offsets"][0].as_u64().unwrap(), k.clone()))
                .collect();
            names.sort();
            let mut out = Vec::new();
            for (_, n) in names {
                let info = &h[&n];
                let (a, b) = (
                    info["data_offsets"][0].as_u64().unwrap() as usize,
                    info["data_offsets"][1].as_u64().unwrap() as usize,
                );
                let elem = match info["dtype"].as_str().unwrap() {
                    "F64" | "I64" | "U64" => 8,
                    "F32" | "I32" | "U32" => 4,
                    "F16" | "BF16" | "I16" | "U16" => 2,
                    _ => 1,
                };
                let count: u64 = info["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap())
                    .product();
                let mut bytes = data[a..b].to_vec();
                bytes.resize(count as usize * elem, 0);
                let start = out.len();
                out.extend_from_slice(&bytes);
                h[&n]["data_offsets"] = serde_json::json!([start, out.len()]);
            }
            write(&p, &st_join(&h, &out))
        }
        // write one element of a tensor (e.g. NaN)
        "st_value" => {
            let p = path("path")?;
            let b = read(&p)?;
            let (h, mut data) = st_split(&b)?;
            let t = step["tensor"].as_str().ok_or("st_value: tensor")?;
            let info = h.get(t).ok_or_else(|| format!("st_value: no tensor {t}"))?;
            let dtype = info["dtype"].as_str().unwrap();
            let start = info["data_offsets"][0].as_u64().unwrap() as usize;
            let e = element_bytes(dtype, &step["value"])?;
            let at = start + step["index"].as_u64().unwrap_or(0) as usize * e.len();
            data[at..at + e.len()].copy_from_slice(&e);
            write(&p, &st_join(&h, &data))
        }
        other => Err(format!("unknown setup op {other}")),
    }
}

/// Path -> hash of every file under `root` (directories listed too, so that a stray empty
/// folder counts).
fn snapshot(root: &Path, out: &mut BTreeMap<PathBuf, u64>) {
    use std::hash::Hasher;
    let Ok(meta) = std::fs::symlink_metadata(root) else {
        return;
    };
    if meta.is_dir() {
        out.insert(root.to_path_buf(), u64::MAX);
        if let Ok(rd) = std::fs::read_dir(root) {
            for e in rd.flatten() {
                snapshot(&e.path(), out);
            }
        }
    } else {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        if let Ok(b) = std::fs::read(root) {
            h.write(&b);
        }
        h.write_u32(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()));
        out.insert(root.to_path_buf(), h.finish());
    }
}

fn diff_snapshots(
    before: &BTreeMap<PathBuf, u64>,
    after: &BTreeMap<PathBuf, u64>,
    pl: &Places,
) -> Vec<String> {
    let keys: BTreeSet<&PathBuf> = before.keys().chain(after.keys()).collect();
    let mut problems = Vec::new();
    for k in keys {
        let name = pl.shorten(&k.display().to_string());
        match (before.get(k), after.get(k)) {
            (None, Some(_)) => problems.push(format!("left behind: {name}")),
            (Some(_), None) => problems.push(format!("removed: {name}")),
            (Some(a), Some(b)) if a != b => problems.push(format!("modified: {name}")),
            _ => {}
        }
    }
    problems
}

struct Outcome {
    error_line: String,
    problems: Vec<String>,
}

/// Exit status of the read-only wrapper when it cannot set up the mount.
const NO_MOUNT: i32 = 99;

fn run_case(case: &Case) -> Outcome {
    let tmp = tempfile::Builder::new()
        .prefix("bad-input-")
        .tempdir()
        .expect("temp dir");
    let case_dir = tmp.path().join("case");
    std::fs::create_dir(&case_dir).unwrap();
    let pl = Places {
        fixtures: fixtures().display().to_string(),
        bad: corpus_dir().display().to_string(),
        case: case_dir.display().to_string(),
    };
    let mut problems = Vec::new();
    for step in &case.setup {
        if let Err(e) = setup_step(step, &pl) {
            problems.push(format!("setup failed: {e}"));
            return Outcome {
                error_line: String::new(),
                problems,
            };
        }
    }
    let args: Vec<String> = case.args.iter().map(|a| pl.expand(a)).collect();
    // Inputs: the whole case folder, plus any committed file the arguments name.
    let mut before = BTreeMap::new();
    snapshot(&case_dir, &mut before);
    for a in &args {
        for part in a.split('=') {
            let p = Path::new(part);
            if part.starts_with(&pl.fixtures) || part.starts_with(&pl.bad) {
                snapshot(p, &mut before);
            }
        }
    }

    let tool = bin(&case.tool);
    let mut cmd = match (&case.readonly, case.fsize) {
        (Some(dir), _) => {
            let mut c = Command::new("unshare");
            c.arg("-m")
                .arg("sh")
                .arg("-c")
                .arg(format!(
                    "mount --make-rprivate / 2>/dev/null; mount --bind \"$0\" \"$0\" && \
                     mount -o remount,bind,ro \"$0\" \"$0\" || exit {NO_MOUNT}; exec \"$@\""
                ))
                .arg(pl.expand(dir))
                .arg(&tool);
            c
        }
        // A full disk: writes past the limit fail with EFBIG. SIGXFSZ would kill the tool
        // instead, so it is ignored (an ignored signal stays ignored across exec).
        (None, Some(n)) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg("trap '' XFSZ; exec prlimit --fsize=\"$0\" \"$@\"")
                .arg(n.to_string())
                .arg(&tool);
            c
        }
        (None, None) => Command::new(&tool),
    };
    cmd.args(&args)
        .current_dir(&case_dir)
        .env("PEFTKIT_NO_PROGRESS", "1")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if case.readonly.is_some() => {
            return Outcome {
                error_line: format!("(skipped: cannot run unshare: {e})"),
                problems,
            }
        }
        Err(e) => panic!("spawn {}: {e}", case.tool),
    };
    let mut stderr_pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    let stderr_short = pl.shorten(&stderr);
    if case.readonly.is_some() && status.and_then(|s| s.code()) == Some(NO_MOUNT) {
        return Outcome {
            error_line: "(skipped: no permission for a read-only bind mount here)".into(),
            problems,
        };
    }

    let error_line = stderr_short
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or("")
        .to_string();
    match status {
        None => problems.push(format!("timed out after {TIMEOUT:?}")),
        Some(st) => match st.code() {
            None => problems.push(format!("killed by a signal: {st}")),
            Some(0) => problems.push("exit 0, expected a failure".into()),
            Some(c) if c != case.code => {
                problems.push(format!("exit code {c}, expected {}", case.code))
            }
            _ => {}
        },
    }
    if stderr.contains("panicked at") || stderr.contains("internal error") {
        problems.push("panic / internal error".into());
    }
    // Exactly one error line, and it is the last line: nothing (a usage block, a second
    // message, a backtrace) may follow it. Before it come `warning:` lines and the one-line
    // reports of stages that did finish (e.g. peft-train's `data: 3 examples ...`).
    let lines: Vec<&str> = stderr_short.lines().collect();
    let errors = lines.iter().filter(|l| l.starts_with("error:")).count();
    if errors != 1 || !lines.last().is_some_and(|l| l.starts_with("error:")) {
        problems.push("stderr does not end with exactly one error line".into());
    }
    for want in &case.contains {
        if !error_line.contains(want.as_str()) {
            problems.push(format!("error line does not contain {want:?}"));
        }
    }
    let mut after = BTreeMap::new();
    snapshot(&case_dir, &mut after);
    for k in before.keys() {
        if !k.starts_with(&case_dir) {
            snapshot(k, &mut after);
        }
    }
    let known: Vec<String> = case
        .known_leftovers
        .iter()
        .map(|k| format!("left behind: {k}"))
        .collect();
    problems.extend(
        diff_snapshots(&before, &after, &pl)
            .into_iter()
            .filter(|p| !known.contains(p)),
    );
    if !problems.is_empty() {
        problems.push(format!(
            "command: {} {}\n      stderr: {}",
            case.tool,
            pl.shorten(&args.join(" ")),
            stderr_short.trim_end().replace('\n', "\n              ")
        ));
    }
    Outcome {
        error_line,
        problems,
    }
}

fn load_cases() -> Vec<Case> {
    let p = corpus_dir().join("cases.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    v["cases"]
        .as_array()
        .expect("cases array")
        .iter()
        .map(|c| parse_case(c).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect()
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn write_table(path: &Path, cases: &[Case], outcomes: &[Outcome]) {
    let mut t = String::from(
        "| # | case | tool | what is wrong | exit | error line printed |\n|---|---|---|---|---|---|\n",
    );
    for (i, (c, o)) in cases.iter().zip(outcomes).enumerate() {
        t += &format!(
            "| {} | `{}` | {} | {} | {} | `{}` |\n",
            i + 1,
            c.name,
            c.tool,
            md_cell(&c.what),
            c.code,
            md_cell(&o.error_line).replace('`', "'")
        );
    }
    // Keep a hand-written preamble: replace only what follows the marker.
    const MARK: &str = "<!-- generated by tests/tests/bad_inputs.rs: do not edit below -->";
    let doc = match std::fs::read_to_string(path) {
        Ok(old) if old.contains(MARK) => {
            format!("{}{MARK}\n\n{t}", &old[..old.find(MARK).unwrap()])
        }
        _ => format!("{MARK}\n\n{t}"),
    };
    std::fs::write(path, doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

#[test]
fn bad_inputs_fail_cleanly() {
    let all = load_cases();
    // The corpus itself: unique names, every tool covered, big enough.
    let names: BTreeSet<&str> = all.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names.len(), all.len(), "duplicate case names in cases.json");
    for c in &all {
        assert!(TOOLS.contains(&c.tool.as_str()), "{}: unknown tool", c.name);
        assert!(
            [2, 3, 4, 5].contains(&c.code),
            "{}: expected code must be 2, 3, 4 or 5",
            c.name
        );
    }
    for t in TOOLS {
        assert!(all.iter().any(|c| c.tool == *t), "no case for {t}");
    }
    assert!(all.len() >= 55, "only {} cases", all.len());

    let filter = std::env::var("PEFTKIT_BAD_INPUTS").unwrap_or_default();
    let cases: Vec<Case> = all
        .into_iter()
        .filter(|c| c.name.contains(&filter))
        .collect();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new((0..cases.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= cases.len() {
                    break;
                }
                let o = run_case(&cases[i]);
                results.lock().unwrap()[i] = Some(o);
            });
        }
    });
    let outcomes: Vec<Outcome> = results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(Option::unwrap)
        .collect();
    if let Ok(p) = std::env::var("PEFTKIT_WRITE_BAD_INPUT_TABLE") {
        write_table(Path::new(&p), &cases, &outcomes);
    }
    let mut report = String::new();
    let mut failed = 0;
    for (c, o) in cases.iter().zip(&outcomes) {
        if !o.problems.is_empty() {
            failed += 1;
            report += &format!("\n{} ({}): {}\n", c.name, c.tool, c.what);
            for p in &o.problems {
                report += &format!("    - {p}\n");
            }
        }
    }
    assert!(
        failed == 0,
        "{failed} of {} bad-input cases failed:\n{report}",
        cases.len()
    );
}

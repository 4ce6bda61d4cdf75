//! Reading data files: JSON Lines, JSON arrays and plain text, with errors that name the file
//! and line.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// One record of a data file and the line it came from (1-based; the element index + 1 for a
/// JSON array file).
#[derive(Clone, Debug)]
pub struct Record {
    pub line: usize,
    pub value: Value,
}

/// Read a data file's bytes as UTF-8, naming the first bad line when it is not.
pub fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..valid]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            Err(Error::bad_input(
                path,
                format!("line {line}: not valid UTF-8 (byte offset {valid})"),
            ))
        }
    }
}

/// Records of a .jsonl file (one JSON value per non-empty line) or of a .json file holding an
/// array. With `skip_bad`, malformed lines are skipped and counted instead of failing.
pub fn read_records(path: &Path, skip_bad: bool) -> Result<(Vec<Record>, usize)> {
    let text = read_utf8(path)?;
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return Err(Error::bad_input(path, "the file is empty: no samples"));
    }
    // A JSON array file (alpaca style), recognised by content rather than extension.
    if trimmed.starts_with('[') {
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_input(path, format!("line {}: invalid JSON: {e}", e.line())))?;
        let items = v.as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            return Err(Error::bad_input(
                path,
                "the JSON array is empty: no samples",
            ));
        }
        return Ok((
            items
                .into_iter()
                .enumerate()
                .map(|(i, value)| Record { line: i + 1, value })
                .collect(),
            0,
        ));
    }
    let mut out = Vec::new();
    let mut skipped = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(value) => out.push(Record { line: i + 1, value }),
            Err(e) if skip_bad => {
                let _ = e;
                skipped += 1;
            }
            Err(e) => {
                return Err(Error::bad_input(
                    path,
                    format!(
                        "line {}: invalid JSON ({e}); fix the line or pass --skip-bad-lines",
                        i + 1
                    ),
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(Error::bad_input(path, "no samples in the file"));
    }
    Ok((out, skipped))
}

/// Plain-text samples: a .txt file (one sample per non-empty line) or JSON records with a
/// "text" field.
pub fn read_text_samples(path: &Path) -> Result<Vec<String>> {
    let is_txt = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("txt"));
    if is_txt {
        let text = read_utf8(path)?;
        let samples: Vec<String> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect();
        if samples.is_empty() {
            return Err(Error::bad_input(path, "the file is empty: no samples"));
        }
        return Ok(samples);
    }
    let (records, _) = read_records(path, false)?;
    records
        .into_iter()
        .map(|r| match r.value.get("text") {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(Error::bad_input(
                path,
                format!(
                    "line {}: expected an object with a string \"text\" field{}",
                    r.line,
                    keys_hint(&r.value)
                ),
            )),
        })
        .collect()
}

/// " (found keys: a, b)" for error messages.
pub fn keys_hint(v: &Value) -> String {
    match v.as_object() {
        Some(o) if !o.is_empty() => format!(
            " (found keys: {})",
            o.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
        _ => String::new(),
    }
}

//! A trainer's JSON Lines metrics log (`--log`) read back as named series of (step, value)
//! points: every numeric field of every line that has a `step` becomes a point of the series
//! of that name.
//!
//! Logs are appended to, so one file may hold a run and its `--resume`s, or an earlier run:
//! a point whose step is not past the last one of its series replaces the points from that
//! step on (the resumed or newer run wins). A last line cut off by a killed run is ignored.

use crate::{Error, Result};
use std::path::Path;

/// The points of one logged quantity, in step order.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The log's field name (`loss`, `eval_loss`, `lr`, ...).
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Fields that are not curves worth drawing on their own (counters and positions).
const NOT_SERIES: &[&str] = &["step", "epoch"];

/// Read the series of the log at `path`.
pub fn read_log(path: &Path) -> Result<Vec<Series>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_log(&text).map_err(|(line, msg)| Error::bad_input(path, format!("line {line}: {msg}")))
}

/// The series of a log's text; on error the 1-based line number and what is wrong.
pub fn parse_log(text: &str) -> std::result::Result<Vec<Series>, (usize, String)> {
    let mut series: Vec<Series> = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            // a killed run may leave half a line at the end
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => return Err((i + 1, format!("invalid JSON: {e}"))),
        };
        let Some(obj) = value.as_object() else {
            return Err((i + 1, "expected a JSON object per line".into()));
        };
        let Some(step) = obj.get("step").and_then(|s| s.as_f64()) else {
            continue; // header lines (data statistics)
        };
        for (k, v) in obj {
            let Some(y) = v.as_f64() else { continue };
            if NOT_SERIES.contains(&k.as_str()) || !y.is_finite() {
                continue;
            }
            let s = match series.iter_mut().position(|s| s.name == *k) {
                Some(j) => &mut series[j],
                None => {
                    series.push(Series {
                        name: k.clone(),
                        points: Vec::new(),
                    });
                    series.last_mut().expect("just pushed")
                }
            };
            if s.points.last().is_some_and(|&(x, _)| step <= x) {
                s.points.retain(|&(x, _)| x < step);
            }
            s.points.push((step, y));
        }
    }
    Ok(series)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_series_and_resumes() {
        let log = r#"{"data": {"pairs": 4}}
{"step": 0, "eval_loss": 2.0}
{"step": 1, "epoch": 0, "loss": 1.5, "lr": 0.001}
{"step": 2, "epoch": 0, "loss": 1.25, "lr": 0.0005}
{"step": 2, "eval_loss": 1.0}
{"step": 2, "epoch": 0, "loss": 1.2, "lr": 0.0005}
{"step": 3, "epoch": 0, "loss": 1.1, "lr": null}
{"step": 4, "loss": 1."#;
        let s = parse_log(log).unwrap();
        let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["eval_loss", "loss", "lr"]);
        assert_eq!(s[0].points, [(0.0, 2.0), (2.0, 1.0)]);
        assert_eq!(s[1].points, [(1.0, 1.5), (2.0, 1.2), (3.0, 1.1)]);
        assert_eq!(s[2].points, [(1.0, 0.001), (2.0, 0.0005)]);
        // a fresh run appended to an old log replaces it
        let s = parse_log(
            "{\"step\":1,\"loss\":3}\n{\"step\":2,\"loss\":2}\n{\"step\":1,\"loss\":5}\n",
        )
        .unwrap();
        assert_eq!(s[0].points, [(1.0, 5.0)]);
        assert_eq!(parse_log("{\"step\":1}\nnot json\n{}\n").unwrap_err().0, 2);
    }
}

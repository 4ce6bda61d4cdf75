//! `--plot FILE.png|svg` of the trainers: the curves of a run's JSON Lines metrics log (loss,
//! eval loss, learning rate; reward accuracy and margin; PPO score, KL and response length)
//! drawn into one chart.
//!
//! - [`metrics`] reads the log into series (resumed runs handled),
//! - [`panels`] groups the series into panels,
//! - [`chart`] draws them (SVG or PNG, written atomically).

pub mod chart;
pub mod metrics;
pub mod panels;

use crate::inspect::plot::Format;
use crate::{Error, Result};
use std::path::Path;

/// What a chart holds.
#[derive(Clone, Debug)]
pub struct PlotSummary {
    pub panels: Vec<String>,
    pub series: Vec<String>,
    pub points: usize,
}

/// Check a `--plot` path before a run: `.png` or `.svg` (usage error otherwise) in a folder
/// that exists, so that a long run never fails at its end over the chart's name.
pub fn check_path(path: &Path) -> Result<Format> {
    let format = Format::of(path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "its folder does not exist"),
        ));
    }
    Ok(format)
}

/// Draw the metrics log `log` into `out` (PNG or SVG by extension) under `title`.
pub fn plot_log(log: &Path, out: &Path, title: &str) -> Result<PlotSummary> {
    check_path(out)?;
    let series = metrics::read_log(log)?;
    let panels = panels::panels(&series);
    if panels.is_empty() {
        return Err(Error::bad_input(
            log,
            "no metrics to plot (no line with a step and a loss, accuracy, score, KL or lr)",
        ));
    }
    chart::write_chart(out, &panels, title)?;
    Ok(PlotSummary {
        panels: panels.iter().map(|p| p.title.clone()).collect(),
        series: panels
            .iter()
            .flat_map(|p| p.series.iter().map(|s| s.name.clone()))
            .collect(),
        points: panels
            .iter()
            .flat_map(|p| p.series.iter().map(|s| s.points.len()))
            .sum(),
    })
}

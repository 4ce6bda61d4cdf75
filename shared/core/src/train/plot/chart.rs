//! Drawing the panels: line charts (step on x) in a grid of two columns, SVG or PNG by the
//! file's extension, with the text machinery, palette and tick rules of adapter-inspect's
//! `--plot` (`inspect::plot`: plotters' SVG backend, or its bitmap backend with our own
//! bitmap font). Written to a temporary sibling and renamed into place.

use super::panels::Panel;
use crate::inspect::font;
use crate::inspect::plot::{
    nice_step, temp_sibling, text, tick_label, DrawResult, Format, PALETTE,
};
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::HPos;
use std::path::Path;

const PANEL_W: i32 = 560;
const PANEL_H: i32 = 320;
const TITLE_H: i32 = 40;
/// Margins of the plot area inside a panel.
const LEFT: i32 = 78;
const RIGHT: i32 = 24;
const TOP: i32 = 56;
const BOTTOM: i32 = 44;
/// Series with at most this many points get a marker on every point.
const MARKERS_UP_TO: usize = 25;

/// An axis: its range and ticks.
#[derive(Clone, Debug)]
struct Axis {
    lo: f64,
    hi: f64,
    step: f64,
    ticks: Vec<f64>,
}

impl Axis {
    /// Nice ticks around [min, max] (integers only when `integer`).
    fn new(min: f64, max: f64, integer: bool) -> Self {
        let (mut min, mut max) = (min, max);
        if max <= min {
            let pad = if min == 0.0 { 1.0 } else { min.abs() * 0.1 };
            min -= pad;
            max += pad;
        }
        // a hair under the range, so that 0..1.0000001e-3 still gets 2e-4 steps
        let mut step = nice_step((max - min) * (1.0 - 1e-6));
        if integer {
            step = step.max(1.0).round();
        }
        let lo = (min / step + 1e-6).floor() * step;
        let mut hi = (max / step - 1e-6).ceil() * step;
        if hi <= lo {
            hi = lo + step;
        }
        let n = ((hi - lo) / step).round() as usize;
        Self {
            lo,
            hi,
            step,
            ticks: (0..=n).map(|i| lo + i as f64 * step).collect(),
        }
    }

    fn label(&self, v: f64) -> String {
        if v.abs() < self.step * 1e-6 {
            return "0".into();
        }
        if self.step < 1e-3 {
            format!("{v:.1e}")
        } else {
            tick_label(v, self.step)
        }
    }
}

/// Canvas size and grid of `n` panels.
fn grid(n: usize) -> (i32, i32, usize) {
    let cols = n.clamp(1, 2);
    let rows = n.div_ceil(cols).max(1);
    (cols as i32 * PANEL_W, TITLE_H + rows as i32 * PANEL_H, cols)
}

fn draw<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panels: &[Panel],
    title: &str,
    bitmap: bool,
) -> DrawResult {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    area.fill(&WHITE).map_err(e)?;
    text(area, title, (16, TITLE_H / 2), HPos::Left, 16, bitmap)?;
    let (x_min, x_max) = panels
        .iter()
        .flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        });
    let xa = Axis::new(x_min, x_max, true);
    let (_, _, cols) = grid(panels.len());
    for (i, panel) in panels.iter().enumerate() {
        let ox = (i % cols) as i32 * PANEL_W;
        let oy = TITLE_H + (i / cols) as i32 * PANEL_H;
        draw_panel(area, panel, &xa, (ox, oy), bitmap)?;
    }
    area.present().map_err(e)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    xa: &Axis,
    (ox, oy): (i32, i32),
    bitmap: bool,
) -> DrawResult {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    let (x0, x1) = (ox + LEFT, ox + PANEL_W - RIGHT);
    let (y0, y1) = (oy + PANEL_H - BOTTOM, oy + TOP);
    let (y_min, y_max) = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
            (a.min(y), b.max(y))
        });
    let ya = Axis::new(y_min, y_max, false);
    let px = |x: f64| x0 + ((x - xa.lo) / (xa.hi - xa.lo) * f64::from(x1 - x0)).round() as i32;
    let py = |y: f64| y0 - ((y - ya.lo) / (ya.hi - ya.lo) * f64::from(y0 - y1)).round() as i32;
    text(area, &panel.title, (x0, oy + 14), HPos::Left, 14, bitmap)?;
    // legend: a short line in the series' colour, then its name (the log's field)
    let mut lx = x0;
    for (si, s) in panel.series.iter().enumerate() {
        let color = PALETTE[si % PALETTE.len()];
        let ly = oy + 34;
        area.draw(&PathElement::new(
            vec![(lx, ly), (lx + 18, ly)],
            color.stroke_width(2),
        ))
        .map_err(e)?;
        text(area, &s.name, (lx + 24, ly), HPos::Left, 12, bitmap)?;
        lx += 24 + font::text_width(&s.name, 1) + 22;
    }
    let grid = RGBColor(225, 225, 225);
    for &t in &ya.ticks {
        let y = py(t);
        area.draw(&PathElement::new(vec![(x0, y), (x1, y)], grid))
            .map_err(e)?;
        area.draw(&PathElement::new(vec![(x0 - 5, y), (x0, y)], BLACK))
            .map_err(e)?;
        text(area, &ya.label(t), (x0 - 8, y), HPos::Right, 12, bitmap)?;
    }
    // x ticks: thin out so that labels never overlap
    let widest = xa
        .ticks
        .iter()
        .map(|&t| font::text_width(&xa.label(t), 1))
        .max()
        .unwrap_or(8)
        + 10;
    let spacing = (px(xa.lo + xa.step) - px(xa.lo)).max(1);
    let every = ((widest + spacing - 1) / spacing).max(1) as usize;
    for (k, &t) in xa.ticks.iter().enumerate() {
        let x = px(t);
        area.draw(&PathElement::new(vec![(x, y0), (x, y0 + 5)], BLACK))
            .map_err(e)?;
        if k % every == 0 {
            text(area, &xa.label(t), (x, y0 + 14), HPos::Center, 12, bitmap)?;
        }
    }
    text(
        area,
        "step",
        ((x0 + x1) / 2, y0 + 32),
        HPos::Center,
        12,
        bitmap,
    )?;
    for (si, s) in panel.series.iter().enumerate() {
        let color = PALETTE[si % PALETTE.len()];
        let pts: Vec<(i32, i32)> = s.points.iter().map(|&(x, y)| (px(x), py(y))).collect();
        if pts.len() > 1 {
            area.draw(&PathElement::new(pts.clone(), color.stroke_width(2)))
                .map_err(e)?;
        }
        if pts.len() <= MARKERS_UP_TO || s.name.starts_with("eval_") {
            for &p in &pts {
                area.draw(&Circle::new(p, 3, color.filled())).map_err(e)?;
            }
        }
    }
    area.draw(&PathElement::new(vec![(x0, y1), (x0, y0), (x1, y0)], BLACK))
        .map_err(e)?;
    Ok(())
}

/// Draw `panels` into `path` (SVG or PNG by extension), atomically.
pub fn write_chart(path: &Path, panels: &[Panel], title: &str) -> Result<()> {
    let format = Format::of(path)?;
    let (w, h, _) = grid(panels.len());
    let size = (w as u32, h as u32);
    match format {
        Format::Svg => {
            let mut svg = String::new();
            {
                let area = SVGBackend::with_string(&mut svg, size).into_drawing_area();
                draw(&area, panels, title, false)
                    .map_err(|m| Error::bad_input(path, format!("drawing the chart: {m}")))?;
            }
            crate::io::atomic::write_file(path, svg.as_bytes())
        }
        Format::Png => {
            let tmp = temp_sibling(path);
            let res = {
                let area = BitMapBackend::new(&tmp, size).into_drawing_area();
                draw(&area, panels, title, true)
            };
            let res = res.map_err(|m| Error::bad_input(path, format!("writing the PNG: {m}")));
            let res =
                res.and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
            if res.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            res
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes() {
        let a = Axis::new(1.0, 40.0, true);
        assert_eq!((a.lo, a.hi, a.step), (0.0, 40.0, 10.0));
        let a = Axis::new(1.1, 1.9, false);
        assert_eq!(a.ticks.first(), Some(&1.0));
        assert_eq!(a.label(1.2), "1.2");
        let lr = Axis::new(0.0, 1e-3, false);
        assert_eq!(lr.label(2e-4), "2.0e-4");
        assert_eq!(lr.label(0.0), "0");
        let lr = Axis::new(0.0, 1.0000000474974513e-3, false);
        assert_eq!((lr.step, lr.hi), (2e-4, 1e-3));
        let flat = Axis::new(3.0, 3.0, false);
        assert!(flat.lo < 3.0 && flat.hi > 3.0);
        assert_eq!(grid(4), (2 * PANEL_W, TITLE_H + 2 * PANEL_H, 2));
        assert_eq!(grid(1), (PANEL_W, TITLE_H + PANEL_H, 1));
    }
}

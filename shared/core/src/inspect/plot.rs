//! `--plot FILE.svg|FILE.png`: a bar chart of ‖ΔW‖_F per module, grouped by layer, drawn with
//! plotters (SVG backend; bitmap backend with its pure-Rust PNG encoder, text from our own
//! bitmap font). The file is written to a temporary sibling and renamed into place.

use super::font;
use super::report::ModuleReport;
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Svg,
    Png,
}

impl Format {
    /// The format named by `path`'s extension.
    pub fn of(path: &Path) -> Result<Self> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("svg") => Ok(Format::Svg),
            Some("png") => Ok(Format::Png),
            _ => Err(Error::usage(format!(
                "--plot {}: the file name must end in .svg or .png",
                path.display()
            ))),
        }
    }
}

/// One bar: a module's norm.
#[derive(Clone, Debug)]
pub struct Bar {
    pub layer: Option<usize>,
    /// The module's name inside its block ("self_attn.q_proj").
    pub series: String,
    pub value: f64,
}

/// The module name within its block: the path after the layer index.
pub fn series_name(path: &str) -> String {
    let segs: Vec<&str> = path.split('.').collect();
    match segs.iter().position(|s| s.parse::<usize>().is_ok()) {
        Some(i) if i + 1 < segs.len() => segs[i + 1..].join("."),
        _ => path.to_string(),
    }
}

/// Bars for every module with a ‖ΔW‖.
pub fn bars(modules: &[ModuleReport]) -> Vec<Bar> {
    modules
        .iter()
        .filter_map(|m| {
            m.delta_norm.map(|v| Bar {
                layer: m.layer,
                series: series_name(&m.path),
                value: v,
            })
        })
        .collect()
}

/// Layout of the chart, independent of the backend.
struct Layout {
    width: i32,
    height: i32,
    left: i32,
    top: i32,
    plot_w: i32,
    plot_h: i32,
    bar_w: i32,
    groups: Vec<Option<usize>>,
    series: Vec<String>,
    y_max: f64,
    ticks: Vec<f64>,
    tick_step: f64,
}

pub(crate) const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// A step of 1, 2 or 5 × 10ᵏ giving about 5 ticks up to `max`.
pub(crate) fn nice_step(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

pub(crate) fn tick_label(v: f64, step: f64) -> String {
    let digits = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil().max(0.0) as usize
    };
    format!("{v:.digits$}")
}

fn layout(bars: &[Bar], title: &str) -> Layout {
    let mut groups: Vec<Option<usize>> = Vec::new();
    let mut series: Vec<String> = Vec::new();
    for b in bars {
        if !groups.contains(&b.layer) {
            groups.push(b.layer);
        }
        if !series.contains(&b.series) {
            series.push(b.series.clone());
        }
    }
    // layers in order, modules without a layer last
    groups.sort_by_key(|g| (g.is_none(), *g));
    let slots = (groups.len() * (series.len() + 1)).max(1) as i32;
    let bar_w = (1400 / slots).clamp(2, 18);
    let plot_w = (slots * bar_w).max(200);
    let legend_w = 24 + series.iter().map(|s| s.len() as i32).max().unwrap_or(4) * 8;
    let (left, top, bottom) = (80, 50, 60);
    let plot_h = 360;
    let max = bars.iter().map(|b| b.value).fold(0f64, f64::max);
    let tick_step = nice_step(max);
    let y_max = ((max / tick_step).ceil() * tick_step).max(tick_step);
    let n_ticks = (y_max / tick_step).round() as usize;
    let title_w = font::text_width(title, 2);
    Layout {
        width: (left + plot_w + 30 + legend_w).max(left + title_w + 20),
        height: top + plot_h + bottom,
        left,
        top,
        plot_w,
        plot_h,
        bar_w,
        groups,
        series,
        y_max,
        ticks: (0..=n_ticks).map(|i| i as f64 * tick_step).collect(),
        tick_step,
    }
}

pub(crate) type DrawResult = std::result::Result<(), String>;

pub(crate) fn text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    s: &str,
    (x, y): (i32, i32),
    h: HPos,
    size: u32,
    bitmap: bool,
) -> DrawResult {
    if bitmap {
        let scale = if size >= 16 { 2 } else { 1 };
        let w = font::text_width(s, scale);
        let x0 = match h {
            HPos::Left => x,
            HPos::Center => x - w / 2,
            HPos::Right => x - w,
        };
        let y0 = y - font::HEIGHT * scale / 2;
        for (dx, dy) in font::pixels(s, scale) {
            area.draw_pixel((x0 + dx, y0 + dy), &BLACK)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    } else {
        // plotters draws SVG text at size / 1.24; undo that so both formats match
        let px = f64::from(size) * 1.24;
        let style = TextStyle::from(("sans-serif", px).into_font()).pos(Pos::new(h, VPos::Center));
        area.draw(&Text::new(s.to_string(), (x, y), style))
            .map_err(|e| e.to_string())
    }
}

fn draw<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    l: &Layout,
    bars: &[Bar],
    title: &str,
    bitmap: bool,
) -> DrawResult {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    area.fill(&WHITE).map_err(e)?;
    let (x0, y0) = (l.left, l.top + l.plot_h);
    let y_of = |v: f64| y0 - ((v / l.y_max) * l.plot_h as f64).round() as i32;
    text(area, title, (l.left, l.top / 2), HPos::Left, 16, bitmap)?;
    // grid and y ticks
    let grid = RGBColor(225, 225, 225);
    for &t in &l.ticks {
        let y = y_of(t);
        area.draw(&PathElement::new(vec![(x0, y), (x0 + l.plot_w, y)], grid))
            .map_err(e)?;
        area.draw(&PathElement::new(vec![(x0 - 5, y), (x0, y)], BLACK))
            .map_err(e)?;
        text(
            area,
            &tick_label(t, l.tick_step),
            (x0 - 8, y),
            HPos::Right,
            12,
            bitmap,
        )?;
    }
    // bars
    let slot = (l.series.len() + 1) as i32 * l.bar_w;
    let label_every = {
        let widest = l
            .groups
            .iter()
            .map(|g| g.map_or(5, |i| i.to_string().len()))
            .max()
            .unwrap_or(1) as i32
            * 8
            + 6;
        ((widest + slot - 1) / slot).max(1) as usize
    };
    for (gi, g) in l.groups.iter().enumerate() {
        let gx = x0 + gi as i32 * slot + l.bar_w / 2;
        for b in bars.iter().filter(|b| b.layer == *g) {
            let si = l.series.iter().position(|s| *s == b.series).unwrap_or(0);
            let x = gx + si as i32 * l.bar_w;
            let color = PALETTE[si % PALETTE.len()];
            area.draw(&Rectangle::new(
                [(x, y_of(b.value)), (x + l.bar_w - 1, y0)],
                color.filled(),
            ))
            .map_err(e)?;
        }
        if gi % label_every == 0 {
            let label = g.map_or("other".to_string(), |i| i.to_string());
            let cx = gx + (l.series.len() as i32 * l.bar_w) / 2;
            text(area, &label, (cx, y0 + 14), HPos::Center, 12, bitmap)?;
        }
    }
    // axes
    area.draw(&PathElement::new(
        vec![(x0, l.top), (x0, y0), (x0 + l.plot_w, y0)],
        BLACK,
    ))
    .map_err(e)?;
    text(
        area,
        "layer",
        (x0 + l.plot_w / 2, y0 + 38),
        HPos::Center,
        12,
        bitmap,
    )?;
    // legend
    let lx = x0 + l.plot_w + 20;
    for (si, s) in l.series.iter().enumerate() {
        let y = l.top + 10 + si as i32 * 18;
        let color = PALETTE[si % PALETTE.len()];
        area.draw(&Rectangle::new(
            [(lx, y - 5), (lx + 10, y + 5)],
            color.filled(),
        ))
        .map_err(e)?;
        text(area, s, (lx + 16, y), HPos::Left, 12, bitmap)?;
    }
    area.present().map_err(e)
}

pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plot".into());
    path.with_file_name(format!(".peftkit-tmp-{}-{}", std::process::id(), name))
}

/// Draw `bars` into `path` (SVG or PNG by extension), atomically.
pub fn write_plot(path: &Path, bars: &[Bar], title: &str) -> Result<()> {
    let format = Format::of(path)?;
    if bars.is_empty() {
        return Err(Error::usage(format!(
            "--plot {}: no module has a ||dW||_F to plot (prompt-learning or bottleneck adapter?)",
            path.display()
        )));
    }
    if let Some(b) = bars.iter().find(|b| !b.value.is_finite()) {
        return Err(Error::usage(format!(
            "--plot {}: ||dW||_F of {} is not finite",
            path.display(),
            b.series
        )));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "its directory does not exist"),
        ));
    }
    let l = layout(bars, title);
    let size = (l.width as u32, l.height as u32);
    match format {
        Format::Svg => {
            let mut svg = String::new();
            {
                let area = SVGBackend::with_string(&mut svg, size).into_drawing_area();
                draw(&area, &l, bars, title, false)
                    .map_err(|m| Error::bad_input(path, format!("drawing the chart: {m}")))?;
            }
            crate::io::atomic::write_file(path, svg.as_bytes())
        }
        Format::Png => {
            let tmp = temp_sibling(path);
            let res = {
                let area = BitMapBackend::new(&tmp, size).into_drawing_area();
                draw(&area, &l, bars, title, true)
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
    fn names_and_ticks() {
        assert_eq!(
            series_name("model.layers.10.self_attn.q_proj"),
            "self_attn.q_proj"
        );
        assert_eq!(series_name("transformer.h.0.attn.c_attn"), "attn.c_attn");
        assert_eq!(series_name("lm_head"), "lm_head");
        assert_eq!(nice_step(1.0), 0.2);
        assert_eq!(nice_step(0.031), 0.01);
        assert_eq!(tick_label(0.2, 0.2), "0.2");
        assert_eq!(tick_label(40.0, 10.0), "40");
    }
}

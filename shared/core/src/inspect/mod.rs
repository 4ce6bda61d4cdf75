//! What is inside an adapter, model or checkpoint (the body of `adapter-inspect`).
//!
//! [`source`] tells what the path is; [`adapter`] analyses adapter tensors per module
//! ([`tensors`] groups them, [`spectrum`] gives ‖ΔW‖_F and ranks from the small factors);
//! [`model`] sizes model folders and their 4-bit weights; [`checkpoint`] reads training
//! checkpoints; [`check`] compares an adapter with a base model (`--base`), [`diff`] two
//! adapters (`--diff`); [`plot`] draws the per-layer chart; [`text`] renders the report that
//! [`report`] defines (and `--json` serializes). docs/adapter-inspect.md documents the output.

pub mod adapter;
pub mod base;
pub mod check;
pub mod checkpoint;
pub mod config;
pub mod diff;
pub mod font;
pub mod model;
pub mod plot;
pub mod report;
pub mod source;
pub mod spectrum;
pub mod tensors;
pub mod text;

use crate::io::model_folder::ModelFolder;
use crate::io::safetensors_file::SafetensorsFile;
use crate::merge::adapter_dir::AdapterDir;
use crate::{Error, Result};
use adapter::{analyze, guess_method, Analysis};
use config::Context;
use report::Report;
use source::Source;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What `adapter-inspect` was asked to do.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub path: PathBuf,
    pub base: Option<PathBuf>,
    pub diff: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    pub json: bool,
    pub strict: bool,
}

/// An inspected input: its report and, for adapter-like inputs, the analysed tensors.
pub struct Inspected {
    pub report: Report,
    pub analysis: Option<Analysis>,
    pub context: Context,
}

fn empty_report(path: &Path, kind: &str) -> Report {
    Report {
        path: path.display().to_string(),
        kind: kind.into(),
        method: None,
        files: Default::default(),
        config: None,
        trainable_params: None,
        modules: Vec::new(),
        other_tensors: Vec::new(),
        prompt: None,
        model: None,
        quantization: None,
        checkpoint: None,
        check: None,
        diff: None,
        plot: None,
    }
}

fn with_analysis(mut r: Report, a: &Analysis, ctx: &Context) -> Report {
    r.method = ctx.method().or_else(|| guess_method(a));
    r.config = ctx.summary();
    r.files = a.files.clone();
    r.trainable_params = Some(a.trainable_params);
    r.modules = a.modules.clone();
    r.other_tensors = a.other_tensors.clone();
    r.prompt = a.prompt.clone();
    r
}

/// Inspect `path` (IA3 norms against `base` when given).
pub fn load(path: &Path, base: Option<&ModelFolder>) -> Result<Inspected> {
    let src = source::detect(path)?;
    let kind = src.kind();
    match src {
        Source::Adapter(dir) => {
            let adapter = AdapterDir::open(&dir)?;
            let ctx = Context::of(&adapter)?;
            let a = analyze(adapter.file, &ctx, base)?;
            let report = with_analysis(empty_report(path, kind), &a, &ctx);
            Ok(Inspected {
                report,
                analysis: Some(a),
                context: ctx,
            })
        }
        Source::Checkpoint(dir) => {
            let params = SafetensorsFile::open(&dir.join(checkpoint::PARAMS))?;
            let (cfg_file, ctx) = match checkpoint::run_config(&dir)? {
                Some((p, c)) => (Some(p), c),
                None => (None, Context::default()),
            };
            let ck = checkpoint::checkpoint_report(&dir, &params, cfg_file.as_deref())?;
            let a = analyze(params, &ctx, base)?;
            let mut report = with_analysis(empty_report(path, kind), &a, &ctx);
            report.checkpoint = Some(ck);
            Ok(Inspected {
                report,
                analysis: Some(a),
                context: ctx,
            })
        }
        Source::Model(dir) => {
            let folder = ModelFolder::open(&dir)?;
            let (sizes, summary) = model::inspect_model(&folder)?;
            let mut report = empty_report(path, kind);
            report.files = sizes.files;
            report.model = Some(summary);
            report.quantization = sizes.quant;
            Ok(Inspected {
                report,
                analysis: None,
                context: Context::default(),
            })
        }
        Source::File(file) => {
            let f = SafetensorsFile::open(&file)?;
            let sizes = model::sizes(&f, &f.names())?;
            let ctx = Context::default();
            let a = analyze(f, &ctx, base)?;
            let adapter_like = !a.modules.is_empty() || a.prompt.is_some();
            let mut report = with_analysis(empty_report(path, kind), &a, &ctx);
            if !adapter_like {
                report.trainable_params = None;
            }
            report.quantization = sizes.quant;
            Ok(Inspected {
                report,
                analysis: Some(a),
                context: ctx,
            })
        }
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn plot_title(r: &Report) -> String {
    let of = r
        .modules
        .iter()
        .find_map(|m| m.delta_norm_of.clone())
        .unwrap_or_else(|| "dW".into());
    let name = Path::new(&r.path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| r.path.clone());
    format!("||{of}||_F per module, by layer: {name}")
}

/// Build the full report for `opts`.
pub fn inspect(opts: &Options) -> Result<Report> {
    if opts.strict && opts.base.is_none() {
        return Err(Error::usage(
            "--strict needs --base DIR (it fails on problems found against the base model)",
        ));
    }
    if let Some(p) = &opts.plot {
        plot::Format::of(p)?;
        let inputs = [Some(&opts.path), opts.base.as_ref(), opts.diff.as_ref()];
        if inputs.iter().flatten().any(|i| same_file(p, i)) {
            return Err(Error::usage(format!(
                "--plot {} would overwrite an input",
                p.display()
            )));
        }
    }
    let base = match &opts.base {
        Some(b) => Some(ModelFolder::open(b)?),
        None => None,
    };
    let me = load(&opts.path, base.as_ref())?;
    let mut report = me.report;
    if let Some(b) = &base {
        let Some(a) = &me.analysis else {
            return Err(Error::usage(format!(
                "--base checks an adapter, but {} is a model folder",
                opts.path.display()
            )));
        };
        report.check = Some(check::check(a, &me.context, b)?);
    }
    if let Some(other_path) = &opts.diff {
        let other = load(other_path, base.as_ref())?;
        let (Some(a), Some(b)) = (&me.analysis, &other.analysis) else {
            return Err(Error::usage("--diff compares two adapters (adapter directories, checkpoints or adapter files), not model folders"));
        };
        if a.lora.is_empty() && a.ia3.is_empty() || b.lora.is_empty() && b.ia3.is_empty() {
            return Err(Error::usage(
                "--diff compares LoRA/DoRA or IA3 adapters; one of the two has no such modules",
            ));
        }
        report.diff = Some(diff::diff(a, b, &other_path.display().to_string()));
    }
    if let Some(p) = &opts.plot {
        plot::write_plot(p, &plot::bars(&report.modules), &plot_title(&report))?;
        report.plot = Some(p.display().to_string());
    }
    Ok(report)
}

/// `adapter-inspect`: inspect, print (JSON or tables) and, with `--strict`, fail when the
/// check found errors.
pub fn run(opts: &Options) -> Result<()> {
    let report = inspect(opts)?;
    let text = if opts.json {
        let mut s = serde_json::to_string(&report)
            .map_err(|e| Error::usage(format!("internal: JSON output: {e}")))?;
        s.push('\n');
        s
    } else {
        text::render(&report)
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Error::io("<stdout>", e))?;
    if opts.strict {
        if let Some(c) = report.check.as_ref().filter(|c| c.errors > 0) {
            // Name the first error so that the one line says what is wrong.
            let first = c
                .problems
                .iter()
                .find(|x| x.severity == "error")
                .map(|x| format!("; first: {} ({})", x.code, x.message))
                .unwrap_or_default();
            return Err(Error::bad_input(
                &opts.path,
                format!(
                    "{} problem(s) found against the base model {} (--strict){first}",
                    c.errors, c.base
                ),
            ));
        }
    }
    Ok(())
}

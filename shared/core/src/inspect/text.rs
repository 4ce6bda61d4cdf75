//! The human-readable rendering of a [`Report`]: key/value blocks and aligned tables.

use super::report::{ModuleReport, Report};
use serde_json::Value;
use std::fmt::Write;

/// A number with about four significant digits ("0.1234", "12.35", "3.201e-05").
pub fn num(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if !x.is_finite() {
        format!("{x}")
    } else if (1e-3..1e5).contains(&x.abs()) {
        let digits = (3 - x.abs().log10().floor() as i32).clamp(0, 6) as usize;
        format!("{x:.digits$}")
    } else {
        format!("{x:.3e}")
    }
}

fn opt(x: Option<f64>) -> String {
    x.map(num).unwrap_or_else(|| "-".into())
}

/// Integer with thin grouping ("1 234 567").
pub fn int(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn bytes(n: u64) -> String {
    let n = n as f64;
    if n < 1e3 {
        format!("{n} B")
    } else if n < 1e6 {
        format!("{:.1} kB", n / 1e3)
    } else if n < 1e9 {
        format!("{:.1} MB", n / 1e6)
    } else {
        format!("{:.2} GB", n / 1e9)
    }
}

fn shape(s: &[usize]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

fn json_short(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(String::from)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join(", "),
        Value::Object(o) if o.is_empty() => "-".into(),
        other => other.to_string(),
    }
}

/// An aligned table: the first row is the header; columns listed in `right` are
/// right-aligned.
pub fn table(rows: &[Vec<String>], right: &[usize]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, w) in widths.iter().enumerate() {
            let cell = r.get(c).map(String::as_str).unwrap_or("");
            let pad = w - cell.chars().count();
            if c > 0 {
                line.push_str("  ");
            }
            if right.contains(&c) {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn kv(out: &mut String, pairs: &[(&str, String)]) {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in pairs {
        let _ = writeln!(out, "  {k:<w$}  {v}");
    }
}

fn module_rows(modules: &[ModuleReport]) -> Vec<Vec<String>> {
    let mut rows = vec![[
        "module",
        "layer",
        "method",
        "shapes",
        "dtype",
        "scale",
        "||dW||_F",
        "of",
        "num.rank",
        "eff.rank",
        "top singular values",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for m in modules {
        let shapes: Vec<String> = m.tensors.iter().map(|t| shape(&t.shape)).collect();
        let top: Vec<String> = m.singular_values.iter().take(4).map(|&s| num(s)).collect();
        let more = if m.singular_values.len() > 4 {
            " ..."
        } else {
            ""
        };
        rows.push(vec![
            if m.prefixed || m.method == "bottleneck" {
                m.path.clone()
            } else {
                format!("{} (no prefix)", m.path)
            },
            m.layer.map_or("-".into(), |l| l.to_string()),
            m.method.clone(),
            shapes.join(" "),
            m.dtype.clone(),
            opt(m.scale),
            if m.non_finite > 0 {
                format!("{} non-finite", m.non_finite)
            } else {
                opt(m.delta_norm)
            },
            m.delta_norm_of.clone().unwrap_or_else(|| "-".into()),
            m.numerical_rank.map_or("-".into(), |r| r.to_string()),
            opt(m.effective_rank),
            format!("{}{more}", top.join(" ")),
        ]);
    }
    rows
}

/// Render the whole report.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let what = match &r.method {
        Some(m) => format!("{} ({m})", r.kind),
        None => r.kind.clone(),
    };
    let _ = writeln!(out, "{}: {what}", r.path);
    let f = &r.files;
    let dtypes: Vec<String> = f.dtypes.iter().map(|(d, n)| format!("{d} {n}")).collect();
    let mut head = vec![(
        "tensors",
        format!(
            "{} ({}), {} values, {}",
            int(f.tensors),
            dtypes.join(", "),
            int(f.elements),
            bytes(f.bytes)
        ),
    )];
    if let Some(n) = r.trainable_params {
        head.push(("trainable parameters", int(n)));
    }
    kv(&mut out, &head);
    if let Some(c) = &r.config {
        let _ = writeln!(out, "\nconfig ({})", c.file);
        let mut pairs = vec![
            ("peft_type", c.peft_type.clone()),
            (
                "task_type",
                c.task_type.clone().unwrap_or_else(|| "-".into()),
            ),
            (
                "base_model_name_or_path",
                c.base_model_name_or_path
                    .clone()
                    .unwrap_or_else(|| "-".into()),
            ),
        ];
        if c.r.is_some() || c.lora_alpha.is_some() {
            pairs.push(("r", c.r.map_or("-".into(), |r| r.to_string())));
            pairs.push((
                "lora_alpha",
                c.lora_alpha.map_or("-".into(), |a| a.to_string()),
            ));
            pairs.push(("use_rslora", c.use_rslora.to_string()));
            pairs.push(("use_dora", c.use_dora.to_string()));
            pairs.push(("rank_pattern", json_short(&c.rank_pattern)));
            pairs.push(("alpha_pattern", json_short(&c.alpha_pattern)));
        }
        pairs.push(("target_modules", json_short(&c.target_modules)));
        if !c.feedforward_modules.is_null() {
            pairs.push(("feedforward_modules", json_short(&c.feedforward_modules)));
        }
        pairs.push(("modules_to_save", {
            let s = c.modules_to_save.join(", ");
            if s.is_empty() {
                "-".into()
            } else {
                s
            }
        }));
        if let Some(n) = c.num_virtual_tokens {
            pairs.push(("num_virtual_tokens", n.to_string()));
        }
        if let Some(v) = &c.variant {
            pairs.push(("variant", v.clone()));
        }
        if let Some(n) = c.adapter_size {
            pairs.push(("adapter_size", n.to_string()));
        }
        kv(&mut out, &pairs);
    }
    if let Some(m) = &r.model {
        let _ = writeln!(out, "\nmodel");
        kv(
            &mut out,
            &[
                ("model_type", m.model_type.clone()),
                ("architectures", json_short(&m.architectures)),
                (
                    "hidden_size",
                    m.hidden_size.map_or("-".into(), |x| x.to_string()),
                ),
                (
                    "layers",
                    m.num_hidden_layers.map_or("-".into(), |x| x.to_string()),
                ),
                (
                    "vocab_size",
                    m.vocab_size.map_or("-".into(), |x| x.to_string()),
                ),
                ("dtype", m.dtype.clone().unwrap_or_else(|| "-".into())),
                ("parameters", int(m.parameters)),
                ("stored", bytes(m.stored_bytes)),
                ("bits per parameter", num(m.bits_per_param)),
            ],
        );
    }
    if let Some(q) = &r.quantization {
        let _ = writeln!(out, "\n4-bit quantization");
        kv(
            &mut out,
            &[
                ("quant_method", q.quant_method.clone()),
                ("quant_type", q.quant_type.clone()),
                (
                    "blocksize",
                    q.blocksize.map_or("mixed".into(), |b| b.to_string()),
                ),
                (
                    "double quant",
                    q.double_quant.map_or("mixed".into(), |b| b.to_string()),
                ),
                (
                    "compute dtype",
                    q.compute_dtype.clone().unwrap_or_else(|| "-".into()),
                ),
                (
                    "quant storage",
                    q.quant_storage.clone().unwrap_or_else(|| "-".into()),
                ),
                (
                    "original dtype",
                    q.original_dtype.clone().unwrap_or_else(|| "-".into()),
                ),
                ("4-bit weights", int(q.weights_4bit)),
                ("4-bit parameters", int(q.params_4bit)),
                ("4-bit bytes", bytes(q.bytes_4bit)),
                ("bits per 4-bit parameter", num(q.bits_per_param_4bit)),
                ("unquantized linears", {
                    let s = q.unquantized_linears.join(", ");
                    if s.is_empty() {
                        "-".into()
                    } else {
                        s
                    }
                }),
            ],
        );
    }
    if let Some(c) = &r.checkpoint {
        let _ = writeln!(out, "\ncheckpoint ({})", c.dir);
        let o = &c.optimizer;
        kv(
            &mut out,
            &[
                ("step", c.step.to_string()),
                ("epoch", c.epoch.to_string()),
                ("batch in epoch", c.batch_in_epoch.to_string()),
                ("tokens", int(c.tokens)),
                ("trainable tensors", int(c.trainable_tensors)),
                (
                    "config",
                    c.config_file
                        .clone()
                        .unwrap_or_else(|| "- (scales unknown)".into()),
                ),
                (
                    "optimizer state",
                    if o.present {
                        format!(
                            "{} tensors ({}), {} values{}",
                            int(o.tensors),
                            o.states.join(", "),
                            int(o.params),
                            if o.complete {
                                String::new()
                            } else {
                                format!(", {} tensors lack moments", o.missing.len())
                            }
                        )
                    } else {
                        "none".into()
                    },
                ),
            ],
        );
    }
    if !r.modules.is_empty() {
        let _ = writeln!(
            out,
            "\nmodules ({}; num.rank = #σ > σ1·1e-3, eff.rank = exp(entropy of σ/Σσ))",
            r.modules.len()
        );
        out.push_str(&table(&module_rows(&r.modules), &[1, 5, 6, 8, 9]));
    }
    if !r.other_tensors.is_empty() {
        let _ = writeln!(out, "\nother tensors ({})", r.other_tensors.len());
        let mut rows = vec![vec![
            "tensor".into(),
            "shape".into(),
            "dtype".into(),
            "params".into(),
            "norm".into(),
        ]];
        for t in &r.other_tensors {
            rows.push(vec![
                t.name.clone(),
                shape(&t.shape),
                t.dtype.clone(),
                int(t.params),
                opt(t.norm),
            ]);
        }
        out.push_str(&table(&rows, &[3, 4]));
    }
    if let Some(p) = &r.prompt {
        let _ = writeln!(out, "\nprompt embeddings");
        let tn: Vec<String> = p.token_norms.iter().map(|&x| num(x)).collect();
        kv(
            &mut out,
            &[
                ("virtual tokens", p.num_virtual_tokens.to_string()),
                ("shape", shape(&p.shape)),
                ("norm", num(p.norm)),
                ("token norms", tn.join(" ")),
            ],
        );
        if !p.layers.is_empty() {
            let mut rows = vec![vec!["layer".into(), "||keys||".into(), "||values||".into()]];
            for l in &p.layers {
                rows.push(vec![
                    l.layer.to_string(),
                    num(l.key_norm),
                    num(l.value_norm),
                ]);
            }
            out.push_str(&table(&rows, &[0, 1, 2]));
        }
    }
    if let Some(c) = &r.check {
        let _ = writeln!(
            out,
            "\ncheck against {}: {} error(s), {} warning(s){}",
            c.base,
            c.errors,
            c.warnings,
            if c.problems.is_empty() {
                " - clean"
            } else {
                ""
            }
        );
        if !c.problems.is_empty() {
            let mut rows = vec![vec!["code".into(), "severity".into(), "message".into()]];
            for p in &c.problems {
                rows.push(vec![p.code.clone(), p.severity.clone(), p.message.clone()]);
            }
            out.push_str(&table(&rows, &[]));
        }
    }
    if let Some(d) = &r.diff {
        let _ = writeln!(
            out,
            "\ndiff against {}: {} modules compared, mean cosine {}, mean sign-conflict rate {}",
            d.other,
            d.compared,
            opt(d.mean_cosine),
            opt(d.mean_sign_conflict_rate)
        );
        let mut rows = vec![vec![
            "module".into(),
            "cosine".into(),
            "sign conflicts".into(),
            "||dW||".into(),
            "other ||dW||".into(),
            "note".into(),
        ]];
        for m in &d.modules {
            rows.push(vec![
                m.path.clone(),
                opt(m.cosine),
                opt(m.sign_conflict_rate),
                num(m.norm),
                num(m.other_norm),
                m.note.clone().unwrap_or_default(),
            ]);
        }
        out.push_str(&table(&rows, &[1, 2, 3, 4]));
        for (what, list) in [
            ("only here", &d.only_here),
            ("only in other", &d.only_other),
        ] {
            if !list.is_empty() {
                let _ = writeln!(out, "  {what}: {}", list.join(", "));
            }
        }
    }
    if let Some(p) = &r.plot {
        let _ = writeln!(out, "\nplot written to {p}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting() {
        assert_eq!(num(0.123456), "0.1235");
        assert_eq!(num(12.3456), "12.35");
        assert_eq!(num(3.2e-5), "3.200e-5");
        assert_eq!(int(1234567), "1 234 567");
        let t = table(
            &[
                vec!["a".into(), "n".into()],
                vec!["long".into(), "7".into()],
            ],
            &[1],
        );
        assert_eq!(t, "a     n\nlong  7\n");
    }
}

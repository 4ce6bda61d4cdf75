//! End-to-end tests of `adapter-inspect` on the committed fixtures: the numbers (‖ΔW‖_F,
//! singular values, ranks, scales, parameter counts, bits per parameter of the NF4 fixture)
//! against direct dense computations from the files, every documented `--json` key present,
//! each `--base` problem kind detected on adapters broken in a temporary directory, `--diff`
//! of an adapter with itself and with its negation, checkpoints of a short peft-train run,
//! `--plot` in SVG and PNG, and clean one-line errors (never a panic) on broken inputs.
//!
//! The tools must be built first: `cargo build --release --bins` (make test does).

use peftkit_core::io::safetensors_file::{write_f32_tensors, OutDtype};
use peftkit_tests::{assert_clean_error, copy_dir, fixtures, read_json, read_tensors, run};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;

// ---------------------------------------------------------------------------------------------
// helpers

const TOOL: &str = "adapter-inspect";
const Q0: &str = "model.layers.0.self_attn.q_proj";

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn fx(rel: &str) -> PathBuf {
    fixtures().join(rel)
}

fn lora_qv() -> PathBuf {
    fx("train/llama_gqa/lora_qv/adapter_init")
}

fn llama() -> PathBuf {
    fx("models/llama_gqa")
}

fn inspect(args: &[&str]) -> Output {
    run(TOOL, args)
}

/// Run with `--json`, assert success, parse stdout.
fn inspect_json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = inspect(&a);
    assert!(
        out.status.success(),
        "adapter-inspect {a:?} failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "--json prints one line: {text}");
    serde_json::from_str(&text).unwrap()
}

fn module<'a>(v: &'a Value, path: &str) -> &'a Value {
    v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["path"] == path)
        .unwrap_or_else(|| panic!("no module {path} in {v}"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-12)
}

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn tensor<'a>(t: &'a Tensors, name: &str) -> &'a (String, Vec<usize>, Vec<f32>) {
    t.iter()
        .find(|x| x.0 == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

/// Write an adapter directory (f32 tensors, metadata format=pt).
fn write_adapter(dir: &Path, tensors: &Tensors, config: &Value) {
    std::fs::create_dir_all(dir).unwrap();
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    write_f32_tensors(
        &dir.join("adapter_model.safetensors"),
        tensors,
        OutDtype::F32,
        &meta,
    )
    .unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
}

/// A copy of an adapter directory with its tensors and config transformed.
fn variant(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Tensors),
    edit_cfg: impl FnOnce(&mut Value),
) -> PathBuf {
    let mut t = read_tensors(&src.join("adapter_model.safetensors"));
    edit(&mut t);
    let mut cfg = read_json(&src.join("adapter_config.json"));
    edit_cfg(&mut cfg);
    write_adapter(dst, &t, &cfg);
    dst.to_path_buf()
}

/// Dense ΔW = s·B·A `[out, in]` in f64.
fn dense_delta(a: &[f32], b: &[f32], out: usize, r: usize, inp: usize, scale: f64) -> Vec<f64> {
    let mut d = vec![0f64; out * inp];
    for o in 0..out {
        for i in 0..inp {
            let v: f64 = (0..r)
                .map(|k| b[o * r + k] as f64 * a[k * inp + i] as f64)
                .sum();
            d[o * inp + i] = scale * v;
        }
    }
    d
}

/// Eigenvalues of a symmetric `n×n` matrix (cyclic Jacobi), descending.
fn sym_eigenvalues(mut a: Vec<f64>, n: usize) -> Vec<f64> {
    for _ in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .filter(|(i, j)| i != j)
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum();
        if off < 1e-24 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let sn = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - sn * akq;
                    a[k * n + q] = sn * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - sn * aqk;
                    a[q * n + k] = sn * apk + c * aqk;
                }
            }
        }
    }
    let mut e: Vec<f64> = (0..n).map(|i| a[i * n + i]).collect();
    e.sort_by(|x, y| y.total_cmp(x));
    e
}

/// Singular values of a dense `[rows, cols]` matrix (√ eigenvalues of M·Mᵀ), descending.
fn dense_singular_values(m: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut g = vec![0f64; rows * rows];
    for i in 0..rows {
        for j in 0..rows {
            g[i * rows + j] = (0..cols).map(|k| m[i * cols + k] * m[j * cols + k]).sum();
        }
    }
    sym_eigenvalues(g, rows)
        .into_iter()
        .map(|e| e.max(0.0).sqrt())
        .collect()
}

fn frob(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn problems<'a>(v: &'a Value, code: &str) -> Vec<&'a Value> {
    v["check"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["code"] == code)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. numbers of LoRA modules against dense computations from the fixture

#[test]
fn lora_norms_and_singular_values_match_the_dense_product() {
    let dir = lora_qv();
    let v = inspect_json(&[s(&dir)]);
    assert_eq!(v["kind"], "adapter");
    assert_eq!(v["method"], "LoRA");
    let t = read_tensors(&dir.join("adapter_model.safetensors"));
    let cfg = read_json(&dir.join("adapter_config.json"));
    let scale = f(&cfg["lora_alpha"]) / f(&cfg["r"]);
    for m in v["modules"].as_array().unwrap() {
        let path = m["path"].as_str().unwrap();
        let (_, sa, a) = tensor(&t, &format!("base_model.model.{path}.lora_A.weight"));
        let (_, sb, b) = tensor(&t, &format!("base_model.model.{path}.lora_B.weight"));
        let (r, inp, out) = (sa[0], sa[1], sb[0]);
        let d = dense_delta(a, b, out, r, inp, scale);
        let norm = frob(&d);
        assert!(
            close(f(&m["delta_norm"]), norm, 1e-5),
            "{path}: {m} vs {norm}"
        );
        assert_eq!(m["delta_norm_of"], "s*B*A");
        assert!(close(f(&m["scale"]), scale, 1e-12));
        assert_eq!(m["rank"], r);
        assert_eq!(m["in_features"], inp);
        assert_eq!(m["out_features"], out);
        assert_eq!(m["params"], (r * inp + out * r) as u64);
        assert_eq!(m["dtype"], "F32");
        assert_eq!(m["prefixed"], true);
        let sv = dense_singular_values(&d, out, inp);
        let got: Vec<f64> = m["singular_values"]
            .as_array()
            .unwrap()
            .iter()
            .map(f)
            .collect();
        assert_eq!(got.len(), r, "{path}: one singular value per rank");
        for (g, w) in got.iter().zip(&sv) {
            assert!(close(*g, *w, 1e-4), "{path}: σ {got:?} vs dense {sv:?}");
        }
        assert!(sv[r] < 1e-5 * sv[0], "dense ΔW has rank {r}");
        // rank measures from the dense spectrum
        let top = &sv[..r];
        let numerical = top.iter().filter(|&&x| x > top[0] * 1e-3).count();
        assert_eq!(m["numerical_rank"], numerical);
        let total: f64 = top.iter().sum();
        let h: f64 = top.iter().map(|x| x / total).map(|p| -p * p.ln()).sum();
        assert!(close(f(&m["effective_rank"]), h.exp(), 1e-4));
    }
    // PEFT's trainable parameter count
    let reference = read_json(&fx("train/llama_gqa/lora_qv/reference.json"));
    assert_eq!(v["trainable_params"], reference["trainable_params"]);
    assert_eq!(v["files"]["tensors"], 8);
    assert_eq!(v["files"]["dtypes"]["F32"], 8);
    assert_eq!(v["config"]["r"], 4);
    assert_eq!(v["config"]["peft_type"], "LORA");
    assert_eq!(v["config"]["task_type"], "CAUSAL_LM");
    assert_eq!(
        v["config"]["base_model_name_or_path"],
        "tests/fixtures/models/llama_gqa"
    );
}

/// Scales (rank/alpha patterns, rsLoRA) and trainable counts equal what PEFT recorded.
#[test]
fn scales_and_parameter_counts_match_peft() {
    for (case, method) in [
        ("lora_qv", "LoRA"),
        ("lora_all", "LoRA"),
        ("rslora", "rsLoRA"),
        ("dora", "DoRA"),
        ("lora_bias_mts", "LoRA"),
    ] {
        let root = fx(&format!("train/llama_gqa/{case}"));
        let reference = read_json(&root.join("reference.json"));
        let v = inspect_json(&[s(&root.join("adapter_init"))]);
        assert_eq!(v["method"], method, "{case}");
        assert_eq!(
            v["trainable_params"], reference["trainable_params"],
            "{case}"
        );
        let scalings = reference["scalings"].as_object().unwrap();
        assert_eq!(
            v["modules"].as_array().unwrap().len(),
            scalings.len(),
            "{case}"
        );
        for (path, sc) in scalings {
            let m = module(&v, path);
            assert!(close(f(&m["scale"]), f(sc), 1e-6), "{case} {path}");
        }
        if case == "dora" {
            let m = module(&v, Q0);
            assert_eq!(m["method"], "dora");
            let t = read_tensors(&root.join("adapter_init/adapter_model.safetensors"));
            let (_, _, mag) = tensor(&t, &format!("base_model.model.{Q0}.lora_magnitude_vector"));
            let want = mag.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            assert!(close(f(&m["magnitude_norm"]), want, 1e-6));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. the documented JSON keys

/// `(section, keys)` of docs/adapter-inspect.md's "--json output" tables.
fn documented_keys() -> Vec<(String, Vec<String>)> {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/adapter-inspect.md"),
    )
    .unwrap();
    let json_part = doc
        .split("## `--json` output")
        .nth(1)
        .expect("json section");
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in json_part.lines() {
        if let Some(h) = line.strip_prefix("### ") {
            let name = h.trim().trim_matches('`').to_string();
            out.push((
                if name == "Top level" {
                    String::new()
                } else {
                    name
                },
                vec![],
            ));
        } else if let Some(rest) = line.strip_prefix("| `") {
            let key = rest.split('`').next().unwrap().to_string();
            out.last_mut().expect("table under a heading").1.push(key);
        }
    }
    out
}

/// The object at a documented section path (`modules[].tensors[]`: first elements).
fn at<'a>(v: &'a Value, section: &str) -> Option<&'a Value> {
    let mut cur = v;
    if section.is_empty() {
        return Some(cur);
    }
    for part in section.split('.') {
        let (key, list) = match part.strip_suffix("[]") {
            Some(k) => (k, true),
            None => (part, false),
        };
        cur = cur.get(key)?;
        if list {
            cur = cur.as_array()?.first()?;
        }
        if cur.is_null() {
            return None;
        }
    }
    Some(cur)
}

#[test]
fn every_documented_json_key_is_present_and_documented() {
    let tmp = tempfile::tempdir().unwrap();
    let plot = tmp.path().join("p.svg");
    // an adapter with a base problem (so check.problems has an element), a diff and a plot
    let broken = variant(
        &lora_qv(),
        &tmp.path().join("broken"),
        |t| {
            t.push((
                "base_model.model.model.foo.weight".into(),
                vec![2],
                vec![1.0, 2.0],
            ));
        },
        |_| {},
    );
    let runs = [
        inspect_json(&[
            s(&broken),
            "--base",
            s(&llama()),
            "--diff",
            s(&lora_qv()),
            "--plot",
            s(&plot),
        ]),
        inspect_json(&[s(&fx("qlora/llama_gqa-nf4"))]),
        inspect_json(&[s(&fx("methods/prefix/adapter"))]),
        inspect_json(&[s(&fx("methods/ia3/adapter"))]),
        inspect_json(&[s(&checkpoint_run(tmp.path()).join("checkpoints/step-1"))]),
    ];
    let sections = documented_keys();
    assert!(sections.len() >= 15, "doc sections: {sections:?}");
    for (section, keys) in &sections {
        let objs: Vec<&Value> = runs.iter().filter_map(|r| at(r, section)).collect();
        assert!(!objs.is_empty(), "no run produced section {section:?}");
        for o in &objs {
            let obj = o
                .as_object()
                .unwrap_or_else(|| panic!("{section} is not an object"));
            for k in keys {
                assert!(
                    obj.contains_key(k),
                    "documented key {section}.{k} missing in {o}"
                );
            }
            for k in obj.keys() {
                assert!(keys.contains(k), "key {section}.{k} is not documented");
            }
        }
    }
    // other_tensors[] share the tensors[] shape
    let ot = &runs[0]["other_tensors"][0];
    for k in ["name", "shape", "dtype", "params", "norm"] {
        assert!(ot.get(k).is_some(), "other_tensors[].{k}");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. 4-bit models

/// Bits per parameter recomputed from the safetensors header of the NF4 fixture.
#[test]
fn nf4_bits_per_parameter() {
    let dir = fx("qlora/llama_gqa-nf4");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut size: BTreeMap<String, u64> = BTreeMap::new();
    let mut numel: BTreeMap<String, u64> = BTreeMap::new();
    let mut states: BTreeMap<String, Value> = BTreeMap::new();
    for (k, t) in header.as_object().unwrap() {
        if k == "__metadata__" {
            continue;
        }
        let off = t["data_offsets"].as_array().unwrap();
        let (a, b) = (off[0].as_u64().unwrap(), off[1].as_u64().unwrap());
        size.insert(k.clone(), b - a);
        numel.insert(
            k.clone(),
            t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product(),
        );
        if let Some(w) = k.strip_suffix(".quant_state.bitsandbytes__nf4") {
            let st: Value = serde_json::from_slice(&data[a as usize..b as usize]).unwrap();
            states.insert(w.to_string(), st);
        }
    }
    let mut bytes_4bit = 0u64;
    let mut params_4bit = 0u64;
    let mut parts = BTreeSet::new();
    for (w, st) in &states {
        params_4bit += st["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .product::<u64>();
        for (k, sz) in &size {
            if k == w || k.starts_with(&format!("{w}.")) {
                bytes_4bit += sz;
                parts.insert(k.clone());
            }
        }
    }
    let plain: u64 = numel
        .iter()
        .filter(|(k, _)| !parts.contains(*k))
        .map(|(_, n)| n)
        .sum();
    let total_bytes: u64 = size.values().sum();
    let params = plain + params_4bit;

    let v = inspect_json(&[s(&dir)]);
    assert_eq!(v["kind"], "model");
    let q = &v["quantization"];
    assert_eq!(q["quant_type"], "nf4");
    assert_eq!(q["blocksize"], 64);
    assert_eq!(q["double_quant"], true);
    assert_eq!(q["compute_dtype"], "float32");
    assert_eq!(q["quant_storage"], "uint8");
    assert_eq!(q["weights_4bit"], states.len() as u64);
    assert_eq!(q["weights_4bit"], 14);
    assert_eq!(q["params_4bit"], params_4bit);
    assert_eq!(q["bytes_4bit"], bytes_4bit);
    assert!(close(
        f(&q["bits_per_param_4bit"]),
        bytes_4bit as f64 * 8.0 / params_4bit as f64,
        1e-12
    ));
    // a 4-bit weight needs more than 4 bits (statistics, code tables) and far less than 32
    assert!((4.1..8.0).contains(&f(&q["bits_per_param_4bit"])));
    let m = &v["model"];
    assert_eq!(m["parameters"], params);
    assert_eq!(m["stored_bytes"], total_bytes);
    assert!(close(
        f(&m["bits_per_param"]),
        total_bytes as f64 * 8.0 / params as f64,
        1e-12
    ));
    // the same parameters as the f32 model it was quantized from (PEFT's all_params − trainable)
    let reference = read_json(&fx("train/llama_gqa/lora_qv/reference.json"));
    let base_params =
        reference["all_params"].as_u64().unwrap() - reference["trainable_params"].as_u64().unwrap();
    assert_eq!(m["parameters"], base_params);
    let plain_model = inspect_json(&[s(&llama())]);
    assert_eq!(plain_model["model"]["parameters"], base_params);
    assert!(plain_model["quantization"].is_null());
    assert!(close(
        f(&plain_model["model"]["bits_per_param"]),
        32.0,
        1e-12
    ));

    let fp4 = inspect_json(&[s(&fx("qlora/llama_gqa-fp4"))]);
    assert_eq!(fp4["quantization"]["quant_type"], "fp4");
    // the lone weights file reports the same 4-bit figures (no config: no compute dtype)
    let file = inspect_json(&[s(&dir.join("model.safetensors"))]);
    assert_eq!(
        file["kind"], "model",
        "model.safetensors next to config.json is the folder"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. --base

#[test]
fn base_check_is_clean_for_matching_adapters() {
    for (adapter, base) in [
        (lora_qv(), llama()),
        (fx("train/llama_gqa/lora_all/adapter_init"), llama()),
        (fx("train/llama_gqa/lora_bias_mts/adapter_init"), llama()),
        (fx("interop/gpt2_lora"), fx("models/gpt2")),
        (fx("methods/ia3/adapter"), llama()),
        (fx("methods/prefix/adapter"), llama()),
        (fx("methods/prompt/adapter"), llama()),
        (fx("qlora/lora_qv/adapter_init"), fx("qlora/llama_gqa-nf4")),
    ] {
        let v = inspect_json(&[s(&adapter), "--base", s(&base), "--strict"]);
        let c = &v["check"];
        assert_eq!(c["errors"], 0, "{}: {c}", adapter.display());
        assert_eq!(c["ok"], true);
    }
    // DoRA is clean for PEFT but not for llama.cpp's converter (warnings only)
    let v = inspect_json(&[
        s(&fx("train/llama_gqa/dora/adapter_init")),
        "--base",
        s(&llama()),
        "--strict",
    ]);
    let g = problems(&v, "gguf_incompatible");
    assert_eq!(g.len(), 4, "one per magnitude vector");
    assert!(g.iter().all(|p| p["severity"] == "warning"));
    assert_eq!(v["check"]["errors"], 0);
}

#[test]
fn base_check_detects_each_problem_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let src = lora_qv();
    let mk = |name: &str, e: &dyn Fn(&mut Tensors), c: &dyn Fn(&mut Value)| {
        variant(&src, &tmp.path().join(name), e, c)
    };
    let check = |dir: &Path| inspect_json(&[s(dir), "--base", s(&llama())]);

    // missing_prefix: every key without base_model.model.
    let d = mk(
        "noprefix",
        &|t| {
            for x in t.iter_mut() {
                x.0 = x.0.strip_prefix("base_model.model.").unwrap().to_string();
            }
        },
        &|_| {},
    );
    let v = check(&d);
    let p = problems(&v, "missing_prefix");
    assert_eq!(p.len(), 8, "{v}");
    assert!(p.iter().all(|x| x["severity"] == "error"));
    assert!(p
        .iter()
        .any(|x| x["tensor"] == format!("{Q0}.lora_A.weight")));
    assert_eq!(module(&v, Q0)["prefixed"], false);
    // --strict turns it into exit status 3 after printing the report
    let out = inspect(&[s(&d), "--base", s(&llama()), "--strict", "--json"]);
    assert_eq!(out.status.code(), Some(3));
    assert_clean_error(&out, "--strict");
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["check"]["counts"]["missing_prefix"], 8);

    // shape_mismatch: lora_B of q_proj with 48 rows instead of 64
    let d = mk(
        "shape",
        &|t| {
            let b = t
                .iter_mut()
                .find(|x| x.0.ends_with("layers.0.self_attn.q_proj.lora_B.weight"))
                .unwrap();
            b.1 = vec![48, 4];
            b.2.truncate(48 * 4);
        },
        &|_| {},
    );
    let v = check(&d);
    let p = problems(&v, "shape_mismatch");
    assert_eq!(p.len(), 1, "{v}");
    assert_eq!(p[0]["module"], Q0);
    assert!(p[0]["message"].as_str().unwrap().contains("[64, 4]"));

    // missing_module: a layer the base does not have
    let d = mk(
        "module",
        &|t| {
            for x in t.iter_mut() {
                x.0 = x.0.replace("layers.1.", "layers.7.");
            }
        },
        &|_| {},
    );
    let v = check(&d);
    let p = problems(&v, "missing_module");
    assert_eq!(p.len(), 2, "{v}");
    assert!(p
        .iter()
        .any(|x| x["module"] == "model.layers.7.self_attn.v_proj"));

    // unknown_tensor and gguf_incompatible (a full lm_head, tied to the embeddings here)
    let d = mk(
        "extra",
        &|t| {
            t.push((
                "base_model.model.model.foo.weight".into(),
                vec![3],
                vec![1.0; 3],
            ));
            t.push((
                "base_model.model.lm_head.weight".into(),
                vec![454, 64],
                vec![0.0; 454 * 64],
            ));
        },
        &|_| {},
    );
    let v = check(&d);
    let p = problems(&v, "unknown_tensor");
    assert_eq!(p.len(), 1, "{v}");
    assert_eq!(p[0]["tensor"], "base_model.model.model.foo.weight");
    let g = problems(&v, "gguf_incompatible");
    assert!(
        g.iter()
            .any(|x| x["tensor"] == "base_model.model.lm_head.weight"
                && x["message"].as_str().unwrap().contains("lm_head")),
        "{v}"
    );
    assert!(
        problems(&v, "shape_mismatch").is_empty(),
        "lm_head fits the tied embeddings"
    );
    // a wrong-sized lm_head copy is a shape mismatch
    let d = mk(
        "head",
        &|t| {
            t.push((
                "base_model.model.lm_head.weight".into(),
                vec![10, 64],
                vec![0.0; 640],
            ))
        },
        &|_| {},
    );
    assert_eq!(problems(&check(&d), "shape_mismatch").len(), 1);

    // unmatched_target (another target matches: warning) and untrained_target
    let d = mk("targets", &|_| {}, &|c| {
        c["target_modules"] = json!(["q_proj", "v_proj", "k_proj", "nonexistent_proj"])
    });
    let v = check(&d);
    let p = problems(&v, "unmatched_target");
    assert_eq!(p.len(), 1, "{v}");
    assert_eq!(p[0]["severity"], "warning");
    assert!(p[0]["message"]
        .as_str()
        .unwrap()
        .contains("nonexistent_proj"));
    let u = problems(&v, "untrained_target");
    assert_eq!(u.len(), 2, "k_proj of both layers: {v}");
    assert_eq!(v["check"]["errors"], 0);
    // a GPT-2 adapter on a Llama base: nothing matches
    let v = inspect_json(&[s(&fx("interop/gpt2_lora")), "--base", s(&llama())]);
    assert_eq!(problems(&v, "missing_module").len(), 8);
    assert!(problems(&v, "unmatched_target")
        .iter()
        .all(|p| p["severity"] == "error"));
    assert_eq!(v["check"]["ok"], false);

    // prompt embeddings of the wrong width
    let d = variant(
        &fx("methods/prompt/adapter"),
        &tmp.path().join("prompt"),
        |t| {
            t[0].1 = vec![t[0].1[0], 16];
            let rows = t[0].1[0];
            t[0].2.truncate(rows * 16);
        },
        |_| {},
    );
    assert_eq!(problems(&check(&d), "shape_mismatch").len(), 1);
}

/// IA3: ‖l − 1‖ alone, ‖(l − 1) ⊙ W‖_F with the base weights.
#[test]
fn ia3_norms_with_and_without_the_base() {
    let dir = fx("methods/ia3/adapter");
    let t = read_tensors(&dir.join("adapter_model.safetensors"));
    let base = read_tensors(&llama().join("model.safetensors"));
    let v = inspect_json(&[s(&dir)]);
    let vb = inspect_json(&[s(&dir), "--base", s(&llama())]);
    for (path, ff) in [
        ("model.layers.0.self_attn.k_proj", false),
        ("model.layers.1.mlp.down_proj", true),
    ] {
        let (_, _, l) = tensor(&t, &format!("base_model.model.{path}.ia3_l"));
        let (_, ws, w) = tensor(&base, &format!("{path}.weight"));
        let plain = l
            .iter()
            .map(|&x| (x as f64 - 1.0).powi(2))
            .sum::<f64>()
            .sqrt();
        let m = module(&v, path);
        assert_eq!(m["delta_norm_of"], "l-1");
        assert_eq!(m["feedforward"], ff);
        assert!(close(f(&m["delta_norm"]), plain, 1e-6));
        let (rows, cols) = (ws[0], ws[1]);
        let mut sum = 0f64;
        for r in 0..rows {
            for c in 0..cols {
                let li = if ff { l[c] } else { l[r] } as f64;
                sum += ((li - 1.0) * w[r * cols + c] as f64).powi(2);
            }
        }
        let mb = module(&vb, path);
        assert_eq!(mb["delta_norm_of"], "(l-1)*W");
        assert!(close(f(&mb["delta_norm"]), sum.sqrt(), 1e-6), "{path}");
        let min = l.iter().copied().fold(f32::INFINITY, f32::min) as f64;
        assert!(close(f(&m["vector_min"]), min, 1e-7));
    }
    assert_eq!(v["method"], "IA3");
    assert_eq!(v["trainable_params"], 2 * (128 + 32 + 32));
    // 4-bit base: the weights are dequantized
    let vq = inspect_json(&[s(&dir), "--base", s(&fx("qlora/llama_gqa-nf4"))]);
    assert_eq!(
        module(&vq, "model.layers.0.mlp.down_proj")["delta_norm_of"],
        "(l-1)*W"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. --diff

#[test]
fn diff_with_itself_and_with_its_negation() {
    let tmp = tempfile::tempdir().unwrap();
    let v = inspect_json(&[s(&lora_qv()), "--diff", s(&lora_qv())]);
    let d = &v["diff"];
    assert_eq!(d["compared"], 4);
    for m in d["modules"].as_array().unwrap() {
        assert!(close(f(&m["cosine"]), 1.0, 1e-9), "{m}");
        assert_eq!(f(&m["sign_conflict_rate"]), 0.0);
        assert!(close(f(&m["norm"]), f(&m["other_norm"]), 1e-12));
    }
    assert!(d["only_here"].as_array().unwrap().is_empty());
    assert!(d["only_other"].as_array().unwrap().is_empty());

    let neg = variant(
        &lora_qv(),
        &tmp.path().join("neg"),
        |t| {
            for x in t.iter_mut().filter(|x| x.0.ends_with("lora_B.weight")) {
                x.2.iter_mut().for_each(|v| *v = -*v);
            }
        },
        |_| {},
    );
    let v = inspect_json(&[s(&lora_qv()), "--diff", s(&neg)]);
    let t = read_tensors(&lora_qv().join("adapter_model.safetensors"));
    for m in v["diff"]["modules"].as_array().unwrap() {
        assert!(close(f(&m["cosine"]), -1.0, 1e-9), "{m}");
        // every non-zero entry conflicts
        let path = m["path"].as_str().unwrap();
        let (_, sa, a) = tensor(&t, &format!("base_model.model.{path}.lora_A.weight"));
        let (_, sb, b) = tensor(&t, &format!("base_model.model.{path}.lora_B.weight"));
        let dw = dense_delta(a, b, sb[0], sa[0], sa[1], 2.0);
        let nonzero = dw.iter().filter(|&&x| (x as f32) != 0.0).count() as f64 / dw.len() as f64;
        assert!(close(f(&m["sign_conflict_rate"]), nonzero, 1e-9), "{m}");
        assert!(f(&m["sign_conflict_rate"]) > 0.99);
    }

    // two different adapters: cosine equals the dense one; modules only in the other listed
    let other = fx("train/llama_gqa/lora_all/adapter_init");
    let v = inspect_json(&[s(&lora_qv()), "--diff", s(&other)]);
    let t2 = read_tensors(&other.join("adapter_model.safetensors"));
    let dense = |t: &Tensors, p: &str| {
        let (_, sa, a) = tensor(t, &format!("base_model.model.{p}.lora_A.weight"));
        let (_, sb, b) = tensor(t, &format!("base_model.model.{p}.lora_B.weight"));
        dense_delta(a, b, sb[0], sa[0], sa[1], 2.0)
    };
    let (d1, d2) = (dense(&t, Q0), dense(&t2, Q0));
    let dot: f64 = d1.iter().zip(&d2).map(|(x, y)| x * y).sum();
    let cos = dot / (frob(&d1) * frob(&d2));
    let conflicts = d1
        .iter()
        .zip(&d2)
        .filter(|(&x, &y)| x as f32 != 0.0 && y as f32 != 0.0 && (x > 0.0) != (y > 0.0))
        .count() as f64
        / d1.len() as f64;
    let m = v["diff"]["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["path"] == Q0)
        .unwrap();
    assert!(close(f(&m["cosine"]), cos, 1e-5), "{m} vs {cos}");
    assert!((f(&m["sign_conflict_rate"]) - conflicts).abs() < 2.0 / d1.len() as f64);
    assert_eq!(v["diff"]["only_other"].as_array().unwrap().len(), 10);
    assert_eq!(v["diff"]["compared"], 4);
}

// ---------------------------------------------------------------------------------------------
// 6. checkpoints

/// A 2-step LoRA run on the tiny Llama with a checkpoint after each step.
fn checkpoint_run(dir: &Path) -> PathBuf {
    let data = dir.join("d.json");
    let recs: Vec<Value> = (0..6)
        .map(|i| json!({"instruction": format!("Say {i}."), "input": "", "output": format!("The number is {i}.")}))
        .collect();
    std::fs::write(&data, serde_json::to_string(&recs).unwrap()).unwrap();
    let out = dir.join("run");
    let o = run(
        "peft-train",
        &[
            "--model",
            s(&llama()),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            "2",
            "--save-every",
            "1",
            "--batch",
            "2",
            "--rank",
            "4",
            "--alpha",
            "8",
            "--seed",
            "3",
        ],
    );
    assert!(
        o.status.success(),
        "peft-train: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

#[test]
fn checkpoints_report_progress_and_optimizer_state() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = checkpoint_run(tmp.path());
    let ck = run_dir.join("checkpoints/step-1");
    let state = read_json(&ck.join("trainer_state.json"));
    let v = inspect_json(&[s(&ck)]);
    assert_eq!(v["kind"], "checkpoint");
    assert_eq!(v["method"], "LoRA");
    let c = &v["checkpoint"];
    assert_eq!(c["step"], 1);
    assert_eq!(c["tokens"], state["tokens"]);
    assert!(c["tokens"].as_u64().unwrap() > 0);
    assert_eq!(c["epoch"], state["epoch"]);
    assert_eq!(c["trainable_tensors"], 8);
    let o = &c["optimizer"];
    assert_eq!(o["present"], true);
    assert_eq!(o["tensors"], 16);
    assert_eq!(o["params"], 2 * 1792);
    assert_eq!(o["states"], json!(["exp_avg", "exp_avg_sq"]));
    assert_eq!(o["complete"], true);
    assert_eq!(v["trainable_params"], 1792);
    // the run's adapter_config.json gives the scale
    assert!(c["config_file"]
        .as_str()
        .unwrap()
        .ends_with("adapter_config.json"));
    assert!(close(f(&module(&v, Q0)["scale"]), 2.0, 1e-12));
    // its norms are those of the checkpoint's own A and B
    let t = read_tensors(&ck.join("params.safetensors"));
    let (_, sa, a) = tensor(&t, &format!("base_model.model.{Q0}.lora_A.weight"));
    let (_, sb, b) = tensor(&t, &format!("base_model.model.{Q0}.lora_B.weight"));
    let d = dense_delta(a, b, sb[0], sa[0], sa[1], 2.0);
    assert!(close(f(&module(&v, Q0)["delta_norm"]), frob(&d), 1e-5));
    // the params file stands for its checkpoint; the run folder is the final adapter
    let vf = inspect_json(&[s(&ck.join("params.safetensors"))]);
    assert_eq!(vf["checkpoint"]["step"], 1);
    assert_eq!(inspect_json(&[s(&run_dir)])["kind"], "adapter");

    // a checkpoint without optimizer state, and one copied away from its run (no config)
    let lone = tmp.path().join("lone");
    copy_dir(&run_dir.join("checkpoints/step-2"), &lone);
    std::fs::remove_file(lone.join("optimizer.safetensors")).unwrap();
    let v = inspect_json(&[s(&lone)]);
    assert_eq!(v["checkpoint"]["step"], 2);
    assert_eq!(v["checkpoint"]["optimizer"]["present"], false);
    assert!(v["checkpoint"]["config_file"].is_null());
    let m = module(&v, Q0);
    assert!(m["scale"].is_null());
    assert_eq!(m["delta_norm_of"], "B*A");
}

/// Adapters of our own bottleneck format and IA3, straight out of peft-train.
#[test]
fn bottleneck_and_ia3_adapters_from_peft_train() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.json");
    let recs: Vec<Value> = (0..4)
        .map(
            |i| json!({"instruction": format!("Say {i}."), "input": "", "output": format!("{i}.")}),
        )
        .collect();
    std::fs::write(&data, serde_json::to_string(&recs).unwrap()).unwrap();
    let train = |method: &str, out: &Path| {
        let o = run(
            "peft-train",
            &[
                "--model",
                s(&llama()),
                "--data",
                s(&data),
                "--out",
                s(out),
                "--steps",
                "1",
                "--batch",
                "2",
                "--method",
                method,
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let bn = tmp.path().join("bn");
    train("adapter", &bn);
    let v = inspect_json(&[s(&bn), "--base", s(&llama()), "--strict"]);
    assert_eq!(v["method"], "bottleneck adapter (houlsby)");
    let size = v["config"]["adapter_size"].as_u64().unwrap();
    let mods = v["modules"].as_array().unwrap();
    assert_eq!(mods.len(), 4, "attention and MLP units of 2 blocks");
    assert!(mods
        .iter()
        .all(|m| m["method"] == "bottleneck" && m["rank"] == size));
    // docs/adapters.md: sites × blocks × (2·hidden·size + size + hidden)
    assert_eq!(v["trainable_params"], 2 * 2 * (2 * 64 * size + size + 64));
    assert_eq!(v["check"]["errors"], 0, "{}", v["check"]);

    let ia3 = tmp.path().join("ia3");
    train("ia3", &ia3);
    let v = inspect_json(&[s(&ia3), "--diff", s(&fx("methods/ia3/adapter"))]);
    assert_eq!(v["diff"]["compared"], 6);
    let v = inspect_json(&[s(&ia3), "--diff", s(&ia3)]);
    for m in v["diff"]["modules"].as_array().unwrap() {
        assert!(close(f(&m["cosine"]), 1.0, 1e-9), "{m}");
        assert_eq!(f(&m["sign_conflict_rate"]), 0.0);
    }
}

// ---------------------------------------------------------------------------------------------
// 7. --plot

#[test]
fn plots_in_svg_and_png() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = fx("train/llama_gqa/lora_all/adapter_init");
    let svg = tmp.path().join("norms.svg");
    let v = inspect_json(&[s(&adapter), "--plot", s(&svg)]);
    assert_eq!(v["plot"], s(&svg));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"), "{}", &text[..40]);
    for name in ["self_attn.q_proj", "mlp.down_proj", "layer"] {
        assert!(text.contains(name), "svg lacks {name}");
    }
    // one bar per module: 14 filled rectangles besides the background and the 7 legend keys
    let bars = text.matches("<rect").count();
    assert_eq!(bars, 1 + 14 + 7, "rects in svg");

    let png = tmp.path().join("norms.png");
    let out = inspect(&[s(&adapter), "--plot", s(&png)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert!(w >= 300 && h >= 300, "{w}x{h}");
    // written atomically: nothing but the two charts in the folder
    let names: BTreeSet<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["norms.png", "norms.svg"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );

    // nothing to plot, a bad extension, a missing folder: clean errors, no file
    let p = tmp.path().join("prefix.svg");
    let out = inspect(&[s(&fx("methods/prefix/adapter")), "--plot", s(&p)]);
    assert_clean_error(&out, "no module has");
    assert_eq!(out.status.code(), Some(2));
    assert!(!p.exists());
    let out = inspect(&[s(&adapter), "--plot", s(&tmp.path().join("x.jpg"))]);
    assert_clean_error(&out, ".svg or .png");
    let out = inspect(&[
        s(&adapter),
        "--plot",
        s(&tmp.path().join("no/such/dir.png")),
    ]);
    assert_clean_error(&out, "dir.png");
    assert_eq!(out.status.code(), Some(4));
}

// ---------------------------------------------------------------------------------------------
// 8. other inputs, human output, help

#[test]
fn every_fixture_kind_is_inspected() {
    let mut paths = vec![
        fx("methods/prompt/adapter"),
        fx("methods/prompt_text/adapter"),
        fx("methods/prefix_proj/adapter"),
        fx("interop/llama_gqa_dora"),
        fx("interop/llama_gqa_rslora_patterns"),
        fx("train/llama_gqa/peft_adapter"),
        fx("train/gpt2/lora_c_attn/adapter_init"),
        fx("qlora/lora_all/adapter_init"),
        fx("nf4/llama_gqa-bnb"),
        fx("nf4/gpt2-bnb"),
        fx("train/llama_gqa/lora_qv/adapter_init/adapter_model.safetensors"),
    ];
    for m in peftkit_tests::FIXTURE_MODELS {
        paths.push(fx(&format!("models/{m}")));
    }
    for p in &paths {
        let v = inspect_json(&[s(p)]);
        assert!(
            v["files"]["tensors"].as_u64().unwrap() > 0,
            "{}",
            p.display()
        );
        let out = inspect(&[s(p)]);
        assert!(out.status.success());
        assert!(!String::from_utf8_lossy(&out.stdout).is_empty());
    }
    let v = inspect_json(&[s(&fx("methods/prompt/adapter"))]);
    assert_eq!(v["method"], "prompt tuning");
    let p = &v["prompt"];
    let t = read_tensors(&fx("methods/prompt/adapter/adapter_model.safetensors"));
    let (_, shape, e) = tensor(&t, "prompt_embeddings");
    assert_eq!(p["num_virtual_tokens"], shape[0]);
    let n = e.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    assert!(close(f(&p["norm"]), n, 1e-6));
    // prefix tuning: key/value norms per layer add up to the whole
    let v = inspect_json(&[s(&fx("methods/prefix/adapter"))]);
    let layers = v["prompt"]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    let sum: f64 = layers
        .iter()
        .map(|l| f(&l["key_norm"]).powi(2) + f(&l["value_norm"]).powi(2))
        .sum();
    assert!(close(sum.sqrt(), f(&v["prompt"]["norm"]), 1e-6));
    // a GPT-2 4-bit checkpoint written by transformers: Conv1D weights quantized
    let v = inspect_json(&[s(&fx("nf4/gpt2-bnb"))]);
    assert_eq!(v["quantization"]["quant_type"], "nf4");
}

#[test]
fn human_output_and_help() {
    let out = inspect(&[s(&lora_qv()), "--base", s(&llama())]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let header = text
        .lines()
        .find(|l| l.starts_with("module "))
        .expect("module table");
    for col in ["layer", "scale", "||dW||_F", "num.rank", "eff.rank"] {
        assert!(header.contains(col), "{header}");
    }
    // rows aligned: the ||dW||_F column ends at the same place on every row
    let end = header.find("||dW||_F").unwrap() + "||dW||_F".len();
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("model.layers."))
        .collect();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        assert_ne!(
            &r[end - 1..end],
            " ",
            "right-aligned number ends under the header: {r}"
        );
        assert_eq!(&r[end..end + 1], " ");
    }
    assert!(text.contains("0 error(s), 0 warning(s)"));
    let help = inspect(&["--help"]);
    let h = String::from_utf8(help.stdout).unwrap();
    assert!(h.contains("Examples:") && h.contains("--base") && h.contains("--plot"));
}

// ---------------------------------------------------------------------------------------------
// 9. broken inputs: one error line, no panic

#[test]
fn broken_inputs_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = lora_qv();

    // missing path: I/O error
    let out = inspect(&[s(&t.join("nope"))]);
    assert_clean_error(&out, "nope");
    assert_eq!(out.status.code(), Some(4));
    // a folder that is none of the kinds
    std::fs::create_dir(t.join("empty")).unwrap();
    let out = inspect(&[s(&t.join("empty"))]);
    assert_clean_error(&out, "not an adapter directory");
    assert_eq!(out.status.code(), Some(3));
    // truncated safetensors
    let d = t.join("trunc");
    copy_dir(&src, &d);
    let bytes = std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        d.join("adapter_model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let out = inspect(&[s(&d)]);
    assert_clean_error(&out, "adapter_model.safetensors");
    assert_eq!(out.status.code(), Some(3));
    // invalid JSON config
    let d = t.join("json");
    copy_dir(&src, &d);
    std::fs::write(d.join("adapter_config.json"), "{\"peft_type\": ").unwrap();
    assert_clean_error(&inspect(&[s(&d)]), "adapter_config.json");
    // a lora_A without its lora_B
    let d = variant(
        &src,
        &t.join("pair"),
        |t| t.retain(|x| !x.0.contains("layers.1.self_attn.v_proj.lora_B")),
        |_| {},
    );
    assert_clean_error(
        &inspect(&[s(&d)]),
        "model.layers.1.self_attn.v_proj.lora_B.weight is missing",
    );
    // A and B that do not multiply
    let d = variant(
        &src,
        &t.join("rank"),
        |t| {
            let a = t
                .iter_mut()
                .find(|x| x.0.ends_with("layers.0.self_attn.q_proj.lora_A.weight"))
                .unwrap();
            a.1 = vec![2, 128];
        },
        |_| {},
    );
    assert_clean_error(&inspect(&[s(&d)]), "are not [r, in] and [out, r]");
    // an integer tensor where a float is expected
    let d = t.join("int");
    copy_dir(&src, &d);
    let int_name = format!("base_model.model.{Q0}.lora_A.weight");
    let mut raw = read_tensors_raw(&src.join("adapter_model.safetensors"));
    for (n, (dt, _, _)) in raw.iter_mut() {
        if *n == int_name {
            *dt = safetensors::Dtype::I32;
        }
    }
    write_raw(&d.join("adapter_model.safetensors"), &raw);
    let out = inspect(&[s(&d)]);
    assert_clean_error(&out, "I32");
    assert_eq!(out.status.code(), Some(3));
    // NaN in an adapter: reported, not a crash
    let d = variant(&src, &t.join("nan"), |t| t[0].2[0] = f32::NAN, |_| {});
    let v = inspect_json(&[s(&d)]);
    let bad: Vec<&Value> = v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["non_finite"] != 0)
        .collect();
    assert_eq!(bad.len(), 1);
    assert!(bad[0]["delta_norm"].is_null());
    // a 4-bit weight cut short
    let d = t.join("q4");
    copy_dir(&fx("qlora/llama_gqa-nf4"), &d);
    let mut raw = read_tensors_raw(&d.join("model.safetensors"));
    let w = "model.layers.0.self_attn.q_proj.weight";
    for (n, (_, shape, bytes)) in raw.iter_mut() {
        if n == w {
            *shape = vec![10, 1];
            bytes.truncate(10);
        }
    }
    write_raw(&d.join("model.safetensors"), &raw);
    let out = inspect(&[s(&d)]);
    assert_clean_error(&out, w);
    assert_eq!(out.status.code(), Some(3));
    // a model folder without weights; a checkpoint with a broken trainer_state.json
    let d = t.join("noweights");
    std::fs::create_dir(&d).unwrap();
    std::fs::copy(llama().join("config.json"), d.join("config.json")).unwrap();
    assert_clean_error(&inspect(&[s(&d)]), "model.safetensors");
    let d = t.join("ck");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("trainer_state.json"), "{\"step\": \"x\"}").unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        d.join("params.safetensors"),
    )
    .unwrap();
    assert_clean_error(&inspect(&[s(&d)]), "trainer_state.json");
    // option errors
    let out = inspect(&[s(&src), "--strict"]);
    assert_clean_error(&out, "--base");
    assert_eq!(out.status.code(), Some(2));
    let out = inspect(&[s(&src), "--diff", s(&t.join("nope"))]);
    assert_clean_error(&out, "nope");
    let out = inspect(&[s(&src), "--base", s(&t.join("empty"))]);
    assert_clean_error(&out, "config.json");
    let out = inspect(&[s(&llama()), "--base", s(&llama())]);
    assert_clean_error(&out, "model folder");
}

type RawTensors = Vec<(String, (safetensors::Dtype, Vec<usize>, Vec<u8>))>;

/// Raw tensors of a safetensors file: name → (dtype, shape, bytes), in file order.
fn read_tensors_raw(p: &Path) -> RawTensors {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn write_raw(p: &Path, raw: &RawTensors) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = raw
        .iter()
        .map(|(n, (dt, shape, bytes))| {
            let v = safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes).unwrap();
            (n.clone(), v)
        })
        .collect();
    std::fs::write(p, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

/// What llama.cpp's convert_lora_to_gguf gets wrong without a word is flagged too: rsLoRA and
/// alpha_pattern scales (it writes alpha / r) and GPT-2's Conv1D pairs (it swaps A and B), each
/// pointing to model-export.
#[test]
fn gguf_check_flags_what_the_converter_gets_wrong_silently() {
    let v = inspect_json(&[
        s(&fx("interop/llama_gqa_rslora_patterns")),
        "--base",
        s(&llama()),
    ]);
    let g = problems(&v, "gguf_incompatible");
    let text: Vec<&str> = g.iter().map(|p| p["message"].as_str().unwrap()).collect();
    assert!(text.iter().any(|m| m.starts_with("use_rslora")), "{text:?}");
    assert!(
        text.iter().any(|m| m.starts_with("alpha_pattern")),
        "{text:?}"
    );
    assert!(text.iter().all(|m| m.contains("model-export")));
    assert_eq!(v["check"]["errors"], 0);

    let v = inspect_json(&[s(&fx("interop/gpt2_lora")), "--base", s(&fx("models/gpt2"))]);
    let g = problems(&v, "gguf_incompatible");
    assert_eq!(g.len(), 8, "one per Conv1D module: {g:?}");
    assert!(g
        .iter()
        .all(|p| p["severity"] == "warning" && p["module"].is_string()));
    // A plain Llama LoRA has nothing to flag.
    let v = inspect_json(&[s(&lora_qv()), "--base", s(&llama())]);
    assert!(problems(&v, "gguf_incompatible").is_empty());
}

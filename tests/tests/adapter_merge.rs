//! adapter-merge against PEFT 0.21.2 (tests/fixtures/generate_merge.py): merge_and_unload of
//! LoRA (Linear and GPT-2 Conv1D), rsLoRA with patterns, DoRA, IA3, a bf16 model with
//! modules_to_save and a QLoRA (NF4) base; add_weighted_adapter's combinations.

use peftkit_core::io::safetensors_file::SafetensorsFile;
use peftkit_core::model::{ForwardOptions, Model, SeqInput};
use peftkit_tests::{assert_clean_error, fixtures, read_json, read_tensors, run};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn merge_dir(case: &str) -> PathBuf {
    fixtures().join("merge").join(case)
}

fn tensor_map(p: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    read_tensors(p)
        .into_iter()
        .map(|(n, s, v)| (n, (s, v)))
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn run_ok(args: &[&str]) -> String {
    let out = run("adapter-merge", args);
    assert!(
        out.status.success(),
        "adapter-merge {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Merge a fixture case with our tool and check every tensor against PEFT's merged model:
/// changed ones within `tol` (or, for bf16, within one bf16 step on a few elements), the rest
/// byte for byte.
fn check_merge_case(case: &str, tol: f32) -> PathBuf {
    let dir = merge_dir(case);
    let reference = read_json(&dir.join("reference.json"));
    let base = fixtures().join(reference["base_model"].as_str().unwrap());
    let tmp = tempfile::tempdir().unwrap().keep();
    let out = tmp.join("merged");
    let summary = run_ok(&[
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        dir.join("adapter").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
        "--quiet",
    ]);
    let summary: Value = serde_json::from_str(&summary).unwrap();
    let ours = SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
    let theirs = tensor_map(&dir.join("merged.safetensors"));
    let base_file = SafetensorsFile::open(&base.join("model.safetensors")).unwrap();
    let changed = strings(&reference["changed_keys"]);
    assert!(!changed.is_empty());
    for key in &changed {
        let t = ours
            .get(key)
            .unwrap_or_else(|| panic!("{case}: {key} missing"));
        let (shape, want) = &theirs[key];
        assert_eq!(t.shape, shape.as_slice(), "{case}: {key} shape");
        let got = peftkit_core::io::safetensors_file::to_f32(key, &t).unwrap();
        if t.dtype == safetensors::Dtype::BF16 {
            // PEFT rounds f32(W) + ΔW once; our ΔW may differ in the last f32 bit, which can
            // flip a rare rounding: allow one bf16 step on at most 1% of the elements.
            let off: Vec<f32> = got
                .iter()
                .zip(want)
                .filter(|(a, b)| a != b)
                .map(|(a, b)| (a - b).abs() / b.abs().max(1e-30))
                .collect();
            assert!(
                off.len() * 100 <= got.len() && off.iter().all(|&r| r <= 1.0 / 128.0),
                "{case}: {key}: {} of {} bf16 values differ",
                off.len(),
                got.len()
            );
        } else {
            let err = max_diff(&got, want);
            assert!(err <= tol, "{case}: {key}: max |Δ| {err}");
        }
    }
    for key in strings(&reference["unchanged_keys"]) {
        let a = ours.get(&key).unwrap();
        let b = base_file.get(&key).unwrap();
        assert!(
            a.bytes == b.bytes && a.dtype == b.dtype,
            "{case}: {key} not copied byte for byte"
        );
    }
    // nothing more, nothing less than the base model's tensors (plus an untied head)
    let ours_names: BTreeSet<String> = ours.names().into_iter().collect();
    let mut want_names: BTreeSet<String> = base_file.names().into_iter().collect();
    want_names.extend(changed.iter().cloned());
    assert_eq!(ours_names, want_names, "{case}: tensor names");
    assert_eq!(summary["mode"], "merge");
    out
}

/// Logits of a model folder for the case's sequences against PEFT's (adapter active,
/// unmerged) within `tol`.
fn check_logits(case: &str, model_dir: &Path, key: &str, tol: f32) {
    let dir = merge_dir(case);
    let reference = read_json(&dir.join("reference.json"));
    let logits = tensor_map(&dir.join("logits.safetensors"));
    let model = Model::load(model_dir).unwrap();
    let opts = ForwardOptions { adapter: None };
    for (i, ids) in reference["logits"]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let ids: Vec<u32> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let hidden = model
            .forward(&[SeqInput { ids: &ids }], None, &opts)
            .unwrap();
        let got = model.logits(&hidden, ids.len(), &opts);
        let (_, want) = &logits[&format!("{key}.{i}")];
        let err = max_diff(&got, want);
        assert!(
            err <= tol,
            "{case} seq {i}: max |Δ logit| {err} vs PEFT {key}"
        );
    }
}

#[test]
fn lora_merge_matches_peft() {
    let out = check_merge_case("lora_llama", 1e-5);
    check_logits("lora_llama", &out, "unmerged", 1e-4);
}

#[test]
fn rslora_with_rank_and_alpha_patterns_merges_like_peft() {
    let out = check_merge_case("lora_rslora_patterns", 1e-5);
    check_logits("lora_rslora_patterns", &out, "unmerged", 1e-4);
}

#[test]
fn gpt2_conv1d_lora_merge_matches_peft() {
    let out = check_merge_case("lora_gpt2", 1e-5);
    check_logits("lora_gpt2", &out, "unmerged", 1e-4);
}

#[test]
fn dora_merge_matches_peft() {
    let out = check_merge_case("dora_llama", 1e-5);
    check_logits("dora_llama", &out, "unmerged", 1e-4);
    let out = check_merge_case("dora_gpt2", 1e-5);
    check_logits("dora_gpt2", &out, "unmerged", 1e-4);
}

#[test]
fn ia3_merge_matches_peft() {
    let out = check_merge_case("ia3_llama", 1e-5);
    check_logits("ia3_llama", &out, "unmerged", 1e-4);
    let out = check_merge_case("ia3_gpt2", 1e-5);
    check_logits("ia3_gpt2", &out, "unmerged", 1e-4);
}

#[test]
fn bf16_merge_rounds_once_and_takes_the_saved_head() {
    let out = check_merge_case("lora_bf16_mts", 0.0);
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(
        cfg["tie_word_embeddings"],
        read_json(&fixtures().join("models/llama_untied/config.json"))["tie_word_embeddings"]
    );
}

#[test]
fn qlora_merge_uses_the_dequantized_weights() {
    let dir = merge_dir("qlora_nf4");
    let base = fixtures().join("qlora").join("llama_gqa-nf4");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("plain");
    run_ok(&[
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        dir.join("adapter").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    let ours = tensor_map(&out.join("model.safetensors"));
    let want = tensor_map(&dir.join("dequant_plus_delta.safetensors"));
    for (key, (shape, w)) in &want {
        let (s, got) = &ours[key];
        assert_eq!(s, shape, "{key}");
        let err = max_diff(got, w);
        assert!(err <= 1e-5, "{key}: max |Δ| {err} from dequantized + ΔW");
    }
    // a plain model: no 4-bit parts, no quantization_config
    assert!(ours
        .keys()
        .all(|k| !k.contains("quant_state") && !k.ends_with("absmax")));
    assert!(read_json(&out.join("config.json"))
        .get("quantization_config")
        .is_none());
    // same logits as the 4-bit base + adapter (PEFT, unmerged)
    check_logits("qlora_nf4", &out, "unmerged", 1e-4);
}

#[test]
fn qlora_requantize_is_byte_identical_to_peft() {
    let dir = merge_dir("qlora_nf4");
    let base = fixtures().join("qlora").join("llama_gqa-nf4");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nf4");
    run_ok(&[
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        dir.join("adapter").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--requantize",
        "--quiet",
    ]);
    let ours = SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
    let theirs =
        SafetensorsFile::open(&dir.join("merged_requantized").join("model.safetensors")).unwrap();
    let a: BTreeSet<String> = ours.names().into_iter().collect();
    let b: BTreeSet<String> = theirs.names().into_iter().collect();
    assert_eq!(a, b, "tensor names");
    for name in &a {
        let (x, y) = (ours.get(name).unwrap(), theirs.get(name).unwrap());
        assert_eq!(x.dtype, y.dtype, "{name}");
        assert_eq!(x.shape, y.shape, "{name}");
        assert!(
            x.bytes == y.bytes,
            "{name}: bytes differ from PEFT's re-quantized model"
        );
    }
    assert!(read_json(&out.join("config.json"))
        .get("quantization_config")
        .is_some());
}

#[test]
fn merged_model_can_be_cast() {
    let dir = merge_dir("lora_llama");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16");
    run_ok(&[
        "--model",
        fixtures().join("models/llama_gqa").to_str().unwrap(),
        "--adapter",
        dir.join("adapter").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--dtype",
        "bf16",
        "--quiet",
    ]);
    let f = SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
    assert!(f
        .names()
        .iter()
        .all(|n| f.get(n).unwrap().dtype == safetensors::Dtype::BF16));
    assert_eq!(read_json(&out.join("config.json"))["dtype"], "bfloat16");
}

#[test]
fn unmergeable_and_mismatched_adapters_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let llama = fixtures().join("models/llama_gqa");
    let m = |adapter: &Path, extra: &[&str]| {
        let mut args = vec![
            "--model",
            llama.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run("adapter-merge", &args)
    };
    let methods = fixtures().join("methods");
    assert_clean_error(
        &m(&methods.join("prefix").join("adapter"), &[]),
        "no weights to merge",
    );
    assert_clean_error(
        &m(&methods.join("prompt").join("adapter"), &[]),
        "no weights to merge",
    );
    assert_clean_error(
        &m(&merge_dir("lora_gpt2").join("adapter"), &[]),
        "adapter for another base model",
    );
    assert_clean_error(
        &m(&merge_dir("lora_llama").join("adapter"), &["--requantize"]),
        "not a 4-bit model",
    );
    assert_clean_error(&m(&tmp.path().join("missing"), &[]), "missing");
    assert!(!out.exists(), "a failed merge left output behind");
    // the output may not be an input
    let adapter = merge_dir("lora_llama").join("adapter");
    let r = run(
        "adapter-merge",
        &[
            "--model",
            llama.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            llama.to_str().unwrap(),
        ],
    );
    assert!(!r.status.success());
}

// ---- combining adapters ---------------------------------------------------------------

fn combine_case(name: &str) -> (Value, PathBuf) {
    let cases = read_json(&merge_dir("combine").join("cases.json"));
    let c = cases["results"][name].clone();
    assert!(c.is_object(), "no combine case {name}");
    let tmp = tempfile::tempdir().unwrap().keep();
    let out = tmp.join(name);
    let call = &c["call"];
    let mut args: Vec<String> = vec!["--combine".into()];
    args.push(call["combination_type"].as_str().unwrap().into());
    for a in call["adapters"].as_array().unwrap() {
        let a = a.as_str().unwrap();
        let dir = merge_dir("combine").join("adapters").join(a);
        args.push("--adapter".into());
        args.push(format!("{a}={}", dir.display()));
    }
    let weights: Vec<String> = call["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap().to_string())
        .collect();
    args.push(format!("--weights={}", weights.join(",")));
    if let Some(d) = call["density"].as_f64() {
        args.push("--density".into());
        args.push(d.to_string());
    }
    if let Some(r) = call["svd_rank"].as_u64() {
        args.push("--svd-rank".into());
        args.push(r.to_string());
    }
    args.push("--majority-sign".into());
    args.push(call["majority_sign_method"].as_str().unwrap().into());
    args.push("--out".into());
    args.push(out.display().to_string());
    args.push("--quiet".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok(&args);
    (c, out)
}

/// B·A of every module of an adapter (`[out, in]`, f64 sums).
fn products(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let t = tensor_map(&dir.join("adapter_model.safetensors"));
    let mut out = BTreeMap::new();
    for (name, (sa, a)) in &t {
        let Some(module) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let (sb, b) = &t[&format!("{module}.lora_B.weight")];
        let (r, i, o) = (sa[0], sa[1], sb[0]);
        let mut d = vec![0f32; o * i];
        for x in 0..o {
            for y in 0..i {
                d[x * i + y] = (0..r)
                    .map(|z| b[x * r + z] as f64 * a[z * i + y] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out.insert(module.to_string(), d);
    }
    out
}

fn check_combine_config(c: &Value, out: &Path) {
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["r"], c["new_rank"], "r");
    assert_eq!(cfg["lora_alpha"], c["new_lora_alpha"], "lora_alpha");
    let got: BTreeSet<String> = strings(&cfg["target_modules"]).into_iter().collect();
    let want: BTreeSet<String> = strings(&c["new_target_modules_saved"])
        .into_iter()
        .collect();
    assert_eq!(got, want, "target_modules");
}

/// Tensors equal PEFT's result element by element.
fn assert_same_tensors(name: &str, tol: f32) {
    let (c, out) = combine_case(name);
    check_combine_config(&c, &out);
    let ours = tensor_map(&out.join("adapter_model.safetensors"));
    let theirs = tensor_map(
        &merge_dir("combine")
            .join(name)
            .join("adapter_model.safetensors"),
    );
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>(),
        "{name}: tensor names"
    );
    for (k, (s, w)) in &theirs {
        let (gs, g) = &ours[k];
        assert_eq!(gs, s, "{name}: {k} shape");
        let err = max_diff(g, w);
        assert!(err <= tol, "{name}: {k}: max |Δ| {err}");
    }
}

/// SVD results: B·A equals PEFT's (singular vectors are only defined up to sign) and the
/// singular values are the ones PEFT saw.
fn assert_same_products(name: &str) {
    let (c, out) = combine_case(name);
    check_combine_config(&c, &out);
    let ours = products(&out);
    let theirs = products(&merge_dir("combine").join(name));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (k, w) in &theirs {
        let err = max_diff(&ours[k], w);
        assert!(err <= 1e-5, "{name}: {k}: B·A max |Δ| {err}");
    }
}

#[test]
fn linear_and_cat_combinations_match_peft() {
    for name in [
        "linear_ab",
        "linear_ab_neg",
        "linear_single_a",
        "cat_ab",
        "cat_ac",
        "cat_g1g2",
    ] {
        assert_same_tensors(name, 1e-6);
    }
}

#[test]
fn ties_and_magnitude_prune_match_peft() {
    for name in ["ties_ab", "ties_ab_frequency", "magnitude_prune_ab"] {
        assert_same_tensors(name, 1e-6);
    }
}

#[test]
fn svd_combinations_match_peft() {
    for name in [
        "svd_ab",
        "svd_ac_rank3",
        "svd_g1g2",
        "ties_svd_ab",
        "magnitude_prune_svd_ab",
    ] {
        assert_same_products(name);
    }
}

#[test]
fn dare_keeps_about_density_and_rescales() {
    // weight 0 for b: the result is a's tensors times √(w·s) with DARE's mask and 1/density
    let dir = merge_dir("combine").join("adapters");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dare");
    let a = dir.join("a");
    let b = dir.join("b");
    let density = 0.25f32;
    run_ok(&[
        "--combine",
        "dare_linear",
        "--adapter",
        a.to_str().unwrap(),
        "--adapter",
        b.to_str().unwrap(),
        "--weights",
        "2,0",
        "--density",
        &density.to_string(),
        "--seed",
        "5",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    let ours = tensor_map(&out.join("adapter_model.safetensors"));
    let src = tensor_map(&a.join("adapter_model.safetensors"));
    let scale = (2.0f32 * 2.0).sqrt(); // √(w · s) with s = alpha / r = 2
    let (mut kept, mut total) = (0usize, 0usize);
    for (k, (_, v)) in &src {
        let (_, got) = &ours[k];
        for (g, x) in got.iter().zip(v) {
            total += 1;
            if *g != 0.0 {
                kept += 1;
                let want = x * scale / density;
                assert!(
                    (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{k}: {g} vs {want}"
                );
            }
        }
    }
    let frac = kept as f32 / total as f32;
    assert!((frac - density).abs() < 0.03, "kept fraction {frac}");
    // the same seed gives the same masks; another seed other ones
    let again = tmp.path().join("again");
    let other = tmp.path().join("other");
    for (o, seed) in [(&again, "5"), (&other, "6")] {
        run_ok(&[
            "--combine",
            "dare_ties",
            "--adapter",
            a.to_str().unwrap(),
            "--adapter",
            b.to_str().unwrap(),
            "--density",
            "0.5",
            "--seed",
            seed,
            "--out",
            o.to_str().unwrap(),
            "--quiet",
        ]);
    }
    let x = std::fs::read(again.join("adapter_model.safetensors")).unwrap();
    let y = std::fs::read(other.join("adapter_model.safetensors")).unwrap();
    assert_ne!(x, y);
}

#[test]
fn combine_refuses_what_peft_refuses() {
    let dir = merge_dir("combine").join("adapters");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let a = format!("a={}", dir.join("a").display());
    let c = format!("c={}", dir.join("c").display());
    let go = |args: &[&str]| {
        let mut v = args.to_vec();
        v.extend_from_slice(&["--out", out.to_str().unwrap()]);
        run("adapter-merge", &v)
    };
    assert_clean_error(
        &go(&["--combine", "linear", "--adapter", &a, "--adapter", &c]),
        "equal rank",
    );
    assert_clean_error(
        &go(&[
            "--combine",
            "ties",
            "--adapter",
            &a,
            "--adapter",
            &a.replace("a=", "a2="),
        ]),
        "--density",
    );
    assert_clean_error(
        &go(&[
            "--combine",
            "cat",
            "--adapter",
            &a,
            "--adapter",
            &c,
            "--weights",
            "1",
        ]),
        "one weight per adapter",
    );
    assert_clean_error(
        &go(&["--combine", "mean", "--adapter", &a]),
        "expected one of",
    );
    let dora = merge_dir("dora_llama").join("adapter");
    assert_clean_error(
        &go(&[
            "--combine",
            "cat",
            "--adapter",
            dora.to_str().unwrap(),
            "--adapter",
            &a,
        ]),
        "DoRA",
    );
    assert!(!out.exists());
}

#[test]
fn ia3_adapters_combine_linearly() {
    // l = Σ wᵢ·lᵢ (PEFT's IA3 add_weighted_adapter): 0.25·l + 0.75·l = l
    let ia3 = merge_dir("ia3_llama").join("adapter");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ia3");
    run_ok(&[
        "--combine",
        "linear",
        "--adapter",
        &format!("x={}", ia3.display()),
        "--adapter",
        &format!("y={}", ia3.display()),
        "--weights",
        "0.25,0.75",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    let got = tensor_map(&out.join("adapter_model.safetensors"));
    let want = tensor_map(&ia3.join("adapter_model.safetensors"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, (s, w)) in &want {
        assert_eq!(&got[k].0, s);
        assert!(max_diff(&got[k].1, w) <= 1e-6, "{k}");
    }
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "IA3");
    let r = run(
        "adapter-merge",
        &[
            "--combine",
            "ties",
            "--density",
            "0.5",
            "--adapter",
            ia3.to_str().unwrap(),
            "--adapter",
            ia3.to_str().unwrap(),
            "--out",
            tmp.path().join("t").to_str().unwrap(),
        ],
    );
    assert_clean_error(&r, "linearly only");
}

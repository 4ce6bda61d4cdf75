//! End-to-end tests of `peft-train`: determinism, checkpoints and resume (also after Ctrl-C),
//! gradient accumulation, packing, the parameter-count line, the output folders (PEFT adapter
//! or HF model that peft-eval loads), evaluation and schedules in the JSONL log, failures that
//! leave nothing behind, NaN handling, `--check-data` and `--plan`; and the interop fixture
//! (tests/fixtures/interop, made by generate_interop.py): adapters written by peft-train, loaded
//! by PEFT, give the logits PEFT recorded.
//!
//! The tools must be built first: `cargo build --release --bins` (make test does).

use peftkit_core::io::safetensors_file::{to_f32, SafetensorsFile};
use peftkit_core::model::{ForwardOptions, Model, SeqInput};
use peftkit_core::train::lora;
use peftkit_core::train::params::TrainState;
use peftkit_tests::{assert_clean_error, bin, copy_dir, fixtures, run};
use safetensors::SafeTensors;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// helpers

fn model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `n` alpaca records "Say the number i." → "The number is i." (the output repeated
/// `reps(i)` times, to vary the number of loss tokens per record).
fn alpaca_data(dir: &Path, name: &str, n: usize, reps: impl Fn(usize) -> usize) -> PathBuf {
    let recs: Vec<Value> = (0..n)
        .map(|i| {
            let out = vec![format!("The number is {i}."); reps(i).max(1)].join(" ");
            json!({"instruction": format!("Say the number {i}."), "input": "", "output": out})
        })
        .collect();
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(&recs).unwrap()).unwrap();
    p
}

/// `n` plain-text records (JSON Lines with a "text" field).
fn text_data(dir: &Path, n: usize) -> PathBuf {
    let p = dir.join("text.jsonl");
    let lines: Vec<String> = (0..n)
        .map(|i| json!({"text": format!("The number {} comes after {i}.", i + 1)}).to_string())
        .collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn train(args: &[&str]) -> Output {
    run("peft-train", args)
}

/// Run peft-train, assert success, return stdout.
fn train_ok(args: &[&str]) -> String {
    let out = train(args);
    assert!(
        out.status.success(),
        "peft-train {args:?} failed ({:?}):\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn log_lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The per-step records of a metrics log (those with a "loss").
fn step_records(p: &Path) -> Vec<Value> {
    log_lines(p)
        .into_iter()
        .filter(|v| v.get("loss").is_some())
        .collect()
}

fn tensors(p: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let f = SafetensorsFile::open(p).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let t = f.get(&n).unwrap();
            let v = to_f32(&n, &t).unwrap();
            (n.clone(), (t.shape.to_vec(), v))
        })
        .collect()
}

fn max_diff(a: &Path, b: &Path) -> f32 {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "different tensor names"
    );
    let mut m = 0.0f32;
    for (k, (sa, va)) in &ta {
        let (sb, vb) = &tb[k];
        assert_eq!(sa, sb, "{k}: shapes differ");
        for (x, y) in va.iter().zip(vb) {
            m = m.max((x - y).abs());
        }
    }
    m
}

/// Raw bytes of every tensor of a safetensors file, by name.
fn raw_tensors(p: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(p).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                (
                    format!("{:?}", v.dtype()),
                    v.shape().to_vec(),
                    v.data().to_vec(),
                ),
            )
        })
        .collect()
}

/// peft-eval's mean loss of `model_dir` on `data`.
fn eval_loss(model_dir: &Path, data: &Path) -> f64 {
    let out = run(
        "peft-eval",
        &["--model", s(model_dir), "--data", s(data), "--json"],
    );
    assert!(
        out.status.success(),
        "peft-eval --model {} failed: {}",
        model_dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["loss"].as_f64().unwrap()
}

fn assert_no_output(out_dir: &Path) {
    assert!(
        !out_dir.exists(),
        "a failed run left {} behind",
        out_dir.display()
    );
}

// ---------------------------------------------------------------------------------------------
// 1. determinism

#[test]
fn same_command_gives_identical_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = alpaca_data(tmp.path(), "d.json", 32, |_| 1);
    let m = model("llama_gqa");
    let go = |out: &Path, seed: &str| {
        train_ok(&[
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(out),
            "--steps",
            "6",
            "--batch",
            "4",
            "--lr",
            "1e-2",
            "--seed",
            seed,
            "--dropout",
            "0.1",
            "--rank",
            "4",
        ]);
        std::fs::read(out.join("adapter_model.safetensors")).unwrap()
    };
    let a = go(&tmp.path().join("a"), "3");
    let b = go(&tmp.path().join("b"), "3");
    assert!(a == b, "two identical runs wrote different adapters");
    // ... and the seed matters (the comparison above is not vacuous).
    let c = go(&tmp.path().join("c"), "4");
    assert!(a != c, "a different seed gave the same adapter");
}

// ---------------------------------------------------------------------------------------------
// 2. checkpoints and resume

/// Run A: 8 steps straight. Run B: the same command stopped after step 4 (the Ctrl-C path,
/// triggered by the test hook PEFTKIT_STOP_AFTER_STEP), then `--resume OUT`. Same bytes.
/// The data (10 rows, batch 2 × accumulation 2) crosses epoch boundaries and the resume point
/// is in the middle of an epoch; dropout checks that the RNG state is restored.
fn resume_case(model_name: &str, method_args: &[&str], file: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let data = alpaca_data(tmp.path(), "d.json", 10, |i| 1 + i % 3);
    let m = model(model_name);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let common = |out: &Path| -> Vec<String> {
        let mut v: Vec<String> = [
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(out),
            "--steps",
            "8",
            "--save-every",
            "4",
            "--batch",
            "2",
            "--grad-accum",
            "2",
            "--lr",
            "1e-2",
            "--warmup",
            "2",
            "--seed",
            "5",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(method_args.iter().map(|x| x.to_string()));
        v
    };
    let args_a = common(&a);
    train_ok(&args_a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(a.join("checkpoints/step-4/trainer_state.json").exists());
    assert!(a.join("checkpoints/step-8/trainer_state.json").exists());

    let args_b = common(&b);
    let args_b: Vec<&str> = args_b.iter().map(String::as_str).collect();
    let out = Command::new(bin("peft-train"))
        .args(&args_b)
        .env("PEFTKIT_NO_PROGRESS", "1")
        .env("PEFTKIT_STOP_AFTER_STEP", "4")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "stop after step 4: {stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(b.join("checkpoints/step-4/trainer_state.json").exists());
    assert!(!b.join(file).exists(), "an interrupted run wrote {file}");

    let mut resume = args_b.clone();
    resume.extend(["--resume", s(&b)]);
    let out = train(&resume);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "resume failed: {stderr}");
    assert!(stderr.contains("at step 4"), "{stderr}");
    let (fa, fb) = (
        std::fs::read(a.join(file)).unwrap(),
        std::fs::read(b.join(file)).unwrap(),
    );
    assert!(
        fa == fb,
        "{model_name} {method_args:?}: resumed run differs from the straight run (max |Δ| {})",
        max_diff(&a.join(file), &b.join(file))
    );
    // The checkpoint of run A at step 4, given directly, resumes the same way.
    let c = tmp.path().join("c");
    let mut from_a = common(&c);
    from_a.extend(["--resume".into(), s(&a.join("checkpoints/step-4")).into()]);
    train_ok(&from_a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(std::fs::read(c.join(file)).unwrap() == fa);
}

#[test]
fn resume_after_stop_is_bit_identical_lora() {
    resume_case(
        "llama_gqa",
        &["--rank", "4", "--dropout", "0.1", "--target", "all-linear"],
        "adapter_model.safetensors",
    );
}

#[test]
fn resume_after_stop_is_bit_identical_full() {
    resume_case("gpt2", &["--method", "full"], "model.safetensors");
}

/// A real SIGINT: the run saves a checkpoint, says how to continue, exits 130 without writing
/// the adapter, and the checkpoint resumes.
#[test]
fn ctrl_c_saves_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = alpaca_data(tmp.path(), "d.json", 16, |_| 1);
    let m = model("llama_gqa");
    let out_dir = tmp.path().join("out");
    let log = tmp.path().join("log.jsonl");
    let args = [
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--out",
        s(&out_dir),
        "--steps",
        "1000000",
        "--batch",
        "2",
        "--rank",
        "4",
        "--log",
        s(&log),
    ];
    let mut child = Command::new(bin("peft-train"))
        .args(args)
        .env("PEFTKIT_NO_PROGRESS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    // Wait until a few steps are logged (the handler is installed before the first step).
    loop {
        let n = std::fs::read_to_string(&log)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if n >= 3 {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!(
                "peft-train did not log 3 steps: {:?}",
                child.wait_with_output()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t1 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t1.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("peft-train did not stop after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    assert!(!stderr.contains("error:"), "{stderr}");
    assert!(!out_dir.join("adapter_model.safetensors").exists());
    let ckpts: Vec<_> = std::fs::read_dir(out_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ckpts.len(), 1, "{ckpts:?}");
    let step: u64 = ckpts[0].strip_prefix("step-").unwrap().parse().unwrap();
    assert!(step >= 3);
    let logged = step_records(&log).len() as u64;
    assert_eq!(logged, step, "checkpoint step vs logged steps");

    // It resumes (one more step, then stop again via the hook).
    let next = (step + 1).to_string();
    let mut resume = args.to_vec();
    resume.extend(["--resume", s(&out_dir)]);
    let out = Command::new(bin("peft-train"))
        .args(&resume)
        .env("PEFTKIT_NO_PROGRESS", "1")
        .env("PEFTKIT_STOP_AFTER_STEP", &next)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains(&format!("at step {step}")), "{stderr}");
    assert!(out_dir
        .join(format!("checkpoints/step-{next}/trainer_state.json"))
        .exists());
}

// ---------------------------------------------------------------------------------------------
// 3. gradient accumulation

/// `--batch 4 --grad-accum 2` sees the same rows per step as `--batch 8` and normalises by the
/// loss tokens of the whole window, including the short last window of an epoch (10 rows:
/// windows of 8 and 2). Records have very different numbers of loss tokens (1 to 13 repeats),
/// so a per-micro-batch mean would give a different loss.
#[test]
fn grad_accumulation_matches_a_big_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = alpaca_data(
        tmp.path(),
        "d.json",
        10,
        |i| if i % 3 == 0 { 13 } else { 1 },
    );
    let m = model("llama_gqa");
    let go = |name: &str, batch: &str, accum: &str| {
        let out = tmp.path().join(name);
        let log = tmp.path().join(format!("{name}.jsonl"));
        train_ok(&[
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--epochs",
            "2",
            "--batch",
            batch,
            "--grad-accum",
            accum,
            "--lr",
            "1e-3",
            "--seed",
            "11",
            "--rank",
            "4",
            "--schedule",
            "constant",
            "--log",
            s(&log),
        ]);
        (out.join("adapter_model.safetensors"), step_records(&log))
    };
    let (a, la) = go("accum", "4", "2");
    let (b, lb) = go("big", "8", "1");
    assert_eq!(la.len(), 4, "2 epochs of 2 steps: {la:?}");
    assert_eq!(lb.len(), 4);
    for (x, y) in la.iter().zip(&lb) {
        let (x, y) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!((x - y).abs() < 1e-5, "loss {x} vs {y}");
    }
    let d = max_diff(&a, &b);
    assert!(d < 1e-5, "adapters differ by {d}");
    // The short window really is short and the loss differs per step (not vacuous).
    assert!((la[0]["loss"].as_f64().unwrap() - la[1]["loss"].as_f64().unwrap()).abs() > 1e-4);
    assert!(la[1]["tokens"].as_u64().unwrap() - la[0]["tokens"].as_u64().unwrap() > 0);
}

// ---------------------------------------------------------------------------------------------
// 4. packing

#[test]
fn packing_gives_the_same_first_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let data = alpaca_data(tmp.path(), "d.json", 12, |i| 1 + i % 4);
    let m = model("llama_gqa");
    let go = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let log = tmp.path().join(format!("{name}.jsonl"));
        let mut args = vec![
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            "1",
            "--lr",
            "1e-2",
            "--seed",
            "2",
            "--rank",
            "4",
            "--max-len",
            "512",
            "--log",
            s(&log),
        ];
        args.extend(extra);
        train_ok(&args);
        (
            out.join("adapter_model.safetensors"),
            step_records(&log)[0]["loss"].as_f64().unwrap(),
        )
    };
    let (a, la) = go("plain", &["--batch", "12"]);
    let (b, lb) = go("packed", &["--pack", "--batch", "64"]);
    assert!((la - lb).abs() < 1e-5, "loss {la} unpacked vs {lb} packed");
    let d = max_diff(&a, &b);
    assert!(d < 1e-5, "adapters after one step differ by {d}");
}

// ---------------------------------------------------------------------------------------------
// 5. parameter counts

#[test]
fn trainable_params_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = alpaca_data(tmp.path(), "d.json", 4, |_| 1);
    let m = model("llama_gqa");
    let bytes = std::fs::read(m.join("model.safetensors")).unwrap();
    let base: usize = SafeTensors::deserialize(&bytes)
        .unwrap()
        .tensors()
        .iter()
        .map(|(_, t)| t.shape().iter().product::<usize>())
        .sum();
    let stdout = train_ok(&[
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--out",
        s(&tmp.path().join("o")),
        "--rank",
        "4",
        "--target",
        "q_proj,v_proj",
        "--steps",
        "1",
    ]);
    let all = base + 1792;
    let want = format!(
        "trainable params: 1792 || all params: {all} || trainable%: {:.4}",
        100.0 * 1792.0 / all as f64
    );
    assert!(
        stdout.lines().any(|l| l == want),
        "expected {want:?} in stdout:\n{stdout}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. output folders

#[test]
fn lora_output_folder_is_peft_shaped() {
    let tmp = tempfile::tempdir().unwrap();
    let data = alpaca_data(tmp.path(), "d.json", 8, |_| 1);
    let m = model("llama_gqa");
    let out = tmp.path().join("o");
    train_ok(&[
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--rank",
        "4",
        "--alpha",
        "8",
        "--target",
        "q_proj,v_proj",
        "--steps",
        "2",
        "--rslora",
    ]);
    let text = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
    let cfg: Value = serde_json::from_str(&text).unwrap();
    let keys: Vec<&String> = cfg.as_object().unwrap().keys().collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "adapter_config.json keys are not sorted");
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"].as_f64(), Some(8.0));
    assert_eq!(cfg["use_dora"], false);
    assert_eq!(cfg["use_rslora"], true);
    let mut targets: Vec<&str> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    targets.sort();
    assert_eq!(targets, ["q_proj", "v_proj"]);

    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata().as_ref().and_then(|m| m.get("format")),
        Some(&"pt".to_string())
    );
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    assert_eq!(names.len(), 8, "2 layers × q,v × A,B: {names:?}");
    for n in names {
        assert!(n.starts_with("base_model.model.model.layers."), "{n}");
        assert!(
            n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"),
            "{n}"
        );
    }
    // No stray files besides the adapter, its config and the checkpoints.
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "checkpoints"
        ]
    );

    // The adapter loads back (as peft-eval would) and changes the model's output.
    let mut model = Model::load(&m).unwrap();
    let mut state = TrainState::new(model.linears().len());
    lora::load_adapter(&out, &model, &mut state).unwrap();
    lora::install(&mut model, state, 0);
    let ids = [5u32, 17, 40, 3, 99];
    let logits = |adapter| {
        let o = ForwardOptions { adapter };
        let h = model.forward(&[SeqInput { ids: &ids }], None, &o).unwrap();
        model.logits(&h, ids.len(), &o)
    };
    let (with, without) = (logits(Some(0)), logits(None));
    let d = with
        .iter()
        .zip(&without)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(d > 1e-6, "the trained adapter has no effect");
}

/// `--method full` and `--method freeze --trainable last:1,norms` write an HF folder that
/// peft-eval loads, with a lower loss on the training data; freeze leaves the other tensors
/// byte-identical.
#[test]
fn full_and_freeze_write_loadable_models() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path(), 12);
    for name in ["gpt2", "llama_gqa"] {
        let m = model(name);
        let base_loss = eval_loss(&m, &data);
        for (method, extra) in [
            ("full", &[][..]),
            ("freeze", &["--trainable", "last:1,norms"][..]),
        ] {
            let out = tmp.path().join(format!("{name}-{method}"));
            let mut args = vec![
                "--model",
                s(&m),
                "--data",
                s(&data),
                "--out",
                s(&out),
                "--method",
                method,
                "--steps",
                "6",
                "--batch",
                "4",
                "--lr",
                "3e-3",
                "--schedule",
                "constant",
            ];
            args.extend(extra);
            train_ok(&args);
            for f in ["config.json", "model.safetensors", "tokenizer.json"] {
                assert!(out.join(f).exists(), "{name} {method}: no {f}");
            }
            let loss = eval_loss(&out, &data);
            assert!(
                loss < base_loss - 0.05,
                "{name} {method}: eval loss {loss} not below the base's {base_loss}"
            );
            let base_t = raw_tensors(&m.join("model.safetensors"));
            let new_t = raw_tensors(&out.join("model.safetensors"));
            assert_eq!(
                base_t.keys().collect::<Vec<_>>(),
                new_t.keys().collect::<Vec<_>>(),
                "{name} {method}: tensor names differ from the base"
            );
            let (mut same, mut changed) = (Vec::new(), Vec::new());
            for (k, (dt, shape, data)) in &base_t {
                let (dt2, shape2, data2) = &new_t[k];
                assert_eq!((dt, shape), (dt2, shape2), "{name} {method}: {k}");
                if data == data2 {
                    same.push(k.clone());
                } else {
                    changed.push(k.clone());
                }
            }
            if method == "freeze" {
                let last = if name == "gpt2" {
                    "transformer.h.1."
                } else {
                    "model.layers.1."
                };
                let selected = |k: &str| {
                    k.starts_with(last)
                        || k.contains("norm")
                        || k.contains("ln_")
                        || k.starts_with("transformer.ln_f")
                };
                for k in &changed {
                    assert!(selected(k), "{name} freeze: non-selected {k} changed");
                }
                // (That every selected tensor trains is checked by
                // freeze_trains_every_selected_norm.)
                assert!(
                    changed.iter().any(|k| k.starts_with(last)),
                    "{name} freeze: the last block did not train"
                );
            } else {
                assert!(
                    same.is_empty()
                        || same
                            .iter()
                            .all(|k| k.ends_with("attn.bias") || k.ends_with("masked_bias")),
                    "{name} full: untouched tensors {same:?}"
                );
            }
        }
    }
}

/// `--trainable norms` trains every norm, including the input norm of the lowest block (whose
/// gradient flows back through that block's frozen q/k/v projections).
#[test]
fn freeze_trains_every_selected_norm() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path(), 12);
    for name in ["gpt2", "llama_gqa"] {
        let m = model(name);
        let out = tmp.path().join(name);
        train_ok(&[
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--method",
            "freeze",
            "--trainable",
            "norms",
            "--steps",
            "3",
            "--batch",
            "4",
            "--lr",
            "3e-3",
        ]);
        let base_t = raw_tensors(&m.join("model.safetensors"));
        let new_t = raw_tensors(&out.join("model.safetensors"));
        for (k, (_, _, data)) in &base_t {
            let is_norm = k.contains("norm") || k.contains("ln_");
            assert_eq!(
                is_norm,
                data != &new_t[k].2,
                "{name}: {k} (a norm: {is_norm}) changed: {}",
                !is_norm
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 7. evaluation, log, schedule

#[test]
fn eval_log_and_linear_schedule() {
    let tmp = tempfile::tempdir().unwrap();
    let data = alpaca_data(tmp.path(), "d.json", 32, |_| 1);
    let m = model("llama_gqa");
    let log = tmp.path().join("log.jsonl");
    let lr = 2e-2;
    let out = train(&[
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--out",
        s(&tmp.path().join("o")),
        "--rank",
        "8",
        "--target",
        "all-linear",
        "--steps",
        "6",
        "--batch",
        "8",
        "--warmup",
        "2",
        "--schedule",
        "linear",
        "--lr",
        "2e-2",
        "--val-split",
        "0.25",
        "--log",
        s(&log),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("eval loss before training"), "{stderr}");
    assert!(stderr.contains("eval loss after training"), "{stderr}");

    let lines = log_lines(&log);
    let evals: Vec<&Value> = lines
        .iter()
        .filter(|v| v.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals.len(), 2, "{lines:?}");
    assert_eq!(evals[0]["step"], 0);
    assert_eq!(evals[1]["step"], 6);
    let (before, after) = (
        evals[0]["eval_loss"].as_f64().unwrap(),
        evals[1]["eval_loss"].as_f64().unwrap(),
    );
    assert!(after < before, "eval loss {before} → {after}");

    let steps = step_records(&log);
    assert_eq!(steps.len(), 6);
    // transformers' get_linear_schedule_with_warmup(warmup=2, total=6), step index k = 0..5.
    let total = 6.0;
    let warmup = 2.0;
    for (k, v) in steps.iter().enumerate() {
        assert_eq!(v["step"].as_u64(), Some(k as u64 + 1));
        for key in ["loss", "lr", "grad_norm", "tokens_per_second"] {
            assert!(
                v[key].as_f64().is_some_and(f64::is_finite),
                "step {}: {key} missing: {v}",
                k + 1
            );
        }
        let k = k as f64;
        let factor = if k < warmup {
            k / warmup
        } else {
            ((total - k) / (total - warmup)).max(0.0)
        };
        let got = v["lr"].as_f64().unwrap();
        assert!(
            (got - lr * factor).abs() < 1e-6 * lr,
            "step {}: lr {got}, expected {}",
            k + 1.0,
            lr * factor
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 8. bad input

#[test]
fn bad_inputs_fail_cleanly_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("llama_gqa");
    let good = alpaca_data(tmp.path(), "good.json", 6, |_| 1);
    let out = tmp.path().join("out");
    let base = |data: &Path| -> Vec<String> {
        [
            "--model",
            s(&m),
            "--data",
            s(data),
            "--out",
            s(&out),
            "--steps",
            "1",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let go = |args: Vec<String>| train(&args.iter().map(String::as_str).collect::<Vec<_>>());

    // A bad JSON line names its file and line; --skip-bad-lines continues.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"text\": \"one two three\"}\n{\"text\": \"four five\"}\n{\"text\": oops\n{\"text\": \"six seven\"}\n",
    )
    .unwrap();
    let r = go(base(&bad));
    assert_clean_error(&r, "line 3");
    assert_clean_error(&r, "bad.jsonl");
    assert_no_output(&out);
    let mut skip = base(&bad);
    skip.push("--skip-bad-lines".into());
    let r = go(skip);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    assert!(stderr.contains("1 bad lines skipped"), "{stderr}");
    std::fs::remove_dir_all(&out).unwrap();

    // Empty data.
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    assert_clean_error(&go(base(&empty)), "empty.jsonl");
    assert_no_output(&out);

    // Unknown target module: the error lists what there is.
    let mut a = base(&good);
    a.extend(["--target".into(), "nonexistent".into()]);
    let r = go(a);
    assert_clean_error(&r, "nonexistent");
    assert_clean_error(&r, "q_proj");
    assert_no_output(&out);

    // --rank 0.
    let mut a = base(&good);
    a.extend(["--rank".into(), "0".into()]);
    assert_clean_error(&go(a), "--rank");
    assert_no_output(&out);

    // --resume from a folder without a checkpoint.
    let nockpt = tmp.path().join("nockpt");
    std::fs::create_dir(&nockpt).unwrap();
    let mut a = base(&good);
    a.extend(["--resume".into(), s(&nockpt).into()]);
    assert_clean_error(&go(a), "no checkpoint");
    assert_no_output(&out);

    // --out equal to the model folder (a copy, in case the guard fails): nothing is written.
    let mcopy = tmp.path().join("model");
    copy_dir(&m, &mcopy);
    let listing = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = listing(&mcopy);
    let r = train(&[
        "--model",
        s(&mcopy),
        "--data",
        s(&good),
        "--out",
        s(&mcopy),
        "--steps",
        "1",
    ]);
    assert_clean_error(&r, "overwrite");
    assert_eq!(listing(&mcopy), before);
    // ... or equal to the data file.
    let r = train(&[
        "--model",
        s(&m),
        "--data",
        s(&good),
        "--out",
        s(&good),
        "--steps",
        "1",
    ]);
    assert_clean_error(&r, "overwrite");
    assert!(good.is_file());

    // A checkpoint whose shapes disagree with the options.
    let ck = tmp.path().join("ck");
    train_ok(&[
        "--model",
        s(&m),
        "--data",
        s(&good),
        "--out",
        s(&ck),
        "--steps",
        "2",
        "--save-every",
        "1",
        "--rank",
        "4",
    ]);
    let mut a = base(&good);
    a.extend([
        "--rank".into(),
        "8".into(),
        "--resume".into(),
        s(&ck).into(),
    ]);
    let r = go(a);
    assert_clean_error(&r, "same options");
    assert_eq!(r.status.code(), Some(3));
    assert_no_output(&out);
}

// ---------------------------------------------------------------------------------------------
// 9. NaN loss

#[test]
fn nan_loss_stops_with_exit_5_and_keeps_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = alpaca_data(tmp.path(), "d.json", 8, |_| 1);
    let m = model("llama_gqa");
    let out = tmp.path().join("o");
    let args = [
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--method",
        "full",
        "--lr",
        "1e20",
        "--schedule",
        "constant",
        "--steps",
        "20",
        "--save-every",
        "1",
        "--batch",
        "2",
    ];
    let r = train(&args);
    assert_clean_error(&r, "at step");
    assert_eq!(r.status.code(), Some(5));
    let stderr = String::from_utf8_lossy(&r.stderr);
    let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap();
    let step: u64 = line
        .split("at step ")
        .nth(1)
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no step number in {line:?}"));
    assert!(step >= 2, "{line}");
    assert!(!out.join("model.safetensors").exists());
    let last = out.join(format!("checkpoints/step-{}", step - 1));
    assert!(
        last.join("trainer_state.json").exists(),
        "no checkpoint of step {}",
        step - 1
    );
    // The checkpoint loads: the resumed run starts from it and meets the same failure.
    let mut resume = args.to_vec();
    resume.extend(["--resume", s(&out)]);
    let r = train(&resume);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.contains(&format!("at step {}", step - 1)),
        "{stderr}"
    );
    assert_eq!(r.status.code(), Some(5), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// 10. --check-data and --plan

#[test]
fn check_data_and_plan_do_not_train() {
    let tmp = tempfile::tempdir().unwrap();
    let data = alpaca_data(tmp.path(), "d.json", 6, |_| 1);
    let m = model("llama_gqa");
    let out = tmp.path().join("o");
    let r = train(&[
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--check-data",
        "2",
    ]);
    assert!(r.status.success());
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(stdout.contains("Say the number 0."), "{stdout}");
    assert!(stdout.contains("Say the number 1."), "{stdout}");
    assert!(!stdout.contains("Say the number 2."), "{stdout}");
    assert_no_output(&out);

    let r = train(&[
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--plan",
        "--steps",
        "100",
    ]);
    assert!(r.status.success());
    let stdout = String::from_utf8_lossy(&r.stdout);
    for word in ["weights", "activations", "total"] {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(word)),
            "no {word} line in the plan:\n{stdout}"
        );
    }
    assert!(stdout.contains("steps 100"), "{stdout}");
    assert_no_output(&out);
}

// ---------------------------------------------------------------------------------------------
// interop: adapters written by peft-train give PEFT's logits

#[test]
fn our_adapters_give_peft_logits() {
    let root = fixtures().join("interop");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("adapter_config.json").exists())
        .collect();
    dirs.sort();
    // LoRA/DoRA and, for issue 5, the other PEFT methods.
    for case in [
        "llama_gqa_lora",
        "llama_gqa_dora",
        "llama_gqa_ia3",
        "llama_gqa_prefix",
        "llama_gqa_ptuning_v2",
        "llama_gqa_prompt",
        "llama_gqa_prompt_text",
        "llama_gqa_prompt_sample_vocab",
    ] {
        assert!(
            dirs.contains(&root.join(case)),
            "interop fixture {case} missing: {dirs:?}"
        );
    }
    for dir in dirs {
        let meta: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("logits.json")).unwrap())
                .unwrap();
        let name = meta["model"].as_str().unwrap();
        let tol = meta["tolerance"].as_f64().unwrap() as f32;
        // Prompt tuning: PEFT's logits start with one row per virtual token.
        let skip = meta["virtual_token_rows"].as_u64().unwrap_or(0) as usize;
        let mut model = Model::load(&model(name)).unwrap();
        // What peft-eval and peft-generate do: dispatch on peft_type.
        lora::load_for_inference(&mut model, &dir, 0).unwrap();
        let want = tensors(&dir.join("logits.safetensors"));
        let vocab = model.config.vocab;
        let opts = ForwardOptions { adapter: Some(0) };
        for (i, seq) in meta["input_ids"].as_array().unwrap().iter().enumerate() {
            let ids: Vec<u32> = seq
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let hidden = model
                .forward(&[SeqInput { ids: &ids }], None, &opts)
                .unwrap();
            let logits = model.logits(&hidden, ids.len(), &opts);
            let (shape, w) = &want[&format!("logits.{i}")];
            assert_eq!(shape, &[skip + ids.len(), vocab], "{}", dir.display());
            assert_eq!(logits.len(), ids.len() * vocab);
            let err = logits
                .iter()
                .zip(&w[skip * vocab..])
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            eprintln!("{}: seq {i}: max |Δ logit| {err:e}", dir.display());
            assert!(
                err <= tol,
                "{}: seq {i}: max |Δ logit| {err}",
                dir.display()
            );
        }
    }
}

/// `--prompt-init sample-vocab` (PEFT's `SAMPLE_VOCAB`): the virtual tokens start as exact
/// rows of the input embedding matrix (with `--lr 0` the one step leaves them as initialized),
/// and adapter_config.json says so; `--prompt-init-text` only goes with `text`.
#[test]
fn prompt_init_sample_vocab_copies_embedding_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let data = alpaca_data(tmp.path(), "a.json", 8, |_| 1);
    let m = model("llama_gqa");
    let out = tmp.path().join("sv");
    let base = |out: &Path| -> Vec<String> {
        [
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(out),
            "--method",
            "prompt",
            "--num-virtual-tokens",
            "6",
            "--steps",
            "1",
            "--batch",
            "2",
            "--lr",
            "0",
            "-q",
        ]
        .map(String::from)
        .to_vec()
    };
    let args = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut a = base(out);
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let go = |a: &[String]| train(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let ok = go(&args(&out, &["--prompt-init", "sample-vocab"]));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["prompt_tuning_init"], "SAMPLE_VOCAB");
    assert_eq!(cfg["prompt_tuning_init_text"], Value::Null);
    assert_eq!(cfg["tokenizer_name_or_path"], Value::Null);
    let (shape, emb) = &tensors(&out.join("adapter_model.safetensors"))["prompt_embeddings"];
    let base_model = Model::load(&m).unwrap();
    let h = base_model.config.hidden;
    assert_eq!(shape, &[6, h]);
    let rows: Vec<&[f32]> = base_model.embed.chunks(h).collect();
    let ids: Vec<usize> = emb
        .chunks(h)
        .map(|v| {
            rows.iter()
                .position(|r| *r == v)
                .unwrap_or_else(|| panic!("virtual token {v:?} is no embedding row"))
        })
        .collect();
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert!(
        distinct.len() > 1,
        "one id drawn {} times: {ids:?}",
        ids.len()
    );
    // The default stays RANDOM; --prompt-init-text implies TEXT; mixing them is a usage error.
    let r = go(&args(&tmp.path().join("r"), &[]));
    assert!(r.status.success());
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("r").join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["prompt_tuning_init"], "RANDOM");
    let bad = tmp.path().join("bad");
    let r = go(&args(
        &bad,
        &["--prompt-init", "sample-vocab", "--prompt-init-text", "hi"],
    ));
    assert_clean_error(&r, "--prompt-init-text");
    assert_eq!(r.status.code(), Some(2));
    assert_clean_error(
        &go(&args(&bad, &["--prompt-init", "text"])),
        "--prompt-init-text",
    );
    assert_clean_error(
        &go(&args(&bad, &["--prompt-init", "vocab"])),
        "sample-vocab",
    );
    assert!(!bad.exists());
}

/// `--config FILE` supplies options with the long options' names; the command line wins.
#[test]
fn config_file_options_and_command_line_override() {
    let tmp = tempfile::tempdir().unwrap();
    let data = alpaca_data(tmp.path(), "a.json", 8, |_| 1);
    let cfg = tmp.path().join("run.json");
    std::fs::write(
        &cfg,
        r#"{"rank": 2, "alpha": 4, "target": ["q_proj", "k_proj"], "rslora": true, "steps": 1, "batch": 4, "quiet": true}"#,
    )
    .unwrap();
    let read_cfg = |out: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    let out1 = tmp.path().join("o1");
    let m = model("llama_gqa");
    train_ok(&[
        "--config",
        s(&cfg),
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--out",
        s(&out1),
    ]);
    let c = read_cfg(&out1);
    assert_eq!(c["r"], 2);
    assert_eq!(c["use_rslora"], true);
    assert_eq!(c["target_modules"], json!(["q_proj", "k_proj"]));
    let out2 = tmp.path().join("o2");
    train_ok(&[
        "--config",
        s(&cfg),
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--out",
        s(&out2),
        "--rank",
        "3",
    ]);
    assert_eq!(read_cfg(&out2)["r"], 3);
    // A config that is not a JSON object is a clean error naming the file.
    std::fs::write(&cfg, "[1, 2]").unwrap();
    let out = train(&[
        "--config",
        s(&cfg),
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--out",
        s(&out2),
    ]);
    peftkit_tests::assert_clean_error(&out, "run.json: expected a JSON object");
}

/// A checkpoint write that fails (file-size limit, as on a full disk) stops the run with one
/// error line and leaves the previous checkpoint whole and resumable, with no partial folder.
#[test]
fn failed_checkpoint_write_keeps_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = alpaca_data(tmp.path(), "a.json", 8, |_| 1);
    let out = tmp.path().join("out");
    let m = model("llama_gqa");
    let common = [
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--save-every",
        "1",
        "--quiet",
    ];
    let mut first = common.to_vec();
    first.extend(["--steps", "2"]);
    train_ok(&first);
    let ck = out.join("checkpoints");
    let before = std::fs::read(ck.join("step-2").join("params.safetensors")).unwrap();
    // RLIMIT_FSIZE of 4 KiB with SIGXFSZ ignored: writes past it fail with EFBIG.
    let bin = peftkit_tests::bin("peft-train");
    let mut cmd = format!("trap '' XFSZ; ulimit -f 4; exec {}", bin.display());
    for a in common
        .iter()
        .chain(["--steps", "4", "--resume", s(&out)].iter())
    {
        cmd.push_str(&format!(" '{a}'"));
    }
    let res = std::process::Command::new("bash")
        .args(["-c", &cmd])
        .env("PEFTKIT_NO_PROGRESS", "1")
        .output()
        .unwrap();
    peftkit_tests::assert_clean_error(&res, "checkpoints/step-3");
    let names: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| n.starts_with("step-")),
        "partial files left: {names:?}"
    );
    assert!(!ck.join("step-3").exists());
    assert_eq!(
        std::fs::read(ck.join("step-2").join("params.safetensors")).unwrap(),
        before
    );
    // ... and the run continues from it once the disk has room again.
    let mut again = common.to_vec();
    again.extend(["--steps", "4", "--resume", s(&out)]);
    train_ok(&again);
    assert!(out.join("adapter_model.safetensors").exists());
}

//! Crash safety and reproducibility of the training loops (docs/reliability-kill.md).
//!
//! - Kill and resume: peft-train (LoRA with dropout and evaluation; full fine-tuning), rm-train,
//!   dpo-train and ppo-train each run once straight through, then again with SIGKILL at
//!   pseudo-random moments (a seeded generator picks them: after a random delay, the moment a
//!   checkpoint's temporary folder appears, the moment a step's log record is written, or once
//!   the final checkpoint exists while the output is written) and `--resume OUT` after every
//!   kill until the run finishes. After every kill, every checkpoint visible under its final
//!   name must be complete and loadable and the metrics log must hold whole lines only; at the
//!   end the outputs, the last checkpoints and every log record (timings aside) must equal the
//!   straight run's byte for byte, and no temporary file may be left behind.
//! - Same seed twice: every trainer writes bit-identical outputs, and the same with `--threads 1`
//!   or `--threads 3`.
//!
//! The tools must be built first: `cargo build --release --bins` (make test does).

use peftkit_core::io::safetensors_file::{to_f32, SafetensorsFile};
use peftkit_tests::{bin, fixtures};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn llama() -> PathBuf {
    fixtures().join("models").join("llama_gqa")
}

/// splitmix64: the test's own seeded generator (kill moments are reproducible per seed).
struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in lo..=hi.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// `n` alpaca records whose outputs vary in length.
fn alpaca_data(dir: &Path, n: usize) -> PathBuf {
    let recs: Vec<Value> = (0..n)
        .map(|i| {
            let out = vec![format!("The number is {i}."); 1 + i % 3].join(" ");
            json!({"instruction": format!("Say the number {i}."), "input": "", "output": out})
        })
        .collect();
    let p = dir.join("alpaca.json");
    std::fs::write(&p, serde_json::to_string(&recs).unwrap()).unwrap();
    p
}

fn prompts(dir: &Path) -> PathBuf {
    let p = dir.join("prompts.jsonl");
    let mut lines = String::new();
    for _ in 0..4 {
        for t in [
            "apple river stone:",
            "quick slow table:",
            "music light cloud:",
        ] {
            lines += &json!({ "prompt": t }).to_string();
            lines.push('\n');
        }
    }
    std::fs::write(&p, lines).unwrap();
    p
}

/// One training configuration: the tool, its arguments (without --out/--log/--resume), the
/// files of its output folder, and how many steps it runs.
struct Job {
    name: &'static str,
    tool: &'static str,
    args: Vec<String>,
    outputs: &'static [&'static str],
    steps: u64,
}

fn job(name: &'static str, dir: &Path) -> Job {
    let m = llama();
    let strings = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let pairs = fixtures().join("preference/interop/pairs.jsonl");
    let adapter: &'static [&'static str] = &["adapter_model.safetensors", "adapter_config.json"];
    match name {
        // LoRA with dropout (the RNG state must resume), a held-out split with periodic
        // evaluation, accumulation and an epoch boundary inside the run.
        "peft-lora" => {
            let data = alpaca_data(dir, 12);
            Job {
                name,
                tool: "peft-train",
                args: strings(&[
                    "--model",
                    s(&m),
                    "--data",
                    s(&data),
                    "--method",
                    "lora",
                    "--dropout",
                    "0.1",
                    "--target",
                    "all-linear",
                    "--steps",
                    "14",
                    "--batch",
                    "2",
                    "--grad-accum",
                    "2",
                    "--lr",
                    "1e-2",
                    "--warmup",
                    "2",
                    "--val-split",
                    "0.2",
                    "--eval-every",
                    "4",
                    "--save-every",
                    "1",
                    "--seed",
                    "7",
                ]),
                outputs: adapter,
                steps: 14,
            }
        }
        // Full fine-tuning: the largest checkpoints (every weight and both moments), saved
        // every other step so that a resume repeats up to two steps.
        "peft-full" => {
            let data = alpaca_data(dir, 10);
            Job {
                name,
                tool: "peft-train",
                args: strings(&[
                    "--model",
                    s(&m),
                    "--data",
                    s(&data),
                    "--method",
                    "full",
                    "--steps",
                    "12",
                    "--batch",
                    "2",
                    "--lr",
                    "1e-3",
                    "--save-every",
                    "2",
                    "--seed",
                    "3",
                ]),
                outputs: &["model.safetensors", "config.json"],
                steps: 12,
            }
        }
        "rm" => Job {
            name,
            tool: "rm-train",
            args: strings(&[
                "--model",
                s(&m),
                "--data",
                s(&pairs),
                "--steps",
                "14",
                "--batch",
                "4",
                "--lr",
                "3e-3",
                "--val-split",
                "0.2",
                "--eval-every",
                "5",
                "--save-every",
                "1",
                "--seed",
                "11",
            ]),
            outputs: adapter,
            steps: 14,
        },
        "dpo" => Job {
            name,
            tool: "dpo-train",
            args: strings(&[
                "--model",
                s(&m),
                "--data",
                s(&pairs),
                "--steps",
                "12",
                "--batch",
                "4",
                "--grad-accum",
                "2",
                "--lr",
                "3e-3",
                "--save-every",
                "1",
                "--seed",
                "13",
            ]),
            outputs: adapter,
            steps: 12,
        },
        // GRPO: the sampling RNG, the optimizer over several iterations per batch and the
        // KL to the reference must all resume.
        "grpo" => {
            let p = prompts(dir);
            Job {
                name,
                tool: "grpo-train",
                args: strings(&[
                    "--model",
                    s(&m),
                    "--prompts",
                    s(&p),
                    "--reward",
                    "regex: the",
                    "--reward",
                    "answer:answer",
                    "--steps",
                    "12",
                    "--batch",
                    "2",
                    "--num-generations",
                    "4",
                    "--max-completion-length",
                    "6",
                    "--beta",
                    "0.04",
                    "--num-iterations",
                    "2",
                    "--eval-prompts",
                    "2",
                    "--lr",
                    "3e-3",
                    "--save-every",
                    "1",
                    "--seed",
                    "19",
                ]),
                outputs: adapter,
                steps: 12,
            }
        }
        // PPO: sampling RNG, adaptive KL coefficient and the value head must all resume.
        "ppo" => {
            let p = prompts(dir);
            let rm = fixtures().join("preference/interop/adapter");
            Job {
                name,
                tool: "ppo-train",
                args: strings(&[
                    "--model",
                    s(&m),
                    "--reward-model",
                    s(&rm),
                    "--prompts",
                    s(&p),
                    "--steps",
                    "12",
                    "--batch",
                    "4",
                    "--mini-batches",
                    "2",
                    "--ppo-epochs",
                    "2",
                    "--response-length",
                    "6",
                    "--adaptive-kl",
                    "--kl-target",
                    "0.5",
                    "--kl-horizon",
                    "20",
                    "--eval-prompts",
                    "2",
                    "--lr",
                    "3e-3",
                    "--save-every",
                    "1",
                    "--seed",
                    "17",
                ]),
                outputs: &[
                    "adapter_model.safetensors",
                    "adapter_config.json",
                    "value_head.safetensors",
                ],
                steps: 12,
            }
        }
        _ => unreachable!("{name}"),
    }
}

impl Job {
    fn command(&self, out: &Path, resume: bool, extra: &[&str]) -> Command {
        let mut c = Command::new(bin(self.tool));
        c.args(&self.args)
            .args([
                "--out",
                s(out),
                "--log",
                s(&out.with_extension("jsonl")),
                "--quiet",
            ])
            .args(extra)
            .env("PEFTKIT_NO_PROGRESS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if resume {
            c.args(["--resume", s(out)]);
        }
        c
    }

    /// Run to completion; panics with stderr on failure. Returns the wall time.
    fn run(&self, out: &Path, extra: &[&str]) -> Duration {
        let t = Instant::now();
        let r = self
            .command(out, false, extra)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "{} failed: {}",
            self.name,
            String::from_utf8_lossy(&r.stderr)
        );
        t.elapsed()
    }
}

// ---------------------------------------------------------------------------------------------
// what a kill may leave behind

/// Every `step-N` folder under OUT/checkpoints is complete: the three files, a trainer state
/// for step N, and both safetensors files valid with the tensors of `names` (and their two
/// moments each). Hidden `.peftkit-*` entries (a killed write in progress) are counted, not
/// read. Returns (complete checkpoints, hidden entries).
fn check_checkpoints(out: &Path, names: &BTreeSet<String>, what: &str) -> (usize, usize) {
    let dir = out.join("checkpoints");
    let (mut complete, mut hidden) = (0, 0);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return (0, 0);
    };
    for e in rd {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".peftkit-") {
            hidden += 1;
            continue;
        }
        let n: u64 = name
            .strip_prefix("step-")
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("{what}: unexpected entry {name} in checkpoints/"));
        let p = e.path();
        let files: BTreeSet<String> = std::fs::read_dir(&p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let expected: BTreeSet<String> = [
            "optimizer.safetensors",
            "params.safetensors",
            "trainer_state.json",
        ]
        .map(String::from)
        .into();
        assert_eq!(files, expected, "{what}: {name} is incomplete");
        let st: Value =
            serde_json::from_str(&std::fs::read_to_string(p.join("trainer_state.json")).unwrap())
                .unwrap_or_else(|e| panic!("{what}: {name}/trainer_state.json: {e}"));
        assert_eq!(st["step"], n, "{what}: {name}/trainer_state.json");
        let tensors = |f: &str| -> BTreeSet<String> {
            let f = SafetensorsFile::open(&p.join(f))
                .unwrap_or_else(|e| panic!("{what}: {name}/{f}: {e}"));
            for n in f.names() {
                let v = to_f32(&n, &f.get(&n).unwrap()).unwrap();
                assert!(v.iter().all(|x| x.is_finite()), "{what}: {name}: {n}");
            }
            f.names().into_iter().collect()
        };
        assert_eq!(&tensors("params.safetensors"), names, "{what}: {name}");
        let moments: BTreeSet<String> = names
            .iter()
            .flat_map(|n| [format!("{n}.exp_avg"), format!("{n}.exp_avg_sq")])
            .collect();
        assert_eq!(tensors("optimizer.safetensors"), moments, "{what}: {name}");
        complete += 1;
    }
    (complete, hidden)
}

/// The output files present under their final names are whole (safetensors valid, JSON
/// parses).
fn check_outputs(out: &Path, job: &Job, what: &str) {
    for f in job.outputs {
        let p = out.join(f);
        if !p.exists() {
            continue;
        }
        if f.ends_with(".safetensors") {
            SafetensorsFile::open(&p).unwrap_or_else(|e| panic!("{what}: {f}: {e}"));
        } else {
            let text = std::fs::read_to_string(&p).unwrap();
            serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{what}: {f}: {e}"));
        }
    }
}

/// Records of a JSON Lines log; every line must be whole JSON and the file must end with a
/// newline (a kill between two records never leaves half of one).
fn log_records(p: &Path, what: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{what}: {} ends in a partial line: {:?}",
        p.display(),
        text.lines().last()
    );
    text.lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{what}: {}: bad line {l:?}: {e}", p.display()))
        })
        .collect()
}

/// Fields that measure time (they differ between any two runs).
const TIMINGS: &[&str] = &[
    "tokens_per_second",
    "gflops",
    "mfu",
    "rollout_tokens_per_second",
    "update_tokens_per_second",
    "rollout_seconds",
    "update_seconds",
];

/// A log record without its timings, keyed by (step, kind of record).
fn keyed(v: &Value) -> (String, Value) {
    let mut v = v.clone();
    for t in TIMINGS {
        v.as_object_mut().unwrap().remove(*t);
    }
    let kind = ["data", "eval_loss", "eval_score", "loss", "score_mean"]
        .iter()
        .find(|k| v.get(**k).is_some())
        .copied()
        .unwrap_or("?");
    (
        format!("{}:{kind}", v.get("step").cloned().unwrap_or(json!(-1))),
        v,
    )
}

fn hidden_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".peftkit-"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// kill and resume

/// When the next kill comes.
#[derive(Debug, Clone, Copy)]
enum Moment {
    /// This long after the start (loading the model and data, or a resume's first step).
    Startup(Duration),
    /// As soon as the n-th checkpoint's temporary folder appears (a checkpoint being
    /// written).
    CheckpointWrite(usize),
    /// This long after the log got n more step records: between a step's record and its
    /// checkpoint, or anywhere in the next step.
    AfterRecord(usize, Duration),
    /// As soon as the final checkpoint is there: during evaluation and the output writes.
    Final,
}

/// Start the job (resuming when a checkpoint exists) and kill it at `moment`. Returns the
/// exit status when it finished first, None when it was killed.
fn run_until(job: &Job, out: &Path, moment: Moment) -> Option<ExitStatus> {
    let resume = !check_checkpoints_names(out).is_empty();
    let err = out.with_extension("stderr");
    let mut child = job
        .command(out, resume, &[])
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let log = out.with_extension("jsonl");
    let count_steps = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"loss\"") || l.contains("\"score_mean\""))
            .count()
    };
    let steps0 = count_steps();
    let t0 = Instant::now();
    let mut seen = BTreeSet::new();
    let mut recorded: Option<Instant> = None;
    let final_ckpt = out.join("checkpoints").join(format!("step-{}", job.steps));
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            if !st.success() {
                panic!(
                    "{} exited with {st} (resume: {resume}): {}",
                    job.name,
                    std::fs::read_to_string(&err).unwrap_or_default()
                );
            }
            return Some(st);
        }
        let fire = match moment {
            Moment::Startup(d) => t0.elapsed() >= d,
            Moment::CheckpointWrite(n) => {
                for name in hidden_entries(&out.join("checkpoints")) {
                    if name.starts_with(".peftkit-tmp-") {
                        seen.insert(name);
                    }
                }
                seen.len() >= n
            }
            Moment::AfterRecord(n, d) => match recorded {
                Some(t) => t.elapsed() >= d,
                None => {
                    if count_steps() >= steps0 + n {
                        recorded = Some(Instant::now());
                    }
                    d.is_zero() && recorded.is_some()
                }
            },
            Moment::Final => final_ckpt.exists(),
        };
        if fire {
            child.kill().unwrap(); // SIGKILL
            let st = child.wait().unwrap();
            // It may have exited on its own between the poll and the kill.
            return st.success().then_some(st);
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn check_checkpoints_names(out: &Path) -> Vec<String> {
    std::fs::read_dir(out.join("checkpoints"))
        .into_iter()
        .flatten()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect()
}

/// The uninterrupted run, then the same run killed `kills` times at seeded moments and
/// resumed each time; returns the number of kills that landed.
fn kill_and_resume(name: &'static str, kills: usize, seed: u64) -> usize {
    let tmp = tempfile::tempdir().unwrap();
    let job = job(name, tmp.path());
    let reference = tmp.path().join("reference");
    let took = job.run(&reference, &[]);
    let ref_ckpts = check_checkpoints_names(&reference);
    let names: BTreeSet<String> = SafetensorsFile::open(
        &reference
            .join("checkpoints")
            .join(format!("step-{}", job.steps))
            .join("params.safetensors"),
    )
    .unwrap()
    .names()
    .into_iter()
    .collect();

    let out = tmp.path().join("killed");
    let save_every: u64 = job
        .args
        .iter()
        .position(|a| a == "--save-every")
        .map(|i| job.args[i + 1].parse().unwrap())
        .unwrap();
    let mut rand = Rand(seed);
    let mut landed = 0;
    // kills that left a checkpoint write (or deletion) unfinished
    let mut in_write = 0;
    let mut moments = Vec::new();
    let mut finished = false;
    for k in 0..kills {
        let done = check_checkpoints_names(&out)
            .iter()
            .filter_map(|n| n.strip_prefix("step-")?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        let left = job.steps - done;
        // Every moment lands before the run can finish: a step record it waits for is
        // followed by at least one more step, and a checkpoint is written after every step
        // it waits for.
        let moment = if k + 1 == kills || left == 0 {
            Moment::Final
        } else {
            match rand.range(0, 9) {
                0..=1 => Moment::Startup(Duration::from_millis(rand.range(0, 40))),
                2..=5 => {
                    let saves = left.div_ceil(save_every);
                    Moment::CheckpointWrite(rand.range(1, saves.min(3)) as usize)
                }
                // After the last step's record only the final checkpoint and the outputs
                // are left, which can take less than the delay: the run would finish before
                // the kill. So a record kill waits for an earlier step's record, and with one
                // step left the kill comes during a checkpoint write instead.
                _ if left == 1 => Moment::CheckpointWrite(1),
                _ => {
                    // within half a step's time (the straight run's average, start-up
                    // included, overestimates it)
                    let us = took.as_micros() as u64 / job.steps / 2;
                    Moment::AfterRecord(
                        rand.range(1, (left - 1).min(3)) as usize,
                        Duration::from_micros(rand.range(0, us)),
                    )
                }
            }
        };
        moments.push(moment);
        let what = format!("{name} after kill {} ({moment:?})", k + 1);
        let before: BTreeSet<String> = hidden_entries(&out.join("checkpoints"))
            .into_iter()
            .collect();
        if run_until(&job, &out, moment).is_some() {
            finished = true;
            break;
        }
        landed += 1;
        check_checkpoints(&out, &names, &what);
        in_write += usize::from(
            hidden_entries(&out.join("checkpoints"))
                .iter()
                .any(|n| !before.contains(n)),
        );
        check_outputs(&out, &job, &what);
        log_records(&out.with_extension("jsonl"), &what);
    }
    if !finished {
        // the last resume, uninterrupted
        let resume = !check_checkpoints_names(&out).is_empty();
        let r = job
            .command(&out, resume, &[])
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "{name}: final resume failed: {}",
            String::from_utf8_lossy(&r.stderr)
        );
    }
    let what = format!("{name} (kills: {moments:?})");

    // the outputs, byte for byte
    for f in job.outputs {
        assert!(
            std::fs::read(reference.join(f)).unwrap() == std::fs::read(out.join(f)).unwrap(),
            "{what}: {f} differs from the uninterrupted run"
        );
    }
    // the checkpoints left at the end are the same ones, byte for byte
    let mut got = check_checkpoints_names(&out);
    got.sort();
    let mut want = ref_ckpts.clone();
    want.sort();
    assert_eq!(got, want, "{what}: checkpoints left");
    for c in &want {
        for f in [
            "params.safetensors",
            "optimizer.safetensors",
            "trainer_state.json",
        ] {
            let p = Path::new("checkpoints").join(c).join(f);
            assert!(
                std::fs::read(reference.join(&p)).unwrap() == std::fs::read(out.join(&p)).unwrap(),
                "{what}: {} differs",
                p.display()
            );
        }
    }
    check_checkpoints(&out, &names, &what);
    // no temporary files left behind by the killed processes
    assert_eq!(hidden_entries(&out), Vec::<String>::new(), "{what}: in OUT");
    assert_eq!(
        hidden_entries(&out.join("checkpoints")),
        Vec::<String>::new(),
        "{what}: in OUT/checkpoints"
    );
    // Every record of the resumed log (it repeats the steps after the checkpoint a run
    // resumed from) equals the straight run's record of that step, timings aside, and every
    // record of the straight run is there.
    let want: BTreeMap<String, Value> = log_records(&reference.with_extension("jsonl"), &what)
        .iter()
        .map(keyed)
        .collect();
    let got = log_records(&out.with_extension("jsonl"), &what);
    let mut seen = BTreeSet::new();
    for v in &got {
        let (k, v) = keyed(v);
        assert_eq!(want.get(&k), Some(&v), "{what}: log record {k}");
        seen.insert(k);
    }
    assert_eq!(
        seen,
        want.keys().cloned().collect::<BTreeSet<_>>(),
        "{what}: log records"
    );
    eprintln!(
        "{name}: {landed} kills, {in_write} of them during a checkpoint write ({} log lines for {} records): {moments:?}",
        got.len(),
        want.len()
    );
    landed
}

#[test]
fn peft_train_lora_survives_kills() {
    let n = kill_and_resume("peft-lora", 10, 1);
    assert!(n >= 8, "only {n} kills landed");
}

#[test]
fn peft_train_full_survives_kills() {
    let n = kill_and_resume("peft-full", 7, 2);
    assert!(n >= 5, "only {n} kills landed");
}

#[test]
fn rm_train_survives_kills() {
    let n = kill_and_resume("rm", 8, 3);
    assert!(n >= 6, "only {n} kills landed");
}

#[test]
fn dpo_train_survives_kills() {
    let n = kill_and_resume("dpo", 7, 4);
    assert!(n >= 5, "only {n} kills landed");
}

#[test]
fn grpo_train_survives_kills() {
    let n = kill_and_resume("grpo", 10, 6);
    assert!(n >= 8, "only {n} kills landed");
}

#[test]
fn ppo_train_survives_kills() {
    let n = kill_and_resume("ppo", 10, 5);
    assert!(n >= 8, "only {n} kills landed");
}

// ---------------------------------------------------------------------------------------------
// same seed twice

/// Every trainer, run twice with the same arguments, writes the same bytes, also with one or
/// three threads instead of the default (one per core).
#[test]
fn same_seed_twice_and_any_thread_count_are_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let m = llama();
    let mut jobs: Vec<Job> = ["peft-lora", "peft-full", "rm", "dpo", "ppo", "grpo"]
        .iter()
        .map(|n| job(n, tmp.path()))
        .collect();
    // IA3 too
    let mut ia3 = job("peft-lora", tmp.path());
    ia3.name = "peft-ia3";
    let data = alpaca_data(tmp.path(), 12);
    ia3.args = [
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--method",
        "ia3",
        "--steps",
        "6",
        "--batch",
        "3",
        "--lr",
        "3e-2",
        "--seed",
        "9",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    jobs.push(ia3);
    for j in &jobs {
        let (a, b) = (
            tmp.path().join(format!("{}-a", j.name)),
            tmp.path().join(format!("{}-b", j.name)),
        );
        j.run(&a, &[]);
        j.run(&b, &[]);
        // and with other thread counts (docs/reliability-kill.md: the reductions do not
        // depend on how the work is split)
        let (t1, t3) = (
            tmp.path().join(format!("{}-t1", j.name)),
            tmp.path().join(format!("{}-t3", j.name)),
        );
        j.run(&t1, &["--threads", "1"]);
        j.run(&t3, &["--threads", "3"]);
        for f in j.outputs {
            let want = std::fs::read(a.join(f)).unwrap();
            assert!(
                want == std::fs::read(b.join(f)).unwrap(),
                "{}: {f} differs between two runs with the same seed",
                j.name
            );
            for (t, dir) in [(1, &t1), (3, &t3)] {
                assert!(
                    want == std::fs::read(dir.join(f)).unwrap(),
                    "{}: {f} differs with --threads {t}",
                    j.name
                );
            }
        }
        let la: Vec<(String, Value)> = log_records(&a.with_extension("jsonl"), j.name)
            .iter()
            .map(keyed)
            .collect();
        let lb: Vec<(String, Value)> = log_records(&b.with_extension("jsonl"), j.name)
            .iter()
            .map(keyed)
            .collect();
        assert_eq!(la, lb, "{}: logs differ", j.name);
    }
}

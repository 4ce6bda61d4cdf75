//! Data-parallel training (docs/distributed.md).
//!
//! - The collectives: the in-process communicator (2–4 threads) sums, broadcasts and waits
//!   correctly, every rank gets the same bits, and they are the bits of the TCP communicator
//!   (both add in rank order); gradients of a `TrainState` are summed with the statistics.
//! - peft-train started as a torchrun job (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) with 2
//!   and 3 processes writes the adapter of the single-process run with the same global batch
//!   (within 1e-5); only rank 0 writes and prints; a distributed run interrupted and resumed
//!   equals the straight distributed run bit for bit (with dropout, whose streams are per rank).
//! - rm-train and dpo-train as 2-process jobs match their single-process runs the same way
//!   (adapters, step losses and token counts, sharded evaluation); an interrupted distributed
//!   dpo-train run resumes to the straight one bit for bit.
//! - grpo-train as 2- and 3-process jobs samples, scores and evaluates exactly what one process
//!   does and writes its adapter to rounding; an interrupted run resumes bit for bit.
//! - ppo-train as 2- and 3-process jobs (whole micro-batches per rank) samples the single
//!   process's responses, logs its scores, KLs and losses and writes its adapter and value head
//!   to rounding; an interrupted run (adaptive KL) resumes bit for bit.
//! - Bad launches fail on every rank with one clean error line: bad variables, no rank 0 at
//!   MASTER_ADDR:MASTER_PORT, ranks that do not run the same job.
//!
//! The tools must be built first: `cargo build --release --bins` (make test does).

use peftkit_core::dist::{self, Communicator, DistEnv, InProcess, Tcp};
use peftkit_core::train::params::{ParamState, Slot, TrainState};
use peftkit_tests::{assert_clean_error, bin, fixtures, read_tensors};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Collectives

/// Rank `r`'s test values: magnitudes that make the summation order visible in f32. Element
/// 0 is 1, 1e8, −1e8, 0, … on ranks 0, 1, 2, 3…: in rank order (1 + 1e8) − 1e8 = 0 in f32,
/// in any order that adds 1e8 − 1e8 first it is 1.
fn values(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            if i == 0 {
                return [1.0, 1e8, -1e8, 0.0][rank.min(3)];
            }
            let x = ((i * 7 + rank * 13) % 11) as f32 - 5.0;
            match (i + rank) % 3 {
                0 => x * 1e8,
                1 => x * 1e-3,
                _ => x + 0.1 * rank as f32,
            }
        })
        .collect()
}

/// Run `f` on every item (a rank's communicator), one thread each; results in order.
fn on_ranks<C, T>(comms: Vec<C>, f: impl Fn(C) -> T + Send + Sync + 'static) -> Vec<T>
where
    C: Send + 'static,
    T: Send + 'static,
{
    let f = Arc::new(f);
    let handles: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || f(c))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `world` TCP ranks over loopback, connected from threads.
fn tcp_group(world: usize) -> Vec<Tcp> {
    let port = free_port();
    on_ranks((0..world).collect(), move |rank| {
        let env = DistEnv {
            rank,
            world,
            local_rank: 0,
            master_addr: Some("127.0.0.1".into()),
            master_port: Some(port),
            port_from: "MASTER_PORT",
        };
        Tcp::connect(&env, Duration::from_secs(30)).unwrap()
    })
}

/// The sums every rank must return: rank 0's values plus rank 1's plus … in that order.
fn rank_order_sum(world: usize, n: usize) -> Vec<f32> {
    let mut acc = values(0, n);
    for r in 1..world {
        for (a, v) in acc.iter_mut().zip(values(r, n)) {
            *a += v;
        }
    }
    acc
}

#[test]
fn in_process_collectives_are_exact_and_identical_on_every_rank() {
    for world in 2..=4 {
        let n = 1000;
        let arrived = Arc::new(AtomicUsize::new(0));
        let a = arrived.clone();
        let results = on_ranks(InProcess::group(world), move |mut c| {
            let r = c.rank();
            assert_eq!(c.world(), world);
            let mut v = values(r, n);
            c.all_reduce_sum(&mut v).unwrap();
            let mut d = vec![r as f64 * 0.25, 1.0, 1e16];
            c.all_reduce_sum_f64(&mut d).unwrap();
            // Every root, payloads of different lengths.
            let mut got = Vec::new();
            for root in 0..world {
                let mut b = if r == root {
                    vec![root as u8; root + 1]
                } else {
                    vec![9; 7]
                };
                c.broadcast(root, &mut b).unwrap();
                got.push(b);
            }
            // Nobody leaves the barrier before everyone arrived.
            a.fetch_add(1, Ordering::SeqCst);
            c.barrier().unwrap();
            let seen = a.load(Ordering::SeqCst);
            // A second round of the same collective reuses the shared slots.
            let mut v2 = values(r, 10);
            c.all_reduce_sum(&mut v2).unwrap();
            (v, d, got, seen, v2)
        });
        let want = rank_order_sum(world, n);
        for (r, (v, d, got, seen, v2)) in results.iter().enumerate() {
            let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(v), bits(&want), "world {world} rank {r}");
            assert_eq!(bits(v2), bits(&rank_order_sum(world, 10)));
            let tri = (0..world).map(|k| k as f64 * 0.25).sum::<f64>();
            assert_eq!(d, &vec![tri, world as f64, 1e16 * world as f64]);
            for (root, b) in got.iter().enumerate() {
                assert_eq!(b, &vec![root as u8; root + 1]);
            }
            assert_eq!(*seen, world, "rank {r} left the barrier early");
        }
        // The order is visible: rank order gives 0 where 1e8 − 1e8 first would give 1.
        if world >= 3 {
            assert_eq!(want[0], 0.0);
        }
    }
}

#[test]
fn in_process_length_mismatch_fails_on_every_rank() {
    let errs = on_ranks(InProcess::group(3), |mut c| {
        let mut v = vec![1.0f32; if c.rank() == 2 { 4 } else { 3 }];
        c.all_reduce_sum(&mut v).unwrap_err().to_string()
    });
    for e in errs {
        assert!(e.contains("rank 2 has 4"), "{e}");
    }
}

#[test]
fn tcp_sums_are_the_in_process_sums_bit_for_bit() {
    for world in [2, 3] {
        let n = 5000;
        let tcp = on_ranks(tcp_group(world), move |mut c| {
            let mut v = values(c.rank(), n);
            c.all_reduce_sum(&mut v).unwrap();
            v
        });
        let inproc = on_ranks(InProcess::group(world), move |mut c| {
            let mut v = values(c.rank(), n);
            c.all_reduce_sum(&mut v).unwrap();
            v
        });
        for (a, b) in tcp.iter().zip(&inproc) {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }
}

#[test]
fn gradients_and_statistics_are_summed_over_ranks() {
    let results = on_ranks(InProcess::group(3), |mut c| {
        let r = c.rank() as f32;
        let mut st = TrainState::new(1);
        st.add(
            Slot::LoraA(0),
            ParamState::new("a".into(), vec![2, 3], true),
        );
        st.add(Slot::LoraB(0), ParamState::new("b".into(), vec![4], true));
        for (k, (_, p)) in st.params.iter_mut().enumerate() {
            for (i, g) in p.grad.iter_mut().enumerate() {
                *g = r * 100.0 + (k * 10 + i) as f32;
            }
        }
        let mut stats = [1.5 * (r as f64 + 1.0), 10.0];
        dist::all_reduce_grads(&mut c, &mut st, &mut stats).unwrap();
        let is_one = c.rank() == 1;
        let any = dist::any(&mut c, is_one).unwrap();
        let none = dist::any(&mut c, false).unwrap();
        (
            st.params
                .iter()
                .map(|(_, p)| p.grad.clone())
                .collect::<Vec<_>>(),
            stats,
            any,
            none,
        )
    });
    for (grads, stats, any, none) in results {
        assert_eq!(
            grads[0],
            (0..6).map(|i| 300.0 + 3.0 * i as f32).collect::<Vec<_>>()
        );
        assert_eq!(
            grads[1],
            (0..4)
                .map(|i| 300.0 + 3.0 * (10 + i) as f32)
                .collect::<Vec<_>>()
        );
        assert_eq!(stats, [9.0, 30.0]);
        assert!(any && !none);
    }
}

#[test]
fn check_same_names_the_difference_on_every_rank() {
    let errs = on_ranks(InProcess::group(3), |mut c| {
        let steps = if c.rank() == 2 { 9 } else { 10 };
        let same = dist::check_same(&mut c, &[("rows", 4)]);
        let differs = dist::check_same(&mut c, &[("rows", 4), ("total steps", steps)]);
        (same.is_ok(), differs.unwrap_err().to_string())
    });
    for (r, (same, e)) in errs.iter().enumerate() {
        assert!(same);
        assert!(e.contains("rank(s) 2 do not run the same job"), "{e}");
        assert_eq!(
            e.contains("here total steps is 9, on rank 0 10"),
            r == 2,
            "{e}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// peft-train as a torchrun job

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
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

const DIST_VARS: &[&str] = &[
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_STEP_ID",
    "SLURM_STEPID",
    "PEFTKIT_DIST_BACKEND",
    "PEFTKIT_MASTER_PORT",
    "TORCHELASTIC_USE_AGENT_STORE",
    "PEFTKIT_DIST_TIMEOUT",
    "PEFTKIT_STOP_AFTER_STEP",
];

/// peft-train with `args`, a clean launcher environment plus `env`.
fn peft_train(args: &[String], env: &[(&str, String)]) -> Command {
    tool_cmd("peft-train", args, env)
}

/// `tool` with `args`, a clean launcher environment plus `env`.
fn tool_cmd(tool: &str, args: &[String], env: &[(&str, String)]) -> Command {
    let mut c = Command::new(bin(tool));
    c.args(args).env("PEFTKIT_NO_PROGRESS", "1");
    for v in DIST_VARS {
        c.env_remove(v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// Launch `world` ranks the way torchrun does (same command, RANK/WORLD_SIZE/LOCAL_RANK/
/// MASTER_ADDR/MASTER_PORT per process), wait for all; outputs in rank order.
fn launch(world: usize, args: &[String], extra: &[(&str, String)]) -> Vec<Output> {
    launch_tool("peft-train", world, args, extra)
}

/// [`launch`] for any of the training tools.
fn launch_tool(tool: &str, world: usize, args: &[String], extra: &[(&str, String)]) -> Vec<Output> {
    let port = free_port().to_string();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            let mut env = vec![
                ("RANK", rank.to_string()),
                ("WORLD_SIZE", world.to_string()),
                ("LOCAL_RANK", rank.to_string()),
                ("LOCAL_WORLD_SIZE", world.to_string()),
                ("MASTER_ADDR", "127.0.0.1".to_string()),
                ("MASTER_PORT", port.clone()),
            ];
            env.extend(extra.iter().cloned());
            tool_cmd(tool, args, &env).spawn().expect("spawn the tool")
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

fn ok(o: &Output) -> &Output {
    assert!(
        o.status.success(),
        "training failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn train_args(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--model",
        s(model),
        "--data",
        s(data),
        "--out",
        s(out),
        "--log",
        &format!("{}.jsonl", s(out)),
        "--method",
        "lora",
        "--target",
        "all-linear",
        "--lr",
        "1e-2",
        "--seed",
        "5",
        "--threads",
        "1",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

/// Step records of a metrics log: (loss, tokens).
fn steps(log: &Path) -> Vec<(f64, u64)> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["loss"].as_f64().unwrap(), v["tokens"].as_u64().unwrap()))
        .collect()
}

/// Largest absolute difference between two adapters (same tensors, same shapes).
fn max_diff(a: &Path, b: &Path) -> (f32, bool) {
    let (ta, tb) = (
        read_tensors(&a.join("adapter_model.safetensors")),
        read_tensors(&b.join("adapter_model.safetensors")),
    );
    assert_eq!(ta.len(), tb.len());
    let mut worst = 0f32;
    let mut identical = true;
    for ((na, sa, va), (nb, sb, vb)) in ta.iter().zip(&tb) {
        assert_eq!((na, sa), (nb, sb));
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
            identical &= x.to_bits() == y.to_bits();
        }
    }
    (worst, identical)
}

#[test]
fn data_parallel_peft_train_matches_the_single_process_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models").join("llama_gqa");
    let data = alpaca_data(dir.path(), 13);
    // (processes, options): whole micro-batches per rank; an uneven split of one micro-batch
    // (3 rows over 2 ranks); 3 ranks with an epoch boundary inside a window; packing.
    let cases: &[(usize, &[&str])] = &[
        (2, &["--steps", "4", "--batch", "2", "--grad-accum", "2"]),
        (2, &["--steps", "3", "--batch", "3"]),
        (3, &["--steps", "4", "--batch", "2", "--grad-accum", "3"]),
        (
            2,
            &[
                "--steps",
                "3",
                "--batch",
                "1",
                "--grad-accum",
                "2",
                "--pack",
                "--max-len",
                "256",
            ],
        ),
    ];
    for (k, &(world, opts)) in cases.iter().enumerate() {
        let single = dir.path().join(format!("single-{k}"));
        let multi = dir.path().join(format!("multi-{k}"));
        let t = std::time::Instant::now();
        ok(&peft_train(&train_args(&model, &data, &single, opts), &[])
            .output()
            .unwrap());
        let t1 = t.elapsed();
        let outs = launch(world, &train_args(&model, &data, &multi, opts), &[]);
        let tn = t.elapsed() - t1;
        outs.iter().for_each(|o| {
            ok(o);
        });
        // Rank 0 prints like a single process; the others are silent.
        assert!(String::from_utf8_lossy(&outs[0].stdout).contains("trainable params"));
        assert!(String::from_utf8_lossy(&outs[0].stderr).contains("data parallel: "));
        for o in &outs[1..] {
            assert!(o.stdout.is_empty() && o.stderr.is_empty(), "{o:?}");
        }
        let (diff, identical) = max_diff(&single, &multi);
        eprintln!(
            "case {k} ({world} processes, {opts:?}): max |Δ| {diff:e}{}; {:.2} s single, {:.2} s distributed",
            if identical { " (bit-identical)" } else { "" },
            t1.as_secs_f64(),
            tn.as_secs_f64()
        );
        assert!(diff <= 1e-5, "case {k}: adapters differ by {diff}");
        // The same steps, losses and global token counts in one log written by rank 0.
        let (ls, lm) = (
            steps(&single.with_extension("jsonl")),
            steps(&multi.with_extension("jsonl")),
        );
        assert_eq!(ls.len(), lm.len());
        for ((a, ta), (b, tb)) in ls.iter().zip(&lm) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "loss {a} vs {b}");
            assert_eq!(ta, tb, "global token counts");
        }
        // Only rank 0 wrote the output: one adapter, one final checkpoint.
        assert!(multi.join("adapter_config.json").is_file());
        let count = |d: &Path| std::fs::read_dir(d.join("checkpoints")).unwrap().count();
        assert_eq!(count(&multi), count(&single));
    }
}

#[test]
fn interrupted_data_parallel_run_resumes_to_the_straight_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models").join("llama_gqa");
    let data = alpaca_data(dir.path(), 10);
    // Dropout (per-rank streams must come back), an epoch boundary, evaluation.
    let opts = &[
        "--steps",
        "6",
        "--batch",
        "2",
        "--grad-accum",
        "2",
        "--dropout",
        "0.1",
        "--val-split",
        "0.2",
        "--eval-every",
        "2",
    ];
    let straight = dir.path().join("straight");
    for o in launch(2, &train_args(&model, &data, &straight, opts), &[]) {
        ok(&o);
    }
    let resumed = dir.path().join("resumed");
    let args = train_args(&model, &data, &resumed, opts);
    let outs = launch(2, &args, &[("PEFTKIT_STOP_AFTER_STEP", "3".into())]);
    for o in &outs {
        assert_eq!(o.status.code(), Some(130), "{o:?}");
    }
    let mut args = args.clone();
    args.extend(["--resume".to_string(), s(&resumed).to_string()]);
    for o in launch(2, &args, &[]) {
        ok(&o);
    }
    let (diff, identical) = max_diff(&straight, &resumed);
    assert!(identical, "resumed run differs by {diff}");
    let a = steps(&straight.with_extension("jsonl"));
    let b = steps(&resumed.with_extension("jsonl"));
    assert_eq!(a, b);
}

#[test]
fn ranks_that_run_different_jobs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models").join("llama_gqa");
    let data = alpaca_data(dir.path(), 8);
    let out = dir.path().join("out");
    let port = free_port().to_string();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            let steps = if rank == 1 { "5" } else { "4" };
            let args = train_args(&model, &data, &out, &["--steps", steps]);
            peft_train(
                &args,
                &[
                    ("RANK", rank.to_string()),
                    ("WORLD_SIZE", "2".into()),
                    ("MASTER_ADDR", "127.0.0.1".into()),
                    ("MASTER_PORT", port.clone()),
                ],
            )
            .spawn()
            .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert_clean_error(&o, "do not run the same job as rank 0");
        assert_eq!(o.status.code(), Some(2));
    }
    assert!(!out.exists(), "nothing may be written");
}

#[test]
fn bad_launch_environments_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models").join("llama_gqa");
    let data = alpaca_data(dir.path(), 4);
    let args = train_args(&model, &data, &dir.path().join("out"), &["--steps", "1"]);
    let run = |env: &[(&str, &str)]| {
        let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.to_string())).collect();
        peft_train(&args, &env).output().unwrap()
    };
    let base = [("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        v
    };
    for (env, needle) in [
        (with(&[("WORLD_SIZE", "2")]), "RANK is not set"),
        (
            with(&[("WORLD_SIZE", "two"), ("RANK", "0")]),
            "WORLD_SIZE=two",
        ),
        (
            with(&[("WORLD_SIZE", "2"), ("RANK", "2")]),
            "RANK=2 is not below WORLD_SIZE=2",
        ),
        (
            vec![
                ("WORLD_SIZE", "2"),
                ("RANK", "0"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", "http"),
            ],
            "MASTER_PORT=http",
        ),
        (
            vec![("WORLD_SIZE", "2"), ("RANK", "1")],
            "MASTER_ADDR is not set",
        ),
        (
            with(&[
                ("WORLD_SIZE", "2"),
                ("RANK", "0"),
                ("PEFTKIT_DIST_BACKEND", "mpi"),
            ]),
            "PEFTKIT_DIST_BACKEND=mpi",
        ),
        (
            with(&[
                ("WORLD_SIZE", "2"),
                ("RANK", "0"),
                ("PEFTKIT_DIST_TIMEOUT", "soon"),
            ]),
            "PEFTKIT_DIST_TIMEOUT=soon",
        ),
    ] {
        let o = run(&env);
        assert_clean_error(&o, needle);
        assert_eq!(o.status.code(), Some(2), "{env:?}");
    }
    // srun tasks without torchrun's variables.
    let o = run(&[
        ("SLURM_PROCID", "3"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_STEP_ID", "0"),
    ]);
    assert_clean_error(&o, "SLURM_PROCID=3 is not below SLURM_NTASKS=2");
    // No rank 0 at the rendezvous: the error names it (an I/O failure, exit 4).
    let port = free_port().to_string();
    let t = std::time::Instant::now();
    let o = run(&[
        ("WORLD_SIZE", "2"),
        ("RANK", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", &port),
        ("PEFTKIT_DIST_TIMEOUT", "1"),
    ]);
    assert_clean_error(&o, &format!("MASTER_ADDR:MASTER_PORT=127.0.0.1:{port}"));
    assert_eq!(o.status.code(), Some(4));
    assert!(t.elapsed() < Duration::from_secs(20));
    // Rank 0 alone: waits for the others, then says which did not come.
    let o = run(&[
        ("WORLD_SIZE", "3"),
        ("RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", &port),
        ("PEFTKIT_DIST_TIMEOUT", "1"),
    ]);
    assert_clean_error(&o, "rank(s) 1, 2 did not connect");
    assert!(!dir.path().join("out").exists());
}

/// `PEFTKIT_DIST_BACKEND=nccl` in a build without CUDA (or, in a CUDA build, on a machine
/// whose other rank never comes): one clean error line, no panic.
#[test]
fn nccl_backend_without_cuda_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models").join("llama_gqa");
    let data = alpaca_data(dir.path(), 4);
    let args = train_args(&model, &data, &dir.path().join("out"), &["--steps", "1"]);
    let env: Vec<(&str, String)> = [
        ("WORLD_SIZE", "2"),
        ("RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", &free_port().to_string()),
        ("PEFTKIT_DIST_BACKEND", "nccl"),
        ("PEFTKIT_DIST_TIMEOUT", "1"),
    ]
    .iter()
    .map(|(k, v)| (*k, v.to_string()))
    .collect();
    let o = peft_train(&args, &env).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    if stderr.contains("no CUDA support") {
        assert_clean_error(
            &o,
            "PEFTKIT_DIST_BACKEND=nccl: this build has no CUDA support",
        );
    } else {
        assert_clean_error(&o, "did not connect");
    }
}

// ---------------------------------------------------------------------------------------------
// rm-train and dpo-train as torchrun jobs

/// `n` preference pairs whose chosen completion ends in "yes", the rejected one in "no".
fn preference_pairs(dir: &Path, n: usize) -> PathBuf {
    let words = [
        "apple", "river", "stone", "cloud", "green", "quick", "slow", "table",
    ];
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let w = |k: usize| words[(i * 7 + k * 3 + i / 3) % words.len()];
            let prompt = format!("{} {} {}:", w(0), w(1), w(2));
            let body = vec![w(3); 1 + i % 3].join(" ");
            json!({"prompt": prompt, "chosen": format!(" {body} yes yes"), "rejected": format!(" {body} no no")})
                .to_string()
        })
        .collect();
    let p = dir.join("pairs.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// Evaluation records of a metrics log: (step, loss, accuracy, margin).
fn evals(log: &Path) -> Vec<(u64, f64, f64, f64)> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("eval_loss").is_some())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["eval_loss"].as_f64().unwrap(),
                v["eval_accuracy"].as_f64().unwrap(),
                v["eval_margin"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn data_parallel_rm_and_dpo_train_match_the_single_process_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models").join("llama_gqa");
    let data = preference_pairs(dir.path(), 20);
    let eval = ["--val-split", "0.25", "--eval-every", "2"];
    // (tool, options): whole micro-batches per rank (with evaluation, sharded and summed); an
    // uneven split of one micro-batch (3 pairs over 2 ranks) across an epoch boundary.
    let cases: &[(&str, &[&str])] = &[
        (
            "rm-train",
            &["--steps", "4", "--batch", "2", "--grad-accum", "2"],
        ),
        ("rm-train", &["--steps", "6", "--batch", "3"]),
        (
            "dpo-train",
            &["--steps", "4", "--batch", "2", "--grad-accum", "2"],
        ),
        (
            "dpo-train",
            &[
                "--steps", "6", "--batch", "3", "--loss", "ipo", "--beta", "0.5",
            ],
        ),
    ];
    for (k, &(tool, opts)) in cases.iter().enumerate() {
        let opts: Vec<&str> = opts.iter().chain(&eval).copied().collect();
        let single = dir.path().join(format!("single-{k}"));
        let multi = dir.path().join(format!("multi-{k}"));
        let t = std::time::Instant::now();
        ok(
            &tool_cmd(tool, &train_args(&model, &data, &single, &opts), &[])
                .output()
                .unwrap(),
        );
        let t1 = t.elapsed();
        let outs = launch_tool(tool, 2, &train_args(&model, &data, &multi, &opts), &[]);
        let tn = t.elapsed() - t1;
        outs.iter().for_each(|o| {
            ok(o);
        });
        // Rank 0 prints like a single process; the other is silent.
        assert!(String::from_utf8_lossy(&outs[0].stdout).contains("trainable params"));
        assert!(String::from_utf8_lossy(&outs[0].stdout).contains("held-out"));
        assert!(String::from_utf8_lossy(&outs[0].stderr).contains("data parallel: "));
        assert!(
            outs[1].stdout.is_empty() && outs[1].stderr.is_empty(),
            "{:?}",
            outs[1]
        );
        let (diff, identical) = max_diff(&single, &multi);
        eprintln!(
            "case {k} ({tool}, {opts:?}): max |Δ| {diff:e}{}; {:.2} s single, {:.2} s distributed",
            if identical { " (bit-identical)" } else { "" },
            t1.as_secs_f64(),
            tn.as_secs_f64()
        );
        // The ranks' sums group the pairs differently, and Adam's m/√v turns the last-bit
        // differences of near-zero gradients into larger ones at lr 1e-2 (4e-6 seen here; IPO at
        // β 0.1 reached 3.5e-5): the adapters get a margin for other CPUs' rounding, while the
        // losses below stay pinned to 1e-5.
        assert!(diff <= 1e-4, "case {k}: adapters differ by {diff}");
        // The same steps, losses, global token counts and evaluations in rank 0's log.
        let (ls, lm) = (
            steps(&single.with_extension("jsonl")),
            steps(&multi.with_extension("jsonl")),
        );
        assert_eq!(ls.len(), lm.len());
        for ((a, ta), (b, tb)) in ls.iter().zip(&lm) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "loss {a} vs {b}");
            assert_eq!(ta, tb, "global token counts");
        }
        let (es, em) = (
            evals(&single.with_extension("jsonl")),
            evals(&multi.with_extension("jsonl")),
        );
        assert_eq!(es.len(), em.len());
        assert!(es.len() >= 3, "{es:?}");
        for (a, b) in es.iter().zip(&em) {
            assert_eq!((a.0, a.2), (b.0, b.2), "eval step and accuracy");
            assert!(
                (a.1 - b.1).abs() <= 1e-5 * a.1.abs().max(1.0),
                "{a:?} vs {b:?}"
            );
            assert!(
                (a.3 - b.3).abs() <= 1e-5 * a.3.abs().max(1.0),
                "{a:?} vs {b:?}"
            );
        }
        assert!(multi.join("adapter_config.json").is_file());
        let count = |d: &Path| std::fs::read_dir(d.join("checkpoints")).unwrap().count();
        assert_eq!(count(&multi), count(&single));
    }
}

#[test]
fn interrupted_data_parallel_dpo_run_resumes_to_the_straight_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models").join("llama_gqa");
    let data = preference_pairs(dir.path(), 12);
    // Dropout (per-rank streams must come back), an epoch boundary, evaluation.
    let opts = &[
        "--steps",
        "5",
        "--batch",
        "2",
        "--grad-accum",
        "2",
        "--dropout",
        "0.1",
        "--val-split",
        "0.2",
        "--eval-every",
        "2",
    ];
    let straight = dir.path().join("straight");
    for o in launch_tool(
        "dpo-train",
        2,
        &train_args(&model, &data, &straight, opts),
        &[],
    ) {
        ok(&o);
    }
    let resumed = dir.path().join("resumed");
    let args = train_args(&model, &data, &resumed, opts);
    let outs = launch_tool(
        "dpo-train",
        2,
        &args,
        &[("PEFTKIT_STOP_AFTER_STEP", "3".into())],
    );
    for o in &outs {
        assert_eq!(o.status.code(), Some(130), "{o:?}");
    }
    let mut args = args.clone();
    args.extend(["--resume".to_string(), s(&resumed).to_string()]);
    for o in launch_tool("dpo-train", 2, &args, &[]) {
        ok(&o);
    }
    let (diff, identical) = max_diff(&straight, &resumed);
    assert!(identical, "resumed run differs by {diff}");
    assert_eq!(
        steps(&straight.with_extension("jsonl")),
        steps(&resumed.with_extension("jsonl"))
    );
}

// ---------------------------------------------------------------------------------------------
// grpo-train

fn grpo_prompts(dir: &Path, n: usize) -> PathBuf {
    let p = dir.join("grpo-prompts.jsonl");
    let lines: Vec<String> = (0..n)
        .map(|i| {
            json!({"prompt": format!("item {i} says"), "answer": (i % 3).to_string()}).to_string()
        })
        .collect();
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

/// grpo-train's per-step records: (loss, reward, response length, entropy), and the
/// evaluations: (step, mean reward, completion length).
#[allow(clippy::type_complexity)]
fn grpo_log(log: &Path) -> (Vec<[f64; 4]>, Vec<(u64, f64, f64)>) {
    let lines: Vec<Value> = std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let steps = lines
        .iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| {
            [
                f(v, "loss"),
                f(v, "reward"),
                f(v, "response_length"),
                f(v, "entropy"),
            ]
        })
        .collect();
    let evals = lines
        .iter()
        .filter(|v| v.get("eval_reward").is_some())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                f(v, "eval_reward"),
                f(v, "eval_response_length"),
            )
        })
        .collect();
    (steps, evals)
}

fn grpo_args(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = train_args(
        model,
        data,
        out,
        &[
            "--reward",
            "regex: the",
            "--reward",
            "answer:answer",
            "--reward-weights",
            "1,0.5",
            "--max-completion-length",
            "6",
            "--eval-prompts",
            "5",
        ],
    );
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

/// Each rank samples, scores and trains on its share of every step's completions; with one
/// generator per completion they sample what one process samples, so the rewards, lengths and
/// evaluations are the single process's exactly and the adapter and losses within rounding.
#[test]
fn data_parallel_grpo_train_matches_the_single_process_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models").join("llama_gqa");
    let data = grpo_prompts(dir.path(), 9);
    // (processes, options): DAPO (the default: the step's tokens are its denominator) with 9
    // completions split 4/5, a KL penalty and two iterations per batch; the per-sequence loss
    // with batch-scaled rewards and whole micro-batches per rank; 3 ranks over 4 completions.
    let cases: &[(usize, &[&str])] = &[
        (
            2,
            &[
                "--steps",
                "3",
                "--batch",
                "3",
                "--num-generations",
                "3",
                "--beta",
                "0.04",
                "--num-iterations",
                "2",
            ],
        ),
        (
            2,
            &[
                "--steps",
                "3",
                "--batch",
                "2",
                "--num-generations",
                "4",
                "--grad-accum",
                "2",
                "--loss-type",
                "grpo",
                "--scale-rewards",
                "batch",
            ],
        ),
        (
            3,
            &[
                "--steps",
                "2",
                "--batch",
                "2",
                "--num-generations",
                "2",
                "--mask-truncated-completions",
            ],
        ),
    ];
    for (k, &(world, opts)) in cases.iter().enumerate() {
        let single = dir.path().join(format!("grpo-single-{k}"));
        let multi = dir.path().join(format!("grpo-multi-{k}"));
        ok(
            &tool_cmd("grpo-train", &grpo_args(&model, &data, &single, opts), &[])
                .output()
                .unwrap(),
        );
        let outs = launch_tool(
            "grpo-train",
            world,
            &grpo_args(&model, &data, &multi, opts),
            &[],
        );
        outs.iter().for_each(|o| {
            ok(o);
        });
        assert!(String::from_utf8_lossy(&outs[0].stdout).contains("mean reward"));
        assert!(String::from_utf8_lossy(&outs[0].stderr).contains("data parallel: "));
        for o in &outs[1..] {
            assert!(o.stdout.is_empty() && o.stderr.is_empty(), "{o:?}");
        }
        let (diff, identical) = max_diff(&single, &multi);
        eprintln!(
            "grpo case {k}: max |Δ| {diff:e}{}",
            if identical { " (bit-identical)" } else { "" }
        );
        assert!(diff <= 1e-4, "case {k}: adapters differ by {diff}");
        let (ss, es) = grpo_log(&single.with_extension("jsonl"));
        let (sm, em) = grpo_log(&multi.with_extension("jsonl"));
        assert_eq!(ss.len(), sm.len());
        for (a, b) in ss.iter().zip(&sm) {
            // the same completions and rewards; losses and entropies summed in other groups
            assert_eq!(a[1].to_bits(), b[1].to_bits(), "reward {a:?} vs {b:?}");
            assert_eq!(a[2], b[2], "response length {a:?} vs {b:?}");
            for j in [0, 3] {
                assert!(
                    (a[j] - b[j]).abs() <= 1e-5 * a[j].abs().max(1.0),
                    "case {k}: {a:?} vs {b:?}"
                );
            }
        }
        assert_eq!(es.len(), 2);
        assert_eq!(es, em, "evaluations");
    }
}

/// A distributed grpo-train run stopped after step 2 and resumed is the straight run, bit for
/// bit: the sampling generator comes back from rank 0's checkpoint on every rank.
#[test]
fn interrupted_data_parallel_grpo_run_resumes_to_the_straight_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models").join("llama_gqa");
    let data = grpo_prompts(dir.path(), 6);
    let opts = &["--steps", "4", "--batch", "2", "--num-generations", "3"];
    let straight = dir.path().join("straight");
    for o in launch_tool(
        "grpo-train",
        2,
        &grpo_args(&model, &data, &straight, opts),
        &[],
    ) {
        ok(&o);
    }
    let resumed = dir.path().join("resumed");
    let args = grpo_args(&model, &data, &resumed, opts);
    let outs = launch_tool(
        "grpo-train",
        2,
        &args,
        &[("PEFTKIT_STOP_AFTER_STEP", "2".into())],
    );
    for o in &outs {
        assert_eq!(o.status.code(), Some(130), "{o:?}");
    }
    let mut args = args.clone();
    args.extend(["--resume".to_string(), s(&resumed).to_string()]);
    for o in launch_tool("grpo-train", 2, &args, &[]) {
        ok(&o);
    }
    let (diff, identical) = max_diff(&straight, &resumed);
    assert!(identical, "resumed run differs by {diff}");
    let (a, b) = (
        grpo_log(&straight.with_extension("jsonl")).0,
        grpo_log(&resumed.with_extension("jsonl")).0,
    );
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        for (p, q) in x.iter().zip(y) {
            assert_eq!(p.to_bits(), q.to_bits(), "{x:?} vs {y:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ppo-train

/// A small reward model (rm-train, a few steps on the preference pairs): any scores will do,
/// as long as single- and multi-process runs see the same ones.
fn small_reward_model(dir: &Path, model: &Path) -> PathBuf {
    let out = dir.join("rm");
    let pairs = preference_pairs(dir, 8);
    let args = train_args(model, &pairs, &out, &["--steps", "3", "--batch", "4"]);
    ok(&tool_cmd("rm-train", &args, &[]).output().unwrap());
    out
}

/// ppo-train's per-step records: (score, response length, KL, policy loss, value loss).
fn ppo_log(log: &Path) -> Vec<[f64; 5]> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("pg_loss").is_some())
        .map(|v| {
            ["score_mean", "response_length", "kl", "pg_loss", "vf_loss"]
                .map(|k| v[k].as_f64().unwrap())
        })
        .collect()
}

/// Each rank samples and evaluates its share of every batch and all gather the whole batch
/// (whitening, GAE and the shuffled mini-batches are the single process's); each trains on its
/// share of every mini-batch. With whole micro-batches per rank the responses are the single
/// process's exactly, the scores, KLs, losses and the adapter within rounding.
#[test]
fn data_parallel_ppo_train_matches_the_single_process_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models").join("llama_gqa");
    let rm = small_reward_model(dir.path(), &model);
    let data = grpo_prompts(dir.path(), 8);
    let common = [
        "--reward-model",
        s(&rm),
        "--response-length",
        "6",
        "--eval-prompts",
        "5",
    ];
    let cases: &[(usize, &[&str])] = &[
        (
            2,
            &[
                "--steps",
                "3",
                "--batch",
                "4",
                "--mini-batches",
                "2",
                "--grad-accum",
                "2",
                "--ppo-epochs",
                "2",
                "--whiten-rewards",
            ],
        ),
        (
            3,
            &[
                "--steps",
                "2",
                "--batch",
                "6",
                "--mini-batches",
                "2",
                "--grad-accum",
                "3",
            ],
        ),
    ];
    for (k, &(world, opts)) in cases.iter().enumerate() {
        let opts: Vec<&str> = common.iter().chain(opts).copied().collect();
        let single = dir.path().join(format!("ppo-single-{k}"));
        let multi = dir.path().join(format!("ppo-multi-{k}"));
        ok(
            &tool_cmd("ppo-train", &train_args(&model, &data, &single, &opts), &[])
                .output()
                .unwrap(),
        );
        let outs = launch_tool(
            "ppo-train",
            world,
            &train_args(&model, &data, &multi, &opts),
            &[],
        );
        outs.iter().for_each(|o| {
            ok(o);
        });
        assert!(String::from_utf8_lossy(&outs[0].stdout).contains("mean score"));
        for o in &outs[1..] {
            assert!(o.stdout.is_empty() && o.stderr.is_empty(), "{o:?}");
        }
        let (diff, identical) = max_diff(&single, &multi);
        eprintln!(
            "ppo case {k}: max |Δ| {diff:e}{}",
            if identical { " (bit-identical)" } else { "" }
        );
        assert!(diff <= 1e-4, "case {k}: adapters differ by {diff}");
        let heads = |d: &Path| read_tensors(&d.join("value_head.safetensors"));
        for ((_, _, a), (_, _, b)) in heads(&single).iter().zip(&heads(&multi)) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-4, "value head {x} vs {y}");
            }
        }
        let (ls, lm) = (
            ppo_log(&single.with_extension("jsonl")),
            ppo_log(&multi.with_extension("jsonl")),
        );
        assert_eq!(ls.len(), lm.len());
        for (a, b) in ls.iter().zip(&lm) {
            // the same responses; the reward model scores them in other batches (f32 rounding)
            assert_eq!(a[1], b[1], "response length {a:?} vs {b:?}");
            for j in [0, 2, 3, 4] {
                assert!(
                    (a[j] - b[j]).abs() <= 1e-5 * a[j].abs().max(1.0),
                    "case {k}: {a:?} vs {b:?}"
                );
            }
        }
    }
}

/// A distributed ppo-train run (adaptive KL) stopped after step 2 and resumed is the straight
/// run, bit for bit: the KL coefficient and the sampling generator come back on every rank.
#[test]
fn interrupted_data_parallel_ppo_run_resumes_to_the_straight_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models").join("llama_gqa");
    let rm = small_reward_model(dir.path(), &model);
    let data = grpo_prompts(dir.path(), 6);
    let opts = &[
        "--reward-model",
        s(&rm),
        "--response-length",
        "5",
        "--steps",
        "4",
        "--batch",
        "4",
        "--mini-batches",
        "2",
        "--grad-accum",
        "2",
        "--adaptive-kl",
        "--kl-target",
        "0.5",
        "--kl-horizon",
        "20",
        "--eval-prompts",
        "0",
    ];
    let straight = dir.path().join("straight");
    for o in launch_tool(
        "ppo-train",
        2,
        &train_args(&model, &data, &straight, opts),
        &[],
    ) {
        ok(&o);
    }
    let resumed = dir.path().join("resumed");
    let args = train_args(&model, &data, &resumed, opts);
    let outs = launch_tool(
        "ppo-train",
        2,
        &args,
        &[("PEFTKIT_STOP_AFTER_STEP", "2".into())],
    );
    for o in &outs {
        assert_eq!(o.status.code(), Some(130), "{o:?}");
    }
    let mut args = args.clone();
    args.extend(["--resume".to_string(), s(&resumed).to_string()]);
    for o in launch_tool("ppo-train", 2, &args, &[]) {
        ok(&o);
    }
    let (diff, identical) = max_diff(&straight, &resumed);
    assert!(identical, "resumed run differs by {diff}");
    let (a, b) = (
        ppo_log(&straight.with_extension("jsonl")),
        ppo_log(&resumed.with_extension("jsonl")),
    );
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        for (p, q) in x.iter().zip(y) {
            assert_eq!(p.to_bits(), q.to_bits(), "{x:?} vs {y:?}");
        }
    }
}

//! `peft-train --device cuda-sim`: the trainer with the GPU engine, run by the CPU simulator of
//! the GPU kernels (a build with the `cuda-sim` feature), against the same run on the CPU
//! engine: the GPU path from the command line to the adapter file, tested without a GPU.
#![cfg(feature = "cuda-sim")]

use clap::Parser;
use peftkit_core::train::pairs::PairOptions;
use peftkit_core::train::pref_trainer::{self, PrefOptions, PrefTask};
use peftkit_core::train::preference::DpoLoss;
use peftkit_core::train::trainer;
use peftkit_train_cli::{to_options, TrainArgs};
use std::path::{Path, PathBuf};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    train: TrainArgs,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Run {
    losses: Vec<f64>,
    eval_losses: Vec<f64>,
    adapter: Vec<(String, Vec<f32>)>,
}

/// What to train: next-token LoRA (peft-train), or a preference task on pairs.
#[derive(Clone, Copy)]
enum Task {
    NextToken,
    Reward,
    Dpo,
}

/// Preference pairs whose chosen completion ends "yes yes" and the rejected one "no no".
fn pairs_file(dir: &Path) -> PathBuf {
    let words = [
        "apple", "river", "stone", "cloud", "green", "quick", "slow", "table",
    ];
    let mut lines = String::new();
    for i in 0..24 {
        let w = |k: usize| words[(i * 7 + k * 3) % words.len()];
        let body = format!("{} {}", w(3), w(4));
        lines += &serde_json::json!({
            "prompt": format!("{} {} {}:", w(0), w(1), w(2)),
            "chosen": format!(" {body} yes yes"),
            "rejected": format!(" {body} no no"),
        })
        .to_string();
        lines.push('\n');
    }
    let p = dir.join("pairs.jsonl");
    std::fs::write(&p, lines).unwrap();
    p
}

/// Trains (with a held-out fifth of the data evaluated before and after) and returns the
/// per-step and evaluation losses from the log, and the adapter's tensors.
/// `extra` may override a default (`--model NAME` names a fixture model).
fn train(out: &Path, device: &str, task: Task, extra: &[&str]) -> Run {
    let r = root();
    let name = extra
        .iter()
        .position(|&a| a == "--model")
        .map_or("llama_gqa", |i| extra[i + 1]);
    let model = r.join("tests/fixtures/models").join(name);
    let data = match task {
        Task::NextToken => r.join("tests/fixtures/data/alpaca.json"),
        Task::Reward | Task::Dpo => pairs_file(out.parent().unwrap()),
    };
    let log = out.with_extension("jsonl");
    let mut argv: Vec<String> = [
        "peft-train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
        "--steps",
        "3",
        "--batch",
        "2",
        "--rank",
        "4",
        "--lr",
        "1e-2",
        "--seed",
        "5",
        "--val-split",
        "0.2",
        "--device",
        device,
        "-q",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // The options in `extra` replace the defaults above (flag and value).
    for pair in extra.chunks(2) {
        if let Some(i) = argv.iter().position(|a| a == pair[0]) {
            if pair[0] == "--model" {
                continue; // resolved above
            }
            argv.drain(i..i + 2);
        }
        argv.extend(pair.iter().map(|s| s.to_string()));
    }
    let cli = Cli::parse_from(argv);
    let opts = to_options(&cli.train).unwrap();
    let pref = |task| PrefOptions {
        train: opts.clone(),
        task,
        pairs: PairOptions {
            max_len: cli.train.max_len.max(2),
            drop_long: false,
            margin_column: None,
            skip_bad_lines: false,
        },
    };
    match task {
        Task::NextToken => drop(trainer::run(&opts).unwrap()),
        Task::Reward => drop(pref_trainer::run(&pref(PrefTask::Reward { center: None })).unwrap()),
        Task::Dpo => drop(
            pref_trainer::run(&pref(PrefTask::Dpo {
                loss: DpoLoss::Sigmoid,
                beta: 0.1,
                label_smoothing: 0.0,
            }))
            .unwrap(),
        ),
    }
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let field = |k: &str| -> Vec<f64> {
        records
            .iter()
            .filter_map(|v| v.get(k).and_then(|x| x.as_f64()))
            .collect()
    };
    // An adapter, or (full and partial fine-tuning) the whole model.
    let file = ["adapter_model.safetensors", "model.safetensors"]
        .map(|f| out.join(f))
        .into_iter()
        .find(|p| p.exists())
        .expect("an output file");
    let mut tensors = read_tensors(&file);
    // The base weights' change: full and partial fine-tuning compare what training did.
    if file.ends_with("model.safetensors") {
        let base: std::collections::HashMap<String, Vec<f32>> =
            read_tensors(&model.join("model.safetensors"))
                .into_iter()
                .collect();
        for (name, v) in &mut tensors {
            let b = &base[name];
            v.iter_mut().zip(b).for_each(|(x, b)| *x -= b);
        }
    }
    Run {
        losses: field("loss"),
        eval_losses: field("eval_loss"),
        adapter: tensors,
    }
}

/// The f32 tensors of a safetensors file, sorted by name.
fn read_tensors(file: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, v)
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

fn compare(task: Task, extra: &[&str]) {
    compare_except(task, extra, &[]);
}

/// [`compare`] without comparing the output tensors whose names contain one of `skip`.
fn compare_except(task: Task, extra: &[&str], skip: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let cpu = train(&tmp.path().join("cpu"), "cpu", task, extra);
    let sim = train(&tmp.path().join("sim"), "cuda-sim", task, extra);
    assert_eq!(cpu.losses.len(), 3);
    assert_eq!(
        cpu.eval_losses.len(),
        2,
        "evaluation before and after training"
    );
    for (what, c, g) in [
        ("loss", &cpu.losses, &sim.losses),
        ("eval loss", &cpu.eval_losses, &sim.eval_losses),
    ] {
        assert_eq!(c.len(), g.len(), "{what}");
        for (i, (c, g)) in c.iter().zip(g).enumerate() {
            // bf16 products against f32: the first step and the evaluation before training
            // see the same weights (the device check's tolerance); later ones also see the
            // Adam steps' sign noise (below), which a steep loss (the reward model's) turns
            // into a few percent.
            let tol = if i == 0 { 1e-2 } else { 5e-2 };
            assert!(
                (c - g).abs() / c.abs() < tol,
                "{what} {i}: {g} on the simulator, {c} on the CPU"
            );
        }
    }
    let (cpu_w, sim_w) = (&cpu.adapter, &sim.adapter);
    assert_eq!(cpu_w.len(), sim_w.len());
    for ((name, c), (name2, g)) in cpu_w.iter().zip(sim_w) {
        assert_eq!(name, name2);
        if skip.iter().any(|s| name.contains(s)) {
            continue;
        }
        // The adapters moved the same way. B starts at zero, so B is nothing but its three
        // Adam steps, and Adam's first steps are about ±lr per element whatever the gradient's
        // size: where bf16 rounding flips a tiny gradient's sign the element differs by 2·lr.
        // That is 3-17% here; a wrong or missing gradient differs by 100% or more.
        // (For a whole model: the change of each tensor; an untrained one stays at zero.)
        let num: f64 = c.iter().zip(g).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = c.iter().map(|a| (*a as f64).powi(2)).sum();
        if den == 0.0 {
            assert!(num == 0.0, "{name}: changed on the simulator only");
            continue;
        }
        let rel = (num / den).sqrt();
        assert!(rel < 0.3, "{name}: relative difference {rel}");
    }
}

#[test]
fn lora_on_the_simulated_gpu_trains_like_the_cpu() {
    compare(Task::NextToken, &[]);
}

#[test]
fn qlora_on_the_simulated_gpu_trains_like_the_cpu() {
    compare(Task::NextToken, &["--quantize", "nf4"]);
}

/// rm-train: the reward objective (its score head on the host) over the GPU's passes.
#[test]
fn reward_model_on_the_simulated_gpu_trains_like_the_cpu() {
    compare(Task::Reward, &[]);
}

/// dpo-train: reference log-probabilities with the adapters off, then DPO, the LM head's
/// log-probabilities on the GPU.
#[test]
fn dpo_on_the_simulated_gpu_trains_like_the_cpu() {
    compare(Task::Dpo, &[]);
}

/// Adapter folders trained on the CPU, one per PEFT type the inference tools load.
fn trained_adapters(dir: &Path) -> Vec<PathBuf> {
    ["lora", "ia3", "prompt", "prefix", "adapter"]
        .iter()
        .map(|m| {
            let out = dir.join(m);
            train(&out, "cpu", Task::NextToken, &["--method", m]);
            out
        })
        .collect()
}

/// peft-eval --device cuda-sim: per-token log-probabilities of the base model and of trained
/// adapters of every type against the CPU forward pass.
#[test]
fn evaluation_on_the_simulated_gpu_matches_the_cpu() {
    use peftkit_core::eval::{cpu_scorer, evaluate_with, gpu_scorer, EvalOptions};
    use peftkit_core::gpu::DeviceSpec;
    use peftkit_core::model::{ForwardOptions, Model};
    use peftkit_core::progress::Progress;
    use peftkit_core::tokenizer::TextTokenizer;

    let tmp = tempfile::tempdir().unwrap();
    let adapters = trained_adapters(tmp.path());
    let dir = root().join("tests/fixtures/models/llama_gqa");
    let tok = TextTokenizer::load(&dir).unwrap();
    let texts: Vec<String> = [
        "The quick brown fox jumps over the lazy dog.",
        "Below is an instruction that describes a task.",
        "a",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cases = std::iter::once(None).chain(adapters.iter().map(|a| Some(a.as_path())));
    for adapter in cases {
        let mut model = Model::load(&dir).unwrap();
        let args: Vec<String> = adapter.iter().map(|p| p.display().to_string()).collect();
        peftkit_core::train::lora::load_adapters(&mut model, &args).unwrap();
        let opts = EvalOptions {
            max_len: 64,
            batch_tokens: 24,
            per_token: true,
            forward: ForwardOptions {
                adapter: adapter.map(|_| 0),
            },
        };
        let quiet = Progress::new(true);
        let cpu = evaluate_with(
            &tok,
            &texts,
            &opts,
            &quiet,
            cpu_scorer(&model, &opts.forward),
        );
        let gpu = gpu_scorer(DeviceSpec::Sim, &model, adapter).unwrap();
        let sim = evaluate_with(&tok, &texts, &opts, &quiet, gpu);
        let (cpu, sim) = (cpu.unwrap(), sim.unwrap());
        assert_eq!(cpu.tokens, sim.tokens);
        assert!(
            (cpu.loss - sim.loss).abs() / cpu.loss < 1e-2,
            "adapter {adapter:?}: loss {} on the simulator, {} on the CPU",
            sim.loss,
            cpu.loss
        );
        let (c, g) = (cpu.per_sample.unwrap(), sim.per_sample.unwrap());
        for (a, b) in c.iter().zip(&g) {
            assert_eq!(a.token_ids, b.token_ids);
            // bf16 against f32: 0.05 nats, or 1% of a log-probability below −5.
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                assert!(
                    (x - y).abs() < 0.01 * x.abs().max(5.0),
                    "adapter {adapter:?}: logprob {y} vs {x}"
                );
            }
        }
    }
}

/// peft-generate --device cuda-sim: greedy generation with the base model and with trained
/// adapters of every type gives the CPU's tokens (the logits of every step are compared on all
/// the architectures in peftkit-core's simulator tests). The GPU computes in bf16: where the
/// CPU's two best tokens are a near tie, its rounding may pick the other one, and the two
/// generations part there; anything else is a failure.
#[test]
fn greedy_generation_on_the_simulated_gpu_matches_the_cpu() {
    use peftkit_core::generate::{CpuDecoder, Decoder, Generator, SamplingParams};
    use peftkit_core::gpu::DeviceSpec;
    use peftkit_core::model::ForwardOptions;
    use peftkit_core::model::Model;
    use peftkit_core::rng::Rng;
    use peftkit_core::tokenizer::TextTokenizer;

    let tmp = tempfile::tempdir().unwrap();
    let adapters = trained_adapters(tmp.path());
    let dir = root().join("tests/fixtures/models/llama_gqa");
    let tok = TextTokenizer::load(&dir).unwrap();
    let mut model = Model::load(&dir).unwrap();
    let names: Vec<String> = adapters.iter().map(|a| a.display().to_string()).collect();
    peftkit_core::train::lora::load_adapters(&mut model, &names).unwrap();
    let params = SamplingParams {
        max_new_tokens: 10,
        ..Default::default()
    };
    let prompt = tok.encode("Below is an instruction").unwrap();
    let run = |device: DeviceSpec, adapter: Option<usize>| {
        let mut g = Generator::new(device, &model, &adapters).unwrap();
        g.generate(&prompt, &params, &[], &mut Rng::new(0), adapter, |_| {})
            .unwrap()
            .0
    };
    // One generator switching between the adapters, as peft-generate does per prompt.
    for adapter in std::iter::once(None).chain((0..adapters.len()).map(Some)) {
        let cpu = run(DeviceSpec::Cpu, adapter);
        let sim = run(DeviceSpec::Sim, adapter);
        assert_eq!(cpu.len(), 10);
        assert_eq!(sim.len(), 10, "adapter {adapter:?}");
        let Some(k) = cpu.iter().zip(&sim).position(|(a, b)| a != b) else {
            continue;
        };
        // Where they part, the CPU's logits for the two tokens are within 1 % of their spread.
        let opts = ForwardOptions { adapter };
        let mut dec = CpuDecoder::new(&model, &opts).unwrap();
        let mut context = prompt.clone();
        context.extend(&cpu[..k]);
        let logits = dec.step(&context).unwrap();
        let (hi, lo) = logits
            .iter()
            .fold((f32::MIN, f32::MAX), |(h, l), &x| (h.max(x), l.min(x)));
        let (want, got) = (logits[cpu[k] as usize], logits[sim[k] as usize]);
        assert!(
            want - got <= 0.01 * (hi - lo),
            "adapter {adapter:?}: step {k} chose token {} (logit {got}) over the CPU's {} ({want}; logits span {lo}..{hi})",
            sim[k],
            cpu[k]
        );
    }
    // The adapter changes what is generated (so the comparison above sees it).
    assert_ne!(run(DeviceSpec::Cpu, None), run(DeviceSpec::Cpu, Some(0)));
}

/// peft-generate --batch on the simulated GPU: prompts of different lengths stepped together
/// (`GpuBatchDecoder`, leaving the batch as they stop) give, greedy and sampled, what each gives
/// alone on the same device with the same generator, with and without an adapter.
#[test]
fn batched_generation_on_the_simulated_gpu_matches_one_prompt_at_a_time() {
    use peftkit_core::generate::{Generator, SamplingParams};
    use peftkit_core::gpu::DeviceSpec;
    use peftkit_core::model::Model;
    use peftkit_core::rng::Rng;
    use peftkit_core::train::rollout::row_rngs;

    let tmp = tempfile::tempdir().unwrap();
    let adapters = trained_adapters(tmp.path());
    let dir = root().join("tests/fixtures/models/llama_gqa");
    let model = Model::load(&dir).unwrap();
    let prompts: [&[u32]; 4] = [&[5, 17, 40], &[12, 7, 300, 45, 9, 81], &[99], &[3, 3, 8, 1]];
    let mut g = Generator::new(DeviceSpec::Sim, &model, &adapters).unwrap();
    for temperature in [0.0, 1.0] {
        let params = SamplingParams {
            max_new_tokens: 8,
            temperature,
            ..Default::default()
        };
        for adapter in [None, Some(0)] {
            // a stop token one of the prompts meets early, so the batch shrinks on the way
            let first = g
                .generate(prompts[1], &params, &[], &mut Rng::new(1), adapter, |_| {})
                .unwrap()
                .0;
            let eos = [first[2]];
            let rngs = row_rngs(&mut Rng::new(9), prompts.len());
            let batched = g
                .generate_batch(&prompts, &params, &eos, &mut rngs.clone(), adapter)
                .unwrap();
            for (i, p) in prompts.iter().enumerate() {
                let alone = g
                    .generate(p, &params, &eos, &mut rngs[i].clone(), adapter, |_| {})
                    .unwrap();
                assert_eq!(
                    batched[i], alone,
                    "T {temperature}, adapter {adapter:?}, prompt {i}"
                );
            }
        }
    }
}

/// peft-train --method dora --device cuda-sim: DoRA's magnitude and its rescaling on the GPU.
#[test]
fn dora_on_the_simulated_gpu_trains_like_the_cpu() {
    compare(Task::NextToken, &["--method", "dora"]);
}

/// peft-train --method ia3 --device cuda-sim: IA3's output (k, v) and input (down_proj)
/// scaling on the GPU.
#[test]
fn ia3_on_the_simulated_gpu_trains_like_the_cpu() {
    compare(Task::NextToken, &["--method", "ia3"]);
}

/// peft-train --method full --device cuda-sim: every base tensor trains on the GPU, and the
/// new values go back to the device after each optimizer step.
#[test]
fn full_fine_tuning_on_the_simulated_gpu_trains_like_the_cpu() {
    compare(Task::NextToken, &["--method", "full", "--lr", "1e-3"]);
}

/// --method freeze: the top block, the norms and the embedding (tied to the head) train.
#[test]
fn freeze_on_the_simulated_gpu_trains_like_the_cpu() {
    compare(
        Task::NextToken,
        &[
            "--method",
            "freeze",
            "--trainable",
            "last:1,norms,embed",
            "--lr",
            "1e-3",
        ],
    );
}

/// LoRA with trainable biases of the adapted layers (Qwen2's q, k, v have biases) and the
/// embedding in modules_to_save.
#[test]
fn lora_with_biases_and_modules_to_save_on_the_simulated_gpu_trains_like_the_cpu() {
    compare(
        Task::NextToken,
        &[
            "--model",
            "qwen2",
            "--bias",
            "lora_only",
            "--modules-to-save",
            "embed_tokens",
        ],
    );
}

/// peft-train --method prompt --device cuda-sim: virtual tokens in front of every sequence on
/// the GPU, their gradient from the first block's input gradient.
#[test]
fn prompt_tuning_on_the_simulated_gpu_trains_like_the_cpu() {
    compare(
        Task::NextToken,
        &["--method", "prompt", "--num-virtual-tokens", "4"],
    );
}

/// peft-train --method adapter --device cuda-sim: bottleneck adapters (Houlsby and parallel)
/// after attention and the MLP.
#[test]
fn bottleneck_adapters_on_the_simulated_gpu_train_like_the_cpu() {
    for variant in ["houlsby", "parallel"] {
        // The down projections' gradients are exactly zero at the start (the up projection
        // starts at zero) and tiny for the next steps, where Adam's ±lr steps follow their
        // bf16-noisy signs: their values are not compared; the losses and the up projections
        // are (and the engine check compares every gradient with a non-zero up projection).
        compare_except(
            Task::NextToken,
            &[
                "--method",
                "adapter",
                "--adapter-variant",
                variant,
                "--adapter-activation",
                "silu",
            ],
            &["down."],
        );
    }
}

/// peft-train --method prefix / ptuning-v2 --device cuda-sim: every layer's prefix keys and
/// values in front of the sequence's in the attention, positions after them.
#[test]
fn prefix_tuning_on_the_simulated_gpu_trains_like_the_cpu() {
    for method in ["prefix", "ptuning-v2"] {
        compare(
            Task::NextToken,
            &["--method", method, "--num-virtual-tokens", "4"],
        );
    }
}

/// Prompt tuning with the embedding in modules_to_save: the virtual rows add nothing to the
/// embedding's gradient.
#[test]
fn prompt_tuning_with_a_trainable_embedding_on_the_simulated_gpu_trains_like_the_cpu() {
    compare(
        Task::NextToken,
        &[
            "--method",
            "prompt",
            "--num-virtual-tokens",
            "3",
            "--modules-to-save",
            "embed_tokens",
        ],
    );
}

/// ppo-train --device cuda-sim: rollouts sampled on the GPU (top-k 1, so the same tokens as the
/// CPU's), the policy's and the reference's log-probabilities and entropies at the sampling
/// temperature, the reward model's scores and the PPO update (value head on the host) against
/// the same run on the CPU; with the bare base as the reference (adapters switched off), and
/// with an SFT adapter the policy starts from and the reference keeps (its values replace the
/// policy's on the device for the reference's passes, which the policy's then restore).
#[test]
fn ppo_on_the_simulated_gpu_trains_like_the_cpu() {
    use peftkit_core::train::ppo_math::KlEstimator;
    use peftkit_core::train::ppo_trainer::{self, PpoOptions};

    let tmp = tempfile::tempdir().unwrap();
    let rm = tmp.path().join("rm");
    train(&rm, "cpu", Task::Reward, &[]);
    let prompts = tmp.path().join("prompts.jsonl");
    let texts = [
        "apple river stone:",
        "cloud green quick:",
        "slow table apple:",
    ];
    let lines: Vec<String> = texts
        .iter()
        .cycle()
        .take(8)
        .map(|t| serde_json::json!({ "prompt": t }).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let model = root().join("tests/fixtures/models/llama_gqa");
    let sft = tmp.path().join("sft");
    train(&sft, "cpu", Task::NextToken, &[]);
    let ppo =
        |device: &str, init: Option<&Path>| -> (Vec<serde_json::Value>, Vec<(String, Vec<f32>)>) {
            let out = tmp.path().join(format!("ppo-{device}-{}", init.is_some()));
            let log = out.with_extension("jsonl");
            let argv = [
                "ppo-train",
                "--model",
                model.to_str().unwrap(),
                "--data",
                prompts.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--log",
                log.to_str().unwrap(),
                "--steps",
                "2",
                "--batch",
                "4",
                "--rank",
                "4",
                "--lr",
                // From an SFT adapter (B not zero) a step moves the policy more: a smaller
                // one keeps the greedy tokens the CPU's.
                if init.is_some() { "1e-3" } else { "1e-2" },
                "--seed",
                "5",
                "--device",
                device,
                "-q",
            ];
            let cli = Cli::parse_from(argv);
            let mut train = to_options(&cli.train).unwrap();
            train.clip = Some(1.0);
            let opts = PpoOptions {
                train,
                reward_model: rm.clone(),
                reward_adapter: None,
                init_adapter: init.map(Path::to_path_buf),
                response_length: 6,
                temperature: 0.7,
                top_p: 1.0,
                top_k: 1,
                kl_coef: 0.05,
                kl_estimator: KlEstimator::K1,
                adaptive_kl: None,
                gamma: 1.0,
                lam: 0.95,
                cliprange: 0.2,
                cliprange_value: 0.2,
                vf_coef: 0.1,
                ppo_epochs: 2,
                mini_batches: 2,
                missing_eos_penalty: None,
                whiten_rewards: false,
                ratio_threshold: Some(10.0),
                max_prompt_len: 64,
                eval_prompts: 3,
            };
            ppo_trainer::run(&opts).unwrap();
            let records = std::fs::read_to_string(&log)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let mut tensors = read_tensors(&out.join("adapter_model.safetensors"));
            tensors.extend(read_tensors(&out.join("value_head.safetensors")));
            (records, tensors)
        };
    for init in [None, Some(sft.as_path())] {
        let (cpu, cpu_w) = ppo("cpu", init);
        let (sim, sim_w) = ppo("cuda-sim", init);
        assert_eq!(cpu.len(), sim.len(), "log records");
        let mut compared = 0;
        for (c, g) in cpu.iter().zip(&sim) {
            // The same responses: greedy sampling picks the CPU's tokens.
            for key in ["response_length", "eval_response_length"] {
                assert_eq!(c.get(key), g.get(key), "{key}: {g} vs {c}");
            }
            for key in [
                "score_mean",
                "eval_score",
                "entropy",
                "pg_loss",
                "vf_loss",
                "kl",
                "value_mean",
            ] {
                let (Some(x), Some(y)) = (
                    c.get(key).and_then(|v| v.as_f64()),
                    g.get(key).and_then(|v| v.as_f64()),
                ) else {
                    continue;
                };
                // bf16 products against f32: a few 1e-3 of the larger of the values and 1.
                // From an SFT adapter the KL sums six tokens' log-ratios of two adapters that
                // differ by one step, each with its bf16 error: up to 10% (8% seen).
                let tol = if key == "kl" && init.is_some() {
                    1e-1
                } else {
                    3e-2
                };
                assert!(
                    (x - y).abs() < tol * x.abs().max(y.abs()).max(1.0),
                    "{key}: {y} on the simulator, {x} on the CPU (step {})",
                    c["step"]
                );
                compared += 1;
            }
        }
        assert!(compared >= 14, "only {compared} values compared");
        assert_eq!(cpu_w.len(), sim_w.len());
        for ((name, c), (_, g)) in cpu_w.iter().zip(&sim_w) {
            let num: f64 = c.iter().zip(g).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let den: f64 = c.iter().map(|a| (*a as f64).powi(2)).sum();
            assert!(den > 0.0, "{name} did not train");
            let rel = (num / den).sqrt();
            assert!(rel < 0.3, "{name}: relative difference {rel}");
        }
    }
}

/// rm-score --device cuda-sim (and PPO's reward): a reward adapter's scores from the GPU's
/// passes, the score head applied on the host, against the CPU's.
#[test]
fn reward_scores_on_the_simulated_gpu_match_the_cpu() {
    use peftkit_core::gpu::DeviceSpec;
    use peftkit_core::model::Model;
    use peftkit_core::tokenizer::TextTokenizer;
    use peftkit_core::train::backend::Backend;
    use peftkit_core::train::preference::{load_reward_adapter, reward_pad, score_sequences_on};

    let tmp = tempfile::tempdir().unwrap();
    let rm = tmp.path().join("rm");
    train(&rm, "cpu", Task::Reward, &[]);
    let dir = root().join("tests/fixtures/models/llama_gqa");
    let tok = TextTokenizer::load(&dir).unwrap();
    let model = Model::load(&dir).unwrap();
    let seqs: Vec<Vec<u32>> = [
        "apple river stone: green quick yes yes",
        "apple river stone: green quick no no",
        "a",
    ]
    .iter()
    .map(|t| tok.encode(t).unwrap())
    .collect();
    let pad = reward_pad(&model, &tok);
    let scores = |device: DeviceSpec| {
        let mut state = load_reward_adapter(&model, &rm).unwrap();
        let mut backend = Backend::for_eval(device, &model, &state).unwrap();
        score_sequences_on(&mut backend, &model, &mut state, &seqs, pad, 2).unwrap()
    };
    let (cpu, sim) = (scores(DeviceSpec::Cpu), scores(DeviceSpec::Sim));
    let spread = cpu.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(spread > 0.0);
    for (c, g) in cpu.iter().zip(&sim) {
        assert!(
            (c - g).abs() < 2e-2 * spread,
            "score {g} on the simulator, {c} on the CPU"
        );
    }
}

/// GPT-2 (LayerNorm, learned positions, fused c_attn, GELU MLP with biases) from the command
/// line: LoRA on every linear layer, and full fine-tuning (norm biases and the position
/// table train too).
#[test]
fn gpt2_on_the_simulated_gpu_trains_like_the_cpu() {
    compare(
        Task::NextToken,
        &["--model", "gpt2", "--target", "c_attn,c_proj,c_fc"],
    );
    // The key third of c_attn's bias has an exactly zero gradient (a constant added to every
    // key shifts a query's scores alike, and softmax ignores it): Adam turns its rounding
    // noise into ±lr steps of random sign on both devices. Its gradient is compared tensor by
    // tensor in peftkit-core's engine check (full fine-tuning on gpt2).
    compare_except(
        Task::NextToken,
        &["--model", "gpt2", "--method", "full", "--lr", "1e-4"],
        &["c_attn.bias"],
    );
}

/// AdamW on the device (masters and moments never on the host during training), for full
/// fine-tuning and for LoRA: a run stopped after 2 steps and resumed from its checkpoint ends
/// where an uninterrupted run does, so the checkpoint got the device's values and moments, and
/// the resumed run took them back.
#[test]
fn device_optimizer_checkpoints_resume_exactly() {
    fn with<'a>(common: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        common.iter().chain(extra).copied().collect()
    }
    for (method, lr, min_changed) in [("full", "1e-4", 10), ("lora", "1e-3", 4)] {
        let tmp = tempfile::tempdir().unwrap();
        let common = ["--method", method, "--lr", lr, "--schedule", "constant"];
        let whole = train(
            &tmp.path().join("whole"),
            "cuda-sim",
            Task::NextToken,
            &with(&common, &["--steps", "4"]),
        );
        let part = tmp.path().join("part");
        train(
            &part,
            "cuda-sim",
            Task::NextToken,
            &with(&common, &["--steps", "2", "--save-every", "2"]),
        );
        let resumed = train(
            &part,
            "cuda-sim",
            Task::NextToken,
            &with(
                &common,
                &["--steps", "4", "--resume", part.to_str().unwrap()],
            ),
        );
        assert_eq!(whole.adapter.len(), resumed.adapter.len());
        let mut changed = 0;
        for ((name, a), (_, b)) in whole.adapter.iter().zip(&resumed.adapter) {
            let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
            let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
            if den > 0.0 {
                changed += 1;
                assert!(
                    (num / den).sqrt() < 1e-3,
                    "{method} {name}: {}",
                    (num / den).sqrt()
                );
            }
        }
        assert!(
            changed >= min_changed,
            "{method}: only {changed} tensors changed"
        );
    }
}

/// GRPO's objective on the GPU engine (the LM head at the sampling temperature where the hidden
/// states live, and back): the log-probs, the loss and the gradient's norm of TRL's clipped
/// case (tests/fixtures/grpo) against the CPU engine, without and with the entropy bonus.
#[test]
fn grpo_objective_on_the_simulated_gpu_matches_the_cpu() {
    use peftkit_core::gpu::DeviceSpec;
    use peftkit_core::model::Model;
    use peftkit_core::rng::Rng;
    use peftkit_core::train::backend::Backend;
    use peftkit_core::train::engine::{Batch, Engine};
    use peftkit_core::train::grpo_math::{GrpoLoss, LossType, RatioLevel, StepShare};
    use peftkit_core::train::grpo_objective::{GrpoObjective, GrpoSeq};
    use peftkit_core::train::optim::AdamW;
    use peftkit_core::train::params::TrainState;

    let dir = root().join("tests/fixtures/grpo");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let ragged = |v: &serde_json::Value| -> Vec<Vec<f64>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    let prompts: Vec<Vec<u32>> = r["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let completions: Vec<Vec<u32>> = r["completion_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let case = &r["loss_cases"]["clipped"];
    let old = ragged(&case["old_per_token_logps"]);
    let refe = ragged(&r["logps"]["reference"]);
    let adv: Vec<f64> = r["advantages"]["group"]["advantages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let seqs: Vec<Vec<u32>> = completions
        .iter()
        .enumerate()
        .map(|(i, c)| [prompts[i / 4].clone(), c.clone()].concat())
        .collect();
    // (device, entropy bonus): the bonus's gradient runs through the cross-entropy kernel;
    // a large weight (2) makes it dominate the gradient, so that its kernel path is what the
    // norms compare
    let run = |device: DeviceSpec, entropy_coef: f64| {
        let mut model = Model::load(&root().join("tests/fixtures/models/llama_gqa")).unwrap();
        let mut state = TrainState::new(model.linears().len());
        peftkit_core::train::lora::load_adapter(&dir.join("adapter_init"), &model, &mut state)
            .unwrap();
        let mut backend = Backend::new(device, &model, &state).unwrap();
        let data: Vec<GrpoSeq> = (0..seqs.len())
            .map(|i| GrpoSeq {
                prompt_len: prompts[i / 4].len(),
                mask: vec![true; completions[i].len()],
                advantage: adv[i],
                old_logp: Some(old[i].clone()),
                ref_logp: Some(refe[i].clone()),
            })
            .collect();
        let tokens = data.iter().map(|d| d.mask.len()).sum();
        let loss = GrpoLoss {
            loss_type: LossType::Dapo,
            epsilon_low: 0.2,
            epsilon_high: 0.28,
            delta: Some(1.5),
            beta: 0.04,
            kl_ratio: true,
            level: RatioLevel::Token,
            max_completion_len: 8,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            top_entropy_quantile: 1.0,
            vespo: Default::default(),
            entropy_coef,
            off_policy_threshold: None,
        };
        let share = StepShare {
            grad_accum: 1,
            step_tokens: tokens,
        };
        let mut obj = GrpoObjective::new(data, loss, share, 0.7);
        let labels: Vec<Vec<i32>> = seqs.iter().map(|s| vec![-100; s.len()]).collect();
        let b = Batch {
            ids: seqs.iter().map(Vec::as_slice).collect(),
            labels: labels.iter().map(Vec::as_slice).collect(),
        };
        state.zero_grads();
        {
            let engine = Engine::new(&model, &state);
            backend
                .forward_backward_with(
                    &engine,
                    &model,
                    &mut state,
                    &b,
                    &mut Rng::new(0),
                    true,
                    &mut obj,
                )
                .unwrap();
        }
        let norm = backend
            .clip_and_step(&AdamW::default(), &mut model, &mut state, None, 1e-3, 1)
            .unwrap();
        (obj.out.loss, obj.logp, norm)
    };
    let mut norms = Vec::new();
    for coef in [0.0, 2.0] {
        let (cl, clp, cn) = run(DeviceSpec::Cpu, coef);
        let (gl, glp, gn) = run(DeviceSpec::Sim, coef);
        // bf16 products against f32; the loss is a mean of ±advantage terms of order 1 that
        // nearly cancel, so its error is absolute
        assert!(
            (cl - gl).abs() < 1e-2,
            "entropy bonus {coef}: loss {gl} on the simulator, {cl} on the CPU"
        );
        for (c, g) in clp.iter().flatten().zip(glp.iter().flatten()) {
            assert!(
                (c - g).abs() < 5e-2 * c.abs().max(1.0),
                "log-prob {g} vs {c}"
            );
        }
        assert!(cn > 0.0);
        assert!(
            (cn - gn).abs() < 5e-2 * cn,
            "entropy bonus {coef}: gradient norm {gn} on the simulator, {cn} on the CPU"
        );
        norms.push(cn);
    }
    // the bonus changes the gradient (so the comparison above saw its kernel path)
    assert!((norms[0] - norms[1]).abs() > 0.1 * norms[0], "{norms:?}");
}

//! gpu-check: the GPU backend's self-test and benchmark. Every kernel against the CPU path
//! (with its speed against the memory or compute roofline), one LoRA/QLoRA training step
//! against the CPU engine, and training tokens/s and peak GPU memory on a model folder.

use clap::Parser;
use peftkit_core::gpu::DeviceSpec;
use peftkit_core::{cli, Error};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Check the CUDA backend against the CPU path and measure LoRA/QLoRA training speed",
    after_help = "Examples:
  gpu-check                                        # kernels vs CPU, speeds vs roofline, NCCL on one rank
  gpu-check --engine tests/fixtures/models/llama_gqa,tests/fixtures/models/qwen2    # + one LoRA and one QLoRA step vs the CPU engine
  gpu-check --no-kernels --bench /tmp/llama1b --method qlora --batch 4 --seq 1024 --json out.json

Needs a build with the cuda feature (`make build-cuda`) and an NVIDIA driver; the CUDA
libraries (libcuda, libnvrtc, libcublas) are loaded at run time. Exit code 5 when a check fails."
)]
struct Args {
    /// CUDA device, or cuda-sim: the kernels simulated on the CPU (a build with the cuda-sim
    /// feature; small shapes, nothing timed)
    #[arg(long, default_value = "cuda:0", value_name = "cuda:N")]
    device: String,
    /// Skip the kernel checks
    #[arg(long)]
    no_kernels: bool,
    /// Model folders (comma-separated) for the whole-step check: one GPU LoRA and one QLoRA
    /// step against the CPU engine
    #[arg(long, value_name = "DIR,...", value_delimiter = ',')]
    engine: Vec<PathBuf>,
    /// Model folder to benchmark training on (random tokens)
    #[arg(long, value_name = "DIR")]
    bench: Option<PathBuf>,
    /// Benchmarked methods, comma-separated: lora, qlora
    #[arg(long, default_value = "lora,qlora", value_name = "LIST")]
    method: String,
    #[arg(long, default_value_t = 4, value_name = "N")]
    batch: usize,
    #[arg(long, default_value_t = 1024, value_name = "N")]
    seq: usize,
    /// Timed steps (after the warm-up steps)
    #[arg(long, default_value_t = 8, value_name = "N")]
    steps: usize,
    #[arg(long, default_value_t = 2, value_name = "N")]
    warmup: usize,
    #[arg(long, default_value_t = 16, value_name = "R")]
    rank: usize,
    /// LoRA targets: module names, or all-linear
    #[arg(long, default_value = "q_proj,v_proj", value_name = "LIST")]
    targets: String,
    /// Write all results as one JSON document
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    #[command(flatten)]
    verbosity: cli::Verbosity,
}

fn main() {
    let a = cli::parse::<Args>();
    a.verbosity.apply();
    cli::show_options(&a);
    cli::run(|| {
        let dev = DeviceSpec::parse(&a.device)?;
        if !dev.is_gpu() {
            return Err(Error::usage("gpu-check needs --device cuda:N or cuda-sim"));
        }
        dev.check_available()?;
        run(&a, dev)
    })
}

#[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
fn run(_: &Args, _: DeviceSpec) -> peftkit_core::Result<()> {
    unreachable!("check_available refuses a GPU in a build without the features")
}

#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn run(a: &Args, dev: DeviceSpec) -> peftkit_core::Result<()> {
    use peftkit_core::gpu::{check, device::Gpu};
    use peftkit_core::train::lora::Targets;
    use serde_json::json;
    let mut gpu = Gpu::open(dev)?;
    cli::info(format!("{} ({dev})", gpu.name()));
    let mut out = json!({"gpu": gpu.name()});
    let mut failed = 0;
    if !a.no_kernels {
        let shapes = if dev == DeviceSpec::Sim {
            check::KernelShapes::simulator()
        } else {
            check::KernelShapes::device()
        };
        let (v, f) = check::kernels(&gpu, &shapes)?;
        out["kernels"] = v;
        failed += f;
        #[cfg(feature = "cuda")]
        if dev != DeviceSpec::Sim {
            let (v, f) = check::nccl_one_rank(&gpu)?;
            out["nccl"] = v;
            failed += f;
        }
    }
    if !a.engine.is_empty() {
        let mut rows = Vec::new();
        // Every method: LoRA, QLoRA, DoRA, IA3, full, prompt, bottleneck, prefix tuning.
        let cases = check::EngineCase::every();
        for (dir, &c) in a
            .engine
            .iter()
            .flat_map(|d| cases.iter().map(move |c| (d, c)))
        {
            cli::info(format!("{}:", dir.display()));
            let (v, f, g) = check::engine_vs_cpu(gpu, dir, c)?;
            gpu = g;
            rows.push(json!({"model": dir, "case": format!("{c:?}"), "checks": v}));
            failed += f;
        }
        // Evaluation passes, with the adapters on and off (DPO's reference), and generation
        // (the KV cache) against the CPU decoder, teacher-forced.
        for dir in &a.engine {
            cli::info(format!("{} (evaluation):", dir.display()));
            let (v, f, g) = check::eval_vs_cpu(gpu, dir)?;
            gpu = g;
            rows.push(json!({"model": dir, "eval": true, "checks": v}));
            failed += f;
            let model = peftkit_core::model::Model::load(dir)?;
            let state = peftkit_core::train::params::TrainState::new(model.linears().len());
            let opts = peftkit_core::model::ForwardOptions::default();
            let (worst, g) = check::decode_vs_cpu(gpu, &model, &state, &opts)?;
            gpu = g;
            let pass = worst < 5e-2;
            cli::info(format!(
                "generation vs CPU            error {worst:.2e} (tolerance 5e-2) {}",
                if pass { "ok" } else { "FAILED" }
            ));
            failed += usize::from(!pass);
            rows.push(json!({"model": dir, "generation": true, "error": worst, "pass": pass}));
        }
        out["engine"] = json!(rows);
    }
    if let Some(dir) = &a.bench {
        let mut rows = Vec::new();
        for m in a.method.split(',').map(str::trim).filter(|m| !m.is_empty()) {
            let q4 = match m {
                "lora" => false,
                "qlora" => true,
                _ => {
                    return Err(Error::usage(format!(
                        "unknown --method {m}; supported: lora, qlora"
                    )))
                }
            };
            let o = check::BenchOptions {
                q4,
                batch: a.batch,
                seq: a.seq,
                steps: a.steps,
                warmup: a.warmup,
                rank: a.rank,
                targets: Targets::parse(&a.targets),
            };
            let (v, g) = check::bench(gpu, dir, &o)?;
            gpu = g;
            rows.push(v);
        }
        out["bench"] = json!(rows);
    }
    let text = serde_json::to_string_pretty(&out).expect("json");
    match &a.json {
        Some(p) => peftkit_core::io::atomic::write_file(p, text.as_bytes())?,
        None => println!("{text}"),
    }
    if failed > 0 {
        return Err(Error::Numeric(format!("{failed} GPU check(s) failed")));
    }
    Ok(())
}

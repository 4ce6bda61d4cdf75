//! Where a training step's forward and backward pass run: the CPU [`Engine`], or the GPU
//! engine (`--device cuda:N`, cargo feature `cuda`). The trainer's loop, optimizer,
//! checkpoints and output are the same for both: the GPU engine adds its gradients into the
//! same [`TrainState`] the CPU one does.

use super::engine::{Batch, Engine, StepStats};
use super::params::TrainState;
use crate::error::Result;
use crate::gpu::DeviceSpec;
use crate::model::Model;
use crate::rng::Rng;

pub enum Backend {
    Cpu,
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    Cuda(Box<crate::gpu::engine::GpuEngine>),
}

impl Backend {
    /// Opens the device and uploads the frozen model (GPU), or nothing (CPU).
    pub fn new(device: DeviceSpec, model: &Model, state: &TrainState) -> Result<Self> {
        device.check_available()?;
        match device {
            DeviceSpec::Cpu => {
                let _ = (model, state);
                Ok(Self::Cpu)
            }
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            DeviceSpec::Cuda(_) | DeviceSpec::Sim => {
                let gpu = crate::gpu::device::Gpu::open(device)?;
                crate::cli::info(format!("training on {} ({device})", gpu.name()));
                Ok(Self::Cuda(Box::new(crate::gpu::engine::GpuEngine::new(
                    gpu, model, state,
                )?)))
            }
            #[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
            DeviceSpec::Cuda(_) | DeviceSpec::Sim => {
                unreachable!("check_available refuses a GPU without the features")
            }
        }
    }

    /// One micro-batch: [`Engine::forward_backward`] on the CPU, or its GPU twin.
    pub fn forward_backward(
        &mut self,
        cpu: &Engine,
        state: &mut TrainState,
        batch: &Batch,
        loss_scale: f32,
        rng: &mut Rng,
    ) -> Result<StepStats> {
        match self {
            Self::Cpu => cpu.forward_backward(state, batch, loss_scale, rng),
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Self::Cuda(g) => g.forward_backward(state, batch, loss_scale, rng),
        }
    }
}

impl Backend {
    /// The loss of one evaluation batch, without gradients or dropout: `cpu` must be an
    /// evaluation engine ([`Engine::for_eval`]); the GPU runs its own forward pass.
    pub fn eval(
        &mut self,
        cpu: &Engine,
        state: &mut TrainState,
        batch: &Batch,
    ) -> Result<StepStats> {
        match self {
            Self::Cpu => cpu.forward_backward(state, batch, 0.0, &mut Rng::new(0)),
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Self::Cuda(g) => g.eval(state, batch),
        }
    }
}

/// Refuses `--device cuda` for a trainer whose objective has no GPU path yet.
pub fn cpu_only(device: DeviceSpec, tools: &str) -> Result<()> {
    if device == DeviceSpec::Cpu {
        return Ok(());
    }
    device.check_available()?;
    Err(crate::error::Error::usage(format!(
        "{tools} run on the CPU only for now (--device cuda covers peft-train's LoRA and QLoRA); use --device cpu"
    )))
}

//! Where a training step's forward and backward pass run: the CPU [`Engine`], or the GPU
//! engine (`--device cuda:N`, cargo feature `cuda`). The trainer's loop, optimizer,
//! checkpoints and output are the same for both: the GPU engine adds its gradients into the
//! same [`TrainState`] the CPU one does.

use super::engine::{Batch, Engine, Objective, StepStats};
use super::optim::{clip_grad_norm, AdamW};
use super::params::TrainState;
use super::rollout::{self, Response};
use crate::error::Result;
use crate::generate::SamplingParams;
use crate::gpu::DeviceSpec;
use crate::model::Model;
use crate::rng::Rng;

pub enum Backend {
    Cpu,
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    Cuda(Box<crate::gpu::engine::GpuEngine>),
}

impl Backend {
    pub fn is_cpu(&self) -> bool {
        matches!(self, Self::Cpu)
    }

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
    /// Clips the gradients to a global norm of `clip` and takes one AdamW step at `lr`
    /// (optimizer step `step`, 1-based); returns the norm before clipping. On a GPU the base
    /// tensors that train then reach the device: their new values are uploaded, or, with its
    /// device optimizer (gpu/engine/optim.rs), they step there, their gradients never having
    /// left it.
    pub fn clip_and_step(
        &mut self,
        opt: &AdamW,
        model: &mut Model,
        state: &mut TrainState,
        clip: Option<f32>,
        lr: f32,
        step: u64,
    ) -> Result<f32> {
        match self {
            Self::Cpu => {
                let norm = clip_grad_norm(state, clip);
                opt.step(state, model, lr, step);
                Ok(norm)
            }
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Self::Cuda(g) => g.clip_and_step(opt, model, state, clip, lr, step),
        }
    }

    /// Brings what only the device holds (the device optimizer's values and moments) back into
    /// `model` and `state`: before a checkpoint or the output is written.
    pub fn sync_to_host(&mut self, model: &mut Model, state: &mut TrainState) -> Result<()> {
        match self {
            Self::Cpu => {
                let _ = (model, state);
                Ok(())
            }
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Self::Cuda(g) => g.sync_to_host(model, state),
        }
    }

    /// Data parallel: sums the gradients a GPU keeps on the device (its optimizer's tensors)
    /// over the ranks, after `dist::all_reduce_grads` summed the host's. Nothing on a CPU.
    pub fn all_reduce_device_grads(
        &mut self,
        comm: &mut dyn crate::dist::Communicator,
    ) -> Result<()> {
        match self {
            Self::Cpu => {
                let _ = comm;
                Ok(())
            }
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Self::Cuda(g) => g.all_reduce_device_grads(comm),
        }
    }

    /// After the host's base values changed (an optimizer step, a resumed checkpoint): a GPU
    /// uploads the base tensors that train (full and partial fine-tuning).
    pub fn after_optimizer_step(&mut self, model: &Model) -> Result<()> {
        match self {
            Self::Cpu => {
                let _ = model;
                Ok(())
            }
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Self::Cuda(g) => g.refresh_base(model),
        }
    }

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

impl Backend {
    /// One micro-batch with any objective (reward models, DPO): training when `train`, else
    /// evaluation (no dropout, no gradients). `cpu` is the CPU engine for either (built with
    /// [`Engine::new`] or [`Engine::for_eval`] to match); the GPU runs its own passes and the
    /// objective on the host (docs/gpu.md).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_with(
        &mut self,
        cpu: &Engine,
        model: &Model,
        state: &mut TrainState,
        batch: &Batch,
        rng: &mut Rng,
        train: bool,
        objective: &mut dyn Objective,
    ) -> Result<StepStats> {
        match self {
            Self::Cpu => {
                let _ = (model, train);
                cpu.forward_backward_with(state, batch, rng, objective)
            }
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Self::Cuda(g) => {
                g.forward_backward_with(model, state, batch, train.then_some(rng), objective)
            }
        }
    }

    /// An evaluation pass of the base model without the adapters (DPO's reference
    /// log-probabilities): on the CPU `cpu` (an evaluation engine) runs `base`, a state
    /// without adapters; the GPU switches the adapters of `policy` off for the pass.
    pub fn reference_with(
        &mut self,
        cpu: &Engine,
        model: &Model,
        base: &mut TrainState,
        policy: &mut TrainState,
        batch: &Batch,
        objective: &mut dyn Objective,
    ) -> Result<StepStats> {
        match self {
            Self::Cpu => {
                let _ = (model, policy);
                cpu.forward_backward_with(base, batch, &mut Rng::new(0), objective)
            }
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Self::Cuda(g) => {
                let _ = base;
                g.set_adapters_enabled(false);
                let r = g.forward_backward_with(model, policy, batch, None, objective);
                g.set_adapters_enabled(true);
                r
            }
        }
    }
}

impl Backend {
    /// A backend for evaluation passes only (a reward model's scores): the model on the
    /// device with the adapters of `state`, nothing trainable required.
    pub fn for_eval(device: DeviceSpec, model: &Model, state: &TrainState) -> Result<Self> {
        device.check_available()?;
        match device {
            DeviceSpec::Cpu => Ok(Self::Cpu),
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            DeviceSpec::Cuda(_) | DeviceSpec::Sim => {
                let gpu = crate::gpu::device::Gpu::open(device)?;
                Ok(Self::Cuda(Box::new(
                    crate::gpu::engine::GpuEngine::for_eval(gpu, model, state)?,
                )))
            }
            #[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
            DeviceSpec::Cuda(_) | DeviceSpec::Sim => {
                let _ = (model, state);
                unreachable!("check_available refuses a GPU without the features")
            }
        }
    }

    /// One response per prompt sampled with the LoRA adapters of `state` (PPO's rollouts),
    /// all prompts stepped together, prompt `i`'s tokens drawn from `rngs[i]`
    /// ([`rollout::sample_responses_with`]). On the CPU the adapters are installed into
    /// `model`'s inference slot 0 for it.
    pub fn sample(
        &mut self,
        model: &mut Model,
        state: &TrainState,
        prompts: &[&[u32]],
        params: &SamplingParams,
        stop: &[u32],
        rngs: &mut [Rng],
    ) -> Result<Vec<Response>> {
        match self {
            Self::Cpu => {
                let mut policy = TrainState::new(model.linears().len());
                policy.lora = state.lora.clone();
                super::lora::install(model, policy, 0);
                let opts = crate::model::ForwardOptions { adapter: Some(0) };
                rollout::sample_responses(model, prompts, params, stop, rngs, &opts)
            }
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Self::Cuda(g) => {
                g.use_adapters_for_decoding(state)?;
                let mut dec = crate::gpu::decode::GpuBatchDecoder::new(
                    g,
                    prompts,
                    params.max_new_tokens,
                    model.config.max_positions,
                )?;
                rollout::sample_responses_with(&mut dec, prompts, params, stop, rngs)
            }
        }
    }
}

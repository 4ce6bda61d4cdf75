//! The NVIDIA GPU backend (`--device cuda:N`, cargo feature `cuda`): CUDA through cudarc, with
//! the CUDA libraries loaded at run time (the feature builds on machines without CUDA) and
//! our kernels compiled by NVRTC when a device is first opened. See docs/gpu.md.
//!
//! The same kernels and engine also run on the CPU (`--device cuda-sim`, feature `cuda-sim`),
//! a simulator that tests the GPU code where there is no GPU.
//!
//! Without either feature, asking for a GPU is a clear usage error.

use crate::error::{Error, Result};

#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
pub mod blas;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
pub mod check;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
pub mod decode;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
pub mod device;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
pub mod engine;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
pub mod flash;
#[cfg(feature = "cuda")]
pub mod ptxas;
#[cfg(feature = "cuda-sim")]
mod sim;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
pub mod weights;
#[cfg(feature = "cuda")]
pub use cuda::compile_kernels_only;

/// Where a tool computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
    /// The GPU code run by the CPU simulator (a `cuda-sim` build).
    Sim,
}

impl DeviceSpec {
    /// `cpu`, `cuda` (= `cuda:0`), `cuda:N` or `cuda-sim`.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s == "cpu" {
            return Ok(Self::Cpu);
        }
        if s == "cuda-sim" {
            return Ok(Self::Sim);
        }
        if s == "cuda" {
            return Ok(Self::Cuda(0));
        }
        if let Some(n) = s.strip_prefix("cuda:") {
            if let Ok(i) = n.parse::<usize>() {
                return Ok(Self::Cuda(i));
            }
        }
        Err(Error::usage(format!(
            "unknown --device {s}; expected cpu, cuda or cuda:N (or cuda-sim)"
        )))
    }

    /// Refuses a CUDA device in a build without the `cuda` feature, and the simulator in a
    /// build without `cuda-sim`.
    pub fn check_available(self) -> Result<()> {
        if matches!(self, Self::Cuda(_)) && !cfg!(feature = "cuda") {
            return Err(Error::usage(
                "this build has no GPU support; build the GPU tools with `make build-cuda` (see docs/gpu.md)",
            ));
        }
        if self == Self::Sim && !cfg!(feature = "cuda-sim") {
            return Err(Error::usage(
                "this build has no GPU simulator; build with `--features peftkit-core/cuda-sim` (see docs/gpu.md)",
            ));
        }
        Ok(())
    }

    /// A device that runs the GPU engine (a real GPU or the simulator).
    pub fn is_gpu(self) -> bool {
        self != Self::Cpu
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Sim => write!(f, "cuda-sim"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DeviceSpec;

    #[test]
    fn parses_devices() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("cuda").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(DeviceSpec::parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::parse("cuda-sim").unwrap(), DeviceSpec::Sim);
        assert!(DeviceSpec::parse("gpu").is_err());
        assert!(DeviceSpec::parse("cuda:x").is_err());
    }
}

//! The NVIDIA GPU backend (`--device cuda:N`, cargo feature `cuda`): CUDA through cudarc, with
//! the CUDA libraries loaded at run time (the feature builds on machines without CUDA) and
//! our kernels compiled by NVRTC when a device is first opened. See docs/gpu.md.
//!
//! Without the feature, asking for a CUDA device is a clear usage error.

use crate::error::{Error, Result};

#[cfg(feature = "cuda")]
pub mod blas;
#[cfg(feature = "cuda")]
pub mod check;
#[cfg(feature = "cuda")]
pub mod device;
#[cfg(feature = "cuda")]
pub mod engine;
#[cfg(feature = "cuda")]
pub mod weights;

/// Where a tool computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s == "cpu" {
            return Ok(Self::Cpu);
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
            "unknown --device {s}; expected cpu, cuda or cuda:N"
        )))
    }

    /// Refuses a CUDA device in a build without the `cuda` feature.
    pub fn check_available(self) -> Result<()> {
        if matches!(self, Self::Cuda(_)) && !cfg!(feature = "cuda") {
            return Err(Error::usage(
                "this build has no GPU support; build the GPU tools with `make build-cuda` (see docs/gpu.md)",
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
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
        assert!(DeviceSpec::parse("gpu").is_err());
        assert!(DeviceSpec::parse("cuda:x").is_err());
    }
}

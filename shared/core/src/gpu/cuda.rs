//! The CUDA backend: context, stream, cuBLAS handle and the kernels compiled by NVRTC for the
//! device's architecture when it is opened. Allocations come from the driver's stream-ordered
//! pool and go back to it on drop; everything runs on one stream, so event tracking is off.

use super::blas::{Blas, Gemm};
use super::device::{dev_err, Arg, Backend, KERNEL_NAMES};
use crate::error::{Error, Result};
use cudarc::driver::{
    result, CudaContext, CudaFunction, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

pub(super) const KERNELS: &str = include_str!("kernels.cu");

/// Kernels that may take more than 48 KB of dynamic shared memory (opted in at load).
const LARGE_SHARED_KERNELS: &[&str] = &[
    "cross_entropy_cached",
    "flash_fwd_d16",
    "flash_fwd_d32",
    "flash_fwd_d64",
    "flash_fwd_d80",
    "flash_fwd_d96",
    "flash_fwd_d128",
    "flash_bwd_d16",
    "flash_bwd_d32",
    "flash_bwd_d64",
    "flash_bwd_d80",
    "flash_bwd_d96",
    "flash_bwd_d128",
];

pub(crate) struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: Blas,
    kernels: HashMap<&'static str, CudaFunction>,
    /// The compute capability's major version (8 and up have bf16 tensor cores).
    major: i32,
    /// Dynamic shared memory `LARGE_SHARED_KERNELS` may take (bytes).
    max_dynamic_shared: usize,
    /// The device's ordinal, where it can prefetch managed memory (concurrent managed
    /// access: Linux, Pascal and later), for `prefetch_paged`.
    prefetch_to: Option<i32>,
}

/// Loads the CUDA driver library, catching the panic cudarc raises when it is absent.
pub(super) fn probe<T>(what: &str, f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(f);
    std::panic::set_hook(hook);
    r.map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let short = msg.split(" - ").next().unwrap_or("").to_string();
        Error::Device(format!(
            "{what}: {short} (is the NVIDIA driver installed and are the CUDA libraries on LD_LIBRARY_PATH?)"
        ))
    })
}

impl CudaBackend {
    /// Opens device `ordinal`, compiles the kernels (NVRTC) and creates the cuBLAS handle.
    pub fn open(ordinal: usize) -> Result<Self> {
        let n = probe("cannot load libcuda", CudaContext::device_count)?
            .map_err(|e| dev_err("CUDA driver", e))?;
        if ordinal as i32 >= n {
            return Err(Error::Device(format!(
                "cuda:{ordinal} requested but this machine has {n} CUDA device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| dev_err("cuda context", e))?;
        // One stream: ordering is implicit, event tracking would only add overhead.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| dev_err("compute capability", e))?;
        let ptx = compile(major, minor)?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| dev_err("loading the kernels", e))?;
        let mut kernels = HashMap::new();
        for &name in KERNEL_NAMES {
            let f = module
                .load_function(name)
                .map_err(|e| dev_err(&format!("kernel {name}"), e))?;
            kernels.insert(name, f);
        }
        // The kernels that lay out more than 48 KB of dynamic shared memory (the cached
        // cross-entropy, flash attention) may take what the device allows a block (less their
        // static shared memory, under 1 KB); where the opt-in fails, 48 KB.
        use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
        let optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_or(0, |v| v.max(0) as usize);
        let mut max_dynamic_shared = 48 << 10;
        if optin > (48 << 10) + 1024 {
            let want = optin - 1024;
            let ok = LARGE_SHARED_KERNELS.iter().all(|name| {
                kernels[name]
                    .set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        want as i32,
                    )
                    .is_ok()
            });
            if ok {
                max_dynamic_shared = want;
            }
        }
        let prefetch_to = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS)
            .is_ok_and(|v| v != 0)
            .then_some(ordinal as i32);
        let blas = probe("cannot load libcublas", {
            let s = stream.clone();
            move || Blas::new(s)
        })??;
        Ok(Self {
            ctx,
            stream,
            blas,
            kernels,
            major,
            max_dynamic_shared,
            prefetch_to,
        })
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| dev_err("cuda context", e))
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown GPU".into())
    }

    fn alloc(&self, bytes: usize, zeroed: bool) -> Result<(Box<dyn Any>, u64)> {
        let slice = if zeroed {
            self.stream.alloc_zeros::<u8>(bytes)
        } else {
            unsafe { self.stream.alloc::<u8>(bytes) }
        }
        .map_err(|e| dev_err(&format!("allocating {} MiB", bytes >> 20), e))?;
        let ptr = {
            let (p, _sync) = slice.device_ptr(&self.stream);
            p
        };
        Ok((Box::new(slice), ptr))
    }

    fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind()?;
        // From pageable memory the driver stages the data before it returns, so `src` may
        // go away at once.
        unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| dev_err("copy to device", e))
    }

    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| dev_err("copy to host", e))?;
        self.sync()
    }

    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(|e| dev_err("device copy", e))
    }

    fn zero(&self, dst: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        unsafe { result::memset_d8_async(dst, 0, bytes, self.stream.cu_stream()) }
            .map_err(|e| dev_err("memset", e))
    }

    fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| dev_err("kernel execution", e))
    }

    fn launch(&self, name: &str, grid: u32, block: u32, shared: u32, args: &[Arg]) -> Result<()> {
        let f = self
            .kernels
            .get(name)
            .ok_or_else(|| Error::Device(format!("unknown kernel {name}")))?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(v) | Arg::U64(v) => b.arg(v),
                Arg::I(v) => b.arg(v),
                Arg::L(v) => b.arg(v),
                Arg::F(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: shared,
        };
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| dev_err(&format!("launching {name}"), e))
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        self.blas.gemm(g)
    }

    fn device_used(&self) -> Option<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .ok()
            .map(|(free, total)| (total - free, total))
    }

    fn bf16_tensor_cores(&self) -> bool {
        self.major >= 8
    }

    fn max_dynamic_shared(&self) -> usize {
        self.max_dynamic_shared
    }

    fn prefetch_paged(&self, ptr: u64, bytes: usize) {
        let Some(id) = self.prefetch_to else { return };
        let location = cudarc::driver::sys::CUmemLocation {
            type_: cudarc::driver::sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id,
        };
        // A hint: a failure only means the pages come on demand, as without it.
        let _ = self.bind();
        let _ =
            unsafe { result::mem_prefetch_async(ptr, bytes, location, self.stream.cu_stream()) };
    }

    fn alloc_paged(&self, bytes: usize) -> Result<(Box<dyn Any>, u64)> {
        self.bind()?;
        let what = || format!("allocating {} MiB of managed memory", bytes >> 20);
        let flags = cudarc::driver::sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL;
        let ptr =
            unsafe { result::malloc_managed(bytes, flags) }.map_err(|e| dev_err(&what(), e))?;
        let owner = Managed {
            ptr,
            stream: self.stream.clone(),
        };
        unsafe { result::memset_d8_sync(ptr, 0, bytes) }.map_err(|e| dev_err(&what(), e))?;
        Ok((Box::new(owner), ptr))
    }
}

/// A managed allocation, freed when the stream's work on it is done.
struct Managed {
    ptr: u64,
    stream: Arc<CudaStream>,
}

impl Drop for Managed {
    fn drop(&mut self) {
        // Nothing to report to in a destructor: a failure here leaks the block.
        let _ = self.stream.context().bind_to_thread();
        let _ = self.stream.synchronize();
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// NVRTC compiles the kernels for this device's architecture.
fn compile(major: i32, minor: i32) -> Result<cudarc::nvrtc::Ptx> {
    compile_for(Box::leak(
        format!("compute_{major}{minor}").into_boxed_str(),
    ))
}

fn compile_for(arch: &'static str) -> Result<cudarc::nvrtc::Ptx> {
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    probe("cannot load libnvrtc", move || {
        cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts)
    })?
    .map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => Error::Device(format!(
            "kernels.cu does not compile: {}",
            log.to_string_lossy()
        )),
        e => dev_err("NVRTC", format!("{e:?}")),
    })
}

/// Compiles kernels.cu with NVRTC for `arch` (e.g. "compute_90") without a device: a test of
/// the kernel source on machines that have libnvrtc but no GPU. Returns the PTX size.
pub fn compile_kernels_only(arch: &'static str) -> Result<usize> {
    let src = compile_for(arch)?.to_src();
    for name in KERNEL_NAMES {
        if !src.contains(&format!(".entry {name}(")) {
            return Err(Error::Device(format!("kernel {name} missing from the PTX")));
        }
    }
    Ok(src.len())
}

#[cfg(test)]
mod tests {
    /// The kernel source compiles for Hopper (sm_90), Ampere (sm_80) and Turing (sm_75, with
    /// no bf16 tensor-core instruction in its PTX, which its driver could not load) wherever
    /// libnvrtc is loadable (no GPU needed); machines without it are told so (CI has no CUDA
    /// libraries; `make gpu-compile-check` fetches NVRTC from PyPI and runs this).
    #[test]
    fn kernels_compile_with_nvrtc() {
        for arch in ["compute_90", "compute_80", "compute_75"] {
            match super::compile_for(arch) {
                Ok(ptx) => {
                    let src = ptx.to_src();
                    eprintln!("kernels.cu → {} bytes of PTX for {arch}", src.len());
                    for name in super::KERNEL_NAMES {
                        assert!(src.contains(&format!(".entry {name}(")), "{name} missing");
                    }
                    let has_mma = src.contains("mma.sync");
                    assert_eq!(has_mma, arch != "compute_75", "mma.sync in the {arch} PTX");
                }
                Err(e) if e.to_string().contains("cannot load libnvrtc") => {
                    assert!(std::env::var_os("PEFTKIT_REQUIRE_NVRTC").is_none(), "{e}");
                    eprintln!("note: {e}; kernel compilation not checked");
                    return;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}

//! One CUDA device: context, stream, cuBLAS handle, the run-time compiled kernels, and
//! allocation with a high-water mark (the peak memory the benchmarks report).
//!
//! Everything runs on one stream, so buffers need no event tracking (it is switched off);
//! allocations come from the driver's stream-ordered pool and go back to it on drop.

use super::blas::Blas;
use crate::error::{Error, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const KERNELS: &str = include_str!("kernels.cu");

/// Names of the `extern "C"` kernels in kernels.cu.
const KERNEL_NAMES: &[&str] = &[
    "cast_f32_bf16",
    "cast_bf16_f32",
    "scale_to_bf16",
    "add_inplace",
    "add_bias",
    "dropout_bf16",
    "dropout_bwd_add",
    "embed_gather",
    "rmsnorm_fwd",
    "rmsnorm_bwd",
    "silu_mul_fwd",
    "silu_mul_bwd",
    "rope_permute",
    "rope_unpermute_bwd",
    "unpermute_bf16",
    "permute_bf16",
    "softmax_causal",
    "softmax_bwd",
    "cross_entropy",
    "gather_rows_bf16",
    "scatter_rows_f32",
    "dequant_q4_bf16",
    "dequant_q4_f32",
    "gemv_q4",
    "sum_squares",
];

/// Device errors are run-time failures of the machine, reported as such.
pub(crate) fn dev_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Device(format!("{what}: {e}"))
}

#[derive(Default)]
struct Usage {
    now: AtomicUsize,
    peak: AtomicUsize,
}

pub struct Gpu {
    pub ordinal: usize,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub(crate) blas: Blas,
    kernels: HashMap<&'static str, CudaFunction>,
    usage: Arc<Usage>,
}

/// A device allocation; `ptr` is its address for kernel arguments and cuBLAS.
pub struct DBuf {
    slice: CudaSlice<u8>,
    pub ptr: u64,
    pub bytes: usize,
    usage: Arc<Usage>,
}

impl Drop for DBuf {
    fn drop(&mut self) {
        self.usage
            .now
            .fetch_sub(self.slice.len(), Ordering::Relaxed);
    }
}

impl DBuf {
    /// Address of element `i` of a buffer of `elem`-byte elements.
    pub fn at(&self, i: usize, elem: usize) -> u64 {
        debug_assert!(i * elem <= self.bytes);
        self.ptr + (i * elem) as u64
    }
}

/// A kernel argument (pointers are device addresses).
#[derive(Clone, Copy)]
pub enum Arg {
    P(u64),
    I(i32),
    L(i64),
    F(f32),
    U64(u64),
}

/// Loads the CUDA driver library, catching the panic cudarc raises when it is absent.
fn probe<T>(what: &str, f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T> {
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

impl Gpu {
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
        let blas = probe("cannot load libcublas", {
            let s = stream.clone();
            move || Blas::new(s)
        })??;
        Ok(Self {
            ordinal,
            ctx,
            stream,
            blas,
            kernels,
            usage: Arc::new(Usage::default()),
        })
    }

    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown GPU".into())
    }

    /// Bytes allocated through [`Gpu::alloc`] now and at most so far.
    pub fn memory(&self) -> (usize, usize) {
        (
            self.usage.now.load(Ordering::Relaxed),
            self.usage.peak.load(Ordering::Relaxed),
        )
    }

    pub fn reset_peak(&self) {
        let now = self.usage.now.load(Ordering::Relaxed);
        self.usage.peak.store(now, Ordering::Relaxed);
    }

    /// Device memory in use by everything on the device (driver's view) and its total.
    pub fn device_used(&self) -> (usize, usize) {
        match self.ctx.mem_get_info() {
            Ok((free, total)) => (total - free, total),
            Err(_) => (0, 0),
        }
    }

    /// A zeroed allocation of `bytes` bytes.
    pub fn alloc(&self, bytes: usize) -> Result<DBuf> {
        let bytes = bytes.max(4);
        let slice = self
            .stream
            .alloc_zeros::<u8>(bytes)
            .map_err(|e| dev_err(&format!("allocating {} MiB", bytes >> 20), e))?;
        Ok(self.track(slice, bytes))
    }

    /// An allocation whose contents are undefined: for buffers a kernel or a product
    /// (beta = 0) overwrites entirely; zeroing them would cost a memory pass each.
    pub fn alloc_uninit(&self, bytes: usize) -> Result<DBuf> {
        let bytes = bytes.max(4);
        let slice = unsafe { self.stream.alloc::<u8>(bytes) }
            .map_err(|e| dev_err(&format!("allocating {} MiB", bytes >> 20), e))?;
        Ok(self.track(slice, bytes))
    }

    pub fn uninit_f32(&self, n: usize) -> Result<DBuf> {
        self.alloc_uninit(n * 4)
    }

    pub fn uninit_bf16(&self, n: usize) -> Result<DBuf> {
        self.alloc_uninit(n * 2)
    }

    fn track(&self, slice: CudaSlice<u8>, bytes: usize) -> DBuf {
        let ptr = {
            let (p, _sync) = slice.device_ptr(&self.stream);
            p
        };
        let now = self.usage.now.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.usage.peak.fetch_max(now, Ordering::Relaxed);
        DBuf {
            slice,
            ptr,
            bytes,
            usage: self.usage.clone(),
        }
    }

    pub fn alloc_f32(&self, n: usize) -> Result<DBuf> {
        self.alloc(n * 4)
    }

    pub fn alloc_bf16(&self, n: usize) -> Result<DBuf> {
        self.alloc(n * 2)
    }

    pub fn upload<T: Copy>(&self, data: &[T]) -> Result<DBuf> {
        let bytes = std::mem::size_of_val(data);
        let mut b = self.alloc(bytes)?;
        // Safety: plain-old-data viewed as bytes.
        let raw = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, bytes) };
        self.stream
            .memcpy_htod(raw, &mut b.slice)
            .map_err(|e| dev_err("copy to device", e))?;
        Ok(b)
    }

    /// Overwrites the start of `dst` with `data`.
    pub fn write<T: Copy>(&self, dst: &mut DBuf, data: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        assert!(bytes <= dst.bytes, "write past the end of a device buffer");
        let raw = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, bytes) };
        let mut view = dst.slice.slice_mut(0..bytes);
        self.stream
            .memcpy_htod(raw, &mut view)
            .map_err(|e| dev_err("copy to device", e))
    }

    pub fn upload_bf16(&self, data: &[f32]) -> Result<DBuf> {
        let h: Vec<u16> = data
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect();
        self.upload(&h)
    }

    /// Copies `n` f32 values starting at byte 0 of `src` to the host (straight into the
    /// vector's memory: no conversion pass).
    pub fn download_f32(&self, src: &DBuf, n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n];
        // Safety: f32 has no invalid bit patterns; the byte view covers exactly `out`.
        let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, n * 4) };
        let view = src.slice.slice(0..n * 4);
        self.stream
            .memcpy_dtoh(&view, bytes)
            .map_err(|e| dev_err("copy to host", e))?;
        self.sync()?;
        Ok(out)
    }

    pub fn download_bf16(&self, src: &DBuf, n: usize) -> Result<Vec<f32>> {
        let mut bytes = vec![0u8; n * 2];
        let view = src.slice.slice(0..n * 2);
        self.stream
            .memcpy_dtoh(&view, &mut bytes[..])
            .map_err(|e| dev_err("copy to host", e))?;
        self.sync()?;
        Ok(bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect())
    }

    /// Zeroes the first `bytes` bytes of `b`.
    pub fn zero(&self, b: &mut DBuf, bytes: usize) -> Result<()> {
        let mut view = b.slice.slice_mut(0..bytes.min(b.bytes));
        self.stream
            .memset_zeros(&mut view)
            .map_err(|e| dev_err("memset", e))
    }

    pub fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| dev_err("kernel execution", e))
    }

    /// Launches kernel `name` on a 1-D grid.
    pub fn launch(&self, name: &str, grid: u32, block: u32, args: &[Arg]) -> Result<()> {
        self.launch_shared(name, grid, block, 0, args)
    }

    /// [`Gpu::launch`] with `shared` bytes of dynamic shared memory per block.
    pub fn launch_shared(
        &self,
        name: &str,
        grid: u32,
        block: u32,
        shared: u32,
        args: &[Arg],
    ) -> Result<()> {
        let f = self
            .kernels
            .get(name)
            .unwrap_or_else(|| panic!("unknown kernel {name}"));
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
            grid_dim: (grid.max(1), 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: shared,
        };
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| dev_err(&format!("launching {name}"), e))
    }

    /// Launches an elementwise (grid-stride) kernel over `n` items.
    pub fn launch_n(&self, name: &str, n: usize, args: &[Arg]) -> Result<()> {
        let grid = n.div_ceil(256).clamp(1, 132 * 16) as u32;
        self.launch(name, grid, 256, args)
    }

    /// Launches a kernel with one block per row.
    pub fn launch_rows(&self, name: &str, rows: usize, cols: usize, args: &[Arg]) -> Result<()> {
        let block = if cols >= 4096 {
            1024
        } else if cols >= 1024 {
            512
        } else if cols >= 256 {
            256
        } else {
            64
        };
        self.launch(name, rows as u32, block, args)
    }

    /// RMSNorm forward: one block per row, sized so each thread holds up to 16 of the row's
    /// values in registers (the kernel's single-read path).
    pub fn launch_norm(&self, rows: usize, hidden: usize, args: &[Arg]) -> Result<()> {
        let block = (hidden.div_ceil(16).div_ceil(32) * 32).clamp(32, 1024) as u32;
        self.launch("rmsnorm_fwd", rows as u32, block, args)
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
    /// The kernel source compiles for Hopper (sm_90) and Ampere (sm_80) wherever libnvrtc is
    /// loadable (no GPU needed); machines without it are told so (CI has no CUDA libraries;
    /// `make gpu-compile-check` fetches NVRTC from PyPI and runs this).
    #[test]
    fn kernels_compile_with_nvrtc() {
        for arch in ["compute_90", "compute_80"] {
            match super::compile_kernels_only(arch) {
                Ok(n) => eprintln!("kernels.cu → {n} bytes of PTX for {arch}"),
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

//! One GPU: a backend that runs the work (CUDA through cudarc, or the CPU simulator), device
//! allocations with a high-water mark (the peak memory the benchmarks report), and kernel
//! launches with the launch shapes every caller shares.
//!
//! Buffers are plain device addresses ([`DBuf::ptr`]); everything runs in one stream order,
//! so buffers need no event tracking.

use super::blas::Gemm;
use super::DeviceSpec;
use crate::error::{Error, Result};
use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Names of the `extern "C"` kernels in kernels.cu.
pub(crate) const KERNEL_NAMES: &[&str] = &[
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
    "cross_entropy_cached",
    "gather_rows_bf16",
    "scatter_rows_f32",
    "dequant_q4_bf16",
    "dequant_q4_f32",
    "gemv_q4",
    "sum_squares",
    "flash_fwd_d16",
    "flash_fwd_d32",
    "flash_fwd_d64",
    "flash_fwd_d80",
    "flash_fwd_d96",
    "flash_fwd_d128",
    "flash_bwd_dot",
    "flash_bwd_d16",
    "flash_bwd_d32",
    "flash_bwd_d64",
    "flash_bwd_d80",
    "flash_bwd_d96",
    "flash_bwd_d128",
    "attn_decode",
    "dora_norm",
    "dora_scale",
    "dora_bwd",
    "ia3_scale_input",
    "ia3_input_bwd",
    "rmsnorm_dw",
    "col_sum_bf16",
    "embed_grad",
    "adapter_act",
    "adapter_act_bwd",
    "prefix_to_heads",
    "prefix_grad",
    "layernorm_fwd",
    "layernorm_bwd",
    "layernorm_dwb",
    "copy_cols_f32",
    "copy_cols_bf16",
    "gelu_fwd",
    "gelu_bwd",
    "adamw_step",
    "gemm_q4",
];

/// Device errors are run-time failures of the machine, reported as such.
#[cfg(feature = "cuda")]
pub(crate) fn dev_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Device(format!("{what}: {e}"))
}

/// A kernel argument (pointers are device addresses).
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    P(u64),
    I(i32),
    L(i64),
    F(f32),
    U64(u64),
}

/// What a device does; [`Gpu`] adds the bookkeeping. Copies to the host return once the data
/// is there; everything else may run asynchronously in stream order.
pub(crate) trait Backend {
    fn name(&self) -> String;
    /// A new allocation and its address; the returned owner frees it when dropped.
    fn alloc(&self, bytes: usize, zeroed: bool) -> Result<(Box<dyn Any>, u64)>;
    fn upload(&self, dst: u64, src: &[u8]) -> Result<()>;
    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()>;
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;
    fn zero(&self, dst: u64, bytes: usize) -> Result<()>;
    fn sync(&self) -> Result<()>;
    fn launch(&self, name: &str, grid: u32, block: u32, shared: u32, args: &[Arg]) -> Result<()>;
    fn gemm(&self, g: &Gemm) -> Result<()>;
    /// (used, total) bytes of the whole device, where the backend knows them.
    fn device_used(&self) -> Option<(usize, usize)>;
    /// A zeroed managed (unified) allocation, which the driver pages between host and device
    /// memory as the device runs short; backends without such memory give a plain one.
    fn alloc_paged(&self, bytes: usize) -> Result<(Box<dyn Any>, u64)> {
        self.alloc(bytes, true)
    }
    /// Asks the driver to move a managed allocation's pages (from `alloc_paged`) to the device
    /// ahead of the kernels that touch it, in one transfer instead of a page fault at a time.
    /// A hint: where it cannot be done, nothing happens.
    fn prefetch_paged(&self, _ptr: u64, _bytes: usize) {}
    /// Whether the device has bf16 tensor cores (`mma.sync` on bf16: sm_80 and later), which
    /// the flash-attention and fused 4-bit GEMM kernels need.
    fn bf16_tensor_cores(&self) -> bool;
    /// The most dynamic shared memory a launch may ask for (bytes): 48 KB everywhere, more
    /// where the device allows it, for the kernels opted in at load (the CUDA backend's
    /// `LARGE_SHARED_KERNELS`).
    fn max_dynamic_shared(&self) -> usize {
        48 << 10
    }
}

#[derive(Default)]
struct Usage {
    now: AtomicUsize,
    peak: AtomicUsize,
}

pub struct Gpu {
    pub spec: DeviceSpec,
    dev: Box<dyn Backend>,
    usage: Arc<Usage>,
}

/// A device allocation; `ptr` is its address for kernel arguments and products.
pub struct DBuf {
    _owner: Box<dyn Any>,
    pub ptr: u64,
    pub bytes: usize,
    usage: Arc<Usage>,
}

impl Drop for DBuf {
    fn drop(&mut self) {
        self.usage.now.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl DBuf {
    /// Address of element `i` of a buffer of `elem`-byte elements.
    pub fn at(&self, i: usize, elem: usize) -> u64 {
        debug_assert!(i * elem <= self.bytes);
        self.ptr + (i * elem) as u64
    }
}

fn bytes_of<T: Copy>(data: &[T]) -> &[u8] {
    // Safety: plain-old-data viewed as bytes.
    unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data)) }
}

impl Gpu {
    /// Opens a device: `cuda:N` (a build with the `cuda` feature: the kernels are compiled by
    /// NVRTC, cuBLAS is loaded) or `cuda-sim` (a build with `cuda-sim`: the same kernels run
    /// on the CPU).
    pub fn open(spec: DeviceSpec) -> Result<Self> {
        spec.check_available()?;
        let dev: Box<dyn Backend> = match spec {
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(i) => Box::new(super::cuda::CudaBackend::open(i)?),
            #[cfg(feature = "cuda-sim")]
            DeviceSpec::Sim => Box::new(super::sim::SimBackend::new()?),
            _ => return Err(Error::usage(format!("{spec} is not a GPU device"))),
        };
        Ok(Self {
            spec,
            dev,
            usage: Arc::new(Usage::default()),
        })
    }

    pub fn name(&self) -> String {
        self.dev.name()
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

    pub fn bf16_tensor_cores(&self) -> bool {
        self.dev.bf16_tensor_cores()
    }

    /// The most dynamic shared memory a launch of a kernel opted in to more than 48 KB (the
    /// cached cross-entropy, flash attention: the CUDA backend's `LARGE_SHARED_KERNELS`) may
    /// ask for.
    pub fn max_dynamic_shared(&self) -> usize {
        self.dev.max_dynamic_shared()
    }

    /// Device memory in use by everything on the device (driver's view) and its total.
    pub fn device_used(&self) -> (usize, usize) {
        self.dev.device_used().unwrap_or((0, 0))
    }

    fn track(&self, bytes: usize, zeroed: bool) -> Result<DBuf> {
        let bytes = bytes.max(4);
        let (owner, ptr) = self.dev.alloc(bytes, zeroed)?;
        Ok(self.tracked(owner, ptr, bytes))
    }

    fn tracked(&self, owner: Box<dyn Any>, ptr: u64, bytes: usize) -> DBuf {
        let now = self.usage.now.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.usage.peak.fetch_max(now, Ordering::Relaxed);
        DBuf {
            _owner: owner,
            ptr,
            bytes,
            usage: self.usage.clone(),
        }
    }

    /// `data` in managed (unified) memory, which the driver pages between the device and the
    /// host as the device runs short: the paged optimizer's states (QLoRA's idea). Counted in
    /// the peak like any allocation, though part of it may live on the host.
    pub fn upload_paged<T: Copy>(&self, data: &[T]) -> Result<DBuf> {
        let raw = bytes_of(data);
        let bytes = raw.len().max(4);
        let (owner, ptr) = self.dev.alloc_paged(bytes)?;
        let buf = self.tracked(owner, ptr, bytes);
        self.dev.upload(buf.ptr, raw)?;
        Ok(buf)
    }

    /// A zeroed allocation of `bytes` bytes.
    pub fn alloc(&self, bytes: usize) -> Result<DBuf> {
        self.track(bytes, true)
    }

    /// An allocation whose contents are undefined: for buffers a kernel or a product
    /// (beta = 0) overwrites entirely; zeroing them would cost a memory pass each. (The
    /// simulator fills them with NaN, so that a read before the first write shows.)
    pub fn alloc_uninit(&self, bytes: usize) -> Result<DBuf> {
        self.track(bytes, false)
    }

    pub fn uninit_f32(&self, n: usize) -> Result<DBuf> {
        self.alloc_uninit(n * 4)
    }

    pub fn uninit_bf16(&self, n: usize) -> Result<DBuf> {
        self.alloc_uninit(n * 2)
    }

    pub fn alloc_f32(&self, n: usize) -> Result<DBuf> {
        self.alloc(n * 4)
    }

    pub fn alloc_bf16(&self, n: usize) -> Result<DBuf> {
        self.alloc(n * 2)
    }

    pub fn upload<T: Copy>(&self, data: &[T]) -> Result<DBuf> {
        let raw = bytes_of(data);
        let b = self.alloc_uninit(raw.len())?;
        self.dev.upload(b.ptr, raw)?;
        Ok(b)
    }

    /// Overwrites the start of `dst` with `data`.
    pub fn write<T: Copy>(&self, dst: &mut DBuf, data: &[T]) -> Result<()> {
        let raw = bytes_of(data);
        assert!(
            raw.len() <= dst.bytes,
            "write past the end of a device buffer"
        );
        self.dev.upload(dst.ptr, raw)
    }

    /// [`Self::write`] through a shared reference (device memory the caller owns the use of).
    pub fn overwrite<T: Copy>(&self, dst: &DBuf, data: &[T]) -> Result<()> {
        let raw = bytes_of(data);
        assert!(
            raw.len() <= dst.bytes,
            "write past the end of a device buffer"
        );
        self.dev.upload(dst.ptr, raw)
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
        assert!(n * 4 <= src.bytes, "read past the end of a device buffer");
        self.download_f32_at(src.ptr, n)
    }

    /// `n` f32 values at a device address inside a buffer (a part of one).
    pub fn download_f32_at(&self, src: u64, n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n];
        // Safety: f32 has no invalid bit patterns; the byte view covers exactly `out`.
        let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, n * 4) };
        self.dev.download(src, bytes)?;
        Ok(out)
    }

    /// Writes f32 values at a device address inside a buffer the caller owns the use of.
    pub fn upload_f32_at(&self, dst: u64, data: &[f32]) -> Result<()> {
        self.dev.upload(dst, bytes_of(data))
    }

    pub fn download_bf16(&self, src: &DBuf, n: usize) -> Result<Vec<f32>> {
        assert!(n * 2 <= src.bytes, "read past the end of a device buffer");
        let mut bytes = vec![0u8; n * 2];
        self.dev.download(src.ptr, &mut bytes)?;
        Ok(bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect())
    }

    /// Copies `bytes` bytes between device buffers.
    pub fn copy(&self, dst: &DBuf, src: &DBuf, bytes: usize) -> Result<()> {
        assert!(
            bytes <= dst.bytes && bytes <= src.bytes,
            "copy past a buffer's end"
        );
        self.copy_raw(dst.ptr, src.ptr, bytes)
    }

    /// Copies `bytes` bytes between device addresses (parts of buffers).
    pub fn copy_raw(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.dev.copy(dst, src, bytes)
    }

    /// Zeroes the first `bytes` bytes of `b`.
    pub fn zero(&self, b: &mut DBuf, bytes: usize) -> Result<()> {
        self.dev.zero(b.ptr, bytes.min(b.bytes))
    }

    /// See [`Backend::prefetch_paged`].
    pub fn prefetch_paged(&self, b: &DBuf) {
        self.dev.prefetch_paged(b.ptr, b.bytes);
    }

    pub fn sync(&self) -> Result<()> {
        self.dev.sync()
    }

    /// One (batched) bf16 product with f32 accumulation and output.
    pub fn gemm(&self, g: &Gemm) -> Result<()> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        self.dev.gemm(g)
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
        self.dev.launch(name, grid.max(1), block, shared, args)
    }

    /// Launches an elementwise (grid-stride) kernel over `n` items.
    pub fn launch_n(&self, name: &str, n: usize, args: &[Arg]) -> Result<()> {
        let grid = n.div_ceil(256).clamp(1, 132 * 16) as u32;
        self.launch(name, grid, 256, args)
    }

    /// Launches a kernel with one thread per column of `cols` (column reductions: each thread
    /// walks its column's rows, so no atomics are needed and the reads coalesce).
    pub fn launch_cols(&self, name: &str, cols: usize, args: &[Arg]) -> Result<()> {
        self.launch(name, cols.div_ceil(128) as u32, 128, args)
    }

    /// Launches a kernel with one block per row.
    pub fn launch_rows(&self, name: &str, rows: usize, cols: usize, args: &[Arg]) -> Result<()> {
        self.launch_rows_shared(name, rows, cols, 0, args)
    }

    /// [`Gpu::launch_rows`] with `shared` bytes of dynamic shared memory per block.
    pub fn launch_rows_shared(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        shared: u32,
        args: &[Arg],
    ) -> Result<()> {
        let block = if cols >= 4096 {
            1024
        } else if cols >= 1024 {
            512
        } else if cols >= 256 {
            256
        } else {
            64
        };
        self.launch_shared(name, rows as u32, block, shared, args)
    }

    /// RMSNorm forward: one block per row, sized so each thread holds up to 16 of the row's
    /// values in registers (the kernel's single-read path).
    pub fn launch_norm(&self, rows: usize, hidden: usize, args: &[Arg]) -> Result<()> {
        let block = (hidden.div_ceil(16).div_ceil(32) * 32).clamp(32, 1024) as u32;
        self.launch("rmsnorm_fwd", rows as u32, block, args)
    }
}

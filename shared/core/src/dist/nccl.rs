//! NCCL between GPUs (feature `cuda`): the communicator for multi-GPU data parallel.
//!
//! The TCP rendezvous ([`super::tcp::Tcp`]) starts it: every rank loads CUDA and NCCL and the
//! ranks agree that all of them could (so that no rank waits forever inside
//! `ncclCommInitRank` for one that failed); rank 0 creates the NCCL unique id and broadcasts
//! its 128 bytes over TCP; every rank then joins the NCCL communicator on its GPU (the
//! `LOCAL_RANK`-th, or the only one `CUDA_VISIBLE_DEVICES` shows it:
//! [`super::rank_cuda_ordinal`], the rule `--device cuda` follows too).
//!
//! Sums of device buffers ([`Nccl::all_reduce_device`]) stay on the GPUs; the
//! [`Communicator`] methods on host buffers stage through the GPU (gradients that live in host
//! memory still go over NVLink/InfiniBand). The small f64 statistics, broadcasts and barriers
//! go over the TCP link. NCCL chooses its own summation order (ring, tree): every rank gets
//! the same values, but not bit for bit those of the TCP communicator.
//!
//! cudarc loads libcuda and libnccl at run time and panics when one is missing; every first
//! use here is guarded so that a machine without them gets an error, not a panic.

use super::comm::Communicator;
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtrMut, DeviceSlice, SyncOnDrop};
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::sync::Arc;

/// cudarc's `Comm` holds a raw `ncclComm_t` and so is not `Send`.
struct SendComm(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap (NCCL's thread-safety rules); `Nccl` owns it and every call goes through `&mut self`.
unsafe impl Send for SendComm {}

/// One rank of an NCCL job; see the module documentation.
pub struct Nccl {
    comm: SendComm,
    stream: Arc<CudaStream>,
    host: Box<dyn Communicator>,
    device: usize,
}

impl Nccl {
    /// Join the NCCL communicator of the job whose ranks `host` connects (a TCP rendezvous),
    /// on GPU `device`. Fails on every rank, with an error, when one cannot load CUDA or NCCL.
    pub fn new(mut host: Box<dyn Communicator>, device: usize) -> Result<Self> {
        let (rank, world) = (host.rank(), host.world());
        let local = guarded(|| {
            // SAFETY: only looks for the shared libraries.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err("the CUDA driver library (libcuda) was not found".to_string());
            }
            if !unsafe { cudarc::nccl::sys::is_culib_present() } {
                return Err("the NCCL library (libnccl.so.2) was not found".to_string());
            }
            let count = CudaContext::device_count()
                .map_err(|e| format!("no usable GPU ({e:?})"))?
                .max(0) as usize;
            if device >= count {
                return Err(format!(
                    "this rank's GPU is cuda:{device} (LOCAL_RANK) but the process sees {count} GPU(s)"
                ));
            }
            let ctx = CudaContext::new(device).map_err(|e| format!("cuda:{device}: {e:?}"))?;
            let stream = ctx
                .new_stream()
                .map_err(|e| format!("cuda:{device}: {e:?}"))?;
            let id = if rank == 0 {
                Some(Id::new().map_err(|e| format!("ncclGetUniqueId: {e:?}"))?)
            } else {
                None
            };
            Ok((device, stream, id))
        });
        // Agree before anyone enters ncclCommInitRank.
        let mut failed = vec![0.0f64; world];
        failed[rank] = f64::from(u8::from(local.is_err()));
        host.all_reduce_sum_f64(&mut failed)?;
        let (device, stream, id) = local.map_err(|m| {
            Error::Device(format!(
                "data parallel over NCCL (PEFTKIT_DIST_BACKEND=nccl), rank {rank}: {m}"
            ))
        })?;
        let bad: Vec<String> = (0..world)
            .filter(|&r| failed[r] > 0.0)
            .map(|r| r.to_string())
            .collect();
        if !bad.is_empty() {
            return Err(Error::Device(format!(
                "data parallel over NCCL: rank(s) {} could not start CUDA/NCCL (their own errors say why)",
                bad.join(", ")
            )));
        }
        let mut bytes: Vec<u8> = id
            .map(|id| id.internal().iter().map(|&c| c as u8).collect())
            .unwrap_or_default();
        host.broadcast(0, &mut bytes)?;
        if bytes.len() != 128 {
            return Err(Error::usage(format!(
                "data parallel over NCCL: rank 0 sent a unique id of {} bytes, expected 128",
                bytes.len()
            )));
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, &b) in internal.iter_mut().zip(&bytes) {
            *d = b as std::ffi::c_char;
        }
        let id = Id::uninit(internal);
        let s = stream.clone();
        let comm = guarded(move || {
            Comm::from_rank(s, rank, world, id).map_err(|e| format!("ncclCommInitRank: {e:?}"))
        })
        .map_err(|m| Error::Device(format!("data parallel over NCCL, rank {rank}: {m}")))?;
        Ok(Self {
            comm: SendComm(comm),
            stream,
            host,
            device,
        })
    }

    /// The GPU this rank uses.
    pub fn device(&self) -> usize {
        self.device
    }

    /// The stream the collectives run on (allocate device buffers for them here).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Sum a device buffer over the ranks, in place (every rank passes the same length).
    /// Queued on [`Nccl::stream`]; synchronize before reading it from another stream's host
    /// code.
    pub fn all_reduce_device(&mut self, buf: &mut CudaSlice<f32>) -> Result<()> {
        self.comm
            .0
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map_err(|e| nccl_error("ncclAllReduce", e))?;
        Ok(())
    }
}

/// `n` f32 values at a raw device address that another owner (the training engine, in the
/// same primary context) allocated: what NCCL's in-place sum needs of a buffer. Its writers
/// have finished (the caller synchronised), so there is nothing to wait for.
struct RawF32 {
    ptr: u64,
    n: usize,
    stream: Arc<CudaStream>,
}

impl DeviceSlice<f32> for RawF32 {
    fn len(&self) -> usize {
        self.n
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl DevicePtrMut<f32> for RawF32 {
    fn device_ptr_mut<'a>(&'a mut self, _: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("data parallel over NCCL: {what} failed: {e:?}"))
}

/// Run `f`, turning a panic (cudarc's dynamic loading panics on a missing library or symbol)
/// into an error. The panic hook is silenced meanwhile: the tools' hook would print an
/// "internal error" line for a panic that is handled here.
fn guarded<T>(
    f: impl FnOnce() -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown failure".into());
        Err(format!("CUDA/NCCL could not be loaded: {msg}"))
    })
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world(&self) -> usize {
        self.host.world()
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let cuda = |e: cudarc::driver::DriverError| nccl_error("a host/GPU copy", e);
        let mut d = self.stream.clone_htod(buf).map_err(cuda)?;
        self.all_reduce_device(&mut d)?;
        self.stream.memcpy_dtoh(&d, buf).map_err(cuda)?;
        self.stream.synchronize().map_err(cuda)?;
        Ok(())
    }
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        self.host.all_reduce_sum_f64(buf)
    }
    fn broadcast(&mut self, root: usize, bytes: &mut Vec<u8>) -> Result<()> {
        self.host.broadcast(root, bytes)
    }
    fn barrier(&mut self) -> Result<()> {
        self.host.barrier()
    }
    fn gpu_device(&self) -> Option<crate::gpu::DeviceSpec> {
        Some(crate::gpu::DeviceSpec::Cuda(self.device))
    }
    fn all_reduce_sum_gpu(&mut self, ptr: u64, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let mut buf = RawF32 {
            ptr,
            n,
            stream: self.stream.clone(),
        };
        self.comm
            .0
            .all_reduce_in_place(&mut buf, &ReduceOp::Sum)
            .map_err(|e| nccl_error("ncclAllReduce", e))?;
        self.stream
            .synchronize()
            .map_err(|e| nccl_error("the all-reduce's stream", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Single;

    /// Without CUDA or NCCL (this test's usual machine): an error, not a panic. With them: one
    /// rank, whose sums are its inputs, on the host path and the device paths.
    #[test]
    fn one_rank_or_a_clean_error() {
        let mut c = match Nccl::new(Box::new(Single), 0) {
            Ok(c) => c,
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("data parallel over NCCL"), "{e}");
                return;
            }
        };
        let want: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
        let mut v = want.clone();
        c.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, want);
        let mut d = c.stream().clone_htod(&want).unwrap();
        c.all_reduce_device(&mut d).unwrap();
        assert_eq!(c.stream().clone_dtoh(&d).unwrap(), want);
        // A raw address, as the training engine's gradients are summed.
        let raw = c.stream().clone_htod(&want).unwrap();
        let ptr = {
            use cudarc::driver::DevicePtr;
            raw.device_ptr(c.stream()).0
        };
        c.all_reduce_sum_gpu(ptr, want.len()).unwrap();
        assert_eq!(c.stream().clone_dtoh(&raw).unwrap(), want);
        eprintln!("NCCL on cuda:{}: one-rank all-reduce ok", c.device());
    }
}

//! Launchers of the flash attention kernels (kernels.cu `flash_fwd_d*`, `flash_bwd_d*`): causal
//! attention on tensor cores without the `[L, L]` scores; see docs/gpu.md.

use super::device::{Arg, DBuf, Gpu};
use crate::error::{Error, Result};

/// The inputs of the flash attention kernels: padded-layout Q, K, V (bf16) and the lengths.
pub(crate) struct FlashArgs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub seq_len: u64,
    pub nseq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub l: usize,
    pub dh: usize,
    /// Sliding window (0: none).
    pub window: usize,
}

/// Head sizes the flash kernels are built for.
pub(crate) fn flash_supports(dh: usize) -> bool {
    matches!(dh, 16 | 32 | 64 | 80 | 96 | 128)
}

/// Query rows per tile of `flash_bwd_d{dh}` (kernels.cu's FLASH_BWD_CALL).
fn bwd_rows(dh: usize) -> usize {
    if dh <= 64 {
        64
    } else {
        32
    }
}

/// The dynamic shared memory `flash_bwd_d{dh}` takes, in bytes (kernels.cu's
/// `flash_bwd_shared_words`, which the kernel checks): two stages of Q and dO, the key tile
/// (and above head size 64 the value tile), four warps' dSᵀ, two stages of two floats per
/// query row. 55 KB at head size 64, 74 KB at 128.
pub(crate) fn flash_bwd_shared_bytes(dh: usize) -> usize {
    let (br, rw) = (bwd_rows(dh), dh / 2 + 4);
    let kv_tiles = if dh > 64 { 2 } else { 1 };
    4 * (2 * 2 * br * rw + kv_tiles * 64 * rw + 64 * (br / 2 + 4) + 2 * 2 * br)
}

/// The dynamic shared memory `flash_fwd_d{dh}` takes, in bytes (kernels.cu's
/// `flash_fwd_shared_words`, which the kernel checks): two stages of the key and the value
/// tile of 64 rows. 36 KB at head size 64, 68 KB at 128.
pub(crate) fn flash_fwd_shared_bytes(dh: usize) -> usize {
    4 * 2 * 2 * 64 * (dh / 2 + 4)
}

/// Whether the flash kernels run on `gpu` for head size `dh`: bf16 tensor cores (sm_80 and
/// later) and the shared memory both passes lay out.
pub(crate) fn flash_available(gpu: &Gpu, dh: usize) -> bool {
    flash_supports(dh)
        && gpu.bf16_tensor_cores()
        && flash_fwd_shared_bytes(dh).max(flash_bwd_shared_bytes(dh)) <= gpu.max_dynamic_shared()
}

/// Refuses a launch that needs more shared memory than the device grants a block.
fn check_shared(gpu: &Gpu, pass: &str, bytes: usize) -> Result<()> {
    if bytes > gpu.max_dynamic_shared() {
        return Err(Error::Device(format!(
            "flash attention's {pass} pass needs {} KB of shared memory per block; this GPU allows {} KB",
            bytes >> 10,
            gpu.max_dynamic_shared() >> 10
        )));
    }
    Ok(())
}

/// The entry point of `kind` built for head size `dh`.
fn kernel(kind: &str, dh: usize) -> Result<String> {
    if !flash_supports(dh) {
        return Err(Error::Device(format!(
            "flash attention is built for head sizes 16, 32, 64, 80, 96 and 128, not {dh}"
        )));
    }
    Ok(format!("{kind}_d{dh}"))
}

/// The kernels read Q, K, V and dO 16 bytes at a time: their rows (a multiple of 16 values)
/// stay aligned when the tensors start on a 16-byte boundary, as every allocation does.
fn check_aligned(tensors: &[u64]) -> Result<()> {
    if tensors.iter().any(|&p| p % 16 != 0) {
        return Err(Error::Device(
            "internal: flash attention's inputs must start on 16-byte boundaries".into(),
        ));
    }
    Ok(())
}

/// The gradients of [`launch_flash_fwd`] given `dO` (bf16, Q's layout), the forward output
/// `o` (f32) and its log-sum-exp: dQ (f32, Q's layout; zeroed here, the kernel adds into it),
/// dK and dV (f32, K's layout).
pub(crate) fn launch_flash_bwd(
    gpu: &Gpu,
    a: &FlashArgs,
    d_o: u64,
    o: u64,
    lse: u64,
) -> Result<(DBuf, DBuf, DBuf)> {
    check_aligned(&[a.q, a.k, a.v, d_o])?;
    let q_rows = a.nseq * a.heads * a.l;
    let kv_len = a.nseq * a.kv_heads * a.l * a.dh;
    let dv_rows = gpu.uninit_f32(q_rows)?;
    gpu.launch(
        "flash_bwd_dot",
        q_rows.div_ceil(8) as u32,
        256,
        &[
            Arg::P(d_o),
            Arg::P(o),
            Arg::P(dv_rows.ptr),
            Arg::L(q_rows as i64),
            Arg::I(a.dh as i32),
        ],
    )?;
    let dq = gpu.alloc_f32(q_rows * a.dh)?;
    let dk = gpu.uninit_f32(kv_len)?;
    let dv = gpu.uninit_f32(kv_len)?;
    let blocks = a.l.div_ceil(64) * a.kv_heads * a.nseq;
    let shared = flash_bwd_shared_bytes(a.dh);
    check_shared(gpu, "backward", shared)?;
    gpu.launch_shared(
        &kernel("flash_bwd", a.dh)?,
        blocks as u32,
        128,
        shared as u32,
        &[
            Arg::P(a.q),
            Arg::P(a.k),
            Arg::P(a.v),
            Arg::P(d_o),
            Arg::P(lse),
            Arg::P(dv_rows.ptr),
            Arg::P(dq.ptr),
            Arg::P(dk.ptr),
            Arg::P(dv.ptr),
            Arg::P(a.seq_len),
            Arg::I(a.heads as i32),
            Arg::I(a.kv_heads as i32),
            Arg::I(a.l as i32),
            Arg::I(a.window as i32),
            Arg::F(1.0 / (a.dh as f32).sqrt()),
        ],
    )?;
    Ok((dq, dk, dv))
}

/// Causal attention in one kernel (kernels.cu `flash_fwd_d*`): `o` f32 in Q's layout and,
/// when non-zero, `lse` the rows' log-sum-exp (in log2 units, for [`launch_flash_bwd`]).
pub(crate) fn launch_flash_fwd(gpu: &Gpu, a: &FlashArgs, o: u64, lse: u64) -> Result<()> {
    let name = kernel("flash_fwd", a.dh)?;
    check_aligned(&[a.q, a.k, a.v])?;
    let shared = flash_fwd_shared_bytes(a.dh);
    check_shared(gpu, "forward", shared)?;
    let blocks = a.l.div_ceil(64) * a.heads * a.nseq;
    gpu.launch_shared(
        &name,
        blocks as u32,
        128,
        shared as u32,
        &[
            Arg::P(a.q),
            Arg::P(a.k),
            Arg::P(a.v),
            Arg::P(o),
            Arg::P(lse),
            Arg::P(a.seq_len),
            Arg::I(a.heads as i32),
            Arg::I(a.kv_heads as i32),
            Arg::I(a.l as i32),
            Arg::I(a.window as i32),
            Arg::F(1.0 / (a.dh as f32).sqrt()),
        ],
    )
}

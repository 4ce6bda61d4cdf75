//! The collective operations data-parallel training needs, and the single-process one.

use crate::error::{Error, Result};
use crate::gpu::DeviceSpec;

/// The processes (ranks) of one data-parallel job. Every rank calls the same collectives in
/// the same order with buffers of the same length; each call returns when its result is there.
///
/// Sums are deterministic: every implementation adds the ranks' values in rank order
/// (`((r0 + r1) + r2) + …`, see [`sum_in_rank_order`]) except NCCL, whose order is its own,
/// and every rank receives the same bits.
pub trait Communicator: Send {
    /// This process's rank, 0..world.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// What carries the data (`single`, `in-process`, `tcp`, `nccl`), for messages.
    fn backend(&self) -> &'static str;
    /// Replace `buf` on every rank by the element-wise sum over the ranks.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// The same in f64 (loss sums, token counts: small, exact for counts below 2^53).
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<()>;
    /// Give every rank `root`'s bytes (`bytes` is resized on the others).
    fn broadcast(&mut self, root: usize, bytes: &mut Vec<u8>) -> Result<()>;
    /// Return once every rank has called it.
    fn barrier(&mut self) -> Result<()>;
    /// The device whose memory [`Communicator::all_reduce_sum_gpu`] sums in place (NCCL:
    /// this rank's GPU); `None` for communicators that sum host buffers only.
    fn gpu_device(&self) -> Option<DeviceSpec> {
        None
    }
    /// Replace the `n` f32 values at device address `ptr` (on [`Communicator::gpu_device`])
    /// by their sum over the ranks, on the GPU. Every write to them must have finished; the
    /// sum is there when this returns. Callers first agree over all ranks that each can
    /// (a rank that cannot would leave the others waiting).
    fn all_reduce_sum_gpu(&mut self, _ptr: u64, _n: usize) -> Result<()> {
        Err(Error::Device(format!(
            "internal: the {} communicator cannot sum GPU buffers",
            self.backend()
        )))
    }
}

/// One process: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&mut self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&mut self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, root: usize, _: &mut Vec<u8>) -> Result<()> {
        check_root(root, 1)
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}

pub(crate) fn check_root(root: usize, world: usize) -> Result<()> {
    if root >= world {
        return Err(Error::usage(format!(
            "broadcast from rank {root}, but the job has {world} ranks"
        )));
    }
    Ok(())
}

/// `out` = `parts[0] + parts[1] + …` element by element, added in this order (rank order).
/// The one summation every CPU communicator uses, so that they agree bit for bit.
pub(crate) fn sum_in_rank_order<T>(parts: &[&[T]], out: &mut [T])
where
    T: Copy + std::ops::AddAssign,
{
    out.copy_from_slice(parts[0]);
    for p in &parts[1..] {
        for (o, &x) in out.iter_mut().zip(p.iter()) {
            *o += x;
        }
    }
}

/// Numbers that travel as little-endian bytes (the TCP communicator's wire format).
pub(crate) trait Wire: Copy + Default + std::ops::AddAssign + Send + 'static {
    const SIZE: usize;
    fn put(self, out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
}

impl Wire for f32 {
    const SIZE: usize = 4;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        f32::from_le_bytes(b.try_into().expect("4 bytes"))
    }
}

impl Wire for f64 {
    const SIZE: usize = 8;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        f64::from_le_bytes(b.try_into().expect("8 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_is_identity() {
        let mut c = Single;
        let mut v = vec![1.5f32, -2.0];
        c.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, [1.5, -2.0]);
        let mut b = vec![1u8, 2];
        c.broadcast(0, &mut b).unwrap();
        assert_eq!(b, [1, 2]);
        assert!(c.broadcast(1, &mut b).is_err());
        c.barrier().unwrap();
    }

    #[test]
    fn rank_order_sum() {
        // 1e8 + 1 - 1e8 in f32: the order is visible in the result.
        let (a, b, c) = ([1e8f32], [1f32], [-1e8f32]);
        let mut out = [0f32];
        sum_in_rank_order(&[&a, &b, &c], &mut out);
        assert_eq!(out[0], (1e8f32 + 1.0) - 1e8);
    }
}

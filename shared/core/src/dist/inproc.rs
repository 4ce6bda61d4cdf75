//! A communicator between threads of one process: the ranks of a test (or of a run that
//! simulates a data-parallel job in one process). Same summation order as the TCP one.

use super::comm::{check_root, sum_in_rank_order, Communicator};
use crate::error::{Error, Result};
use std::sync::{Arc, Barrier, RwLock};

struct Shared {
    world: usize,
    barrier: Barrier,
    f32s: RwLock<Vec<Vec<f32>>>,
    f64s: RwLock<Vec<Vec<f64>>>,
    bytes: RwLock<Vec<u8>>,
}

/// One rank of an in-process group ([`InProcess::group`]); move each into its own thread.
pub struct InProcess {
    rank: usize,
    shared: Arc<Shared>,
}

impl InProcess {
    /// `world` connected ranks (0..world, in order).
    pub fn group(world: usize) -> Vec<InProcess> {
        assert!(world > 0, "a group has at least one rank");
        let shared = Arc::new(Shared {
            world,
            barrier: Barrier::new(world),
            f32s: RwLock::new(vec![Vec::new(); world]),
            f64s: RwLock::new(vec![Vec::new(); world]),
            bytes: RwLock::new(Vec::new()),
        });
        (0..world)
            .map(|rank| InProcess {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Every rank posts its buffer; after a barrier every rank sums all of them in rank order
    /// (the same inputs in the same order: the same bits everywhere); a second barrier keeps
    /// the posted buffers until everyone has read them.
    fn reduce<T>(&self, slots: &RwLock<Vec<Vec<T>>>, buf: &mut [T]) -> Result<()>
    where
        T: Copy + std::ops::AddAssign,
    {
        slots.write().expect("in-process communicator")[self.rank] = buf.to_vec();
        self.shared.barrier.wait();
        let r = {
            let s = slots.read().expect("in-process communicator");
            if let Some((r, v)) = s.iter().enumerate().find(|(_, v)| v.len() != buf.len()) {
                // Every rank sees the same posts, so every rank fails the same way.
                Err(Error::usage(format!(
                    "all-reduce: rank {} has {} values, rank {r} has {}",
                    self.rank,
                    buf.len(),
                    v.len()
                )))
            } else {
                let parts: Vec<&[T]> = s.iter().map(|v| &v[..]).collect();
                sum_in_rank_order(&parts, buf);
                Ok(())
            }
        };
        self.shared.barrier.wait();
        r
    }
}

impl Communicator for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn backend(&self) -> &'static str {
        "in-process"
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.reduce(&self.shared.f32s, buf)
    }
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        self.reduce(&self.shared.f64s, buf)
    }
    fn broadcast(&mut self, root: usize, bytes: &mut Vec<u8>) -> Result<()> {
        check_root(root, self.shared.world)?;
        if self.rank == root {
            *self.shared.bytes.write().expect("in-process communicator") = bytes.clone();
        }
        self.shared.barrier.wait();
        if self.rank != root {
            bytes.clone_from(&self.shared.bytes.read().expect("in-process communicator"));
        }
        self.shared.barrier.wait();
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
}

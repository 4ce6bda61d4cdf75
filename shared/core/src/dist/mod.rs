//! Data-parallel training over several processes (docs/distributed.md).
//!
//! The tools are started the way torchrun starts jobs: every process runs the same command
//! with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` set ([`env`]), so
//! torchrun, SLURM's srun, a Kubernetes job or a shell loop launch them unchanged. Every rank
//! loads the same model and data and walks the same data order; each trains on its share of
//! every accumulation window ([`shard_window`]); the trainable (adapter) gradients and the loss
//! statistics are summed over the ranks ([`all_reduce_grads`]) and every rank takes the same
//! optimizer step. Rank 0 alone writes files and prints.
//!
//! Communicators ([`Communicator`]): [`Single`] (one process), [`InProcess`] (threads, for
//! tests), [`Tcp`] (processes, any machine) and, with the `cuda` feature, `nccl::Nccl` (GPUs).

pub mod comm;
pub mod env;
pub mod inproc;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod tcp;

pub use comm::{Communicator, Single};
pub use env::DistEnv;
pub use inproc::InProcess;
pub use tcp::Tcp;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::rng::Rng;
use crate::train::params::TrainState;
use std::ops::Range;

/// The communicator the environment asks for: [`Single`] without `WORLD_SIZE` (or with 1),
/// else a TCP rendezvous at `MASTER_ADDR:MASTER_PORT`, or NCCL over that rendezvous with
/// `PEFTKIT_DIST_BACKEND=nccl` (builds with the `cuda` feature).
pub fn from_env() -> Result<Box<dyn Communicator>> {
    let env = DistEnv::from_env()?;
    if !env.is_distributed() {
        return Ok(Box::new(Single));
    }
    let backend = std::env::var("PEFTKIT_DIST_BACKEND").unwrap_or_default();
    let backend = backend.trim();
    if !["", "tcp", "nccl"].contains(&backend) {
        return Err(Error::usage(format!(
            "PEFTKIT_DIST_BACKEND={backend}: expected tcp or nccl"
        )));
    }
    if backend == "nccl" && !cfg!(feature = "cuda") {
        return Err(Error::usage(
            "PEFTKIT_DIST_BACKEND=nccl: this build has no CUDA support (build with --features cuda), use tcp",
        ));
    }
    let tcp = Tcp::connect(&env, tcp::rendezvous_timeout()?)?;
    #[cfg(feature = "cuda")]
    if backend == "nccl" {
        let device = rank_cuda_ordinal(0);
        return Ok(Box::new(nccl::Nccl::new(Box::new(tcp), device)?));
    }
    Ok(Box::new(tcp))
}

/// The GPU ordinal of this rank for a requested `cuda:I`: with several processes on this
/// machine, each takes its own GPU, the `LOCAL_RANK`-th (plus I), as torch scripts do with
/// `torch.cuda.set_device(LOCAL_RANK)`; but a process that `CUDA_VISIBLE_DEVICES` gives exactly
/// one GPU (srun --gpus-per-task=1, a Kubernetes pod per GPU) keeps I. One process: I.
pub fn rank_cuda_ordinal(requested: usize) -> usize {
    let Ok(env) = DistEnv::from_env() else {
        return requested;
    };
    let one_visible = std::env::var("CUDA_VISIBLE_DEVICES")
        .is_ok_and(|v| v.split(',').filter(|d| !d.trim().is_empty()).count() == 1);
    if env.is_distributed() && !one_visible {
        requested + env.local_rank
    } else {
        requested
    }
}

/// [`rank_cuda_ordinal`] applied to a `--device`.
pub fn rank_device(device: crate::gpu::DeviceSpec) -> crate::gpu::DeviceSpec {
    match device {
        crate::gpu::DeviceSpec::Cuda(i) => crate::gpu::DeviceSpec::Cuda(rank_cuda_ordinal(i)),
        d => d,
    }
}

/// Make every rank but 0 quiet (no info lines, no progress bars: the launcher interleaves the
/// ranks' outputs); rank 0 says what the job is. Returns whether this is rank 0, the one rank
/// that writes files and prints results. Warnings and errors still show on every rank.
pub fn only_rank0_speaks(comm: &dyn Communicator) -> bool {
    if comm.rank() != 0 {
        crate::cli::Verbosity {
            quiet: true,
            verbose: false,
        }
        .apply();
        return false;
    }
    if comm.world() > 1 {
        crate::cli::info(format!(
            "data parallel: {} processes ({}); rank 0 writes the outputs",
            comm.world(),
            comm.backend()
        ));
    }
    true
}

/// The part of `0..n` that `rank` of `world` takes: contiguous, sizes differing by at most one.
pub fn shard_range(n: usize, rank: usize, world: usize) -> Range<usize> {
    n * rank / world..n * (rank + 1) / world
}

/// This rank's micro-batches of an accumulation window (lists of row indices, each at most
/// `batch` rows): the window's rows in order, cut into `world` contiguous shards, this rank's
/// shard cut into micro-batches of `batch` rows. With `--batch B --grad-accum A` on `W` ranks
/// the global batch stays `B·A` rows, whatever `W`: the result does not depend on the number
/// of processes (up to float rounding). When `A` is a multiple of `W` every rank gets whole
/// micro-batches of the single-process run. One process: the window unchanged.
pub fn shard_window(
    window: &[Vec<usize>],
    batch: usize,
    rank: usize,
    world: usize,
) -> Vec<Vec<usize>> {
    if world <= 1 {
        return window.to_vec();
    }
    let rows: Vec<usize> = window.iter().flatten().copied().collect();
    rows[shard_range(rows.len(), rank, world)]
        .chunks(batch.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

/// Every rank's rows on every rank: this rank computed rows `mine` of `n` (`width` numbers
/// each, in `local`). The other rows are −0 here and one sum over the ranks fills them in;
/// adding −0 is exact for every value (a zero keeps its sign, NaN and infinities pass), so
/// every rank ends up with the very bits each row's rank computed. One process: `local`.
pub fn gather_rows(
    comm: &mut dyn Communicator,
    n: usize,
    width: usize,
    mine: Range<usize>,
    local: &[f64],
) -> Result<Vec<f64>> {
    assert_eq!(local.len(), mine.len() * width, "rows of {width} numbers");
    if comm.world() == 1 {
        return Ok(local.to_vec());
    }
    let mut all = vec![-0.0; n * width];
    all[mine.start * width..mine.end * width].copy_from_slice(local);
    comm.all_reduce_sum_f64(&mut all)?;
    Ok(all)
}

/// Sum the gradients of every trainable tensor over the ranks (for PEFT methods only the
/// adapter tensors have gradients: the frozen base has none), in one reduction, and the
/// window's statistics `stats` (loss sum, token counts) with them. One process: nothing.
pub fn all_reduce_grads(
    comm: &mut dyn Communicator,
    state: &mut TrainState,
    stats: &mut [f64],
) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    let _p = crate::profile::scope("step.all_reduce");
    let n: usize = state.params.iter().map(|(_, p)| p.grad.len()).sum();
    let mut flat = Vec::with_capacity(n);
    for (_, p) in &state.params {
        flat.extend_from_slice(&p.grad);
    }
    comm.all_reduce_sum(&mut flat)?;
    let mut at = 0;
    for (_, p) in &mut state.params {
        let k = p.grad.len();
        p.grad.copy_from_slice(&flat[at..at + k]);
        at += k;
    }
    comm.all_reduce_sum_f64(stats)
}

/// Whether `flag` is set on any rank (Ctrl-C reaches the ranks at different moments; they
/// must agree on the step at which they stop).
pub fn any(comm: &mut dyn Communicator, flag: bool) -> Result<bool> {
    if comm.world() == 1 {
        return Ok(flag);
    }
    let mut v = [f64::from(u8::from(flag))];
    comm.all_reduce_sum_f64(&mut v)?;
    Ok(v[0] > 0.0)
}

/// The dropout generator of this rank for one step, or None for a single process (which keeps
/// using `shared` itself). Every rank draws one number from `shared`, so `shared` (saved in
/// checkpoints) stays the same on all ranks, and mixes in its rank: the ranks' masks differ
/// from each other and from a single-process run, but a resumed run repeats them.
pub fn rank_rng(shared: &mut Rng, comm: &dyn Communicator) -> Option<Rng> {
    (comm.world() > 1).then(|| {
        Rng::new(shared.next_u64() ^ (comm.rank() as u64).wrapping_mul(0xA076_1D64_78BD_642F))
    })
}

/// Check that every rank runs the same job: `fields` (named numbers: data size, steps, the
/// resumed step, a fingerprint of the trainable values, …) must equal rank 0's. A mismatch
/// (different data, options, model or checkpoint on some rank) fails on every rank, before
/// any step, instead of training something meaningless.
pub fn check_same(comm: &mut dyn Communicator, fields: &[(&str, u64)]) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    let mine: Vec<u8> = fields.iter().flat_map(|(_, v)| v.to_le_bytes()).collect();
    let mut root = mine.clone();
    comm.broadcast(0, &mut root)?;
    let mut differs = vec![0.0f64; comm.world()];
    let diff = fields
        .iter()
        .zip(root.chunks_exact(8))
        .find(|((_, v), r)| v.to_le_bytes() != **r);
    differs[comm.rank()] = f64::from(u8::from(diff.is_some() || root.len() != mine.len()));
    comm.all_reduce_sum_f64(&mut differs)?;
    let ranks: Vec<String> = (0..comm.world())
        .filter(|&r| differs[r] > 0.0)
        .map(|r| r.to_string())
        .collect();
    if ranks.is_empty() {
        return Ok(());
    }
    let here = match diff {
        Some(((name, v), r)) => format!(
            "; here {name} is {v}, on rank 0 {}",
            u64::from_le_bytes(r.try_into().expect("8 bytes"))
        ),
        None => String::new(),
    };
    Err(Error::usage(format!(
        "data parallel: rank(s) {} do not run the same job as rank 0 (different data, options, model or checkpoint){here}; every rank must run the same command on the same files",
        ranks.join(", ")
    )))
}

/// [`check_same`] with a fingerprint of the trainable values added (computed only when there
/// are several ranks): a different model, initialisation or resumed checkpoint shows there.
pub fn check_same_job(
    comm: &mut dyn Communicator,
    model: &Model,
    state: &TrainState,
    fields: &[(&str, u64)],
) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    let mut all = fields.to_vec();
    all.push(("trainable fingerprint", params_fingerprint(model, state)));
    check_same(comm, &all)
}

/// A fingerprint of the current values of every trainable tensor (FNV-1a over their bits):
/// equal on all ranks when they initialised (or resumed) identically.
pub fn params_fingerprint(model: &Model, state: &TrainState) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (slot, _) in &state.params {
        for &x in state.value(model, *slot) {
            h = (h ^ u64::from(x.to_bits())).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_window_once() {
        let window = vec![vec![5, 1], vec![7, 3], vec![2]];
        assert_eq!(shard_window(&window, 2, 0, 1), window);
        let parts: Vec<_> = (0..2).map(|r| shard_window(&window, 2, r, 2)).collect();
        assert_eq!(parts[0], vec![vec![5, 1]]);
        assert_eq!(parts[1], vec![vec![7, 3], vec![2]]);
        // More ranks than rows: some ranks get nothing (and still join the reduction).
        let parts: Vec<_> = (0..8).map(|r| shard_window(&window, 2, r, 8)).collect();
        let all: Vec<usize> = parts.iter().flatten().flatten().copied().collect();
        assert_eq!(all, vec![5, 1, 7, 3, 2]);
        assert!(parts.iter().filter(|p| p.is_empty()).count() == 3);
        for n in 0..20 {
            for w in 1..6 {
                let lens: Vec<usize> = (0..w).map(|r| shard_range(n, r, w).len()).collect();
                assert_eq!(lens.iter().sum::<usize>(), n);
                assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1);
            }
        }
    }

    #[test]
    fn gathered_rows_are_every_ranks_values_exactly() {
        let n = 5;
        let rows = |r: Range<usize>| -> Vec<f64> {
            r.flat_map(|i| {
                [
                    i as f64 * 0.1 + 1e-17,
                    if i == 3 { f64::NAN } else { -(i as f64) },
                ]
            })
            .collect()
        };
        let comms = InProcess::group(3);
        let got: Vec<Vec<f64>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|mut c| {
                    s.spawn(move || {
                        let mine = shard_range(n, c.rank(), c.world());
                        gather_rows(&mut c, n, 2, mine.clone(), &rows(mine)).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want = rows(0..n);
        for g in got {
            for (a, b) in g.iter().zip(&want) {
                assert_eq!(a.to_bits(), b.to_bits());
            }
        }
    }

    #[test]
    fn rank_rng_keeps_the_shared_stream_in_step() {
        let mut a = Rng::new(7);
        assert!(rank_rng(&mut a, &Single).is_none());
        assert_eq!(a, Rng::new(7));
    }
}

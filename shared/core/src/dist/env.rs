//! The launcher's environment: which process of the job this is.
//!
//! torchrun (and torch.distributed.launch, TorchX, the Kubeflow PyTorchJob operator, …) start
//! every process with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`; the
//! same variables set by hand or by a shell loop work the same way. Under SLURM, `srun` sets
//! `SLURM_PROCID`, `SLURM_NTASKS` and `SLURM_LOCALID`, used when `WORLD_SIZE` is absent (the
//! rendezvous address still comes from `MASTER_ADDR`/`MASTER_PORT`, as with torch).
//!
//! No `WORLD_SIZE` (and no srun task), or `WORLD_SIZE=1`, is a single process: nothing else is
//! read and nothing is required.
//!
//! The port: torchrun's elastic agent (torch 2.x, static and c10d rendezvous) serves its own
//! TCPStore on `MASTER_PORT` and tells the workers so with `TORCHELASTIC_USE_AGENT_STORE=True`;
//! peftkit speaks its own protocol, so rank 0 then listens on `MASTER_PORT + 1` instead.
//! `PEFTKIT_MASTER_PORT` overrides the port in every case.

use crate::error::{Error, Result};

/// Where this process stands in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    /// 0..world: this process's rank.
    pub rank: usize,
    /// Number of processes in the job.
    pub world: usize,
    /// Rank among the processes on this machine (picks the GPU on a multi-GPU machine).
    pub local_rank: usize,
    /// Host of rank 0's rendezvous (None for a single process).
    pub master_addr: Option<String>,
    /// Port of rank 0's rendezvous (None for a single process).
    pub master_port: Option<u16>,
    /// Where the port came from, for messages: `MASTER_PORT`, `MASTER_PORT+1` (torchrun's
    /// agent holds MASTER_PORT) or `PEFTKIT_MASTER_PORT`.
    pub port_from: &'static str,
}

impl DistEnv {
    /// A single process.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            local_rank: 0,
            master_addr: None,
            master_port: None,
            port_from: "MASTER_PORT",
        }
    }

    /// Read the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Read the variables through `get` (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        // torchrun's variables first; srun's when WORLD_SIZE is absent. A sbatch script itself
        // has SLURM_NTASKS and SLURM_PROCID=0 too but is not one of the tasks: only a task
        // started by srun has an ordinary step id (SLURM_STEP_ID, SLURM_STEPID in older
        // versions; the batch and extern steps use reserved ids from 0xFFFFFFF0 up).
        let slurm_task = get("SLURM_STEP_ID")
            .or_else(|| get("SLURM_STEPID"))
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|id| id < 0xFFFF_FFF0);
        let (rank_var, world_var, local_var) = if get("WORLD_SIZE").is_some() || !slurm_task {
            ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        } else {
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
        };
        let Some(world_s) = get(world_var) else {
            return Ok(Self::single());
        };
        let world = parse_count(world_var, &world_s)?;
        if world == 0 {
            return Err(Error::usage(format!(
                "{world_var}={world_s}: expected the number of processes (1 or more)"
            )));
        }
        if world == 1 {
            return Ok(Self::single());
        }
        let rank_s = get(rank_var).ok_or_else(|| {
            Error::usage(format!(
                "{world_var}={world} but {rank_var} is not set: every process needs its rank (0..{world})"
            ))
        })?;
        let rank = parse_count(rank_var, &rank_s)?;
        if rank >= world {
            return Err(Error::usage(format!(
                "{rank_var}={rank} is not below {world_var}={world} (ranks are 0..{})",
                world - 1
            )));
        }
        // LOCAL_RANK is optional (CPU runs do not need it); without it, SLURM_LOCALID, then 0.
        let local_rank = match get(local_var)
            .map(|s| (local_var, s))
            .or_else(|| get("SLURM_LOCALID").map(|s| ("SLURM_LOCALID", s)))
        {
            Some((var, s)) => parse_count(var, &s)?,
            None => 0,
        };
        let master_addr = get("MASTER_ADDR").ok_or_else(|| {
            Error::usage(format!(
                "{world_var}={world} but MASTER_ADDR is not set: export the host name or address of rank 0's machine"
            ))
        })?;
        let master_addr = master_addr.trim().to_string();
        let port_s = get("MASTER_PORT").ok_or_else(|| {
            Error::usage(format!(
                "{world_var}={world} but MASTER_PORT is not set: export a free TCP port on rank 0's machine (torchrun uses 29500)"
            ))
        })?;
        let port = |var: &str, s: &str| match s.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(Error::usage(format!(
                "{var}={s}: expected a TCP port (1-65535)"
            ))),
        };
        let master_port = port("MASTER_PORT", &port_s)?;
        let (master_port, port_from) = if let Some(p) = get("PEFTKIT_MASTER_PORT") {
            (port("PEFTKIT_MASTER_PORT", &p)?, "PEFTKIT_MASTER_PORT")
        } else if get("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True") {
            let p = master_port.checked_add(1).ok_or_else(|| {
                Error::usage(
                    "MASTER_PORT=65535 is torchrun's agent store and peftkit needs the next port: set PEFTKIT_MASTER_PORT",
                )
            })?;
            (p, "MASTER_PORT+1")
        } else {
            (master_port, "MASTER_PORT")
        };
        Ok(Self {
            rank,
            world,
            local_rank,
            master_addr: Some(master_addr),
            master_port: Some(master_port),
            port_from,
        })
    }

    pub fn is_distributed(&self) -> bool {
        self.world > 1
    }

    /// `host:port` of the rendezvous (IPv6 literals bracketed), for connecting and messages.
    pub fn master(&self) -> String {
        let host = self.master_addr.as_deref().unwrap_or("127.0.0.1");
        let port = self.master_port.unwrap_or(0);
        if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }
}

fn parse_count(var: &str, s: &str) -> Result<usize> {
    s.trim()
        .parse::<usize>()
        .map_err(|_| Error::usage(format!("{var}={s}: expected a whole number (0 or more)")))
}

/// Processes that share this machine, as torchrun says (`LOCAL_WORLD_SIZE`); 1 when unknown.
/// Used to split the cores between them when `--threads` is not given (under srun, each task's
/// CPU affinity already limits what it sees).
pub fn local_world_size() -> usize {
    std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn single_process_needs_nothing() {
        assert_eq!(env(&[]).unwrap(), DistEnv::single());
        assert_eq!(
            env(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(),
            DistEnv::single()
        );
        // The sbatch script has SLURM_NTASKS but is no srun task.
        assert_eq!(
            env(&[("SLURM_NTASKS", "4"), ("SLURM_PROCID", "0")]).unwrap(),
            DistEnv::single()
        );
        assert_eq!(
            env(&[
                ("SLURM_NTASKS", "4"),
                ("SLURM_PROCID", "0"),
                ("SLURM_STEP_ID", "4294967294")
            ])
            .unwrap(),
            DistEnv::single()
        );
    }

    #[test]
    fn torchrun_variables() {
        let e = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap();
        assert_eq!((e.rank, e.world, e.local_rank), (3, 4, 1));
        assert_eq!(e.master(), "node7:29500");
        let e = env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "::1"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap();
        assert_eq!(e.master(), "[::1]:1234");
        assert_eq!(e.local_rank, 0);
    }

    #[test]
    fn port_next_to_torchruns_agent_store() {
        let base = [
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "29500"),
        ];
        let with = |extra: &[(&str, &str)]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            env(&v)
        };
        let e = with(&[]).unwrap();
        assert_eq!((e.master_port, e.port_from), (Some(29500), "MASTER_PORT"));
        let e = with(&[("TORCHELASTIC_USE_AGENT_STORE", "True")]).unwrap();
        assert_eq!((e.master_port, e.port_from), (Some(29501), "MASTER_PORT+1"));
        let e = with(&[("TORCHELASTIC_USE_AGENT_STORE", "False")]).unwrap();
        assert_eq!(e.master_port, Some(29500));
        let e = with(&[
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("PEFTKIT_MASTER_PORT", "40000"),
        ])
        .unwrap();
        assert_eq!(
            (e.master_port, e.port_from),
            (Some(40000), "PEFTKIT_MASTER_PORT")
        );
        let e = with(&[("PEFTKIT_MASTER_PORT", "x")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("PEFTKIT_MASTER_PORT=x"), "{e}");
    }

    #[test]
    fn srun_fallback() {
        let e = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_ID", "0"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap();
        assert_eq!((e.rank, e.world, e.local_rank), (5, 8, 1));
        // torchrun inside a SLURM job: its own variables win.
        let e = env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("SLURM_STEP_ID", "0"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ])
        .unwrap();
        assert_eq!((e.rank, e.world), (1, 2));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let msg = |p: &[(&str, &str)]| env(p).unwrap_err().to_string();
        let full = |rank: &str, world: &str, port: &str| {
            msg(&[
                ("RANK", rank),
                ("WORLD_SIZE", world),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", port),
            ])
        };
        assert!(full("0", "two", "1").starts_with("WORLD_SIZE=two"));
        assert!(full("0", "0", "1").starts_with("WORLD_SIZE=0"));
        assert!(full("x", "2", "1").starts_with("RANK=x"));
        assert!(full("2", "2", "1").starts_with("RANK=2 is not below WORLD_SIZE=2"));
        assert!(full("0", "2", "70000").starts_with("MASTER_PORT=70000"));
        assert!(full("0", "2", "0").starts_with("MASTER_PORT=0"));
        assert!(msg(&[("WORLD_SIZE", "2")]).contains("RANK is not set"));
        assert!(msg(&[("WORLD_SIZE", "2"), ("RANK", "0")]).contains("MASTER_ADDR is not set"));
        assert!(
            msg(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h")])
                .contains("MASTER_PORT is not set")
        );
        assert!(msg(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("LOCAL_RANK", "-1"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1")
        ])
        .starts_with("LOCAL_RANK=-1"));
        for e in [full("x", "2", "1"), full("0", "2", "")] {
            assert!(!e.contains('\n'));
        }
    }
}

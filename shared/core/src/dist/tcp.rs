//! A communicator between processes over TCP, rendezvous at `MASTER_ADDR:MASTER_PORT` (the role
//! gloo plays for torch on CPUs).
//!
//! Topology: a star around rank 0. Rank 0 listens on `MASTER_PORT` (all interfaces, like
//! torch's TCPStore) and every other rank connects to it, retrying until the timeout
//! (`PEFTKIT_DIST_TIMEOUT` seconds, default 60) while rank 0 may still be starting.
//! An all-reduce sends every rank's buffer to rank 0, which adds them in rank order
//! (`((r0 + r1) + r2) + …`, the order [`super::inproc::InProcess`] uses too) and sends the sum
//! back: every rank gets the same bits, and the result does not depend on timing. Rank 0
//! moves `2·(world−1)` buffers per reduction, which is fine for adapter gradients (megabytes);
//! a ring would scale better for full fine-tuning of large models (see docs/distributed.md).
//!
//! Wire format: every message is a frame `op: u8, count: u64 LE` followed by `count` values
//! (little-endian) or bytes; both sides check that they are doing the same collective with the
//! same length, and rank 0 answers a mismatch with an error frame so that every rank fails with
//! the same message instead of hanging.

use super::comm::{check_root, Communicator, Wire};
use super::env::DistEnv;
use crate::error::{Error, Result};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"PKDP0001";
const OP_SUM_F32: u8 = 1;
const OP_SUM_F64: u8 = 2;
const OP_BROADCAST: u8 = 3;
const OP_BARRIER: u8 = 4;
const OP_ERROR: u8 = 0xEE;

/// How long ranks wait for each other at the rendezvous.
pub fn rendezvous_timeout() -> Result<Duration> {
    match std::env::var("PEFTKIT_DIST_TIMEOUT") {
        Err(_) => Ok(Duration::from_secs(60)),
        Ok(s) => match s.trim().parse::<f64>() {
            Ok(t) if t.is_finite() && t > 0.0 => Ok(Duration::from_secs_f64(t)),
            _ => Err(Error::usage(format!(
                "PEFTKIT_DIST_TIMEOUT={s}: expected seconds (a positive number)"
            ))),
        },
    }
}

/// One rank's connections: rank 0 holds one stream per other rank (`links[r - 1]`), the others
/// one stream to rank 0.
pub struct Tcp {
    rank: usize,
    world: usize,
    master: String,
    links: Vec<TcpStream>,
    scratch: Vec<u8>,
}

impl Tcp {
    /// Rendezvous with the other ranks of `env` (which must be distributed).
    pub fn connect(env: &DistEnv, timeout: Duration) -> Result<Self> {
        let master = env.master();
        let links = if env.rank == 0 {
            accept_all(env, &master, timeout)?
        } else {
            vec![connect_to_master(env, &master, timeout)?]
        };
        Ok(Self {
            rank: env.rank,
            world: env.world,
            master,
            links,
            scratch: Vec::new(),
        })
    }

    /// The error of a broken link to `peer` (rank 0's view) or to rank 0.
    fn lost(&self, peer: usize, e: io::Error) -> Error {
        let e = if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(e.kind(), "connection closed")
        } else {
            e
        };
        link_error(
            format!(
                "data parallel (rank {} of {}, rendezvous {}): lost rank {peer}, which probably failed (its own error says why)",
                self.rank, self.world, self.master
            ),
            e,
        )
    }

    fn link(&mut self, peer: usize) -> &mut TcpStream {
        if self.rank == 0 {
            &mut self.links[peer - 1]
        } else {
            &mut self.links[0]
        }
    }

    fn send(&mut self, peer: usize, op: u8, count: u64, payload: &[u8]) -> Result<()> {
        let mut head = [0u8; 9];
        head[0] = op;
        head[1..].copy_from_slice(&count.to_le_bytes());
        let s = self.link(peer);
        let r = s.write_all(&head).and_then(|_| s.write_all(payload));
        r.map_err(|e| self.lost(peer, e))
    }

    /// Read a frame header from `peer`; an error frame becomes this rank's error.
    fn recv_head(&mut self, peer: usize) -> Result<(u8, u64)> {
        let mut head = [0u8; 9];
        let r = self.link(peer).read_exact(&mut head);
        r.map_err(|e| self.lost(peer, e))?;
        let count = u64::from_le_bytes(head[1..].try_into().expect("8 bytes"));
        if head[0] == OP_ERROR {
            let mut msg = vec![0u8; count.min(1 << 16) as usize];
            let r = self.link(peer).read_exact(&mut msg);
            r.map_err(|e| self.lost(peer, e))?;
            return Err(Error::usage(String::from_utf8_lossy(&msg).into_owned()));
        }
        Ok((head[0], count))
    }

    fn recv_bytes(&mut self, peer: usize, n: usize) -> Result<Vec<u8>> {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.resize(n, 0);
        let r = self.link(peer).read_exact(&mut buf);
        r.map_err(|e| self.lost(peer, e))?;
        Ok(buf)
    }

    /// Rank 0: tell every other rank that the job cannot go on, and return the same error.
    fn fail_all(&mut self, msg: String) -> Error {
        for peer in 1..self.world {
            // A rank that is gone already cannot be told.
            let _ = self.send(peer, OP_ERROR, msg.len() as u64, msg.as_bytes());
        }
        // Close gracefully: a socket closed with unread data (the frame that did not match)
        // resets the connection, and the reset can overtake the error frame. Wait (briefly)
        // for each rank to read it and hang up.
        for s in &mut self.links {
            let _ = s.shutdown(std::net::Shutdown::Write);
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = io::copy(s, &mut io::sink());
        }
        Error::usage(msg)
    }

    /// Check that `peer` is doing collective `op` over `count` values, as this rank is.
    fn expect(&mut self, peer: usize, op: u8, count: u64, got: (u8, u64)) -> Result<()> {
        if got == (op, count) {
            return Ok(());
        }
        let msg = format!(
            "data parallel: ranks out of step: rank {} is in {} of {count} values, rank {peer} in {} of {} (every rank must run the same command on the same data)",
            self.rank,
            op_name(op),
            op_name(got.0),
            got.1
        );
        Err(if self.rank == 0 {
            self.fail_all(msg)
        } else {
            Error::usage(msg)
        })
    }

    fn all_reduce<T: Wire>(&mut self, op: u8, buf: &mut [T]) -> Result<()> {
        let n = buf.len() as u64;
        if self.rank == 0 {
            // buf holds rank 0's values; add the others' in rank order as they are read.
            for peer in 1..self.world {
                let got = self.recv_head(peer)?;
                self.expect(peer, op, n, got)?;
                let bytes = self.recv_bytes(peer, buf.len() * T::SIZE)?;
                for (o, b) in buf.iter_mut().zip(bytes.chunks_exact(T::SIZE)) {
                    *o += T::get(b);
                }
                self.scratch = bytes;
            }
            let bytes = encode(buf);
            for peer in 1..self.world {
                self.send(peer, op, n, &bytes)?;
            }
        } else {
            let bytes = encode(buf);
            self.send(0, op, n, &bytes)?;
            let got = self.recv_head(0)?;
            self.expect(0, op, n, got)?;
            let bytes = self.recv_bytes(0, buf.len() * T::SIZE)?;
            for (o, b) in buf.iter_mut().zip(bytes.chunks_exact(T::SIZE)) {
                *o = T::get(b);
            }
            self.scratch = bytes;
        }
        Ok(())
    }
}

fn op_name(op: u8) -> &'static str {
    match op {
        OP_SUM_F32 => "an all-reduce (f32)",
        OP_SUM_F64 => "an all-reduce (f64)",
        OP_BROADCAST => "a broadcast",
        OP_BARRIER => "a barrier",
        _ => "an unknown operation",
    }
}

fn encode<T: Wire>(v: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * T::SIZE);
    for &x in v {
        x.put(&mut out);
    }
    out
}

impl Communicator for Tcp {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "tcp"
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce(OP_SUM_F32, buf)
    }
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce(OP_SUM_F64, buf)
    }
    fn broadcast(&mut self, root: usize, bytes: &mut Vec<u8>) -> Result<()> {
        check_root(root, self.world)?;
        if self.rank == 0 {
            // Rank 0 relays another root's bytes.
            if root != 0 {
                let (op, count) = self.recv_head(root)?;
                if op != OP_BROADCAST {
                    self.expect(root, OP_BROADCAST, count, (op, count))?;
                }
                *bytes = self.recv_bytes(root, count as usize)?;
            }
            for peer in (1..self.world).filter(|&p| p != root) {
                self.send(peer, OP_BROADCAST, bytes.len() as u64, bytes)?;
            }
        } else if self.rank == root {
            self.send(0, OP_BROADCAST, bytes.len() as u64, bytes)?;
        } else {
            let (op, count) = self.recv_head(0)?;
            if op != OP_BROADCAST {
                self.expect(0, OP_BROADCAST, count, (op, count))?;
            }
            *bytes = self.recv_bytes(0, count as usize)?;
        }
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        if self.rank == 0 {
            for peer in 1..self.world {
                let got = self.recv_head(peer)?;
                self.expect(peer, OP_BARRIER, 0, got)?;
            }
            for peer in 1..self.world {
                self.send(peer, OP_BARRIER, 0, &[])?;
            }
        } else {
            self.send(0, OP_BARRIER, 0, &[])?;
            let got = self.recv_head(0)?;
            self.expect(0, OP_BARRIER, 0, got)?;
        }
        Ok(())
    }
}

fn link_error(what: String, e: io::Error) -> Error {
    Error::Io {
        path: PathBuf::from(what),
        source: e,
    }
}

fn hello(rank: usize, world: usize) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&(rank as u32).to_le_bytes());
    h[12..].copy_from_slice(&(world as u32).to_le_bytes());
    h
}

/// Rank 0: listen on MASTER_PORT and accept one connection from each other rank.
fn accept_all(env: &DistEnv, master: &str, timeout: Duration) -> Result<Vec<TcpStream>> {
    let port = env.master_port.unwrap_or(0);
    // All interfaces (MASTER_ADDR may be a name, e.g. a Kubernetes service, that resolves to an
    // address this machine does not own); IPv6 when MASTER_ADDR is an IPv6 address.
    let v6 = env
        .master_addr
        .as_deref()
        .and_then(|h| {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            h.parse::<IpAddr>()
                .ok()
                .or_else(|| (h, port).to_socket_addrs().ok()?.next().map(|a| a.ip()))
        })
        .is_some_and(|ip| ip.is_ipv6());
    let any: IpAddr = if v6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let label = |what: &str| {
        format!(
            "{}={port} (rank 0, rendezvous {master}): {what}",
            env.port_from
        )
    };
    let listener = TcpListener::bind(SocketAddr::new(any, port))
        .map_err(|e| link_error(label("cannot listen"), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| link_error(label("cannot listen"), e))?;
    let mut links: Vec<Option<TcpStream>> = (1..env.world).map(|_| None).collect();
    let deadline = Instant::now() + timeout;
    while links.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((s, _)) => {
                // Anything that is not a peftkit rank (a port scan, a health check) is dropped.
                if let Some((rank, s)) = greet(s, env)? {
                    if links[rank - 1].is_some() {
                        return Err(Error::usage(format!(
                            "data parallel: two processes say RANK={rank} (rendezvous {master})"
                        )));
                    }
                    links[rank - 1] = Some(s);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = links
                        .iter()
                        .enumerate()
                        .filter(|(_, l)| l.is_none())
                        .map(|(i, _)| (i + 1).to_string())
                        .collect();
                    return Err(link_error(
                        label(&format!(
                            "rank(s) {} did not connect within {:.0} s",
                            missing.join(", "),
                            timeout.as_secs_f64()
                        )),
                        io::Error::new(io::ErrorKind::TimedOut, "timed out"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(link_error(label("accept failed"), e)),
        }
    }
    Ok(links.into_iter().map(|l| l.expect("connected")).collect())
}

/// Rank 0: read a connecting rank's hello and answer it. None: not one of ours.
fn greet(mut s: TcpStream, env: &DistEnv) -> Result<Option<(usize, TcpStream)>> {
    let setup = |s: &TcpStream| -> io::Result<()> {
        s.set_nonblocking(false)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
    };
    let mut h = [0u8; 16];
    if setup(&s).and_then(|_| s.read_exact(&mut h)).is_err() || &h[..8] != MAGIC {
        return Ok(None);
    }
    let rank = u32::from_le_bytes(h[8..12].try_into().expect("4")) as usize;
    let world = u32::from_le_bytes(h[12..].try_into().expect("4")) as usize;
    let problem = if world != env.world {
        Some(format!(
            "data parallel: rank {rank} says WORLD_SIZE={world}, rank 0 says WORLD_SIZE={}",
            env.world
        ))
    } else if rank == 0 || rank >= world {
        Some(format!(
            "data parallel: a second process says RANK={rank} (WORLD_SIZE={world})"
        ))
    } else {
        None
    };
    let reply = |s: &mut TcpStream, msg: &str| {
        let mut r = vec![u8::from(!msg.is_empty())];
        r.extend_from_slice(&(msg.len() as u32).to_le_bytes());
        r.extend_from_slice(msg.as_bytes());
        s.write_all(&r)
    };
    if let Some(msg) = problem {
        let _ = reply(&mut s, &msg);
        return Err(Error::usage(msg));
    }
    if reply(&mut s, "").is_err() || s.set_read_timeout(None).is_err() {
        return Ok(None);
    }
    Ok(Some((rank, s)))
}

/// Ranks 1..: connect to rank 0, retrying until `timeout` (rank 0 may start later).
fn connect_to_master(env: &DistEnv, master: &str, timeout: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    let label = || {
        format!(
            "MASTER_ADDR:{}={master} (rank {} of {})",
            env.port_from, env.rank, env.world
        )
    };
    let mut last = io::Error::new(io::ErrorKind::TimedOut, "timed out");
    loop {
        // Resolved again on every try: a name (a Kubernetes service, say) may appear late.
        match master.to_socket_addrs() {
            Ok(addrs) => {
                for a in addrs {
                    match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                        Ok(s) => match handshake(s, env) {
                            Ok(Some(s)) => return Ok(s),
                            Ok(None) => {}
                            Err(e) => return Err(e),
                        },
                        Err(e) => last = e,
                    }
                }
            }
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            return Err(link_error(
                format!(
                    "{}: could not reach rank 0 within {:.0} s",
                    label(),
                    timeout.as_secs_f64()
                ),
                last,
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Send this rank's hello and read rank 0's answer. None: the connection broke (try again).
fn handshake(mut s: TcpStream, env: &DistEnv) -> Result<Option<TcpStream>> {
    let mut r = [0u8; 5];
    let ok = s.set_nodelay(true).is_ok()
        && s.set_read_timeout(Some(Duration::from_secs(30))).is_ok()
        && s.write_all(&hello(env.rank, env.world)).is_ok()
        && s.read_exact(&mut r).is_ok();
    if !ok {
        return Ok(None);
    }
    if r[0] != 0 {
        let n = u32::from_le_bytes(r[1..].try_into().expect("4")) as usize;
        let mut msg = vec![0u8; n.min(1 << 16)];
        let _ = s.read_exact(&mut msg);
        return Err(Error::usage(String::from_utf8_lossy(&msg).into_owned()));
    }
    s.set_read_timeout(None)
        .map_err(|e| link_error(format!("rank {}", env.rank), e))?;
    Ok(Some(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn env(rank: usize, world: usize, port: u16) -> DistEnv {
        DistEnv {
            rank,
            world,
            local_rank: rank,
            master_addr: Some("127.0.0.1".into()),
            master_port: Some(port),
            port_from: "MASTER_PORT",
        }
    }

    #[test]
    fn three_ranks_over_loopback() {
        let port = free_port();
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    // Rank 0 starts last: the others must wait for it.
                    if rank == 0 {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    let mut c = Tcp::connect(&env(rank, 3, port), Duration::from_secs(20)).unwrap();
                    let mut v: Vec<f32> =
                        (0..1000).map(|i| (i * (rank + 1)) as f32 * 0.1).collect();
                    c.all_reduce_sum(&mut v).unwrap();
                    let mut d = vec![rank as f64 + 0.5];
                    c.all_reduce_sum_f64(&mut d).unwrap();
                    let mut b = if rank == 2 {
                        b"from two".to_vec()
                    } else {
                        Vec::new()
                    };
                    c.broadcast(2, &mut b).unwrap();
                    c.barrier().unwrap();
                    (v, d, b)
                })
            })
            .collect();
        let res: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (v, d, b) in &res {
            assert_eq!(v, &res[0].0);
            assert_eq!(d[0], 0.5 + 1.5 + 2.5);
            assert_eq!(b, b"from two");
        }
        for (i, x) in res[0].0.iter().enumerate() {
            let want = ((i as f32 * 0.1) + (2 * i) as f32 * 0.1) + (3 * i) as f32 * 0.1;
            assert_eq!(x.to_bits(), want.to_bits());
        }
    }

    #[test]
    fn mismatched_lengths_fail_on_every_rank() {
        let port = free_port();
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || {
                    let mut c = Tcp::connect(&env(rank, 2, port), Duration::from_secs(20)).unwrap();
                    let mut v = vec![1.0f32; 3 + rank];
                    c.all_reduce_sum(&mut v).unwrap_err().to_string()
                })
            })
            .collect();
        for h in handles {
            assert!(h.join().unwrap().contains("out of step"));
        }
    }

    #[test]
    fn rank_zero_absent_times_out_naming_the_address() {
        let port = free_port();
        let e = Tcp::connect(&env(1, 2, port), Duration::from_millis(500))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
        assert!(e.contains("MASTER_ADDR"), "{e}");
        let e = Tcp::connect(&env(0, 2, port), Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("rank(s) 1 did not connect"), "{e}");
    }

    #[test]
    fn lost_peer_is_an_error_not_a_hang() {
        let port = free_port();
        let r1 = std::thread::spawn(move || {
            let c = Tcp::connect(&env(1, 2, port), Duration::from_secs(20)).unwrap();
            drop(c); // rank 1 "fails"
        });
        let mut c = Tcp::connect(&env(0, 2, port), Duration::from_secs(20)).unwrap();
        r1.join().unwrap();
        let e = c.all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
        assert!(e.contains("lost rank 1"), "{e}");
    }
}

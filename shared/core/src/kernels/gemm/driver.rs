//! Blocked, packed GEMM driver (BLIS loop order), generic over the micro-kernel.
//!
//! Loops: `jc` over NC-column blocks, `pc` over KC-deep blocks (B block packed once, shared by
//! all threads), then a parallel grid of (M chunk × N chunk) tasks; each task packs its A chunk
//! into a thread-local buffer and walks NR panels (outer) × MR panels (inner).

use rayon::prelude::*;
use std::cell::Cell;

/// A strided operand view: element (i, kk) at `ptr[i * ls + kk * ks]` (lane stride, k stride).
#[derive(Clone, Copy)]
pub(crate) struct View {
    pub ptr: *const f32,
    pub ls: usize,
    pub ks: usize,
}

impl View {
    /// Pointer to element (lane, kk) (a method, so that closures capture the whole view).
    ///
    /// # Safety
    /// The element lies inside the viewed operand.
    pub unsafe fn at(self, lane: usize, kk: usize) -> *const f32 {
        // SAFETY: caller contract.
        unsafe { self.ptr.add(lane * self.ls + kk * self.ks) }
    }
}

/// Raw pointers shared across the worker threads of one product. Tasks write disjoint tiles.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);

impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    pub fn get(self) -> *mut T {
        self.0
    }
}
// SAFETY: only used to hand disjoint regions of one buffer to rayon tasks of a single product
// that outlives them (the product waits for all tasks before returning).
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above; concurrent tasks never touch the same elements.
unsafe impl<T> Sync for SendPtr<T> {}
// SAFETY: views are read-only inputs that outlive the product.
unsafe impl Send for View {}
// SAFETY: as above.
unsafe impl Sync for View {}

/// A register-tile micro-kernel plus its packing routine.
pub(crate) trait Kernel {
    const MR: usize;
    const NR: usize;
    const KC: usize;
    const MC: usize;
    const NC: usize;

    /// C[mr×nr] (+)= Apanel[k×MR] · Bpanel[k×NR] (packed, zero padded). Overwrites C when
    /// `overwrite`, otherwise adds to it. Only the top-left `mr×nr` part of the tile is written.
    ///
    /// # Safety
    /// `a` holds `k*MR` floats, `b` holds `k*NR` floats, `c` addresses an `mr×nr` tile with row
    /// stride `c_rs`; the CPU supports the kernel's instruction set.
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro(
        k: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        c_rs: usize,
        mr: usize,
        nr: usize,
        overwrite: bool,
    );

    /// Pack `lanes` lanes × `len` k-steps of `src` into `dst[kk*ld + lane]`, zero filling lanes
    /// `lanes..ld`.
    ///
    /// # Safety
    /// `src` covers the described elements, `dst` holds `len*ld` floats, `lanes <= ld`.
    unsafe fn pack(src: View, lanes: usize, len: usize, dst: *mut f32, ld: usize) {
        // SAFETY: forwarded contract.
        unsafe { pack_generic(src, lanes, len, dst, ld) }
    }
}

/// Portable packing routine.
///
/// # Safety
/// See [`Kernel::pack`].
pub(crate) unsafe fn pack_generic(src: View, lanes: usize, len: usize, dst: *mut f32, ld: usize) {
    // SAFETY: caller guarantees the extents.
    unsafe {
        for kk in 0..len {
            let d = dst.add(kk * ld);
            let s = src.ptr.add(kk * src.ks);
            for l in 0..lanes {
                *d.add(l) = *s.add(l * src.ls);
            }
            for l in lanes..ld {
                *d.add(l) = 0.0;
            }
        }
    }
}

/// A 64-byte aligned scratch buffer kept per thread; taken out while in use so that nested
/// (re-entrant) products on the same thread simply allocate their own.
pub(crate) struct Scratch {
    buf: Vec<f32>,
}

thread_local! {
    static SCRATCH_A: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static SCRATCH_B: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

impl Scratch {
    fn take(which: &'static std::thread::LocalKey<Cell<Vec<f32>>>, len: usize) -> Self {
        let mut buf = which.with(|c| c.take());
        if buf.len() < len + 16 {
            buf = vec![0.0; len + 16];
        }
        Scratch { buf }
    }
    fn ptr(&mut self) -> *mut f32 {
        let p = self.buf.as_mut_ptr();
        let off = p.align_offset(64);
        // SAFETY: the buffer has 16 spare floats, more than any alignment offset (< 16 floats).
        unsafe { p.add(off.min(15)) }
    }
    fn give_back(self, which: &'static std::thread::LocalKey<Cell<Vec<f32>>>) {
        which.with(|c| c.set(self.buf));
    }
}

/// Number of chunks to split `panels` panels into (at most `max_per` per chunk), rounded up to a
/// multiple of `threads` when that does not create empty chunks.
fn chunks(panels: usize, max_per: usize, threads: usize) -> usize {
    let mut c = panels.div_ceil(max_per.max(1));
    if threads > 1 {
        c = c.div_ceil(threads) * threads;
    }
    c.clamp(1, panels.max(1))
}

/// Panel range of chunk `i` of `n` over `panels` panels (balanced).
fn chunk_range(panels: usize, n: usize, i: usize) -> (usize, usize) {
    let base = panels / n;
    let rem = panels % n;
    let start = i * base + i.min(rem);
    let len = base + usize::from(i < rem);
    (start, start + len)
}

/// C[m×n] (+)= A·B with A(i,kk) = a.ptr[i*a.ls + kk*a.ks], B(kk,j) = b.ptr[j*b.ls + kk*b.ks].
///
/// # Safety
/// The views cover the m×k and k×n operands, `c` covers the m×n output with row stride `c_rs`
/// and does not overlap the inputs; the CPU supports `K`'s instruction set.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_packed<K: Kernel>(
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
    c: *mut f32,
    c_rs: usize,
    acc: bool,
    threads: usize,
) {
    let (mr, nr) = (K::MR, K::NR);
    let nkb = k.div_ceil(K::KC);
    let kc_max = k.div_ceil(nkb);
    let nnb = n.div_ceil(K::NC);
    let nc_max = n.div_ceil(nnb).div_ceil(nr) * nr;
    let m_panels = m.div_ceil(mr);
    let mc_panels = (K::MC / mr).max(1);

    let mut bbuf = Scratch::take(&SCRATCH_B, kc_max * nc_max);
    let bp = SendPtr(bbuf.ptr());
    let cp = SendPtr(c);

    for jc in (0..n).step_by(nc_max) {
        let nc = nc_max.min(n - jc);
        let n_panels = nc.div_ceil(nr);
        for (pi, pc) in (0..k).step_by(kc_max).enumerate() {
            let kc = kc_max.min(k - pc);
            let overwrite = pi == 0 && !acc;
            // Pack the B block: panels of NR columns, kc deep.
            let pack_b = |p: usize| {
                let j0 = jc + p * nr;
                let cols = nr.min(n - j0);
                let src = View {
                    // SAFETY: (pc, j0) is inside B.
                    ptr: unsafe { b.at(j0, pc) },
                    ..b
                };
                // SAFETY: panel p of the block buffer holds kc*nr floats.
                unsafe { K::pack(src, cols, kc, bp.get().add(p * kc * nr), nr) };
            };
            if threads > 1 && n_panels > 1 && kc * nc >= 1 << 15 {
                (0..n_panels).into_par_iter().for_each(pack_b);
            } else {
                (0..n_panels).for_each(pack_b);
            }

            let m_chunks = chunks(m_panels, mc_panels, threads);
            let n_chunks = if m_chunks >= threads {
                1
            } else {
                threads.min(n_panels)
            };
            let task = |t: usize| {
                let (mi, ni) = (t / n_chunks, t % n_chunks);
                let (mp0, mp1) = chunk_range(m_panels, m_chunks, mi);
                let (np0, np1) = chunk_range(n_panels, n_chunks, ni);
                if mp0 == mp1 || np0 == np1 {
                    return;
                }
                let mut abuf = Scratch::take(&SCRATCH_A, (mp1 - mp0) * mr * kc);
                let ap = abuf.ptr();
                for p in mp0..mp1 {
                    let i0 = p * mr;
                    let src = View {
                        // SAFETY: (i0, pc) is inside A.
                        ptr: unsafe { a.at(i0, pc) },
                        ..a
                    };
                    // SAFETY: the buffer holds (mp1-mp0)*mr*kc floats.
                    unsafe { K::pack(src, mr.min(m - i0), kc, ap.add((p - mp0) * mr * kc), mr) };
                }
                for q in np0..np1 {
                    let j0 = jc + q * nr;
                    let cols = nr.min(n - j0);
                    // SAFETY: panel q of the packed B block.
                    let bq = unsafe { bp.get().add(q * kc * nr) };
                    for p in mp0..mp1 {
                        let i0 = p * mr;
                        // SAFETY: packed panels hold kc*MR / kc*NR floats; the C tile at
                        // (i0, j0) of size rows×cols lies inside C and belongs to this task.
                        unsafe {
                            K::micro(
                                kc,
                                ap.add((p - mp0) * mr * kc),
                                bq,
                                cp.get().add(i0 * c_rs + j0),
                                c_rs,
                                mr.min(m - i0),
                                cols,
                                overwrite,
                            )
                        };
                    }
                }
                abuf.give_back(&SCRATCH_A);
            };
            let tasks = m_chunks * n_chunks;
            if threads > 1 && tasks > 1 {
                (0..tasks).into_par_iter().for_each(task);
            } else {
                (0..tasks).for_each(task);
            }
        }
    }
    bbuf.give_back(&SCRATCH_B);
}

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
    // SAFETY: forwarded contract.
    unsafe { gemm_driver::<K>(m, n, k, a, BSource::Pack(b), c, c_rs, acc, threads) }
}

/// Packs one B panel: `(j0, cols, pc, kc, dst)` writes columns `j0..j0+cols` over k-steps
/// `pc..pc+kc` to `dst[kk*NR + lane]`, zero filling lanes `cols..NR`. For B operands that are
/// not plain f32 (4-bit weights decoded while packing).
pub(crate) type PanelPacker<'a> = &'a (dyn Fn(usize, usize, usize, usize, *mut f32) + Sync);

/// Where the driver gets its packed B blocks from.
#[derive(Clone, Copy)]
pub(crate) enum BSource<'a> {
    /// Pack each block from this view into a scratch buffer.
    Pack(View),
    /// Pack each block with this function into a scratch buffer.
    Custom(PanelPacker<'a>),
    /// Already packed by [`pack_b_full`] for the same kernel, n and k.
    Prepacked(*const f32),
}

// SAFETY: the prepacked pointer is a read-only buffer that outlives the product; the other
// variants are Sync themselves.
unsafe impl Send for BSource<'_> {}
// SAFETY: as above.
unsafe impl Sync for BSource<'_> {}

/// Block sizes of the driver for an n×k B operand: (kc_max, nc_max).
pub(crate) fn b_blocking<K: Kernel>(n: usize, k: usize) -> (usize, usize) {
    let nkb = k.div_ceil(K::KC).max(1);
    let kc_max = k.div_ceil(nkb);
    let nnb = n.div_ceil(K::NC).max(1);
    let nc_max = n.div_ceil(nnb).div_ceil(K::NR) * K::NR;
    (kc_max, nc_max)
}

/// Floats [`pack_b_full`] writes for an n×k B operand.
pub(crate) fn packed_b_len<K: Kernel>(n: usize, k: usize) -> usize {
    n.div_ceil(K::NR) * K::NR * k
}

/// Offset of the packed (jc, pc) block inside a [`pack_b_full`] buffer: blocks are stored
/// NC-column block by block, each block KC-deep slice by slice, each slice panel by panel.
fn prepacked_offset<K: Kernel>(n: usize, k: usize, nc_max: usize, jc: usize, pc: usize) -> usize {
    let nc = nc_max.min(n - jc);
    let ncp = nc.div_ceil(K::NR) * K::NR;
    jc * k + ncp * pc
}

/// Pack the whole B operand (n×k, element (kk, j) at `b.at(j, kk)`) in the driver's block
/// layout, so that products with it skip packing.
///
/// # Safety
/// `b` covers the operand, `dst` holds [`packed_b_len`] floats; the CPU supports `K`.
pub(crate) unsafe fn pack_b_full<K: Kernel>(
    n: usize,
    k: usize,
    b: BSource,
    dst: *mut f32,
    threads: usize,
) {
    let nr = K::NR;
    let (kc_max, nc_max) = b_blocking::<K>(n, k);
    let dp = SendPtr(dst);
    let mut jobs = Vec::new();
    for jc in (0..n).step_by(nc_max) {
        let nc = nc_max.min(n - jc);
        for pc in (0..k).step_by(kc_max) {
            let kc = kc_max.min(k - pc);
            let off = prepacked_offset::<K>(n, k, nc_max, jc, pc);
            for p in 0..nc.div_ceil(nr) {
                jobs.push((jc + p * nr, pc, kc, off + p * kc * nr));
            }
        }
    }
    let job = |&(j0, pc, kc, off): &(usize, usize, usize, usize)| match b {
        BSource::Pack(b) => {
            let src = View {
                // SAFETY: (pc, j0) is inside B.
                ptr: unsafe { b.at(j0, pc) },
                ..b
            };
            // SAFETY: the panel lies inside dst (layout above).
            unsafe { K::pack(src, nr.min(n - j0), kc, dp.get().add(off), nr) };
        }
        // SAFETY: as above.
        BSource::Custom(f) => f(j0, nr.min(n - j0), pc, kc, unsafe { dp.get().add(off) }),
        BSource::Prepacked(_) => unreachable!("pack_b_full from a packed source"),
    };
    if threads > 1 && n * k >= 1 << 15 {
        jobs.par_iter().for_each(job);
    } else {
        jobs.iter().for_each(job);
    }
}

/// [`gemm_packed`] with an explicit B source.
///
/// # Safety
/// As [`gemm_packed`]; a prepacked source was packed by [`pack_b_full`] for `K`, n and k.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_driver<K: Kernel>(
    m: usize,
    n: usize,
    k: usize,
    a: View,
    bsrc: BSource,
    c: *mut f32,
    c_rs: usize,
    acc: bool,
    threads: usize,
) {
    let (mr, nr) = (K::MR, K::NR);
    let (kc_max, nc_max) = b_blocking::<K>(n, k);
    let m_panels = m.div_ceil(mr);
    let mc_panels = (K::MC / mr).max(1);

    let mut bbuf = match bsrc {
        BSource::Pack(_) | BSource::Custom(_) => Some(Scratch::take(&SCRATCH_B, kc_max * nc_max)),
        BSource::Prepacked(_) => None,
    };
    let scratch_b = SendPtr(bbuf.as_mut().map_or(std::ptr::null_mut(), |s| s.ptr()));
    let cp = SendPtr(c);

    for jc in (0..n).step_by(nc_max) {
        let nc = nc_max.min(n - jc);
        let n_panels = nc.div_ceil(nr);
        for (pi, pc) in (0..k).step_by(kc_max).enumerate() {
            let kc = kc_max.min(k - pc);
            let overwrite = pi == 0 && !acc;
            let bp = match bsrc {
                BSource::Pack(_) | BSource::Custom(_) => scratch_b,
                // SAFETY: the block lies inside the prepacked buffer (pack_b_full layout).
                BSource::Prepacked(p) => SendPtr(unsafe {
                    p.add(prepacked_offset::<K>(n, k, nc_max, jc, pc)) as *mut f32
                }),
            };
            // Pack the B block: panels of NR columns, kc deep.
            let pack_b = |p: usize| {
                let j0 = jc + p * nr;
                let cols = nr.min(n - j0);
                // SAFETY: panel p of the block buffer holds kc*nr floats.
                let dst = unsafe { bp.get().add(p * kc * nr) };
                match bsrc {
                    BSource::Pack(b) => {
                        let src = View {
                            // SAFETY: (pc, j0) is inside B.
                            ptr: unsafe { b.at(j0, pc) },
                            ..b
                        };
                        // SAFETY: as above.
                        unsafe { K::pack(src, cols, kc, dst, nr) };
                    }
                    BSource::Custom(f) => f(j0, cols, pc, kc, dst),
                    BSource::Prepacked(_) => {}
                }
            };
            if !matches!(bsrc, BSource::Prepacked(_)) {
                if threads > 1 && n_panels > 1 && kc * nc >= 1 << 15 {
                    (0..n_panels).into_par_iter().for_each(pack_b);
                } else {
                    (0..n_panels).for_each(pack_b);
                }
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
    if let Some(b) = bbuf {
        b.give_back(&SCRATCH_B);
    }
}

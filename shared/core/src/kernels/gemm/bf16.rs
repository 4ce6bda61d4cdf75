//! bf16 matrix products with f32 accumulation (PyTorch autocast semantics): both operands are
//! rounded to bf16 (round to nearest even, like torch's float→bf16), every product is
//! accumulated in f32, the output is f32.
//!
//! The weight operand is a frozen f32 weight `W [n, k]` (a linear layer's `[out, in]`) that
//! is rounded and packed once into a [`PackedBf16`] (half the memory of the f32 weight, plus
//! padding to whole panels); the activation operand stays f32 and is rounded to bf16 while it
//! is packed into panels (no separate conversion pass). Two layouts cover training:
//!
//! * forward, `y[m×n] = x[m×k] · Wᵀ`: pack with [`PackedBf16::for_nt`], multiply with
//!   [`matmul_nt_bf16`];
//! * input gradient, `dx[m×k] = dy[m×n] · W`: pack with [`PackedBf16::for_nn`], multiply with
//!   [`matmul_nn_bf16`].
//!
//! Implementation: a BLIS-style packed driver (k blocks, then a parallel grid of row chunks ×
//! column chunks, as the f32 driver) over operands packed as bf16 *pairs*: consecutive k
//! elements (2p, 2p+1) share one 32-bit word (even element in the low half), the layout that
//! `vdpbf16ps` and AMX's `tdpbf16ps` consume. Three kernels, picked at run time:
//!
//! * [`Bf16Path::Amx`] (best where present): 32×32 blocks of C in four AMX tiles, updated by
//!   `tdpbf16ps` (inline assembly; Linux x86-64 with AMX-TILE/AMX-BF16, the process asks the
//!   kernel for the tile state once). On this project's Xeon it runs ~3–6× our f32 GEMM.
//! * [`Bf16Path::Avx512Bf16`]: a 12×32 `vdpbf16ps` micro-kernel (AVX512-BF16), the activation
//!   rounded with `vcvtne2ps2bf16` while packing. Note: on the Intel Xeon this was measured
//!   on, `vdpbf16ps` issues at well under half the rate of `vfmadd` (~70 vs ~95 GFLOP/s per
//!   core), so this path is *slower* than the f32 GEMM there (~0.7×); it pays off on CPUs
//!   whose bf16 dot product runs at full rate (AMD Zen 4/5).
//! * [`Bf16Path::Fallback`]: portable Rust on the same packed layout, performing the same f32
//!   operations in the same order as `vdpbf16ps` (per pair: the odd product, then the even
//!   one), so its results are bit-identical to the AVX512-BF16 path except for subnormals
//!   (the bf16 instructions treat subnormal inputs as zero and flush subnormal results, the
//!   fallback does not). It is compiled for AVX-512F, AVX2+FMA or the baseline target and
//!   picked at run time; it is slower than the f32 GEMM (only for CPUs without bf16 support,
//!   and for tests).
//!
//! AMX accumulates in f32 too, but in its own order, so its results differ from the other two
//! paths by f32 rounding only. `PEFTKIT_GEMM_BF16=amx|avx512|fallback` forces a path (a forced
//! path the CPU lacks falls back to the best available one). Products of bf16-exact values are
//! exact in f32, so the only rounding is the f32 accumulation.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;

use super::driver::SendPtr;
use super::{PARALLEL_MIN, SERIAL};
use rayon::prelude::*;
use std::cell::Cell;
use std::sync::OnceLock;

/// Round an f32 to the nearest bf16 (ties to even) and widen it back to f32. NaNs stay NaN
/// (quietened, sign and top payload bits kept); values beyond the largest bf16 round to ±∞.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    bf16_bits_to_f32(f32_to_bf16_bits(x))
}

/// The bf16 bit pattern nearest to `x` (ties to even), as torch's `float → bfloat16`
/// conversion (for NaN: the input's sign and top payload bits, with the quiet bit set).
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if x.is_nan() {
        return ((u >> 16) as u16) | 0x0040;
    }
    let bias = 0x7fff + ((u >> 16) & 1);
    (u.wrapping_add(bias) >> 16) as u16
}

/// The f32 value of a bf16 bit pattern (exact).
#[inline]
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Round every element of `x` to bf16 in place (see [`round_bf16`]).
pub fn round_bf16_slice(x: &mut [f32]) {
    for v in x {
        *v = round_bf16(*v);
    }
}

/// Implementation behind the bf16 products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Path {
    /// AMX tile kernel (`tdpbf16ps`, x86-64 Linux with AMX-BF16 and AVX512-BF16).
    Amx,
    /// `vdpbf16ps` micro-kernel (x86-64 with AVX512F + AVX512-BF16).
    Avx512Bf16,
    /// The same arithmetic on the f32 GEMM (x86-64 with AVX2+FMA or AVX-512 but no bf16
    /// instructions): rounded operands, exact products, f32 accumulation
    /// (`bf16_emulated`).
    Emulated,
    /// Portable kernel with the same arithmetic (every CPU).
    Fallback,
}

impl Bf16Path {
    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Bf16Path::Amx => Bf16Path::Avx512Bf16.available() && amx::available(),
            #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
            Bf16Path::Amx => false,
            #[cfg(target_arch = "x86_64")]
            Bf16Path::Avx512Bf16 => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Bf16Path::Avx512Bf16 => false,
            Bf16Path::Emulated => super::bf16_emulated::available(),
            Bf16Path::Fallback => true,
        }
    }

    /// The fastest path this CPU supports.
    pub fn best() -> Bf16Path {
        [Bf16Path::Amx, Bf16Path::Avx512Bf16, Bf16Path::Emulated]
            .into_iter()
            .find(|p| p.available())
            .unwrap_or(Bf16Path::Fallback)
    }

    /// The path in use: `PEFTKIT_GEMM_BF16` (`amx`, `avx512` or `fallback`) if set and
    /// available, else [`Bf16Path::best`].
    pub fn selected() -> Bf16Path {
        static SELECTED: OnceLock<Bf16Path> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let forced = std::env::var("PEFTKIT_GEMM_BF16")
                .ok()
                .and_then(|v| Bf16Path::parse(&v));
            forced.unwrap_or_else(Bf16Path::best).or_available()
        })
    }

    fn or_available(self) -> Bf16Path {
        if self.available() {
            self
        } else {
            Bf16Path::best()
        }
    }

    /// The path named by a `PEFTKIT_GEMM_BF16` value, if any.
    pub fn parse(name: &str) -> Option<Bf16Path> {
        match name.trim().to_ascii_lowercase().as_str() {
            "amx" => Some(Bf16Path::Amx),
            "avx512" | "avx512bf16" | "avx512_bf16" => Some(Bf16Path::Avx512Bf16),
            "emulated" | "f32" => Some(Bf16Path::Emulated),
            "fallback" | "portable" | "scalar" => Some(Bf16Path::Fallback),
            _ => None,
        }
    }

    /// The path's name for `PEFTKIT_GEMM_BF16`.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Path::Amx => "amx",
            Bf16Path::Avx512Bf16 => "avx512",
            Bf16Path::Emulated => "emulated",
            Bf16Path::Fallback => "fallback",
        }
    }
}

/// A register-tile micro-kernel over bf16-pair panels plus its activation packer.
trait Kernel {
    /// Rows of the register tile.
    const MR: usize;
    /// Columns of the register tile (lanes of a packed weight panel).
    const NR: usize;
    /// Rows of activation packed per task (a multiple of MR).
    const MC: usize;

    /// Pack `rows ≤ MR` rows of f32 activations (row stride `lda`, `klen` valid elements
    /// from `a`, zeros after) as `kp` bf16 pairs (`bf16(a[r][2p]) | bf16(a[r][2p+1]) << 16`)
    /// in the kernel's A panel layout (`[pair][MR]` for the vector kernels, AMX tiles for
    /// AMX), rows `rows..MR` zero.
    ///
    /// # Safety
    /// `a` covers `rows` rows of `klen` elements, `klen ≤ 2·kp`, `dst` holds `padded(kp)*MR`
    /// words; the CPU supports the kernel's instruction set.
    unsafe fn pack_a(a: *const f32, lda: usize, rows: usize, klen: usize, kp: usize, dst: *mut u32);

    /// C[mr×nr] (+)= A·B over `kp` pairs: `a` is an A panel from `pack_a`, `b` a `[pair][NR]`
    /// weight panel. Overwrites C when `overwrite`, else adds to it; only the top-left `mr×nr`
    /// is written.
    ///
    /// # Safety
    /// Panels hold `padded(kp)*MR` / `padded(kp)*NR` words (zero padded); `c` addresses an
    /// `mr×nr` tile with row stride `c_rs`; the CPU supports the kernel's instruction set.
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro(
        kp: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        c_rs: usize,
        mr: usize,
        nr: usize,
        overwrite: bool,
    );

    /// Prepare the calling thread for `micro` calls (AMX: load the tile configuration).
    ///
    /// # Safety
    /// The CPU supports the kernel's instruction set.
    unsafe fn begin() {}

    /// After the `micro` calls of a task on this thread (AMX: release the tiles).
    ///
    /// # Safety
    /// Follows [`Kernel::begin`] on the same thread.
    unsafe fn end() {}
}

/// Pairs per k block (every kernel uses the same blocking, which keeps the AVX-512 and the
/// fallback kernels bit-identical): 384 pairs = 768 k elements, so 576-wide layers run in one
/// block and 1536-wide ones in two.
const KCP: usize = 384;

/// Pairs per AMX tile step: k blocks are multiples of it, and packed panels are zero padded
/// to a multiple of it.
const KSTEP: usize = 16;

/// Pairs of the k blocks of a product with `kp` pairs (balanced, a multiple of [`KSTEP`], at
/// most [`KCP`]; the last block may be shorter).
fn k_block(kp: usize) -> usize {
    let nkb = kp.div_ceil(KCP).max(1);
    kp.div_ceil(nkb).next_multiple_of(KSTEP)
}

/// Pairs stored for a k block of `bk` pairs.
fn padded(bk: usize) -> usize {
    bk.next_multiple_of(KSTEP)
}

/// Words of a packed operand with `kp` pairs and `lanes` lanes (blocks padded by [`padded`]).
fn packed_words(kp: usize, lanes: usize) -> usize {
    if kp == 0 {
        return 0;
    }
    let kcp = k_block(kp);
    let last = (kp - 1) / kcp * kcp;
    (last + padded(kp - last)) * lanes
}

/// A frozen f32 weight `W [n, k]` (a linear layer's `[out, in]`) rounded to bf16 once and
/// packed for one of the two training products:
///
/// * [`PackedBf16::for_nt`] → [`matmul_nt_bf16`]: forward, `y[m×n] = x[m×k] · Wᵀ`
///   (reduction over k, the input features);
/// * [`PackedBf16::for_nn`] → [`matmul_nn_bf16`]: input gradient, `dx[m×k] = dy[m×n] · W`
///   (reduction over n, the output features; packs W's transpose view).
///
/// A layer that needs both keeps two packs (2 bytes per weight each, so the pair costs what
/// the f32 weight does). The pack is tied to the path it was made for ([`PackedBf16::path`]).
/// Packing runs on the rayon pool (measured ≈75 ms on 2 threads for the 49152×576 LM head,
/// ≈2 ms for a 576×1536 layer), so pack frozen weights once, not per step.
///
/// Layout: the product has `pk` reduction elements (`kp = ⌈pk/2⌉` pairs) and `pn` output columns,
/// padded to `npad` (a multiple of the kernel's NR). The pairs are split into k blocks of
/// [`k_block`] pairs; block `[p0, p0 + bk)` starts at word `p0 * npad` and holds `npad / NR`
/// panels of `padded(bk) × NR` words (`[pair][lane]`, zero pairs after `bk`). With NR = 32
/// this layout serves both the AVX512-BF16 and the AMX kernel (a 16-pair × 16-lane slice of
/// a panel is an AMX B tile with a 128-byte row stride).
pub struct PackedBf16 {
    path: Bf16Path,
    nn: bool,
    n: usize,
    k: usize,
    pn: usize,
    pk: usize,
    npad: usize,
    buf: Vec<u32>,
    off: usize,
    /// [`Bf16Path::Emulated`]: the rounded weight `[n, k]` as bf16 bits, unpacked (the f32
    /// driver packs its panels from it); one copy shared by a weight's two packs
    /// ([`PackedBf16::for_nn_of`]).
    bits: std::sync::Arc<Vec<u16>>,
}

impl Default for PackedBf16 {
    fn default() -> Self {
        Self {
            path: Bf16Path::Fallback,
            nn: false,
            n: 0,
            k: 0,
            pn: 0,
            pk: 0,
            npad: 0,
            buf: Vec::new(),
            off: 0,
            bits: Default::default(),
        }
    }
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedBf16")
            .field("path", &self.path)
            .field("layout", &if self.nn { "nn" } else { "nt" })
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

impl PackedBf16 {
    /// Round and pack `w` (`[n, k]` row-major, a linear layer's `[out, in]`) for the forward
    /// product `y[m×n] = x[m×k] · Wᵀ` ([`matmul_nt_bf16`]), for the selected path.
    pub fn for_nt(w: &[f32], n: usize, k: usize) -> Self {
        Self::for_nt_with(Bf16Path::selected(), w, n, k)
    }

    /// Round and pack `w` (`[n, k]` row-major, a linear layer's `[out, in]`) for the input
    /// gradient `dx[m×k] = dy[m×n] · W` ([`matmul_nn_bf16`]), for the selected path.
    pub fn for_nn(w: &[f32], n: usize, k: usize) -> Self {
        Self::for_nn_with(Bf16Path::selected(), w, n, k)
    }

    /// [`PackedBf16::for_nt`] for an explicit path (the best available one if the CPU lacks
    /// it).
    pub fn for_nt_with(path: Bf16Path, w: &[f32], n: usize, k: usize) -> Self {
        let mut p = Self::default();
        p.repack(path, Source::F32(w), false, n, k);
        p
    }

    /// [`PackedBf16::for_nn`] for an explicit path (the best available one if the CPU lacks
    /// it).
    pub fn for_nn_with(path: Bf16Path, w: &[f32], n: usize, k: usize) -> Self {
        let mut p = Self::default();
        p.repack(path, Source::F32(w), true, n, k);
        p
    }

    /// [`PackedBf16::for_nn`] (on `self`'s path) for the weight `w` that `self` was packed
    /// from by [`PackedBf16::for_nt`]: on the emulated path the two packs share one copy of the bf16
    /// bits (the layout is the same for both products there).
    pub fn for_nn_of(&self, w: &[f32], n: usize, k: usize) -> Self {
        if self.path != Bf16Path::Emulated || self.nn || (self.n, self.k) != (n, k) {
            return Self::for_nn_with(self.path, w, n, k);
        }
        Self {
            path: self.path,
            nn: true,
            n,
            k,
            pn: k,
            pk: n,
            npad: k,
            buf: Vec::new(),
            off: 0,
            bits: self.bits.clone(),
        }
    }

    /// [`PackedBf16::for_nt`] from bf16 bit patterns (e.g. a bf16 checkpoint), no rounding.
    pub fn for_nt_bits(w: &[u16], n: usize, k: usize) -> Self {
        let mut p = Self::default();
        p.repack(Bf16Path::selected(), Source::Bits(w), false, n, k);
        p
    }

    /// [`PackedBf16::for_nn`] from bf16 bit patterns (e.g. a bf16 checkpoint), no rounding.
    pub fn for_nn_bits(w: &[u16], n: usize, k: usize) -> Self {
        let mut p = Self::default();
        p.repack(Bf16Path::selected(), Source::Bits(w), true, n, k);
        p
    }

    /// Decode and pack a 4-bit weight into this buffer (reusing its memory) for
    /// [`matmul_nn_bf16`] (`nn`) or [`matmul_nt_bf16`], selected path: QLoRA's bf16 compute
    /// decodes each frozen 4-bit weight this way once per product, as bitsandbytes
    /// dequantizes to the compute dtype before its matmul.
    pub fn repack_q4(&mut self, w: &super::Q4Weight, nn: bool) {
        self.repack(Bf16Path::selected(), Source::Q4(*w), nn, w.n, w.k);
    }

    /// Pack another f32 weight into this buffer (reusing its memory), same layout as before
    /// (`nn` selects [`PackedBf16::for_nn`]'s layout), selected path.
    pub fn repack_f32(&mut self, w: &[f32], n: usize, k: usize, nn: bool) {
        self.repack(Bf16Path::selected(), Source::F32(w), nn, n, k);
    }

    fn repack(&mut self, path: Bf16Path, w: Source, nn: bool, n: usize, k: usize) {
        assert!(w.len() >= n * k, "PackedBf16: weight size");
        let path = path.or_available();
        if let (Source::Q4(q), true) = (w, nn && path != Bf16Path::Emulated) {
            #[cfg(target_arch = "x86_64")]
            if nr_of(path).is_multiple_of(16) && avx512bw() {
                return self.repack_nn_q4_by_pairs(path, &q);
            }
            // The nn panels read the weight in runs of one panel's width (16–32 elements) per
            // row pair, too short for the 4-bit decoder: decoding the whole weight to bf16 in
            // long runs first and packing from those bits made QLoRA's input-gradient pack
            // several times cheaper.
            let bits = decode_q4_bits(&q, n * k);
            return self.repack(path, Source::Bits(&bits), nn, n, k);
        }
        let (pn, pk) = if nn { (k, n) } else { (n, k) };
        if path == Bf16Path::Emulated {
            (self.path, self.nn, self.n, self.k) = (path, nn, n, k);
            (self.pn, self.pk, self.npad) = (pn, pk, pn);
            self.buf = Vec::new();
            let bits = std::sync::Arc::make_mut(&mut self.bits);
            bits.clear();
            bits.resize(n * k, 0);
            let mut wide = [0u32; RUN];
            for (i, chunk) in bits.chunks_mut(RUN).enumerate() {
                let wide = &mut wide[..chunk.len()];
                w.fetch(i * RUN, wide);
                chunk
                    .iter_mut()
                    .zip(wide.iter())
                    .for_each(|(b, &x)| *b = x as u16);
            }
            return;
        }
        let shape = self.zeroed_panels(path, nn, n, k);
        let (nr, npad) = (shape.nr, shape.npad);
        for (p0, bk, block) in self.k_blocks(&shape) {
            let bkp = block.len() / npad;
            let panel = |(q, out): (usize, &mut [u32])| {
                pack_b_panel(w, nn, n, k, pn, pk, p0, bk, q * nr, nr, out)
            };
            if shape.parallel {
                block.par_chunks_mut(bkp * nr).enumerate().for_each(panel);
            } else {
                block.chunks_mut(bkp * nr).enumerate().for_each(panel);
            }
        }
    }

    /// Size this pack's buffer for a weight `[n, k]` in the `nn` or nt panel layout of `path`,
    /// all zeros, and record the shape.
    fn zeroed_panels(&mut self, path: Bf16Path, nn: bool, n: usize, k: usize) -> PanelShape {
        let (pn, pk) = if nn { (k, n) } else { (n, k) };
        let nr = nr_of(path);
        let npad = pn.div_ceil(nr) * nr;
        let kp = pk.div_ceil(2);
        let len = packed_words(kp, npad);
        self.bits = Default::default();
        self.buf.clear();
        self.buf.resize(len + 16, 0);
        self.off = self.buf.as_ptr().align_offset(64).min(15);
        (self.path, self.nn, self.n, self.k) = (path, nn, n, k);
        (self.pn, self.pk, self.npad) = (pn, pk, npad);
        let parallel = !SERIAL.with(|s| s.get()) && n * k >= 1 << 15;
        PanelShape {
            nr,
            npad,
            kp,
            len,
            parallel,
        }
    }

    /// The buffer's k blocks after [`PackedBf16::zeroed_panels`]: (first pair, pairs, words).
    fn k_blocks(&mut self, s: &PanelShape) -> impl Iterator<Item = (usize, usize, &mut [u32])> {
        let (kp, kcp) = (s.kp, k_block(s.kp));
        self.buf[self.off..self.off + s.len]
            .chunks_mut((kcp * s.npad).max(1))
            .enumerate()
            .map(move |(bi, block)| (bi * kcp, kcp.min(kp - bi * kcp), block))
    }

    /// The nn layout of a 4-bit weight, pair row by pair row: decode weight rows 2p and 2p+1
    /// whole (long runs for the decoder) and write their bf16 pairs into every panel (16
    /// lanes a store). Panel by panel instead, each panel re-read a column strip of the whole
    /// decoded weight: on Zen 5 that pack cost a sixth of QLoRA's input-gradient time, and
    /// this one under a tenth.
    #[cfg(target_arch = "x86_64")]
    fn repack_nn_q4_by_pairs(&mut self, path: Bf16Path, q: &super::Q4Weight) {
        let (n, k) = (q.n, q.k);
        let pk = n;
        let shape = self.zeroed_panels(path, true, n, k);
        let (nr, npad) = (shape.nr, shape.npad);
        for (p0, bk, block) in self.k_blocks(&shape) {
            let panel = block.len() / npad * nr;
            let out = SendPtr(block.as_mut_ptr());
            let pairs = |range: std::ops::Range<usize>| {
                let mut rows = PANEL_ROWS.take();
                rows.resize(2 * k, 0.0);
                for p in range {
                    let kk = 2 * (p0 + p);
                    let (lo, hi) = rows.split_at_mut(k);
                    super::decode_q4(q, kk * k, lo);
                    let hi: &[f32] = if kk + 1 < pk {
                        super::decode_q4(q, (kk + 1) * k, hi);
                        hi
                    } else {
                        &[]
                    };
                    // SAFETY: AVX512F/BW are available; pair p < bk of every panel of this
                    // block lies inside it (panel = its words per panel), and tasks own
                    // disjoint pairs; nr is a multiple of 16 dividing npad.
                    unsafe {
                        avx512::pair_row_into_panels(lo, hi, npad, nr, out.get().add(p * nr), panel)
                    };
                }
                PANEL_ROWS.set(rows);
            };
            const PAIRS_PER_TASK: usize = 8;
            if shape.parallel {
                (0..bk.div_ceil(PAIRS_PER_TASK))
                    .into_par_iter()
                    .for_each(|t| pairs(t * PAIRS_PER_TASK..((t + 1) * PAIRS_PER_TASK).min(bk)));
            } else {
                pairs(0..bk);
            }
        }
    }

    /// Rows of the weight (a linear layer's output features).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Columns of the weight (a linear layer's input features).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Whether this is packed for [`matmul_nn_bf16`] (else for [`matmul_nt_bf16`]).
    pub fn is_nn(&self) -> bool {
        self.nn
    }

    /// The path the weight was packed for.
    pub fn path(&self) -> Bf16Path {
        self.path
    }

    /// Bytes of packed data (≈ half the f32 weight, plus panel padding).
    pub fn bytes(&self) -> usize {
        if self.path == Bf16Path::Emulated {
            return self.bits.len() * 2;
        }
        packed_words(self.pk.div_ceil(2), self.npad) * 4
    }

    fn data(&self) -> *const u32 {
        self.buf[self.off..].as_ptr()
    }
}

/// A weight given as f32 (rounded while packing), as bf16 bits, or 4-bit (decoded while
/// packing, so no full-precision copy of it exists).
#[derive(Clone, Copy)]
enum Source<'a> {
    F32(&'a [f32]),
    Bits(&'a [u16]),
    Q4(super::Q4Weight<'a>),
}

/// Longest run [`Source::fetch`] is asked for: one k block of pairs.
const RUN: usize = 2 * KCP;

impl Source<'_> {
    fn len(&self) -> usize {
        match self {
            Source::F32(w) => w.len(),
            Source::Bits(w) => w.len(),
            Source::Q4(q) => q.n * q.k,
        }
    }

    /// bf16 bits of elements `start..start + out.len()` (at most [`RUN`]) of the flattened
    /// weight, widened to u32.
    #[inline]
    fn fetch(&self, start: usize, out: &mut [u32]) {
        let end = start + out.len();
        match self {
            Source::F32(w) => round_to_bf16_bits(&w[start..end], out),
            Source::Bits(w) => {
                for (o, &x) in out.iter_mut().zip(&w[start..end]) {
                    *o = x as u32;
                }
            }
            Source::Q4(q) => {
                let mut buf = [0f32; RUN];
                let buf = &mut buf[..out.len()];
                super::decode_q4(q, start, buf);
                round_to_bf16_bits(buf, out);
            }
        }
    }
}

/// `out[i] = f32_to_bf16_bits(x[i])` widened to u32, 16 at a time where AVX-512 is there (the
/// scalar loop, with its NaN branch, did not vectorize).
fn round_to_bf16_bits(x: &[f32], out: &mut [u32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if avx512f() {
        done = x.len() / 16 * 16;
        // SAFETY: AVX-512F is available; both slices hold at least `done` elements.
        unsafe { round_to_bf16_bits_avx512(&x[..done], &mut out[..done]) };
    }
    for (o, &v) in out[done..].iter_mut().zip(&x[done..]) {
        *o = f32_to_bf16_bits(v) as u32;
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512f() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f"))
}

/// # Safety
/// AVX-512F; `out` is at least as long as `x`, whose length is a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_to_bf16_bits_avx512(x: &[f32], out: &mut [u32]) {
    use std::arch::x86_64::*;
    for (o, v) in out.chunks_exact_mut(16).zip(x.chunks_exact(16)) {
        // SAFETY: each chunk holds 16 elements.
        unsafe {
            let r = avx512::round_bf16_lanes(_mm512_loadu_ps(v.as_ptr()));
            _mm512_storeu_si512(o.as_mut_ptr() as *mut __m512i, r);
        }
    }
}

/// The first `len` elements of a 4-bit weight as bf16 bits, decoded in long runs (in
/// parallel for a large weight).
fn decode_q4_bits(q: &super::Q4Weight, len: usize) -> Vec<u16> {
    let mut bits = vec![0u16; len];
    let source = Source::Q4(*q);
    let convert = |(i, chunk): (usize, &mut [u16])| {
        let mut wide = [0u32; RUN];
        for (j, part) in chunk.chunks_mut(RUN).enumerate() {
            let wide = &mut wide[..part.len()];
            source.fetch(i * DECODE_CHUNK + j * RUN, wide);
            part.iter_mut()
                .zip(wide.iter())
                .for_each(|(b, &x)| *b = x as u16);
        }
    };
    if !SERIAL.with(|s| s.get()) && len >= 1 << 15 {
        bits.par_chunks_mut(DECODE_CHUNK)
            .enumerate()
            .for_each(convert);
    } else {
        bits.chunks_mut(DECODE_CHUNK).enumerate().for_each(convert);
    }
    bits
}

/// Elements per parallel task of [`decode_q4_bits`] (a multiple of [`RUN`] and of 32, so every
/// run starts where the vector decoder can take it).
const DECODE_CHUNK: usize = 16 * RUN;

/// The panel layout [`PackedBf16::zeroed_panels`] prepared: panel width, padded panel
/// dimension, pairs, words, and whether to fill it on all threads.
struct PanelShape {
    nr: usize,
    npad: usize,
    kp: usize,
    len: usize,
    parallel: bool,
}

thread_local! {
    /// The decoded 4-bit rows of one weight panel ([`pack_b_panel`]), reused between panels.
    static PANEL_ROWS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
fn avx512bw() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"))
}

/// Pack one weight panel: product columns `j0..j0+nr`, pairs `p0..p0+bk`, into
/// `out[p*nr + lane]` (zeros in the rest of `out`). For the nt layout the product's B(kk, j) =
/// W[j, kk]; for nn, W[kk, j]. Reads the weight in contiguous runs of a row (what the 4-bit
/// decoder wants).
#[allow(clippy::too_many_arguments)]
fn pack_b_panel(
    w: Source,
    nn: bool,
    n: usize,
    k: usize,
    pn: usize,
    pk: usize,
    p0: usize,
    bk: usize,
    j0: usize,
    nr: usize,
    out: &mut [u32],
) {
    out.fill(0);
    let cols = nr.min(pn - j0);
    #[cfg(target_arch = "x86_64")]
    if !nn && nr.is_multiple_of(16) && avx512bw() {
        let kk0 = 2 * p0;
        let len = (2 * bk).min(pk - kk0);
        // SAFETY: AVX512F/BW are available; the rows lie inside the weight (j0 + cols ≤ n,
        // kk0 + len ≤ k), `out` holds bk*nr words and nr is a multiple of 16.
        let mut pack = |rows: *const f32, ld: usize| unsafe {
            avx512::pack_b_rows(rows, ld, cols, len, bk, out.as_mut_ptr(), nr)
        };
        match w {
            Source::F32(w) => return pack(w[j0 * k + kk0..].as_ptr(), k),
            Source::Q4(q) => {
                // Decode the panel's rows first (one k block of `cols` rows, in L2).
                let mut rows = PANEL_ROWS.take();
                rows.resize(cols * len, 0.0);
                for (l, row) in rows.chunks_mut(len).enumerate() {
                    super::decode_q4(&q, (j0 + l) * k + kk0, row);
                }
                pack(rows.as_ptr(), len);
                PANEL_ROWS.set(rows);
                return;
            }
            Source::Bits(_) => {}
        }
    }

    let mut run = [0u32; RUN];
    if !nn {
        // W row j0+l holds B(·, j0+l) contiguously.
        let _ = n;
        let kk0 = 2 * p0;
        let len = (2 * bk).min(pk - kk0);
        for l in 0..cols {
            let r = &mut run[..len];
            w.fetch((j0 + l) * k + kk0, r);
            for p in 0..bk {
                let lo = r[2 * p];
                let hi = r.get(2 * p + 1).copied().unwrap_or(0);
                out[p * nr + l] = lo | (hi << 16);
            }
        }
    } else {
        // W row kk holds B(kk, ·) contiguously.
        let (lo, hi) = run.split_at_mut(RUN / 2);
        let (lo, hi) = (&mut lo[..cols], &mut hi[..cols]);
        for p in 0..bk {
            let kk = 2 * (p0 + p);
            let dst = &mut out[p * nr..p * nr + cols];
            w.fetch(kk * k + j0, lo);
            if kk + 1 < pk {
                w.fetch((kk + 1) * k + j0, hi);
                for ((d, &a), &b) in dst.iter_mut().zip(lo.iter()).zip(hi.iter()) {
                    *d = a | (b << 16);
                }
            } else {
                dst.copy_from_slice(lo);
            }
        }
    }
}

fn nr_of(path: Bf16Path) -> usize {
    match path {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        Bf16Path::Amx => <amx::Amx as Kernel>::NR,
        #[cfg(target_arch = "x86_64")]
        Bf16Path::Avx512Bf16 => <avx512::Avx512Bf16 as Kernel>::NR,
        _ => <Portable as Kernel>::NR,
    }
}

/// C[m×n] (+)= A[m×k] · Wᵀ in bf16 with f32 accumulation, W `[n, k]` packed by
/// [`PackedBf16::for_nt`] (a linear layer's forward pass). A is rounded to bf16 on the fly;
/// `acc` adds into C instead of overwriting it.
pub fn matmul_nt_bf16(a: &[f32], w: &PackedBf16, c: &mut [f32], m: usize, acc: bool) {
    assert!(
        !w.nn,
        "matmul_nt_bf16 needs a weight packed with PackedBf16::for_nt"
    );
    product(a, w, c, m, acc);
}

/// C[m×k] (+)= DY[m×n] · W in bf16 with f32 accumulation, W `[n, k]` packed by
/// [`PackedBf16::for_nn`] (the input gradient of a linear layer: DY is the output gradient).
/// DY is rounded to bf16 on the fly; `acc` adds into C instead of overwriting it.
pub fn matmul_nn_bf16(dy: &[f32], w: &PackedBf16, c: &mut [f32], m: usize, acc: bool) {
    assert!(
        w.nn,
        "matmul_nn_bf16 needs a weight packed with PackedBf16::for_nn"
    );
    product(dy, w, c, m, acc);
}

thread_local! {
    /// The decoded 4-bit weight of the last product (its memory reused: one layer's worth).
    /// Taken out while in use, so a product nested through rayon's work stealing on this
    /// thread simply starts from an empty one.
    static SCRATCH_Q4: Cell<PackedBf16> = Cell::new(PackedBf16::default());
}

fn with_q4_scratch(w: &super::Q4Weight, nn: bool, f: impl FnOnce(&PackedBf16)) {
    let mut p = SCRATCH_Q4.take();
    p.repack_q4(w, nn);
    f(&p);
    SCRATCH_Q4.set(p);
}

/// C[m×n] (+)= A[m×k] · Wᵀ in bf16 for a 4-bit W `[n, k]` (QLoRA's forward with bf16
/// compute): W is decoded and packed into a per-thread scratch pack, then multiplied as by
/// [`matmul_nt_bf16`].
pub fn matmul_nt_q4_bf16(a: &[f32], w: &super::Q4Weight, c: &mut [f32], m: usize, acc: bool) {
    with_q4_scratch(w, false, |p| product(a, p, c, m, acc))
}

/// C[m×k] (+)= DY[m×n] · W in bf16 for a 4-bit W `[n, k]` (QLoRA's input gradient with bf16
/// compute), through the same scratch pack as [`matmul_nt_q4_bf16`].
pub fn matmul_nn_q4_bf16(dy: &[f32], w: &super::Q4Weight, c: &mut [f32], m: usize, acc: bool) {
    with_q4_scratch(w, true, |p| product(dy, p, c, m, acc))
}

fn product(a: &[f32], w: &PackedBf16, c: &mut [f32], m: usize, acc: bool) {
    let (n, k) = (w.pn, w.pk);
    assert!(
        a.len() >= m * k && c.len() >= m * n,
        "bf16 matmul operand sizes"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let threads = if m * n * k < PARALLEL_MIN || SERIAL.with(|s| s.get()) {
        1
    } else {
        rayon::current_num_threads()
    };
    if w.path == Bf16Path::Emulated {
        let (n, k) = (w.n, w.k);
        return super::bf16_emulated::product(a, &w.bits, w.nn, n, k, c, m, acc);
    }
    // SAFETY: A covers m×k and C m×n (asserted); the weight was packed for this path, n and
    // k, and the path's instruction set was checked when packing.
    unsafe {
        match w.path {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Bf16Path::Amx => {
                driver::<amx::Amx>(m, n, k, a.as_ptr(), w, c.as_mut_ptr(), acc, threads)
            }
            #[cfg(target_arch = "x86_64")]
            Bf16Path::Avx512Bf16 => {
                driver::<avx512::Avx512Bf16>(m, n, k, a.as_ptr(), w, c.as_mut_ptr(), acc, threads)
            }
            _ => driver::<Portable>(m, n, k, a.as_ptr(), w, c.as_mut_ptr(), acc, threads),
        }
    }
}

thread_local! {
    static SCRATCH_A: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

/// Packed weight blocks larger than this do not stay in cache between row chunks.
const BIG_B_BYTES: usize = 4 << 20;

/// Packed activation bytes a task may keep (in L2) when the weight block is big.
const A_CHUNK_BYTES: usize = 768 << 10;

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

/// C[m×n] (+)= A[m×k] · B with A row-major f32 and B the packed weight.
///
/// # Safety
/// `a` covers m×k floats, `c` m×n floats not overlapping `a`; `w` was packed for `K` with
/// product dimensions n and k; the CPU supports `K`'s instruction set.
#[allow(clippy::too_many_arguments)]
unsafe fn driver<K: Kernel>(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    w: &PackedBf16,
    c: *mut f32,
    acc: bool,
    threads: usize,
) {
    let (mr, nr) = (K::MR, K::NR);
    let kp = k.div_ceil(2);
    let kcp = k_block(kp);
    let npad = w.npad;
    let m_panels = m.div_ceil(mr);
    let n_panels = n.div_ceil(nr);
    // Each row chunk streams the whole weight block once: for big weights (the LM head) take
    // fewer, taller chunks, as tall as fit in L2 alongside the streamed panels.
    let bkp0 = padded(kcp.min(kp));
    let mc = if npad * bkp0 * 4 > BIG_B_BYTES {
        K::MC.max(A_CHUNK_BYTES / (bkp0 * 4))
    } else {
        K::MC
    };
    let m_chunks = chunks(m_panels, (mc / mr).max(1), threads);
    let n_chunks = if m_chunks >= threads {
        1
    } else {
        threads.min(n_panels)
    };
    let tasks = m_chunks * n_chunks;
    let ap = SendPtr(a as *mut f32);
    let bp = SendPtr(w.data() as *mut u32);
    let cp = SendPtr(c);

    for p0 in (0..kp).step_by(kcp) {
        let bk = kcp.min(kp - p0);
        let bkp = padded(bk);
        let e0 = 2 * p0;
        let klen = (2 * bk).min(k - e0);
        let overwrite = p0 == 0 && !acc;
        let task = |t: usize| {
            let (mi, ni) = (t / n_chunks, t % n_chunks);
            let (mp0, mp1) = chunk_range(m_panels, m_chunks, mi);
            let (np0, np1) = chunk_range(n_panels, n_chunks, ni);
            if mp0 == mp1 || np0 == np1 {
                return;
            }
            let need = (mp1 - mp0) * mr * bkp + 16;
            let mut abuf = SCRATCH_A.with(|s| s.take());
            if abuf.len() < need {
                abuf = vec![0; need];
            }
            let off = abuf.as_ptr().align_offset(64).min(15);
            let abase = abuf[off..].as_mut_ptr();
            for p in mp0..mp1 {
                let i0 = p * mr;
                // SAFETY: rows i0.. of A from element e0 (inside A); the scratch buffer holds
                // (mp1-mp0)*mr*bkp words past `off`.
                unsafe {
                    K::pack_a(
                        ap.get().add(i0 * k + e0),
                        k,
                        mr.min(m - i0),
                        klen,
                        bk,
                        abase.add((p - mp0) * mr * bkp),
                    )
                };
            }
            // SAFETY: the path's instruction set is available (checked when packing).
            unsafe { K::begin() };
            for q in np0..np1 {
                let j0 = q * nr;
                // SAFETY: panel q of the k block starting at pair p0 (PackedBf16 layout).
                let bq = unsafe { bp.get().add(p0 * npad + q * bkp * nr) };
                for p in mp0..mp1 {
                    let i0 = p * mr;
                    // SAFETY: packed panels hold bkp*MR / bkp*NR words; the C tile at (i0, j0)
                    // lies inside C and belongs to this task alone.
                    unsafe {
                        K::micro(
                            bk,
                            abase.add((p - mp0) * mr * bkp),
                            bq,
                            cp.get().add(i0 * n + j0),
                            n,
                            mr.min(m - i0),
                            nr.min(n - j0),
                            overwrite,
                        )
                    };
                }
            }
            // SAFETY: pairs with `begin` above, on the same thread.
            unsafe { K::end() };
            SCRATCH_A.with(|s| s.set(abuf));
        };
        if threads > 1 && tasks > 1 {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    }
}

/// Portable kernel: 4×16 tile, same operation order as `vdpbf16ps` (per pair: the odd
/// product, then the even one, each added to the f32 accumulator; bf16 products are exact
/// in f32, so mul + add equals the instruction's fused multiply-add).
struct Portable;

const PMR: usize = 4;
const PNR: usize = 16;

impl Kernel for Portable {
    const MR: usize = PMR;
    const NR: usize = PNR;
    const MC: usize = 128;

    unsafe fn pack_a(
        a: *const f32,
        lda: usize,
        rows: usize,
        klen: usize,
        kp: usize,
        dst: *mut u32,
    ) {
        // SAFETY: caller contract (extents).
        unsafe {
            for p in 0..kp {
                for r in 0..PMR {
                    let (e, row) = (2 * p, a.wrapping_add(r * lda));
                    let lo = if r < rows && e < klen {
                        f32_to_bf16_bits(*row.add(e)) as u32
                    } else {
                        0
                    };
                    let hi = if r < rows && e + 1 < klen {
                        f32_to_bf16_bits(*row.add(e + 1)) as u32
                    } else {
                        0
                    };
                    *dst.add(p * PMR + r) = lo | (hi << 16);
                }
            }
        }
    }

    unsafe fn micro(
        kp: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        c_rs: usize,
        mr: usize,
        nr: usize,
        overwrite: bool,
    ) {
        // SAFETY: forwarded contract; each variant runs only where its features exist.
        unsafe {
            match portable_isa() {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => micro_avx512f(kp, a, b, c, c_rs, mr, nr, overwrite),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => micro_avx2(kp, a, b, c, c_rs, mr, nr, overwrite),
                _ => micro_portable(kp, a, b, c, c_rs, mr, nr, overwrite),
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Base,
}

fn portable_isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Base
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_avx512f(
    kp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    c_rs: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
) {
    // SAFETY: forwarded contract.
    unsafe { micro_body(kp, a, b, c, c_rs, mr, nr, overwrite) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_avx2(
    kp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    c_rs: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
) {
    // SAFETY: forwarded contract.
    unsafe { micro_body(kp, a, b, c, c_rs, mr, nr, overwrite) }
}

#[allow(clippy::too_many_arguments)]
unsafe fn micro_portable(
    kp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    c_rs: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
) {
    // SAFETY: forwarded contract.
    unsafe { micro_body(kp, a, b, c, c_rs, mr, nr, overwrite) }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_body(
    kp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    c_rs: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
) {
    // SAFETY: the packed panels hold kp*PMR and kp*PNR words (kernel contract).
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(a, kp * PMR),
            std::slice::from_raw_parts(b, kp * PNR),
        )
    };
    let mut acc = [[0.0f32; PNR]; PMR];
    for (ak, bk) in a.chunks_exact(PMR).zip(b.chunks_exact(PNR)) {
        let mut bo = [0.0f32; PNR];
        let mut be = [0.0f32; PNR];
        for j in 0..PNR {
            bo[j] = f32::from_bits(bk[j] & 0xffff_0000);
            be[j] = f32::from_bits(bk[j] << 16);
        }
        for (row, &av) in acc.iter_mut().zip(ak) {
            let ao = f32::from_bits(av & 0xffff_0000);
            let ae = f32::from_bits(av << 16);
            for j in 0..PNR {
                row[j] += ao * bo[j];
                row[j] += ae * be[j];
            }
        }
    }
    for (r, row) in acc.iter().enumerate().take(mr) {
        for (j, &v) in row.iter().enumerate().take(nr) {
            // SAFETY: (r, j) is inside the mr×nr tile.
            unsafe {
                let p = c.add(r * c_rs + j);
                *p = if overwrite { v } else { *p + v };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATHS: [Bf16Path; 4] = [
        Bf16Path::Fallback,
        Bf16Path::Emulated,
        Bf16Path::Avx512Bf16,
        Bf16Path::Amx,
    ];

    fn paths() -> impl Iterator<Item = Bf16Path> {
        PATHS.into_iter().filter(|p| {
            let ok = p.available();
            if !ok {
                eprintln!("skipping {p:?}: not supported by this CPU");
            }
            ok
        })
    }

    /// The vector rounding equals the scalar one on every kind of value (ties both ways,
    /// overflow to infinity, NaNs, subnormals) and on a tail that is not a multiple of 16.
    #[test]
    fn slice_rounding_matches_the_scalar_rounding() {
        let mut rng = crate::rng::Rng::new(7);
        let mut x: Vec<f32> = [
            0.0,
            -0.0,
            1.0,
            f32::from_bits(0x3f80_8000), // tie, lower kept bit even: rounds down
            f32::from_bits(0x3f81_8000), // tie, lower kept bit odd: rounds up
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0xff80_0001), // signalling NaN
            f32::from_bits(0x0000_0001), // smallest subnormal
            f32::MIN_POSITIVE,
        ]
        .to_vec();
        x.extend(data(&mut rng, 45));
        let mut got = vec![0u32; x.len()];
        round_to_bf16_bits(&x, &mut got);
        for (i, (&v, &g)) in x.iter().zip(&got).enumerate() {
            assert_eq!(g, f32_to_bf16_bits(v) as u32, "element {i} ({v:e})");
        }
    }

    /// The AVX-512 panel packer writes exactly the pairs of the scalar formula, on odd shapes
    /// (rows not a multiple of 16, an odd k) and special values.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_panel_packing_matches_the_scalar_formula() {
        if !avx512bw() {
            eprintln!("skipping: no AVX-512 BW");
            return;
        }
        let mut rng = crate::rng::Rng::new(11);
        for &(rows, k, nr) in &[(32, 77, 32), (13, 64, 16), (20, 33, 32), (1, 5, 16)] {
            let mut w = data(&mut rng, rows * k);
            w[0] = f32::NAN;
            w[k / 2] = f32::from_bits(1); // subnormal
            w[rows * k - 1] = f32::from_bits(0x3f81_8000); // a tie
            let kp = k.div_ceil(2);
            let mut got = vec![0u32; kp * nr];
            // SAFETY: AVX512F/BW checked; w covers rows × k, got holds kp*nr words.
            unsafe { avx512::pack_b_rows(w.as_ptr(), k, rows, k, kp, got.as_mut_ptr(), nr) };
            for p in 0..kp {
                for l in 0..nr {
                    let want = if l < rows {
                        let lo = f32_to_bf16_bits(w[l * k + 2 * p]) as u32;
                        let hi = if 2 * p + 1 < k {
                            f32_to_bf16_bits(w[l * k + 2 * p + 1]) as u32
                        } else {
                            0
                        };
                        lo | hi << 16
                    } else {
                        0
                    };
                    assert_eq!(
                        got[p * nr + l],
                        want,
                        "{rows}x{k} nr {nr}: pair {p} lane {l}"
                    );
                }
            }
        }
    }

    /// Random values with a spread of magnitudes (so rounding matters), rounded or not.
    fn data(rng: &mut crate::rng::Rng, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| rng.normal() * (1.0 + 3.0 * rng.uniform()))
            .collect()
    }

    /// Naive products on bf16-rounded inputs, accumulated in f64: (C, Σ|a||b|) for
    /// C[m×n] = A[m×k] · B where B(kk, j) = b[kk*bs0 + j*bs1].
    #[allow(clippy::too_many_arguments)]
    fn reference(
        a: &[f32],
        b: &[f32],
        m: usize,
        n: usize,
        k: usize,
        bs0: usize,
        bs1: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let ar: Vec<f64> = a.iter().map(|&x| round_bf16(x) as f64).collect();
        let br: Vec<f64> = b.iter().map(|&x| round_bf16(x) as f64).collect();
        let mut c = vec![0.0; m * n];
        let mut s = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let (mut t, mut u) = (0.0, 0.0);
                for kk in 0..k {
                    let p = ar[i * k + kk] * br[kk * bs0 + j * bs1];
                    t += p;
                    u += p.abs();
                }
                c[i * n + j] = t;
                s[i * n + j] = u;
            }
        }
        (c, s)
    }

    /// |got − want| ≤ 1e-5 · (Σ|a||b| + |c0|) elementwise (f32 accumulation order only).
    fn check(got: &[f32], want: &[f64], scale: &[f64], c0: Option<&[f32]>, ctx: &str) {
        assert_eq!(got.len(), want.len());
        for i in 0..got.len() {
            let base = c0.map_or(0.0, |c| c[i] as f64);
            let w = want[i] + base;
            let tol = 1e-5 * (scale[i] + base.abs()) + 1e-30;
            assert!(
                (got[i] as f64 - w).abs() <= tol,
                "{ctx}: element {i}: {} vs {w} (tol {tol})",
                got[i]
            );
        }
    }

    /// Both layouts, every available path, acc off and on, against the reference; the fallback
    /// and the AVX512-BF16 path must agree bit for bit.
    fn run_shape(rng: &mut crate::rng::Rng, m: usize, n: usize, k: usize) {
        let w = data(rng, n * k);
        // Forward: A[m×k] · Wᵀ, B(kk, j) = w[j*k + kk].
        let x = data(rng, m * k);
        let (want_nt, scale_nt) = reference(&x, &w, m, n, k, 1, k);
        // Input gradient: DY[m×n] · W, B(kk, j) = w[kk*k + j].
        let dy = data(rng, m * n);
        let (want_nn, scale_nn) = reference(&dy, &w, m, k, n, k, 1);
        let c0_nt = data(rng, m * n);
        let c0_nn = data(rng, m * k);
        let mut first: Option<[Vec<f32>; 4]> = None;
        for path in paths() {
            let pt = PackedBf16::for_nt_with(path, &w, n, k);
            let pn = PackedBf16::for_nn_with(path, &w, n, k);
            assert_eq!((pt.n(), pt.k(), pt.is_nn(), pt.path()), (n, k, false, path));
            assert_eq!((pn.n(), pn.k(), pn.is_nn()), (n, k, true));
            let ctx = format!("{path:?} m{m} n{n} k{k}");
            let mut y = vec![f32::NAN; m * n];
            matmul_nt_bf16(&x, &pt, &mut y, m, false);
            check(&y, &want_nt, &scale_nt, None, &format!("nt {ctx}"));
            let mut ya = c0_nt.clone();
            matmul_nt_bf16(&x, &pt, &mut ya, m, true);
            check(
                &ya,
                &want_nt,
                &scale_nt,
                Some(&c0_nt),
                &format!("nt acc {ctx}"),
            );
            let mut dx = vec![f32::NAN; m * k];
            matmul_nn_bf16(&dy, &pn, &mut dx, m, false);
            check(&dx, &want_nn, &scale_nn, None, &format!("nn {ctx}"));
            let mut dxa = c0_nn.clone();
            matmul_nn_bf16(&dy, &pn, &mut dxa, m, true);
            check(
                &dxa,
                &want_nn,
                &scale_nn,
                Some(&c0_nn),
                &format!("nn acc {ctx}"),
            );
            // Single-threaded runs give the same bits.
            let mut ys = vec![f32::NAN; m * n];
            crate::kernels::gemm::serial(|| matmul_nt_bf16(&x, &pt, &mut ys, m, false));
            assert!(bits_eq(&ys, &y), "serial differs: {ctx}");
            // The AVX512-BF16 kernel performs the fallback's operations in the same order
            // (AMX and the f32 emulation add in their own orders).
            if matches!(path, Bf16Path::Amx | Bf16Path::Emulated) {
                continue;
            }
            let got = [y, ya, dx, dxa];
            match &first {
                None => first = Some(got),
                Some(f) => {
                    for (g, h) in got.iter().zip(f) {
                        assert!(bits_eq(g, h), "paths differ: {ctx}");
                    }
                }
            }
        }
    }

    fn bits_eq(x: &[f32], y: &[f32]) -> bool {
        x.len() == y.len() && x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits())
    }

    #[test]
    fn odd_shapes_both_paths_match_reference() {
        let mut rng = crate::rng::Rng::new(3);
        let sizes = [1, 3, 17, 33, 65, 127];
        for &m in &sizes {
            for &n in &sizes {
                for &k in &sizes {
                    run_shape(&mut rng, m, n, k);
                }
            }
        }
    }

    #[test]
    fn large_and_skinny_shapes_both_paths_match_reference() {
        let mut rng = crate::rng::Rng::new(17);
        for &(m, n, k) in &[
            // several k blocks (k odd), both threads, several row chunks
            (300, 130, 1601),
            (200, 301, 770),
            // tall-skinny and short-wide
            (2000, 3, 65),
            (3, 2100, 70),
            (1, 700, 576),
            (1, 33, 1),
            (129, 1, 1537),
            (64, 64, 64),
            (13, 96, 2),
            // empty products
            (0, 5, 7),
            (4, 0, 7),
            (4, 6, 0),
        ] {
            run_shape(&mut rng, m, n, k);
        }
    }

    #[test]
    fn rounding_is_round_to_nearest_even() {
        let one = 1.0f32.to_bits();
        // Exactly halfway between 1 and the next bf16: ties to even (down to 1).
        assert_eq!(round_bf16(f32::from_bits(one | 0x8000)), 1.0);
        // Halfway above an odd bf16: ties to even (up).
        let odd = f32::from_bits(one | 0x0001_0000);
        let up = f32::from_bits(one + 0x0002_0000);
        assert_eq!(round_bf16(f32::from_bits(odd.to_bits() | 0x8000)), up);
        // Just above halfway rounds up, just below rounds down.
        assert_eq!(
            round_bf16(f32::from_bits(one | 0x8001)),
            f32::from_bits(one + 0x0001_0000)
        );
        assert_eq!(round_bf16(f32::from_bits(one | 0x7fff)), 1.0);
        assert_eq!(round_bf16(-2.5), -2.5);
        assert_eq!(round_bf16(0.0).to_bits(), 0);
        assert_eq!(round_bf16(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
        assert_eq!(round_bf16(f32::NEG_INFINITY), f32::NEG_INFINITY);
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert!(round_bf16(f32::NAN).is_nan());
        // A NaN whose payload lives only in the low bits stays NaN.
        assert!(round_bf16(f32::from_bits(0x7f80_0001)).is_nan());
        assert!(round_bf16(f32::from_bits(0xff80_0001)).is_nan());
        assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits_to_f32(0x3f80), 1.0);
        let mut v = vec![1.0, f32::from_bits(one | 0x8001)];
        round_bf16_slice(&mut v);
        assert_eq!(v[1], f32::from_bits(one + 0x0001_0000));
    }

    /// x · Iᵀ returns exactly round_bf16(x): the on-the-fly activation rounding of every path
    /// is the reference rounding (ties included).
    #[test]
    fn activation_rounding_matches_round_bf16() {
        let mut rng = crate::rng::Rng::new(9);
        for &(m, k) in &[(5, 37), (14, 64), (1, 3)] {
            let mut x = data(&mut rng, m * k);
            // Sprinkle exact ties.
            for (i, v) in x.iter_mut().enumerate().step_by(3) {
                let b = (v.to_bits() & 0xffff_0000) | 0x8000 | (((i as u32) & 1) << 16);
                *v = f32::from_bits(b);
            }
            let eye: Vec<f32> = (0..k * k)
                .map(|i| if i / k == i % k { 1.0 } else { 0.0 })
                .collect();
            let want: Vec<f32> = x.iter().map(|&v| round_bf16(v)).collect();
            for path in paths() {
                let mut y = vec![0.0; m * k];
                matmul_nt_bf16(
                    &x,
                    &PackedBf16::for_nt_with(path, &eye, k, k),
                    &mut y,
                    m,
                    false,
                );
                assert!(bits_eq(&y, &want), "{path:?} nt {m}x{k}");
                matmul_nn_bf16(
                    &x,
                    &PackedBf16::for_nn_with(path, &eye, k, k),
                    &mut y,
                    m,
                    false,
                );
                assert!(bits_eq(&y, &want), "{path:?} nn {m}x{k}");
            }
        }
    }

    #[test]
    fn packed_from_bits_equals_packed_from_f32() {
        let mut rng = crate::rng::Rng::new(4);
        let (m, n, k) = (7, 40, 33);
        let w = data(&mut rng, n * k);
        let bits: Vec<u16> = w.iter().map(|&v| f32_to_bf16_bits(v)).collect();
        let x = data(&mut rng, m * k);
        let (mut y0, mut y1) = (vec![0.0; m * n], vec![0.0; m * n]);
        matmul_nt_bf16(&x, &PackedBf16::for_nt(&w, n, k), &mut y0, m, false);
        matmul_nt_bf16(&x, &PackedBf16::for_nt_bits(&bits, n, k), &mut y1, m, false);
        assert!(bits_eq(&y0, &y1));
        let dy = data(&mut rng, m * n);
        let (mut d0, mut d1) = (vec![0.0; m * k], vec![0.0; m * k]);
        matmul_nn_bf16(&dy, &PackedBf16::for_nn(&w, n, k), &mut d0, m, false);
        matmul_nn_bf16(
            &dy,
            &PackedBf16::for_nn_bits(&bits, n, k),
            &mut d1,
            m,
            false,
        );
        assert!(bits_eq(&d0, &d1));
        let mut p = PackedBf16::default();
        p.repack_f32(&w, n, k, true);
        matmul_nn_bf16(&dy, &p, &mut d1, m, false);
        assert!(bits_eq(&d0, &d1));
        // Half the f32 weight when the shape needs no padding (model layer sizes).
        let w = vec![0.5; 192 * 576];
        assert_eq!(PackedBf16::for_nt(&w, 192, 576).bytes(), 192 * 576 * 2);
        assert_eq!(PackedBf16::for_nn(&w, 192, 576).bytes(), 192 * 576 * 2);
    }

    /// `PEFTKIT_GEMM_BF16` picks the path (run the tests with it set to each of `amx`,
    /// `avx512` and `fallback` to send the default constructors through every kernel).
    #[test]
    fn selected_path_follows_env() {
        let sel = Bf16Path::selected();
        assert!(sel.available());
        let forced = std::env::var("PEFTKIT_GEMM_BF16")
            .ok()
            .and_then(|v| Bf16Path::parse(&v));
        match forced {
            Some(p) if p.available() => assert_eq!(sel, p),
            _ => assert_eq!(sel, Bf16Path::best()),
        }
        for p in PATHS {
            assert_eq!(Bf16Path::parse(p.name()), Some(p));
        }
        let w = vec![1.0; 12];
        assert_eq!(PackedBf16::for_nt(&w, 3, 4).path(), sel);
        assert_eq!(PackedBf16::for_nn(&w, 3, 4).path(), sel);
    }

    /// The input-gradient pack made from a forward pack computes what `for_nn` does, and on
    /// the emulated path shares the forward pack's bits.
    #[test]
    fn nn_pack_from_nt_pack_matches_for_nn() {
        let mut rng = crate::rng::Rng::new(8);
        let (m, n, k) = (9, 37, 70);
        let w = data(&mut rng, n * k);
        let dy = data(&mut rng, m * n);
        for path in paths() {
            let nt = PackedBf16::for_nt_with(path, &w, n, k);
            let nn = nt.for_nn_of(&w, n, k);
            assert!(nn.is_nn() && (nn.n(), nn.k()) == (n, k));
            let mut want = vec![0.0; m * k];
            matmul_nn_bf16(
                &dy,
                &PackedBf16::for_nn_with(path, &w, n, k),
                &mut want,
                m,
                false,
            );
            let mut got = vec![f32::NAN; m * k];
            matmul_nn_bf16(&dy, &nn, &mut got, m, false);
            assert!(bits_eq(&got, &want), "{path:?}");
            if path == Bf16Path::Emulated {
                assert!(std::sync::Arc::ptr_eq(&nt.bits, &nn.bits), "shared bits");
            }
        }
    }

    #[test]
    #[should_panic(expected = "for_nn")]
    fn layout_mismatch_panics() {
        let w = vec![0.0; 6];
        let p = PackedBf16::for_nt(&w, 2, 3);
        let mut c = vec![0.0; 3];
        matmul_nn_bf16(&[0.0, 0.0], &p, &mut c, 1, false);
    }
}

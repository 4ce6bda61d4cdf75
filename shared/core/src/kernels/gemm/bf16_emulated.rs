//! bf16 products on CPUs without bf16 arithmetic (no AVX512-BF16, e.g. AMD Zen 1–3 and most
//! Intel client cores): the same arithmetic as `vdpbf16ps` — operands rounded to bf16 (round
//! to nearest even), exact products, f32 accumulation — computed by the f32 GEMM.
//!
//! A product of two bf16 values is exact in f32, so an f32 fused multiply-add over the rounded
//! operands adds exactly what the bf16 instruction adds; only the order of the additions
//! differs (as between any two GEMMs). The weight is kept as bf16 bits (2 bytes each) and
//! widened to f32 while the driver packs its panels, as the 4-bit weights are decoded; the
//! activations are rounded into a scratch copy.

use super::bf16::{bf16_bits_to_f32, round_bf16_slice};
use super::driver::{self, BSource, Kernel, View};
use super::{GemmPath, PARALLEL_MIN, SERIAL};
use std::cell::Cell;

/// Whether this CPU has an f32 GEMM fast enough for the emulation to beat the portable bf16
/// kernel (AVX2+FMA or AVX-512).
pub(crate) fn available() -> bool {
    matches!(GemmPath::best(), GemmPath::Avx2 | GemmPath::Avx512)
}

thread_local! {
    /// Rows widened for one transposing panel pack (reused between panels).
    static ROWS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The rounded activations of the current product.
    static ROUNDED: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Widen `bits` into `out`.
fn widen(bits: &[u16], out: &mut [f32]) {
    for (o, &b) in out.iter_mut().zip(bits) {
        *o = bf16_bits_to_f32(b);
    }
}

/// C[m×pn] (+)= round(A)[m×pk] · B, where the weight `bits` is `[n, k]` row-major and B is
/// its transpose (`nn == false`: the forward product, pn = n, pk = k) or itself (`nn`: the
/// input gradient, pn = k, pk = n).
#[allow(clippy::too_many_arguments)]
pub(crate) fn product(
    a: &[f32],
    bits: &[u16],
    nn: bool,
    n: usize,
    k: usize,
    c: &mut [f32],
    m: usize,
    acc: bool,
) {
    let (pn, pk) = if nn { (k, n) } else { (n, k) };
    let mut ra = ROUNDED.with(|r| r.take());
    ra.clear();
    ra.extend_from_slice(&a[..m * pk]);
    round_bf16_slice(&mut ra);
    let av = View {
        ptr: ra.as_ptr(),
        ls: pk,
        ks: 1,
    };
    let threads = if m * pn * pk < PARALLEL_MIN || SERIAL.with(|s| s.get()) {
        1
    } else {
        rayon::current_num_threads()
    };
    macro_rules! run {
        ($K:ty) => {{
            let nr = <$K as Kernel>::NR;
            // B(kk, j) = W[j, kk]: widen the panel's weight rows, then transpose-pack them.
            let nt = |j0: usize, cols: usize, pc: usize, kc: usize, dst: *mut f32| {
                let mut rows = ROWS.with(|c| c.take());
                rows.resize(cols * kc, 0.0);
                for r in 0..cols {
                    let at = (j0 + r) * k + pc;
                    widen(&bits[at..at + kc], &mut rows[r * kc..(r + 1) * kc]);
                }
                let src = View {
                    ptr: rows.as_ptr(),
                    ls: kc,
                    ks: 1,
                };
                // SAFETY: `rows` holds cols × kc floats; the driver hands kc × NR floats.
                unsafe { <$K>::pack(src, cols, kc, dst, nr) };
                ROWS.with(|c| c.set(rows));
            };
            // B(kk, j) = W[kk, j]: each k-step is a row segment of W, widened in place.
            let nn_pack = |j0: usize, cols: usize, pc: usize, kc: usize, dst: *mut f32| {
                for kk in 0..kc {
                    // SAFETY: the driver's panel holds kc × NR floats.
                    let row = unsafe { std::slice::from_raw_parts_mut(dst.add(kk * nr), nr) };
                    let at = (pc + kk) * k + j0;
                    widen(&bits[at..at + cols], &mut row[..cols]);
                    row[cols..].fill(0.0);
                }
            };
            let src: BSource = if nn {
                BSource::Custom(&nn_pack)
            } else {
                BSource::Custom(&nt)
            };
            // SAFETY: A covers m×pk, C m×pn (the callers assert it); the packers write whole
            // panels inside the weight; the kernel's instruction set is available (checked
            // by `available` when the path was chosen).
            unsafe {
                driver::gemm_driver::<$K>(m, pn, pk, av, src, c.as_mut_ptr(), pn, acc, threads)
            }
        }};
    }
    match GemmPath::best() {
        #[cfg(target_arch = "x86_64")]
        GemmPath::Avx512 => run!(super::avx512::Avx512),
        #[cfg(target_arch = "x86_64")]
        GemmPath::Avx2 => run!(super::avx2::Avx2),
        _ => run!(super::scalar::Scalar),
    }
    ROUNDED.with(|r| r.set(ra));
}

//! Small products inside one thread without packing (attention: blocks of 64 queries against
//! up to a few hundred keys, head dimension 64). At these sizes the packed GEMM spent about as
//! long copying its operands into panels as multiplying them: here the micro-kernel reads A
//! in place (broadcasts from strided rows) and B either in place, when its rows are contiguous
//! (`P·V`, `dS·K`, `Pᵀ·dO`, `dSᵀ·Q`), or from [`RowPanels`] packed once per head when the
//! product needs it transposed (`Q·Kᵀ`, `dO·Vᵀ`).
//!
//! The AVX-512 kernel needs no packing; other CPUs go through [`super::sgemm`] unchanged.
//! Like sgemm, a product large enough runs its tiles on all threads unless the caller is
//! inside [`super::serial`]. The LoRA products (rank 16 against the hidden size) use it too:
//! the packed GEMM copied their large operand to multiply it with a thin one.

use super::driver::SendPtr;
use super::{sgemm, GemmPath, PARALLEL_MIN, SERIAL};
use rayon::prelude::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Columns per panel (one micro-kernel tile: two AVX-512 vectors).
const NR: usize = 32;
/// Rows per micro-kernel tile.
#[cfg(target_arch = "x86_64")]
const MR: usize = 8;

fn direct() -> bool {
    GemmPath::selected() == GemmPath::Avx512
}

/// C[m×n] (+)= A·B with A(i, kk) = a[i·a_rs + kk·a_cs] and B's rows contiguous:
/// B(kk, j) = b[kk·b_rs + j].
#[allow(clippy::too_many_arguments)]
pub fn small_nn(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    c: &mut [f32],
    c_rs: usize,
    acc: bool,
) {
    if !direct() || m == 0 || n == 0 || k == 0 {
        return sgemm(m, n, k, a, a_rs, a_cs, b, b_rs, 1, c, c_rs, acc);
    }
    check(m, n, k, a, a_rs, a_cs, c, c_rs);
    assert!(b.len() >= (k - 1) * b_rs + n, "small_nn: B extent");
    // SAFETY: AVX-512F is available (direct()); the asserts keep every access in bounds: B
    // panels are read with masks at the last, partial one.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        tiles(m, n, k, a, a_rs, a_cs, b.as_ptr(), b_rs, NR, c, c_rs, acc)
    };
}

/// Rows `[rows, cols]` (row stride `rs`) of a matrix used transposed as the right operand of
/// [`small_nt`]: with the AVX-512 kernel, packed into panels of 32 rows (`panel[kk·32 + r]`),
/// so that every product with a prefix of the rows reads them without another copy; on
/// other CPUs borrowed as they are.
pub struct RowPanels<'a> {
    rows: usize,
    cols: usize,
    src: &'a [f32],
    rs: usize,
    /// The panels (AVX-512 kernel only).
    packed: Option<Vec<f32>>,
}

impl<'a> RowPanels<'a> {
    pub fn new(src: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        assert!(
            rows == 0 || src.len() >= (rows - 1) * rs + cols,
            "RowPanels: source extent"
        );
        let mut panels = Self {
            rows,
            cols,
            src,
            rs,
            packed: None,
        };
        if !direct() {
            return panels;
        }
        let mut buf = vec![0.0f32; rows.div_ceil(NR) * NR * cols];
        #[cfg(target_arch = "x86_64")]
        for (p, dst) in buf.chunks_mut(NR * cols).enumerate() {
            let r0 = p * NR;
            let view = super::driver::View {
                ptr: src[r0 * rs..].as_ptr(),
                ls: rs,
                ks: 1,
            };
            // SAFETY: AVX-512F is available (direct()); the view covers rows r0.. of `src`
            // (asserted extent), `dst` holds cols × 32 floats.
            unsafe { super::avx512::pack(view, NR.min(rows - r0), cols, dst.as_mut_ptr(), NR) };
        }
        panels.packed = Some(buf);
        panels
    }
}

/// C[m×(hi−lo)] (+)= A[m×cols] · rows[lo..hi]ᵀ, A(i, kk) = a[i·a_rs + kk·a_cs]: from the
/// panels when `lo` starts one (a multiple of 32), otherwise through sgemm on the rows in
/// place. Attention multiplies by a prefix of the keys; LoRA by all rows of a thin weight.
#[allow(clippy::too_many_arguments)]
pub fn small_nt(
    m: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    rows: &RowPanels,
    lo: usize,
    hi: usize,
    c: &mut [f32],
    c_rs: usize,
    acc: bool,
) {
    let (n, k) = (hi - lo, rows.cols);
    assert!(hi <= rows.rows && lo <= hi, "small_nt: row range");
    match &rows.packed {
        Some(buf) if m > 0 && n > 0 && k > 0 && lo.is_multiple_of(NR) => {
            check(m, n, k, a, a_rs, a_cs, c, c_rs);
            let b = &buf[lo * k..];
            // SAFETY: packed buffers exist only with AVX-512 (direct()); panels are whole
            // (zero padded), so full loads stay inside `buf`; the other accesses are checked.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                tiles(m, n, k, a, a_rs, a_cs, b.as_ptr(), NR, NR * k, c, c_rs, acc)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = b;
        }
        _ => {
            let src = &rows.src[(lo * rows.rs).min(rows.src.len())..];
            sgemm(m, n, k, a, a_rs, a_cs, src, 1, rows.rs, c, c_rs, acc)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    c: &[f32],
    c_rs: usize,
) {
    assert!(
        a.len() > (m - 1) * a_rs + (k - 1) * a_cs,
        "small product: A extent"
    );
    assert!(
        c.len() >= (m - 1) * c_rs + n && (m == 1 || c_rs >= n),
        "small product: C extent"
    );
}

/// Walk C in MR×32 tiles (on all threads when the product is large and the caller is not
/// inside [`super::serial`]). B(kk, j) = b[(j / 32)·panel + kk·b_ks + j % 32].
///
/// # Safety
/// AVX-512F; A, C in bounds (checked by the callers); for every panel, the `nr` valid
/// columns of every k row lie inside B (masked loads read nothing else).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tiles(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_ks: usize,
    panel: usize,
    c: &mut [f32],
    c_rs: usize,
    acc: bool,
) {
    let (row_tiles, panels) = (m.div_ceil(MR), n.div_ceil(NR));
    let (ap, bp, cp) = (
        SendPtr(a.as_ptr() as *mut f32),
        SendPtr(b as *mut f32),
        SendPtr(c.as_mut_ptr()),
    );
    let tile = |t: usize| {
        let (i0, j0) = (t / panels * MR, t % panels * NR);
        // SAFETY: caller contract; the tile's rows and columns lie inside A, B and C, and
        // tiles write disjoint parts of C.
        unsafe {
            micro(
                k,
                ap.get().add(i0 * a_rs),
                a_rs,
                a_cs,
                bp.get().add(j0 / NR * panel),
                b_ks,
                cp.get().add(i0 * c_rs + j0),
                c_rs,
                MR.min(m - i0),
                NR.min(n - j0),
                acc,
            )
        };
    };
    if m * n * k >= PARALLEL_MIN && !SERIAL.with(|s| s.get()) && rayon::current_num_threads() > 1 {
        (0..row_tiles * panels)
            .into_par_iter()
            .with_min_len(4)
            .for_each(tile);
    } else {
        (0..row_tiles * panels).for_each(tile);
    }
}

/// C[mr×nr] (+)= A·B for one tile: A rows read in place (rows past `mr` repeat the last one,
/// so no read leaves A), B rows of 32 read with lane masks.
///
/// # Safety
/// As [`tiles`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    k: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_ks: usize,
    c: *mut f32,
    c_rs: usize,
    mr: usize,
    nr: usize,
    acc: bool,
) {
    let m0 = super::avx512::lane_mask(nr);
    let m1 = super::avx512::lane_mask(nr.saturating_sub(16));
    let rows: [*const f32; MR] = std::array::from_fn(|r| a.wrapping_add(r.min(mr - 1) * a_rs));
    let mut t = [[_mm512_setzero_ps(); 2]; MR];
    // SAFETY: caller contract.
    unsafe {
        for kk in 0..k {
            let bp = b.add(kk * b_ks);
            let b0 = _mm512_maskz_loadu_ps(m0, bp);
            let b1 = _mm512_maskz_loadu_ps(m1, bp.wrapping_add(16));
            let off = kk * a_cs;
            for (row, &ar) in t.iter_mut().zip(&rows) {
                let av = _mm512_set1_ps(*ar.add(off));
                row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                row[1] = _mm512_fmadd_ps(av, b1, row[1]);
            }
        }
        for (r, row) in t.iter().enumerate().take(mr) {
            let cr = c.add(r * c_rs);
            let (mut v0, mut v1) = (row[0], row[1]);
            if acc {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, cr));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, cr.wrapping_add(16)));
            }
            _mm512_mask_storeu_ps(cr, m0, v0);
            _mm512_mask_storeu_ps(cr.wrapping_add(16), m1, v1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(
        m: usize,
        n: usize,
        k: usize,
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
    ) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|kk| a(i, kk) * b(kk, j)).sum();
            }
        }
        c
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}: {i}: {g} vs {w}"
            );
        }
    }

    /// Odd shapes (partial tiles in both directions, k of 1), transposed A, accumulation, and
    /// products with a prefix of packed rows starting at a panel boundary.
    #[test]
    fn small_products_match_the_naive_ones() {
        let mut rng = crate::rng::Rng::new(5);
        for &(m, n, k) in &[
            (64, 64, 256),
            (13, 70, 33),
            (1, 5, 1),
            (9, 32, 64),
            (64, 200, 64),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let bt: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| rng.normal()).collect();
            // nn, A row-major, B rows contiguous (row stride n + 3 to test strides).
            let bs = n + 3;
            let mut b = vec![0.0f32; k * bs];
            for kk in 0..k {
                b[kk * bs..kk * bs + n].copy_from_slice(&bt[kk * n..(kk + 1) * n]);
            }
            let want = naive(m, n, k, |i, kk| a[i * k + kk], |kk, j| bt[kk * n + j]);
            let mut got = c0.clone();
            small_nn(m, n, k, &a, k, 1, &b, bs, &mut got, n, false);
            close(&got, &want, &format!("nn {m}x{n}x{k}"));
            // Accumulating, A read transposed (A(i, kk) = at[kk*m + i]).
            let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
            let mut got = c0.clone();
            small_nn(m, n, k, &at, 1, m, &b, bs, &mut got, n, true);
            let plus: Vec<f32> = want.iter().zip(&c0).map(|(w, c)| w + c).collect();
            close(&got, &plus, &format!("nn acc, Aᵀ {m}x{n}x{k}"));
            // nt against rows [lo, n) of a [n, k] matrix (rows = columns of the product).
            let rows_m: Vec<f32> = (0..n * k).map(|x| bt[(x % k) * n + x / k]).collect();
            let panels = RowPanels::new(&rows_m, n, k, k);
            for lo in [0, 32, 7].into_iter().filter(|&lo| lo < n) {
                let w = n - lo;
                let want = naive(m, w, k, |i, kk| a[i * k + kk], |kk, j| bt[kk * n + lo + j]);
                let mut got = vec![0.0f32; m * w];
                small_nt(m, &a, k, 1, &panels, lo, n, &mut got, w, false);
                close(&got, &want, &format!("nt {m}x{w}x{k} from {lo}"));
                let mut got = vec![0.0f32; m * w];
                small_nt(m, &at, 1, m, &panels, lo, n, &mut got, w, false);
                close(&got, &want, &format!("nt, Aᵀ {m}x{w}x{k} from {lo}"));
            }
        }
    }
}

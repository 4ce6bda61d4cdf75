//! f32 matrix products.
//!
//! All model code goes through the three entry points below (named after the transposition
//! of the operands, BLAS style), so the implementation behind them can change freely.
//! Matrices are row-major and contiguous.
//!
//! Implementation: our own packed GEMM (BLIS loop order, see `driver`) with an AVX-512
//! 12×32 micro-kernel, an AVX2+FMA 6×16 fallback and a portable 4×8 kernel, plus unpacked
//! AVX-512 and AVX2 paths for very short products (m or n ≤ 8: generation). The path is picked
//! from the CPU at run time; `PEFTKIT_GEMM=avx512|avx2|scalar|crate` forces one (`crate` is
//! the `gemm` crate, kept as a reference). A forced path the CPU lacks falls back to the best
//! available one.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod bf16;
mod bf16_emulated;
mod driver;
#[cfg(target_arch = "x86_64")]
mod gemv;
#[cfg(target_arch = "x86_64")]
mod gemv_avx2;
mod q4;
#[cfg(target_arch = "x86_64")]
mod q4_avx2;
mod scalar;
mod small;

pub use bf16::{
    bf16_bits_to_f32, f32_to_bf16_bits, matmul_nn_bf16, matmul_nn_q4_bf16, matmul_nt_bf16,
    matmul_nt_q4_bf16, round_bf16, round_bf16_slice, Bf16Path, PackedBf16,
};
use driver::View;
pub use q4::{decode as decode_q4, matmul_nn_q4, matmul_nt_q4, Q4Weight};
pub use small::{small_nn, small_nt, RowPanels};
use std::sync::OnceLock;

/// Implementation behind the matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmPath {
    /// AVX-512F micro-kernel (x86-64).
    Avx512,
    /// AVX2+FMA micro-kernel (x86-64).
    Avx2,
    /// Portable kernel.
    Scalar,
    /// The `gemm` crate (reference).
    Crate,
}

impl GemmPath {
    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            GemmPath::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            GemmPath::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(not(target_arch = "x86_64"))]
            GemmPath::Avx512 | GemmPath::Avx2 => false,
            GemmPath::Scalar | GemmPath::Crate => true,
        }
    }

    /// The fastest path this CPU supports.
    pub fn best() -> GemmPath {
        [GemmPath::Avx512, GemmPath::Avx2]
            .into_iter()
            .find(|p| p.available())
            .unwrap_or(GemmPath::Scalar)
    }

    /// The path in use: `PEFTKIT_GEMM` if set (and available), else [`GemmPath::best`].
    pub fn selected() -> GemmPath {
        static SELECTED: OnceLock<GemmPath> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let forced = std::env::var("PEFTKIT_GEMM").ok().and_then(|v| {
                match v.trim().to_ascii_lowercase().as_str() {
                    "avx512" => Some(GemmPath::Avx512),
                    "avx2" => Some(GemmPath::Avx2),
                    "scalar" => Some(GemmPath::Scalar),
                    "crate" => Some(GemmPath::Crate),
                    _ => None,
                }
            });
            match forced {
                Some(p) if p.available() => p,
                _ => GemmPath::best(),
            }
        })
    }
}

/// C[m×n] (+)= A[m×k] · B[n×k]ᵀ — a linear layer's forward pass (B is the weight [out, in]).
pub fn matmul_nt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize, acc: bool) {
    check(a, m * k, b, n * k, c, m * n);
    // B[n×k] read as its transpose: element (kk, j) at j*k + kk → row stride 1, col stride k.
    sgemm(m, n, k, a, k, 1, b, 1, k, c, n, acc);
}

/// C[m×n] (+)= A[m×k] · B[k×n] — input gradient of a linear layer (B is the weight).
pub fn matmul_nn(a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize, acc: bool) {
    check(a, m * k, b, k * n, c, m * n);
    sgemm(m, n, k, a, k, 1, b, n, 1, c, n, acc);
}

/// C[m×n] (+)= A[k×m]ᵀ · B[k×n] — weight gradient (A = output gradient, B = layer input).
pub fn matmul_tn(a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize, acc: bool) {
    check(a, k * m, b, k * n, c, m * n);
    sgemm(m, n, k, a, 1, m, b, n, 1, c, n, acc);
}

/// A frozen weight `[n, k]` (a linear layer's `[out, in]`) packed once in the GEMM driver's
/// layout, so that products `x · Wᵀ` with it ([`matmul_nt_packed`]) skip packing the weight.
/// Worth it when the same weight multiplies several inputs (the LM head over row chunks, a
/// layer over several sub-batches); for very short products (m ≤ 4) the plain
/// [`matmul_nt`] is faster.
pub struct PackedWeight {
    path: GemmPath,
    n: usize,
    k: usize,
    buf: Vec<f32>,
    off: usize,
    /// The same weight packed for the input gradient `dy·W` (see
    /// [`PackedWeight::repack_input_grad`]).
    input_grad: Option<Box<PackedWeight>>,
    /// Whether `input_grad` holds the current weight (a repack makes it stale; its buffer is
    /// kept for reuse).
    input_grad_fresh: bool,
}

impl Default for PackedWeight {
    fn default() -> Self {
        Self {
            path: GemmPath::Scalar,
            n: 0,
            k: 0,
            buf: Vec::new(),
            off: 0,
            input_grad: None,
            input_grad_fresh: false,
        }
    }
}

impl PackedWeight {
    /// Pack `w` (`[n, k]`, row-major) for the selected path.
    pub fn new(w: &[f32], n: usize, k: usize) -> Self {
        Self::with_path(GemmPath::selected(), w, n, k)
    }

    /// Pack for an explicit path (the `gemm` crate path packs for the best one). For tests.
    pub fn with_path(path: GemmPath, w: &[f32], n: usize, k: usize) -> Self {
        let mut p = Self::default();
        p.repack_with(path, w, n, k);
        p
    }

    /// Pack another weight into this buffer (reusing its memory).
    pub fn repack(&mut self, w: &[f32], n: usize, k: usize) {
        self.repack_with(GemmPath::selected(), w, n, k);
    }

    /// Also pack `w` (`[n, k]`, the weight of the last [`PackedWeight::repack`]) for the
    /// input gradient `dx[m, k] = dy[m, n] · W`, for [`PackedWeight::input_grad`]. Worth it
    /// for a large weight multiplied in several chunks of rows (the LM head in the loss),
    /// which would otherwise be packed again for every chunk; costs a second copy.
    pub fn repack_input_grad(&mut self, w: &[f32], n: usize, k: usize) {
        let path = self.path;
        let p = self.input_grad.get_or_insert_with(Box::default);
        // B(kk, j) = W[kk, j]: the reduction runs over W's rows.
        p.repack_view(path, w, k, n, 1, k);
        self.input_grad_fresh = true;
    }

    /// The input-gradient packing, if [`PackedWeight::repack_input_grad`] made one: a
    /// `PackedWeight` with n = k of the weight, for [`matmul_nt_packed`] (`dy · W`).
    pub fn input_grad(&self) -> Option<&PackedWeight> {
        self.input_grad.as_deref().filter(|_| self.input_grad_fresh)
    }

    fn repack_with(&mut self, path: GemmPath, w: &[f32], n: usize, k: usize) {
        self.input_grad_fresh = false;
        // B(kk, j) = W[j, kk]: the product x·Wᵀ.
        self.repack_view(path, w, n, k, k, 1);
    }

    /// Pack the k×n operand B(kk, j) = `w[j*ls + kk*ks]`.
    fn repack_view(&mut self, path: GemmPath, w: &[f32], n: usize, k: usize, ls: usize, ks: usize) {
        assert!(w.len() >= n * k, "PackedWeight: weight size");
        let path = match path {
            GemmPath::Crate => GemmPath::best(),
            p if !p.available() => GemmPath::best(),
            p => p,
        };
        let len = match path {
            #[cfg(target_arch = "x86_64")]
            GemmPath::Avx512 => driver::packed_b_len::<avx512::Avx512>(n, k),
            #[cfg(target_arch = "x86_64")]
            GemmPath::Avx2 => driver::packed_b_len::<avx2::Avx2>(n, k),
            _ => driver::packed_b_len::<scalar::Scalar>(n, k),
        };
        if self.buf.len() < len + 16 {
            self.buf = vec![0.0; len + 16];
        }
        self.off = self.buf.as_ptr().align_offset(64).min(15);
        self.path = path;
        self.n = n;
        self.k = k;
        if n == 0 || k == 0 {
            return;
        }
        let bv = View {
            ptr: w.as_ptr(),
            ls,
            ks,
        };
        let threads = if SERIAL.with(|s| s.get()) {
            1
        } else {
            rayon::current_num_threads()
        };
        let dst = self.buf[self.off..].as_mut_ptr();
        // SAFETY: `w` covers n×k (asserted), `dst` has room for `len` floats, and the path's
        // instruction set is available (checked above).
        unsafe {
            match path {
                #[cfg(target_arch = "x86_64")]
                GemmPath::Avx512 => driver::pack_b_full::<avx512::Avx512>(
                    n,
                    k,
                    driver::BSource::Pack(bv),
                    dst,
                    threads,
                ),
                #[cfg(target_arch = "x86_64")]
                GemmPath::Avx2 => {
                    driver::pack_b_full::<avx2::Avx2>(n, k, driver::BSource::Pack(bv), dst, threads)
                }
                _ => driver::pack_b_full::<scalar::Scalar>(
                    n,
                    k,
                    driver::BSource::Pack(bv),
                    dst,
                    threads,
                ),
            }
        }
    }

    /// Output features (rows of the weight).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features (columns of the weight).
    pub fn k(&self) -> usize {
        self.k
    }

    /// The path the weight was packed for.
    pub fn path(&self) -> GemmPath {
        self.path
    }
}

/// C[m×n] (+)= A[m×k] · Wᵀ with a prepacked weight W `[n, k]` (same result as [`matmul_nt`]).
pub fn matmul_nt_packed(a: &[f32], w: &PackedWeight, c: &mut [f32], m: usize, acc: bool) {
    let (n, k) = (w.n, w.k);
    assert!(
        a.len() >= m * k && c.len() >= m * n,
        "matmul_nt_packed operand sizes"
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
    let av = View {
        ptr: a.as_ptr(),
        ls: k,
        ks: 1,
    };
    let bsrc = driver::BSource::Prepacked(w.buf[w.off..].as_ptr());
    let cp = c.as_mut_ptr();
    // SAFETY: A covers m×k and C m×n (asserted), the buffer was packed by `pack_b_full` for
    // this path, n and k, and the path's instruction set was checked when packing.
    unsafe {
        match w.path {
            #[cfg(target_arch = "x86_64")]
            GemmPath::Avx512 => {
                driver::gemm_driver::<avx512::Avx512>(m, n, k, av, bsrc, cp, n, acc, threads)
            }
            #[cfg(target_arch = "x86_64")]
            GemmPath::Avx2 => {
                driver::gemm_driver::<avx2::Avx2>(m, n, k, av, bsrc, cp, n, acc, threads)
            }
            _ => driver::gemm_driver::<scalar::Scalar>(m, n, k, av, bsrc, cp, n, acc, threads),
        }
    }
}

fn check(a: &[f32], la: usize, b: &[f32], lb: usize, c: &[f32], lc: usize) {
    assert!(
        a.len() >= la && b.len() >= lb && c.len() >= lc,
        "matmul operand sizes"
    );
}

/// General strided product: C = A·B (+ C when `acc`). Strides are in elements:
/// A(i, kk) = a[i*a_rs + kk*a_cs], B(kk, j) = b[kk*b_rs + j*b_cs], C(i, j) = c[i*c_rs + j].
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    c_rs: usize,
    acc: bool,
) {
    sgemm_with(
        GemmPath::selected(),
        m,
        n,
        k,
        a,
        a_rs,
        a_cs,
        b,
        b_rs,
        b_cs,
        c,
        c_rs,
        acc,
    );
}

/// Products smaller than this (m·n·k) run on the calling thread only.
const PARALLEL_MIN: usize = 1 << 18;

thread_local! {
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with every product it makes on the calling thread only. For callers that already
/// spread independent products over the threads (attention per sequence and head): nesting
/// parallel products there only adds scheduling overhead.
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    let before = SERIAL.with(|s| s.replace(true));
    let r = f();
    SERIAL.with(|s| s.set(before));
    r
}

/// [`sgemm`] through an explicit implementation (falls back to the best available path when
/// the CPU lacks `path`). For tests and benchmarks.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_with(
    path: GemmPath,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    c_rs: usize,
    acc: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        c.len() >= (m - 1) * c_rs + n && (m == 1 || c_rs >= n),
        "sgemm: output extent"
    );
    if k == 0 {
        if !acc {
            for i in 0..m {
                c[i * c_rs..i * c_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        a.len() > (m - 1) * a_rs + (k - 1) * a_cs && b.len() > (k - 1) * b_rs + (n - 1) * b_cs,
        "sgemm: input extents"
    );
    let path = if path.available() {
        path
    } else {
        GemmPath::best()
    };
    let threads = if m * n * k < PARALLEL_MIN || SERIAL.with(|s| s.get()) {
        1
    } else {
        rayon::current_num_threads()
    };
    let av = View {
        ptr: a.as_ptr(),
        ls: a_rs,
        ks: a_cs,
    };
    let bv = View {
        ptr: b.as_ptr(),
        ls: b_cs,
        ks: b_rs,
    };
    let cp = c.as_mut_ptr();
    // SAFETY (all arms): the asserts above keep every (i, kk), (kk, j), (i, j) access inside
    // the slices; `c` is a distinct mutable borrow, so it does not alias the inputs; each
    // kernel runs only when `available()` confirmed its instruction set.
    match path {
        GemmPath::Crate => unsafe { crate_gemm(m, n, k, av, bv, cp, c_rs, acc, threads) },
        GemmPath::Scalar => unsafe {
            driver::gemm_packed::<scalar::Scalar>(m, n, k, av, bv, cp, c_rs, acc, threads)
        },
        #[cfg(target_arch = "x86_64")]
        GemmPath::Avx2 => unsafe {
            if !short_product(m, n, k, av, bv, cp, c_rs, acc, threads, gemv_avx2::gemv, 0) {
                driver::gemm_packed::<avx2::Avx2>(m, n, k, av, bv, cp, c_rs, acc, threads)
            }
        },
        #[cfg(target_arch = "x86_64")]
        GemmPath::Avx512 => unsafe {
            if !short_product(
                m,
                n,
                k,
                av,
                bv,
                cp,
                c_rs,
                acc,
                threads,
                gemv::gemv,
                gemv::MAX_ROWS,
            ) {
                driver::gemm_packed::<avx512::Avx512>(m, n, k, av, bv, cp, c_rs, acc, threads)
            }
        },
        #[cfg(not(target_arch = "x86_64"))]
        GemmPath::Avx512 | GemmPath::Avx2 => unreachable!("not available on this CPU"),
    }
}

/// A GEMV kernel (`gemv::gemv` or `gemv_avx2::gemv`).
#[cfg(target_arch = "x86_64")]
type GemvFn = unsafe fn(usize, usize, usize, &[f32], View, *mut f32, usize, usize, bool, usize);

/// Products with m or n ≤ [`gemv::MAX_M`] through `gemv` (B streamed once, no packing), and
/// up to `max_rows` rows of A against a B of dot-product layout (a weight matrix, x·Wᵀ);
/// returns false, doing nothing, for the others.
///
/// # Safety
/// As [`driver::gemm_packed`]; the CPU has `gemv`'s instruction set.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn short_product(
    m: usize,
    n: usize,
    k: usize,
    av: View,
    bv: View,
    cp: *mut f32,
    c_rs: usize,
    acc: bool,
    threads: usize,
    gemv: GemvFn,
    max_rows: usize,
) -> bool {
    // SAFETY: forwarded contract.
    unsafe {
        if (m <= gemv::MAX_M && (bv.ks == 1 || bv.ls == 1)) || (m <= max_rows && bv.ks == 1) {
            let at = gather_rows(m, k, av);
            gemv(m, n, k, &at, bv, cp, c_rs, 1, acc, threads);
        } else if n <= gemv::MAX_M && (av.ks == 1 || av.ls == 1) {
            // Cᵀ = Bᵀ·Aᵀ: B's columns become the short operand.
            let bt = gather_rows(n, k, bv);
            gemv(n, m, k, &bt, av, cp, 1, c_rs, acc, threads);
        } else {
            return false;
        }
    }
    true
}

/// Copy `rows` lanes of a view into contiguous rows (rows × k).
#[cfg(target_arch = "x86_64")]
unsafe fn gather_rows(rows: usize, k: usize, v: View) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * k);
    for i in 0..rows {
        // SAFETY: the caller's view covers rows × k elements.
        out.extend((0..k).map(|kk| unsafe { *v.ptr.add(i * v.ls + kk * v.ks) }));
    }
    out
}

/// The `gemm` crate (reference path).
///
/// # Safety
/// Views cover the operands; `c` covers the output and does not alias them.
#[allow(clippy::too_many_arguments)]
unsafe fn crate_gemm(
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
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: forwarded contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_rs as isize,
            acc,
            a.ptr,
            a.ks as isize,
            a.ls as isize,
            b.ptr,
            b.ls as isize,
            b.ks as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for kk in 0..k {
                    s += a[i * k + kk] as f64 * b[kk * n + j] as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    fn transpose(x: &[f32], r: usize, c: usize) -> Vec<f32> {
        let mut t = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                t[j * r + i] = x[i * c + j];
            }
        }
        t
    }

    #[test]
    fn three_layouts_match_naive() {
        let mut rng = crate::rng::Rng::new(7);
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 33, 65), (130, 70, 129)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
            let want = naive(&a, &b, m, n, k);
            let mut c = vec![0.0; m * n];
            matmul_nn(&a, &b, &mut c, m, n, k, false);
            assert_close(&c, &want);
            let bt = transpose(&b, k, n);
            matmul_nt(&a, &bt, &mut c, m, n, k, false);
            assert_close(&c, &want);
            let at = transpose(&a, m, k);
            matmul_tn(&at, &b, &mut c, m, n, k, false);
            assert_close(&c, &want);
            // accumulate adds on top
            matmul_nn(&a, &b, &mut c, m, n, k, true);
            let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
            assert_close(&c, &twice);
        }
    }

    const PATHS: [GemmPath; 4] = [
        GemmPath::Avx512,
        GemmPath::Avx2,
        GemmPath::Scalar,
        GemmPath::Crate,
    ];

    /// C = A·B (+ C) through `path` for A, B given row-major, in layout `layout` (0 = nn,
    /// 1 = nt, 2 = tn, 3 = strided with padded rows and transposed A).
    #[allow(clippy::too_many_arguments)]
    fn run_layout(
        path: GemmPath,
        layout: usize,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        m: usize,
        n: usize,
        k: usize,
        acc: bool,
    ) {
        match layout {
            0 => sgemm_with(path, m, n, k, a, k, 1, b, n, 1, c, n, acc),
            1 => {
                let bt = transpose(b, k, n);
                sgemm_with(path, m, n, k, a, k, 1, &bt, 1, k, c, n, acc)
            }
            2 => {
                let at = transpose(a, m, k);
                sgemm_with(path, m, n, k, &at, 1, m, b, n, 1, c, n, acc)
            }
            _ => {
                // A stored transposed with a row pitch m+3, B with a row pitch n+5 and C with
                // a row pitch n+2 (the untouched padding must survive).
                let (ap, bp, cp) = (m + 3, n + 5, n + 2);
                let mut at = vec![0.0; k * ap];
                for i in 0..m {
                    for kk in 0..k {
                        at[kk * ap + i] = a[i * k + kk];
                    }
                }
                let mut bs = vec![0.0; k * bp];
                for kk in 0..k {
                    bs[kk * bp..kk * bp + n].copy_from_slice(&b[kk * n..kk * n + n]);
                }
                let mut cs = vec![7.0; m * cp];
                for i in 0..m {
                    cs[i * cp..i * cp + n].copy_from_slice(&c[i * n..i * n + n]);
                }
                sgemm_with(path, m, n, k, &at, 1, ap, &bs, bp, 1, &mut cs, cp, acc);
                for i in 0..m {
                    c[i * n..i * n + n].copy_from_slice(&cs[i * cp..i * cp + n]);
                    assert!(cs[i * cp + n..i * cp + cp].iter().all(|&v| v == 7.0));
                }
            }
        }
    }

    #[test]
    fn every_path_layout_and_shape() {
        let mut rng = crate::rng::Rng::new(11);
        let shapes = [
            (1, 1, 1),
            (3, 5, 7),
            (17, 33, 65),
            (1000, 3, 5),
            (5, 1000, 3),
            (2, 77, 300),
            (4, 130, 33),
            (1, 200, 1),
            (7, 300, 40),
            (6, 50, 130),
            (8, 129, 31),
            (300, 7, 33),
            (50, 2, 70),
            (37, 100, 17),
            (12, 32, 400),
            (25, 47, 900),
            // 9..32 rows over several column blocks of B (batched decoding)
            (16, 1000, 70),
            (32, 300, 129),
            (20, 130, 600),
            (33, 70, 20),
            (200, 301, 50),
            (64, 64, 64),
            (8, 0, 5),
            (0, 8, 5),
            (9, 6, 0),
        ];
        for path in PATHS {
            if !path.available() {
                eprintln!("skipping {path:?}: not supported by this CPU");
                continue;
            }
            for &(m, n, k) in &shapes {
                let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
                let want = naive(&a, &b, m, n, k);
                let c0: Vec<f32> = (0..m * n).map(|_| rng.normal()).collect();
                let want_acc: Vec<f32> = want.iter().zip(&c0).map(|(w, c)| w + c).collect();
                for layout in 0..4 {
                    let mut c = vec![f32::NAN; m * n];
                    run_layout(path, layout, &a, &b, &mut c, m, n, k, false);
                    assert_close_ctx(&c, &want, &format!("{path:?} l{layout} {m}x{n}x{k}"));
                    let mut c = c0.clone();
                    run_layout(path, layout, &a, &b, &mut c, m, n, k, true);
                    assert_close_ctx(
                        &c,
                        &want_acc,
                        &format!("{path:?} acc l{layout} {m}x{n}x{k}"),
                    );
                }
            }
        }
    }

    #[test]
    fn large_parallel_products_every_path() {
        // Big enough to use several KC/NC blocks and both threads.
        let mut rng = crate::rng::Rng::new(5);
        for &(m, n, k) in &[(300, 3200, 700), (3, 5000, 70), (700, 2, 300)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
            let want = naive(&a, &b, m, n, k);
            for path in PATHS.into_iter().filter(|p| p.available()) {
                for layout in [0, 1, 2] {
                    let mut c = vec![f32::NAN; m * n];
                    run_layout(path, layout, &a, &b, &mut c, m, n, k, false);
                    assert_close_ctx(&c, &want, &format!("{path:?} l{layout} {m}x{n}x{k}"));
                }
            }
        }
    }

    #[test]
    fn prepacked_weights_every_path() {
        let mut rng = crate::rng::Rng::new(21);
        // Odd sizes, several KC blocks and (for every kernel) several NC blocks.
        let shapes = [
            (1, 1, 1),
            (5, 7, 3),
            (13, 33, 65),
            (37, 70, 400),
            (25, 3100, 40),
            (30, 2100, 777),
            (3, 1100, 20),
            (0, 5, 5),
            (4, 6, 0),
        ];
        for path in PATHS.into_iter().filter(|p| p.available()) {
            let mut reused = PackedWeight::default();
            for &(m, n, k) in &shapes {
                let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
                let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
                let want = naive(&a, &transpose(&w, n, k), m, n, k);
                let pw = PackedWeight::with_path(path, &w, n, k);
                assert_eq!((pw.n(), pw.k()), (n, k));
                let mut c = vec![f32::NAN; m * n];
                matmul_nt_packed(&a, &pw, &mut c, m, false);
                assert_close_ctx(&c, &want, &format!("{path:?} packed {m}x{n}x{k}"));
                let c0: Vec<f32> = (0..m * n).map(|_| rng.normal()).collect();
                let mut c = c0.clone();
                reused.repack_with(path, &w, n, k);
                matmul_nt_packed(&a, &reused, &mut c, m, true);
                let want_acc: Vec<f32> = want.iter().zip(&c0).map(|(w, c)| w + c).collect();
                assert_close_ctx(&c, &want_acc, &format!("{path:?} packed acc {m}x{n}x{k}"));
                // Serial (single-thread) products give the same result.
                let mut c = vec![f32::NAN; m * n];
                serial(|| matmul_nt_packed(&a, &pw, &mut c, m, false));
                assert_close_ctx(&c, &want, &format!("{path:?} packed serial {m}x{n}x{k}"));
                // The input-gradient packing: dy[m, n] · W[n, k].
                assert!(reused.input_grad().is_none(), "a repack makes it stale");
                reused.repack_input_grad(&w, n, k);
                let g = reused.input_grad().expect("packed");
                assert_eq!((g.n(), g.k()), (k, n));
                let dy: Vec<f32> = (0..m * n).map(|_| rng.normal()).collect();
                let want = naive(&dy, &w, m, k, n);
                let mut dx = vec![f32::NAN; m * k];
                matmul_nt_packed(&dy, g, &mut dx, m, false);
                assert_close_ctx(&dx, &want, &format!("{path:?} input grad {m}x{n}x{k}"));
            }
        }
    }

    fn assert_close_ctx(x: &[f32], y: &[f32], ctx: &str) {
        assert_eq!(x.len(), y.len());
        for (i, (a, b)) in x.iter().zip(y).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{ctx}: element {i}: {a} vs {b}"
            );
        }
    }

    fn assert_close(x: &[f32], y: &[f32]) {
        for (a, b) in x.iter().zip(y) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}

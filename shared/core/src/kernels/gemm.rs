//! f32 matrix products.
//!
//! All model code goes through the three entry points below (named after the transposition
//! of the operands, BLAS style), so the implementation behind them can change freely.
//! Matrices are row-major and contiguous.

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
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                c[i * c_rs..i * c_rs + n].fill(0.0);
            }
        }
        return;
    }
    let threads = if m * n * k < 64 * 64 * 64 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    };
    // SAFETY: the strides and sizes describe memory inside the given slices (checked by the
    // callers above); the output does not alias the inputs (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            acc,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            threads,
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

    fn assert_close(x: &[f32], y: &[f32]) {
        for (a, b) in x.iter().zip(y) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}

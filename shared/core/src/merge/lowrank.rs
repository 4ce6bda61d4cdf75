//! Singular value decomposition of a low-rank product `B · A` without forming it.
//!
//! ΔW of a LoRA module (or a sum of them) is `B [out, R] · A [R, in]` with R small. Its SVD
//! follows from two thin QR factorizations and the SVD of an R×R core:
//! `B = Qb Rb`, `Aᵀ = Qa Ra` ⇒ `B A = Qb (Rb Raᵀ) Qaᵀ`, and `Rb Raᵀ = U' S V'ᵀ` gives
//! `U = Qb U'`, `V = Qa V'`. That is O((out + in) R²) instead of O(out · in · min(out, in)) for a
//! dense SVD, and exact up to rounding (computed in f64).
//!
//! Singular vectors are unique only up to a sign per pair; we make the entry of largest
//! magnitude in each right singular vector positive so results are reproducible. PyTorch's
//! LAPACK SVD makes no such promise, so compare with it sign-free (products or |values|).

use nalgebra::DMatrix;

/// Truncated SVD `B A ≈ U diag(S) Vᵀ` with `k` components (fewer if the product has lower
/// dimension). Row-major outputs: `u [out, k]`, `s [k]`, `vt [k, in]`.
pub struct LowRankSvd {
    pub u: Vec<f32>,
    pub s: Vec<f32>,
    pub vt: Vec<f32>,
    pub k: usize,
}

/// SVD of `b [out, r] · a [r, in]` (row-major f32), keeping the `k` largest singular values.
pub fn svd_of_product(
    b: &[f32],
    a: &[f32],
    out: usize,
    r: usize,
    inp: usize,
    k: usize,
) -> LowRankSvd {
    assert_eq!(b.len(), out * r, "b is not [out, r]");
    assert_eq!(a.len(), r * inp, "a is not [r, in]");
    let bm = DMatrix::<f64>::from_fn(out, r, |i, j| b[i * r + j] as f64);
    let at = DMatrix::<f64>::from_fn(inp, r, |i, j| a[j * inp + i] as f64);
    let (qb, rb) = bm.qr().unpack();
    let (qa, ra) = at.qr().unpack();
    let core = &rb * ra.transpose();
    let svd = core.svd(true, true);
    let (cu, cvt) = (svd.u.expect("u requested"), svd.v_t.expect("v_t requested"));
    // nalgebra does not sort singular values
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&x, &y| svd.singular_values[y].total_cmp(&svd.singular_values[x]));
    let k = k.min(order.len());
    let uu = &qb * &cu; // [out, m]
    let vv = &qa * cvt.transpose(); // [in, m]
    let mut res = LowRankSvd {
        u: vec![0f32; out * k],
        s: vec![0f32; k],
        vt: vec![0f32; k * inp],
        k,
    };
    for (c, &j) in order.iter().take(k).enumerate() {
        let col = vv.column(j);
        let big = col
            .iter()
            .fold(0f64, |m, &x| if x.abs() > m.abs() { x } else { m });
        let sign = if big < 0.0 { -1.0 } else { 1.0 };
        res.s[c] = svd.singular_values[j] as f32;
        for i in 0..out {
            res.u[i * k + c] = (uu[(i, j)] * sign) as f32;
        }
        for i in 0..inp {
            res.vt[c * inp + i] = (col[i] * sign) as f32;
        }
    }
    res
}

/// Singular values (descending) of `b [out, r] · a [r, in]`.
pub fn singular_values(b: &[f32], a: &[f32], out: usize, r: usize, inp: usize) -> Vec<f32> {
    svd_of_product(b, a, out, r, inp, r).s
}

/// Truncated SVD of a dense row-major `m [rows, cols]` (for pruned ΔW, which is no longer
/// low-rank), computed in f64 and sign-normalized like [`svd_of_product`].
pub fn svd_dense(m: &[f32], rows: usize, cols: usize, k: usize) -> LowRankSvd {
    assert_eq!(m.len(), rows * cols, "matrix is not [rows, cols]");
    // nalgebra's SVD wants rows ≥ cols for its bidiagonalization to be cheap either way; the
    // identity B = I, A = M through svd_of_product would cost a QR of an identity, so go direct.
    let mat = DMatrix::<f64>::from_fn(rows, cols, |i, j| m[i * cols + j] as f64);
    let svd = mat.svd(true, true);
    let (u, vt) = (svd.u.expect("u requested"), svd.v_t.expect("v_t requested"));
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&x, &y| svd.singular_values[y].total_cmp(&svd.singular_values[x]));
    let k = k.min(order.len());
    let mut res = LowRankSvd {
        u: vec![0f32; rows * k],
        s: vec![0f32; k],
        vt: vec![0f32; k * cols],
        k,
    };
    for (c, &j) in order.iter().take(k).enumerate() {
        let row = vt.row(j);
        let big = row
            .iter()
            .fold(0f64, |m, &x| if x.abs() > m.abs() { x } else { m });
        let sign = if big < 0.0 { -1.0 } else { 1.0 };
        res.s[c] = svd.singular_values[j] as f32;
        for i in 0..rows {
            res.u[i * k + c] = (u[(i, j)] * sign) as f32;
        }
        for i in 0..cols {
            res.vt[c * cols + i] = (row[i] * sign) as f32;
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn product(b: &[f32], a: &[f32], o: usize, r: usize, i: usize) -> Vec<f64> {
        let mut d = vec![0f64; o * i];
        for x in 0..o {
            for y in 0..i {
                d[x * i + y] = (0..r)
                    .map(|z| b[x * r + z] as f64 * a[z * i + y] as f64)
                    .sum();
            }
        }
        d
    }

    #[test]
    fn reconstructs_the_product_and_sorts() {
        let (o, r, i) = (13, 5, 9);
        let mut rng = Rng::new(3);
        let b: Vec<f32> = (0..o * r).map(|_| rng.normal()).collect();
        let a: Vec<f32> = (0..r * i).map(|_| rng.normal()).collect();
        let svd = svd_of_product(&b, &a, o, r, i, r);
        assert!(svd.s.windows(2).all(|w| w[0] >= w[1]));
        let mut us = svd.u.clone();
        for x in 0..o {
            for c in 0..svd.k {
                us[x * svd.k + c] *= svd.s[c];
            }
        }
        let rec = product(&us, &svd.vt, o, svd.k, i);
        let want = product(&b, &a, o, r, i);
        let err = rec
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-4, "max error {err}");
        // orthonormal right vectors
        for c in 0..svd.k {
            let n: f32 = svd.vt[c * i..(c + 1) * i].iter().map(|v| v * v).sum();
            assert!((n - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn truncation_keeps_the_largest() {
        // diag(3, 2, 1) padded: B = I-ish, A = diag
        let (o, r, i) = (4, 3, 4);
        let mut b = vec![0f32; o * r];
        let mut a = vec![0f32; r * i];
        for (j, s) in [1.0f32, 3.0, 2.0].iter().enumerate() {
            b[j * r + j] = 1.0;
            a[j * i + j] = *s;
        }
        let svd = svd_of_product(&b, &a, o, r, i, 2);
        assert_eq!(svd.k, 2);
        assert!((svd.s[0] - 3.0).abs() < 1e-6 && (svd.s[1] - 2.0).abs() < 1e-6);
        // sign rule: largest entry of each right vector is positive
        assert!(svd.vt[1] > 0.99 && svd.vt[i + 2] > 0.99);
    }
}

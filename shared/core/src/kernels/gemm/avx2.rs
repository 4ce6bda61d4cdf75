//! AVX2+FMA fallback micro-kernel (6×16 register tile).

use super::driver::Kernel;
use std::arch::x86_64::*;

pub(crate) struct Avx2;

const MR: usize = 6;
const NR: usize = 16;

impl Kernel for Avx2 {
    const MR: usize = MR;
    const NR: usize = NR;
    const KC: usize = 256;
    const MC: usize = 120;
    const NC: usize = 2048;

    unsafe fn micro(
        k: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        c_rs: usize,
        mr: usize,
        nr: usize,
        overwrite: bool,
    ) {
        // SAFETY: forwarded contract (only selected on AVX2+FMA CPUs).
        unsafe { micro(k, a, b, c, c_rs, mr, nr, overwrite) }
    }
}

#[target_feature(enable = "avx2,fma")]
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
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    let mut ap = a;
    let mut bp = b;
    // SAFETY: packed panels hold k*MR and k*NR floats; the C tile is mr×nr with stride c_rs.
    unsafe {
        for _ in 0..k {
            let b0 = _mm256_loadu_ps(bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ap.add(r));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
            ap = ap.add(MR);
            bp = bp.add(NR);
        }
        if mr == MR && nr == NR {
            for (r, row) in acc.iter().enumerate() {
                let cr = c.add(r * c_rs);
                if overwrite {
                    _mm256_storeu_ps(cr, row[0]);
                    _mm256_storeu_ps(cr.add(8), row[1]);
                } else {
                    _mm256_storeu_ps(cr, _mm256_add_ps(row[0], _mm256_loadu_ps(cr)));
                    _mm256_storeu_ps(cr.add(8), _mm256_add_ps(row[1], _mm256_loadu_ps(cr.add(8))));
                }
            }
        } else {
            let mut tile = [0.0f32; MR * NR];
            for (r, row) in acc.iter().enumerate() {
                _mm256_storeu_ps(tile.as_mut_ptr().add(r * NR), row[0]);
                _mm256_storeu_ps(tile.as_mut_ptr().add(r * NR + 8), row[1]);
            }
            for r in 0..mr {
                let cr = c.add(r * c_rs);
                for j in 0..nr {
                    let v = tile[r * NR + j];
                    *cr.add(j) = if overwrite { v } else { *cr.add(j) + v };
                }
            }
        }
    }
}

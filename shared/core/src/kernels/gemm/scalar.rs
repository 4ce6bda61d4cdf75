//! Portable micro-kernel (4×8 tile) for CPUs without AVX2.

use super::driver::Kernel;

pub(crate) struct Scalar;

const MR: usize = 4;
const NR: usize = 8;

impl Kernel for Scalar {
    const MR: usize = MR;
    const NR: usize = NR;
    const KC: usize = 256;
    const MC: usize = 64;
    const NC: usize = 1024;

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
        // SAFETY: packed panels hold k*MR and k*NR floats (kernel contract).
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(a, k * MR),
                std::slice::from_raw_parts(b, k * NR),
            )
        };
        let mut acc = [[0.0f32; NR]; MR];
        for (ak, bk) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
            for (row, &av) in acc.iter_mut().zip(ak) {
                for (x, &bv) in row.iter_mut().zip(bk) {
                    *x += av * bv;
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
}

//! AVX2+FMA fallback micro-kernel (6×16 register tile).

use super::driver::{Kernel, View};
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

    unsafe fn pack(src: View, lanes: usize, len: usize, dst: *mut f32, ld: usize) {
        // SAFETY: forwarded contract (only selected on AVX2+FMA CPUs).
        unsafe { pack(src, lanes, len, dst, ld) }
    }
}

/// Packing with AVX2: 8-wide copies when lanes are contiguous, 8×8 in-register transposes
/// when k is contiguous, the portable loop otherwise (and for ragged edges).
///
/// # Safety
/// See [`Kernel::pack`]; requires AVX2.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn pack(src: View, lanes: usize, len: usize, dst: *mut f32, ld: usize) {
    // SAFETY: caller guarantees the extents; full vectors are only used inside them.
    unsafe {
        if src.ls == 1 && lanes == ld && ld.is_multiple_of(8) {
            for kk in 0..len {
                let s = src.ptr.add(kk * src.ks);
                let d = dst.add(kk * ld);
                let mut l = 0;
                while l < ld {
                    _mm256_storeu_ps(d.add(l), _mm256_loadu_ps(s.add(l)));
                    l += 8;
                }
            }
        } else if src.ls == 1 && lanes == ld && ld == 6 {
            // The A panels of the 6×16 kernel: 4 + 2 floats per k-step.
            for kk in 0..len {
                let s = src.ptr.add(kk * src.ks);
                let d = dst.add(kk * 6);
                _mm_storeu_ps(d, _mm_loadu_ps(s));
                let two = (s.add(4) as *const u64).read_unaligned();
                (d.add(4) as *mut u64).write_unaligned(two);
            }
        } else if src.ks == 1 && len >= 8 {
            let body = len & !7;
            for g in (0..ld).step_by(8) {
                let rows = lanes.saturating_sub(g).min(8);
                let store = (ld - g).min(8);
                let sm = store_mask(store);
                let s = src.ptr.wrapping_add(g * src.ls);
                let mut kk = 0;
                while kk < body {
                    let mut r = [_mm256_setzero_ps(); 8];
                    for (i, ri) in r.iter_mut().enumerate().take(rows) {
                        *ri = _mm256_loadu_ps(s.add(i * src.ls + kk));
                    }
                    transpose8(&mut r);
                    for (j, rj) in r.iter().enumerate() {
                        let d = dst.add((kk + j) * ld + g);
                        if store == 8 {
                            _mm256_storeu_ps(d, *rj);
                        } else if ld == store && kk + j + 1 < len {
                            // One group and consecutive k-steps adjacent in dst: a full store
                            // spills into the next k-step, which is written right after.
                            // (Masked stores are microcoded and slow on AMD.)
                            _mm256_storeu_ps(d, *rj);
                        } else {
                            _mm256_maskstore_ps(d, sm, *rj);
                        }
                    }
                    kk += 8;
                }
            }
            if body < len {
                let tail = View {
                    ptr: src.ptr.add(body),
                    ..src
                };
                super::driver::pack_generic(tail, lanes, len - body, dst.add(body * ld), ld);
            }
        } else {
            super::driver::pack_generic(src, lanes, len, dst, ld);
        }
    }
}

/// Load/store mask of the first `n` (clamped to 8) lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn store_mask(n: usize) -> __m256i {
    let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), idx)
}

/// In-register 8×8 transpose.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn transpose8(r: &mut [__m256; 8]) {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xee>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xee>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xee>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xee>(t5, t7);
    r[0] = _mm256_permute2f128_ps::<0x20>(u0, u4);
    r[1] = _mm256_permute2f128_ps::<0x20>(u1, u5);
    r[2] = _mm256_permute2f128_ps::<0x20>(u2, u6);
    r[3] = _mm256_permute2f128_ps::<0x20>(u3, u7);
    r[4] = _mm256_permute2f128_ps::<0x31>(u0, u4);
    r[5] = _mm256_permute2f128_ps::<0x31>(u1, u5);
    r[6] = _mm256_permute2f128_ps::<0x31>(u2, u6);
    r[7] = _mm256_permute2f128_ps::<0x31>(u3, u7);
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
        // The C tile's rows are a row stride apart, beyond the reach of the hardware
        // prefetcher: ask for them now so that they arrive while the k loop runs.
        for r in 0..mr {
            let cr = c.add(r * c_rs) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(cr);
            _mm_prefetch::<_MM_HINT_T0>(cr.wrapping_add(60));
        }
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

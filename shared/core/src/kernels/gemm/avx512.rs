//! AVX-512 micro-kernel (MR×32 register tile) and transposing packers.

use super::driver::{Kernel, View};
use std::arch::x86_64::*;

pub(crate) struct Avx512;

const MR: usize = 12;

impl Kernel for Avx512 {
    const MR: usize = MR;
    const NR: usize = 32;
    const KC: usize = 384;
    const MC: usize = 240;
    const NC: usize = 3072;

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
        // SAFETY: forwarded contract (the driver only selects this kernel on AVX-512 CPUs).
        unsafe { micro::<MR>(k, a, b, c, c_rs, mr, nr, overwrite) }
    }

    unsafe fn pack(src: View, lanes: usize, len: usize, dst: *mut f32, ld: usize) {
        // SAFETY: forwarded contract.
        unsafe { pack(src, lanes, len, dst, ld) }
    }
}

#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<const R: usize>(
    k: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    c_rs: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let mut ap = a;
    let mut bp = b;
    // SAFETY: the packed panels hold k*R and k*32 floats (kernel contract).
    unsafe {
        // The C tile's rows are a row stride apart, beyond the reach of the hardware
        // prefetcher: ask for them now so that they arrive while the k loop runs.
        for r in 0..mr {
            let cr = c.add(r * c_rs) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(cr);
            _mm_prefetch::<_MM_HINT_T0>(cr.wrapping_add(124));
        }
        for _ in 0..k {
            let b0 = _mm512_loadu_ps(bp);
            let b1 = _mm512_loadu_ps(bp.add(16));
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(r));
                row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                row[1] = _mm512_fmadd_ps(av, b1, row[1]);
            }
            ap = ap.add(R);
            bp = bp.add(32);
        }
        if mr == R && nr == 32 {
            for (r, row) in acc.iter().enumerate() {
                let cr = c.add(r * c_rs);
                if overwrite {
                    _mm512_storeu_ps(cr, row[0]);
                    _mm512_storeu_ps(cr.add(16), row[1]);
                } else {
                    _mm512_storeu_ps(cr, _mm512_add_ps(row[0], _mm512_loadu_ps(cr)));
                    _mm512_storeu_ps(
                        cr.add(16),
                        _mm512_add_ps(row[1], _mm512_loadu_ps(cr.add(16))),
                    );
                }
            }
        } else {
            let m0 = lane_mask(nr);
            let m1 = lane_mask(nr.saturating_sub(16));
            for (r, row) in acc.iter().enumerate().take(mr) {
                let cr = c.add(r * c_rs);
                if overwrite {
                    _mm512_mask_storeu_ps(cr, m0, row[0]);
                    _mm512_mask_storeu_ps(cr.wrapping_add(16), m1, row[1]);
                } else {
                    let c0 = _mm512_maskz_loadu_ps(m0, cr);
                    let c1 = _mm512_maskz_loadu_ps(m1, cr.wrapping_add(16));
                    _mm512_mask_storeu_ps(cr, m0, _mm512_add_ps(row[0], c0));
                    _mm512_mask_storeu_ps(cr.wrapping_add(16), m1, _mm512_add_ps(row[1], c1));
                }
            }
        }
    }
}

/// Mask of the first `n` (clamped to 16) lanes.
#[inline(always)]
pub(crate) fn lane_mask(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// Packing with AVX-512: plain (masked) copies when lanes are contiguous, 16×16 in-register
/// transposes when k is contiguous, scalar otherwise.
///
/// # Safety
/// See [`Kernel::pack`]; requires AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn pack(src: View, lanes: usize, len: usize, dst: *mut f32, ld: usize) {
    // SAFETY: caller guarantees the extents.
    unsafe {
        if src.ls == 1 {
            let groups = ld.div_ceil(16);
            for kk in 0..len {
                let s = src.ptr.add(kk * src.ks);
                let d = dst.add(kk * ld);
                for g in 0..groups {
                    let lm = lane_mask(lanes.saturating_sub(g * 16));
                    let sm = lane_mask(ld - g * 16);
                    let v = _mm512_maskz_loadu_ps(lm, s.wrapping_add(g * 16));
                    _mm512_mask_storeu_ps(d.add(g * 16), sm, v);
                }
            }
        } else if src.ks == 1 {
            let mut g = 0;
            while g * 16 < ld {
                let rows = lanes.saturating_sub(g * 16).min(16);
                let store = (ld - g * 16).min(16);
                transpose_pack(
                    src.ptr.wrapping_add(g * 16 * src.ls),
                    src.ls,
                    rows,
                    len,
                    dst.add(g * 16),
                    ld,
                    store,
                );
                g += 1;
            }
        } else {
            super::driver::pack_generic(src, lanes, len, dst, ld);
        }
    }
}

/// dst[kk*ld + r] = src[r*rs + kk] for r < rows (zeros for rows..store), kk < len.
#[target_feature(enable = "avx512f")]
unsafe fn transpose_pack(
    src: *const f32,
    rs: usize,
    rows: usize,
    len: usize,
    dst: *mut f32,
    ld: usize,
    store: usize,
) {
    let sm = lane_mask(store);
    let mut kk = 0;
    // SAFETY: reads stay within rows×len of the source, writes within len×ld of dst.
    unsafe {
        while kk < len {
            let w = (len - kk).min(16);
            let lm = lane_mask(w);
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, ri) in r.iter_mut().enumerate().take(rows) {
                *ri = _mm512_maskz_loadu_ps(lm, src.add(i * rs + kk));
            }
            transpose16(&mut r);
            for (j, rj) in r.iter().enumerate().take(w) {
                _mm512_mask_storeu_ps(dst.add((kk + j) * ld), sm, *rj);
            }
            kk += 16;
        }
    }
}

/// In-register 16×16 transpose.
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose16(r: &mut [__m512; 16]) {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        let (x0, x1) = (_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2]));
        let (y0, y1) = (
            _mm512_castps_pd(t[4 * i + 1]),
            _mm512_castps_pd(t[4 * i + 3]),
        );
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(x0, x1));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(x0, x1));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(y0, y1));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(y0, y1));
    }
    // r[4q + s] now holds, for each 128-bit lane L, column (4L + s) of rows 4q..4q+4.
    for q in 0..2 {
        for s in 0..4 {
            let (x, y) = (r[8 * q + s], r[8 * q + 4 + s]);
            t[8 * q + s] = _mm512_shuffle_f32x4::<0x88>(x, y);
            t[8 * q + 4 + s] = _mm512_shuffle_f32x4::<0xdd>(x, y);
        }
    }
    for s in 0..8 {
        r[s] = _mm512_shuffle_f32x4::<0x88>(t[s], t[8 + s]);
        r[8 + s] = _mm512_shuffle_f32x4::<0xdd>(t[s], t[8 + s]);
    }
}

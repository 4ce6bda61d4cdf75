//! AVX512-BF16 kernel: 12×32 register tile of `vdpbf16ps`, activations rounded to bf16 with
//! `vcvtne2ps2bf16` (round to nearest even) and transposed into pair panels while packing.

use super::Kernel;
use std::arch::x86_64::*;

pub(super) struct Avx512Bf16;

const MR: usize = 12;
const NR: usize = 32;

impl Kernel for Avx512Bf16 {
    const MR: usize = MR;
    const NR: usize = NR;
    const MC: usize = 192;

    unsafe fn pack_a(
        a: *const f32,
        lda: usize,
        rows: usize,
        klen: usize,
        kp: usize,
        dst: *mut u32,
    ) {
        // SAFETY: forwarded contract (the path is only used on AVX512-BF16 CPUs).
        unsafe { pack_a(a, lda, rows, klen, kp, dst) }
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
        // A tile of few rows (generation's single token) multiplies only those rows: the
        // full 12-row tile made a 1-row product compute-bound at a twelfth of its useful rate.
        // SAFETY: forwarded contract.
        unsafe {
            match mr {
                1 => micro::<1>(kp, a, b, c, c_rs, mr, nr, overwrite),
                2 => micro::<2>(kp, a, b, c, c_rs, mr, nr, overwrite),
                3 | 4 => micro::<4>(kp, a, b, c, c_rs, mr, nr, overwrite),
                _ => micro::<MR>(kp, a, b, c, c_rs, mr, nr, overwrite),
            }
        }
    }
}

/// Mask of the first `n` (clamped to 16) lanes.
#[inline(always)]
fn lane_mask(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

#[inline(always)]
fn as_bh(v: __m512i) -> __m512bh {
    // SAFETY: both are plain 512-bit vectors.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

#[inline(always)]
fn bh_as_ps(v: __m512bh) -> __m512 {
    // SAFETY: both are plain 512-bit vectors.
    unsafe { std::mem::transmute::<__m512bh, __m512>(v) }
}

#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<const R: usize>(
    kp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    c_rs: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
) {
    // The first R ≥ mr rows of the MR-row panel.
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let mut ap = a;
    let mut bp = b;
    // SAFETY: the packed panels hold kp*MR and kp*NR words (kernel contract).
    unsafe {
        for _ in 0..kp {
            let b0 = as_bh(_mm512_loadu_epi32(bp as *const i32));
            let b1 = as_bh(_mm512_loadu_epi32(bp.add(16) as *const i32));
            for (r, row) in acc.iter_mut().enumerate() {
                let av = as_bh(_mm512_set1_epi32(*ap.add(r) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                row[1] = _mm512_dpbf16_ps(row[1], av, b1);
            }
            ap = ap.add(MR);
            bp = bp.add(NR);
        }
        if mr == R && nr == NR {
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

/// `dst[p*MR + r] = bf16(a[r][2p]) | bf16(a[r][2p+1]) << 16` for p < kp, r < MR (zeros past
/// `rows` and `klen`): 32 floats of up to 16 rows are loaded and rounded into 16 pair lanes
/// per row, then a 16×16 transpose turns rows into pair panels.
///
/// # Safety
/// `a` covers `rows ≤ 12` rows of `klen ≤ 2·kp` floats (row stride `lda`), `dst` holds
/// `kp*MR` words; requires AVX512F and AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_a(a: *const f32, lda: usize, rows: usize, klen: usize, kp: usize, dst: *mut u32) {
    let store = lane_mask(MR);
    let mut g = 0;
    // SAFETY: loads are masked to the `klen` valid floats of the `rows` rows; stores write
    // pairs < kp, lanes < MR.
    unsafe {
        while g * 16 < kp {
            let e0 = g * 32;
            let valid = klen.saturating_sub(e0);
            let (m0, m1) = (lane_mask(valid), lane_mask(valid.saturating_sub(16)));
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, ri) in r.iter_mut().enumerate().take(rows) {
                let src = a.wrapping_add(i * lda + e0);
                let lo = _mm512_maskz_loadu_ps(m0, src);
                let hi = _mm512_maskz_loadu_ps(m1, src.wrapping_add(16));
                // Low 16 bf16 from `lo` (elements e0..e0+16), high 16 from `hi`: lane j holds
                // the pair (2j, 2j+1) with the even element in its low half.
                *ri = bh_as_ps(_mm512_cvtne2ps_pbh(hi, lo));
            }
            transpose16(&mut r);
            for (j, rj) in r.iter().enumerate().take((kp - g * 16).min(16)) {
                _mm512_mask_storeu_ps(dst.add((g * 16 + j) * MR) as *mut f32, store, *rj);
            }
            g += 1;
        }
    }
}

/// In-register 16×16 transpose of 32-bit lanes.
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

/// `dst[p*nr + lane] = bf16(src[lane][2p]) | bf16(src[lane][2p+1]) << 16` for p < kp and
/// lane < rows (weight rows, row stride `ld`, `klen ≤ 2·kp` floats each; zeros past them), a
/// weight panel of the nt layout. Rounds exactly as `f32_to_bf16_bits` (ties to even,
/// subnormals kept, NaN quieted), so panels equal the portable packing bit for bit; 16 rows
/// at a time, 16 pairs per row turned into 16 pair rows by a 16×16 transpose. Lanes from
/// `rows` to `nr` are left as they are (the caller zero fills the panel).
///
/// # Safety
/// `src` covers `rows ≤ nr` rows of `klen` floats, `dst` holds `kp*nr` words, `nr` is a
/// multiple of 16; requires AVX512F and AVX512BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn pack_b_rows(
    src: *const f32,
    ld: usize,
    rows: usize,
    klen: usize,
    kp: usize,
    dst: *mut u32,
    nr: usize,
) {
    // Words 0, 2, …, 62 of two vectors of u32 lanes: the low halves, i.e. the bf16 values.
    let evens: [i16; 32] = std::array::from_fn(|j| 2 * j as i16);
    // SAFETY: loads are masked to the `klen` valid floats of the `rows` rows; stores write
    // pairs < kp, lanes < nr.
    unsafe {
        let idx = _mm512_loadu_si512(evens.as_ptr() as *const __m512i);
        for r0 in (0..rows).step_by(16) {
            let hr = (rows - r0).min(16);
            for g in 0..kp.div_ceil(16) {
                let e0 = g * 32;
                let valid = klen.saturating_sub(e0);
                let (m0, m1) = (lane_mask(valid), lane_mask(valid.saturating_sub(16)));
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, ri) in r.iter_mut().enumerate().take(hr) {
                    let s = src.wrapping_add((r0 + i) * ld + e0);
                    let lo = round_bf16_lanes(_mm512_maskz_loadu_ps(m0, s));
                    let hi = round_bf16_lanes(_mm512_maskz_loadu_ps(m1, s.wrapping_add(16)));
                    *ri = _mm512_castsi512_ps(_mm512_permutex2var_epi16(lo, idx, hi));
                }
                transpose16(&mut r);
                for (j, rj) in r.iter().enumerate().take((kp - g * 16).min(16)) {
                    _mm512_storeu_ps(dst.add((g * 16 + j) * nr + r0) as *mut f32, *rj);
                }
            }
        }
    }
}

/// bf16 bits of 16 floats in the low halves of u32 lanes, as `f32_to_bf16_bits` rounds.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn round_bf16_lanes(f: __m512) -> __m512i {
    let u = _mm512_castps_si512(f);
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(u), _mm512_set1_epi32(1));
    let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd);
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(u, bias));
    let quieted = _mm512_or_si512(_mm512_srli_epi32::<16>(u), _mm512_set1_epi32(0x0040));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(f, f);
    _mm512_mask_blend_epi32(nan, rounded, quieted)
}

/// One pair row of the nn layout into every panel: `dst[q·panel + l] = bf16(lo[c]) |
/// bf16(hi[c]) << 16` for column c = q·nr + l < `npad` (zeros from `lo.len()` on, and for the
/// high halves when `hi` is empty), rounded as `f32_to_bf16_bits`.
///
/// # Safety
/// `dst` addresses pair p of panel 0 and every panel `q < npad / nr` has `nr` words at
/// `dst + q·panel`; `hi` is empty or as long as `lo`; `nr` is a multiple of 16 and divides
/// `npad`; requires AVX512F and AVX512BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn pair_row_into_panels(
    lo: &[f32],
    hi: &[f32],
    npad: usize,
    nr: usize,
    dst: *mut u32,
    panel: usize,
) {
    // SAFETY: loads are masked to the rows' lengths; stores follow the caller contract.
    unsafe {
        for c0 in (0..npad).step_by(16) {
            let m = lane_mask(lo.len().saturating_sub(c0));
            let l = round_bf16_lanes(_mm512_maskz_loadu_ps(m, lo.as_ptr().wrapping_add(c0)));
            let mh = lane_mask(hi.len().saturating_sub(c0));
            let h = round_bf16_lanes(_mm512_maskz_loadu_ps(mh, hi.as_ptr().wrapping_add(c0)));
            let pair = _mm512_or_si512(l, _mm512_slli_epi32::<16>(h));
            let at = dst.add(c0 / nr * panel + c0 % nr);
            _mm512_storeu_si512(at as *mut __m512i, pair);
        }
    }
}

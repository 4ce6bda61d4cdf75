//! AVX2+FMA version of the 4-bit decode of [`super::q4`], for CPUs
//! without AVX-512.

use super::q4::Q4Weight;
use std::arch::x86_64::*;

/// Decode 16 elements at a time (`start` and `out.len()` multiples of 16, blocks multiples of
/// 16, so each group of 16 shares one scale): `code[q]·absmax[block]`, bit-exact with the
/// portable decode (one rounding, the product).
///
/// # Safety
/// AVX2 and FMA; the elements lie inside the weight (checked by the slice indexing).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn decode16(w: &Q4Weight, start: usize, out: &mut [f32]) {
    let bytes = &w.packed[start / 2..(start + out.len()) / 2];
    // SAFETY: every load reads 8 bytes inside `bytes`, every store 16 floats inside `out`,
    // and the code table has 16 entries.
    unsafe {
        let code_lo = _mm256_loadu_ps(w.code.as_ptr());
        let code_hi = _mm256_loadu_ps(w.code.as_ptr().add(8));
        let fifteen = _mm256_set1_epi32(15);
        let seven = _mm256_set1_epi32(7);
        // The 16-entry table as two 8-entry permutes, picked by bit 3 of the index.
        let lookup = |q: __m256i| {
            let lo = _mm256_permutevar8x32_ps(code_lo, q);
            let hi = _mm256_permutevar8x32_ps(code_hi, q);
            _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(q, seven)))
        };
        // The block of each group, stepped instead of divided (a division per group cost
        // as much as the rest of the group).
        let (mut block, mut offset) = (start / w.blocksize, start % w.blocksize);
        for (o, b) in out.chunks_exact_mut(16).zip(bytes.chunks_exact(8)) {
            let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(b.as_ptr() as *const __m128i));
            // Even elements sit in the high nibble, odd ones in the low nibble.
            let even = lookup(_mm256_srli_epi32::<4>(v));
            let odd = lookup(_mm256_and_si256(v, fifteen));
            let s = _mm256_set1_ps(w.absmax[block]);
            offset += 16;
            if offset == w.blocksize {
                (block, offset) = (block + 1, 0);
            }
            // unpack interleaves within 128-bit halves: [e0 o0 e1 o1 | e4 o4 e5 o5] and
            // [e2 o2 e3 o3 | e6 o6 e7 o7]; the cross-half permutes restore the order.
            let a = _mm256_unpacklo_ps(even, odd);
            let c = _mm256_unpackhi_ps(even, odd);
            let o0 = _mm256_permute2f128_ps::<0x20>(a, c);
            let o1 = _mm256_permute2f128_ps::<0x31>(a, c);
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_mul_ps(o0, s));
            _mm256_storeu_ps(o.as_mut_ptr().add(8), _mm256_mul_ps(o1, s));
        }
    }
}

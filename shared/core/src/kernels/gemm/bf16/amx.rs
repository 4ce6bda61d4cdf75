//! AMX kernel: a 32×32 block of C held in four 16×16 f32 tiles, updated by `tdpbf16ps` over
//! steps of 16 bf16 pairs (two A tiles of 16 rows × 32 bf16, two B tiles of 16 pairs × 16
//! lanes read straight from the packed weight panels with a 128-byte stride).
//!
//! Rust has no stable AMX intrinsics, so the tile instructions are inline assembly; the
//! process asks Linux for the AMX tile-data state once (`arch_prctl(ARCH_REQ_XCOMP_PERM)`)
//! before the path is reported available.

use super::{Kernel, KSTEP};
use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

pub(super) struct Amx;

const MR: usize = 32;
const NR: usize = 32;

/// Whether the CPU has AMX-TILE and AMX-BF16 and the kernel lets this process use them
/// (asked once; the permission covers every thread of the process).
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // SAFETY: CPUID leaf 7 exists on every x86-64 CPU with AVX-512 (checked by the
        // caller first); the syscall only changes this process's permitted xsave features.
        unsafe {
            if __get_cpuid_max(0).0 < 7 {
                return false;
            }
            let edx = __cpuid_count(7, 0).edx;
            let (amx_bf16, amx_tile) = (edx & (1 << 22) != 0, edx & (1 << 24) != 0);
            amx_bf16 && amx_tile && request_tile_permission()
        }
    })
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`; true when granted.
///
/// # Safety
/// Linux x86-64 only.
unsafe fn request_tile_permission() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain syscall; rcx and r11 are clobbered by `syscall`.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

/// The 64-byte tile configuration: palette 1, tiles 0–7 all 16 rows × 64 bytes
/// (tmm0–3: C, tmm4–5: A, tmm6–7: B).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

static CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Words of one A tile step: 32 rows × 16 pairs.
const A_STEP: usize = MR * KSTEP;

impl Kernel for Amx {
    const MR: usize = MR;
    const NR: usize = NR;
    const MC: usize = 256;

    unsafe fn pack_a(
        a: *const f32,
        lda: usize,
        rows: usize,
        klen: usize,
        kp: usize,
        dst: *mut u32,
    ) {
        // SAFETY: forwarded contract (the path needs AVX512-BF16, checked by `available`).
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
        // SAFETY: forwarded contract; `begin` loaded the tile configuration on this thread.
        unsafe { micro(kp, a, b, c, c_rs, mr, nr, overwrite) }
    }

    unsafe fn begin() {
        // SAFETY: AMX is available and permitted (checked before the path is used).
        unsafe {
            asm!("ldtilecfg [{cfg}]", cfg = in(reg) &CONFIG as *const TileConfig, options(nostack));
        }
    }

    unsafe fn end() {
        // SAFETY: returns the tiles to their initial state.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// A tile-sized scratch block for partial C tiles.
#[repr(C, align(64))]
struct Block([f32; MR * NR]);

/// C[mr×nr] (+)= A·B over `kp` pairs (`⌈kp/16⌉` tile steps; the panels are zero padded).
///
/// # Safety
/// `a` holds `⌈kp/16⌉` steps of [`A_STEP`] words, `b` a panel of `⌈kp/16⌉·16 × NR` words; `c`
/// addresses an `mr×nr` tile with row stride `c_rs`; the tile configuration is loaded.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
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
    let steps = kp.div_ceil(KSTEP);
    let direct = mr == MR && nr == NR;
    let cs = c_rs * 4;
    // SAFETY: tile loads and stores stay inside the C tile (direct) or the scratch block; the
    // loop reads `steps` A steps and B rows inside the panels (caller contract).
    unsafe {
        if direct && !overwrite {
            asm!(
                "tileloadd tmm0, [{c} + {s}*1]",
                "tileloadd tmm1, [{c} + {s}*1 + 64]",
                "tileloadd tmm2, [{c2} + {s}*1]",
                "tileloadd tmm3, [{c2} + {s}*1 + 64]",
                c = in(reg) c,
                c2 = in(reg) c.add(16 * c_rs),
                s = in(reg) cs,
                options(nostack),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        asm!(
            "2:",
            "tileloadd tmm4, [{a} + {sa}*1]",
            "tileloadd tmm6, [{b} + {sb}*1]",
            "tileloadd tmm5, [{a} + {sa}*1 + 1024]",
            "tileloadd tmm7, [{b} + {sb}*1 + 64]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, 2048",
            "add {b}, 2048",
            "dec {n}",
            "jnz 2b",
            a = inout(reg) a => _,
            b = inout(reg) b => _,
            n = inout(reg) steps => _,
            sa = in(reg) 64usize,
            sb = in(reg) NR * 4,
            options(nostack),
        );
        if direct {
            asm!(
                "tilestored [{c} + {s}*1], tmm0",
                "tilestored [{c} + {s}*1 + 64], tmm1",
                "tilestored [{c2} + {s}*1], tmm2",
                "tilestored [{c2} + {s}*1 + 64], tmm3",
                c = in(reg) c,
                c2 = in(reg) c.add(16 * c_rs),
                s = in(reg) cs,
                options(nostack),
            );
            return;
        }
        let mut blk = Block([0.0; MR * NR]);
        let t = blk.0.as_mut_ptr();
        asm!(
            "tilestored [{t} + {s}*1], tmm0",
            "tilestored [{t} + {s}*1 + 64], tmm1",
            "tilestored [{t2} + {s}*1], tmm2",
            "tilestored [{t2} + {s}*1 + 64], tmm3",
            t = in(reg) t,
            t2 = in(reg) t.add(16 * NR),
            s = in(reg) NR * 4,
            options(nostack),
        );
        let m0 = lane_mask(nr);
        let m1 = lane_mask(nr.saturating_sub(16));
        for r in 0..mr {
            let (src, cr) = (t.add(r * NR), c.add(r * c_rs));
            let (v0, v1) = (_mm512_load_ps(src), _mm512_load_ps(src.add(16)));
            if overwrite {
                _mm512_mask_storeu_ps(cr, m0, v0);
                _mm512_mask_storeu_ps(cr.wrapping_add(16), m1, v1);
            } else {
                let c0 = _mm512_maskz_loadu_ps(m0, cr);
                let c1 = _mm512_maskz_loadu_ps(m1, cr.wrapping_add(16));
                _mm512_mask_storeu_ps(cr, m0, _mm512_add_ps(v0, c0));
                _mm512_mask_storeu_ps(cr.wrapping_add(16), m1, _mm512_add_ps(v1, c1));
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

/// Pack up to 32 rows of f32 activations as AMX A tiles: step `s` (16 pairs = 32 k elements)
/// holds rows 0..32 of 64 bytes each (`dst[s*512 + r*16 + j]` = pair j of the step, even
/// element in the low half), zeros past `rows` and `klen`.
///
/// # Safety
/// `a` covers `rows ≤ 32` rows of `klen ≤ 2·kp` floats (row stride `lda`); `dst` holds
/// `⌈kp/16⌉·512` words; requires AVX512F and AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_a(a: *const f32, lda: usize, rows: usize, klen: usize, kp: usize, dst: *mut u32) {
    let steps = kp.div_ceil(KSTEP);
    // SAFETY: loads are masked to the valid floats of the `rows` rows; stores stay inside the
    // `steps` tile steps of dst.
    unsafe {
        for r in 0..MR {
            let row = a.wrapping_add(r * lda);
            for s in 0..steps {
                let d = dst.add(s * A_STEP + r * KSTEP) as *mut __m512i;
                if r >= rows {
                    _mm512_storeu_si512(d, _mm512_setzero_si512());
                    continue;
                }
                let e0 = s * 32;
                let valid = klen.saturating_sub(e0);
                let lo = _mm512_maskz_loadu_ps(lane_mask(valid), row.wrapping_add(e0));
                let hi = _mm512_maskz_loadu_ps(
                    lane_mask(valid.saturating_sub(16)),
                    row.wrapping_add(e0 + 16),
                );
                let v: __m512i =
                    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(d, v);
            }
        }
    }
}

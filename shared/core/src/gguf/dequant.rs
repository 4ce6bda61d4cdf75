//! Dequantization of ggml block formats to f32, following ggml's reference
//! `dequantize_row_*` functions (ggml-quants.c) operation by operation, so that the results are
//! bit-identical to the reference (and to gguf-py's `gguf.quants.dequantize`).

// The block kernels index several arrays with one counter, as ggml's C code does.
#![allow(clippy::needless_range_loop)]

use super::reader::GgmlType;
use half::{bf16, f16};
use rayon::prelude::*;

/// Types this module can dequantize.
pub const SUPPORTED: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::F64,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::Q8K,
];

type BlockFn = fn(&[u8], &mut [f32]);

fn block_fn(ty: GgmlType) -> Option<BlockFn> {
    use GgmlType::*;
    Some(match ty {
        F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        F16 => |b, y| y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32(),
        BF16 => |b, y| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        F64 => |b, y| y[0] = f64::from_le_bytes(b[..8].try_into().unwrap()) as f32,
        Q4_0 => q4_0,
        Q4_1 => q4_1,
        Q5_0 => q5_0,
        Q5_1 => q5_1,
        Q8_0 => q8_0,
        Q2K => q2_k,
        Q3K => q3_k,
        Q4K => q4_k,
        Q5K => q5_k,
        Q6K => q6_k,
        Q8K => q8_k,
        _ => return None,
    })
}

/// Dequantize `n` values of type `ty` stored in `data`.
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let f = block_fn(ty).ok_or_else(|| {
        format!(
            "tensor type {} cannot be dequantized (supported: {})",
            ty.name(),
            SUPPORTED
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let (bs, bb) = ty.block();
    if !n.is_multiple_of(bs) || data.len() != n / bs * bb {
        return Err(format!(
            "{} bytes of {} data do not hold {n} values",
            data.len(),
            ty.name()
        ));
    }
    let mut out = vec![0f32; n];
    // Chunks of whole blocks, dequantized in parallel.
    let blocks_per_chunk = (16384 / bs).max(1);
    out.par_chunks_mut(blocks_per_chunk * bs)
        .zip(data.par_chunks(blocks_per_chunk * bb))
        .for_each(|(y, x)| {
            for (yb, xb) in y.chunks_exact_mut(bs).zip(x.chunks_exact(bb)) {
                f(xb, yb);
            }
        });
    Ok(out)
}

#[inline]
fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as i32 - 8;
        let x1 = (qs[j] >> 4) as i32 - 8;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    let m = h(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as f32;
        let x1 = (qs[j] >> 4) as f32;
        y[j] = x0 * d + m;
        y[j + 16] = x1 * d + m;
    }
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = ((qs[j] & 0x0F) | xh0) as i32 - 16;
        let x1 = ((qs[j] >> 4) | xh1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    let m = h(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = (qs[j] & 0x0F) | xh0;
        let x1 = (qs[j] >> 4) | xh1;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

fn q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for j in 0..256 {
        y[j] = (b[4 + j] as i8) as f32 * d;
    }
}

fn q2_k(b: &[u8], y: &mut [f32]) {
    // block_q2_K: scales[16], qs[64], d, dmin
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = h(b, 80);
    let min = h(b, 82);
    let mut is = 0;
    let mut yi = 0;
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        let mut shift = 0;
        for _ in 0..4 {
            let sc = scales[is];
            is += 1;
            let dl = d * (sc & 0xF) as f32;
            let ml = min * (sc >> 4) as f32;
            for l in 0..16 {
                y[yi] = dl * ((q[l] >> shift) & 3) as i8 as f32 - ml;
                yi += 1;
            }
            let sc = scales[is];
            is += 1;
            let dl = d * (sc & 0xF) as f32;
            let ml = min * (sc >> 4) as f32;
            for l in 0..16 {
                y[yi] = dl * ((q[l + 16] >> shift) & 3) as i8 as f32 - ml;
                yi += 1;
            }
            shift += 2;
        }
    }
}

fn q3_k(b: &[u8], y: &mut [f32]) {
    // block_q3_K: hmask[32], qs[64], scales[12], d
    let hm = &b[0..32];
    let qs = &b[32..96];
    let sc_raw = &b[96..108];
    let d_all = h(b, 108);
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let mut aux = [
        u32::from_le_bytes(sc_raw[0..4].try_into().unwrap()),
        u32::from_le_bytes(sc_raw[4..8].try_into().unwrap()),
        u32::from_le_bytes(sc_raw[8..12].try_into().unwrap()),
        0u32,
    ];
    let tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4);
    aux[3] = ((aux[1] >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4);
    aux[0] = (aux[0] & KMASK2) | ((tmp & KMASK1) << 4);
    aux[1] = (aux[1] & KMASK2) | (((tmp >> 2) & KMASK1) << 4);
    let mut scales = [0i8; 16];
    for (i, a) in aux.iter().enumerate() {
        for (k, byte) in a.to_le_bytes().iter().enumerate() {
            scales[i * 4 + k] = *byte as i8;
        }
    }
    let mut m: u8 = 1;
    let mut is = 0;
    let mut yi = 0;
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        let mut shift = 0;
        for _ in 0..4 {
            let dl = d_all * (scales[is] as i32 - 32) as f32;
            is += 1;
            for l in 0..16 {
                let v = ((q[l] >> shift) & 3) as i8 - if hm[l] & m != 0 { 0 } else { 4 };
                y[yi] = dl * v as f32;
                yi += 1;
            }
            let dl = d_all * (scales[is] as i32 - 32) as f32;
            is += 1;
            for l in 0..16 {
                let v = ((q[l + 16] >> shift) & 3) as i8 - if hm[l + 16] & m != 0 { 0 } else { 4 };
                y[yi] = dl * v as f32;
                yi += 1;
            }
            shift += 2;
            m <<= 1;
        }
    }
}

#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    // block_q4_K: d, dmin, scales[12], qs[128]
    let d = h(b, 0);
    let min = h(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    let mut is = 0;
    let mut yi = 0;
    for j in 0..4 {
        let q = &qs[j * 32..j * 32 + 32];
        let (sc, m) = scale_min_k4(is, scales);
        let d1 = d * sc as f32;
        let m1 = min * m as f32;
        let (sc, m) = scale_min_k4(is + 1, scales);
        let d2 = d * sc as f32;
        let m2 = min * m as f32;
        for l in 0..32 {
            y[yi + l] = d1 * (q[l] & 0xF) as f32 - m1;
        }
        for l in 0..32 {
            y[yi + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
        yi += 64;
        is += 2;
    }
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    // block_q5_K: d, dmin, scales[12], qh[32], qs[128]
    let d = h(b, 0);
    let min = h(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    let mut is = 0;
    let mut yi = 0;
    let (mut u1, mut u2) = (1u8, 2u8);
    for j in 0..4 {
        let ql = &qs[j * 32..j * 32 + 32];
        let (sc, m) = scale_min_k4(is, scales);
        let d1 = d * sc as f32;
        let m1 = min * m as f32;
        let (sc, m) = scale_min_k4(is + 1, scales);
        let d2 = d * sc as f32;
        let m2 = min * m as f32;
        for l in 0..32 {
            let hb = if qh[l] & u1 != 0 { 16 } else { 0 };
            y[yi + l] = d1 * ((ql[l] & 0xF) + hb) as f32 - m1;
        }
        for l in 0..32 {
            let hb = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[yi + 32 + l] = d2 * ((ql[l] >> 4) + hb) as f32 - m2;
        }
        yi += 64;
        is += 2;
        u1 <<= 2;
        u2 <<= 2;
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    // block_q6_K: ql[128], qh[64], scales[16] (int8), d
    let d = h(b, 208);
    for n in 0..2 {
        let ql = &b[n * 64..n * 64 + 64];
        let qh = &b[128 + n * 32..128 + n * 32 + 32];
        let sc = &b[192 + n * 8..192 + n * 8 + 8];
        let yb = &mut y[n * 128..n * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            yb[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            yb[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            yb[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            yb[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn q8_0_block() {
        let mut b = f16b(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, (i as f32 - 16.0) * 0.5);
        }
    }

    #[test]
    fn q4_0_and_q4_1_blocks() {
        let mut qs = [0u8; 16];
        for (j, q) in qs.iter_mut().enumerate() {
            *q = (j as u8) | (((15 - j) as u8) << 4);
        }
        let mut b = f16b(2.0).to_vec();
        b.extend(qs);
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 2.0);
            assert_eq!(y[j + 16], ((15 - j) as f32 - 8.0) * 2.0);
        }
        let mut b = f16b(0.25).to_vec();
        b.extend(f16b(-1.0));
        b.extend(qs);
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.25 - 1.0);
            assert_eq!(y[j + 16], (15 - j) as f32 * 0.25 - 1.0);
        }
    }

    #[test]
    fn q5_blocks_use_high_bits() {
        // All low nibbles 0, all high bits set: q = 16 for every weight.
        let mut b = f16b(1.0).to_vec();
        b.extend(u32::MAX.to_le_bytes());
        b.extend([0u8; 16]);
        let y = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
        assert!(y.iter().all(|&v| v == 0.0));
        let mut b = f16b(1.0).to_vec();
        b.extend(f16b(0.5));
        b.extend(0x0000_0001u32.to_le_bytes()); // only weight 0 gets the high bit
        b.extend([0x11u8; 16]);
        let y = dequantize(GgmlType::Q5_1, &b, 32).unwrap();
        assert_eq!(y[0], 17.5);
        assert_eq!(y[1], 1.5);
        assert_eq!(y[16], 1.5);
    }

    #[test]
    fn q4_k_block() {
        // d = 1, dmin = 0.5, scales: sub-block j has scale j+1 and min j (j < 4 use low bits).
        let mut b = f16b(1.0).to_vec();
        b.extend(f16b(0.5));
        let mut sc = [0u8; 12];
        for j in 0..4 {
            sc[j] = j as u8 + 1;
            sc[j + 4] = j as u8;
        }
        // sub-blocks 4..7: scale 5..8 in low nibbles of bytes 8..11, min 4..7 in high nibbles.
        for j in 0..4 {
            sc[8 + j] = (j as u8 + 5) | ((j as u8 + 4) << 4);
        }
        b.extend(sc);
        b.extend([0x21u8; 128]); // low nibble 1, high nibble 2
        let y = dequantize(GgmlType::Q4K, &b, 256).unwrap();
        for sub in 0..8 {
            let q = if sub % 2 == 0 { 1.0 } else { 2.0 };
            let expect = (sub as f32 + 1.0) * q - 0.5 * sub as f32;
            for l in 0..32 {
                assert_eq!(y[sub * 32 + l], expect, "sub-block {sub}");
            }
        }
    }

    #[test]
    fn q6_k_block() {
        let mut b = vec![0u8; 210];
        // ql all 0x00, qh all 0b10 (bits 4-5 of each 6-bit q = 2 → q = 32 - 32 = 0) except
        // make weight 0: ql low nibble 5, qh bits 0-1 = 2 → q = 5 | 32 = 37 → 5.
        for v in &mut b[128..192] {
            *v = 0b1010_1010;
        }
        b[0] = 5;
        for s in &mut b[192..208] {
            *s = 3;
        }
        b[208..210].copy_from_slice(&f16b(0.5));
        let y = dequantize(GgmlType::Q6K, &b, 256).unwrap();
        assert_eq!(y[0], 0.5 * 3.0 * 5.0);
        assert!(y[1..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn wrong_length_and_unsupported_type() {
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 33], 32).is_err());
        let e = dequantize(GgmlType::Iq2Xxs, &[0u8; 66], 256).unwrap_err();
        assert!(e.contains("IQ2_XXS cannot be dequantized"), "{e}");
    }

    /// Every supported type against gguf-py's reference dequantization
    /// (tests/fixtures/gguf/blocks.gguf, written by tests/fixtures/generate_gguf.py).
    #[test]
    fn matches_gguf_py_reference() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf");
        let g = crate::gguf::reader::GgufFile::open(&dir.join("blocks.gguf")).unwrap();
        let r = crate::io::safetensors_file::SafetensorsFile::open(
            &dir.join("blocks.reference.safetensors"),
        )
        .unwrap();
        let mut seen = 0;
        for t in &g.tensors {
            let got = g.dequantize(t).unwrap();
            let want = r.f32_checked(&t.name, &t.shape()).unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits(),
                    "{} [{i}]: {a} vs reference {b}",
                    t.name
                );
            }
            seen += 1;
        }
        assert!(seen >= 12, "only {seen} tensors in blocks.gguf");
    }
}

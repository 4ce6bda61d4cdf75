//! The code books of bitsandbytes' 4-bit types (NF4, FP4) and of its 8-bit signed dynamic map,
//! and the decision boundaries its CPU quantizer uses for them.
//!
//! All tables are float32 bit patterns copied from bitsandbytes 0.50.2
//! (`functional.get_4bit_type`, `functional.create_dynamic_map`); see
//! shared/docs/formats.md §4.1 and §4.3. They are embedded, never recomputed.

use crate::error::{Error, Result};

/// The two 4-bit data types of bitsandbytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4 (QLoRA): 16 normal-distribution quantiles, sorted, index 7 = 0.
    Nf4,
    /// 1 sign, 2 exponent, 1 mantissa bit; table in bit-pattern order, sign = bit 3.
    Fp4,
}

impl QuantType {
    /// Name used by bitsandbytes (`quant_type`, the `bitsandbytes__<name>` tensor suffix).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            _ => Err(Error::usage(format!(
                "unknown quantization type '{s}'; expected nf4 or fp4"
            ))),
        }
    }

    /// The 16-entry code table (`quant_map` in a checkpoint), index = stored 4-bit value.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4_CODE,
            QuantType::Fp4 => &FP4_CODE,
        }
    }

    /// Decision boundaries and the index each bucket maps to (see [`Buckets`]).
    pub fn buckets(self) -> Buckets {
        match self {
            QuantType::Nf4 => Buckets::new(&NF4_CODE, IDENTITY_ORDER),
            QuantType::Fp4 => Buckets::new(&FP4_CODE, FP4_SORT_ORDER),
        }
    }
}

const fn table<const N: usize>(bits: [u32; N]) -> [f32; N] {
    let mut out = [0f32; N];
    let mut i = 0;
    while i < N {
        out[i] = f32::from_bits(bits[i]);
        i += 1;
    }
    out
}

/// NF4 code values (`get_4bit_type("nf4")`).
pub const NF4_CODE: [f32; 16] = table([
    0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
    0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000,
]);

/// FP4 code values (`get_4bit_type("fp4")`: `[0, 0.0625, 8, 12, 4, 6, 2, 3, -0, ...] / 12` in
/// float32). Index 8 is +0.0, not −0.0: the Python list holds the integer `-0`.
pub const FP4_CODE: [f32; 16] = table([
    0x00000000, 0x3baaaaab, 0x3f2aaaab, 0x3f800000, 0x3eaaaaab, 0x3f000000, 0x3e2aaaab, 0x3e800000,
    0x00000000, 0xbbaaaaab, 0xbf2aaaab, 0xbf800000, 0xbeaaaaab, 0xbf000000, 0xbe2aaaab, 0xbe800000,
]);

/// The signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), sorted: index 0 =
/// −0.99296875, 127 = 0.0, 255 = 1.0. Stored in checkpoints as `nested_quant_map`.
pub const DYNAMIC_MAP: [f32; 256] = table([
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
]);

const IDENTITY_ORDER: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// `torch.argsort(FP4_CODE)` as bitsandbytes computes it: the code index of each sorted
/// position. The two zeros (indices 0 and 8) keep table order, so a scaled value in
/// (−0.0026, 0] maps to index 0 and one in (0, 0.0026] to index 8.
const FP4_SORT_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// How bitsandbytes' CPU (default backend) 4-bit quantizer picks an index: the 15 midpoints
/// between consecutive sorted code values, computed in float32 as `(a + b) / 2`, and
/// `torch.bucketize(x, bounds)` (right = False), i.e. the number of bounds strictly below
/// `x`; that position in the sorted table is then mapped back to the code index.
#[derive(Clone, Copy, Debug)]
pub struct Buckets {
    pub bounds: [f32; 15],
    /// sorted position → code index
    pub order: [u8; 16],
}

impl Buckets {
    fn new(code: &[f32; 16], order: [u8; 16]) -> Self {
        let mut bounds = [0f32; 15];
        for (i, b) in bounds.iter_mut().enumerate() {
            let lo = code[order[i] as usize];
            let hi = code[order[i + 1] as usize];
            *b = (lo + hi) / 2.0;
        }
        Self { bounds, order }
    }

    /// `order` as 16 nibbles (nibble `p` = code index of sorted position `p`), so that a lookup
    /// is a shift that vectorizes.
    #[inline]
    pub fn order_nibbles(&self) -> u64 {
        self.order
            .iter()
            .enumerate()
            .fold(0u64, |acc, (p, &i)| acc | ((i as u64) << (4 * p)))
    }

    /// Code index of an already scaled value (exact bitsandbytes CPU rule).
    #[inline]
    pub fn index(&self, scaled: f32) -> u8 {
        let mut pos = 0u8;
        for &b in &self.bounds {
            pos += (scaled > b) as u8;
        }
        self.order[pos as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_match_bitsandbytes() {
        assert_eq!(NF4_CODE[7], 0.0);
        assert_eq!(NF4_CODE[0], -1.0);
        assert_eq!(NF4_CODE[15], 1.0);
        assert_eq!(FP4_CODE[1], 0.0625f32 / 12.0);
        assert_eq!(FP4_CODE[2], 8.0f32 / 12.0);
        assert_eq!(FP4_CODE[9], -0.0625f32 / 12.0);
        assert!(FP4_CODE[8].is_sign_positive());
        assert_eq!(DYNAMIC_MAP[0].to_bits(), 0xbf7e3333);
        assert_eq!(DYNAMIC_MAP[127], 0.0);
        assert_eq!(DYNAMIC_MAP[255], 1.0);
        assert!(DYNAMIC_MAP.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn bounds_match_bitsandbytes() {
        // torch: (code[order[:-1]] + code[order[1:]]) / 2, printed by bitsandbytes 0.50.2
        let nf4: [u32; 15] = [
            0xbf591cd8, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec, 0xbe0d38bc, 0xbd3a7871,
            0x3d22faff, 0x3df64862, 0x3e5067e0, 0x3e9582d4, 0x3ec753f9, 0x3f006d04, 0x3f248daf,
            0x3f5c89da,
        ];
        let fp4: [u32; 15] = [
            0xbf555556, 0xbf155556, 0xbed55556, 0xbe955556, 0xbe555556, 0xbdb00000, 0xbb2aaaab,
            0x00000000, 0x3b2aaaab, 0x3db00000, 0x3e555556, 0x3e955556, 0x3ed55556, 0x3f155556,
            0x3f555556,
        ];
        let got: Vec<u32> = QuantType::Nf4
            .buckets()
            .bounds
            .iter()
            .map(|b| b.to_bits())
            .collect();
        assert_eq!(got, nf4);
        let got: Vec<u32> = QuantType::Fp4
            .buckets()
            .bounds
            .iter()
            .map(|b| b.to_bits())
            .collect();
        assert_eq!(got, fp4);
    }

    #[test]
    fn order_nibbles() {
        assert_eq!(
            QuantType::Nf4.buckets().order_nibbles(),
            0xfedc_ba98_7654_3210
        );
        let f = QuantType::Fp4.buckets();
        let t = f.order_nibbles();
        for p in 0..16 {
            assert_eq!(((t >> (4 * p)) & 15) as u8, f.order[p]);
        }
    }

    #[test]
    fn index_rule() {
        let b = QuantType::Nf4.buckets();
        assert_eq!(b.index(1.0), 15);
        assert_eq!(b.index(-1.0), 0);
        assert_eq!(b.index(0.0), 7);
        assert_eq!(b.index(-0.0), 7);
        // exactly on a midpoint: goes to the lower bucket (bucketize, right = False)
        assert_eq!(b.index(b.bounds[7]), 7);
        let f = QuantType::Fp4.buckets();
        assert_eq!(f.index(0.0), 0);
        assert_eq!(f.index(1e-4), 8);
        assert_eq!(f.index(-1e-4), 0);
        assert_eq!(f.index(1.0), 3);
        assert_eq!(f.index(-1.0), 11);
        assert_eq!(f.index(0.5), 5);
    }
}

//! GGUF v3 writer: the metadata, the tensor directory and the aligned tensor data, in the
//! order gguf-py's `GGUFWriter` writes them, with the encodings llama.cpp's converters use
//! (F32, F16, BF16, Q8_0), bit-exact with gguf-py's quantizers.
//!
//! Tensors are streamed: the directory is computed from names, shapes and types alone, then
//! each tensor's bytes are asked for in turn, so peak memory is one tensor.

use super::reader::{GgmlType, Value};
use crate::error::{Error, Result};
use crate::io::atomic::write_file_try;
use half::{bf16, f16};
use std::io::Write;
use std::path::Path;

/// Alignment of the data section and of every tensor in it (`general.alignment`'s default).
pub const ALIGNMENT: u64 = 32;

/// One tensor of the directory.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    /// Dimensions innermost first (ggml `ne`): a row-major `[out, in]` matrix is `[in, out]`.
    pub ne: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorEntry {
    /// A tensor of row-major `shape` (outermost first, as safetensors writes it).
    pub fn new(name: impl Into<String>, shape: &[usize], ty: GgmlType) -> Self {
        Self {
            name: name.into(),
            ne: shape.iter().rev().map(|&d| d as u64).collect(),
            ty,
        }
    }
    pub fn n_elements(&self) -> usize {
        self.ne.iter().product::<u64>() as usize
    }
    /// Bytes of the encoded data (before padding).
    pub fn byte_len(&self) -> usize {
        let (block, bytes) = self.ty.block();
        self.n_elements() / block * bytes
    }
}

/// What can be encoded: the types llama.cpp's converters write for these models.
pub fn can_encode(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0
    )
}

/// f32 values in `ty`'s encoding. Q8_0 needs a multiple of 32 values per row (the caller
/// checks the row length; see [`q8_0_fits`]).
pub fn encode(values: &[f32], ty: GgmlType) -> Vec<u8> {
    match ty {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::BF16 => values
            .iter()
            .flat_map(|&v| bf16_bits(v).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 => encode_q8_0(values),
        other => unreachable!("no encoder for {}", other.name()),
    }
}

/// gguf-py's `quants.BF16`: round to nearest even, NaNs kept quiet.
fn bf16_bits(v: f32) -> u16 {
    let n = v.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        return ((n & 0xffff_0000) | (64 << 16)) as u16;
    }
    bf16::from_f32(v).to_bits()
}

/// Whether a row of `row_len` values can be Q8_0 (blocks of 32 along the row).
pub fn q8_0_fits(row_len: usize) -> bool {
    row_len.is_multiple_of(32)
}

/// ggml's `quantize_row_q8_0_ref` (and gguf-py's `Q8_0.quantize_blocks`, which converts every
/// input, f16 included, to f32 first): per 32 values an f16 scale d = max|x| / 127 and 32
/// signed bytes round(x / d), rounding half away from zero.
fn encode_q8_0(values: &[f32]) -> Vec<u8> {
    assert!(values.len().is_multiple_of(32), "Q8_0 needs whole blocks");
    let mut out = Vec::with_capacity(values.len() / 32 * 34);
    for block in values.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    out
}

/// The metadata and tensor directory of a file about to be written.
#[derive(Default)]
pub struct GgufWriter {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorEntry>,
}

fn pad(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

impl GgufWriter {
    pub fn add(&mut self, key: &str, value: Value) {
        self.metadata.push((key.to_owned(), value));
    }
    pub fn add_str(&mut self, key: &str, value: &str) {
        self.add(key, Value::String(value.to_owned()));
    }
    pub fn add_u32(&mut self, key: &str, value: u32) {
        self.add(key, Value::U32(value));
    }
    pub fn add_f32(&mut self, key: &str, value: f32) {
        self.add(key, Value::F32(value));
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Header, metadata and directory, up to the start of the data section.
    fn header(&self) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(b"GGUF");
        h.extend_from_slice(&3u32.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut h, k);
            h.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut h, v);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_string(&mut h, &t.name);
            h.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.ty.id().to_le_bytes());
            h.extend_from_slice(&offset.to_le_bytes());
            offset += pad(t.byte_len() as u64);
        }
        h.resize(pad(h.len() as u64) as usize, 0);
        h
    }

    /// Writes the file to `out`: `data(i, entry)` gives tensor i's encoded bytes. Returns the
    /// number of bytes written. `path` names the output in errors.
    pub fn write(
        &self,
        path: &Path,
        out: &mut impl Write,
        mut data: impl FnMut(usize, &TensorEntry) -> Result<Vec<u8>>,
    ) -> Result<u64> {
        let io = |e| Error::io(path, e);
        let header = self.header();
        out.write_all(&header).map_err(io)?;
        let mut written = header.len() as u64;
        let zeros = [0u8; ALIGNMENT as usize];
        for (i, t) in self.tensors.iter().enumerate() {
            let bytes = data(i, t)?;
            assert_eq!(
                bytes.len(),
                t.byte_len(),
                "tensor {} encoded to the wrong size",
                t.name
            );
            out.write_all(&bytes).map_err(io)?;
            let padded = pad(bytes.len() as u64);
            out.write_all(&zeros[..(padded - bytes.len() as u64) as usize])
                .map_err(io)?;
            written += padded;
        }
        Ok(written)
    }
}

impl GgufWriter {
    /// [`write`](Self::write) into `path` atomically (a temporary file renamed into place).
    pub fn write_file(
        &self,
        path: &Path,
        data: impl FnMut(usize, &TensorEntry) -> Result<Vec<u8>>,
    ) -> Result<u64> {
        let mut bytes = 0;
        write_file_try(path, |f| {
            let mut bw = std::io::BufWriter::new(f);
            bytes = self.write(path, &mut bw, data)?;
            bw.flush().map_err(|e| Error::io(path, e))
        })?;
        Ok(bytes)
    }
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_string(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

fn put_value(h: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => h.push(*x),
        Value::I8(x) => h.push(*x as u8),
        Value::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => h.push(*x as u8),
        Value::String(s) => put_string(h, s),
        Value::Array(a) => {
            // An empty array's element type is not recorded by `Value`; gguf-py writes
            // empty arrays only for string lists, so that is the type given here.
            let elem = a.first().map(type_id).unwrap_or(8);
            h.extend_from_slice(&elem.to_le_bytes());
            h.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                debug_assert_eq!(type_id(x), elem, "mixed array");
                put_value(h, x);
            }
        }
        Value::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => h.extend_from_slice(&x.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::dequant::dequantize;
    use crate::gguf::reader::GgufFile;

    #[test]
    fn round_trips_through_the_reader() {
        let mut w = GgufWriter::default();
        w.add_str("general.architecture", "llama");
        w.add_u32("llama.block_count", 2);
        w.add_f32("llama.rope.freq_base", 10000.0);
        w.add(
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
        );
        w.add("tokenizer.ggml.add_bos_token", Value::Bool(true));
        let a: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) / 7.0).collect();
        let b: Vec<f32> = (0..3).map(|i| i as f32).collect();
        w.tensors
            .push(TensorEntry::new("a", &[2, 32], GgmlType::Q8_0));
        w.tensors.push(TensorEntry::new("b", &[3], GgmlType::F32));
        w.tensors
            .push(TensorEntry::new("c", &[2, 32], GgmlType::F16));
        let mut bytes = Vec::new();
        let n = w
            .write(Path::new("t.gguf"), &mut bytes, |i, t| {
                Ok(match i {
                    1 => encode(&b, t.ty),
                    _ => encode(&a, t.ty),
                })
            })
            .unwrap();
        assert_eq!(n as usize, bytes.len());
        let g = GgufFile::from_bytes(Path::new("t.gguf"), &bytes).unwrap();
        assert_eq!(g.metadata, w.metadata);
        assert_eq!(g.tensors.len(), 3);
        assert_eq!(g.tensors[0].shape(), vec![2, 32]);
        assert_eq!(g.tensors[0].ty, GgmlType::Q8_0);
        let q = dequantize(GgmlType::Q8_0, g.data(&g.tensors[0]), 64).unwrap();
        for (block, deq) in a.chunks(32).zip(q.chunks(32)) {
            // half a step of d = max|x| / 127, plus the f16 rounding of d
            let tol = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0 * 0.53;
            for (x, y) in block.iter().zip(deq) {
                assert!((x - y).abs() <= tol, "{x} vs {y}");
            }
        }
        assert_eq!(g.dequantize(&g.tensors[1]).unwrap(), b);
        let c = g.dequantize(&g.tensors[2]).unwrap();
        assert!(a.iter().zip(&c).all(|(x, y)| (x - y).abs() < 1e-2));
        assert_eq!(g.data_offset % 32, 0);
    }

    #[test]
    fn q8_0_is_ggml_reference() {
        // amax 127 → d = 1: values round half away from zero; a zero block stays zero.
        let mut v = vec![0f32; 64];
        v[0] = 127.0;
        v[1] = 2.5;
        v[2] = -2.5;
        v[3] = 0.49;
        let e = encode_q8_0(&v);
        assert_eq!(e.len(), 68);
        assert_eq!(f16::from_le_bytes([e[0], e[1]]).to_f32(), 1.0);
        assert_eq!(&e[2..6], &[127u8, 3, (-3i8) as u8, 0]);
        assert!(e[34..].iter().all(|&b| b == 0));
    }
}

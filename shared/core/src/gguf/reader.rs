//! GGUF (v2, v3) reader: header, metadata, tensor directory, memory-mapped tensor data.
//!
//! Every count and length read from the file is checked against the bytes that remain before
//! anything is allocated for it, so a corrupt or hostile file ends in a one-line error naming
//! the file and the problem, never in a panic or a huge allocation.

use crate::error::{Error, Result};
use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// ggml tensor types (on-disk ids: [`GgmlType::id`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Iq2Xxs,
    Iq2Xs,
    Iq3Xxs,
    Iq1S,
    Iq4Nl,
    Iq3S,
    Iq2S,
    Iq4Xs,
    I8,
    I16,
    I32,
    I64,
    F64,
    Iq1M,
    BF16,
    Tq1_0,
    Tq2_0,
    Mxfp4,
}

impl GgmlType {
    /// The on-disk id ([`from_id`](Self::from_id)'s inverse).
    pub fn id(self) -> u32 {
        (0..64)
            .find(|&i| Self::from_id(i) == Some(self))
            .expect("every type has an id")
    }

    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => Iq2Xxs,
            17 => Iq2Xs,
            18 => Iq3Xxs,
            19 => Iq1S,
            20 => Iq4Nl,
            21 => Iq3S,
            22 => Iq2S,
            23 => Iq4Xs,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => Iq1M,
            30 => BF16,
            34 => Tq1_0,
            35 => Tq2_0,
            39 => Mxfp4,
            _ => return None,
        })
    }

    /// Name as ggml spells it (`Q4_K`, `BF16`, ...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            Iq2Xxs => "IQ2_XXS",
            Iq2Xs => "IQ2_XS",
            Iq3Xxs => "IQ3_XXS",
            Iq1S => "IQ1_S",
            Iq4Nl => "IQ4_NL",
            Iq3S => "IQ3_S",
            Iq2S => "IQ2_S",
            Iq4Xs => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            Iq1M => "IQ1_M",
            BF16 => "BF16",
            Tq1_0 => "TQ1_0",
            Tq2_0 => "TQ2_0",
            Mxfp4 => "MXFP4",
        }
    }

    /// (elements per block, bytes per block), as ggml's type traits.
    pub fn block(self) -> (usize, usize) {
        use GgmlType::*;
        const K: usize = 256;
        match self {
            F32 => (1, 4),
            F16 => (1, 2),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 40),
            Q2K => (K, 2 + 2 + K / 16 + K / 4),
            Q3K => (K, 2 + K / 4 + K / 8 + 12),
            Q4K => (K, 2 + 2 + K / 2 + 12),
            Q5K => (K, 2 + 2 + K / 2 + K / 8 + 12),
            Q6K => (K, 2 + K / 2 + K / 4 + K / 16),
            Q8K => (K, 4 + K + K / 8),
            Iq2Xxs => (K, 2 + K / 4),
            Iq2Xs => (K, 2 + K / 4 + K / 32),
            Iq3Xxs => (K, 2 + K / 4 + K / 8),
            Iq1S => (K, 2 + K / 8 + K / 16),
            Iq4Nl => (32, 18),
            Iq3S => (K, 2 + K / 4 + K / 8 + K / 32 + 4),
            Iq2S => (K, 2 + K / 4 + K / 16),
            Iq4Xs => (K, 2 + 2 + K / 2 + K / 64),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            F64 => (1, 8),
            Iq1M => (K, K / 8 + K / 16 + K / 32),
            BF16 => (1, 2),
            Tq1_0 => (K, 2 + 4 * 13),
            Tq2_0 => (K, 2 + 64),
            Mxfp4 => (32, 17),
        }
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// Any integer value that fits a u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// Any numeric value as f64 (f32 values keep their shortest decimal spelling: 1e-5, not
    /// 9.999999747378752e-6).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => format!("{v}").parse().ok(),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64).or(match *self {
                Value::I8(v) => Some(v as f64),
                Value::I16(v) => Some(v as f64),
                Value::I32(v) => Some(v as f64),
                Value::I64(v) => Some(v as f64),
                _ => None,
            }),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => self.as_u64().map(|v| v != 0),
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::F32(_) => "float32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F64(_) => "float64",
        }
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions innermost first (ggml `ne`): a matrix with `ne = [in, out]` is `[out, in]`
    /// in row-major terms.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Absolute byte range in the file.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
    /// Row-major shape (outermost first), as safetensors and PyTorch write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_offset: usize,
}

const MAX_DIMS: u32 = 4;

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::bad_input(self.path, msg)
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated GGUF header: {what} at byte {} needs {n} bytes but the file ends at byte {}",
                self.pos,
                self.buf.len()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("length checked"))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(self.err(format!(
                "{what} at byte {at} claims {len} bytes, past the end of the file ({} bytes; truncated or corrupt file)",
                self.buf.len()
            )));
        }
        let bytes = self.take(len as usize, what)?;
        // Real files sometimes carry invalid UTF-8 in token pieces; keep going like llama.cpp.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(what)?[0]),
            1 => Value::I8(self.arr::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => Value::U32(u32::from_le_bytes(self.arr(what)?)),
            5 => Value::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => {
                let b = self.arr::<1>(what)?[0];
                if b > 1 {
                    return Err(self.err(format!("{what}: bool value {b} is neither 0 nor 1")));
                }
                Value::Bool(b == 1)
            }
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= 4 {
                    return Err(self.err(format!("{what}: arrays nested too deeply")));
                }
                let at = self.pos;
                let elem_ty = self.u32(what)?;
                let n = self.u64(what)?;
                let min = match elem_ty {
                    0 | 1 | 7 => 1u64,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => {
                        return Err(self.err(format!(
                            "{what}: unknown array element type {other} at byte {at}"
                        )))
                    }
                };
                if n.checked_mul(min)
                    .is_none_or(|b| b > self.remaining() as u64)
                {
                    return Err(self.err(format!(
                        "{what}: array at byte {at} claims {n} elements, more than the {} bytes left in the file can hold (truncated or corrupt file)",
                        self.remaining()
                    )));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem_ty, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            other => {
                return Err(self.err(format!(
                    "{what}: unknown metadata value type {other} at byte {}",
                    self.pos - 4
                )))
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: opened read-only; peftkit never writes its inputs.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_mmap(path, mmap)
    }

    /// A GGUF file held in memory: `bytes` are copied into an anonymous mapping and parsed and
    /// validated exactly as [`open`](Self::open) does (`path` only names it in errors). Used by
    /// the fuzz targets (fuzz/) and tests.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let mut anon = memmap2::MmapMut::map_anon(bytes.len()).map_err(|e| Error::io(path, e))?;
        anon.copy_from_slice(bytes);
        let mmap = anon.make_read_only().map_err(|e| Error::io(path, e))?;
        Self::from_mmap(path, mmap)
    }

    fn from_mmap(path: &Path, mmap: Mmap) -> Result<Self> {
        let (version, metadata, tensors, alignment, data_offset) = parse(path, &mmap)?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn err(&self, msg: impl Into<String>) -> Error {
        Error::bad_input(&self.path, msg)
    }

    /// Metadata helpers with typed errors.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                self.err(format!(
                    "metadata {key} is a {}, expected an unsigned integer",
                    v.type_name()
                ))
            }),
        }
    }
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                self.err(format!(
                    "metadata {key} is a {}, expected a number",
                    v.type_name()
                ))
            }),
        }
    }
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                self.err(format!(
                    "metadata {key} is a {}, expected a string",
                    v.type_name()
                ))
            }),
        }
    }
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                self.err(format!(
                    "metadata {key} is a {}, expected a bool",
                    v.type_name()
                ))
            }),
        }
    }
    pub fn get_array(&self, key: &str) -> Result<Option<&[Value]>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_array().map(Some).ok_or_else(|| {
                self.err(format!(
                    "metadata {key} is a {}, expected an array",
                    v.type_name()
                ))
            }),
        }
    }
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key)?
            .ok_or_else(|| self.err(format!("metadata {key} is missing")))
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Raw bytes of a tensor (bounds were checked when the file was opened).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[t.start..t.start + t.len]
    }

    /// Dequantize a tensor to f32 (row-major, `t.n_elements()` values).
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        super::dequant::dequantize(t.ty, self.data(t), t.n_elements())
            .map_err(|m| self.err(format!("tensor {}: {m}", t.name)))
    }
}

type Parsed = (u32, Vec<(String, Value)>, Vec<TensorInfo>, u64, usize);

fn parse(path: &Path, buf: &[u8]) -> Result<Parsed> {
    let mut c = Cursor { buf, pos: 0, path };
    if buf.len() < 4 || &buf[..4] != b"GGUF" {
        let got = &buf[..buf.len().min(4)];
        return Err(Error::bad_input(
            path,
            format!(
                "not a GGUF file: magic is {:?}, expected \"GGUF\"",
                String::from_utf8_lossy(got)
            ),
        ));
    }
    c.pos = 4;
    let version = c.u32("version")?;
    if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
        return Err(c.err("big-endian GGUF files are not supported"));
    }
    if version != 2 && version != 3 {
        return Err(c.err(format!(
            "unsupported GGUF version {version}; supported: 2 and 3"
        )));
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    // Each key/value needs at least 8 (key length) + 4 (type) + 1 bytes, each tensor info
    // at least 8 + 4 + 4 + 8 bytes: bound the counts by the file size before allocating.
    if n_kv.saturating_mul(13) > c.remaining() as u64 {
        return Err(c.err(format!(
            "metadata count {n_kv} is larger than the file ({} bytes) can hold (truncated or corrupt file)",
            buf.len()
        )));
    }
    if n_tensors.saturating_mul(24) > c.remaining() as u64 {
        return Err(c.err(format!(
            "tensor count {n_tensors} is larger than the file ({} bytes) can hold (truncated or corrupt file)",
            buf.len()
        )));
    }
    let mut metadata = Vec::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key #{i}"))?;
        let ty = c.u32(&format!("metadata {key}"))?;
        let v = c.value(ty, &format!("metadata {key}"), 0)?;
        metadata.push((key, v));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => 32,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
            _ => {
                return Err(c.err(format!(
                    "general.alignment is {v:?}; expected a power of two"
                )))
            }
        },
    };
    let mut raw = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = c.string(&format!("tensor #{i} name"))?;
        let what = format!("tensor {name}");
        let n_dims = c.u32(&what)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(c.err(format!(
                "{what}: {n_dims} dimensions; expected 1 to {MAX_DIMS}"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&what)?);
        }
        let ty_id = c.u32(&what)?;
        let ty = GgmlType::from_id(ty_id)
            .ok_or_else(|| c.err(format!("{what}: unknown tensor type {ty_id}")))?;
        let offset = c.u64(&what)?;
        raw.push((name, dims, ty, offset));
    }
    let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, dims, ty, offset) in raw {
        let err = |m: String| Error::bad_input(path, format!("tensor {name}: {m}"));
        let n = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n < 1 << 48)
            .ok_or_else(|| err(format!("dimensions {dims:?} overflow")))?;
        if dims.contains(&0) {
            return Err(err(format!("has a zero dimension {dims:?}")));
        }
        let (bs, bb) = ty.block();
        if !dims[0].is_multiple_of(bs as u64) {
            return Err(err(format!(
                "row length {} is not a multiple of the {} block size {bs}",
                dims[0],
                ty.name()
            )));
        }
        let len = n / bs as u64 * bb as u64;
        if !offset.is_multiple_of(alignment) {
            return Err(err(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        // checked: an offset near u64::MAX used to wrap around to a start inside the header
        // (found by fuzz/gguf_reader; a panic with overflow checks, silently wrong data without)
        let end = data_offset
            .checked_add(offset)
            .and_then(|start| start.checked_add(len))
            .ok_or_else(|| err("data range overflows".into()))?;
        if end > file_len {
            return Err(err(format!(
                "data ends at byte {end} past the end of the file ({file_len} bytes)"
            )));
        }
        let start = end - len;
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            start: start as usize,
            len: len as usize,
        });
    }
    // Overlaps and duplicate names.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].start);
    for w in order.windows(2) {
        let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
        if a.start + a.len > b.start {
            return Err(Error::bad_input(
                path,
                format!(
                    "tensor {} (bytes {}..{}) overlaps tensor {} (bytes {}..{})",
                    a.name,
                    a.start,
                    a.start + a.len,
                    b.name,
                    b.start,
                    b.start + b.len
                ),
            ));
        }
    }
    let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::bad_input(
            path,
            format!("tensor {} appears twice", w[0]),
        ));
    }
    Ok((version, metadata, tensors, alignment, data_offset as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, n_t: u64, n_kv: u64) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(version.to_le_bytes());
        b.extend(n_t.to_le_bytes());
        b.extend(n_kv.to_le_bytes());
        b
    }

    fn parse_bytes(b: &[u8]) -> Result<Parsed> {
        parse(Path::new("t.gguf"), b)
    }

    #[test]
    fn rejects_garbage_cleanly() {
        let e = parse_bytes(b"GGUX\x03\0\0\0").err().unwrap().to_string();
        assert!(e.contains("not a GGUF file"), "{e}");
        let e = parse_bytes(&header(1, 0, 0)).err().unwrap().to_string();
        assert!(e.contains("unsupported GGUF version 1"), "{e}");
        let e = parse_bytes(&header(3, u64::MAX, 0))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("tensor count"), "{e}");
        let e = parse_bytes(&header(3, 0, u64::MAX))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("metadata count"), "{e}");
        // An array that claims 2^60 elements must not allocate.
        let mut b = header(3, 0, 1);
        b.extend(3u64.to_le_bytes());
        b.extend(b"key");
        b.extend(9u32.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend((1u64 << 60).to_le_bytes());
        let e = parse_bytes(&b).err().unwrap().to_string();
        assert!(e.contains("claims"), "{e}");
        // A string that runs past the end.
        let mut b = header(3, 0, 1);
        b.extend(1000u64.to_le_bytes());
        b.extend([b'x'; 16]);
        let e = parse_bytes(&b).err().unwrap().to_string();
        assert!(e.contains("past the end"), "{e}");
    }

    #[test]
    fn parses_minimal_file() {
        let mut b = header(3, 1, 1);
        b.extend(4u64.to_le_bytes());
        b.extend(b"k.v1");
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(b"hi");
        b.extend(1u64.to_le_bytes());
        b.extend(b"t");
        b.extend(1u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        b.extend(1.5f32.to_le_bytes());
        b.extend(2.5f32.to_le_bytes());
        let (v, md, t, al, off) = parse_bytes(&b).unwrap();
        assert_eq!((v, al), (3, 32));
        assert_eq!(md[0].1, Value::String("hi".into()));
        assert_eq!(t[0].shape(), vec![2]);
        assert_eq!(t[0].start, off);
        // Cut the data: clear error.
        let e = parse_bytes(&b[..b.len() - 1]).err().unwrap().to_string();
        assert!(e.contains("past the end of the file"), "{e}");
        // Unknown tensor type.
        let mut bad = b.clone();
        // locate the type field: after name "t", n_dims, one dim
        let name_pos = bad
            .windows(9)
            .position(|w| w == b"\x01\0\0\0\0\0\0\0t")
            .unwrap();
        let ty_at = name_pos + 9 + 4 + 8;
        bad[ty_at..ty_at + 4].copy_from_slice(&99u32.to_le_bytes());
        let e = parse_bytes(&bad).err().unwrap().to_string();
        assert!(e.contains("unknown tensor type 99"), "{e}");
    }
}

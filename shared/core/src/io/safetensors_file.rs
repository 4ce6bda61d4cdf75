//! Memory-mapped safetensors reading and streaming, atomic safetensors writing.
//!
//! Reading validates the header (offsets inside the file, no overlaps, dtype sizes) through the
//! `safetensors` crate and then hands out byte slices of the mapping: nothing is copied until a
//! caller converts a tensor. Writing streams one tensor at a time after a header computed up
//! front, so peak memory is about one tensor whatever the model size.

use crate::error::{Error, FileContext, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// One memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    meta: Metadata,
}

/// A tensor borrowed from a mapped file.
#[derive(Clone, Copy)]
pub struct TensorRef<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only and peftkit never writes to its inputs; a
        // concurrent writer from another process is outside what any mmap reader can guard.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_mmap(path, mmap)
    }

    /// A safetensors file held in memory: `bytes` are copied into an anonymous mapping and
    /// validated exactly as [`open`](Self::open) validates a file (`path` only names it in
    /// errors). Used by the fuzz targets (fuzz/) and tests.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let mut anon = memmap2::MmapMut::map_anon(bytes.len()).map_err(|e| Error::io(path, e))?;
        anon.copy_from_slice(bytes);
        let mmap = anon.make_read_only().map_err(|e| Error::io(path, e))?;
        Self::from_mmap(path, mmap)
    }

    fn from_mmap(path: &Path, mmap: Mmap) -> Result<Self> {
        let (header_len, meta) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::bad_input(path, format!("not a valid safetensors file: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            header_len,
            meta,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in file order.
    pub fn names(&self) -> Vec<String> {
        self.meta.offset_keys()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.meta.info(name).is_some()
    }

    pub fn user_metadata(&self) -> Option<&std::collections::HashMap<String, String>> {
        self.meta.metadata().as_ref()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.meta.info(name)
    }

    pub fn get(&self, name: &str) -> Option<TensorRef<'_>> {
        let info = self.meta.info(name)?;
        let start = 8 + self.header_len + info.data_offsets.0;
        let end = 8 + self.header_len + info.data_offsets.1;
        Some(TensorRef {
            dtype: info.dtype,
            shape: &info.shape,
            bytes: &self.mmap[start..end],
        })
    }

    /// Tensor `name`, or an error that names the file and the tensor.
    pub fn require(&self, name: &str) -> Result<TensorRef<'_>> {
        self.get(name)
            .ok_or_else(|| Error::bad_input(&self.path, format!("tensor {name} is missing")))
    }

    /// Tensor `name` converted to f32, with its shape checked against `expected`.
    pub fn f32_checked(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let t = self.require(name)?;
        if t.shape != expected {
            return Err(Error::bad_input(
                &self.path,
                format!(
                    "tensor {name} has shape {:?}, expected {:?} from config.json",
                    t.shape, expected
                ),
            ));
        }
        let v = to_f32(name, &t).in_file(&self.path)?;
        // Weights are loaded through here: a NaN or infinity would silently turn every
        // logit into NaN (or, worse, be hidden by a max-subtracted softmax). Refuse it.
        check_finite(name, &v).in_file(&self.path)?;
        Ok(v)
    }
}

/// `Err` naming the tensor and the first NaN or infinite element, if any.
pub fn check_finite(name: &str, v: &[f32]) -> std::result::Result<(), String> {
    match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(format!(
            "tensor {name} has a non-finite value ({}) at element {i}; the file is corrupt or the weights diverged",
            if v[i].is_nan() { "NaN".to_string() } else { v[i].to_string() }
        )),
    }
}

/// Convert any float or integer tensor to f32.
pub fn to_f32(name: &str, t: &TensorRef<'_>) -> std::result::Result<Vec<f32>, String> {
    let b = t.bytes;
    let out = match t.dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        other => {
            return Err(format!(
                "tensor {name} has dtype {other:?}; expected F32, F16, BF16 or F64"
            ))
        }
    };
    Ok(out)
}

/// Storage dtype of written tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    F32,
    F16,
    BF16,
}

impl OutDtype {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            _ => Err(Error::usage(format!(
                "unknown dtype '{s}'; expected f32, f16 or bf16"
            ))),
        }
    }
    pub fn st(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
        }
    }
    /// Name used by transformers' config.json `torch_dtype` / `dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }
}

/// Encode f32 values in the given storage dtype (little endian).
pub fn encode_f32(values: &[f32], dtype: OutDtype) -> Vec<u8> {
    match dtype {
        OutDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        OutDtype::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        OutDtype::BF16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
    }
}

/// Declaration of one tensor to be written.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Write a safetensors file atomically, streaming the tensors in declaration order.
/// `produce(i)` returns the bytes of tensor `i`; it is called once per tensor, in order.
pub fn write_streaming(
    path: &Path,
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
    mut produce: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let header = header_bytes(specs, metadata)?;
    let mut inner_err: Option<Error> = None;
    let res = crate::io::atomic::write_file_with(path, |f| {
        let mut w = BufWriter::with_capacity(1 << 20, f);
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for (i, spec) in specs.iter().enumerate() {
            let bytes = match produce(i) {
                Ok(b) => b,
                Err(e) => {
                    inner_err = Some(e);
                    return Err(std::io::Error::other("tensor producer failed"));
                }
            };
            if bytes.len() != spec.byte_len() {
                inner_err = Some(Error::usage(format!(
                    "internal: tensor {} produced {} bytes, expected {}",
                    spec.name,
                    bytes.len(),
                    spec.byte_len()
                )));
                return Err(std::io::Error::other("size mismatch"));
            }
            w.write_all(&bytes)?;
        }
        w.flush()
    });
    match (res, inner_err) {
        (_, Some(e)) => Err(e),
        (r, None) => r,
    }
}

/// Write in-memory f32 tensors (small files: adapters, fixtures).
pub fn write_f32_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype: OutDtype,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, s, _)| TensorSpec {
            name: n.clone(),
            dtype: dtype.st(),
            shape: s.clone(),
        })
        .collect();
    write_streaming(path, &specs, metadata, |i| {
        Ok(encode_f32(&tensors[i].2, dtype))
    })
}

fn header_bytes(specs: &[TensorSpec], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    use serde_json::{Map, Value};
    let mut map = Map::new();
    if !metadata.is_empty() {
        let m: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        map.insert("__metadata__".into(), Value::Object(m));
    }
    let mut offset = 0usize;
    for s in specs {
        if map.contains_key(&s.name) {
            return Err(Error::usage(format!(
                "internal: tensor {} declared twice",
                s.name
            )));
        }
        let end = offset + s.byte_len();
        map.insert(
            s.name.clone(),
            serde_json::json!({"dtype": s.dtype, "shape": s.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&Value::Object(map)).expect("json");
    // The data section starts 8-byte aligned, as the reference writer does.
    while !bytes.len().is_multiple_of(8) {
        bytes.push(b' ');
    }
    Ok(bytes)
}

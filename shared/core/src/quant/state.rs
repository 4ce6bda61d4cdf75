//! The non-tensor part of a bitsandbytes 4-bit quant state and its serialized form: the UTF-8
//! JSON stored as the uint8 tensor `<weight>.quant_state.bitsandbytes__<nf4|fp4>`.
//!
//! The bytes are those of Python's `json.dumps` (separators `", "` and `": "`, floats as
//! `repr`), with keys in `QuantState.as_dict` order: `quant_type, blocksize, dtype, shape`, then
//! for double quantization `nested_blocksize, nested_dtype, nested_offset`
//! (shared/docs/formats.md §4.4).

use super::codebook::QuantType;
use crate::io::safetensors_file::OutDtype;

/// Prefix of the packed JSON state tensor's suffix (`quant_state.bitsandbytes__nf4`).
pub const QUANT_STATE_KEY: &str = "quant_state.bitsandbytes__";

/// Double-quantization parameters of a quant state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NestedState {
    /// Block size of the 8-bit absmax quantization (256).
    pub blocksize: usize,
    /// dtype of the nested statistics (float32).
    pub dtype: OutDtype,
    /// The mean subtracted from the block maxima before quantizing them.
    pub offset: f32,
}

/// Everything about a 4-bit tensor that is not a tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantState {
    pub quant_type: QuantType,
    pub blocksize: usize,
    /// dtype of the original weight (the dequantized output is cast to it).
    pub dtype: OutDtype,
    /// Original shape (`[out, in]` for a linear layer, also for GPT-2 Conv1D).
    pub shape: Vec<usize>,
    pub nested: Option<NestedState>,
}

impl QuantState {
    /// Number of elements of the original tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Suffix of the JSON tensor after `<weight>.`: `quant_state.bitsandbytes__nf4`.
    pub fn tensor_suffix(&self) -> String {
        format!("{QUANT_STATE_KEY}{}", self.quant_type.name())
    }

    /// The JSON text exactly as bitsandbytes writes it.
    pub fn to_json(&self) -> String {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.quant_type.name(),
            self.blocksize,
            self.dtype.torch_name(),
            shape.join(", ")
        );
        if let Some(n) = &self.nested {
            s.push_str(&format!(
                ", \"nested_blocksize\": {}, \"nested_dtype\": \"{}\", \"nested_offset\": {}",
                n.blocksize,
                n.dtype.torch_name(),
                python_float_repr(n.offset as f64)
            ));
        }
        s.push('}');
        s
    }

    /// Parse the JSON state (any key order; bitsandbytes' `QuantState.from_dict` rules).
    /// Errors are plain messages; the caller adds file and tensor.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| format!("quant state is not valid JSON: {e}"))?;
        let obj = v
            .as_object()
            .ok_or_else(|| "quant state is not a JSON object".to_string())?;
        let str_field = |k: &str| -> Result<&str, String> {
            obj.get(k)
                .and_then(|x| x.as_str())
                .ok_or_else(|| format!("quant state has no string \"{k}\""))
        };
        let uint_field = |k: &str| -> Result<usize, String> {
            obj.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| format!("quant state has no integer \"{k}\""))
        };
        let dtype_field = |k: &str| -> Result<OutDtype, String> {
            let d = str_field(k)?;
            OutDtype::parse(d).map_err(|_| {
                format!("quant state \"{k}\" is {d:?}; expected float32, float16 or bfloat16")
            })
        };
        let quant_type = match str_field("quant_type")? {
            "nf4" => QuantType::Nf4,
            "fp4" => QuantType::Fp4,
            other => return Err(format!("quant_type {other:?} is not nf4 or fp4")),
        };
        let blocksize = uint_field("blocksize")?;
        if blocksize == 0 || !blocksize.is_multiple_of(2) {
            return Err(format!(
                "blocksize {blocksize} is not a positive even number"
            ));
        }
        let shape = obj
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| "quant state has no \"shape\" list".to_string())?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| "quant state \"shape\" is not a list of integers".to_string())?;
        // `numel()` multiplies the dimensions: a shape whose product overflows used to panic
        // there (overflow checks) or wrap to a small count (found by fuzz/quant_state).
        if shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .is_none()
        {
            return Err(format!(
                "quant state \"shape\" {shape:?} has more elements than memory can hold"
            ));
        }
        let nested = if obj.contains_key("nested_offset") || obj.contains_key("nested_blocksize") {
            let offset = obj
                .get("nested_offset")
                .and_then(|x| x.as_f64())
                .ok_or_else(|| "quant state has no number \"nested_offset\"".to_string())?;
            let blocksize = uint_field("nested_blocksize")?;
            if blocksize == 0 {
                return Err("nested_blocksize is 0".into());
            }
            Some(NestedState {
                blocksize,
                dtype: dtype_field("nested_dtype")?,
                offset: offset as f32,
            })
        } else {
            None
        };
        Ok(Self {
            quant_type,
            blocksize,
            dtype: dtype_field("dtype")?,
            shape,
            nested,
        })
    }
}

/// Python's `repr(float)`: the shortest decimal that reads back as the same double, in fixed
/// notation when the decimal exponent is in -5..16 (`0.0001`, `2.617828369140625`,
/// `1e+16`, `1e-05`), with `.0` on integral values.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` prints the shortest round-trip digits ("d.ddde<exp>"), but breaks an exact
    // tie between two shortest candidates upwards; Python takes the correctly rounded one
    // (ties to even), which `{:.N e}` gives whenever it also reads back as `x`.
    let shortest = format!("{:e}", x.abs());
    let n_digits = shortest
        .split_once('e')
        .expect("exponent")
        .0
        .replace('.', "")
        .len();
    let rounded = format!("{:.*e}", n_digits - 1, x.abs());
    let sci = if rounded.parse::<f64>() == Ok(x.abs()) {
        rounded
    } else {
        shortest
    };
    let (mant, exp) = sci.split_once('e').expect("exponent");
    let exp: i32 = exp.parse().expect("exponent");
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let sign = if x < 0.0 { "-" } else { "" };
    let decpt = exp + 1; // value = 0.DIGITS * 10^decpt
    if decpt <= -4 || decpt > 16 {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    } else if decpt <= 0 {
        format!("{sign}0.{}{digits}", "0".repeat((-decpt) as usize))
    } else {
        let d = decpt as usize;
        if digits.len() <= d {
            format!("{sign}{digits}{}.0", "0".repeat(d - digits.len()))
        } else {
            format!("{sign}{}.{}", &digits[..d], &digits[d..])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::excessive_precision)]
    fn python_repr() {
        for (x, want) in [
            (2.617828369140625, "2.617828369140625"),
            (1.5049999952316284, "1.5049999952316284"),
            (0.40122413635253906, "0.40122413635253906"),
            (1.0, "1.0"),
            (100.0, "100.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (-0.5, "-0.5"),
            (0.0, "0.0"),
            (1e-38f32 as f64, "9.999999350456404e-39"),
            (6.0, "6.0"),
            (123.456, "123.456"),
            (1e22, "1e+22"),
            // an exact tie between two 17-digit candidates: Python rounds to even
            (113.414093017578125, "113.41409301757812"),
        ] {
            assert_eq!(python_float_repr(x), want, "{x}");
        }
    }

    #[test]
    #[allow(clippy::excessive_precision)]
    fn json_blob_matches_bitsandbytes() {
        let st = QuantState {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            dtype: OutDtype::BF16,
            shape: vec![64, 256],
            nested: Some(NestedState {
                blocksize: 256,
                dtype: OutDtype::F32,
                offset: 2.617828369140625,
            }),
        };
        let j = st.to_json();
        assert_eq!(
            j,
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [64, 256], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 2.617828369140625}"
        );
        assert_eq!(QuantState::from_json(j.as_bytes()).unwrap(), st);
        assert_eq!(st.tensor_suffix(), "quant_state.bitsandbytes__nf4");
        let plain = QuantState {
            nested: None,
            quant_type: QuantType::Fp4,
            dtype: OutDtype::F32,
            ..st
        };
        assert_eq!(
            plain.to_json(),
            "{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [64, 256]}"
        );
        assert!(QuantState::from_json(b"{\"quant_type\": \"int4\"}").is_err());
    }
}

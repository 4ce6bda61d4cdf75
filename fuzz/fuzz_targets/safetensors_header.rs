//! The safetensors reader every tool opens its inputs with (`SafetensorsFile`), fed whole
//! files: header validation, tensor lookup, conversion to f32, the 4-bit weight reader, and
//! what `adapter-inspect FILE.safetensors` does with a loose file (sizes, per-tensor report,
//! adapter analysis).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peftkit_core::inspect;
use peftkit_core::io::safetensors_file::{to_f32, SafetensorsFile};
use peftkit_core::quant::checkpoint::{read_quantized, weight_of_quant_state};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = SafetensorsFile::from_bytes(Path::new("fuzz.safetensors"), data) else {
        return;
    };
    let names = f.names();
    let _ = f.user_metadata();
    for n in &names {
        assert!(f.contains(n));
        let _ = f.info(n);
        let t = f.require(n).expect("listed tensor is present");
        let _ = to_f32(n, &t);
        let _ = f.f32_checked(n, t.shape);
        if let Some(w) = weight_of_quant_state(n) {
            if let Ok(Some(q)) = read_quantized(&f, w) {
                let _ = q.dequantize();
            }
        }
    }
    let _ = inspect::model::sizes(&f, &names);
    let _ = inspect::adapter::files_summary(&f);
    for n in &names {
        let _ = inspect::adapter::tensor_report(&f, n, true);
    }
    let _ = inspect::adapter::analyze(f, &inspect::config::Context::default(), None);
});

//! The bitsandbytes 4-bit metadata reader: the JSON quant state (`QuantState::from_json`),
//! then the 4-bit weight reader (`read_quantized`, used by quantize-nf4 --dequantize,
//! adapter-merge, peft-train on a 4-bit base) on a checkpoint built around that state, with
//! parts sized from the state, then dequantization.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peftkit_core::io::safetensors_file::SafetensorsFile;
use peftkit_core::quant::checkpoint::read_quantized;
use peftkit_core::quant::state::QuantState;
use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;

const W: &str = "model.layers.0.mlp.up_proj.weight";

fuzz_target!(|data: &[u8]| {
    let Ok(st) = QuantState::from_json(data) else {
        return;
    };
    let _ = st.numel();
    let _ = st.to_json();
    let _ = st.tensor_suffix();
    // Build the weight's parts the way a consistent checkpoint stores them (when the sizes are
    // small enough to build), with the fuzzed JSON as the state tensor.
    let n = st
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .unwrap_or(usize::MAX);
    if n == 0 || n > 1 << 16 {
        return;
    }
    let blocks = n.div_ceil(st.blocksize);
    let packed: Vec<u8> = (0..n.div_ceil(2)).map(|i| (i * 37) as u8).collect();
    let qmap: Vec<u8> = st
        .quant_type
        .code()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let f32s = |k: usize| -> Vec<u8> {
        (0..k)
            .flat_map(|i| (0.5 + i as f32).to_le_bytes())
            .collect()
    };
    let mut parts: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![
        (W.into(), Dtype::U8, vec![packed.len(), 1], packed),
        (format!("{W}.quant_map"), Dtype::F32, vec![16], qmap),
        (
            format!("{W}.{}", st.tensor_suffix()),
            Dtype::U8,
            vec![data.len()],
            data.to_vec(),
        ),
    ];
    match &st.nested {
        None => parts.push((
            format!("{W}.absmax"),
            Dtype::F32,
            vec![blocks],
            f32s(blocks),
        )),
        Some(nested) => {
            let nb = blocks.div_ceil(nested.blocksize);
            parts.push((
                format!("{W}.absmax"),
                Dtype::U8,
                vec![blocks],
                (0..blocks).map(|i| i as u8).collect(),
            ));
            parts.push((format!("{W}.nested_absmax"), Dtype::F32, vec![nb], f32s(nb)));
            parts.push((
                format!("{W}.nested_quant_map"),
                Dtype::F32,
                vec![256],
                f32s(256),
            ));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = parts
        .iter()
        .map(|(name, dt, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(*dt, shape.clone(), bytes).expect("consistent view"),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).expect("serialize");
    let f = SafetensorsFile::from_bytes(Path::new("fuzz.safetensors"), &bytes).expect("valid file");
    if let Ok(Some(q)) = read_quantized(&f, W) {
        assert_eq!(q.dequantize().len(), n);
    }
});

//! Inputs the fuzz targets (fuzz/, docs/reliability-fuzzing.md) found to crash a reader, kept
//! as ordinary tests: each must now end in a clean error.

use peftkit_core::gguf::GgufFile;
use peftkit_core::io::safetensors_file::OutDtype;
use peftkit_core::quant::state::QuantState;
use peftkit_tests::fixtures;
use std::path::Path;

/// A GGUF v3 file with one F32 tensor of 2 elements at data offset `offset`.
fn gguf_one_tensor(offset: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(0u64.to_le_bytes()); // metadata
    b.extend(1u64.to_le_bytes());
    b.extend(b"t");
    b.extend(1u32.to_le_bytes()); // dims
    b.extend(2u64.to_le_bytes());
    b.extend(0u32.to_le_bytes()); // F32
    b.extend(offset.to_le_bytes());
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend(1.5f32.to_le_bytes());
    b.extend(2.5f32.to_le_bytes());
    b
}

#[test]
fn gguf_tensor_offset_near_u64_max_is_an_error() {
    let ok = GgufFile::from_bytes(Path::new("t.gguf"), &gguf_one_tensor(0)).unwrap();
    assert_eq!(ok.dequantize(&ok.tensors[0]).unwrap(), vec![1.5, 2.5]);
    // data_offset + offset used to overflow: a panic with overflow checks, and without them a
    // tensor that "starts" inside the header.
    for offset in [u64::MAX - 31, u64::MAX - 63, 1 << 63] {
        let e = GgufFile::from_bytes(Path::new("t.gguf"), &gguf_one_tensor(offset))
            .err()
            .expect("must be rejected")
            .to_string();
        assert!(e.contains("t.gguf") && e.contains("tensor t"), "{e}");
    }
}

#[test]
fn quant_state_shape_that_overflows_is_an_error() {
    let e = QuantState::from_json(
        br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [4294967296, 4294967296]}"#,
    )
    .unwrap_err();
    assert!(e.contains("shape"), "{e}");
    let e = QuantState::from_json(
        br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [18446744073709551615, 2]}"#,
    )
    .unwrap_err();
    assert!(e.contains("shape"), "{e}");
    // A large but representable shape still parses (the tensor sizes are checked later).
    let st = QuantState::from_json(
        br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [65536, 65536]}"#,
    )
    .unwrap();
    assert_eq!(st.numel(), 1 << 32);
}

#[test]
fn gguf_import_with_head_count_times_key_length_overflowing_is_an_error() {
    // llama, 2^31 heads of key_length 2^33: the row check multiplied them unchecked.
    let bytes =
        include_bytes!("../../fuzz/corpus/gguf_reader/regression-import-head-overflow.gguf");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, bytes).unwrap();
    let out = dir.path().join("out");
    let e = peftkit_core::gguf::import_gguf(&path, &out, OutDtype::F32, false)
        .expect_err("must be rejected")
        .to_string();
    assert!(e.contains("attn_q"), "{e}");
    assert!(!out.exists());
}

#[test]
fn inspect_prefix_adapter_with_huge_num_layers_does_not_overflow() {
    let src = fixtures().join("methods/prefix/adapter");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("adapter_config.json")).unwrap()).unwrap();
    cfg["num_layers"] = serde_json::json!(1u64 << 62);
    cfg["token_dim"] = serde_json::json!(4);
    std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    // num_layers · 2 · token_dim used to overflow; now it just does not match the tensor.
    let r = peftkit_core::inspect::load(dir.path(), None).unwrap();
    assert!(r.report.prompt.is_some());
}

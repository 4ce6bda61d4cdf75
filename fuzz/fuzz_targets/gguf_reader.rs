//! The GGUF reader of `model-import`, fed whole files: header, metadata, tensor directory,
//! typed metadata getters, dequantization of every tensor, the tokenizer built from
//! `tokenizer.ggml.*` metadata and, for files that parse, the whole import into an HF folder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peftkit_core::gguf::{self, GgufFile};
use peftkit_core::io::safetensors_file::OutDtype;
use std::path::Path;
use std::sync::OnceLock;

fn scratch() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(g) = GgufFile::from_bytes(Path::new("fuzz.gguf"), data) else {
        return;
    };
    for (k, v) in &g.metadata {
        let _ = (
            v.as_u64(),
            v.as_f64(),
            v.as_str(),
            v.as_bool(),
            v.as_array(),
        );
        let _ = (
            g.get_u64(k),
            g.get_f64(k),
            g.get_str(k),
            g.get_bool(k),
            g.get_array(k),
        );
    }
    for t in &g.tensors {
        let _ = (t.shape(), t.n_elements(), g.data(t));
        if let Ok(v) = g.dequantize(t) {
            assert_eq!(v.len(), t.n_elements());
        }
    }
    let _ = gguf::tokenizer::build(&g, None);
    let _ = gguf::tokenizer::build(&g, Some(128));
    // The whole model-import path (it opens the file by name, so write it out).
    let dir = scratch().path();
    let path = dir.join("in.gguf");
    std::fs::write(&path, data).expect("write input");
    let out = dir.join("out");
    let _ = std::fs::remove_dir_all(&out);
    let _ = gguf::import_gguf(&path, &out, OutDtype::F32, false);
});

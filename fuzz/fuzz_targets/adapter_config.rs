//! The adapter_config.json readers of PEFT adapter directories, fed the config text next to
//! real adapter weights for the tiny llama_gqa fixture model: `AdapterDir` (adapter-merge,
//! adapter-inspect) with its LoRA / IA3 settings and module lists, `inspect::load` (the whole
//! adapter-inspect report) and `lora::load_for_inference` (peft-eval / peft-generate
//! `--adapter`, which dispatches on peft_type to the LoRA, IA3, prefix, prompt-tuning and
//! bottleneck loaders). The weights file is picked by the config's peft_type.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peftkit_core::inspect;
use peftkit_core::merge::adapter_dir::AdapterDir;
use peftkit_core::model::Model;
use peftkit_core::train::lora;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

struct Env {
    model: Mutex<Model>,
    _dir: tempfile::TempDir,
    /// (peft_type, adapter directory holding that method's adapter_model.safetensors)
    dirs: Vec<(&'static str, PathBuf)>,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let model = Model::load(&fx.join("models/llama_gqa")).expect("fixture model");
        let dir = tempfile::tempdir().expect("temp dir");
        let mut dirs = Vec::new();
        for (ty, src) in [
            ("LORA", "train/llama_gqa/lora_all/adapter_init"),
            ("DORA", "train/llama_gqa/dora/adapter_init"),
            ("IA3", "methods/ia3/adapter"),
            ("PREFIX_TUNING", "methods/prefix/adapter"),
            ("PROMPT_TUNING", "methods/prompt/adapter"),
        ] {
            let d = dir.path().join(ty);
            std::fs::create_dir(&d).expect("mkdir");
            std::fs::copy(
                fx.join(src).join("adapter_model.safetensors"),
                d.join("adapter_model.safetensors"),
            )
            .expect("fixture adapter weights");
            dirs.push((ty, d));
        }
        Env {
            model: Mutex::new(model),
            _dir: dir,
            dirs,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    let v: Option<serde_json::Value> = serde_json::from_slice(data).ok();
    let ty = v
        .as_ref()
        .and_then(|v| v.get("peft_type"))
        .and_then(|t| t.as_str())
        .unwrap_or("LORA");
    let dora = v
        .as_ref()
        .and_then(|v| v.get("use_dora"))
        .is_some_and(|d| d == &serde_json::Value::Bool(true));
    let key = if ty == "LORA" && dora { "DORA" } else { ty };
    let dir = &env
        .dirs
        .iter()
        .find(|(t, _)| *t == key)
        .unwrap_or(&env.dirs[0])
        .1;
    std::fs::write(dir.join("adapter_config.json"), data).expect("write config");

    if let Ok(a) = AdapterDir::open(dir) {
        let _ = a.lora_config();
        let _ = a.ia3_config();
        let _ = a.lora_modules();
        let _ = a.ia3_modules();
        let _ = a.replacement_tensors();
        if let Ok(ctx) = inspect::config::Context::of(&a) {
            let _ = (ctx.summary(), ctx.method());
        }
    }
    let _ = inspect::load(dir, None);
    let mut model = env.model.lock().unwrap_or_else(|p| p.into_inner());
    let _ = lora::load_for_inference(&mut model, dir, 0);
});

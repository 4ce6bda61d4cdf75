//! quantize-nf4 and the core 4-bit code against bitsandbytes 0.50.2 (CPU) and transformers 5.24:
//! function-level vectors bit for bit, checkpoints transformers wrote read back and dequantized
//! exactly, our output equal tensor for tensor to transformers' own 4-bit save, and clean
//! errors. Fixtures: tests/fixtures/nf4 (tests/fixtures/generate_nf4.py).

use peftkit_core::io::safetensors_file::{OutDtype, SafetensorsFile};
use peftkit_core::quant::blockwise::{dequantize_4bit, quantize_4bit, Source, SrcDtype};
use peftkit_core::quant::checkpoint::read_quantized;
use peftkit_core::quant::codebook::{QuantType, DYNAMIC_MAP};
use peftkit_core::quant::double_quant::double_quantize;
use peftkit_core::quant::torch_mean::TorchReduce;
use peftkit_core::quant::weight::{quantize_weight, StoredAbsmax};
use peftkit_tests::{assert_clean_error, copy_dir, fixtures, run};
use safetensors::Dtype;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn nf4_dir() -> PathBuf {
    fixtures().join("nf4")
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn open(path: &Path) -> SafetensorsFile {
    SafetensorsFile::open(path).unwrap()
}

fn bytes(f: &SafetensorsFile, name: &str) -> Vec<u8> {
    f.get(name)
        .unwrap_or_else(|| panic!("{name} missing in {}", f.path().display()))
        .bytes
        .to_vec()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn src_dtype(name: &str) -> (SrcDtype, OutDtype) {
    match name {
        "float32" => (SrcDtype::F32, OutDtype::F32),
        "bfloat16" => (SrcDtype::BF16, OutDtype::BF16),
        "float16" => (SrcDtype::F16, OutDtype::F16),
        other => panic!("dtype {other}"),
    }
}

fn encode(values: &[f32], dtype: OutDtype) -> Vec<u8> {
    peftkit_core::io::safetensors_file::encode_f32(values, dtype)
}

#[test]
fn code_tables_are_bitsandbytes_tables() {
    let v = open(&nf4_dir().join("vectors.safetensors"));
    assert_eq!(bytes(&v, "code.nf4"), f32_bytes(QuantType::Nf4.code()));
    assert_eq!(bytes(&v, "code.fp4"), f32_bytes(QuantType::Fp4.code()));
    assert_eq!(bytes(&v, "code.dynamic"), f32_bytes(&DYNAMIC_MAP));
}

/// Every case × {nf4, fp4} × {64, 128, 256} × {plain, double quant}: packed bytes, absmax,
/// nested absmax, offset and JSON blob identical to bitsandbytes; dequantization identical too.
#[test]
fn bit_exact_with_bitsandbytes_vectors() {
    let v = open(&nf4_dir().join("vectors.safetensors"));
    let meta = json(&nf4_dir().join("vectors.json"));
    let mut checked = 0;
    for (case, info) in meta["cases"].as_object().unwrap() {
        let (sd, od) = src_dtype(info["dtype"].as_str().unwrap());
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let input = bytes(&v, &format!("input.{case}"));
        let n: usize = shape.iter().product();
        let mut as_f32 = vec![0f32; n];
        Source::Bytes(&input, sd).load(0, &mut as_f32);
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for bs in [64usize, 128, 256] {
                for dq in [false, true] {
                    let key = format!(
                        "{case}.{}.{bs}.{}",
                        qt.name(),
                        if dq { "dq" } else { "plain" }
                    );
                    let want = &meta["results"][&key];
                    let w = quantize_weight(
                        Source::Bytes(&input, sd),
                        &shape,
                        od,
                        qt,
                        bs,
                        dq,
                        TorchReduce::detect(),
                    )
                    .unwrap();
                    assert_eq!(
                        w.packed,
                        bytes(&v, &format!("{key}.packed")),
                        "{key} packed"
                    );
                    let json_blob = bytes(&v, &format!("{key}.quant_state"));
                    assert_eq!(
                        w.state.to_json(),
                        String::from_utf8(json_blob).unwrap(),
                        "{key} quant state"
                    );
                    assert_eq!(w.state.to_json(), want["json"].as_str().unwrap());
                    match &w.absmax {
                        StoredAbsmax::F32(a) => {
                            assert!(!dq);
                            assert_eq!(f32_bytes(a), bytes(&v, &format!("{key}.absmax")), "{key}");
                        }
                        StoredAbsmax::Double(d) => {
                            assert!(dq);
                            assert_eq!(d.absmax, bytes(&v, &format!("{key}.absmax")), "{key}");
                            assert_eq!(
                                f32_bytes(&d.nested_absmax),
                                bytes(&v, &format!("{key}.nested_absmax")),
                                "{key} nested_absmax"
                            );
                            assert_eq!(d.offset as f64, want["offset"].as_f64().unwrap(), "{key}");
                        }
                    }
                    // the same through the plain f32 entry points
                    let (p, a) = quantize_4bit(&as_f32, bs, qt);
                    assert_eq!(p, w.packed, "{key} f32 path");
                    if dq {
                        let d = double_quantize(&a);
                        assert_eq!(StoredAbsmax::Double(d), w.absmax, "{key} double_quantize");
                    }
                    if bs == 64 {
                        let deq = dequantize_4bit(&w.packed, &w.absmax_f32(), n, bs, qt.code());
                        let got = encode(&deq, od);
                        let want = bytes(&v, &format!("{key}.dequantized"));
                        assert_eq!(got.len(), want.len());
                        // FP4 index 8 is +0.0 in the code table and in bitsandbytes' PyTorch and
                        // AVX-512 paths, -0.0 in its scalar/AVX2 CPU kernel: only zeros may
                        // differ, and only in their sign
                        let size = od.st().bitsize() / 8;
                        for (i, (a, b)) in got.chunks(size).zip(want.chunks(size)).enumerate() {
                            let zero = |x: &[u8]| {
                                x[..size - 1].iter().all(|&v| v == 0) && x[size - 1] & 0x7f == 0
                            };
                            let sign_only = qt == QuantType::Fp4 && zero(a) && zero(b);
                            assert!(a == b || sign_only, "{key} dequantized [{i}]");
                        }
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 7 * 12);
}

/// Weights transformers wrote (nf4, double quant) read back and dequantized exactly as
/// bitsandbytes' dequantize_4bit.
#[test]
fn reads_transformers_checkpoints() {
    for (model, expected_weights) in [("llama_gqa", 14), ("gpt2", 2)] {
        let ck = open(&nf4_dir().join(format!("{model}-bnb/model.safetensors")));
        let refs = open(&nf4_dir().join(format!("{model}-bnb.dequantized.safetensors")));
        let mut n = 0;
        for name in refs.names() {
            let q = read_quantized(&ck, &name).unwrap().expect("4-bit weight");
            assert_eq!(q.quant_type(), QuantType::Nf4);
            assert_eq!(q.blocksize(), 64);
            assert_eq!(q.dtype(), OutDtype::F32);
            let r = refs.get(&name).unwrap();
            assert_eq!(q.shape(), r.shape, "{name}: [out, in]");
            assert!(
                f32_bytes(&q.dequantize()) == r.bytes,
                "{model} {name}: dequantized values differ"
            );
            n += 1;
        }
        assert_eq!(n, expected_weights);
        // a plain tensor is not 4-bit
        let plain = if model == "gpt2" {
            "transformer.wte.weight"
        } else {
            "model.embed_tokens.weight"
        };
        assert!(read_quantized(&ck, plain).unwrap().is_none());
    }
}

fn quantize(model: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run("quantize-nf4", &args)
}

/// Tensor names, dtypes, shapes and bytes of two safetensors files are identical.
fn assert_same_tensors(got: &Path, want: &Path) {
    let (g, w) = (open(got), open(want));
    let mut gn = g.names();
    let mut wn = w.names();
    gn.sort();
    wn.sort();
    assert_eq!(gn, wn, "tensor names of {}", got.display());
    for name in &wn {
        let (a, b) = (g.get(name).unwrap(), w.get(name).unwrap());
        assert_eq!(a.dtype, b.dtype, "{name} dtype");
        assert_eq!(a.shape, b.shape, "{name} shape");
        assert!(a.bytes == b.bytes, "{name}: bytes differ");
    }
}

/// quantize-nf4 on the f32 fixture models writes exactly what transformers + bitsandbytes
/// write for load_in_4bit (nf4, double quant, compute float32): same tensors byte for byte, same
/// quantization_config. That is what makes transformers load our output (checked by hand once:
/// `AutoModelForCausalLM.from_pretrained` gives the reference logits of reference.json).
#[test]
fn cli_output_equals_transformers_checkpoint() {
    for model in ["llama_gqa", "gpt2"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("q");
        let src = fixtures().join("models").join(model);
        let o = quantize(&src, &out, &["--compute-dtype", "f32", "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(summary["mode"], "quantize");
        assert_eq!(
            summary["tensors_quantized"],
            if model == "gpt2" { 8 } else { 14 }
        );
        assert!(summary["bytes_out"].as_u64().unwrap() < summary["bytes_in"].as_u64().unwrap());

        let bnb = nf4_dir().join(format!("{model}-bnb"));
        assert_same_tensors(
            &out.join("model.safetensors"),
            &bnb.join("model.safetensors"),
        );
        let meta = open(&out.join("model.safetensors"));
        assert_eq!(meta.user_metadata().unwrap()["format"], "pt");

        let ours = json(&out.join("config.json"));
        let theirs = json(&bnb.join("config.json"));
        assert_eq!(ours["quantization_config"], theirs["quantization_config"]);
        let mut a = ours.as_object().unwrap().clone();
        let mut b = theirs.as_object().unwrap().clone();
        for m in [&mut a, &mut b] {
            m.remove("quantization_config");
        }
        assert_eq!(a, b, "{model}: the rest of config.json is unchanged");
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert_eq!(
                std::fs::read(out.join(f)).unwrap(),
                std::fs::read(src.join(f)).unwrap(),
                "{f} copied"
            );
        }
    }
}

/// --dequantize of the checkpoints transformers wrote: 4-bit weights become bitsandbytes'
/// dequantize_4bit values (GPT-2 back in Conv1D [in, out] layout), every other tensor is kept,
/// and quantization_config is gone.
#[test]
fn dequantize_transformers_checkpoint() {
    for model in ["llama_gqa", "gpt2"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("plain");
        let bnb = nf4_dir().join(format!("{model}-bnb"));
        let o = quantize(&bnb, &out, &["--dequantize", "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(summary["mode"], "dequantize");

        let got = open(&out.join("model.safetensors"));
        let refs = open(&nf4_dir().join(format!("{model}-bnb.dequantized.safetensors")));
        for name in refs.names() {
            let r = refs.get(&name).unwrap();
            let g = got.get(&name).unwrap();
            assert_eq!(g.dtype, Dtype::F32);
            if model == "gpt2" {
                let (rows, cols) = (r.shape[0], r.shape[1]);
                assert_eq!(g.shape, &[cols, rows], "{name}: Conv1D layout");
                let want: Vec<f32> = refs.f32_checked(&name, r.shape).unwrap();
                let have: Vec<f32> = got.f32_checked(&name, g.shape).unwrap();
                for i in 0..rows {
                    for j in 0..cols {
                        assert_eq!(
                            have[j * rows + i].to_bits(),
                            want[i * cols + j].to_bits(),
                            "{name}[{i},{j}]"
                        );
                    }
                }
            } else {
                assert_eq!(g.shape, r.shape);
                assert!(g.bytes == r.bytes, "{name}: dequantized bytes differ");
            }
        }
        // the plain model has exactly the tensors of the original fp model
        let orig = open(
            &fixtures()
                .join("models")
                .join(model)
                .join("model.safetensors"),
        );
        let mut a = got.names();
        let mut b = orig.names();
        a.sort();
        b.sort();
        assert_eq!(a, b);
        let bnb_st = open(&bnb.join("model.safetensors"));
        for name in &b {
            let t = got.get(name).unwrap();
            assert_eq!(t.shape, orig.get(name).unwrap().shape, "{name}");
            if read_quantized(&bnb_st, name).unwrap().is_none() {
                assert!(t.bytes == bnb_st.get(name).unwrap().bytes, "{name} copied");
            }
        }
        let c = json(&out.join("config.json"));
        assert!(c.get("quantization_config").is_none());
        assert_eq!(
            c["model_type"],
            json(&bnb.join("config.json"))["model_type"]
        );
    }
}

/// Our own output read back (fp4, no double quant, blocksize 128, bf16 weights): the 4-bit
/// weights are what the core API computes, and --dequantize gives their dequantization in bf16.
#[test]
fn fp4_plain_bf16_roundtrip() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("models/llama_untied");
    let q = tmp.path().join("q");
    let o = quantize(
        &src,
        &q,
        &[
            "--quant-type",
            "fp4",
            "--no-double-quant",
            "--blocksize",
            "128",
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stderr.is_empty(), "--quiet prints nothing");
    let orig = open(&src.join("model.safetensors"));
    let qf = open(&q.join("model.safetensors"));
    let name = "model.layers.1.mlp.gate_proj.weight";
    let t = orig.get(name).unwrap();
    assert_eq!(t.dtype, Dtype::BF16);
    let w = quantize_weight(
        Source::Bytes(t.bytes, SrcDtype::BF16),
        t.shape,
        OutDtype::BF16,
        QuantType::Fp4,
        128,
        false,
        TorchReduce::detect(),
    )
    .unwrap();
    for (spec, b) in w.tensors(name) {
        let g = qf.get(&spec.name).unwrap();
        assert_eq!(g.dtype, spec.dtype, "{}", spec.name);
        assert!(g.bytes == &b[..], "{}", spec.name);
    }
    assert!(qf.get(&format!("{name}.nested_absmax")).is_none());
    assert_eq!(qf.get(&format!("{name}.absmax")).unwrap().dtype, Dtype::F32);
    // lm_head (untied) and embeddings stay bf16
    assert_eq!(
        qf.get("lm_head.weight").unwrap().bytes,
        orig.get("lm_head.weight").unwrap().bytes
    );
    let qc = json(&q.join("config.json"))["quantization_config"].clone();
    assert_eq!(qc["bnb_4bit_quant_type"], "fp4");
    assert_eq!(qc["bnb_4bit_use_double_quant"], false);
    assert_eq!(qc["bnb_4bit_compute_dtype"], "bfloat16");

    let back = tmp.path().join("back");
    let o = quantize(&q, &back, &["--dequantize", "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bf = open(&back.join("model.safetensors"));
    let g = bf.get(name).unwrap();
    assert_eq!(g.dtype, Dtype::BF16);
    let n: usize = t.shape.iter().product();
    let deq = dequantize_4bit(&w.packed, &w.absmax_f32(), n, 128, QuantType::Fp4.code());
    assert!(g.bytes == &encode(&deq, OutDtype::BF16)[..]);
    assert!(json(&back.join("config.json"))
        .get("quantization_config")
        .is_none());
}

/// A sharded input (model.safetensors.index.json) gives the same single-file output.
#[test]
fn sharded_input() {
    use peftkit_core::io::safetensors_file::{write_streaming, TensorSpec};
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("models/gpt2");
    let sharded = tmp.path().join("sharded");
    copy_dir(&src, &sharded);
    std::fs::remove_file(sharded.join("model.safetensors")).unwrap();
    let orig = open(&src.join("model.safetensors"));
    let names = orig.names();
    let mut weight_map = serde_json::Map::new();
    for (k, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", k + 1);
        let specs: Vec<TensorSpec> = part
            .iter()
            .map(|n| {
                let t = orig.get(n).unwrap();
                TensorSpec {
                    name: n.clone(),
                    dtype: t.dtype,
                    shape: t.shape.to_vec(),
                }
            })
            .collect();
        write_streaming(&sharded.join(&file), &specs, &Default::default(), |i| {
            Ok(orig.get(&part[i]).unwrap().bytes.to_vec())
        })
        .unwrap();
        for n in part {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let out = tmp.path().join("q");
    let o = quantize(&sharded, &out, &["--compute-dtype", "f32", "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same_tensors(
        &out.join("model.safetensors"),
        &nf4_dir().join("gpt2-bnb/model.safetensors"),
    );
    assert!(!out.join("model.safetensors.index.json").exists());
    assert!(!out.join("model-00001-of-00002.safetensors").exists());
}

#[test]
fn skip_list_keeps_modules_and_is_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let o = quantize(
        &fixtures().join("models/qwen2"),
        &out,
        &["--skip", "down_proj,model.layers.1.self_attn", "--json"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["tensors_quantized"], 14 - 2 - 4);
    let f = open(&out.join("model.safetensors"));
    assert_eq!(
        f.get("model.layers.0.mlp.down_proj.weight").unwrap().dtype,
        Dtype::F16
    );
    assert_eq!(
        f.get("model.layers.1.self_attn.q_proj.weight")
            .unwrap()
            .dtype,
        Dtype::F16
    );
    assert_eq!(
        f.get("model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .dtype,
        Dtype::U8
    );
    // q/k/v biases of Qwen2 are copied as they are
    assert_eq!(
        f.get("model.layers.0.self_attn.q_proj.bias").unwrap().dtype,
        Dtype::F16
    );
    let c = json(&out.join("config.json"));
    assert_eq!(
        c["quantization_config"]["llm_int8_skip_modules"],
        serde_json::json!(["lm_head", "down_proj", "model.layers.1.self_attn"])
    );
    // chat_template.jinja is copied with the tokenizer files
    assert!(out.join("chat_template.jinja").exists());
}

/// Copy `model` and set element `index` of tensor `name` (f32) to `value` in the copy.
fn poisoned_copy(model: &str, name: &str, index: usize, value: f32, dst: &Path) {
    copy_dir(&fixtures().join("models").join(model), dst);
    let path = dst.join("model.safetensors");
    let (start, dtype) = {
        let f = open(&path);
        let info = f.info(name).unwrap();
        (info.data_offsets.0, info.dtype)
    };
    assert_eq!(dtype, Dtype::F32);
    let mut b = std::fs::read(&path).unwrap();
    let header = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let at = 8 + header + start + 4 * index;
    b[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&path, b).unwrap();
}

fn assert_nothing_written(parent: &Path, expected: &[&str]) {
    let mut left: Vec<String> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, expected, "output left behind");
}

#[test]
fn nan_or_inf_weight_is_refused_naming_the_tensor() {
    for (value, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("m");
        poisoned_copy(
            "llama_gqa",
            "model.layers.1.mlp.up_proj.weight",
            70,
            value,
            &model,
        );
        let out = tmp.path().join("q");
        for extra in [&[][..], &["--no-double-quant"][..]] {
            let o = quantize(&model, &out, extra);
            assert_clean_error(&o, "model.layers.1.mlp.up_proj.weight");
            assert_clean_error(&o, "model.safetensors");
            assert_clean_error(&o, &format!("{shown} at [1, 6]"));
            assert_eq!(o.status.code(), Some(3));
            assert_nothing_written(tmp.path(), &["m"]);
        }
    }
    // GPT-2: the position is reported in the file's Conv1D layout
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    poisoned_copy(
        "gpt2",
        "transformer.h.0.mlp.c_fc.weight",
        300,
        f32::NAN,
        &model,
    );
    let o = quantize(&model, &tmp.path().join("q"), &[]);
    assert_clean_error(
        &o,
        "transformer.h.0.mlp.c_fc.weight has a non-finite value (NaN at [1, 44])",
    );
}

#[test]
fn bad_invocations_end_in_one_error_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let llama = fixtures().join("models/llama_gqa");

    let o = quantize(Path::new("/nonexistent/model"), &out, &[]);
    assert_clean_error(&o, "/nonexistent/model");
    assert_eq!(o.status.code(), Some(4));

    let copy = tmp.path().join("m");
    copy_dir(&llama, &copy);
    let o = quantize(&copy, &copy, &[]);
    assert_clean_error(&o, "would overwrite the input");
    assert_eq!(o.status.code(), Some(2));

    let o = quantize(&llama, &out, &["--blocksize", "48"]);
    assert_clean_error(&o, "--blocksize 48");
    assert_eq!(o.status.code(), Some(2));
    let o = quantize(&llama, &out, &["--quant-type", "int4"]);
    assert_clean_error(&o, "unknown quantization type 'int4'");
    assert_eq!(o.status.code(), Some(2));
    let o = quantize(&llama, &out, &["--compute-dtype", "f8"]);
    assert_clean_error(&o, "unknown dtype 'f8'");
    assert_eq!(o.status.code(), Some(2));

    let bnb = nf4_dir().join("llama_gqa-bnb");
    let o = quantize(&bnb, &out, &[]);
    assert_clean_error(&o, "already quantized");
    assert_eq!(o.status.code(), Some(2));
    let o = quantize(&llama, &out, &["--dequantize"]);
    assert_clean_error(&o, "no 4-bit weights");
    assert_eq!(o.status.code(), Some(2));

    let mut cfg = json(&copy.join("config.json"));
    cfg["model_type"] = "falcon".into();
    std::fs::write(copy.join("config.json"), cfg.to_string()).unwrap();
    let o = quantize(&copy, &out, &[]);
    assert_clean_error(&o, "model_type \"falcon\" is not supported");
    assert_clean_error(&o, "config.json");
    assert_eq!(o.status.code(), Some(3));
    assert_nothing_written(tmp.path(), &["m"]);
}

#[test]
fn help_shows_examples() {
    let o = run("quantize-nf4", &["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Examples:"), "{text}");
    assert!(text.contains("--dequantize"));
    assert!(text.contains("--double-quant"));
}

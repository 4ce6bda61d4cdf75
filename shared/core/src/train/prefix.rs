//! Prefix tuning (Li & Liang 2021) and P-Tuning v2: trainable keys and values put in front of
//! every sequence in every layer, with PEFT's semantics and file format (`PREFIX_TUNING`).
//!
//! The prefix `P [n, layers·2·kv_dim]` holds, per virtual token, each layer's key then value,
//! each `[kv_heads, head_dim]` (PEFT's layout; GQA models use kv_dim, as PEFT's `token_dim`).
//! P-Tuning v2 trains P directly; prefix tuning with `--prefix-projection H` trains an
//! embedding `[n, kv_dim]` and the MLP `Linear(kv_dim, H) → tanh → Linear(H, layers·2·kv_dim)`
//! that produces P (the reparameterization of the paper). Either way the saved adapter holds P
//! itself as `prompt_embeddings`, as PEFT saves it. Prefix keys get no rotary embedding and
//! the sequence's positions start after the prefix (transformers' past-key-values semantics).

use super::adapter_files::{sorted_json, write_adapter};
use super::params::{ParamState, Slot, TrainState};
use crate::error::{Error, Result};
use crate::io::safetensors_file::{to_f32, SafetensorsFile};
use crate::kernels::gemm;
use crate::model::hooks::KvPrefix;
use crate::model::Model;
use crate::rng::Rng;
use serde_json::{json, Value};
use std::path::Path;

#[derive(Clone, Debug)]
pub struct PrefixConfig {
    pub num_virtual_tokens: usize,
    /// Hidden size of the reparameterization MLP (None = P-Tuning v2, P trained directly).
    pub projection: Option<usize>,
    pub base_model_name_or_path: Option<String>,
}

/// The reparameterization MLP: `P = W2·tanh(W1·e + b1) + b2` per virtual token.
#[derive(Clone, Debug)]
pub struct PrefixMlp {
    pub hidden: usize,
    /// `[hidden, kv_dim]`
    pub w1: Vec<f32>,
    pub b1: Vec<f32>,
    /// `[out, hidden]`
    pub w2: Vec<f32>,
    pub b2: Vec<f32>,
}

/// Trainable prefix of a run.
#[derive(Clone, Debug)]
pub struct PrefixParams {
    pub n: usize,
    pub layers: usize,
    pub kv_dim: usize,
    /// `[n, out]` without projection, `[n, kv_dim]` with it.
    pub emb: Vec<f32>,
    pub mlp: Option<PrefixMlp>,
}

/// What the backward pass of the prefix needs from its forward pass.
pub struct PrefixValues {
    /// `[n, layers·2·kv_dim]`
    pub p: Vec<f32>,
    /// tanh activations `[n, hidden]` (projection only).
    h: Option<Vec<f32>>,
}

impl PrefixParams {
    /// Width of P: every layer's key and value.
    pub fn out_dim(&self) -> usize {
        self.layers * 2 * self.kv_dim
    }

    /// P (through the MLP when there is one).
    pub fn values(&self) -> PrefixValues {
        let Some(m) = &self.mlp else {
            return PrefixValues {
                p: self.emb.clone(),
                h: None,
            };
        };
        let (n, out) = (self.n, self.out_dim());
        let mut h = vec![0.0f32; n * m.hidden];
        gemm::matmul_nt(&self.emb, &m.w1, &mut h, n, m.hidden, self.kv_dim, false);
        for row in h.chunks_exact_mut(m.hidden) {
            row.iter_mut()
                .zip(&m.b1)
                .for_each(|(v, b)| *v = (*v + b).tanh());
        }
        let mut p = vec![0.0f32; n * out];
        gemm::matmul_nt(&h, &m.w2, &mut p, n, out, m.hidden, false);
        for row in p.chunks_exact_mut(out) {
            row.iter_mut().zip(&m.b2).for_each(|(v, b)| *v += b);
        }
        PrefixValues { p, h: Some(h) }
    }
}

/// Gradients of the prefix parameters from dL/dP (added into the state's gradients).
pub fn backward(state: &mut TrainState, vals: &PrefixValues, dp: &[f32]) {
    let Some(pp) = state.prefix.take() else {
        return;
    };
    match (&pp.mlp, &vals.h) {
        (None, _) => {
            if let Some(g) = state.grad_mut(Slot::PrefixEmbedding) {
                g.iter_mut().zip(dp).for_each(|(a, b)| *a += b);
            }
        }
        (Some(m), Some(h)) => {
            let (n, out, kv) = (pp.n, pp.out_dim(), pp.kv_dim);
            if let Some(g) = state.grad_mut(Slot::PrefixW2) {
                gemm::matmul_tn(dp, h, g, out, m.hidden, n, true);
            }
            if let Some(g) = state.grad_mut(Slot::PrefixB2) {
                for row in dp.chunks_exact(out) {
                    g.iter_mut().zip(row).for_each(|(a, b)| *a += b);
                }
            }
            let mut dz = vec![0.0f32; n * m.hidden];
            gemm::matmul_nn(dp, &m.w2, &mut dz, n, m.hidden, out, false);
            dz.iter_mut().zip(h).for_each(|(g, t)| *g *= 1.0 - t * t);
            if let Some(g) = state.grad_mut(Slot::PrefixW1) {
                gemm::matmul_tn(&dz, &pp.emb, g, m.hidden, kv, n, true);
            }
            if let Some(g) = state.grad_mut(Slot::PrefixB1) {
                for row in dz.chunks_exact(m.hidden) {
                    g.iter_mut().zip(row).for_each(|(a, b)| *a += b);
                }
            }
            if let Some(g) = state.grad_mut(Slot::PrefixEmbedding) {
                gemm::matmul_nn(&dz, &m.w1, g, n, kv, m.hidden, true);
            }
        }
        (Some(_), None) => unreachable!("prefix MLP without saved activations"),
    }
    state.prefix = Some(pp);
}

const ENCODER: &str = "prompt_encoder.default";

/// Build a fresh prefix (PEFT's initialization: embedding N(0,1); the MLP's Linear layers as
/// torch initializes them) and register its tensors.
pub fn attach(
    model: &Model,
    state: &mut TrainState,
    cfg: &PrefixConfig,
    rng: &mut Rng,
) -> Result<()> {
    let c = &model.config;
    let n = cfg.num_virtual_tokens;
    if n == 0 {
        return Err(Error::usage("--num-virtual-tokens must be at least 1"));
    }
    let kv_dim = c.kv_dim();
    let out = c.layers * 2 * kv_dim;
    let mlp = cfg.projection.map(|hidden| {
        let linear = |o: usize, i: usize, rng: &mut Rng| {
            // torch.nn.Linear: kaiming-uniform(a=√5) weight and uniform(±1/√in) bias.
            let bound = 1.0 / (i as f32).sqrt();
            let w: Vec<f32> = (0..o * i)
                .map(|_| rng.uniform_range(-bound, bound))
                .collect();
            let b: Vec<f32> = (0..o).map(|_| rng.uniform_range(-bound, bound)).collect();
            (w, b)
        };
        let (w1, b1) = linear(hidden, kv_dim, rng);
        let (w2, b2) = linear(out, hidden, rng);
        PrefixMlp {
            hidden,
            w1,
            b1,
            w2,
            b2,
        }
    });
    let emb_dim = if mlp.is_some() { kv_dim } else { out };
    let emb: Vec<f32> = (0..n * emb_dim).map(|_| rng.normal()).collect();
    let p = PrefixParams {
        n,
        layers: c.layers,
        kv_dim,
        emb,
        mlp,
    };
    register(state, &p);
    state.prefix = Some(p);
    Ok(())
}

/// Make `p` the run's trainable prefix (its tensors under PEFT's parameter names).
pub fn set_trainable(state: &mut TrainState, p: PrefixParams) {
    register(state, &p);
    state.prefix = Some(p);
}

fn register(state: &mut TrainState, p: &PrefixParams) {
    let emb_dim = p.emb.len() / p.n;
    state.add(
        Slot::PrefixEmbedding,
        ParamState::new(
            format!("{ENCODER}.embedding.weight"),
            vec![p.n, emb_dim],
            true,
        ),
    );
    if let Some(m) = &p.mlp {
        let out = p.out_dim();
        for (slot, name, shape, decay) in [
            (
                Slot::PrefixW1,
                "transform.0.weight",
                vec![m.hidden, p.kv_dim],
                true,
            ),
            (Slot::PrefixB1, "transform.0.bias", vec![m.hidden], false),
            (
                Slot::PrefixW2,
                "transform.2.weight",
                vec![out, m.hidden],
                true,
            ),
            (Slot::PrefixB2, "transform.2.bias", vec![out], false),
        ] {
            state.add(
                slot,
                ParamState::new(format!("{ENCODER}.{name}"), shape, decay),
            );
        }
    }
}

/// adapter_config.json as PEFT 0.21 writes it for prefix tuning (GQA: token_dim = kv_dim and
/// num_attention_heads = kv heads).
pub fn config_json(cfg: &PrefixConfig, model: &Model, task_type: &str) -> String {
    let c = &model.config;
    let v = json!({
        "auto_mapping": null,
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "encoder_hidden_size": cfg.projection.unwrap_or(c.hidden),
        "inference_mode": true,
        "init_weights": null,
        "modules_to_save": null,
        "num_attention_heads": c.kv_heads,
        "num_layers": c.layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": cfg.projection.is_some(),
        "revision": null,
        "task_type": task_type,
        "token_dim": c.kv_dim(),
    });
    sorted_json(v)
}

/// Write the adapter: `prompt_embeddings` = P (the MLP's output when reparameterized).
pub fn save_adapter(
    dir: &Path,
    cfg: &PrefixConfig,
    model: &Model,
    state: &TrainState,
    task_type: &str,
) -> Result<()> {
    let p = state.prefix.as_ref().expect("prefix");
    let tensor = (
        "prompt_embeddings".to_string(),
        vec![p.n, p.out_dim()],
        p.values().p,
    );
    write_adapter(dir, &[tensor], &config_json(cfg, model, task_type))
}

/// Read a PEFT prefix-tuning adapter: P `[n, layers·2·kv_dim]` (trainable as P-Tuning v2).
pub fn load_adapter(dir: &Path, cfg: &Value, model: &Model, state: &mut TrainState) -> Result<()> {
    let c = &model.config;
    let cfg_path = dir.join("adapter_config.json");
    let st_path = dir.join("adapter_model.safetensors");
    let get = |k: &str| cfg.get(k).and_then(Value::as_u64).map(|v| v as usize);
    let n = get("num_virtual_tokens")
        .ok_or_else(|| Error::bad_input(&cfg_path, "num_virtual_tokens is missing"))?;
    if get("num_layers").is_some_and(|l| l != c.layers)
        || get("token_dim").is_some_and(|t| t != c.kv_dim())
    {
        return Err(Error::bad_input(
            &cfg_path,
            format!(
                "prefix for {} layers of token_dim {}, but this model has {} layers of kv_dim {}",
                get("num_layers").unwrap_or(0),
                get("token_dim").unwrap_or(0),
                c.layers,
                c.kv_dim()
            ),
        ));
    }
    let file = SafetensorsFile::open(&st_path)?;
    let t = file.require("prompt_embeddings")?;
    let out = c.layers * 2 * c.kv_dim();
    if *t.shape != [n, out] {
        return Err(Error::bad_input(
            &st_path,
            format!(
                "prompt_embeddings has shape {:?}, expected [{n}, {out}] (num_virtual_tokens × layers·2·kv_dim)",
                t.shape
            ),
        ));
    }
    let p = PrefixParams {
        n,
        layers: c.layers,
        kv_dim: c.kv_dim(),
        emb: to_f32("prompt_embeddings", &t).map_err(|m| Error::bad_input(&st_path, m))?,
        mlp: None,
    };
    register(state, &p);
    state.prefix = Some(p);
    Ok(())
}

/// One layer's prefix keys and values for inference (a pre-filled KV cache).
pub struct PrefixLayer {
    n: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvPrefix for PrefixLayer {
    fn len(&self) -> usize {
        self.n
    }
    fn keys_values(&self, _layer: usize) -> (&[f32], &[f32]) {
        (&self.k, &self.v)
    }
}

/// Install the prefix of `state` into adapter slot `slot` of every attention layer.
pub fn install(model: &mut Model, state: TrainState, slot: usize) {
    let Some(pp) = state.prefix else { return };
    let vals = pp.values();
    let (n, kv, out) = (pp.n, pp.kv_dim, pp.out_dim());
    for (li, b) in model.blocks.iter_mut().enumerate() {
        let take = |off: usize| -> Vec<f32> {
            (0..n)
                .flat_map(|t| vals.p[t * out + off..t * out + off + kv].iter().copied())
                .collect()
        };
        let layer = PrefixLayer {
            n,
            k: take(2 * li * kv),
            v: take((2 * li + 1) * kv),
        };
        if b.attn.prefixes.len() <= slot {
            b.attn.prefixes.resize_with(slot + 1, || None);
        }
        b.attn.prefixes[slot] = Some(Box::new(layer));
    }
}

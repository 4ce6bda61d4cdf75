//! Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; the parallel form of He et
//! al. 2022): a small `down → activation → up` network added to a block's sub-layer output,
//! inside the residual. PEFT has no such method, so the file format is our own
//! (docs/adapters.md): `adapter_config.json` with `"peft_type": "BOTTLENECK"` and
//! `adapter_model.safetensors` with `<block>.{attention,mlp}_adapter.{down,up}.{weight,bias}`.
//!
//! - Houlsby: after attention and after the MLP, `h ← h + up(f(down(h)))`.
//! - Pfeiffer: after the MLP only.
//! - Parallel: after attention and after the MLP, from the sub-layer's (normalized) input:
//!   `h ← h + up(f(down(x)))`.
//!
//! The up projection starts at zero, so training starts exactly from the base model.

use super::adapter_files::{sorted_json, trainable_tensors, write_adapter};
use super::params::{ParamState, Slot, TrainState};
use crate::error::{Error, Result};
use crate::io::safetensors_file::{to_f32, SafetensorsFile};
use crate::kernels::{gemm, ops};
use crate::model::hooks::BlockAdapter;
use crate::model::Model;
use crate::rng::Rng;
use serde_json::{json, Value};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Houlsby,
    Pfeiffer,
    Parallel,
}

impl Variant {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "houlsby" => Ok(Self::Houlsby),
            "pfeiffer" => Ok(Self::Pfeiffer),
            "parallel" => Ok(Self::Parallel),
            _ => Err(Error::usage(format!(
                "unknown adapter variant {s}; expected houlsby, pfeiffer or parallel"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Houlsby => "houlsby",
            Self::Pfeiffer => "pfeiffer",
            Self::Parallel => "parallel",
        }
    }
    /// Sites (0 = after attention, 1 = after the MLP) that get an adapter.
    fn sites(self) -> &'static [usize] {
        match self {
            Self::Pfeiffer => &[1],
            _ => &[0, 1],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Relu,
    Silu,
}

impl Activation {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "relu" => Ok(Self::Relu),
            "silu" | "swish" => Ok(Self::Silu),
            _ => Err(Error::usage(format!(
                "unknown adapter activation {s}; expected relu or silu"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Relu => "relu",
            Self::Silu => "silu",
        }
    }
    fn apply(self, z: f32) -> f32 {
        match self {
            Self::Relu => z.max(0.0),
            Self::Silu => ops::silu(z),
        }
    }
    fn derivative(self, z: f32) -> f32 {
        match self {
            Self::Relu => {
                if z > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Silu => {
                let s = 1.0 / (1.0 + ops::exp_fast(-z));
                s * (1.0 + z * (1.0 - s))
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct BottleneckConfig {
    pub variant: Variant,
    /// Bottleneck width (0 = hidden / reduction_factor).
    pub size: usize,
    pub reduction_factor: usize,
    pub activation: Activation,
    pub base_model_name_or_path: Option<String>,
}

impl BottleneckConfig {
    fn width(&self, hidden: usize) -> usize {
        if self.size > 0 {
            self.size
        } else {
            (hidden / self.reduction_factor.max(1)).max(1)
        }
    }
}

/// One adapter: `down [size, hidden]`, `up [hidden, size]` with biases.
#[derive(Clone, Debug)]
pub struct Unit {
    pub hidden: usize,
    pub size: usize,
    pub down_w: Vec<f32>,
    pub down_b: Vec<f32>,
    pub up_w: Vec<f32>,
    pub up_b: Vec<f32>,
}

/// The adapters of a run: per block, per site.
#[derive(Clone, Debug)]
pub struct BottleneckParams {
    pub variant: Variant,
    pub activation: Activation,
    pub units: Vec<[Option<Unit>; 2]>,
}

/// What a unit's backward pass needs: the activation input and output `[rows, size]`.
pub struct UnitSaved {
    z: Vec<f32>,
    a: Vec<f32>,
}

impl BottleneckParams {
    pub fn unit(&self, block: usize, site: usize) -> Option<&Unit> {
        self.units.get(block).and_then(|u| u[site].as_ref())
    }
    pub fn parallel(&self) -> bool {
        self.variant == Variant::Parallel
    }
}

/// `up(f(down(src)))` `[rows, hidden]` and what the backward pass needs.
pub fn forward_unit(u: &Unit, act: Activation, src: &[f32], rows: usize) -> (Vec<f32>, UnitSaved) {
    let mut z = vec![0.0f32; rows * u.size];
    gemm::matmul_nt(src, &u.down_w, &mut z, rows, u.size, u.hidden, false);
    ops::add_bias(&mut z, &u.down_b);
    let a: Vec<f32> = z.iter().map(|&v| act.apply(v)).collect();
    let mut out = vec![0.0f32; rows * u.hidden];
    gemm::matmul_nt(&a, &u.up_w, &mut out, rows, u.hidden, u.size, false);
    ops::add_bias(&mut out, &u.up_b);
    (out, UnitSaved { z, a })
}

/// Gradients of unit (block, site) from the gradient `dout` of its output; returns dL/dsrc.
pub fn backward_unit(
    state: &mut TrainState,
    block: usize,
    site: usize,
    src: &[f32],
    saved: &UnitSaved,
    dout: &[f32],
    rows: usize,
) -> Vec<f32> {
    let bp = state.bottleneck.take().expect("bottleneck adapters");
    let u = bp.unit(block, site).expect("adapter unit");
    let (h, r) = (u.hidden, u.size);
    let slot = |part| Slot::Bottleneck(block, site, part);
    if let Some(g) = state.grad_mut(slot(2)) {
        gemm::matmul_tn(dout, &saved.a, g, h, r, rows, true);
    }
    if let Some(g) = state.grad_mut(slot(3)) {
        for row in dout.chunks_exact(h) {
            g.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
    }
    let mut dz = vec![0.0f32; rows * r];
    gemm::matmul_nn(dout, &u.up_w, &mut dz, rows, r, h, false);
    dz.iter_mut()
        .zip(&saved.z)
        .for_each(|(g, &z)| *g *= bp.activation.derivative(z));
    if let Some(g) = state.grad_mut(slot(0)) {
        gemm::matmul_tn(&dz, src, g, r, h, rows, true);
    }
    if let Some(g) = state.grad_mut(slot(1)) {
        for row in dz.chunks_exact(r) {
            g.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
    }
    let mut dsrc = vec![0.0f32; rows * h];
    gemm::matmul_nn(&dz, &u.down_w, &mut dsrc, rows, h, r, false);
    state.bottleneck = Some(bp);
    dsrc
}

fn site_name(site: usize) -> &'static str {
    if site == 0 {
        "attention_adapter"
    } else {
        "mlp_adapter"
    }
}

/// Block path prefix of the model's HF names (`model.layers.3`, `transformer.h.3`).
fn block_prefix(model: &Model, block: usize) -> String {
    let b = &model.blocks[block];
    b.attn_norm
        .name
        .rsplit_once('.')
        .map(|(p, _)| p.to_string())
        .unwrap_or_else(|| format!("layers.{block}"))
}

const PARTS: [&str; 4] = ["down.weight", "down.bias", "up.weight", "up.bias"];

fn register(model: &Model, state: &mut TrainState, bp: &BottleneckParams) {
    for (bi, sites) in bp.units.iter().enumerate() {
        for (site, u) in sites.iter().enumerate() {
            let Some(u) = u else { continue };
            let shapes = [
                vec![u.size, u.hidden],
                vec![u.size],
                vec![u.hidden, u.size],
                vec![u.hidden],
            ];
            for (part, shape) in shapes.into_iter().enumerate() {
                let name = format!(
                    "{}.{}.{}",
                    block_prefix(model, bi),
                    site_name(site),
                    PARTS[part]
                );
                state.add(
                    Slot::Bottleneck(bi, site, part),
                    ParamState::new(name, shape, part % 2 == 0),
                );
            }
        }
    }
}

/// Fresh adapters on every block: the down projection initialised as torch initializes a
/// Linear, the up projection and both biases zero, so the model starts exactly as the base
/// (Houlsby's near-identity start, made exact).
pub fn attach(
    model: &Model,
    state: &mut TrainState,
    cfg: &BottleneckConfig,
    rng: &mut Rng,
) -> Result<usize> {
    let h = model.config.hidden;
    let r = cfg.width(h);
    let mut units = vec![[None, None]; model.blocks.len()];
    for sites in units.iter_mut() {
        for &site in cfg.variant.sites() {
            // Kaiming-uniform(a=√5) like torch.nn.Linear for the down projection.
            let bound = 1.0 / (h as f32).sqrt();
            sites[site] = Some(Unit {
                hidden: h,
                size: r,
                down_w: (0..r * h)
                    .map(|_| rng.uniform_range(-bound, bound))
                    .collect(),
                down_b: vec![0.0; r],
                up_w: vec![0.0; h * r],
                up_b: vec![0.0; h],
            });
        }
    }
    let bp = BottleneckParams {
        variant: cfg.variant,
        activation: cfg.activation,
        units,
    };
    register(model, state, &bp);
    let n = bp.units.iter().flatten().flatten().count();
    state.bottleneck = Some(bp);
    Ok(n)
}

/// Trainable parameters of the adapters: per unit `2·hidden·size + size + hidden`.
pub fn param_count(cfg: &BottleneckConfig, model: &Model) -> usize {
    let (h, r) = (model.config.hidden, cfg.width(model.config.hidden));
    model.blocks.len() * cfg.variant.sites().len() * (2 * h * r + r + h)
}

pub fn config_json(cfg: &BottleneckConfig, model: &Model) -> String {
    let v = json!({
        "activation": cfg.activation.name(),
        "adapter_size": cfg.width(model.config.hidden),
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "format": "peftkit-bottleneck-1",
        "hidden_size": model.config.hidden,
        "num_layers": model.blocks.len(),
        "peft_type": "BOTTLENECK",
        "task_type": "CAUSAL_LM",
        "variant": cfg.variant.name(),
    });
    sorted_json(v)
}

pub fn save_adapter(
    dir: &Path,
    cfg: &BottleneckConfig,
    model: &Model,
    state: &TrainState,
) -> Result<()> {
    write_adapter(
        dir,
        &trainable_tensors(model, state),
        &config_json(cfg, model),
    )
}

/// Read one of our bottleneck adapters into `state` (trainable).
pub fn load_adapter(dir: &Path, cfg: &Value, model: &Model, state: &mut TrainState) -> Result<()> {
    let cfg_path = dir.join("adapter_config.json");
    let st_path = dir.join("adapter_model.safetensors");
    let s = |k: &str| cfg.get(k).and_then(Value::as_str).unwrap_or("");
    let variant =
        Variant::parse(s("variant")).map_err(|e| Error::bad_input(&cfg_path, e.to_string()))?;
    let activation = Activation::parse(s("activation"))
        .map_err(|e| Error::bad_input(&cfg_path, e.to_string()))?;
    let h = model.config.hidden;
    let file = SafetensorsFile::open(&st_path)?;
    let mut units = vec![[None, None]; model.blocks.len()];
    for (bi, sites) in units.iter_mut().enumerate() {
        for &site in variant.sites() {
            let mut parts: Vec<Vec<f32>> = Vec::new();
            let mut size = 0;
            for (part, suffix) in PARTS.iter().enumerate() {
                let name = format!("{}.{}.{suffix}", block_prefix(model, bi), site_name(site));
                let t = file.require(&name)?;
                if part == 0 {
                    size = t.shape.first().copied().unwrap_or(0);
                }
                let want: Vec<usize> = match part {
                    0 => vec![size, h],
                    1 => vec![size],
                    2 => vec![h, size],
                    _ => vec![h],
                };
                if *t.shape != want[..] {
                    return Err(Error::bad_input(
                        &st_path,
                        format!("{name} has shape {:?}, expected {want:?}", t.shape),
                    ));
                }
                parts.push(to_f32(&name, &t).map_err(|m| Error::bad_input(&st_path, m))?);
            }
            let mut it = parts.into_iter();
            sites[site] = Some(Unit {
                hidden: h,
                size,
                down_w: it.next().expect("down"),
                down_b: it.next().expect("down bias"),
                up_w: it.next().expect("up"),
                up_b: it.next().expect("up bias"),
            });
        }
    }
    let bp = BottleneckParams {
        variant,
        activation,
        units,
    };
    register(model, state, &bp);
    state.bottleneck = Some(bp);
    Ok(())
}

/// One block's adapters as an inference hook.
pub struct BottleneckHook {
    parallel: bool,
    activation: Activation,
    units: [Option<Unit>; 2],
}

impl BottleneckHook {
    fn apply(&self, site: usize, input: &[f32], h: &mut [f32], rows: usize) {
        if let Some(u) = &self.units[site] {
            let src = if self.parallel { input } else { &*h };
            let (out, _) = forward_unit(u, self.activation, src, rows);
            ops::add_assign(h, &out);
        }
    }
}

impl BlockAdapter for BottleneckHook {
    fn after_attention(&self, input: &[f32], h: &mut [f32], rows: usize) {
        self.apply(0, input, h, rows);
    }
    fn after_mlp(&self, input: &[f32], h: &mut [f32], rows: usize) {
        self.apply(1, input, h, rows);
    }
}

/// Install the adapters of `state` into adapter slot `slot` of every block.
pub fn install(model: &mut Model, state: TrainState, slot: usize) {
    let Some(bp) = state.bottleneck else { return };
    let parallel = bp.parallel();
    for (b, units) in model.blocks.iter_mut().zip(bp.units) {
        if b.adapters.len() <= slot {
            b.adapters.resize_with(slot + 1, || None);
        }
        b.adapters[slot] = Some(Box::new(BottleneckHook {
            parallel,
            activation: bp.activation,
            units,
        }));
    }
}

//! Combining several adapters into one (`adapter-merge --combine`), with the semantics of
//! PEFT 0.21.2's `LoraModel.add_weighted_adapter` (formats.md §3.3) and
//! `IA3Model.add_weighted_adapter`.
//!
//! LoRA, per module, over the adapters that have it (wᵢ user weight, sᵢ scaling):
//! * `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: A and B are combined
//!   separately with weights `sign(wᵢsᵢ)·√|wᵢsᵢ|` (A) and `√|wᵢsᵢ|` (B); equal ranks needed.
//!   (Not Σ wᵢΔWᵢ: the cross terms remain. `cat` and `svd` are the exact ones.)
//! * `cat`: A = rows wᵢsᵢAᵢ, B = columns Bᵢ, rank Σrᵢ: exactly Σ wᵢΔWᵢ.
//! * `svd` and `*_svd`: ΔW = combination of wᵢ·ΔWᵢ (ΔWᵢ including sᵢ, as PEFT 0.21.2; its
//!   later main branch multiplies by sᵢ once more), truncated SVD to `svd_rank` (default the
//!   largest rank): B = U·S, A = Vᵀ. Plain `svd` never forms ΔW (see lowrank.rs).
//!
//! The new config is the first adapter's with `r = lora_alpha = new rank` (scaling 1), empty
//! rank/alpha patterns and the union of the target modules. One deliberate difference: PEFT
//! copies `use_rslora` too, which silently scales the result by √r; we write
//! `use_rslora: false` so that the file means what was computed.
//!
//! IA3 (`linear` only, as PEFT): l = Σ wᵢ·lᵢ over the adapters that have the module.
//!
//! DARE's random masks come from our seeded generator (`--seed`), so they cannot equal
//! PyTorch's; everything else matches PEFT to float rounding.

use super::adapter_dir::{AdapterDir, Ia3Module, LoraModule, PeftKind, PREFIX};
use super::lowrank::{svd_dense, svd_of_product, LowRankSvd};
use super::task_arithmetic::{magnitude_prune, random_prune, ties_merge, weighted_sum, SignMethod};
use crate::error::{Error, Result};
use crate::io::atomic::AtomicDir;
use crate::io::model_folder::natural_key;
use crate::rng::Rng;
use crate::train::adapter_files::{sorted_json, write_adapter};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combination {
    Linear,
    Cat,
    Svd,
    Ties,
    TiesSvd,
    DareLinear,
    DareTies,
    DareLinearSvd,
    DareTiesSvd,
    MagnitudePrune,
    MagnitudePruneSvd,
}

impl Combination {
    pub const NAMES: &'static str = "linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, \
        dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd";

    pub fn parse(s: &str) -> Result<Self> {
        use Combination::*;
        Ok(match s {
            "linear" => Linear,
            "cat" => Cat,
            "svd" => Svd,
            "ties" => Ties,
            "ties_svd" => TiesSvd,
            "dare_linear" => DareLinear,
            "dare_ties" => DareTies,
            "dare_linear_svd" => DareLinearSvd,
            "dare_ties_svd" => DareTiesSvd,
            "magnitude_prune" => MagnitudePrune,
            "magnitude_prune_svd" => MagnitudePruneSvd,
            other => {
                return Err(Error::usage(format!(
                    "--combine {other}: expected one of {}",
                    Self::NAMES
                )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        use Combination::*;
        match self {
            Linear => "linear",
            Cat => "cat",
            Svd => "svd",
            Ties => "ties",
            TiesSvd => "ties_svd",
            DareLinear => "dare_linear",
            DareTies => "dare_ties",
            DareLinearSvd => "dare_linear_svd",
            DareTiesSvd => "dare_ties_svd",
            MagnitudePrune => "magnitude_prune",
            MagnitudePruneSvd => "magnitude_prune_svd",
        }
    }

    fn is_svd(self) -> bool {
        self.name().ends_with("svd")
    }

    fn needs_density(self) -> bool {
        !matches!(
            self,
            Combination::Linear | Combination::Cat | Combination::Svd
        )
    }

    /// The task-arithmetic rule, without the SVD step.
    fn rule(self) -> Rule {
        use Combination::*;
        match self {
            Linear | Svd | Cat => Rule::Sum,
            Ties | TiesSvd => Rule::Ties,
            DareLinear | DareLinearSvd => Rule::DareLinear,
            DareTies | DareTiesSvd => Rule::DareTies,
            MagnitudePrune | MagnitudePruneSvd => Rule::MagnitudePrune,
        }
    }
}

#[derive(Clone, Copy)]
enum Rule {
    Sum,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
}

#[derive(Clone, Debug)]
pub struct CombineOptions {
    pub combination: Combination,
    /// One per adapter (PEFT's `weights`); negative values subtract.
    pub weights: Vec<f32>,
    pub density: Option<f32>,
    pub sign_method: SignMethod,
    pub svd_rank: Option<usize>,
    /// Seed of DARE's random masks.
    pub seed: u64,
}

/// What a combination did (`adapter-merge --combine ... --json`).
#[derive(Clone, Debug, Serialize)]
pub struct CombineSummary {
    pub mode: String,
    pub peft_type: String,
    /// The rule applied (PEFT forces `linear` for a single adapter).
    pub combination: String,
    pub adapters: Vec<String>,
    pub weights: Vec<f32>,
    pub density: Option<f32>,
    pub rank: Option<usize>,
    pub modules: usize,
    /// Adapter tensors not carried over (modules_to_save copies, biases), by adapter.
    pub dropped_tensors: Vec<String>,
    pub seconds: f64,
    pub out: String,
}

/// Combine the adapter directories `adapters` (name, dir) into a new adapter at `out`.
pub fn combine_adapters(
    adapters: &[(String, PathBuf)],
    out: &Path,
    opts: &CombineOptions,
) -> Result<CombineSummary> {
    let t0 = Instant::now();
    if adapters.is_empty() {
        return Err(Error::usage(
            "--combine needs at least one --adapter NAME=DIR",
        ));
    }
    if opts.weights.len() != adapters.len() {
        return Err(Error::usage(format!(
            "--weights has {} values for {} adapters; give one weight per adapter",
            opts.weights.len(),
            adapters.len()
        )));
    }
    let inputs: Vec<&Path> = adapters.iter().map(|(_, p)| p.as_path()).collect();
    crate::io::atomic::refuse_overwriting_inputs(out, &inputs)?;
    let dirs = adapters
        .iter()
        .map(|(_, p)| AdapterDir::open(p))
        .collect::<Result<Vec<_>>>()?;
    let kind = dirs[0].kind.clone();
    if let Some(d) = dirs.iter().find(|d| d.kind != kind) {
        return Err(Error::usage(format!(
            "{} is {} but {} is {}; only adapters of one method combine",
            d.dir.display(),
            d.kind.name(),
            dirs[0].dir.display(),
            kind.name()
        )));
    }
    // PEFT: a single adapter is always combined linearly.
    let combination = if adapters.len() == 1 {
        Combination::Linear
    } else {
        opts.combination
    };
    let density = if combination.needs_density() {
        match opts.density {
            Some(d) if (0.0..=1.0).contains(&d) => Some(d),
            Some(d) => {
                return Err(Error::usage(format!(
                    "--density {d}: expected a fraction from 0 to 1"
                )))
            }
            None => {
                return Err(Error::usage(format!(
                    "--combine {} needs --density (the fraction of entries kept)",
                    combination.name()
                )))
            }
        }
    } else {
        None
    };
    let mut dropped = Vec::new();
    for d in &dirs {
        dropped.extend(
            d.replacement_tensors()
                .into_keys()
                .map(|k| format!("{}: {k}", d.dir.display())),
        );
    }
    let (tensors, config, rank, modules) = match kind {
        PeftKind::Lora => combine_lora(&dirs, combination, density, opts)?,
        PeftKind::Ia3 => {
            if combination != Combination::Linear {
                return Err(Error::usage(format!(
                    "IA3 adapters combine linearly only (as PEFT's IA3 add_weighted_adapter); got --combine {}",
                    combination.name()
                )));
            }
            let (t, c, m) = combine_ia3(&dirs, &opts.weights)?;
            (t, c, None, m)
        }
        other => {
            return Err(Error::usage(format!(
                "{}: {} adapters cannot be combined (LORA and IA3 can)",
                dirs[0].dir.display(),
                other.name()
            )))
        }
    };
    let dir = AtomicDir::create(out, &inputs)?;
    write_adapter(dir.join("").as_path(), &tensors, &config).map_err(|e| dir.rename_error(e))?;
    dir.commit()?;
    Ok(CombineSummary {
        mode: "combine".into(),
        peft_type: kind.name().to_string(),
        combination: combination.name().to_string(),
        adapters: adapters.iter().map(|(n, _)| n.clone()).collect(),
        weights: opts.weights.clone(),
        density,
        rank,
        modules,
        dropped_tensors: dropped,
        seconds: t0.elapsed().as_secs_f64(),
        out: out.display().to_string(),
    })
}

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The adapter's rank as PEFT's check sees it: `r`, or the largest of `r` and the rank pattern.
fn config_rank(d: &AdapterDir) -> usize {
    let r = d.config.get("r").and_then(Value::as_u64).unwrap_or(8) as usize;
    let pattern_max = d
        .config
        .get("rank_pattern")
        .and_then(Value::as_object)
        .and_then(|o| o.values().filter_map(Value::as_u64).max())
        .map(|m| m as usize);
    pattern_max.map_or(r, |m| m.max(r))
}

/// Union of the adapters' target_modules (lists: a sorted union; strings: `(a)|(b)`).
fn union_targets(dirs: &[AdapterDir], key: &str) -> Result<Value> {
    let vals: Vec<Value> = dirs
        .iter()
        .map(|d| d.config.get(key).cloned().unwrap_or(Value::Null))
        .collect();
    if vals.iter().all(Value::is_string) {
        let parts: Vec<String> = vals
            .iter()
            .map(|v| format!("({})", v.as_str().unwrap_or_default()))
            .collect();
        return Ok(json!(parts.join("|")));
    }
    if vals.iter().all(|v| v.is_array() || v.is_null()) {
        let mut names: Vec<String> = vals
            .iter()
            .filter_map(Value::as_array)
            .flatten()
            .filter_map(|x| x.as_str().map(String::from))
            .collect();
        names.sort();
        names.dedup();
        return Ok(json!(names));
    }
    Err(Error::usage(format!(
        "the adapters' {key} mix lists and regular expressions; PEFT cannot combine those either"
    )))
}

fn natural_order<T>(map: BTreeMap<String, T>) -> Vec<(String, T)> {
    let mut v: Vec<(String, T)> = map.into_iter().collect();
    v.sort_by_cached_key(|(k, _)| natural_key(k));
    v
}

/// Adapters of different architectures have disjoint module paths (`model.layers.N…` vs
/// `transformer.h.N…`), so the per-module shape check never sees them side by side and the
/// "combination" would be a union that loads on neither base. Compare the paths' roots (the
/// part before the first layer index).
fn refuse_other_architectures(
    dirs: &[AdapterDir],
    by_module: &BTreeMap<String, Vec<(usize, LoraModule)>>,
) -> Result<()> {
    let root = |p: &str| -> String {
        p.split('.')
            .take_while(|s| s.parse::<usize>().is_err())
            .collect::<Vec<_>>()
            .join(".")
    };
    let roots = |i: usize| -> std::collections::BTreeSet<String> {
        by_module
            .iter()
            .filter(|(_, ms)| ms.iter().any(|(k, _)| *k == i))
            .map(|(p, _)| root(p))
            .collect()
    };
    let first = roots(0);
    for (i, d) in dirs.iter().enumerate().skip(1) {
        let r = roots(i);
        if !r.is_empty() && !first.is_empty() && r.is_disjoint(&first) {
            let base = |d: &AdapterDir| {
                d.config
                    .get("base_model_name_or_path")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string()
            };
            return Err(Error::bad_input(
                d.weights_path(),
                format!(
                    "its modules ({}) share nothing with {} ({}): adapters for different base models ({} vs {})",
                    r.into_iter().collect::<Vec<_>>().join(", "),
                    dirs[0].dir.display(),
                    first.into_iter().collect::<Vec<_>>().join(", "),
                    base(d),
                    base(&dirs[0])
                ),
            ));
        }
    }
    Ok(())
}

fn combine_lora(
    dirs: &[AdapterDir],
    combination: Combination,
    density: Option<f32>,
    opts: &CombineOptions,
) -> Result<(Tensors, String, Option<usize>, usize)> {
    for d in dirs {
        if d.config.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(Error::usage(format!(
                "{}: DoRA adapters cannot be combined (their magnitudes do not add up); merge \
                 them into the base one at a time instead",
                d.dir.display()
            )));
        }
    }
    let ranks: Vec<usize> = dirs.iter().map(config_rank).collect();
    let rank = match combination {
        Combination::Cat => ranks.iter().sum(),
        c if c.is_svd() => opts
            .svd_rank
            .unwrap_or(*ranks.iter().max().expect("adapters")),
        _ => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                return Err(Error::usage(format!(
                    "--combine {} needs adapters of equal rank (got {ranks:?}); use cat or svd",
                    combination.name()
                )));
            }
            ranks[0]
        }
    };
    if rank == 0 {
        return Err(Error::usage("--svd-rank must be at least 1"));
    }
    // module path → (adapter index, module), in adapter order
    let mut by_module: BTreeMap<String, Vec<(usize, LoraModule)>> = BTreeMap::new();
    for (i, d) in dirs.iter().enumerate() {
        for m in d.lora_modules()? {
            if m.bias.is_some() {
                return Err(Error::usage(format!(
                    "{}: {} has lora_B.bias (lora_bias); PEFT's combinations do not carry it",
                    d.dir.display(),
                    m.path
                )));
            }
            by_module.entry(m.path.clone()).or_default().push((i, m));
        }
    }
    refuse_other_architectures(dirs, &by_module)?;
    let mut rng = Rng::new(opts.seed);
    let mut tensors = Tensors::new();
    let n_modules = by_module.len();
    for (path, mods) in natural_order(by_module) {
        let first = &mods[0].1;
        let (o, i) = (first.out_features, first.in_features);
        if let Some((ai, m)) = mods
            .iter()
            .find(|(_, m)| m.out_features != o || m.in_features != i)
        {
            return Err(Error::bad_input(
                dirs[*ai].weights_path(),
                format!(
                    "module {path} is [{}, {}] here but [{o}, {i}] in {}: adapters for different base models",
                    m.out_features,
                    m.in_features,
                    dirs[mods[0].0].dir.display()
                ),
            ));
        }
        let w = |ai: usize| opts.weights[ai];
        let (a, b) = match combination {
            Combination::Cat => {
                let mut a = vec![0f32; rank * i];
                let mut b = vec![0f32; o * rank];
                let mut row = 0;
                for (ai, m) in &mods {
                    for r in 0..m.rank {
                        for c in 0..i {
                            a[(row + r) * i + c] = m.a[r * i + c] * w(*ai) * m.scale;
                        }
                        for x in 0..o {
                            b[x * rank + row + r] = m.b[x * m.rank + r];
                        }
                    }
                    row += m.rank;
                }
                (a, b)
            }
            c if c.is_svd() => {
                let svd = svd_combination(
                    &mods,
                    c.rule(),
                    &w,
                    density,
                    opts.sign_method,
                    rank,
                    &mut rng,
                );
                if svd.k < rank {
                    return Err(Error::usage(format!(
                        "module {path} [{o}, {i}] cannot hold rank {rank}; lower --svd-rank"
                    )));
                }
                let mut b = svd.u;
                for x in 0..o {
                    for c in 0..rank {
                        b[x * rank + c] *= svd.s[c];
                    }
                }
                (svd.vt, b)
            }
            c => {
                if let Some((_, m)) = mods.iter().find(|(_, m)| m.rank != rank) {
                    return Err(Error::usage(format!(
                        "module {path} has rank {} in one adapter, {rank} expected: --combine {} needs equal ranks per module",
                        m.rank,
                        c.name()
                    )));
                }
                // PEFT computes these weights in Python floats, then makes an f32 tensor
                let ws: Vec<f64> = mods
                    .iter()
                    .map(|(ai, m)| w(*ai) as f64 * m.scale as f64)
                    .collect();
                // the sign goes on A only, so that it is not squared away
                let wa: Vec<f32> = ws
                    .iter()
                    .map(|&x| (x.abs().sqrt() * if x >= 0.0 { 1.0 } else { -1.0 }) as f32)
                    .collect();
                let wb: Vec<f32> = ws.iter().map(|x| x.abs().sqrt() as f32).collect();
                let a_in: Vec<Vec<f32>> = mods.iter().map(|(_, m)| m.a.clone()).collect();
                let b_in: Vec<Vec<f32>> = mods.iter().map(|(_, m)| m.b.clone()).collect();
                let a = apply_rule(c.rule(), &a_in, &wa, density, opts.sign_method, &mut rng);
                let b = apply_rule(c.rule(), &b_in, &wb, density, opts.sign_method, &mut rng);
                (a, b)
            }
        };
        let (ka, kb) = if first.embedding {
            (
                format!("{PREFIX}{path}.lora_embedding_A"),
                format!("{PREFIX}{path}.lora_embedding_B"),
            )
        } else {
            (
                format!("{PREFIX}{path}.lora_A.weight"),
                format!("{PREFIX}{path}.lora_B.weight"),
            )
        };
        tensors.push((ka, vec![rank, i], a));
        tensors.push((kb, vec![o, rank], b));
    }
    let mut config = dirs[0].config.clone();
    config.insert("r".into(), json!(rank));
    config.insert("lora_alpha".into(), json!(rank));
    config.insert(
        "target_modules".into(),
        union_targets(dirs, "target_modules")?,
    );
    config.insert("alpha_pattern".into(), json!({}));
    config.insert("rank_pattern".into(), json!({}));
    config.insert("use_rslora".into(), json!(false));
    config.insert("inference_mode".into(), json!(true));
    Ok((
        tensors,
        sorted_json(Value::Object(config)),
        Some(rank),
        n_modules,
    ))
}

fn apply_rule(
    rule: Rule,
    tensors: &[Vec<f32>],
    weights: &[f32],
    density: Option<f32>,
    sign: SignMethod,
    rng: &mut Rng,
) -> Vec<f32> {
    let d = density.unwrap_or(1.0);
    match rule {
        Rule::Sum => weighted_sum(tensors, weights),
        Rule::MagnitudePrune => {
            let p: Vec<Vec<f32>> = tensors.iter().map(|t| magnitude_prune(t, d)).collect();
            weighted_sum(&p, weights)
        }
        Rule::Ties => {
            let p: Vec<Vec<f32>> = tensors.iter().map(|t| magnitude_prune(t, d)).collect();
            ties_merge(&p, weights, sign)
        }
        Rule::DareLinear => {
            let p: Vec<Vec<f32>> = tensors.iter().map(|t| random_prune(t, d, rng)).collect();
            weighted_sum(&p, weights)
        }
        Rule::DareTies => {
            let p: Vec<Vec<f32>> = tensors.iter().map(|t| random_prune(t, d, rng)).collect();
            ties_merge(&p, weights, sign)
        }
    }
}

/// The `*svd` combinations of one module: combine wᵢ·ΔWᵢ, then a rank-`rank` SVD.
fn svd_combination(
    mods: &[(usize, LoraModule)],
    rule: Rule,
    w: &dyn Fn(usize) -> f32,
    density: Option<f32>,
    sign: SignMethod,
    rank: usize,
    rng: &mut Rng,
) -> LowRankSvd {
    let (o, i) = (mods[0].1.out_features, mods[0].1.in_features);
    if let Rule::Sum = rule {
        // Σ wᵢ·sᵢ·Bᵢ·Aᵢ = [w₁s₁B₁ | w₂s₂B₂ | …] · [A₁; A₂; …]: stays low-rank
        let total: usize = mods.iter().map(|(_, m)| m.rank).sum();
        let mut bc = vec![0f32; o * total];
        let mut ac = Vec::with_capacity(total * i);
        let mut col = 0;
        for (ai, m) in mods {
            let f = w(*ai) * m.scale;
            for x in 0..o {
                for r in 0..m.rank {
                    bc[x * total + col + r] = m.b[x * m.rank + r] * f;
                }
            }
            ac.extend_from_slice(&m.a);
            col += m.rank;
        }
        return svd_of_product(&bc, &ac, o, total, i, rank);
    }
    // pruning works entry by entry on the dense ΔW (in [out, in] orientation)
    let deltas: Vec<Vec<f32>> = mods
        .iter()
        .map(|(_, m)| {
            let d = m.delta();
            if m.embedding {
                crate::kernels::ops::transpose(&d, i, o)
            } else {
                d
            }
        })
        .collect();
    let ws: Vec<f32> = mods.iter().map(|(ai, _)| w(*ai)).collect();
    let combined = apply_rule(rule, &deltas, &ws, density, sign, rng);
    svd_dense(&combined, o, i, rank)
}

fn combine_ia3(dirs: &[AdapterDir], weights: &[f32]) -> Result<(Tensors, String, usize)> {
    let mut by_module: BTreeMap<String, Vec<(usize, Ia3Module)>> = BTreeMap::new();
    for (i, d) in dirs.iter().enumerate() {
        for m in d.ia3_modules()? {
            by_module.entry(m.path.clone()).or_default().push((i, m));
        }
    }
    let n = by_module.len();
    let mut tensors = Tensors::new();
    for (path, mods) in natural_order(by_module) {
        let len = mods[0].1.l.len();
        let ff = mods[0].1.feedforward;
        if let Some((ai, _)) = mods
            .iter()
            .find(|(_, m)| m.l.len() != len || m.feedforward != ff)
        {
            return Err(Error::bad_input(
                dirs[*ai].weights_path(),
                format!("IA3 vector of {path} differs in size or feed-forward role between the adapters"),
            ));
        }
        let mut l = vec![0f32; len];
        for (ai, m) in &mods {
            l.iter_mut()
                .zip(&m.l)
                .for_each(|(x, v)| *x += v * weights[*ai]);
        }
        let shape = if ff { vec![1, len] } else { vec![len, 1] };
        tensors.push((format!("{PREFIX}{path}.ia3_l"), shape, l));
    }
    let mut config = dirs[0].config.clone();
    config.insert(
        "target_modules".into(),
        union_targets(dirs, "target_modules")?,
    );
    config.insert(
        "feedforward_modules".into(),
        union_targets(dirs, "feedforward_modules")?,
    );
    config.insert("inference_mode".into(), json!(true));
    Ok((tensors, sorted_json(Value::Object(config)), n))
}

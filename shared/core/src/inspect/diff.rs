//! `--diff OTHER`: how two adapters' updates relate, module by module.
//!
//! Cosine similarity of LoRA updates from the small factors only:
//! ⟨ΔW₁, ΔW₂⟩ = s₁s₂·tr((B₁A₁)ᵀ B₂A₂) = s₁s₂·Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ), with r₁×r₂ Gram matrices.
//! The sign-conflict rate needs the entries themselves, so it forms each module's dense ΔW
//! (one module at a time). IA3 vectors compare as l − 1.

use super::adapter::Analysis;
use super::report::{DiffModule, DiffReport};
use crate::merge::adapter_dir::{Ia3Module, LoraModule};
use crate::train::lora::layer_index;
use std::collections::BTreeSet;

/// Σ_o x[o, i] · y[o, j] for x `[n, p]`, y `[n, q]` (row-major): `[p, q]` in f64.
fn gram_cols(x: &[f32], y: &[f32], n: usize, p: usize, q: usize) -> Vec<f64> {
    let mut g = vec![0f64; p * q];
    for o in 0..n {
        let (xr, yr) = (&x[o * p..(o + 1) * p], &y[o * q..(o + 1) * q]);
        for i in 0..p {
            let xi = xr[i] as f64;
            for j in 0..q {
                g[i * q + j] += xi * yr[j] as f64;
            }
        }
    }
    g
}

/// Σ_k x[i, k] · y[j, k] for x `[p, n]`, y `[q, n]`: `[p, q]` in f64.
fn gram_rows(x: &[f32], y: &[f32], n: usize, p: usize, q: usize) -> Vec<f64> {
    let mut g = vec![0f64; p * q];
    for i in 0..p {
        let xr = &x[i * n..(i + 1) * n];
        for j in 0..q {
            let yr = &y[j * n..(j + 1) * n];
            g[i * q + j] = xr.iter().zip(yr).map(|(&a, &b)| a as f64 * b as f64).sum();
        }
    }
    g
}

/// ⟨s₁B₁A₁, s₂B₂A₂⟩_F without forming either product.
pub fn lora_inner(m1: &LoraModule, m2: &LoraModule) -> f64 {
    let (r1, r2) = (m1.rank, m2.rank);
    let gb = gram_cols(&m1.b, &m2.b, m1.out_features, r1, r2);
    let ga = gram_rows(&m1.a, &m2.a, m1.in_features, r1, r2);
    let sum: f64 = gb.iter().zip(&ga).map(|(x, y)| x * y).sum();
    m1.scale as f64 * m2.scale as f64 * sum
}

/// Fraction of entries where both are non-zero and their signs differ.
pub fn sign_conflict_rate(x: &[f32], y: &[f32]) -> f64 {
    if x.is_empty() {
        return 0.0;
    }
    let n = x
        .iter()
        .zip(y)
        .filter(|(&a, &b)| a != 0.0 && b != 0.0 && (a > 0.0) != (b > 0.0))
        .count();
    n as f64 / x.len() as f64
}

fn cosine(inner: f64, n1: f64, n2: f64) -> Option<f64> {
    (n1 > 0.0 && n2 > 0.0).then(|| (inner / (n1 * n2)).clamp(-1.0, 1.0))
}

fn compare_lora(path: &str, m1: &LoraModule, m2: &LoraModule) -> DiffModule {
    let n1 = lora_inner(m1, m1).max(0.0).sqrt();
    let n2 = lora_inner(m2, m2).max(0.0).sqrt();
    let mut d = DiffModule {
        path: path.to_string(),
        layer: layer_index(path),
        cosine: None,
        sign_conflict_rate: None,
        norm: n1,
        other_norm: n2,
        note: None,
    };
    let same = m1.in_features == m2.in_features
        && m1.out_features == m2.out_features
        && m1.embedding == m2.embedding;
    if !same {
        d.note = Some(format!(
            "shapes differ: [{}, {}] vs [{}, {}]",
            m1.out_features, m1.in_features, m2.out_features, m2.in_features
        ));
        return d;
    }
    d.cosine = cosine(lora_inner(m1, m2), n1, n2);
    d.sign_conflict_rate = Some(sign_conflict_rate(&m1.delta(), &m2.delta()));
    d
}

fn compare_ia3(path: &str, m1: &Ia3Module, m2: &Ia3Module) -> DiffModule {
    let d1: Vec<f32> = m1.l.iter().map(|x| x - 1.0).collect();
    let d2: Vec<f32> = m2.l.iter().map(|x| x - 1.0).collect();
    let n = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let (n1, n2) = (n(&d1), n(&d2));
    let mut d = DiffModule {
        path: path.to_string(),
        layer: layer_index(path),
        cosine: None,
        sign_conflict_rate: None,
        norm: n1,
        other_norm: n2,
        note: None,
    };
    if d1.len() != d2.len() || m1.feedforward != m2.feedforward {
        d.note = Some(format!(
            "vectors differ: {} values vs {}",
            d1.len(),
            d2.len()
        ));
        return d;
    }
    let inner: f64 = d1.iter().zip(&d2).map(|(&a, &b)| a as f64 * b as f64).sum();
    d.cosine = cosine(inner, n1, n2);
    d.sign_conflict_rate = Some(sign_conflict_rate(&d1, &d2));
    d
}

/// Compare `a` (this adapter) with `b` (`--diff OTHER`).
pub fn diff(a: &Analysis, b: &Analysis, other: &str) -> DiffReport {
    let paths =
        |x: &Analysis| -> BTreeSet<String> { x.modules.iter().map(|m| m.path.clone()).collect() };
    let (pa, pb) = (paths(a), paths(b));
    let mut modules = Vec::new();
    for m in &a.modules {
        let p = &m.path;
        if !pb.contains(p) {
            continue;
        }
        let d = match (a.lora.get(p), b.lora.get(p), a.ia3.get(p), b.ia3.get(p)) {
            (Some(x), Some(y), _, _) => compare_lora(p, x, y),
            (_, _, Some(x), Some(y)) => compare_ia3(p, x, y),
            _ => DiffModule {
                path: p.clone(),
                layer: layer_index(p),
                cosine: None,
                sign_conflict_rate: None,
                norm: m.delta_norm.unwrap_or(0.0),
                other_norm: 0.0,
                note: Some("not comparable (different methods, or a bottleneck unit)".into()),
            },
        };
        modules.push(d);
    }
    let cos: Vec<f64> = modules.iter().filter_map(|d| d.cosine).collect();
    let sc: Vec<f64> = modules
        .iter()
        .filter_map(|d| d.sign_conflict_rate)
        .collect();
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let order = |set: BTreeSet<String>, src: &Analysis| -> Vec<String> {
        src.modules
            .iter()
            .filter(|m| set.contains(&m.path))
            .map(|m| m.path.clone())
            .collect()
    };
    DiffReport {
        other: other.to_string(),
        compared: sc.len() as u64,
        mean_cosine: mean(&cos),
        mean_sign_conflict_rate: mean(&sc),
        modules,
        only_here: order(pa.difference(&pb).cloned().collect(), a),
        only_other: order(pb.difference(&pa).cloned().collect(), b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn module(rng: &mut Rng, out: usize, r: usize, inp: usize, scale: f32) -> LoraModule {
        LoraModule {
            path: "m".into(),
            rank: r,
            alpha: 1.0,
            scale,
            a: (0..r * inp).map(|_| rng.normal()).collect(),
            b: (0..out * r).map(|_| rng.normal()).collect(),
            in_features: inp,
            out_features: out,
            bias: None,
            magnitude: None,
            embedding: false,
        }
    }

    #[test]
    fn inner_product_equals_the_dense_one() {
        let mut rng = Rng::new(7);
        let m1 = module(&mut rng, 9, 3, 7, 0.5);
        let m2 = module(&mut rng, 9, 2, 7, 2.0);
        let dense: f64 = m1
            .delta()
            .iter()
            .zip(m2.delta())
            .map(|(&x, y)| x as f64 * y as f64)
            .sum();
        let small = lora_inner(&m1, &m2);
        assert!(
            (dense - small).abs() < 1e-4 * dense.abs().max(1.0),
            "{dense} {small}"
        );
        let mut neg = m1.clone();
        neg.b.iter_mut().for_each(|x| *x = -*x);
        let d = compare_lora("m", &m1, &neg);
        assert!((d.cosine.unwrap() + 1.0).abs() < 1e-9);
        assert_eq!(d.sign_conflict_rate, Some(1.0));
        let d = compare_lora("m", &m1, &m1);
        assert!((d.cosine.unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(d.sign_conflict_rate, Some(0.0));
    }
}

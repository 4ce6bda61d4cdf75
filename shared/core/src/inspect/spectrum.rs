//! Norm, singular values and rank measures of a LoRA update ΔW = s·B·A, from the small
//! factors only (QR + an r×r SVD, `merge::lowrank`); ΔW itself is never formed.

use crate::merge::lowrank::singular_values;

/// How many singular values a report lists.
pub const TOP: usize = 8;
/// Numerical rank counts σᵢ > σ₁ · RANK_TOL.
pub const RANK_TOL: f64 = 1e-3;

#[derive(Clone, Debug, PartialEq)]
pub struct Spectrum {
    /// Every singular value of s·B·A, descending (at most r of them).
    pub singular_values: Vec<f64>,
    /// ‖s·B·A‖_F = √Σσᵢ².
    pub norm: f64,
}

impl Spectrum {
    pub fn top(&self) -> Vec<f64> {
        self.singular_values.iter().take(TOP).copied().collect()
    }
    pub fn numerical_rank(&self) -> usize {
        numerical_rank(&self.singular_values)
    }
    pub fn effective_rank(&self) -> f64 {
        effective_rank(&self.singular_values)
    }
}

/// Spectrum of `scale · b [out, r] · a [r, inp]`. The caller has checked the shapes and that
/// every value is finite.
pub fn lora_spectrum(
    b: &[f32],
    a: &[f32],
    out: usize,
    r: usize,
    inp: usize,
    scale: f64,
) -> Spectrum {
    if r == 0 || out == 0 || inp == 0 {
        return Spectrum {
            singular_values: Vec::new(),
            norm: 0.0,
        };
    }
    let mut s: Vec<f64> = singular_values(b, a, out, r, inp)
        .into_iter()
        .map(|x| x as f64 * scale.abs())
        .collect();
    s.sort_by(|x, y| y.total_cmp(x));
    let norm = s.iter().map(|x| x * x).sum::<f64>().sqrt();
    Spectrum {
        singular_values: s,
        norm,
    }
}

/// Number of singular values above σ₁ · 1e-3 (0 for a zero matrix).
pub fn numerical_rank(s: &[f64]) -> usize {
    let Some(&first) = s.first() else { return 0 };
    if first <= 0.0 {
        return 0;
    }
    s.iter().filter(|&&x| x > first * RANK_TOL).count()
}

/// Entropy effective rank (Roy & Vetterli 2007): exp(−Σ pᵢ ln pᵢ) with pᵢ = σᵢ / Σσ; between 1
/// and the number of non-zero σ, equal to k for k equal singular values; 0 for a zero matrix.
pub fn effective_rank(s: &[f64]) -> f64 {
    let total: f64 = s.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let h: f64 = s
        .iter()
        .map(|&x| x / total)
        .filter(|&p| p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    h.exp()
}

/// Euclidean / Frobenius norm in f64.
pub fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks() {
        assert_eq!(numerical_rank(&[3.0, 1.0, 2e-3, 0.0]), 2);
        assert_eq!(numerical_rank(&[0.0, 0.0]), 0);
        assert!((effective_rank(&[2.0, 2.0, 2.0]) - 3.0).abs() < 1e-12);
        assert!((effective_rank(&[5.0, 0.0]) - 1.0).abs() < 1e-12);
        assert_eq!(effective_rank(&[]), 0.0);
    }

    #[test]
    fn spectrum_of_a_diagonal_product() {
        // B = I (3×2 padded), A = diag(3, 4) → σ = {4, 3}·s
        let b = [1.0f32, 0.0, 0.0, 1.0, 0.0, 0.0];
        let a = [3.0f32, 0.0, 0.0, 4.0];
        let sp = lora_spectrum(&b, &a, 3, 2, 2, -0.5);
        assert!((sp.singular_values[0] - 2.0).abs() < 1e-6);
        assert!((sp.singular_values[1] - 1.5).abs() < 1e-6);
        assert!((sp.norm - 2.5).abs() < 1e-6);
        assert_eq!(sp.numerical_rank(), 2);
    }
}

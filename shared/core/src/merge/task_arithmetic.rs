//! Combining task tensors as PEFT's `utils/merge_utils.py` does (PEFT 0.21): weighted sums,
//! magnitude and random (DARE) pruning, TIES sign election and disjoint merge.
//!
//! Each function takes the tensors of the adapters that have a given module (same length) and
//! one weight per tensor, and returns the combined tensor.

use crate::rng::Rng;

/// How TIES elects the sign of each entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignMethod {
    /// sign of the sum of the (pruned) values
    Total,
    /// sign held by more tensors
    Frequency,
}

/// Σ wᵢ·tᵢ
pub fn weighted_sum(tensors: &[Vec<f32>], weights: &[f32]) -> Vec<f32> {
    let n = tensors[0].len();
    let mut out = vec![0f32; n];
    for (t, &w) in tensors.iter().zip(weights) {
        out.iter_mut().zip(t).for_each(|(o, x)| *o += x * w);
    }
    out
}

/// Keep the `int(density · n)` entries of largest magnitude (torch.topk), zero the rest.
/// `density ≥ 1` keeps everything.
pub fn magnitude_prune(t: &[f32], density: f32) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let k = (density as f64 * t.len() as f64) as usize;
    let mut idx: Vec<usize> = (0..t.len()).collect();
    // largest |x| first; equal magnitudes by position (torch.topk's choice among exact ties is
    // unspecified, so such ties are the one place results may differ from PEFT)
    idx.sort_by(|&a, &b| t[b].abs().total_cmp(&t[a].abs()).then(a.cmp(&b)));
    let mut out = vec![0f32; t.len()];
    for &i in &idx[..k] {
        out[i] = t[i];
    }
    out
}

/// DARE: keep each entry with probability `density` and divide the kept ones by `density`.
pub fn random_prune(t: &[f32], density: f32, rng: &mut Rng) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    t.iter()
        .map(|&x| {
            if (rng.uniform_f64() as f32) < density {
                x / density
            } else {
                0.0
            }
        })
        .collect()
}

/// TIES' elected-sign mask and disjoint mean: entries whose sign agrees with the elected one
/// are averaged (weighted), the others dropped.
pub fn ties_merge(pruned: &[Vec<f32>], weights: &[f32], method: SignMethod) -> Vec<f32> {
    let n = pruned[0].len();
    let sign = |x: f32| -> f32 {
        if x > 0.0 {
            1.0
        } else if x < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    (0..n)
        .map(|j| {
            let magnitude: f32 = match method {
                SignMethod::Total => pruned.iter().map(|t| t[j]).sum(),
                SignMethod::Frequency => pruned.iter().map(|t| sign(t[j])).sum(),
            };
            let elected = if magnitude >= 0.0 { 1.0 } else { -1.0 };
            let mut sum = 0f32;
            let mut count = 0f32;
            for (t, &w) in pruned.iter().zip(weights) {
                if sign(t[j]) == elected {
                    sum += t[j] * w;
                    count += 1.0;
                }
            }
            sum / count.max(1.0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitude_keeps_the_largest() {
        let t = [0.1, -3.0, 2.0, -0.5, 0.0, 1.0];
        assert_eq!(
            magnitude_prune(&t, 0.5),
            vec![0.0, -3.0, 2.0, 0.0, 0.0, 1.0]
        );
        assert_eq!(magnitude_prune(&t, 1.0), t.to_vec());
        assert_eq!(magnitude_prune(&t, 0.0), vec![0.0; 6]);
    }

    #[test]
    fn dare_keeps_about_density_and_rescales() {
        let t = vec![1.0f32; 100_000];
        let mut rng = Rng::new(7);
        let p = random_prune(&t, 0.3, &mut rng);
        let kept = p.iter().filter(|&&x| x != 0.0).count() as f64 / t.len() as f64;
        assert!((kept - 0.3).abs() < 0.01, "kept {kept}");
        assert!(p.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.3).abs() < 1e-6));
    }

    #[test]
    fn ties_elects_and_averages() {
        // entry 0: +2 and -1 → total +1 elects +, only the +2 survives (weight 0.5) → 1.0
        // entry 1: frequency tie of one + and one − elects + (≥ 0)
        let a = vec![2.0, 1.0];
        let b = vec![-1.0, -5.0];
        let r = ties_merge(&[a.clone(), b.clone()], &[0.5, 1.0], SignMethod::Total);
        assert_eq!(r, vec![1.0, -5.0]);
        let r = ties_merge(&[a, b], &[0.5, 1.0], SignMethod::Frequency);
        assert_eq!(r, vec![1.0, 0.5]);
    }
}

//! `torch.Tensor.mean()` of a 1-D float32 tensor on CPU, reproduced operation by operation.
//!
//! bitsandbytes' double quantization subtracts `absmax.mean()` from the block maxima and stores
//! that mean in every checkpoint (`nested_offset`), so a bit-exact writer needs torch's exact
//! float32 rounding, which depends on its summation order (ATen `SumKernel.cpp`,
//! `cascade_sum`):
//!
//! - the input is read as vectors of `Vectorized<float>::size()` lanes (8: torch runs its AVX2
//!   sum kernel even on AVX-512 CPUs), four vectors per step, accumulated in a 4-level
//!   cascade (each level takes 2^max(4, ceil_log2(steps)/4) partial sums before spilling into
//!   the next), then the four accumulators, the scalar tail and the lanes are added in order;
//! - fewer elements than one vector are summed the same way with scalars;
//! - from 32768 elements on (`at::internal::GRAIN_SIZE`), with more than one torch thread, the
//!   range is cut into `min(threads, ceil(n/32768))` equal chunks summed separately into a
//!   buffer of `threads` partial sums, which is summed again;
//! - `mean` is that sum divided by `n` (float32 division).
//!
//! For long inputs the result of torch itself therefore depends on `torch.get_num_threads()`;
//! [`TorchReduce::detect`] picks what torch would pick on this machine.

/// The two machine-dependent parameters of torch's CPU float sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TorchReduce {
    /// Lanes of the `Vectorized<float>` the sum kernel uses (8; 16 or 4 only to model other
    /// builds).
    pub lanes: usize,
    /// `torch.get_num_threads()`.
    pub threads: usize,
}

/// `at::internal::GRAIN_SIZE`.
const GRAIN_SIZE: usize = 32768;

impl TorchReduce {
    /// What torch would use on this machine: 8 lanes, and as many threads as `MKL_NUM_THREADS` /
    /// `OMP_NUM_THREADS` say, else one per physical core.
    pub fn detect() -> Self {
        Self {
            lanes: detect_lanes(),
            threads: detect_threads(),
        }
    }

    /// One torch thread (the result then does not depend on the machine's core count).
    pub fn serial(lanes: usize) -> Self {
        Self { lanes, threads: 1 }
    }
}

/// torch registers its sum kernel without an AVX-512 variant (`REGISTER_DISPATCH` leaves the
/// AVX-512 slot empty, so AVX-512 CPUs run the AVX2 kernel): 8 lanes on x86 (AVX2 and default
/// kernels alike) and on ARM (NEON `Vectorized<float>` is two 4-lane registers). Checked against
/// torch 2.15 on an AVX-512 CPU.
fn detect_lanes() -> usize {
    8
}

fn detect_threads() -> usize {
    for var in ["MKL_NUM_THREADS", "OMP_NUM_THREADS"] {
        if let Some(n) = std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
        {
            return n;
        }
    }
    physical_cores().unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

/// Distinct (physical id, core id) pairs of /proc/cpuinfo (Linux), as MKL counts cores.
fn physical_cores() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mut cores = std::collections::BTreeSet::new();
    let mut phys = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        match k.trim() {
            "physical id" => phys = v.trim().parse::<u32>().ok(),
            "core id" => {
                cores.insert((phys.unwrap_or(0), v.trim().parse::<u32>().ok()?));
            }
            _ => {}
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// `torch.sum` of a contiguous 1-D float32 tensor.
pub fn torch_sum_f32(x: &[f32], r: TorchReduce) -> f32 {
    let n = x.len();
    let threads = r.threads.max(1);
    if n <= GRAIN_SIZE || threads == 1 {
        // serial_for_each into the output, which cascade_sum filled with 0
        return 0.0 + segment_sum(x, r.lanes);
    }
    // two_pass_reduction: one partial sum per thread, then a sum over the `threads` partials
    let tasks = threads.min(n.div_ceil(GRAIN_SIZE));
    let chunk = n.div_ceil(tasks);
    let mut buffer = vec![0f32; threads];
    for (t, slot) in buffer.iter_mut().enumerate().take(tasks) {
        let begin = t * chunk;
        if begin < n {
            *slot += segment_sum(&x[begin..(begin + chunk).min(n)], r.lanes);
        }
    }
    0.0 + segment_sum(&buffer, r.lanes)
}

/// `torch.mean` of a contiguous 1-D float32 tensor (`sum / n` in float32).
pub fn torch_mean_f32(x: &[f32], r: TorchReduce) -> f32 {
    torch_sum_f32(x, r) / x.len() as f32
}

/// One call of cascade_sum's inner loop over a contiguous range.
fn segment_sum(x: &[f32], lanes: usize) -> f32 {
    match lanes {
        16 => vectorized_inner_sum::<16>(x),
        8 => vectorized_inner_sum::<8>(x),
        4 => vectorized_inner_sum::<4>(x),
        other => panic!("unsupported vector width {other}"),
    }
}

fn vectorized_inner_sum<const L: usize>(x: &[f32]) -> f32 {
    if x.len() < L {
        return row_sum::<1>(x, x.len())[0];
    }
    let vec_size = x.len() / L;
    let partial = row_sum::<L>(x, vec_size);
    let mut acc = 0f32;
    for &v in &x[vec_size * L..] {
        acc += v;
    }
    for p in partial {
        acc += p;
    }
    acc
}

#[inline]
fn add<const L: usize>(acc: &mut [f32; L], item: &[f32]) {
    for (a, v) in acc.iter_mut().zip(item) {
        *a += v;
    }
}

/// `row_sum`: `size` items of `L` floats; the items are read four at a time (ILP factor 4).
fn row_sum<const L: usize>(x: &[f32], size: usize) -> [f32; L] {
    let size_ilp = size / 4;
    let mut p = multi_row_sum::<L>(x, size_ilp);
    for i in size_ilp * 4..size {
        add(&mut p[0], &x[i * L..(i + 1) * L]);
    }
    for k in 1..4 {
        let pk = p[k];
        add(&mut p[0], &pk);
    }
    p[0]
}

fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

/// `multi_row_sum` with four rows (the four items of each step) and four cascade levels.
// Index loops mirror ATen's SumKernel.cpp line by line.
#[allow(clippy::needless_range_loop)]
fn multi_row_sum<const L: usize>(x: &[f32], size: usize) -> [[f32; L]; 4] {
    const LEVELS: usize = 4;
    let level_power = 4usize.max(ceil_log2(size) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; L]; 4]; LEVELS];
    let item = |i: usize, k: usize| {
        let start = (i * 4 + k) * L;
        &x[start..start + L]
    };
    let mut i = 0usize;
    while i + level_step <= size {
        for _ in 0..level_step {
            for k in 0..4 {
                add(&mut acc[0][k], item(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..4 {
                let lower = acc[j - 1][k];
                add(&mut acc[j][k], &lower);
                acc[j - 1][k] = [0f32; L];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for k in 0..4 {
            add(&mut acc[0][k], item(i, k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..4 {
            let upper = acc[j][k];
            add(&mut acc[0][k], &upper);
        }
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_sums_are_exact_where_exactness_is_possible() {
        let r = TorchReduce::serial(8);
        assert_eq!(torch_sum_f32(&[], r), 0.0);
        assert_eq!(torch_sum_f32(&[1.5], r), 1.5);
        let x: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        assert_eq!(torch_sum_f32(&x, r), 499500.0);
        assert_eq!(torch_mean_f32(&x, r), 499.5);
        let r2 = TorchReduce {
            lanes: 8,
            threads: 3,
        };
        let x: Vec<f32> = (0..100_000).map(|i| (i % 7) as f32).collect();
        let exact: f64 = x.iter().map(|&v| v as f64).sum();
        assert_eq!(torch_sum_f32(&x, r2) as f64, exact);
    }

    #[test]
    fn ceil_log2_matches_aten() {
        assert_eq!(ceil_log2(0), 1);
        assert_eq!(ceil_log2(2), 1);
        assert_eq!(ceil_log2(3), 2);
        assert_eq!(ceil_log2(4), 2);
        assert_eq!(ceil_log2(5), 3);
        assert_eq!(ceil_log2(1 << 20), 20);
        assert_eq!(ceil_log2((1 << 20) + 1), 21);
    }
}

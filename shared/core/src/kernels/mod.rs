//! Numeric kernels on plain f32 slices: matrix products and the fused element-wise operations
//! of the transformer blocks. Hot paths of training get hand-written backward passes here.

pub mod allocator;
pub mod gemm;
pub mod ops;
#[cfg(target_arch = "x86_64")]
pub(crate) mod ops_avx2;
pub mod peak;

/// Set the number of worker threads used by all kernels (0 = one per core).
pub fn set_threads(n: usize) {
    let n = if n == 0 {
        // Several data-parallel processes on one machine (torchrun's LOCAL_WORLD_SIZE) share
        // its cores instead of each starting one thread per core.
        let cores = std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(1);
        (cores / crate::dist::env::local_world_size()).max(1)
    } else {
        n
    };
    // The global pool can only be built once; a second call keeps the first setting.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
}

/// Threads the kernels use.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

//! Row-major matrix products on cuBLAS: bf16 inputs, f32 accumulation and f32 output (torch
//! autocast's bf16 semantics), optionally batched with constant strides.
//!
//! cuBLAS is column-major; a row-major `C = op(A)·op(B)` is the column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`,
//! so every call swaps the operands. The simulator (`cuda-sim`) computes the same products on
//! the CPU (gpu/sim.rs).

#[cfg(feature = "cuda")]
pub(crate) use cublas::Blas;

/// One (batched) product `C[m×n] = alpha·op(A)·op(B) + beta·C`, all row-major.
/// `A` is `[m×k]` (or `[k×m]` when `ta`), `B` is `[k×n]` (or `[n×k]` when `tb`).
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub ta: bool,
    pub b: u64,
    pub ldb: usize,
    pub tb: bool,
    pub c: u64,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl Gemm {
    /// `C[m×n] = A[m×k]·B[n×k]ᵀ` — a linear layer's forward product (`x·Wᵀ`).
    pub fn nt(m: usize, n: usize, k: usize, a: u64, b: u64, c: u64) -> Self {
        Self::plain(m, n, k, a, k, false, b, k, true, c)
    }

    /// `C[m×n] = A[m×k]·B[k×n]` — an input gradient (`dy·W`).
    pub fn nn(m: usize, n: usize, k: usize, a: u64, b: u64, c: u64) -> Self {
        Self::plain(m, n, k, a, k, false, b, n, false, c)
    }

    /// `C[m×n] = A[k×m]ᵀ·B[k×n]` — a weight gradient (`dyᵀ·x`).
    pub fn tn(m: usize, n: usize, k: usize, a: u64, b: u64, c: u64) -> Self {
        Self::plain(m, n, k, a, m, true, b, n, false, c)
    }

    #[allow(clippy::too_many_arguments)]
    fn plain(
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        lda: usize,
        ta: bool,
        b: u64,
        ldb: usize,
        tb: bool,
        c: u64,
    ) -> Self {
        Self {
            m,
            n,
            k,
            a,
            lda,
            ta,
            b,
            ldb,
            tb,
            c,
            ldc: n,
            alpha: 1.0,
            beta: 0.0,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }

    /// Adds into C instead of overwriting it.
    pub fn accumulate(mut self) -> Self {
        self.beta = 1.0;
        self
    }

    pub fn scaled(mut self, alpha: f32) -> Self {
        self.alpha = alpha;
        self
    }

    pub fn batched(mut self, batch: usize, sa: usize, sb: usize, sc: usize) -> Self {
        self.batch = batch;
        self.stride_a = sa;
        self.stride_b = sb;
        self.stride_c = sc;
        self
    }
}

#[cfg(feature = "cuda")]
mod cublas {
    use super::Gemm;
    use crate::error::{Error, Result};
    use crate::gpu::device::dev_err;
    use cudarc::cublas::{result, sys, CudaBlas};
    use cudarc::driver::CudaStream;
    use std::ffi::c_void;
    use std::sync::Arc;

    pub(crate) struct Blas {
        handle: CudaBlas,
    }

    impl Blas {
        pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
            let handle = CudaBlas::new(stream).map_err(|e| dev_err("cuBLAS", e))?;
            Ok(Self { handle })
        }

        pub fn gemm(&self, g: &Gemm) -> Result<()> {
            if g.m == 0 || g.n == 0 {
                return Ok(());
            }
            let op = |t: bool| {
                if t {
                    sys::cublasOperation_t::CUBLAS_OP_T
                } else {
                    sys::cublasOperation_t::CUBLAS_OP_N
                }
            };
            let to_i = |v: usize| -> Result<i32> {
                i32::try_from(v)
                    .map_err(|_| Error::Device(format!("matrix dimension {v} too large")))
            };
            let bf = sys::cudaDataType::CUDA_R_16BF;
            // Column-major view: Cᵀ[n×m] = op(B)ᵀ·op(A)ᵀ.
            unsafe {
                result::gemm_strided_batched_ex(
                    *self.handle.handle(),
                    op(g.tb),
                    op(g.ta),
                    to_i(g.n)?,
                    to_i(g.m)?,
                    to_i(g.k)?,
                    &g.alpha as *const f32 as *const c_void,
                    g.b as *const c_void,
                    bf,
                    to_i(g.ldb)?,
                    g.stride_b as i64,
                    g.a as *const c_void,
                    bf,
                    to_i(g.lda)?,
                    g.stride_a as i64,
                    &g.beta as *const f32 as *const c_void,
                    g.c as *mut c_void,
                    sys::cudaDataType::CUDA_R_32F,
                    to_i(g.ldc)?,
                    g.stride_c as i64,
                    to_i(g.batch)?,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| dev_err(&format!("cuBLAS product {}×{}×{}", g.m, g.n, g.k), e))
        }
    }
}

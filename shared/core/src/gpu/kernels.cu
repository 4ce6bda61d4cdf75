// peftkit's CUDA kernels, compiled at run time with NVRTC (no CUDA toolkit needed to build the
// crate). Conventions:
// - activations and gradients that stay on the residual path are f32; the inputs of matrix
//   products are bf16 (stored as unsigned short), as torch autocast computes them: products
//   run in cuBLAS with bf16 inputs and f32 accumulation and output;
// - a "row" is one token of the concatenated batch; attention works on a padded layout
//   [seq, head, L, head_dim] (L = longest sequence) so that cuBLAS batched products apply;
//   padding is zero and masked.
// No headers: bf16 conversion is written out (round to nearest even, like torch).

typedef unsigned short bf16;
typedef unsigned char u8;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
// Dynamic shared memory (the simulator, sim/cuda_sim.h, defines its own).
#ifndef EXTERN_SHARED
#define EXTERN_SHARED(T, name) extern __shared__ T name[]
#endif

__device__ __forceinline__ float bf2f(bf16 h) { return __uint_as_float(((unsigned)h) << 16); }

__device__ __forceinline__ bf16 f2bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)0x7fc0;  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

// Two floats as bf16 (round to nearest even) in one register, `lo` in the low half: one
// cvt.rn.bf16x2 on sm_80 and later (the value f2bf gives; a NaN may come out as another NaN).
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
#if !defined(CUDASIM) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return (unsigned)f2bf(lo) | ((unsigned)f2bf(hi) << 16);
#endif
}

// Sum over a block of up to 1024 threads; every thread gets the result. `sh` holds 32 floats.
__device__ float block_sum(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nw) ? sh[threadIdx.x] : 0.f;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    float r = sh[0];
    __syncthreads();
    return r;
}

__device__ float block_max(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nw) ? sh[threadIdx.x] : -INFINITY;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    float r = sh[0];
    __syncthreads();
    return r;
}

// ---- elementwise -------------------------------------------------------------------------

extern "C" __global__ void cast_f32_bf16(const float* x, bf16* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = f2bf(x[i]);
}

extern "C" __global__ void cast_bf16_f32(const bf16* x, float* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = bf2f(x[i]);
}

// y = x * s, as bf16 (the LoRA branch scale applied to the small [rows, r] product).
extern "C" __global__ void scale_to_bf16(const float* x, bf16* y, float s, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = f2bf(x[i] * s);
}

// a += b
extern "C" __global__ void add_inplace(float* a, const float* b, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        a[i] += b[i];
}

// y[r, c] += bias[c]
extern "C" __global__ void add_bias(float* y, const float* bias, long rows, int cols) {
    long n = rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] += bias[i % cols];
}

// Counter-based uniform in [0, 1): the dropout mask is a pure function of (seed, index), so
// the recomputation in the backward pass reproduces it without storing it.
__device__ __forceinline__ float hash_uniform(unsigned long long seed, long i) {
    unsigned long long z = seed + 0x9E3779B97F4A7C15ull * (unsigned long long)(i + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}

// LoRA dropout on a bf16 input: y = x * keep / (1 - p).
extern "C" __global__ void dropout_bf16(const bf16* x, bf16* y, float p, unsigned long long seed, long n) {
    float sc = 1.f / (1.f - p);
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = (hash_uniform(seed, i) < p) ? (bf16)0 : f2bf(bf2f(x[i]) * sc);
}

// dx += g * keep / (1 - p) (the LoRA branch's input gradient through the same mask).
extern "C" __global__ void dropout_bwd_add(float* dx, const float* g, float p, unsigned long long seed, long n) {
    float sc = 1.f / (1.f - p);
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        if (!(hash_uniform(seed, i) < p)) dx[i] += g[i] * sc;
}

// ---- embedding ---------------------------------------------------------------------------

extern "C" __global__ void embed_gather(const unsigned* ids, const bf16* table, float* out, long rows, int hidden) {
    long n = rows * hidden;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / hidden;
        int c = i % hidden;
        out[i] = bf2f(table[(long)ids[r] * hidden + c]);
    }
}

// ---- RMSNorm (one block per row) ---------------------------------------------------------

// Rows of up to 4·4·blockDim values with hidden % 4 == 0 are read once into registers (float4);
// others take the plain loop (which reads x twice).
extern "C" __global__ void rmsnorm_fwd(const float* x, const float* w, bf16* y, float* rstd, int hidden, float eps) {
    __shared__ float sh[32];
    long r = blockIdx.x;
    const float* xr = x + r * hidden;
    int n4 = hidden / 4;
    if ((hidden & 3) == 0 && n4 <= 4 * (int)blockDim.x) {
        float4 v[4];
        float ss = 0.f;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            int c = threadIdx.x + k * blockDim.x;
            v[k] = c < n4 ? reinterpret_cast<const float4*>(xr)[c] : make_float4(0.f, 0.f, 0.f, 0.f);
            ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
        }
        ss = block_sum(ss, sh);
        float rs = rsqrtf(ss / hidden + eps);
        if (threadIdx.x == 0) rstd[r] = rs;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            int c = threadIdx.x + k * blockDim.x;
            if (c < n4) {
                float4 wv = reinterpret_cast<const float4*>(w)[c];
                uint2 o;
                o.x = (unsigned)f2bf(v[k].x * rs * wv.x) | ((unsigned)f2bf(v[k].y * rs * wv.y) << 16);
                o.y = (unsigned)f2bf(v[k].z * rs * wv.z) | ((unsigned)f2bf(v[k].w * rs * wv.w) << 16);
                reinterpret_cast<uint2*>(y + r * hidden)[c] = o;
            }
        }
        return;
    }
    float ss = 0.f;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss, sh);
    float rs = rsqrtf(ss / hidden + eps);
    if (threadIdx.x == 0) rstd[r] = rs;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) y[r * hidden + c] = f2bf(xr[c] * rs * w[c]);
}

// dx += d/dx of rmsnorm(x)·w given dy: dx = rs·w·dy − x·rs³/n·Σ(w·dy·x).
extern "C" __global__ void rmsnorm_bwd(const float* x, const float* w, const float* rstd, const float* dy, float* dx, int hidden) {
    __shared__ float sh[32];
    long r = blockIdx.x;
    const float* xr = x + r * hidden;
    const float* dyr = dy + r * hidden;
    float rs = rstd[r];
    float dot = 0.f;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) dot += w[c] * dyr[c] * xr[c];
    dot = block_sum(dot, sh);
    float k = dot * rs * rs * rs / hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) dx[r * hidden + c] += rs * w[c] * dyr[c] - xr[c] * k;
}

// ---- LayerNorm (GPT-2; one block per row) --------------------------------------------------

// y = (x − mean)·rstd·w + b as bf16, with biased variance (torch's LayerNorm);
// stats[2r] = mean, stats[2r + 1] = rstd for the backward pass. Two passes over the row (the
// variance about the mean, not E[x²] − mean², for accuracy).
extern "C" __global__ void layernorm_fwd(const float* x, const float* w, const float* b, bf16* y, float* stats, int hidden, float eps) {
    __shared__ float sh[32];
    long r = blockIdx.x;
    const float* xr = x + r * hidden;
    float s = 0.f;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) s += xr[c];
    float mean = block_sum(s, sh) / hidden;
    float v = 0.f;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        float d = xr[c] - mean;
        v += d * d;
    }
    float rs = rsqrtf(block_sum(v, sh) / hidden + eps);
    if (threadIdx.x == 0) {
        stats[2 * r] = mean;
        stats[2 * r + 1] = rs;
    }
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) y[r * hidden + c] = f2bf((xr[c] - mean) * rs * w[c] + b[c]);
}

// dx += d/dx of layernorm(x)·w + b given dy: with x̂ = (x − mean)·rs and g = w·dy,
// dx = rs·(g − mean(g) − x̂·mean(g·x̂)).
extern "C" __global__ void layernorm_bwd(const float* x, const float* w, const float* stats, const float* dy, float* dx, int hidden) {
    __shared__ float sh[32];
    long r = blockIdx.x;
    const float* xr = x + r * hidden;
    const float* dyr = dy + r * hidden;
    float mean = stats[2 * r], rs = stats[2 * r + 1];
    float sg = 0.f, sgx = 0.f;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        float g = w[c] * dyr[c];
        sg += g;
        sgx += g * (xr[c] - mean) * rs;
    }
    sg = block_sum(sg, sh) / hidden;
    sgx = block_sum(sgx, sh) / hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        float xh = (xr[c] - mean) * rs;
        dx[r * hidden + c] += rs * (w[c] * dyr[c] - sg - xh * sgx);
    }
}

// dw[c] += Σ_r dy·x̂ and (when db is given) db[c] += Σ_r dy: a trainable LayerNorm. One thread
// per column.
extern "C" __global__ void layernorm_dwb(const float* x, const float* stats, const float* dy, float* dw, float* db, long rows, int hidden) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < hidden; c += gridDim.x * blockDim.x) {
        float sw = 0.f, sb = 0.f;
        for (long r = 0; r < rows; r++) {
            float g = dy[r * hidden + c];
            sw += g * (x[r * hidden + c] - stats[2 * r]) * stats[2 * r + 1];
            sb += g;
        }
        if (dw) dw[c] += sw;
        if (db) db[c] += sb;
    }
}

// ---- columns of row-major matrices ---------------------------------------------------------
// dst[r, dst_off + j] = src[r, src_off + j] for j < cols: GPT-2's fused q|k|v split into its
// parts (f32), and their gradients joined back (bf16).
extern "C" __global__ void copy_cols_f32(const float* src, int src_stride, int src_off, float* dst, int dst_stride, int dst_off, int cols, long rows) {
    long n = rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / cols;
        int j = i % cols;
        dst[r * dst_stride + dst_off + j] = src[r * src_stride + src_off + j];
    }
}

extern "C" __global__ void copy_cols_bf16(const bf16* src, int src_stride, int src_off, bf16* dst, int dst_stride, int dst_off, int cols, long rows) {
    long n = rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / cols;
        int j = i % cols;
        dst[r * dst_stride + dst_off + j] = src[r * src_stride + src_off + j];
    }
}

// ---- GELU (GPT-2's plain MLP) --------------------------------------------------------------
// kind 0: the tanh approximation (gelu_new, gelu_pytorch_tanh); 1: the exact erf form.
__device__ __forceinline__ float gelu_val(float x, int kind, float* dydx) {
    if (kind == 0) {
        const float k = 0.7978845608028654f;  // sqrt(2/pi)
        float u = k * (x + 0.044715f * x * x * x);
        float t = tanhf(u);
        *dydx = 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * k * (1.f + 3.f * 0.044715f * x * x);
        return 0.5f * x * (1.f + t);
    }
    float cdf = 0.5f * (1.f + erff(x * 0.7071067811865476f));
    *dydx = cdf + x * 0.3989422804014327f * __expf(-0.5f * x * x);
    return x * cdf;
}

// a = gelu(x) as bf16 (the down product's input).
extern "C" __global__ void gelu_fwd(const float* x, bf16* a, long n, int kind) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float d;
        a[i] = f2bf(gelu_val(x[i], kind, &d));
    }
}

// dx = da·gelu'(x) as bf16 (the up product's gradient input).
extern "C" __global__ void gelu_bwd(const float* x, const float* da, bf16* dx, long n, int kind) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float d;
        gelu_val(x[i], kind, &d);
        dx[i] = f2bf(da[i] * d);
    }
}

// ---- SwiGLU ------------------------------------------------------------------------------

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.f + __expf(-g)) * u; }

// Four values per thread (float4 loads, one 8-byte store); n % 4 == 0 (the caller's rows are
// multiples of 4 wide), the last n % 4 handled one by one otherwise.
extern "C" __global__ void silu_mul_fwd(const float* g, const float* u, bf16* a, long n) {
    long n4 = n / 4;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n4; i += (long)gridDim.x * blockDim.x) {
        float4 gv = reinterpret_cast<const float4*>(g)[i];
        float4 uv = reinterpret_cast<const float4*>(u)[i];
        uint2 o;
        o.x = (unsigned)f2bf(silu_mul(gv.x, uv.x)) | ((unsigned)f2bf(silu_mul(gv.y, uv.y)) << 16);
        o.y = (unsigned)f2bf(silu_mul(gv.z, uv.z)) | ((unsigned)f2bf(silu_mul(gv.w, uv.w)) << 16);
        reinterpret_cast<uint2*>(a)[i] = o;
    }
    long t = 4 * n4 + blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (t < n) a[t] = f2bf(silu_mul(g[t], u[t]));
}

// a = silu(g)·u: dg = da·u·s·(1 + g·(1 − s)), du = da·silu(g); written as bf16 product inputs.
__device__ __forceinline__ void silu_mul_grad(float x, float u, float d, float& dg, float& du) {
    float s = 1.f / (1.f + __expf(-x));
    dg = d * u * s * (1.f + x * (1.f - s));
    du = d * x * s;
}

extern "C" __global__ void silu_mul_bwd(const float* g, const float* u, const float* da, bf16* dg, bf16* du, long n) {
    long n4 = n / 4;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n4; i += (long)gridDim.x * blockDim.x) {
        float4 gv = reinterpret_cast<const float4*>(g)[i];
        float4 uv = reinterpret_cast<const float4*>(u)[i];
        float4 dv = reinterpret_cast<const float4*>(da)[i];
        float a0, a1, a2, a3, b0, b1, b2, b3;
        silu_mul_grad(gv.x, uv.x, dv.x, a0, b0);
        silu_mul_grad(gv.y, uv.y, dv.y, a1, b1);
        silu_mul_grad(gv.z, uv.z, dv.z, a2, b2);
        silu_mul_grad(gv.w, uv.w, dv.w, a3, b3);
        reinterpret_cast<uint2*>(dg)[i] = make_uint2((unsigned)f2bf(a0) | ((unsigned)f2bf(a1) << 16),
                                                     (unsigned)f2bf(a2) | ((unsigned)f2bf(a3) << 16));
        reinterpret_cast<uint2*>(du)[i] = make_uint2((unsigned)f2bf(b0) | ((unsigned)f2bf(b1) << 16),
                                                     (unsigned)f2bf(b2) | ((unsigned)f2bf(b3) << 16));
    }
    long t = 4 * n4 + blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (t < n) {
        float a, b;
        silu_mul_grad(g[t], u[t], da[t], a, b);
        dg[t] = f2bf(a);
        du[t] = f2bf(b);
    }
}

// ---- RoPE and the padded attention layout ------------------------------------------------
// src: [rows, heads*dh] f32 (rows = tokens of the concatenated batch); dst: [seq, heads, L, dh]
// bf16. rope = 0 copies without rotation (values). rotate_half convention (HF Llama).
extern "C" __global__ void rope_permute(const float* src, bf16* dst, const int* row_seq, const int* row_pos,
                                        const float* cosb, const float* sinb, long rows, int heads, int dh, int L, int rope) {
    int half = dh / 2;
    long n = rows * heads * half;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        int j = i % half;
        long t = i / half;
        int h = t % heads;
        long r = t / heads;
        int s = row_seq[r], p = row_pos[r];
        const float* x = src + r * heads * dh + h * dh;
        float x1 = x[j], x2 = x[j + half];
        float y1 = x1, y2 = x2;
        if (rope) {
            float c = cosb[(long)p * half + j], sn = sinb[(long)p * half + j];
            y1 = x1 * c - x2 * sn;
            y2 = x2 * c + x1 * sn;
        }
        bf16* o = dst + (((long)s * heads + h) * L + p) * dh;
        o[j] = f2bf(y1);
        o[j + half] = f2bf(y2);
    }
}

// Inverse of rope_permute for gradients: src [seq, heads, L, dh] f32 → dst [rows, heads*dh] f32
// (rotation transposed when rope = 1).
extern "C" __global__ void rope_unpermute_bwd(const float* src, float* dst, const int* row_seq, const int* row_pos,
                                              const float* cosb, const float* sinb, long rows, int heads, int dh, int L, int rope) {
    int half = dh / 2;
    long n = rows * heads * half;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        int j = i % half;
        long t = i / half;
        int h = t % heads;
        long r = t / heads;
        int s = row_seq[r], p = row_pos[r];
        const float* g = src + (((long)s * heads + h) * L + p) * dh;
        float g1 = g[j], g2 = g[j + half];
        float d1 = g1, d2 = g2;
        if (rope) {
            float c = cosb[(long)p * half + j], sn = sinb[(long)p * half + j];
            d1 = g1 * c + g2 * sn;
            d2 = g2 * c - g1 * sn;
        }
        float* o = dst + r * heads * dh + h * dh;
        o[j] = d1;
        o[j + half] = d2;
    }
}

// [seq, heads, L, dh] f32 → [rows, heads*dh] as bf16 (attention output into o_proj).
extern "C" __global__ void unpermute_bf16(const float* src, bf16* dst, const int* row_seq, const int* row_pos,
                                          long rows, int heads, int dh, int L) {
    long n = rows * heads * dh;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        int d = i % dh;
        long t = i / dh;
        int h = t % heads;
        long r = t / heads;
        dst[i] = f2bf(src[(((long)row_seq[r] * heads + h) * L + row_pos[r]) * dh + d]);
    }
}

// [rows, heads*dh] f32 → [seq, heads, L, dh] bf16 (the output gradient into attention).
extern "C" __global__ void permute_bf16(const float* src, bf16* dst, const int* row_seq, const int* row_pos,
                                        long rows, int heads, int dh, int L) {
    long n = rows * heads * dh;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        int d = i % dh;
        long t = i / dh;
        int h = t % heads;
        long r = t / heads;
        dst[(((long)row_seq[r] * heads + h) * L + row_pos[r]) * dh + d] = f2bf(src[i]);
    }
}

// ---- attention softmax (one block per score row) -------------------------------------------
// Scores S: [seq, heads, L, L] (already scaled). Row (s, h, t) attends to keys j ≤ t with
// j < len[s] and, with a sliding window w > 0, j > t − w. Writes P in bf16 only (the input of
// P·V, and what the backward pass reads: half the traffic of an f32 copy). Padding rows get
// zeros.
// The scores of one chunk of rows start at absolute row `row0` (attention runs in chunks of
// (sequence, kv head) groups so that the scores stay near L2 size).
extern "C" __global__ void softmax_causal(float* S, bf16* Pb, const int* seq_len, int heads, int L, int window, long row0) {
    __shared__ float sh[32];
    long row = blockIdx.x;
    long arow = row0 + row;
    int t = arow % L;
    int s = (arow / L) / heads;
    int len = seq_len[s];
    float* x = S + row * L;
    bf16* pb = Pb + row * L;
    int lo = (window > 0 && t - window + 1 > 0) ? t - window + 1 : 0;
    bool live = t < len;
    float m = -INFINITY;
    if (live)
        for (int j = lo + threadIdx.x; j <= t; j += blockDim.x) m = fmaxf(m, x[j]);
    m = block_max(m, sh);
    float sum = 0.f;
    if (live)
        for (int j = lo + threadIdx.x; j <= t; j += blockDim.x) sum += __expf(x[j] - m);
    sum = block_sum(sum, sh);
    float inv = live ? 1.f / sum : 0.f;
    for (int j = threadIdx.x; j < L; j += blockDim.x) {
        float p = (live && j >= lo && j <= t) ? __expf(x[j] - m) * inv : 0.f;
        pb[j] = f2bf(p);
    }
}

// dS = P ∘ (dP − Σ P·dP) · scale, as bf16 (input of the dQ and dK products); P is the bf16
// copy the forward product used.
extern "C" __global__ void softmax_bwd(const bf16* P, const float* dP, bf16* dS, int L, float scale) {
    __shared__ float sh[32];
    long row = blockIdx.x;
    const bf16* p = P + row * L;
    const float* dp = dP + row * L;
    float dot = 0.f;
    for (int j = threadIdx.x; j < L; j += blockDim.x) dot += bf2f(p[j]) * dp[j];
    dot = block_sum(dot, sh);
    for (int j = threadIdx.x; j < L; j += blockDim.x) dS[row * L + j] = f2bf(bf2f(p[j]) * (dp[j] - dot) * scale);
}

// ---- cross-entropy over a chunk of rows (one block per row) -------------------------------
// logits x [rows, V] f32; target per row. With z = x·inv_t (inv_t = 1/temperature: PPO takes
// log-probabilities at the sampling temperature; 1 otherwise): nll[r] = lse(z) − z[target];
// with `grad`, d(scale·row_scale[r]·nll)/dx = (softmax(z) − onehot)·scale·row_scale[r]·inv_t
// in bf16 for the hidden-state product (row_scale: per-row loss weights, e.g. DPO's
// per-sequence coefficients, when given); with `entropy`, the entropy of softmax(z); with
// `ent_scale`, the gradient also carries d(scale·ent_scale[r]·H)/dx, H the entropy (GRPO's
// entropy bonus): −p·(z − lse + H)·scale·ent_scale[r]·inv_t.
//
// The kernel is bound by DRAM: one pass for the statistics (online max and rescaled sum), one
// for the gradient, whose reads of the row hit L2 or, in `cross_entropy_cached`, shared memory. Where V is a multiple of 4 (every
// vocabulary we know), the passes read float4s, two per thread in flight in the first, and
// write four bf16 at once: one float per thread in flight is too few bytes to cover DRAM's
// latency with one block of 1024 threads per row.

// Adds a, b, c, d to a thread's online (max, Σ exp(v − max)): one rescale per group with a new
// max, one exp per value.
__device__ __forceinline__ void online_lse4(float& m, float& s, float a, float b, float c, float d) {
    float g = fmaxf(fmaxf(a, b), fmaxf(c, d));
    if (g == -INFINITY) return;
    if (g > m) {
        s *= __expf(m - g);
        m = g;
    }
    s += __expf(a - m) + __expf(b - m) + __expf(c - m) + __expf(d - m);
}

__device__ __forceinline__ float ce_grad(float z, float m, float inv, bool is_target, float scale) {
    return (__expf(z - m) * inv - (is_target ? 1.f : 0.f)) * scale;
}

// ce_grad plus the entropy's term: `ls_h` = log s − H (so z − lse + H = (z − m) − ls_h).
__device__ __forceinline__ float ce_ent_grad(float z, float m, float inv, bool is_target, float scale, float ec,
                                             float ls_h) {
    float zr = z - m;
    float p = __expf(zr) * inv;
    return (p - (is_target ? 1.f : 0.f)) * scale - ec * p * (zr - ls_h);
}

template <bool CACHED>
__device__ void cross_entropy_row(const float* logits, const int* target, float* nll, bf16* grad, int V, float scale,
                                  const float* row_scale, float inv_t, float* entropy, const float* ent_scale,
                                  float* cache) {
    __shared__ float sh[32];
    long r = blockIdx.x;
    const float* x = logits + r * V;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    float4* c4 = reinterpret_cast<float4*>(cache);
    bool vec = (V & 3) == 0;
    int n4 = vec ? V >> 2 : 0;
    int step = blockDim.x;
    float mi = -INFINITY, si = 0.f;
    int j = threadIdx.x;
    for (; j + step < n4; j += 2 * step) {
        float4 a = x4[j], b = x4[j + step];
        if (CACHED) {
            c4[j] = a;
            c4[j + step] = b;
        }
        online_lse4(mi, si, a.x * inv_t, a.y * inv_t, a.z * inv_t, a.w * inv_t);
        online_lse4(mi, si, b.x * inv_t, b.y * inv_t, b.z * inv_t, b.w * inv_t);
    }
    if (j < n4) {
        float4 a = x4[j];
        if (CACHED) c4[j] = a;
        online_lse4(mi, si, a.x * inv_t, a.y * inv_t, a.z * inv_t, a.w * inv_t);
    }
    // The scalar path: V not a multiple of 4 (n4 = 0 then).
    for (int k = 4 * n4 + threadIdx.x; k < V; k += step) {
        float xk = x[k];
        if (CACHED) cache[k] = xk;
        online_lse4(mi, si, xk * inv_t, -INFINITY, -INFINITY, -INFINITY);
    }
    // The later passes read the row again: from shared memory when it is cached there (each
    // thread reads back the elements it stored, so no barrier is needed), else from global
    // memory (mostly L2 hits).
    const float* src = CACHED ? cache : x;
    const float4* src4 = CACHED ? c4 : x4;
    float m = block_max(mi, sh);
    float s = block_sum(mi == -INFINITY ? 0.f : si * __expf(mi - m), sh);
    float lse = m + logf(s);
    int tg = target[r];
    if (threadIdx.x == 0) nll[r] = lse - x[tg] * inv_t;
    float h = 0.f;
    if (entropy || ent_scale) {
        // H = lse − Σ p·z, the sum taken relative to the max for range.
        float pz = 0.f;
        for (int k = threadIdx.x; k < n4; k += step) {
            float4 a = src4[k];
            float z0 = a.x * inv_t - m, z1 = a.y * inv_t - m, z2 = a.z * inv_t - m, z3 = a.w * inv_t - m;
            pz += __expf(z0) * z0 + __expf(z1) * z1 + __expf(z2) * z2 + __expf(z3) * z3;
        }
        for (int k = 4 * n4 + threadIdx.x; k < V; k += step) {
            float z = src[k] * inv_t - m;
            pz += __expf(z) * z;
        }
        pz = block_sum(pz, sh);
        h = logf(s) - pz / s;
        if (entropy && threadIdx.x == 0) entropy[r] = h;
    }
    if (grad && ent_scale) {
        // with the entropy bonus's term (the same access pattern as below)
        float ec = scale * ent_scale[r] * inv_t;
        if (row_scale) scale *= row_scale[r];
        scale *= inv_t;
        float inv = 1.f / s, ls_h = logf(s) - h;
        bf16* g = grad + r * V;
        uint2* g4 = reinterpret_cast<uint2*>(g);
        for (int k = threadIdx.x; k < n4; k += step) {
            float4 a = src4[k];
            int e = 4 * k;
            unsigned lo = pack_bf16(ce_ent_grad(a.x * inv_t, m, inv, e == tg, scale, ec, ls_h),
                                    ce_ent_grad(a.y * inv_t, m, inv, e + 1 == tg, scale, ec, ls_h));
            unsigned hi = pack_bf16(ce_ent_grad(a.z * inv_t, m, inv, e + 2 == tg, scale, ec, ls_h),
                                    ce_ent_grad(a.w * inv_t, m, inv, e + 3 == tg, scale, ec, ls_h));
            g4[k] = make_uint2(lo, hi);
        }
        for (int k = 4 * n4 + threadIdx.x; k < V; k += step)
            g[k] = f2bf(ce_ent_grad(src[k] * inv_t, m, inv, k == tg, scale, ec, ls_h));
    } else if (grad) {
        if (row_scale) scale *= row_scale[r];
        scale *= inv_t;
        float inv = 1.f / s;
        bf16* g = grad + r * V;
        // 8-byte stores: the row starts at a multiple of 8 bytes when V is a multiple of 4.
        uint2* g4 = reinterpret_cast<uint2*>(g);
        for (int k = threadIdx.x; k < n4; k += step) {
            float4 a = src4[k];
            int e = 4 * k;
            unsigned lo = pack_bf16(ce_grad(a.x * inv_t, m, inv, e == tg, scale),
                                    ce_grad(a.y * inv_t, m, inv, e + 1 == tg, scale));
            unsigned hi = pack_bf16(ce_grad(a.z * inv_t, m, inv, e + 2 == tg, scale),
                                    ce_grad(a.w * inv_t, m, inv, e + 3 == tg, scale));
            g4[k] = make_uint2(lo, hi);
        }
        for (int k = 4 * n4 + threadIdx.x; k < V; k += step) g[k] = f2bf(ce_grad(src[k] * inv_t, m, inv, k == tg, scale));
    }
}

extern "C" __global__ void cross_entropy(const float* logits, const int* target, float* nll, bf16* grad, int V, float scale,
                                         const float* row_scale, float inv_t, float* entropy, const float* ent_scale) {
    cross_entropy_row<false>(logits, target, nll, grad, V, scale, row_scale, inv_t, entropy, ent_scale, nullptr);
}

// The same with the row cached in shared memory (dynamic, V floats), so it is read from DRAM
// once: where V·4 bytes fit in a block's shared memory (Hopper: up to 227 KB, a 49152-token
// vocabulary; Ampere: 163 KB).
extern "C" __global__ void cross_entropy_cached(const float* logits, const int* target, float* nll, bf16* grad, int V,
                                                float scale, const float* row_scale, float inv_t, float* entropy,
                                                const float* ent_scale) {
    EXTERN_SHARED(float, cache);
    cross_entropy_row<true>(logits, target, nll, grad, V, scale, row_scale, inv_t, entropy, ent_scale, cache);
}

// dst[i, :] = src[idx[i], :] (bf16) and the reverse scatter of f32 rows.
extern "C" __global__ void gather_rows_bf16(const bf16* src, const int* idx, bf16* dst, long n_rows, int cols) {
    long n = n_rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        dst[i] = src[(long)idx[i / cols] * cols + i % cols];
}

extern "C" __global__ void scatter_rows_f32(const float* src, const int* idx, float* dst, long n_rows, int cols) {
    long n = n_rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        dst[(long)idx[i / cols] * cols + i % cols] = src[i];
}

// ---- 4-bit (NF4/FP4) weights, bitsandbytes layout ------------------------------------------
// packed: two indices per byte, even element in the high nibble; absmax: one f32 per block
// (double quantization undone at load); code: the 16-entry table.

// Eight values per thread: one 4-byte load, one 16-byte store (blocksize is a multiple of 8,
// so the eight share a scale); the tail past a multiple of 8 is decoded one by one.
extern "C" __global__ void dequant_q4_bf16(const u8* packed, const float* absmax, const float* code, bf16* out, long n, int blocksize) {
    __shared__ float cs[16];
    if (threadIdx.x < 16) cs[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    long octs = n / 8;
    const unsigned* p4 = reinterpret_cast<const unsigned*>(packed);
    uint4* o16 = reinterpret_cast<uint4*>(out);
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < octs; i += (long)gridDim.x * blockDim.x) {
        unsigned w = p4[i];
        float sc = absmax[(8 * i) / blocksize];
        unsigned h[4];
#pragma unroll
        for (int b = 0; b < 4; b++) {
            unsigned byte = (w >> (8 * b)) & 0xffu;
            h[b] = (unsigned)f2bf(cs[byte >> 4] * sc) | ((unsigned)f2bf(cs[byte & 15u] * sc) << 16);
        }
        o16[i] = make_uint4(h[0], h[1], h[2], h[3]);
    }
    long tail = blockIdx.x * (long)blockDim.x + threadIdx.x + 8 * octs;
    if (tail < n && tail < 8 * octs + 8) {
        u8 b = packed[tail / 2];
        out[tail] = f2bf(cs[(tail & 1) ? (b & 15) : (b >> 4)] * absmax[tail / blocksize]);
    }
}

// The same decode to f32 (exactness check against the CPU decoder).
extern "C" __global__ void dequant_q4_f32(const u8* packed, const float* absmax, const float* code, float* out, long n, int blocksize) {
    __shared__ float cs[16];
    if (threadIdx.x < 16) cs[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    long pairs = (n + 1) / 2;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < pairs; i += (long)gridDim.x * blockDim.x) {
        u8 b = packed[i];
        long e = 2 * i;
        out[e] = cs[b >> 4] * absmax[e / blocksize];
        if (e + 1 < n) out[e + 1] = cs[b & 15] * absmax[(e + 1) / blocksize];
    }
}

// Fused 4-bit GEMV for generation: y[o] = Σ_i W[o, i]·x[i], W decoded in registers and never
// written out. Shared memory is the bound, not DRAM, unless x is reused: each lane takes 16
// bytes of a row (32 weights, one scale: blocksize is a multiple of 32) per step, which costs
// 32 code-table lookups and 32 x values from shared memory. So each warp takes GEMV_ROWS rows
// at once and reads its 32 x values once for all of them (8 float4 loads), which brings the
// shared-memory traffic per weight byte from 4 words to 1 + 1/GEMV_ROWS. The rows' next 16
// bytes are loaded before the current ones are used, to keep more bytes in flight.
//
// x is staged once per block in shared memory (dynamic, `in` floats), with the float4s of each
// 32-value chunk c stored at position q ^ (c & 7): the 8 lanes of a quarter-warp read chunks
// c..c+7 and so hit 8 different bank groups. `in` must be a multiple of 32, blocksize a power of
// two from 32, rows_per_block a multiple of GEMV_ROWS, and blockDim.x = 32 · rows_per_block /
// GEMV_ROWS.
#define GEMV_ROWS 4
__device__ __forceinline__ int gemv_x_slot(int i) {
    int c = i >> 5, q = (i >> 2) & 7;
    return (c << 5) + ((q ^ (c & 7)) << 2) + (i & 3);
}

// The code table's value at a byte offset (code·4): the address is then the offset plus a
// constant, with no shift.
__device__ __forceinline__ float gemv_code(const float* cs, unsigned offset) {
    return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(cs) + offset);
}

extern "C" __global__ void gemv_q4(const u8* packed, const float* absmax, const float* code, const float* x, float* y,
                                   int out, int in, int blocksize, int rows_per_block) {
    EXTERN_SHARED(float, xs);
    __shared__ float cs[16];
    if (threadIdx.x < 16) cs[threadIdx.x] = code[threadIdx.x];
    for (int i = threadIdx.x; i < in; i += blockDim.x) xs[gemv_x_slot(i)] = x[i];
    __syncthreads();
    int lane = threadIdx.x & 31;
    int first = blockIdx.x * rows_per_block + (threadIdx.x >> 5) * GEMV_ROWS;
    int last = min(min(first + GEMV_ROWS, out), (int)(blockIdx.x + 1) * rows_per_block);
    if (first >= last) return;
    int chunks = in / 32;
    // Rows past the end repeat the last one; their sums are dropped.
    const uint4* w = reinterpret_cast<const uint4*>(packed) + (long)first * chunks;
    int span = last - 1 - first;
    float acc[GEMV_ROWS];
    uint4 next[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        acc[r] = 0.f;
        if (lane < chunks) next[r] = w[min(r, span) * chunks + lane];
    }
    // Scales: chunk c of row o holds weights o·in + 32c, so its scale is number
    // (o·chunks + c) >> log2(blocksize / 32) (block sizes are powers of two; indices < 2³¹).
    int shift = 31 - __clz(blocksize / 32);
    unsigned scale_row[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) scale_row[r] = (unsigned)(first + min(r, span)) * (unsigned)chunks;
    for (int c = lane; c < chunks; c += 32) {
        uint4 cur[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            cur[r] = next[r];
            if (c + 32 < chunks) next[r] = w[min(r, span) * chunks + c + 32];
        }
        float part[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) part[r] = 0.f;
        const float4* xv = reinterpret_cast<const float4*>(xs + (c << 5));
        // Half a chunk (16 x values, 8 bytes of each row) at a time, to save registers.
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float xr[16];
#pragma unroll
            for (int q = 0; q < 4; q++) {
                float4 t = xv[(4 * h + q) ^ (c & 7)];
                xr[4 * q] = t.x;
                xr[4 * q + 1] = t.y;
                xr[4 * q + 2] = t.z;
                xr[4 * q + 3] = t.w;
            }
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) {
                unsigned words[2] = {h ? cur[r].z : cur[r].x, h ? cur[r].w : cur[r].y};
#pragma unroll
                for (int k = 0; k < 2; k++) {
                    // Each byte's two codes as byte offsets into cs (code·4), four bytes at once;
                    // one PRMT then takes out each offset: 10 integer ops per 8 weights.
                    unsigned hi = (words[k] >> 2) & 0x3c3c3c3cu, lo = (words[k] << 2) & 0x3c3c3c3cu;
#pragma unroll
                    for (int b = 0; b < 4; b++) {
                        int e = k * 8 + b * 2;
                        part[r] = fmaf(gemv_code(cs, __byte_perm(hi, 0u, 0x4440u | b)), xr[e], part[r]);
                        part[r] = fmaf(gemv_code(cs, __byte_perm(lo, 0u, 0x4440u | b)), xr[e + 1], part[r]);
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++)
            acc[r] += part[r] * absmax[(scale_row[r] + c) >> shift];
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        float a = acc[r];
        for (int off = 16; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
        if (lane == 0 && first + r < last) y[first + r] = a;
    }
}

// Σ x² over a buffer into out[0] (gradient norms); one atomic per block.
extern "C" __global__ void sum_squares(const float* x, float* out, long n) {
    __shared__ float sh[32];
    float s = 0.f;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) s += x[i] * x[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) atomicAdd(out, s);
}

// ---- AdamW on the device (full fine-tuning's base tensors) --------------------------------
// torch.optim.AdamW's arithmetic in f32, as the host's (train/optim.rs): w is the f32 master
// copy, g the accumulated gradient times gscale (gradient clipping's coefficient); the new
// value also goes to the compute copy (bf16 for products, or f32), and g is zeroed for the
// next step's accumulation.
extern "C" __global__ void adamw_step(float* w, float* m, float* v, float* g, long n, float gscale, float decay,
                                      float b1, float b2, float eps, float step_size, float bc2_sqrt, bf16* out_bf16,
                                      float* out_f32) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gr = g[i] * gscale;
        float wi = w[i] * decay;
        float mi = m[i] + (1.f - b1) * (gr - m[i]);
        float vi = v[i] * b2 + (1.f - b2) * gr * gr;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        wi -= step_size * mi / denom;
        w[i] = wi;
        m[i] = mi;
        v[i] = vi;
        g[i] = 0.f;
        if (out_bf16) out_bf16[i] = f2bf(wi);
        if (out_f32) out_f32[i] = wi;
    }
}

// ---- flash attention (tensor cores) ---------------------------------------------------------
// Causal attention without the [L, L] scores: each block takes 64 query rows of one (sequence,
// head), 16 per warp, and walks the keys in tiles of 64 with an online softmax (FA2). Products
// run on mma.sync m16n8k16 (bf16 inputs, f32 accumulation); the fragment layouts below are the
// PTX ISA's for that shape (groupID = lane / 4, tig = lane % 4):
//   A 16×16 row-major: a0,a1 = (g, 2·tig..+1), a2,a3 = (g+8, same), a4..a7 = the same + 8 columns
//   B 16×8 "col":      b0,b1 = (k = 2·tig..+1, n = g), b2,b3 = (k + 8, n = g)
//   C 16×8:            c0,c1 = (g, 2·tig..+1), c2,c3 = (g+8, same)
// so a C tile of scores is, packed in pairs, the A fragment of P·V without leaving registers.

// 2^x for the online softmax: MUFU.EX2 (ex2.approx.ftz, as __expf uses it), 2^−inf = 0.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef CUDASIM
    return exp2f(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

// d += a·b for one 16×8×16 tile (one warp). bf16 tensor cores need sm_80: for older GPUs
// (Turing, the floor of CUDA 13) the instruction is left out, so that the module still loads,
// and the host never launches the kernels that use it there (Gpu::bf16_tensor_cores).
__device__ __forceinline__ void mma_bf16_16816(float* d, const unsigned* a, const unsigned* b) {
#ifdef CUDASIM
    cudasim::mma_m16n8k16_bf16(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// ldmatrix (sm_75 and later): four 8×8 matrices of 16-bit values from shared memory in one
// instruction, where the fragments took four 32-bit loads (or, transposed, eight 16-bit ones
// and four packs). Lane l gives the address of row l % 8 of matrix l / 8 (16 bytes, 16-byte
// aligned); register m of lane l gets what an mma fragment wants of matrix m: row l / 4,
// columns 2(l % 4) and 2(l % 4) + 1 (low half first), or with .trans column l / 4 of rows
// 2(l % 4) and 2(l % 4) + 1.
#ifndef CUDASIM
__device__ __forceinline__ unsigned shared_address(const void* p) {
    unsigned a;
    asm("{ .reg .u64 p; cvta.to.shared.u64 p, %1; cvt.u32.u64 %0, p; }" : "=r"(a) : "l"(p));
    return a;
}
#endif
__device__ __forceinline__ void ldsm_x4(unsigned* r, const void* row) {
#ifdef CUDASIM
    cudasim::ldmatrix_x4(r, row, false);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned* r, const void* row) {
#ifdef CUDASIM
    cudasim::ldmatrix_x4(r, row, true);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
#endif
}

// cp.async (sm_80 and later): BYTES (16, or 4) from global to shared memory without passing
// through registers, done once a cp.async.wait_group covers its group; `valid` false
// zero-fills them and reads nothing (16 bytes bypass L1, .cg; 4 bytes can only go through it,
// .ca). Older GPUs never launch the kernels that use it (Gpu::bf16_tensor_cores).
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool valid) {
    static_assert(BYTES == 16 || BYTES == 4, "cp.async copies 4 or 16 bytes here");
#ifdef CUDASIM
    cudasim::cp_async(dst, src, BYTES, valid ? BYTES : 0u);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();
#else
    if constexpr (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
                     "r"(valid ? 16 : 0));
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_address(dst)), "l"(src),
                     "r"(valid ? 4 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef CUDASIM
    cudasim::cp_async_commit();
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N of this thread's newest groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef CUDASIM
    cudasim::cp_async_wait(N);
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// The dynamic shared memory this launch was given, in bytes.
__device__ __forceinline__ unsigned dynamic_shared_bytes() {
#ifdef CUDASIM
    return cudasim::dynamic_shared_size();
#else
    unsigned r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
#endif
}

// Ends the kernel with an error: __trap() on a GPU (the launch fails), a launch error that
// names `why` in the simulator.
#ifdef CUDASIM
#define KERNEL_TRAP(why)         \
    do {                         \
        cudasim::trap(why);      \
        return;                  \
    } while (0)
#else
#define KERNEL_TRAP(why) __trap()
#endif

// Max and sum over the four lanes that share a row of a C fragment.
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// flash_fwd's dynamic shared memory in 32-bit words (gpu/flash.rs computes the same for the
// launch; the kernel traps when it is given less): two stages of the key and the value tile
// (64 rows of D/2 + 4 words).
__host__ __device__ constexpr unsigned flash_fwd_shared_words(int D) { return 2u * 2u * 64u * (D / 2 + 4); }

// Q [seq, heads, L, D], K and V [seq, kv_heads, L, D] bf16 (the padded layout); O f32 in Q's
// layout (padding rows zero); lse (optional) the rows' log-sum-exp of the scaled scores, for a
// backward pass, in log2 units (log2 Σ 2^(s·scale·log2 e) = lse·log2 e, so that the backward
// pass's terms are one FMA and one EX2). Row t of sequence s sees keys j ≤ t, j < len[s] and,
// with window w > 0, j > t − w. Grid: one block of 128 threads per (64-row tile, head,
// sequence), flattened.
template <int D>
__device__ void flash_fwd(const bf16* Q, const bf16* K, const bf16* V, float* O, float* lse, const int* seq_len,
                          int heads, int kv_heads, int L, int window, float scale) {
    constexpr int BR = 64, BC = 64, KS = D / 16, NO = D / 8;
    // Both tiles row-major, [key][D] in bf16 pairs, rows padded by 4 words (16 bytes): the 8
    // rows one ldmatrix phase reads then start 4 banks apart and cover all 32 (unpadded, a row
    // of D/2 words, a multiple of 32 for D ≥ 64, put all 8 in the same banks), and every row
    // stays 16-byte aligned for ldmatrix and the tiles' 16-byte stores. The value tile needs
    // no transposing copy: ldmatrix.trans hands out its columns.
    constexpr int KW = D / 2 + 4, TILE = BC * KW;
    // Two stages of both tiles in dynamic shared memory (flash_fwd_shared_words: 36 KB at
    // head size 64, 68 KB at 128): the next tiles are copied (cp.async) while these are
    // multiplied.
    EXTERN_SHARED(unsigned, smem);
    if (dynamic_shared_bytes() < flash_fwd_shared_words(D) * 4u) KERNEL_TRAP("flash_fwd: too little shared memory");
    unsigned* ks = smem;              // the key tiles, [stage][BC][KW]
    unsigned* vs = smem + 2 * TILE;   // the value tiles
    int tiles = (L + BR - 1) / BR;
    int q0 = (blockIdx.x % tiles) * BR;
    int h = (blockIdx.x / tiles) % heads;
    int s = blockIdx.x / tiles / heads;
    int len = seq_len[s];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    int kvh = h / (heads / kv_heads);
    const bf16* Qh = Q + ((long)s * heads + h) * L * D;
    const bf16* Kh = K + ((long)s * kv_heads + kvh) * L * D;
    const bf16* Vh = V + ((long)s * kv_heads + kvh) * L * D;
    int r0 = q0 + warp * 16 + g, r1 = r0 + 8;  // this lane's two query rows
    unsigned qa[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
        int c = kk * 16 + tq * 2;
        qa[kk][0] = r0 < L ? *reinterpret_cast<const unsigned*>(Qh + (long)r0 * D + c) : 0u;
        qa[kk][1] = r1 < L ? *reinterpret_cast<const unsigned*>(Qh + (long)r1 * D + c) : 0u;
        qa[kk][2] = r0 < L ? *reinterpret_cast<const unsigned*>(Qh + (long)r0 * D + c + 8) : 0u;
        qa[kk][3] = r1 < L ? *reinterpret_cast<const unsigned*>(Qh + (long)r1 * D + c + 8) : 0u;
    }
    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    const float c2 = scale * 1.44269504088896341f;  // log2 e
    int hi = min(q0 + BR, len);
    int lo = window > 0 ? max(0, q0 - window + 1) / BC * BC : 0;
    int ntiles = hi > lo ? (hi - lo + BC - 1) / BC : 0;
    // Tile t's keys and values into stage t % 2, 16 bytes (8 values) per copy (a row is D / 8
    // of them), as one cp.async group; rows past L are zero-filled, nothing read.
    auto fetch = [&](int t) {
        int st = (t & 1) * TILE;
        for (int i = threadIdx.x; i < BC * D / 8; i += blockDim.x) {
            int key = i / (D / 8), c = i % (D / 8), j = lo + t * BC + key;
            long row = j < L ? j : 0;
            cp_async<16>(ks + st + key * KW + c * 4, Kh + row * D + c * 8, j < L);
            cp_async<16>(vs + st + key * KW + c * 4, Vh + row * D + c * 8, j < L);
        }
        cp_async_commit();
    };
    if (ntiles > 0) fetch(0);
    for (int t = 0; t < ntiles; t++) {
        int k0 = lo + t * BC;
        // The next tile's copy runs while this one is multiplied (an empty group after the
        // last, so that waiting for all but the newest group always means this one).
        if (t + 1 < ntiles)
            fetch(t + 1);
        else
            cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();  // every thread's copies of tile t are in
        const unsigned* ks_t = ks + (t & 1) * TILE;
        const unsigned* vs_t = vs + (t & 1) * TILE;
        // Scores of 16 rows × 64 keys. One ldmatrix gives the B fragments of two key tiles:
        // matrices (keys nt·8.., values kk·16..), (the same, +8 values), then keys + 8.
        float sc[BC / 8][4];
#pragma unroll
        for (int nt = 0; nt < BC / 8; nt++) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
        const unsigned* krow = ks_t + (lane & 7) * KW + (lane >> 3 & 1) * 4 + (lane >> 4) * 8 * KW;
#pragma unroll
        for (int kk = 0; kk < KS; kk++)
#pragma unroll
            for (int nt = 0; nt < BC / 8; nt += 2) {
                unsigned b[4];
                ldsm_x4(b, krow + nt * 8 * KW + kk * 8);
                mma_bf16_16816(sc[nt], qa[kk], b);
                mma_bf16_16816(sc[nt + 1], qa[kk], b + 2);
            }
        // Mask, then the online softmax: new row maxima, rescale what was summed so far. A tile
        // wholly below the diagonal, with every row inside the sequence and no window, needs no
        // mask: all tiles but the diagonal one of a full-length causal block skip it. The
        // maxima are of the raw scores (scale > 0 keeps their order), and with c = scale·log2 e
        // each term 2^(s·c − m·c) is one FMA and one EX2.
        bool full = window <= 0 && k0 + BC <= q0 + 1 && q0 + BR <= len;
        if (!full) {
#pragma unroll
            for (int nt = 0; nt < BC / 8; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    int j = k0 + nt * 8 + tq * 2 + e;
                    if (!(r0 < len && j <= r0 && (window <= 0 || j > r0 - window))) sc[nt][e] = -INFINITY;
                    if (!(r1 < len && j <= r1 && (window <= 0 || j > r1 - window))) sc[nt][2 + e] = -INFINITY;
                }
        }
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int nt = 0; nt < BC / 8; nt++) {
            mx0 = fmaxf(mx0, fmaxf(sc[nt][0], sc[nt][1]));
            mx1 = fmaxf(mx1, fmaxf(sc[nt][2], sc[nt][3]));
        }
        mx0 = quad_max(mx0);
        mx1 = quad_max(mx1);
        // A row that sees no key yet keeps −inf: its terms are 0 (and its o and l stay 0).
        float b0 = mx0 == -INFINITY ? 0.f : -mx0 * c2, b1 = mx1 == -INFINITY ? 0.f : -mx1 * c2;
        float a0 = fast_exp2(fmaf(m0, c2, b0)), a1 = fast_exp2(fmaf(m1, c2, b1));
        float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
        for (int nt = 0; nt < BC / 8; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float p0 = fast_exp2(fmaf(sc[nt][e], c2, b0));
                float p1 = fast_exp2(fmaf(sc[nt][2 + e], c2, b1));
                sc[nt][e] = p0;
                sc[nt][2 + e] = p1;
                rs0 += p0;
                rs1 += p1;
            }
        l0 = l0 * a0 + quad_sum(rs0);
        l1 = l1 * a1 + quad_sum(rs1);
        m0 = mx0;
        m1 = mx1;
#pragma unroll
        for (int n = 0; n < NO; n++) {
            o[n][0] *= a0;
            o[n][1] *= a0;
            o[n][2] *= a1;
            o[n][3] *= a1;
        }
        // O += P·V: the score tiles, packed to bf16, are P's A fragments. One ldmatrix.trans
        // gives the B fragments of two 8-value column tiles: matrices (keys kk·16.., values
        // n·8..), (keys + 8, the same), then values + 8.
        const unsigned* vrow = vs_t + (lane & 7) * KW + (lane >> 3 & 1) * 8 * KW + (lane >> 4) * 4;
#pragma unroll
        for (int kk = 0; kk < BC / 16; kk++) {
            unsigned pa[4] = {pack_bf16(sc[2 * kk][0], sc[2 * kk][1]), pack_bf16(sc[2 * kk][2], sc[2 * kk][3]),
                              pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                              pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
            for (int n = 0; n < NO; n += 2) {
                unsigned b[4];
                ldsm_x4_trans(b, vrow + kk * 16 * KW + n * 4);
                mma_bf16_16816(o[n], pa, b);
                mma_bf16_16816(o[n + 1], pa, b + 2);
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }
    float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    float* Oh = O + ((long)s * heads + h) * L * D;
#pragma unroll
    for (int n = 0; n < NO; n++) {
        int c = n * 8 + tq * 2;
        if (r0 < L) {
            Oh[(long)r0 * D + c] = o[n][0] * inv0;
            Oh[(long)r0 * D + c + 1] = o[n][1] * inv0;
        }
        if (r1 < L) {
            Oh[(long)r1 * D + c] = o[n][2] * inv1;
            Oh[(long)r1 * D + c + 1] = o[n][3] * inv1;
        }
    }
    if (lse && tq == 0) {
        float* lh = lse + ((long)s * heads + h) * L;
        if (r0 < L) lh[r0] = l0 > 0.f ? m0 * c2 + log2f(l0) : -INFINITY;
        if (r1 < L) lh[r1] = l1 > 0.f ? m1 * c2 + log2f(l1) : -INFINITY;
    }
}

// One entry point per head size (a multiple of 16, at most 128).
#define FLASH_FWD_PARAMS                                                                            \
    const bf16 *Q, const bf16 *K, const bf16 *V, float *O, float *lse, const int *seq_len, int heads, \
        int kv_heads, int L, int window, float scale
#define FLASH_FWD_CALL(D) flash_fwd<D>(Q, K, V, O, lse, seq_len, heads, kv_heads, L, window, scale)
extern "C" __global__ void flash_fwd_d16(FLASH_FWD_PARAMS) { FLASH_FWD_CALL(16); }
extern "C" __global__ void flash_fwd_d32(FLASH_FWD_PARAMS) { FLASH_FWD_CALL(32); }
extern "C" __global__ void flash_fwd_d64(FLASH_FWD_PARAMS) { FLASH_FWD_CALL(64); }
extern "C" __global__ void flash_fwd_d80(FLASH_FWD_PARAMS) { FLASH_FWD_CALL(80); }
extern "C" __global__ void flash_fwd_d96(FLASH_FWD_PARAMS) { FLASH_FWD_CALL(96); }
extern "C" __global__ void flash_fwd_d128(FLASH_FWD_PARAMS) { FLASH_FWD_CALL(128); }

// Dv[r] = Σ dO[r, :]·O[r, :] over the padded rows (flash attention's backward pass needs it
// per query row): one warp per row.
extern "C" __global__ void flash_bwd_dot(const bf16* dO, const float* O, float* Dv, long rows, int D) {
    long r = blockIdx.x * (long)(blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= rows) return;
    float acc = 0.f;
    for (int c = lane; c < D; c += 32) acc += bf2f(dO[r * D + c]) * O[r * D + c];
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) Dv[r] = acc;
}

__device__ __forceinline__ unsigned pack_bits(bf16 lo, bf16 hi) { return (unsigned)lo | ((unsigned)hi << 16); }

// Backward of flash_fwd (FA2): one block of 128 threads per (64-key tile, kv head, sequence);
// each warp owns 16 keys and keeps their dK and dV in registers while it walks every query
// tile of every query head sharing the kv head. P and dS are recomputed from Q, K and the
// forward pass's log-sum-exp; dQ is accumulated with atomics (dQ must start at zero).
// dK, dV: [seq, kv_heads, L, D] f32, every row written (zero where no query sees the key).
// Every B fragment (and dS's A fragment) comes from shared memory through ldmatrix: the
// tiles are row-major with rows padded by 16 bytes (see flash_fwd), read plain where the
// fragment runs along a row and transposed where it runs down a column.
// flash_bwd's dynamic shared memory in 32-bit words (gpu/flash.rs computes the same for the
// launch; the kernel traps when it is given less): two stages of Q and dO (BR rows of D/2 + 4
// words), the key tile (and above D = 64 the value tile), four warps' dSᵀ (16 rows of BR/2 + 4
// words), two stages of two floats per query row.
__host__ __device__ constexpr unsigned flash_bwd_shared_words(int D, int BR) {
    return 2u * 2u * BR * (D / 2 + 4) + (D > 64 ? 2u : 1u) * 64u * (D / 2 + 4) + 64u * (BR / 2 + 4) + 2u * 2u * BR;
}

template <int D, int BR>
__device__ void flash_bwd(const bf16* Q, const bf16* K, const bf16* V, const bf16* dO, const float* lse,
                          const float* Dv, float* dQ, float* dK, float* dV, const int* seq_len, int heads,
                          int kv_heads, int L, int window, float scale) {
    constexpr int BC = 64, KS = D / 16, NO = D / 8, NT = BR / 8;
    constexpr int RW = D / 2 + 4;   // words per padded row of a [row][D] tile
    constexpr int SW = BR / 2 + 4;  // words per padded row of dSᵀ, [key][BR queries]
    constexpr bool VS = D > 64;     // the values' A fragments come from shared memory
    const float c2 = scale * 1.44269504088896341f;  // P = 2^(s·c2 − lse), lse in log2 units
    // Dynamic shared memory (flash_bwd_shared_words: 55 KB at D = 64, 74 KB at 128, over the
    // 48 KB static limit): two stages of the query tile and its output gradient, so that the
    // next query tile is copied (cp.async) while this one is multiplied, then this block's
    // keys (and above D = 64 its values), each warp's dSᵀ, and two stages of the rows'
    // log-sum-exp and dO·O.
    EXTERN_SHARED(unsigned, smem);
    if (dynamic_shared_bytes() < flash_bwd_shared_words(D, BR) * 4u) KERNEL_TRAP("flash_bwd: too little shared memory");
    unsigned* qs = smem;                     // [stage][BR][RW]
    unsigned* dos = qs + 2 * BR * RW;        // [stage][BR][RW]
    unsigned* kt = dos + 2 * BR * RW;        // [BC][RW]
    unsigned* vt = kt + BC * RW;             // [BC][RW], above D = 64
    unsigned* dst = vt + (VS ? BC * RW : 0); // [warp][16][SW]
    float* lse_s = reinterpret_cast<float*>(dst + 4 * 16 * SW);  // [stage][BR]
    float* dv_s = lse_s + 2 * BR;                                // [stage][BR]
    int tiles = (L + BC - 1) / BC;
    int k0 = (blockIdx.x % tiles) * BC;
    int kvh = (blockIdx.x / tiles) % kv_heads;
    int s = blockIdx.x / tiles / kv_heads;
    int len = seq_len[s];
    int grp = heads / kv_heads;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    long kvbase = ((long)s * kv_heads + kvh) * L * D;
    const bf16* Kh = K + kvbase;
    const bf16* Vh = V + kvbase;
    int j0 = k0 + warp * 16 + g, j1 = j0 + 8;  // this lane's two keys
    // This warp's values as A fragments (16 keys × D): in registers up to D = 64; above, read
    // from the value tile for each query tile, as the keys' always are (KS ldmatrix each),
    // which leaves the larger kernels' registers room without spilling.
    unsigned va[VS ? 1 : KS][4];
    if constexpr (!VS) {
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
            int c = kk * 16 + tq * 2;
            va[kk][0] = j0 < L ? *reinterpret_cast<const unsigned*>(Vh + (long)j0 * D + c) : 0u;
            va[kk][1] = j1 < L ? *reinterpret_cast<const unsigned*>(Vh + (long)j1 * D + c) : 0u;
            va[kk][2] = j0 < L ? *reinterpret_cast<const unsigned*>(Vh + (long)j0 * D + c + 8) : 0u;
            va[kk][3] = j1 < L ? *reinterpret_cast<const unsigned*>(Vh + (long)j1 * D + c + 8) : 0u;
        }
    }
    // 16 bytes (8 values) per load and store: a row is D / 8 of them.
    for (int i = threadIdx.x; i < BC * D / 8; i += blockDim.x) {
        int key = i / (D / 8), c = i % (D / 8), j = k0 + key;
        *reinterpret_cast<uint4*>(kt + key * RW + c * 4) =
            j < L ? reinterpret_cast<const uint4*>(Kh + (long)j * D)[c] : make_uint4(0u, 0u, 0u, 0u);
        if constexpr (VS)
            *reinterpret_cast<uint4*>(vt + key * RW + c * 4) =
                j < L ? reinterpret_cast<const uint4*>(Vh + (long)j * D)[c] : make_uint4(0u, 0u, 0u, 0u);
    }
    float dk[NO][4], dv[NO][4];
#pragma unroll
    for (int n = 0; n < NO; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[n][e] = dv[n][e] = 0.f;
    // Queries that see these keys: t ≥ k0 (causal), t < len, and t < k0 + BC − 1 + window.
    int qlo = k0 / BR * BR;
    int qhi = len;
    if (window > 0) qhi = min(qhi, k0 + BC - 1 + window);
    unsigned* myds = dst + warp * 16 * SW;
    // ldmatrix row addresses (lane l: row l % 8 of matrix l / 8), in words:
    // plain reads of two 8-row tiles × one 16-value step (matrices: rows +0, values +0 / +8,
    // then rows +8), transposed reads of one 16-row step × two 8-value tiles (matrices: rows
    // +0 / +8, values +0, then values +8), and dS's A fragment from dSᵀ (matrices: keys +0,
    // queries +0 / +8, then keys +8).
    const int plain = (lane & 7) * RW + (lane >> 3 & 1) * 4 + (lane >> 4) * 8 * RW;
    const int trans = (lane & 7) * RW + (lane >> 3 & 1) * 8 * RW + (lane >> 4) * 4;
    const int ds_lane = (lane & 7) * SW + (lane >> 3 & 1) * 4 + (lane >> 4) * 8 * SW;
    const unsigned* k_row = kt + warp * 16 * RW + trans;
    // The query tiles, every query head of the group in turn, as one sequence u = 0..nu.
    int nq = qhi > qlo ? (qhi - qlo + BR - 1) / BR : 0, nu = grp * nq;
    long head0 = ((long)s * heads + kvh * grp) * L;  // the group's first query head
    // The next tile to copy: its stage, first query and head (its rows start at fbase).
    int fst = 0, fq0 = qlo;
    long fbase = head0;
    // The next tile's rows of Q and dO, log-sum-exp and dO·O into its stage, as one cp.async
    // group (rows past L zero-filled, nothing read).
    auto fetch = [&]() {
        int st = fst, q0 = fq0;
        long qbase = fbase;
        fst ^= 1;
        fq0 += BR;
        if (fq0 >= qhi) {
            fq0 = qlo;
            fbase += L;
        }
        for (int i = threadIdx.x; i < BR * D / 8; i += blockDim.x) {
            int row = i / (D / 8), c = i % (D / 8), t = q0 + row;
            long r = qbase + (t < L ? t : 0);
            cp_async<16>(qs + (st * BR + row) * RW + c * 4, Q + r * D + c * 8, t < L);
            cp_async<16>(dos + (st * BR + row) * RW + c * 4, dO + r * D + c * 8, t < L);
        }
        for (int i = threadIdx.x; i < BR; i += blockDim.x) {
            int t = q0 + i;
            long r = qbase + (t < L ? t : 0);
            cp_async<4>(lse_s + st * BR + i, lse + r, t < L);
            cp_async<4>(dv_s + st * BR + i, Dv + r, t < L);
        }
        cp_async_commit();
    };
    if (nu > 0) fetch();
    int q0 = qlo;
    long qbase = head0;
    for (int u = 0; u < nu; u++) {
        int st = u & 1;
        // The next tile's copy runs while this one is multiplied (an empty group after the
        // last, so that waiting for all but the newest group always means this one).
        if (u + 1 < nu)
            fetch();
        else
            cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();  // every thread's copies of tile u are in (and, first, kt is written)
        {
            const unsigned* qs = smem + st * BR * RW;
            const unsigned* dos = smem + (2 + st) * BR * RW;
            const float* lse_t = lse_s + st * BR;
            const float* dv_t = dv_s + st * BR;
            // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for this warp's 16 keys × BR queries.
            float sc[NT][4], dp[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) sc[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                // The keys' A fragment (16 keys × 16 values), read plain: matrices (keys +0 /
                // +8, values +0), then values +8 — the transposed reads' addresses.
                unsigned ka[4], vf[4];
                ldsm_x4(ka, k_row + kk * 8);
                if constexpr (VS) ldsm_x4(vf, k_row + (vt - kt) + kk * 8);
                const unsigned* vak = VS ? vf : va[kk];
#pragma unroll
                for (int nt = 0; nt < NT; nt += 2) {
                    unsigned bq[4], bo[4];
                    ldsm_x4(bq, qs + plain + nt * 8 * RW + kk * 8);
                    ldsm_x4(bo, dos + plain + nt * 8 * RW + kk * 8);
                    mma_bf16_16816(sc[nt], ka, bq);
                    mma_bf16_16816(sc[nt + 1], ka, bq + 2);
                    mma_bf16_16816(dp[nt], vak, bo);
                    mma_bf16_16816(dp[nt + 1], vak, bo + 2);
                }
            }
            // Pᵀ and dSᵀ = Pᵀ ∘ (dPᵀ − Dv)·scale. Queries all at or after the tile's keys,
            // inside the sequence and without a window, need no mask (as in the forward pass).
            bool full = window <= 0 && k0 + BC <= q0 + 1 && q0 + BR <= len;
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int j = e < 2 ? j0 : j1;
                    int qi = nt * 8 + tq * 2 + (e & 1);
                    int t = q0 + qi;
                    bool ok = full || (t < len && j <= t && (window <= 0 || j > t - window));
                    float p = ok ? fast_exp2(fmaf(sc[nt][e], c2, -lse_t[qi])) : 0.f;
                    sc[nt][e] = p;
                    dp[nt][e] = p * (dp[nt][e] - dv_t[qi]) * scale;
                }
            // dV += Pᵀ·dO and dK += dSᵀ·Q: the score tiles are the A fragments, the B fragments
            // run down the columns of dO and Q (transposed reads).
#pragma unroll
            for (int kk = 0; kk < BR / 16; kk++) {
                unsigned pa[4] = {pack_bf16(sc[2 * kk][0], sc[2 * kk][1]), pack_bf16(sc[2 * kk][2], sc[2 * kk][3]),
                                  pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                  pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
                unsigned sa[4] = {pack_bf16(dp[2 * kk][0], dp[2 * kk][1]), pack_bf16(dp[2 * kk][2], dp[2 * kk][3]),
                                  pack_bf16(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                  pack_bf16(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
                for (int n = 0; n < NO; n += 2) {
                    unsigned bo[4], bq[4];
                    ldsm_x4_trans(bo, dos + trans + kk * 16 * RW + n * 4);
                    ldsm_x4_trans(bq, qs + trans + kk * 16 * RW + n * 4);
                    mma_bf16_16816(dv[n], pa, bo);
                    mma_bf16_16816(dv[n + 1], pa, bo + 2);
                    mma_bf16_16816(dk[n], sa, bq);
                    mma_bf16_16816(dk[n + 1], sa, bq + 2);
                }
            }
            // dQ += dS·K over the block's 64 keys: every warp's dSᵀ goes through shared memory
            // (bf16 pairs along the queries) to come back, transposed by ldmatrix, as A
            // fragments of dS. Warp w then takes query rows (w % MB)·16.. and value columns
            // (w / MB)·NW·8.. of the tile (MB = BR / 16 row blocks, NW column tiles each), so
            // each dQ value gets one atomic per block and query tile, not one per warp.
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                myds[g * SW + nt * 4 + tq] = pack_bf16(dp[nt][0], dp[nt][1]);
                myds[(g + 8) * SW + nt * 4 + tq] = pack_bf16(dp[nt][2], dp[nt][3]);
            }
            __syncthreads();  // every warp's dSᵀ is in
            {
                constexpr int MB = BR / 16, NW = NO * MB / 4;
                int mq = warp % MB, n0 = (warp / MB) * NW;
                float acc[NW][4];
#pragma unroll
                for (int n = 0; n < NW; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
                // (Not unrolled: unrolled, the fragments of all four stay live and it spills.)
#pragma unroll 1
                for (int kw = 0; kw < 4; kw++) {  // the keys of warp kw: 16 of the block's 64
                    unsigned da[4];
                    ldsm_x4_trans(da, dst + kw * 16 * SW + ds_lane + mq * 8);
#pragma unroll
                    for (int n = 0; n < NW; n += 2) {
                        // (With NW odd, the second tile of the last pair is the next warp's or
                        // the rows' padding: read, never used.)
                        unsigned bk[4];
                        ldsm_x4_trans(bk, kt + kw * 16 * RW + trans + (n0 + n) * 4);
                        mma_bf16_16816(acc[n], da, bk);
                        if (n + 1 < NW) mma_bf16_16816(acc[n + 1], da, bk + 2);
                    }
                }
                // Rows past L (the last tile's padding) have dS = 0 exactly (no key is visible
                // to them, and their dO rows are zero): they add 0 to row L − 1 instead of
                // branching around every atomic.
                int t0 = min(q0 + mq * 16 + g, L - 1), t1 = min(q0 + mq * 16 + g + 8, L - 1);
                float* dq0 = dQ + (qbase + t0) * D + tq * 2;
                float* dq1 = dQ + (qbase + t1) * D + tq * 2;
#pragma unroll
                for (int n = 0; n < NW; n++) {
                    int col = (n0 + n) * 8;
                    atomicAdd(dq0 + col, acc[n][0]);
                    atomicAdd(dq0 + col + 1, acc[n][1]);
                    atomicAdd(dq1 + col, acc[n][2]);
                    atomicAdd(dq1 + col + 1, acc[n][3]);
                }
            }
        }
        __syncthreads();  // every warp is done with this stage (and its dSᵀ) before a refill
        q0 += BR;
        if (q0 >= qhi) {
            q0 = qlo;
            qbase += L;
        }
    }
    // The softmax scale was applied to dS; dK needs no more. Write this warp's rows.
#pragma unroll
    for (int n = 0; n < NO; n++) {
        int c = n * 8 + tq * 2;
        if (j0 < L) {
            dK[kvbase + (long)j0 * D + c] = dk[n][0];
            dK[kvbase + (long)j0 * D + c + 1] = dk[n][1];
            dV[kvbase + (long)j0 * D + c] = dv[n][0];
            dV[kvbase + (long)j0 * D + c + 1] = dv[n][1];
        }
        if (j1 < L) {
            dK[kvbase + (long)j1 * D + c] = dk[n][2];
            dK[kvbase + (long)j1 * D + c + 1] = dk[n][3];
            dV[kvbase + (long)j1 * D + c] = dv[n][2];
            dV[kvbase + (long)j1 * D + c + 1] = dv[n][3];
        }
    }
}

#define FLASH_BWD_PARAMS                                                                                     \
    const bf16 *Q, const bf16 *K, const bf16 *V, const bf16 *dO, const float *lse, const float *Dv, float *dQ, \
        float *dK, float *dV, const int *seq_len, int heads, int kv_heads, int L, int window, float scale
#define FLASH_BWD_CALL(D, BR) \
    flash_bwd<D, BR>(Q, K, V, dO, lse, Dv, dQ, dK, dV, seq_len, heads, kv_heads, L, window, scale)
extern "C" __global__ void flash_bwd_d16(FLASH_BWD_PARAMS) { FLASH_BWD_CALL(16, 64); }
extern "C" __global__ void flash_bwd_d32(FLASH_BWD_PARAMS) { FLASH_BWD_CALL(32, 64); }
extern "C" __global__ void flash_bwd_d64(FLASH_BWD_PARAMS) { FLASH_BWD_CALL(64, 64); }
extern "C" __global__ void flash_bwd_d80(FLASH_BWD_PARAMS) { FLASH_BWD_CALL(80, 32); }
extern "C" __global__ void flash_bwd_d96(FLASH_BWD_PARAMS) { FLASH_BWD_CALL(96, 32); }
extern "C" __global__ void flash_bwd_d128(FLASH_BWD_PARAMS) { FLASH_BWD_CALL(128, 32); }

// ---- generation: attention of new rows against the KV cache ---------------------------------
// q f32 [n, heads·dh] (not rotated: rotated here for its position pos0 + row); kc, vc the
// cache, bf16 [kv_heads, Lmax, dh], holding positions 0 .. pos0 + n − 1 (keys rotated);
// out f32 [n, heads·dh]. Row i sees keys j ≤ pos0 + i (and j > pos0 + i − w with a window w).
// One block per (row, head), four warps; dynamic shared memory: dh + pos0 + n + 4·dh floats
// (the rotated query, the row's scores, the warps' partial outputs: gpu/decode.rs).
extern "C" __global__ void attn_decode(const float* q, const bf16* kc, const bf16* vc, float* out, const float* cosb,
                                       const float* sinb, int heads, int kv_heads, int dh, int Lmax, int pos0, int window,
                                       float scale, int rope) {
    // Dynamic shared memory (attn_decode_shared_floats): the query row (dh), the scores of
    // the keys it sees (up to pos0 + rows), then each warp's partial output (warps × dh).
    EXTERN_SHARED(float, sm);
    __shared__ float red[32];
    int i = blockIdx.x / heads, h = blockIdx.x % heads;
    int t = pos0 + i;
    int kvh = h / (heads / kv_heads);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    float* qs = sm;
    float* sc = sm + dh;
    const float* qr = q + ((long)i * heads + h) * dh;
    int half = dh / 2;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        float x1 = qr[j], x2 = qr[j + half];
        if (rope) {
            float c = cosb[(long)t * half + j], s = sinb[(long)t * half + j];
            qs[j] = x1 * c - x2 * s;
            qs[j + half] = x2 * c + x1 * s;
        } else {
            qs[j] = x1;
            qs[j + half] = x2;
        }
    }
    __syncthreads();
    int lo = (window > 0 && t - window + 1 > 0) ? t - window + 1 : 0;
    const bf16* K = kc + (long)kvh * Lmax * dh;
    const bf16* V = vc + (long)kvh * Lmax * dh;
    float* part = sc + (t - lo + 1);  // [warp][dh]
    // Scores: one key per thread, its row read 16 bytes (8 values) at a time where the head
    // size allows (every supported model's): an eighth of the loads of 2-byte reads.
    float m = -INFINITY;
    for (int j = lo + threadIdx.x; j <= t; j += blockDim.x) {
        float s = 0.f;
        const bf16* kr = K + (long)j * dh;
        if ((dh & 7) == 0) {
            for (int c = 0; c < dh; c += 8) {
                uint4 w = *reinterpret_cast<const uint4*>(kr + c);
                unsigned u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    s += qs[c + 2 * e] * __uint_as_float(u[e] << 16);
                    s += qs[c + 2 * e + 1] * __uint_as_float(u[e] & 0xffff0000u);
                }
            }
        } else {
            for (int c = 0; c < dh; c++) s += qs[c] * bf2f(kr[c]);
        }
        s *= scale;
        sc[j - lo] = s;
        m = fmaxf(m, s);
    }
    m = block_max(m, red);
    float sum = 0.f;
    for (int j = lo + threadIdx.x; j <= t; j += blockDim.x) {
        float p = __expf(sc[j - lo] - m);
        sc[j - lo] = p;
        sum += p;
    }
    sum = block_sum(sum, red);  // (its barriers also publish every thread's sc writes)
    float inv = 1.f / sum;
    // Σ p_j V[j]: warp w takes keys lo + w, lo + w + nw, …; its lanes take value pairs (a
    // warp reads 128 bytes of a row at a time), a second round of pairs above head size 64.
    for (int pc = lane; pc < half; pc += 32) {
        float a0 = 0.f, a1 = 0.f;
        const unsigned* vp = reinterpret_cast<const unsigned*>(V + (long)(lo + warp) * dh) + pc;
        const float* sp = sc + warp;
        for (int j = lo + warp; j <= t; j += nw, vp += nw * half, sp += nw) {
            unsigned w = *vp;
            float p = *sp;
            a0 += p * __uint_as_float(w << 16);
            a1 += p * __uint_as_float(w & 0xffff0000u);
        }
        part[warp * dh + 2 * pc] = a0;
        part[warp * dh + 2 * pc + 1] = a1;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < dh; c += blockDim.x) {
        float o = 0.f;
        for (int w = 0; w < nw; w++) o += part[w * dh + c];
        out[((long)i * heads + h) * dh + c] = o * inv;
    }
}

// ---- DoRA (weight-decomposed LoRA, PEFT's DoraLinearLayer) ----------------------------------
// norm[o] = ‖W[o, :] + s·(B·A)[o, :]‖ (detached, as PEFT computes it): one block per row; W
// bf16 [out, in], ba = B·A f32 [out, in].
extern "C" __global__ void dora_norm(const bf16* W, const float* ba, float s, float* norm, int inp) {
    __shared__ float sh[32];
    long o = blockIdx.x;
    float acc = 0.f;
    for (int i = threadIdx.x; i < inp; i += blockDim.x) {
        float v = bf2f(W[o * inp + i]) + s * ba[o * inp + i];
        acc += v * v;
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) norm[o] = sqrtf(acc);
}

// y[r, o] *= m[o] / norm[o]: the magnitude rescales the whole (base + LoRA) output. Without
// norm (null), y[r, o] *= m[o]: IA3's output scaling.
extern "C" __global__ void dora_scale(float* y, const float* m, const float* norm, long rows, int out) {
    long n = rows * out;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        int o = i % out;
        y[i] *= norm ? m[o] / norm[o] : m[o];
    }
}

// Backward of dora_scale given dy (bf16) and z, the output before it (f32): dm[o] +=
// Σ_r dy[r, o]·z[r, o] / norm[o], and dys = dy·m/norm (bf16), the gradient the base product
// and the LoRA branch see. One thread per output column (no atomics; reads coalesce).
// Without norm (null): IA3's output scaling (dl[o] += Σ_r dy·z, dys = dy·l).
extern "C" __global__ void dora_bwd(const bf16* dy, const float* z, const float* m, const float* norm, float* dm,
                                    bf16* dys, long rows, int out) {
    for (int o = blockIdx.x * blockDim.x + threadIdx.x; o < out; o += gridDim.x * blockDim.x) {
        float n = norm ? norm[o] : 1.f;
        float f = m[o] / n, acc = 0.f;
        for (long r = 0; r < rows; r++) {
            float g = bf2f(dy[r * out + o]);
            acc += g * z[r * out + o];
            dys[r * out + o] = f2bf(g * f);
        }
        dm[o] += acc / n;
    }
}

// ---- IA3 on a layer's input (feed-forward modules) --------------------------------------------
// xs = x ⊙ l per column (bf16 [rows, cols]).
extern "C" __global__ void ia3_scale_input(const bf16* x, const float* l, bf16* xs, long rows, int cols) {
    long n = rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        xs[i] = f2bf(bf2f(x[i]) * l[i % cols]);
}

// Given dxs = dy·W (the gradient of x ⊙ l, f32): dl[c] += Σ_r dxs·x, and dx = dxs ⊙ l, written
// (acc = 0) or added (acc = 1). One thread per column.
extern "C" __global__ void ia3_input_bwd(const float* dxs, const bf16* x, const float* l, float* dl, float* dx, long rows,
                                         int cols, int acc) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
        float s = 0.f;
        for (long r = 0; r < rows; r++) {
            float g = dxs[r * cols + c];
            s += g * bf2f(x[r * cols + c]);
            if (dx) dx[r * cols + c] = (acc ? dx[r * cols + c] : 0.f) + g * l[c];
        }
        dl[c] += s;
    }
}

// ---- full and partial fine-tuning: gradients of base tensors --------------------------------
// dw[c] += Σ_r dy[r, c]·x[r, c]·rstd[r]: the RMSNorm weight's gradient (y = x·rstd·w). One
// thread per column.
extern "C" __global__ void rmsnorm_dw(const float* x, const float* rstd, const float* dy, float* dw, long rows, int hidden) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < hidden; c += gridDim.x * blockDim.x) {
        float s = 0.f;
        for (long r = 0; r < rows; r++) s += dy[r * hidden + c] * x[r * hidden + c] * rstd[r];
        dw[c] += s;
    }
}

// db[c] += Σ_r dy[r, c]: a linear layer's bias (dy in bf16). One thread per column.
extern "C" __global__ void col_sum_bf16(const bf16* dy, float* db, long rows, int cols) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
        float s = 0.f;
        for (long r = 0; r < rows; r++) s += bf2f(dy[r * cols + c]);
        db[c] += s;
    }
}

// dE[ids[r], :] += dh[r, :]: the embedding's gradient (atomics: a token may repeat). Rows whose
// id is 0xffffffff (prompt tuning's virtual tokens) have no token and are skipped.
extern "C" __global__ void embed_grad(const unsigned* ids, const float* dh, float* dE, long rows, int hidden) {
    long n = rows * hidden;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / hidden;
        int c = i % hidden;
        if (ids[r] != 0xffffffffu) atomicAdd(&dE[(long)ids[r] * hidden + c], dh[i]);
    }
}

// ---- bottleneck adapters -------------------------------------------------------------------
// a = f(z) as bf16 (the up projection's input); kind 0 = relu, 1 = silu.
extern "C" __global__ void adapter_act(const float* z, bf16* a, long n, int kind) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = z[i];
        a[i] = f2bf(kind == 0 ? fmaxf(v, 0.f) : v / (1.f + __expf(-v)));
    }
}

// dzb = dz·f'(z) as bf16 (the input of the down projection's gradient products).
extern "C" __global__ void adapter_act_bwd(const float* dz, const float* z, bf16* dzb, long n, int kind) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = z[i], d;
        if (kind == 0) {
            d = v > 0.f ? 1.f : 0.f;
        } else {
            float s = 1.f / (1.f + __expf(-v));
            d = s * (1.f + v * (1.f - s));
        }
        dzb[i] = f2bf(dz[i] * d);
    }
}

// ---- prefix tuning / P-Tuning v2 -----------------------------------------------------------
// P [n, stride] f32 holds every layer's prefix keys and values (row t: layer li's keys at
// column off_k = 2·li·kv_dim, values at off_k + kv_dim). Writes columns off .. off + kv_heads·dh
// of the n rows into rows 0 .. n of every sequence's padded heads [seq, kv_heads, L, dh] (bf16):
// the prefix is attended like cached keys and values, before the sequence.
extern "C" __global__ void prefix_to_heads(const float* P, bf16* dst, int off, int n, int nseq, int kv_heads, int dh, int L,
                                           int stride) {
    long total = (long)nseq * kv_heads * n * dh;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        int c = i % dh;
        long t = i / dh;
        int r = t % n;
        t /= n;
        int h = t % kv_heads;
        long s = t / kv_heads;
        dst[((s * kv_heads + h) * L + r) * dh + c] = f2bf(P[(long)r * stride + off + h * dh + c]);
    }
}

// The reverse for gradients: dP[r, off + h·dh + c] += Σ_s src[s, h, r, c] (src the padded f32
// gradient of the keys or values). One thread per element of the n × kv_heads·dh block.
extern "C" __global__ void prefix_grad(const float* src, float* dP, int off, int n, int nseq, int kv_heads, int dh, int L,
                                       int stride) {
    long total = (long)n * kv_heads * dh;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        int c = i % dh;
        long t = i / dh;
        int h = t % kv_heads;
        int r = t / kv_heads;
        float acc = 0.f;
        for (int s = 0; s < nseq; s++) acc += src[(((long)s * kv_heads + h) * L + r) * dh + c];
        dP[(long)r * stride + off + h * dh + c] += acc;
    }
}

// ---- fused 4-bit GEMM (QLoRA's products without a decoded copy of the weight) -------------
// Y[M×N] (+)= X[M×K]·op(W) with X bf16 row-major and W the 4-bit weight [out, in] (bitsandbytes
// layout, as gemv_q4): w_nk = 1 takes W as [N, K] (a linear layer's forward, x·Wᵀ), w_nk = 0
// as [K, N] (its input gradient, dy·W). Each block computes a 64×64 tile of Y with 4 warps of
// 32×32 on mma.sync m16n8k16 (the fragment layouts of the flash kernels above); per 32-wide
// step of K it stages the X tile and the W tile, decoded in shared memory, never in global
// memory. Grid: one block of 128 threads per tile, flattened (row tiles outer).
extern "C" __global__ void gemm_q4(const bf16* X, const u8* packed, const float* absmax, const float* code, float* Y,
                                   int M, int N, int K, int blocksize, int w_nk, int accumulate) {
    constexpr int BM = 64, BN = 64, BK = 32, P = BK / 2;
    __shared__ unsigned xs[BM * P];  // [row][k] in bf16 pairs
    __shared__ unsigned ws[BN * P];  // [n][k] in bf16 pairs
    __shared__ float cs[16];
    if (threadIdx.x < 16) cs[threadIdx.x] = code[threadIdx.x];
    int tiles_n = (N + BN - 1) / BN;
    int m0 = (blockIdx.x / tiles_n) * BM, n0 = (blockIdx.x % tiles_n) * BN;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    float acc[2][4][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;
    for (int k0 = 0; k0 < K; k0 += BK) {
        __syncthreads();  // the code table is in; every warp is done with the previous tiles
        for (int i = threadIdx.x; i < BM * P; i += blockDim.x) {
            int r = m0 + i / P, k = k0 + (i % P) * 2;
            bf16 lo = (r < M && k < K) ? X[(long)r * K + k] : (bf16)0;
            bf16 hi = (r < M && k + 1 < K) ? X[(long)r * K + k + 1] : (bf16)0;
            xs[i] = pack_bits(lo, hi);
        }
        for (int i = threadIdx.x; i < BN * BK; i += blockDim.x) {
            int n = n0 + i / BK, k = k0 + i % BK;
            float v = 0.f;
            if (n < N && k < K) {
                long idx = w_nk ? (long)n * K + k : (long)k * N + n;
                unsigned b = packed[idx >> 1];
                v = cs[(idx & 1) ? (b & 15u) : (b >> 4)] * absmax[idx / blocksize];
            }
            reinterpret_cast<bf16*>(ws)[i] = f2bf(v);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            unsigned a[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                const unsigned* x0 = xs + (wm + mt * 16 + g) * P + kk * 8 + tq;
                const unsigned* x1 = x0 + 8 * P;
                a[mt][0] = x0[0];
                a[mt][1] = x1[0];
                a[mt][2] = x0[4];
                a[mt][3] = x1[4];
            }
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                const unsigned* wr = ws + (wn + nt * 8 + g) * P + kk * 8 + tq;
                unsigned b[2] = {wr[0], wr[4]};
                mma_bf16_16816(acc[0][nt], a[0], b);
                mma_bf16_16816(acc[1][nt], a[1], b);
            }
        }
    }
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int r = m0 + wm + mt * 16 + g + (e >> 1) * 8, c = n0 + wn + nt * 8 + 2 * tq + (e & 1);
                if (r < M && c < N) {
                    float* y = Y + (long)r * N + c;
                    *y = accumulate ? *y + acc[mt][nt][e] : acc[mt][nt][e];
                }
            }
}

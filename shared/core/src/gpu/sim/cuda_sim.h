// The CUDA C dialect of kernels.cu, on the host: peftkit's GPU simulator (cargo feature
// `cuda-sim`, docs/gpu.md). g++ compiles kernels.cu unchanged after this header; runtime.cpp
// runs every thread of a block as a fiber, so __syncthreads, __syncwarp and the warp shuffles
// are real rendezvous (a lane that skips one is reported as a deadlock, not papered over),
// and the lanes of a warp run in no fixed order (as on Volta and later), which exposes code
// that relies on implicit warp-synchronous execution.
//
// What it is for: the kernels' and the GPU engine's correctness in CI, without a GPU. It says
// nothing about speed, and approximate intrinsics (__expf) are computed exactly.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Kernels that use inline PTX (tensor-core mma) call the simulator's emulation instead.
#define CUDASIM 1

struct uint3 {
    unsigned x, y, z;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) int2 {
    int x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline int2 make_int2(int a, int b) { return {a, b}; }
inline int4 make_int4(int a, int b, int c, int d) { return {a, b, c, d}; }

namespace cudasim {
// The running fiber's coordinates: the scheduler sets them before it resumes a fiber.
extern thread_local uint3 thread_idx, block_idx, block_dim, grid_dim;
void sync_threads();
void sync_warp(unsigned mask);
// Every lane of `mask` offers `v`; each gets the value lane `src` offered (its own when `src`
// is not a lane of the block or not in `mask`).
uint64_t exchange(unsigned mask, uint64_t v, int src);
// A 32-bit mask of the lanes in `mask` whose `pred` is non-zero.
unsigned ballot(unsigned mask, bool pred);
void* dynamic_shared();
// The bytes of dynamic shared memory the launch gave.
unsigned dynamic_shared_size();
// __trap(): the block's threads return, and the launch fails with `why`.
void trap(const char* why);
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 for the calling warp: d += a·b with the
// PTX ISA's fragment layouts (every lane of the warp must call it).
void mma_m16n8k16_bf16(float* d, const unsigned* a, const unsigned* b);
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 for the calling warp: lane l gives the
// address of row l % 8 of 8×8 matrix l / 8 (8 consecutive 16-bit values); register m of lane
// l gets row l / 4, columns 2(l % 4) and 2(l % 4) + 1 of matrix m (low half first), or with
// `trans` column l / 4, rows 2(l % 4) and 2(l % 4) + 1 (every lane of the warp must call it).
void ldmatrix_x4(unsigned* r, const void* row, bool trans);
// cp.async of `size` bytes (`src_bytes` of them read, the rest zero-filled),
// cp.async.commit_group and cp.async.wait_group n for the calling thread. The copies land when
// a wait covers their group, not before, so a read that skips the wait sees the old bytes.
void cp_async(void* dst, const void* src, unsigned size, unsigned src_bytes);
void cp_async_commit();
void cp_async_wait(unsigned n);
// Registers a block's static shared array (once per OS thread): it is filled with NaN now and
// before every later block.
bool track(void* p, unsigned long bytes);

inline int lane() {
    return (int)((thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z)) & 31u);
}

template <class T>
inline T shuffle(unsigned mask, T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    b = exchange(mask, b, src);
    T r;
    std::memcpy(&r, &b, sizeof(T));
    return r;
}
}  // namespace cudasim

#define threadIdx cudasim::thread_idx
#define blockIdx cudasim::block_idx
#define blockDim cudasim::block_dim
#define gridDim cudasim::grid_dim
#define warpSize 32

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One block runs at a time on an OS thread, so a thread-local static is the block's shared
// memory.
#define __shared__ static thread_local
#define EXTERN_SHARED(T, name) T* name = static_cast<T*>(cudasim::dynamic_shared())
// Added after each __shared__ declaration by build.rs.
#define CUDASIM_TRACK(name) static thread_local bool name##_tracked = cudasim::track(&name, sizeof(name))

inline void __syncthreads() { cudasim::sync_threads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { cudasim::sync_warp(mask); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    int l = cudasim::lane();
    return cudasim::shuffle(mask, v, (l / width) * width + (src % width));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    int l = cudasim::lane();
    int s = l ^ lane_mask;
    return cudasim::shuffle(mask, v, s / width > l / width ? l : s);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int l = cudasim::lane();
    int s = l + (int)delta;
    return cudasim::shuffle(mask, v, s / width != l / width ? l : s);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int l = cudasim::lane();
    int s = l - (int)delta;
    return cudasim::shuffle(mask, v, s < (l / width) * width ? l : s);
}
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
// PRMT as __byte_perm exposes it: result byte n is byte (s >> 4n) & 7 of the 8 bytes {y:x}.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    uint64_t in = ((uint64_t)y << 32) | x;
    unsigned r = 0;
    for (int n = 0; n < 4; n++) r |= (unsigned)((in >> (8 * ((s >> (4 * n)) & 7u))) & 0xffu) << (8 * n);
    return r;
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return cudasim::ballot(mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return cudasim::ballot(mask, pred != 0) != 0; }
inline int __all_sync(unsigned mask, int pred) {
    unsigned live = cudasim::ballot(mask, true);
    return cudasim::ballot(mask, pred != 0) == live;
}

// Bit casts and math intrinsics (the fast approximate ones computed exactly).
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
template <class T>
inline T __ldg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }

// Atomics: real ones, so that running blocks on several OS threads stays correct.
inline float atomicAdd(float* a, float v) {
    unsigned* p = reinterpret_cast<unsigned*>(a);
    unsigned old = __atomic_load_n(p, __ATOMIC_RELAXED);
    unsigned want;
    do {
        want = __float_as_uint(__uint_as_float(old) + v);
    } while (!__atomic_compare_exchange_n(p, &old, want, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return __uint_as_float(old);
}
inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
    return __atomic_fetch_add(a, v, __ATOMIC_RELAXED);
}
inline int atomicMax(int* a, int v) {
    int old = __atomic_load_n(a, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
inline unsigned atomicCAS(unsigned* a, unsigned cmp, unsigned v) {
    __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return cmp;
}
inline unsigned atomicExch(unsigned* a, unsigned v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }

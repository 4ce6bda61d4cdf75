// Kernels that test the simulator itself (gpu/sim.rs tests); only the simulator builds them.

// Butterfly sum over each warp: every lane gets its warp's total.
extern "C" __global__ void sim_warp_sum(const float* x, float* out) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    float v = x[i];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    out[i] = v;
}

// Each shuffle flavour and a ballot over one warp of `x`.
extern "C" __global__ void sim_shuffles(const int* x, int* down, int* up, int* bcast, unsigned* ballot) {
    int t = threadIdx.x;
    int v = x[t];
    down[t] = __shfl_down_sync(0xffffffffu, v, 3);
    up[t] = __shfl_up_sync(0xffffffffu, v, 5, 16);
    bcast[t] = __shfl_sync(0xffffffffu, v, 7);
    ballot[t] = __ballot_sync(0xffffffffu, v & 1);
}

// A shuffle only some lanes reach: on a GPU undefined (a hang or garbage), here a deadlock.
extern "C" __global__ void sim_divergent_shuffle(float* x) {
    float v = x[threadIdx.x];
    if (threadIdx.x < 20) v = __shfl_xor_sync(0xffffffffu, v, 1);
    x[threadIdx.x] = v;
}

// Reads a neighbour's shared-memory slot, with or without the barrier that makes it safe.
extern "C" __global__ void sim_neighbour(int* out, int with_barrier) {
    __shared__ int s[256];
    s[threadIdx.x] = (int)threadIdx.x + 1;
    if (with_barrier) __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Dynamic shared memory nobody wrote.
extern "C" __global__ void sim_unwritten_shared(float* out) {
    EXTERN_SHARED(float, buf);
    out[threadIdx.x] = buf[threadIdx.x];
}

// ldmatrix.x4 (ldsm_x4 / ldsm_x4_trans of kernels.cu): four 8×8 matrices of 16-bit values,
// matrix m's row r at src[m·64 + r·8], staged in shared memory with rows 32 bytes apart (not
// contiguous, as in the flash kernels' padded tiles). out[lane·4 + m] is register m of a lane.
extern "C" __global__ void sim_ldmatrix(const unsigned short* src, unsigned* out, int trans) {
    __shared__ __align__(16) unsigned short tile[32 * 16];
    for (int i = threadIdx.x; i < 32 * 16; i += blockDim.x) tile[i] = i % 16 < 8 ? src[i / 16 * 8 + i % 16] : 0xffff;
    __syncthreads();
    unsigned r[4];
    const unsigned short* row = tile + threadIdx.x * 16;  // lane l: row l % 8 of matrix l / 8
    if (trans)
        ldsm_x4_trans(r, row);
    else
        ldsm_x4(r, row);
    for (int m = 0; m < 4; m++) out[threadIdx.x * 4 + m] = r[m];
}

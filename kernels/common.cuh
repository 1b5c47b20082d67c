// Shared helpers for qmtot's kernels. Included by every kernels/*.cu (NVRTC gets it as a
// named header), so it holds only device code that all of them use.
//
// Conventions: activations and K/V are f16 (`__half`), accumulation f32, logits f32. Every
// pointer argument of a kernel carries its shape in a comment; every kernel has a `Grid:`
// line. Entry points are `extern "C"` and named `<op>_<dtype>`.
#pragma once
#include <cuda_fp16.h>

#define QMTOT_WARP 32

// −∞ in f32 (NVRTC has no <math.h> INFINITY).
#define QMTOT_NEG_INF (-__int_as_float(0x7f800000))

// Sum of `v` over the 32 lanes of a warp (every lane gets the total).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = QMTOT_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum of `v` over a block of `blockDim.x` threads (a multiple of 32, at most 1024); every
// thread gets the total. `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % QMTOT_WARP, warp = threadIdx.x / QMTOT_WARP;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int n_warps = blockDim.x / QMTOT_WARP;
    v = lane < n_warps ? scratch[lane] : 0.f;
    v = warp_sum(v);
    __syncthreads();  // scratch may be reused right after
    return v;
}

// 16 bytes global → shared, asynchronously, bypassing L1 (what is staged is read once).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
// As cp_async16, but when `valid` is false nothing is read (`gmem` must still be a mapped
// address) and the 16 bytes are zeroed: padding past the end of a range may be poisoned.
__device__ __forceinline__ void cp_async16_or_zero(void* smem, const void* gmem, bool valid) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    const int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

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

// D[16×8] += A[16×16] · B[16×8] on tensor cores, f16 × f16 → f32 (sm_80 and later). Fragment
// layouts with g = lane / 4, t = lane % 4: A a0 (row g, cols 2t, 2t+1), a1 (g+8, 2t..), a2 (g,
// 2t+8..), a3 (g+8, 2t+8..); B b0 (rows 2t, 2t+1, col g), b1 (rows 2t+8.., col g); D d0 d1 (g,
// 2t..), d2 d3 (g+8, 2t..). Each register holds two f16, the lower column (or row) low.
__device__ __forceinline__ void mma_16816(float d[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
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

// Copy-bandwidth probe for the GPU machine: host->device and device->host (pageable and
// pinned) and device->device, timed with CUDA events, median of repeated copies.
// Build there: nvcc -O2 -arch=sm_90 -o copy_bandwidth copy_bandwidth.cu
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CHECK(call)                                                                   \
  do {                                                                                \
    cudaError_t err_ = (call);                                                        \
    if (err_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call,               \
                   cudaGetErrorString(err_));                                         \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

// Median milliseconds of `reps` copies of `bytes` from src to dst.
static float time_copy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, int reps) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  CHECK(cudaMemcpy(dst, src, bytes, kind));  // warm-up
  std::vector<float> ms(reps);
  for (int i = 0; i < reps; ++i) {
    CHECK(cudaEventRecord(a));
    CHECK(cudaMemcpy(dst, src, bytes, kind));
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    CHECK(cudaEventElapsedTime(&ms[i], a, b));
  }
  std::sort(ms.begin(), ms.end());
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return ms[reps / 2];
}

int main() {
  int dev = 0, driver = 0, runtime = 0;
  CHECK(cudaGetDevice(&dev));
  cudaDeviceProp p;
  CHECK(cudaGetDeviceProperties(&p, dev));
  CHECK(cudaDriverGetVersion(&driver));
  CHECK(cudaRuntimeGetVersion(&runtime));
  std::printf("device: %s, sm_%d%d, %d SMs, %.1f GiB, L2 %.1f MiB, smem/block optin %zu KiB\n",
              p.name, p.major, p.minor, p.multiProcessorCount,
              p.totalGlobalMem / 1073741824.0, p.l2CacheSize / 1048576.0,
              p.sharedMemPerBlockOptin / 1024);
  std::printf("cuda driver API %d, runtime %d\n", driver, runtime);

  const size_t bytes = size_t(1) << 30;  // 1 GiB: far beyond L2 (50 MiB)
  void *d0, *d1, *pinned;
  CHECK(cudaMalloc(&d0, bytes));
  CHECK(cudaMalloc(&d1, bytes));
  CHECK(cudaMallocHost(&pinned, bytes));
  void* pageable = std::malloc(bytes);
  std::memset(pageable, 1, bytes);
  std::memset(pinned, 1, bytes);
  CHECK(cudaMemset(d0, 1, bytes));

  const double gb = bytes / 1e9;
  float t;
  t = time_copy(d0, pageable, bytes, cudaMemcpyHostToDevice, 5);
  std::printf("H2D pageable: %7.2f GB/s\n", gb / (t / 1e3));
  t = time_copy(d0, pinned, bytes, cudaMemcpyHostToDevice, 5);
  std::printf("H2D pinned:   %7.2f GB/s\n", gb / (t / 1e3));
  t = time_copy(pageable, d0, bytes, cudaMemcpyDeviceToHost, 5);
  std::printf("D2H pageable: %7.2f GB/s\n", gb / (t / 1e3));
  t = time_copy(pinned, d0, bytes, cudaMemcpyDeviceToHost, 5);
  std::printf("D2H pinned:   %7.2f GB/s\n", gb / (t / 1e3));
  t = time_copy(d1, d0, bytes, cudaMemcpyDeviceToDevice, 20);
  std::printf("D2D:          %7.2f GB/s (read+write %.2f GB/s)\n", gb / (t / 1e3), 2 * gb / (t / 1e3));
  // Small copies: latency of a 4-byte D2H round trip (what a sampled token id costs).
  t = time_copy(pinned, d0, 4, cudaMemcpyDeviceToHost, 101);
  std::printf("D2H 4 bytes:  %7.2f us\n", t * 1e3);
  return 0;
}

// Minimal real kernels: fill a float32 buffer with a constant or with
// standard normals from the shared Philox stream.
//
// They exercise the whole path a kernel author uses (raw pointer + stream
// from Python, the availability check, argument validation, launch check)
// and let GPU tests compare the device RNG with the host binding
// `_C.philox_normal`.  On a machine without a driver they raise a clear
// RuntimeError instead of crashing.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "free_kernels/common.h"
#include "free_kernels/cuda_check.h"
#include "free_kernels/entry_points.h"

namespace fk {

namespace {

constexpr int kThreads = 256;
// Grid-stride loops: enough blocks to fill any current GPU, bounded so the
// grid size never depends on n overflowing.
constexpr int64_t kMaxBlocks = 4096;

__global__ void fill_f32_kernel(float* __restrict__ out, int64_t n, float value) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = value;
  }
}

__global__ void fill_randn_f32_kernel(float* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset,
                                      uint64_t subsequence) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = philox_randn(seed, offset + static_cast<uint64_t>(i), subsequence);
  }
}

// Validates a float32 output buffer; returns false when there is nothing to do.
bool check_f32_output(const char* fn, uintptr_t out, int64_t n) {
  if (n < 0) throw std::invalid_argument(std::string(fn) + ": n must be >= 0, got " + std::to_string(n));
  if (n == 0) return false;
  if (out == 0) throw std::invalid_argument(std::string(fn) + ": null output pointer");
  if (out % alignof(float) != 0) {
    throw std::invalid_argument(std::string(fn) + ": output pointer is not 4-byte aligned");
  }
  return true;
}

unsigned int grid_for(int64_t n) {
  return static_cast<unsigned int>(std::min<int64_t>(ceil_div<int64_t>(n, kThreads), kMaxBlocks));
}

}  // namespace

void fill_f32(uintptr_t out, int64_t n, float value, uintptr_t stream) {
  check_cuda_available();
  if (!check_f32_output("fill_f32", out, n)) return;
  fill_f32_kernel<<<grid_for(n), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<float*>(out), n, value);
  FK_CUDA_CHECK_LAUNCH();
}

void fill_randn_f32(uintptr_t out, int64_t n, uint64_t seed, uint64_t offset, uint64_t subsequence,
                    uintptr_t stream) {
  check_cuda_available();
  if (!check_f32_output("fill_randn_f32", out, n)) return;
  fill_randn_f32_kernel<<<grid_for(n), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<float*>(out), n, seed, offset, subsequence);
  FK_CUDA_CHECK_LAUNCH();
}

}  // namespace fk

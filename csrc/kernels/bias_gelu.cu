// bias_gelu: out = gelu_tanh(x + bias)   (the DiT MLP's fc1 epilogue)
//
//   x / out (B, N, K), bias (K,); one dtype per call (float32 / float16 /
//   bfloat16), any strides (in elements); out may be x.
//
// fp32 arithmetic, one rounding on the store; GELU is adaln::gelu_tanh_sigmoid
// (csrc/include/free_kernels/adaln_math.h).  The Triton twin is
// free_kernels/triton/bias_gelu.py, the oracle free_kernels/reference/bias_gelu.py.
//
// A flat grid-stride loop over (row, vector) units, 16-byte vectors when every
// operand is contiguous along K and 16-byte aligned, element accesses through
// the strides otherwise.  In place is safe: every element is read and then
// written by the same thread.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "free_kernels/adaln_math.h"
#include "free_kernels/arg_checks.h"
#include "free_kernels/common.h"
#include "free_kernels/cuda_check.h"
#include "free_kernels/device_types.h"
#include "free_kernels/dtype.h"
#include "free_kernels/entry_points.h"

namespace fk {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;

struct Args {
  int64_t rows;
  int N, K;
  // x, out: (b, n, k); bias: (k)
  int64_t s_xb, s_xn, s_xk, s_ob, s_on, s_ok, s_bk;
};

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* out, Args a) {
  // `out` is not __restrict__: it may alias x (in place)
  const int64_t kv = a.K / kVec;  // vectors per row (K % kVec == 0 on the vector path)
  const int64_t units = a.rows * kv;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += stride) {
    const int64_t row = u / kv;
    const int64_t c = (u - row * kv) * kVec;
    const int64_t b = row / a.N, n = row - b * a.N;
    float xv[kVec], bv[kVec], o[kVec];
    load_vec<T, kVec>(x + b * a.s_xb + n * a.s_xn + c * a.s_xk, xv);
    load_vec<T, kVec>(bias + c * a.s_bk, bv);
#pragma unroll
    for (int k = 0; k < kVec; ++k) o[k] = adaln::gelu_tanh_sigmoid(xv[k] + bv[k]);
    store_vec<T, kVec>(out + b * a.s_ob + n * a.s_on + c * a.s_ok, o);
  }
}

template <typename T>
cudaError_t launch(const void* x, const void* bias, void* out, const Args& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = a.s_xk == 1 && a.s_ok == 1 && a.s_bk == 1 && a.K % kVec == 0 && a.s_xb % kVec == 0 &&
                   a.s_xn % kVec == 0 && a.s_ob % kVec == 0 && a.s_on % kVec == 0 && aligned16(x) &&
                   aligned16(out) && aligned16(bias);
  const int64_t units = vec ? a.rows * (a.K / kVec) : a.rows * a.K;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div<int64_t>(units, kThreads), kMaxBlocks));
  const T* xt = static_cast<const T*>(x);
  const T* bt = static_cast<const T*>(bias);
  T* ot = static_cast<T*>(out);
  if (vec) {
    bias_gelu_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(xt, bt, ot, a);
  } else {
    bias_gelu_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(xt, bt, ot, a);
  }
  return cudaGetLastError();
}

}  // namespace

void bias_gelu(uintptr_t x, uintptr_t bias, uintptr_t out, int64_t B, int64_t N, int64_t K,
               const std::vector<int64_t>& strides, int64_t dtype_code, uintptr_t stream) {
  check_cuda_available();
  const char* fn = "bias_gelu";
  check_rows_args(fn, B, N, K, strides, 7, dtype_code);
  if (B == 0 || N == 0 || K == 0) return;
  check_element_ptrs(fn, {x, bias, out}, dtype_code);
  // strides: x (b, n, k), bias (k), out (b, n, k)
  const int64_t* s = strides.data();
  const Args a{B * N, static_cast<int>(N), static_cast<int>(K), s[0], s[1], s[2], s[4], s[5], s[6], s[3]};
  const void* xp = reinterpret_cast<const void*>(x);
  const void* bp = reinterpret_cast<const void*>(bias);
  void* op = reinterpret_cast<void*>(out);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (static_cast<DType>(dtype_code)) {
    case DType::kFloat32: FK_CUDA_CHECK((launch<float>(xp, bp, op, a, st))); break;
    case DType::kFloat16: FK_CUDA_CHECK((launch<__half>(xp, bp, op, a, st))); break;
    default: FK_CUDA_CHECK((launch<__nv_bfloat16>(xp, bp, op, a, st))); break;
  }
}

}  // namespace fk

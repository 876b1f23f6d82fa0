// gated_residual: out = x + gate[b] * y   (the adaLN-Zero block's gated residual add)
//
//   x / y / out (B, N, H), gate (B, H); one dtype per call (float32 / float16 /
//   bfloat16), any strides (in elements); out may be x (the residual stream
//   updated in place).
//
// One fma in fp32, one rounding on the store.  The Triton twin is
// free_kernels/triton/gated_residual.py, the oracle
// free_kernels/reference/gated_residual.py.
//
// A flat grid-stride loop over (row, vector) units, 16-byte vectors when every
// operand is contiguous along H and 16-byte aligned, element accesses through
// the strides otherwise.  In place is safe: every element is read and then
// written by the same thread.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

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
  int N, H;
  // x, y, out: (b, n, h); gate: (b, h)
  int64_t s_xb, s_xn, s_xh, s_yb, s_yn, s_yh, s_ob, s_on, s_oh, s_gb, s_gh;
};

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    gated_residual_kernel(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ gate, T* out,
                          Args a) {
  // `out` is not __restrict__: it may alias x (in place)
  const int64_t hv = a.H / kVec;  // vectors per row (H % kVec == 0 on the vector path)
  const int64_t units = a.rows * hv;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += stride) {
    const int64_t row = u / hv;
    const int64_t c = (u - row * hv) * kVec;
    const int64_t b = row / a.N, n = row - b * a.N;
    float xv[kVec], gv[kVec], yv[kVec], o[kVec];
    load_vec<T, kVec>(x + b * a.s_xb + n * a.s_xn + c * a.s_xh, xv);
    load_vec<T, kVec>(gate + b * a.s_gb + c * a.s_gh, gv);
    load_vec<T, kVec>(y + b * a.s_yb + n * a.s_yn + c * a.s_yh, yv);
#pragma unroll
    for (int k = 0; k < kVec; ++k) o[k] = fmaf(gv[k], yv[k], xv[k]);
    store_vec<T, kVec>(out + b * a.s_ob + n * a.s_on + c * a.s_oh, o);
  }
}

template <typename T>
cudaError_t launch(const void* x, const void* y, const void* gate, void* out, const Args& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = a.s_xh == 1 && a.s_yh == 1 && a.s_oh == 1 && a.s_gh == 1 && a.H % kVec == 0 &&
                   a.s_xb % kVec == 0 && a.s_xn % kVec == 0 && a.s_yb % kVec == 0 && a.s_yn % kVec == 0 &&
                   a.s_ob % kVec == 0 && a.s_on % kVec == 0 && a.s_gb % kVec == 0 && aligned16(x) &&
                   aligned16(y) && aligned16(out) && aligned16(gate);
  const int64_t units = vec ? a.rows * (a.H / kVec) : a.rows * a.H;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div<int64_t>(units, kThreads), kMaxBlocks));
  const T* xt = static_cast<const T*>(x);
  const T* yt = static_cast<const T*>(y);
  const T* gt = static_cast<const T*>(gate);
  T* ot = static_cast<T*>(out);
  if (vec) {
    gated_residual_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(xt, yt, gt, ot, a);
  } else {
    gated_residual_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(xt, yt, gt, ot, a);
  }
  return cudaGetLastError();
}

}  // namespace

void gated_residual(uintptr_t x, uintptr_t gate, uintptr_t y, uintptr_t out, int64_t B, int64_t N, int64_t H,
                    const std::vector<int64_t>& strides, int64_t dtype_code, uintptr_t stream) {
  check_cuda_available();
  const char* fn = "gated_residual";
  check_rows_args(fn, B, N, H, strides, 11, dtype_code);
  if (B == 0 || N == 0 || H == 0) return;
  check_element_ptrs(fn, {x, gate, y, out}, dtype_code);
  // strides: x (b, n, h), gate (b, h), y (b, n, h), out (b, n, h)
  const int64_t* s = strides.data();
  const Args a{B * N, static_cast<int>(N), static_cast<int>(H), s[0], s[1], s[2], s[5], s[6], s[7], s[8], s[9],
               s[10], s[3], s[4]};
  const void* xp = reinterpret_cast<const void*>(x);
  const void* yp = reinterpret_cast<const void*>(y);
  const void* gp = reinterpret_cast<const void*>(gate);
  void* op = reinterpret_cast<void*>(out);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (static_cast<DType>(dtype_code)) {
    case DType::kFloat32: FK_CUDA_CHECK((launch<float>(xp, yp, gp, op, a, st))); break;
    case DType::kFloat16: FK_CUDA_CHECK((launch<__half>(xp, yp, gp, op, a, st))); break;
    default: FK_CUDA_CHECK((launch<__nv_bfloat16>(xp, yp, gp, op, a, st))); break;
  }
}

}  // namespace fk

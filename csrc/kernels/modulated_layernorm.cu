// modulated_layernorm: out = LayerNorm(x) * (1 + scale[b]) + shift[b]
//
//   x / out (B, N, H), shift / scale (B, H); one dtype per call (float32 /
//   float16 / bfloat16), any strides (in elements).
//
// Arithmetic is fp32 with one rounding on the store; the scalar formulas are
// those of csrc/include/free_kernels/adaln_math.h.  The Triton twin is
// free_kernels/triton/modulated_layernorm.py, the oracle
// free_kernels/reference/modulated_layernorm.py.
//
// One WARP per token row, 4 rows per 128-thread CTA.  A lane keeps its share of
// the row in registers (kNV vectors of kVec elements: 16-byte loads when the row
// is contiguous and aligned, element loads through the strides otherwise), so x
// is read once and the statistics are the exact two-pass ones (mean by a warp
// reduction, then the mean of squared deviations), as the reference computes
// them.  Rows longer than the register cache (H > 32 * 16 * kVec) take a
// three-pass loop that re-reads x (L1/L2).
#include <cuda_runtime.h>

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

constexpr int kLnWarps = 4;
constexpr int kLnThreads = 32 * kLnWarps;

struct LnArgs {
  int64_t rows;
  int N, H;
  float eps;
  int64_t s_xb, s_xn, s_xh, s_sb, s_sh, s_cb, s_ch, s_ob, s_on, s_oh;
};

template <typename T, int kVec, int kNV>
__global__ void __launch_bounds__(kLnThreads)
    modulated_layernorm_kernel(const T* __restrict__ x, const T* __restrict__ shift, const T* __restrict__ scale,
                               T* __restrict__ out, LnArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kLnWarps + (threadIdx.x >> 5);
  if (row >= a.rows) return;
  const int64_t b = row / a.N, n = row % a.N;
  const T* xr = x + b * a.s_xb + n * a.s_xn;

  float v[kNV][kVec];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kNV; ++i) {
    const int c = (i * 32 + lane) * kVec;
    if (c < a.H) {
      load_vec<T, kVec>(xr + c * a.s_xh, v[i]);
#pragma unroll
      for (int k = 0; k < kVec; ++k) sum += v[i][k];
    }
  }
  const float mean = warp_sum(sum) / a.H;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < kNV; ++i) {
    const int c = (i * 32 + lane) * kVec;
    if (c < a.H) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        v[i][k] -= mean;
        sq += v[i][k] * v[i][k];
      }
    }
  }
  const float rstd = 1.0f / sqrtf(warp_sum(sq) / a.H + a.eps);

  const T* shr = shift + b * a.s_sb;
  const T* scr = scale + b * a.s_cb;
  T* orow = out + b * a.s_ob + n * a.s_on;
#pragma unroll
  for (int i = 0; i < kNV; ++i) {
    const int c = (i * 32 + lane) * kVec;
    if (c < a.H) {
      float sh[kVec], sc[kVec], y[kVec];
      load_vec<T, kVec>(shr + c * a.s_sh, sh);
      load_vec<T, kVec>(scr + c * a.s_ch, sc);
#pragma unroll
      for (int k = 0; k < kVec; ++k) y[k] = adaln::modulate(v[i][k] * rstd, sh[k], sc[k]);
      store_vec<T, kVec>(orow + c * a.s_oh, y);
    }
  }
}

// Rows too long for the register cache: three passes over x (the row stays in L1/L2).
template <typename T>
__global__ void __launch_bounds__(kLnThreads)
    modulated_layernorm_long_kernel(const T* __restrict__ x, const T* __restrict__ shift,
                                    const T* __restrict__ scale, T* __restrict__ out, LnArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kLnWarps + (threadIdx.x >> 5);
  if (row >= a.rows) return;
  const int64_t b = row / a.N, n = row % a.N;
  const T* xr = x + b * a.s_xb + n * a.s_xn;
  float sum = 0.f;
  for (int c = lane; c < a.H; c += 32) sum += to_f32(xr[c * a.s_xh]);
  const float mean = warp_sum(sum) / a.H;
  float sq = 0.f;
  for (int c = lane; c < a.H; c += 32) {
    const float d = to_f32(xr[c * a.s_xh]) - mean;
    sq += d * d;
  }
  const float rstd = 1.0f / sqrtf(warp_sum(sq) / a.H + a.eps);
  T* orow = out + b * a.s_ob + n * a.s_on;
  for (int c = lane; c < a.H; c += 32) {
    const float y = adaln::modulate((to_f32(xr[c * a.s_xh]) - mean) * rstd, to_f32(shift[b * a.s_sb + c * a.s_sh]),
                                    to_f32(scale[b * a.s_cb + c * a.s_ch]));
    orow[c * a.s_oh] = from_f32<T>(y);
  }
}

template <typename T, int kVec>
cudaError_t launch_ln_vec(const void* x, const void* shift, const void* scale, void* out, const LnArgs& a,
                          cudaStream_t stream) {
  const int64_t blocks = ceil_div<int64_t>(a.rows, kLnWarps);
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const unsigned grid = static_cast<unsigned>(blocks);
  const int nv = ceil_div(a.H, 32 * kVec);
  auto args = [&](auto kernel) {
    kernel<<<grid, kLnThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(shift), static_cast<const T*>(scale), static_cast<T*>(out),
        a);
    return cudaGetLastError();
  };
  // register cache sizes: fine-grained where DiT widths land (1152 = 4.5 x 256 halves, 9 x 128 floats)
  if (nv <= 1) return args(modulated_layernorm_kernel<T, kVec, 1>);
  if (nv <= 2) return args(modulated_layernorm_kernel<T, kVec, 2>);
  if (nv <= 4) return args(modulated_layernorm_kernel<T, kVec, 4>);
  if constexpr (kVec > 1) {
    if (nv <= 5) return args(modulated_layernorm_kernel<T, kVec, 5>);
  }
  if (nv <= 8) return args(modulated_layernorm_kernel<T, kVec, 8>);
  if constexpr (kVec > 1) {
    if (nv <= 12) return args(modulated_layernorm_kernel<T, kVec, 12>);
  }
  if (nv <= 16) return args(modulated_layernorm_kernel<T, kVec, 16>);
  return args(modulated_layernorm_long_kernel<T>);
}

template <typename T>
cudaError_t launch_ln(const void* x, const void* shift, const void* scale, void* out, const LnArgs& a,
                      cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = a.s_xh == 1 && a.s_sh == 1 && a.s_ch == 1 && a.s_oh == 1 && a.H % kVec == 0 &&
                   a.s_xb % kVec == 0 && a.s_xn % kVec == 0 && a.s_sb % kVec == 0 && a.s_cb % kVec == 0 &&
                   a.s_ob % kVec == 0 && a.s_on % kVec == 0 && aligned16(x) && aligned16(shift) &&
                   aligned16(scale) && aligned16(out);
  if (vec) return launch_ln_vec<T, kVec>(x, shift, scale, out, a, stream);
  return launch_ln_vec<T, 1>(x, shift, scale, out, a, stream);
}

}  // namespace

void modulated_layernorm(uintptr_t x, uintptr_t shift, uintptr_t scale, uintptr_t out, int64_t B, int64_t N,
                         int64_t H, double eps, const std::vector<int64_t>& strides, int64_t dtype_code,
                         uintptr_t stream) {
  check_cuda_available();
  const char* fn = "modulated_layernorm";
  check_rows_args(fn, B, N, H, strides, 10, dtype_code);
  if (!(eps >= 0.0)) bad_argument(fn, "eps must be >= 0");
  if (B == 0 || N == 0 || H == 0) return;
  check_element_ptrs(fn, {x, shift, scale, out}, dtype_code);
  LnArgs a{B * N, static_cast<int>(N), static_cast<int>(H), static_cast<float>(eps),
           strides[0], strides[1], strides[2], strides[3], strides[4], strides[5], strides[6],
           strides[7], strides[8], strides[9]};
  const void* xp = reinterpret_cast<const void*>(x);
  const void* sp = reinterpret_cast<const void*>(shift);
  const void* cp = reinterpret_cast<const void*>(scale);
  void* op = reinterpret_cast<void*>(out);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (static_cast<DType>(dtype_code)) {
    case DType::kFloat32: FK_CUDA_CHECK((launch_ln<float>(xp, sp, cp, op, a, st))); break;
    case DType::kFloat16: FK_CUDA_CHECK((launch_ln<__half>(xp, sp, cp, op, a, st))); break;
    default: FK_CUDA_CHECK((launch_ln<__nv_bfloat16>(xp, sp, cp, op, a, st))); break;
  }
}

}  // namespace fk

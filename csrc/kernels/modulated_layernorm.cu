// adaLN block kernels: modulated LayerNorm, gated residual add, bias + GELU (tanh).
//
//   modulated_layernorm  out = LayerNorm(x) * (1 + scale[b]) + shift[b]    x (B, N, H)
//   gated_residual       out = x + gate[b] * y                              (out may be x)
//   bias_gelu            out = gelu_tanh(x + bias)                          (out may be x)
//
// All tensors of a call share one dtype (float32 / float16 / bfloat16), any
// strides (in elements); arithmetic is fp32 with one rounding on the store.
// The scalar formulas are those of csrc/include/free_kernels/adaln_math.h.
//
// modulated_layernorm: one WARP per token row, 4 rows per 128-thread CTA.  A
// lane keeps its share of the row in registers (kNV vectors of kVec elements:
// 16-byte loads when the row is contiguous and aligned, element loads through
// the strides otherwise), so x is read once and the statistics are the exact
// two-pass ones (mean by a warp reduction, then the mean of squared
// deviations), as the reference computes them.  Rows longer than the register
// cache (H > 32 * 16 * kVec) take a three-pass loop that re-reads x (L1/L2).
//
// gated_residual / bias_gelu: flat grid-stride loops over (row, vector) units,
// 16-byte vectors on the aligned path.  In place is safe: every element is
// read and then written by the same thread.
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

constexpr int kLnWarps = 4;
constexpr int kLnThreads = 32 * kLnWarps;
constexpr int kEwThreads = 256;
constexpr int64_t kEwMaxBlocks = 8192;

// ------------------------------------------------------------ modulated LayerNorm
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

// ------------------------------------------------------------ elementwise epilogues
struct EwArgs {
  int64_t rows;
  int N, K;
  // operand 0 (x), operand 1 (y; unused by bias_gelu), out: (b, n, k); row operand (gate / bias): (b, k)
  int64_t s0b, s0n, s0k, s1b, s1n, s1k, sob, son, sok, srb, srk;
};

template <typename T, int kVec, bool kGelu>
__global__ void __launch_bounds__(kEwThreads)
    elementwise_kernel(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ rowop,
                       T* out, EwArgs a) {
  // `out` is not __restrict__: it may alias x (in place)
  const int64_t kv = a.K / kVec;  // vectors per row (K % kVec == 0 on the vector path)
  const int64_t units = a.rows * kv;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += stride) {
    const int64_t row = u / kv;
    const int64_t c = (u - row * kv) * kVec;
    const int64_t b = row / a.N, n = row - b * a.N;
    float xv[kVec], rv[kVec], o[kVec];
    load_vec<T, kVec>(x + b * a.s0b + n * a.s0n + c * a.s0k, xv);
    load_vec<T, kVec>(rowop + b * a.srb + c * a.srk, rv);
    if constexpr (kGelu) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) o[k] = adaln::gelu_tanh_sigmoid(xv[k] + rv[k]);
    } else {
      float yv[kVec];
      load_vec<T, kVec>(y + b * a.s1b + n * a.s1n + c * a.s1k, yv);
#pragma unroll
      for (int k = 0; k < kVec; ++k) o[k] = fmaf(rv[k], yv[k], xv[k]);
    }
    store_vec<T, kVec>(out + b * a.sob + n * a.son + c * a.sok, o);
  }
}

template <typename T, bool kGelu>
cudaError_t launch_elementwise(const void* x, const void* y, const void* rowop, void* out, const EwArgs& a,
                               cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  bool vec = a.s0k == 1 && a.sok == 1 && a.srk == 1 && a.K % kVec == 0 && a.s0b % kVec == 0 &&
             a.s0n % kVec == 0 && a.sob % kVec == 0 && a.son % kVec == 0 && a.srb % kVec == 0 && aligned16(x) &&
             aligned16(out) && aligned16(rowop);
  if (!kGelu) vec = vec && a.s1k == 1 && a.s1b % kVec == 0 && a.s1n % kVec == 0 && aligned16(y);
  const int64_t units = vec ? a.rows * (a.K / kVec) : a.rows * a.K;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div<int64_t>(units, kEwThreads), kEwMaxBlocks));
  const T* xt = static_cast<const T*>(x);
  const T* yt = static_cast<const T*>(y);
  const T* rt = static_cast<const T*>(rowop);
  T* ot = static_cast<T*>(out);
  if (vec) {
    elementwise_kernel<T, kVec, kGelu><<<blocks, kEwThreads, 0, stream>>>(xt, yt, rt, ot, a);
  } else {
    elementwise_kernel<T, 1, kGelu><<<blocks, kEwThreads, 0, stream>>>(xt, yt, rt, ot, a);
  }
  return cudaGetLastError();
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

template <bool kGelu>
static void run_elementwise(const void* x, const void* y, const void* rowop, void* out, const EwArgs& a,
                            int64_t dtype_code, cudaStream_t st) {
  switch (static_cast<DType>(dtype_code)) {
    case DType::kFloat32: FK_CUDA_CHECK((launch_elementwise<float, kGelu>(x, y, rowop, out, a, st))); break;
    case DType::kFloat16: FK_CUDA_CHECK((launch_elementwise<__half, kGelu>(x, y, rowop, out, a, st))); break;
    default: FK_CUDA_CHECK((launch_elementwise<__nv_bfloat16, kGelu>(x, y, rowop, out, a, st))); break;
  }
}

void gated_residual(uintptr_t x, uintptr_t gate, uintptr_t y, uintptr_t out, int64_t B, int64_t N, int64_t H,
                    const std::vector<int64_t>& strides, int64_t dtype_code, uintptr_t stream) {
  check_cuda_available();
  const char* fn = "gated_residual";
  check_rows_args(fn, B, N, H, strides, 11, dtype_code);
  if (B == 0 || N == 0 || H == 0) return;
  check_element_ptrs(fn, {x, gate, y, out}, dtype_code);
  // strides: x (b, n, h), gate (b, h), y (b, n, h), out (b, n, h)
  EwArgs a{B * N, static_cast<int>(N), static_cast<int>(H), strides[0], strides[1], strides[2], strides[5],
           strides[6], strides[7], strides[8], strides[9], strides[10], strides[3], strides[4]};
  run_elementwise<false>(reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(y),
                         reinterpret_cast<const void*>(gate), reinterpret_cast<void*>(out), a, dtype_code,
                         reinterpret_cast<cudaStream_t>(stream));
}

void bias_gelu(uintptr_t x, uintptr_t bias, uintptr_t out, int64_t B, int64_t N, int64_t K,
               const std::vector<int64_t>& strides, int64_t dtype_code, uintptr_t stream) {
  check_cuda_available();
  const char* fn = "bias_gelu";
  check_rows_args(fn, B, N, K, strides, 7, dtype_code);
  if (B == 0 || N == 0 || K == 0) return;
  check_element_ptrs(fn, {x, bias, out}, dtype_code);
  // strides: x (b, n, k), bias (k), out (b, n, k); the bias is a row operand with batch stride 0
  EwArgs a{B * N, static_cast<int>(N), static_cast<int>(K), strides[0], strides[1], strides[2], 0, 0, 1,
           strides[4], strides[5], strides[6], 0, strides[3]};
  run_elementwise<true>(reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(x),
                        reinterpret_cast<const void*>(bias), reinterpret_cast<void*>(out), a, dtype_code,
                        reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace fk

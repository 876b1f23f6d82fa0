// Argument checks and derived sizes of the draft-step epilogue's entry points:
// the CUDA kernel (csrc/kernels/draft_epilogue.cu) and its host twin
// (csrc/kernels/draft_epilogue_host.cpp) take the same arguments and reject
// the same bad ones with the same messages (std::invalid_argument -> ValueError).
//
// No CUDA or torch headers: compiles under nvcc (host pass) and g++.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace fk {
namespace epilogue {

constexpr int kNumStrides = 34;  // h 3, shift 2, scale 2, weight 2, bias 1, x / noise / 4 outputs 4 each
constexpr int kNumDtypeCodes = 3;  // h (and shift, scale, weight, bias), x, noise
// Philox subsequence of drawn draft noise: tag 0 with candidate field 2^32 - 1, a stream none of
// speculative_accept's reaches (see draft_epilogue.cu; free_kernels/triton/draft_epilogue.py and
// free_kernels/reference/draft_epilogue.py use the same value)
constexpr uint64_t kDraftNoiseSubsequence = 0xFFFFFFFFull;

[[noreturn]] inline void bad(const std::string& what) { throw std::invalid_argument("draft_epilogue: " + what); }

struct Dims {
  int G, R, N, H, C, S, p, C_out, grid_w;
  int PE;  // eps columns per token, p * p * C
  int Q;   // GEMM columns the transition needs: PE, or 2 PE with learned variance
  int gc;  // guided channels
};

// Checks every size, stride, dtype code and pointer of a call; returns the sizes
// as ints.  R == 0 passes (the caller returns early).
inline Dims check_args(uintptr_t h, uintptr_t shift, uintptr_t scale, uintptr_t weight, uintptr_t bias,
                       uintptr_t x, uintptr_t tables, uintptr_t index, uintptr_t noise, uintptr_t rng_state,
                       uintptr_t out_x, uintptr_t out_mean, uintptr_t out_logvar, uintptr_t out_noise,
                       const std::vector<int64_t>& strides, const std::vector<int64_t>& dtype_codes, int64_t G,
                       int64_t R, int64_t N, int64_t H, int64_t C, int64_t S, int64_t patch_size,
                       int64_t weight_rows, int64_t table_stride, int64_t guidance_channels, bool learned_variance) {
  if (strides.size() != kNumStrides) bad("expected 34 strides");
  if (dtype_codes.size() != kNumDtypeCodes) bad("expected 3 dtype codes (h, x, noise)");
  for (int64_t c : dtype_codes)
    if (c < 0 || c > 2) bad("dtype codes must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  for (int64_t s : strides)
    if (s < 0) bad("strides must be >= 0");
  if (G != 1 && G != 2) bad("G must be 1 or 2 (CFG)");
  if (R < 0 || R > INT32_MAX || N < 1 || N > INT32_MAX || H < 1 || H > INT32_MAX) bad("bad R / N / H");
  if (C < 1 || patch_size < 1 || S < 1 || S % patch_size) bad("bad C / S / patch_size");
  const int64_t grid_w = S / patch_size;
  if (grid_w * grid_w != N) bad("N must be (S / patch_size)^2");
  const int64_t pp = patch_size * patch_size;
  if (weight_rows % pp || (weight_rows / pp != C && weight_rows / pp != 2 * C)) bad("weight rows must be p*p*C or p*p*2C");
  if (learned_variance && weight_rows / pp != 2 * C) bad("learned variance needs p*p*2C weight rows");
  if (G == 2 && (guidance_channels < 1 || guidance_channels > C)) bad("guidance_channels must be in 1..C");
  if (table_stride < 1) bad("table_stride must be >= 1");
  if (noise == 0 && rng_state == 0) bad("pass noise or rng_state");
  if (R > 0) {
    for (uintptr_t ptr : {h, shift, scale, weight, bias, x, tables, index, out_x, out_mean, out_logvar})
      if (ptr == 0) bad("null pointer");
    if (rng_state % 8 || index % 8 || tables % 4 || out_x % 4 || out_mean % 4 || out_logvar % 4 || out_noise % 4)
      bad("misaligned pointer");
  }
  Dims d{};
  d.G = static_cast<int>(G);
  d.R = static_cast<int>(R);
  d.N = static_cast<int>(N);
  d.H = static_cast<int>(H);
  d.C = static_cast<int>(C);
  d.S = static_cast<int>(S);
  d.p = static_cast<int>(patch_size);
  d.C_out = static_cast<int>(weight_rows / pp);
  d.grid_w = static_cast<int>(grid_w);
  d.PE = static_cast<int>(pp * C);
  d.Q = learned_variance ? 2 * d.PE : d.PE;
  d.gc = static_cast<int>(guidance_channels);
  return d;
}

}  // namespace epilogue
}  // namespace fk

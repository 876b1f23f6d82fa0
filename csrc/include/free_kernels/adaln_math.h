// Scalar math of the adaLN block's kernels (csrc/kernels/modulated_layernorm.cu,
// gated_residual.cu, bias_gelu.cu) and of the draft-step epilogue
// (csrc/kernels/draft_epilogue.cu), shared with the host tests
// (csrc/tests/test_adaln_math.cpp) and mirrored by the Triton kernels
// (free_kernels/triton/modulated_layernorm.py, bias_gelu.py, draft_epilogue.py).
//
//   gelu_tanh_sigmoid   GELU (tanh approximation) as x * sigmoid(2u)
//   modulate            LayerNorm output -> x_hat * (1 + scale) + shift
//   guide               classifier-free guidance u + s (c - u)
//   TwoPassStats        exact LayerNorm statistics of chunks + Chan's merge
//   PatchLayout         unpatchify: (token, eps column) <-> (channel, pixel)
//   ddpm_transition     model output -> (mean, log-variance) of the DDPM step
//
// No CUDA or torch headers: compiles under nvcc (host and device) and g++.
#pragma once

#include <math.h>

#include <cstdint>

#include "free_kernels/config.h"

namespace fk {
namespace adaln {

// ------------------------------------------------------------------ GELU
// 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), evaluated through
// the identity 0.5 (1 + tanh u) = 1 / (1 + exp(-2u)): no cancellation for u
// near 0 (where 1 + tanh u loses nothing either, but tanh's own rounding is
// avoided), and exp overflow to +inf gives the exact limit -0 for x << 0.
FK_HOST_DEVICE FK_INLINE float gelu_tanh_sigmoid(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.0f + expf(-2.0f * u));
}

FK_HOST_DEVICE FK_INLINE float modulate(float x_hat, float shift, float scale) {
  return x_hat * (1.0f + scale) + shift;
}

// Classifier-free guidance of one element: uncond + s * (cond - uncond).
FK_HOST_DEVICE FK_INLINE float guide(float cond, float uncond, float s) { return uncond + s * (cond - uncond); }

// ------------------------------------------------------------------ LayerNorm statistics
// Mean and sum of squared deviations of a set of values, built from chunks
// whose own (count, mean, m2) are exact two-pass results, merged with Chan et
// al.'s formula.  One chunk = the whole row gives the textbook two-pass result.
struct TwoPassStats {
  float count = 0.f;
  float mean = 0.f;
  float m2 = 0.f;

  FK_HOST_DEVICE FK_INLINE void merge(float n_b, float mean_b, float m2_b) {
    if (n_b <= 0.f) return;
    const float n = count + n_b;
    const float delta = mean_b - mean;
    mean += delta * (n_b / n);
    m2 += m2_b + delta * delta * (count * n_b / n);
    count = n;
  }
  // 1 / sqrt(population variance + eps), the LayerNorm scale
  FK_HOST_DEVICE FK_INLINE float rstd(float eps) const {
    const float var = count > 0.f ? m2 / count : 0.f;
    return 1.0f / sqrtf(var + eps);
  }
};

// ------------------------------------------------------------------ unpatchify
// The DiT head emits, per token n = hh * grid + ww, p*p*C_out values laid out
// (i, j, ch) (ch fastest); unpatchify puts value (i, j, ch) of token n at pixel
// (ch, hh*p + i, ww*p + j) of the (C_out, S, S) image, S = grid * p.  The
// epilogue walks only the eps part: column e in [0, p*p*C) of a token is
// (ij = e / C, ch = e % C); its weight row is ij * C_out + ch and the matching
// variance channel's row is that + C.
struct PatchLayout {
  int p;      // patch size
  int C;      // state channels (eps channels)
  int C_out;  // model output channels: C or 2C (learned variance)
  int grid;   // tokens per side, S = grid * p

  FK_HOST_DEVICE FK_INLINE int eps_columns() const { return p * p * C; }
  FK_HOST_DEVICE FK_INLINE int side() const { return grid * p; }
  FK_HOST_DEVICE FK_INLINE int weight_row(int e) const { return (e / C) * C_out + e % C; }
  FK_HOST_DEVICE FK_INLINE void pixel(int n, int e, int* ch, int* row, int* col) const {
    const int ij = e / C;
    *ch = e % C;
    *row = (n / grid) * p + ij / p;
    *col = (n % grid) * p + ij % p;
  }
  // row-major flat index of (ch, row, col) inside one (C, S, S) state: the
  // counter of the element's normal in the Philox stream (plus r * C*S*S)
  FK_HOST_DEVICE FK_INLINE int64_t flat(int ch, int row, int col) const {
    const int64_t S = side();
    return (static_cast<int64_t>(ch) * S + row) * S + col;
  }
};

// ------------------------------------------------------------------ on-chip head GEMM
// Rows of the draft epilogue's A tile (modulated LayerNorm rows of one CTA):
// one m16 tile of mma.m16n8k16, i.e. 16 / G tokens of both CFG halves.
constexpr int kHeadRows = 16;

// Pitch (in 16-bit elements) of the shared A tile: H rounded up to the mma K
// step (16), plus 8 so that pitch / 2 (the pitch in 4-byte words) is 4 mod 8:
// the 8 rows x 4 words that one A-fragment load touches (row g, word t) then
// fall in 32 distinct banks (bank = 4 g + t + const).
FK_HOST_DEVICE FK_INLINE int a_tile_pitch16(int H) { return (H + 15) / 16 * 16 + 8; }

// ------------------------------------------------------------------ DDPM transition
// Row constants, gathered from the (6, T) float32 tables at the row's index
// (row order of free_kernels.reference.draft_epilogue.TABLE_ROWS).
enum TableRow : int {
  kSqrtRecipAlphasCumprod = 0,
  kSqrtRecipm1AlphasCumprod = 1,
  kPosteriorMeanCoef1 = 2,
  kPosteriorMeanCoef2 = 3,
  kLogvarMin = 4,  // learned: posterior_log_variance_clipped; fixed: the fixed log-variance
  kLogvarMax = 5,  // learned: log_betas
  kNumTableRows = 6,
};

struct RowCoefs {
  float sqrt_recip;    // sqrt(1 / abar)
  float sqrt_recipm1;  // sqrt(1 / abar - 1)
  float coef1, coef2;  // posterior mean coefficients of x0 and x_t
  float log_min, log_max;
};

FK_HOST_DEVICE FK_INLINE RowCoefs load_row_coefs(const float* tables, int64_t table_stride, int64_t index) {
  RowCoefs k;
  k.sqrt_recip = tables[kSqrtRecipAlphasCumprod * table_stride + index];
  k.sqrt_recipm1 = tables[kSqrtRecipm1AlphasCumprod * table_stride + index];
  k.coef1 = tables[kPosteriorMeanCoef1 * table_stride + index];
  k.coef2 = tables[kPosteriorMeanCoef2 * table_stride + index];
  k.log_min = tables[kLogvarMin * table_stride + index];
  k.log_max = tables[kLogvarMax * table_stride + index];
  return k;
}

struct Transition {
  float mean;
  float logvar;
};

// clamp to [-1, 1] that lets NaN through (torch.clamp semantics)
FK_HOST_DEVICE FK_INLINE float clip_unit(float v) { return v < -1.f ? -1.f : (v > 1.f ? 1.f : v); }

// The operations of GaussianDiffusion.transition_from_output, in its order:
//   learned: frac = (v + 1) / 2, logvar = frac * log_max + (1 - frac) * log_min
//   fixed:   logvar = log_min
//   x0 = out (x0 prediction) or sqrt_recip * x - sqrt_recipm1 * out (eps), clipped on request
//   mean = coef1 * x0 + coef2 * x
FK_HOST_DEVICE FK_INLINE Transition ddpm_transition(float out, float var_value, float x, const RowCoefs& k,
                                                    bool learned, bool predict_xstart, bool clip) {
  Transition t;
  if (learned) {
    const float frac = (var_value + 1.f) / 2.f;
    t.logvar = frac * k.log_max + (1.f - frac) * k.log_min;
  } else {
    t.logvar = k.log_min;
  }
  float x0 = predict_xstart ? out : k.sqrt_recip * x - k.sqrt_recipm1 * out;
  if (clip) x0 = clip_unit(x0);
  t.mean = k.coef1 * x0 + k.coef2 * x;
  return t;
}

// x_next = mean + exp(logvar / 2) * noise
FK_HOST_DEVICE FK_INLINE float sample_from(const Transition& t, float noise) {
  return t.mean + expf(0.5f * t.logvar) * noise;
}

}  // namespace adaln
}  // namespace fk

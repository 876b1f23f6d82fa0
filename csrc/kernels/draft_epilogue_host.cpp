// draft_epilogue_host: the draft-step epilogue on the CPU, in one call.
//
// The host twin of csrc/kernels/draft_epilogue.cu (same arguments, same checks
// from epilogue_args.h, same scalar math from adaln_math.h, same Philox stream
// for drawn noise): drafted features h (G*R, N, H) -> head LayerNorm + adaLN
// modulate -> final linear (only the eps and, for learned variance, the
// variance columns; variance columns of the conditional rows only) ->
// unpatchify, guidance, DDPM mean / log-variance -> x_next = mean + sigma * z.
//
// Why it exists: at the sizes of a draft step on the CPU (the demo: 2 feature
// rows x 16 tokens x 128 channels) the torch composition is ~40 small ops whose
// fixed costs (and, at more than one thread, thread wake-ups) are the step's
// cost; the whole epilogue is ~40 K multiply-adds, a few microseconds here.
// float32 tensors only; single-threaded (the Python backend declines calls too
// large for that, where torch's multi-threaded GEMM wins).
#include <math.h>

#include <cstdint>
#include <string>
#include <vector>

#include "free_kernels/adaln_math.h"
#include "free_kernels/common.h"
#include "free_kernels/entry_points.h"
#include "free_kernels/epilogue_args.h"

namespace fk {
namespace {

struct View4 {
  const float* p;
  int64_t r, c, y, x;
  float at(int64_t i, int c_, int y_, int x_) const { return p[i * r + c_ * c + y_ * y + x_ * x]; }
};

struct Out4 {
  float* p;
  int64_t r, c, y, x;
  float& at(int64_t i, int c_, int y_, int x_) const { return p[i * r + c_ * c + y_ * y + x_ * x]; }
};

// Sums in kLanes independent partial sums combined in a fixed order: deterministic, and chains short
// enough for the adds' latency to overlap (the compiler keeps them in vector registers when the data is
// contiguous).  kLanes = 16 = four 4-wide vectors in flight.
constexpr int kLanes = 16;

inline float combine(const float* acc) {
  float t[kLanes / 2];
  for (int j = 0; j < kLanes / 2; ++j) t[j] = acc[j] + acc[j + kLanes / 2];
  return ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
}

// sum_k a[k] * w[k * s]
inline float dot(const float* __restrict__ a, const float* __restrict__ w, int64_t s, int n) {
  float acc[kLanes] = {};
  int k = 0;
  if (s == 1) {
    for (; k + kLanes <= n; k += kLanes)
      for (int j = 0; j < kLanes; ++j) acc[j] += a[k + j] * w[k + j];
  }
  for (; k < n; ++k) acc[k % kLanes] += a[k] * w[k * s];
  return combine(acc);
}

// sum_k v[k] and sum_k (v[k] - mean)^2 of a contiguous row
inline float row_sum(const float* __restrict__ v, int n) {
  float acc[kLanes] = {};
  int k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += v[k + j];
  for (; k < n; ++k) acc[k % kLanes] += v[k];
  return combine(acc);
}

inline float row_m2(const float* __restrict__ v, float mean, int n) {
  float acc[kLanes] = {};
  int k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float d = v[k + j] - mean;
      acc[j] += d * d;
    }
  for (; k < n; ++k) {
    const float d = v[k] - mean;
    acc[k % kLanes] += d * d;
  }
  return combine(acc);
}

}  // namespace

void draft_epilogue_host(uintptr_t h, uintptr_t shift, uintptr_t scale, uintptr_t weight, uintptr_t bias,
                         uintptr_t x, uintptr_t tables, uintptr_t index, uintptr_t noise, uintptr_t rng_state,
                         uintptr_t out_x, uintptr_t out_mean, uintptr_t out_logvar, uintptr_t out_noise,
                         const std::vector<int64_t>& strides, const std::vector<int64_t>& dtype_codes, int64_t G,
                         int64_t R, int64_t N, int64_t H, int64_t C, int64_t S, int64_t patch_size,
                         int64_t weight_rows, int64_t table_stride, int64_t table_len, double eps, double cfg_scale,
                         int64_t guidance_channels, bool learned_variance, bool predict_xstart, bool clip_denoised) {
  const epilogue::Dims d =
      epilogue::check_args(h, shift, scale, weight, bias, x, tables, index, noise, rng_state, out_x, out_mean,
                           out_logvar, out_noise, strides, dtype_codes, G, R, N, H, C, S, patch_size, weight_rows,
                           table_stride, guidance_channels, learned_variance);
  for (int64_t c : dtype_codes)
    if (c != 0) epilogue::bad("the host epilogue reads float32 tensors only (dtype codes must be 0)");
  if (table_len < 1 || table_len > table_stride) epilogue::bad("table_len must be in 1..table_stride");
  if (R == 0) return;
  if (h % 4 || shift % 4 || scale % 4 || weight % 4 || bias % 4 || x % 4 || noise % 4)
    epilogue::bad("misaligned pointer");
  const int64_t* idx = reinterpret_cast<const int64_t*>(index);
  for (int r = 0; r < d.R; ++r)
    if (idx[r] < 0 || idx[r] >= table_len)
      epilogue::bad("index " + std::to_string(idx[r]) + " of row " + std::to_string(r) + " is outside the tables (" +
                    std::to_string(table_len) + " respaced steps)");

  const int64_t* s = strides.data();
  const float* hp = reinterpret_cast<const float*>(h);
  const float* shp = reinterpret_cast<const float*>(shift);
  const float* scp = reinterpret_cast<const float*>(scale);
  const float* wp = reinterpret_cast<const float*>(weight);
  const float* bp = reinterpret_cast<const float*>(bias);
  const int64_t s_hb = s[0], s_hn = s[1], s_hh = s[2], s_sb = s[3], s_sh = s[4], s_cb = s[5], s_ch = s[6];
  const int64_t s_wo = s[7], s_wk = s[8], s_bias = s[9];
  auto in4 = [&](uintptr_t ptr, int i) { return View4{reinterpret_cast<const float*>(ptr), s[i], s[i + 1], s[i + 2], s[i + 3]}; };
  auto out4 = [&](uintptr_t ptr, int i) { return Out4{reinterpret_cast<float*>(ptr), s[i], s[i + 1], s[i + 2], s[i + 3]}; };
  const View4 xs = in4(x, 10), zs = in4(noise, 14);
  const Out4 oxs = out4(out_x, 18), oms = out4(out_mean, 22), ovs = out4(out_logvar, 26), ozs = out4(out_noise, 30);
  int64_t* rng = reinterpret_cast<int64_t*>(rng_state);

  const adaln::PatchLayout L{d.p, d.C, d.C_out, d.grid_w};
  const float feps = static_cast<float>(eps), fcfg = static_cast<float>(cfg_scale);
  const int64_t D = static_cast<int64_t>(d.C) * d.S * d.S;
  // the weight rows of the GEMM columns (eps columns [0, PE), variance columns [PE, 2 PE)) and their biases
  std::vector<int> wrow(d.Q);
  std::vector<float> b(d.Q);
  for (int q = 0; q < d.Q; ++q) {
    wrow[q] = q < d.PE ? L.weight_row(q) : L.weight_row(q - d.PE) + d.C;
    b[q] = bp[wrow[q] * s_bias];
  }
  std::vector<float> y(d.H), mo(static_cast<size_t>(d.G) * d.Q);

  for (int r = 0; r < d.R; ++r) {
    const adaln::RowCoefs k = adaln::load_row_coefs(reinterpret_cast<const float*>(tables), table_stride, idx[r]);
    for (int n = 0; n < d.N; ++n) {
      for (int g = 0; g < d.G; ++g) {
        const int64_t row = static_cast<int64_t>(g) * d.R + r;
        const float* hr = hp + row * s_hb + n * s_hn;
        // LayerNorm: two-pass statistics in fp32 over a contiguous copy of the row, then modulate
        for (int i = 0; i < d.H; ++i) y[i] = hr[i * s_hh];
        const float mean = row_sum(y.data(), d.H) / static_cast<float>(d.H);
        adaln::TwoPassStats st;
        st.merge(static_cast<float>(d.H), mean, row_m2(y.data(), mean, d.H));
        const float rstd = st.rstd(feps);
        const float* shr = shp + row * s_sb;
        const float* scr = scp + row * s_cb;
        for (int i = 0; i < d.H; ++i) y[i] = adaln::modulate((y[i] - mean) * rstd, shr[i * s_sh], scr[i * s_ch]);
        const int q_end = g == 0 ? d.Q : d.PE;  // variance columns: conditional rows only
        for (int q = 0; q < q_end; ++q) mo[g * d.Q + q] = dot(y.data(), wp + wrow[q] * s_wo, s_wk, d.H);
      }
      for (int e = 0; e < d.PE; ++e) {
        int ch, prow, pcol;
        L.pixel(n, e, &ch, &prow, &pcol);
        float out = mo[e] + b[e];
        if (d.G == 2 && ch < d.gc) out = adaln::guide(out, mo[d.Q + e] + b[e], fcfg);
        const float var_value = learned_variance ? mo[d.PE + e] + b[d.PE + e] : 0.f;
        const adaln::Transition tr =
            adaln::ddpm_transition(out, var_value, xs.at(r, ch, prow, pcol), k, learned_variance, predict_xstart,
                                   clip_denoised);
        const float z = noise != 0 ? zs.at(r, ch, prow, pcol)
                                   : philox_randn(static_cast<uint64_t>(rng[0]),
                                                  static_cast<uint64_t>(rng[1]) +
                                                      static_cast<uint64_t>(r * D + L.flat(ch, prow, pcol)),
                                                  epilogue::kDraftNoiseSubsequence);
        oxs.at(r, ch, prow, pcol) = adaln::sample_from(tr, z);
        oms.at(r, ch, prow, pcol) = tr.mean;
        ovs.at(r, ch, prow, pcol) = tr.logvar;
        if (out_noise != 0) ozs.at(r, ch, prow, pcol) = z;
      }
    }
  }
  if (noise == 0) rng[1] += static_cast<int64_t>(d.R) * D;
}

}  // namespace fk

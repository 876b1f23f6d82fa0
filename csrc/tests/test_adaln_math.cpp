// Host tests of adaln_math.h: the scalar math of the adaLN and draft-epilogue
// kernels against double-precision formulas written out independently here
// (the tanh form of GELU, a brute-force reshape/permute for unpatchify, the
// DDPM posterior written from the schedule, Chan's merge vs a one-shot
// two-pass over the whole row).
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "fk_test.h"
#include "free_kernels/adaln_math.h"

using fk::adaln::PatchLayout;
using fk::adaln::RowCoefs;
using fk::adaln::TwoPassStats;

namespace {
double inner(double x) { return std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x); }
double gelu_tanh_form(double x) { return 0.5 * x * (1.0 + std::tanh(inner(x))); }
double gelu_sigmoid_form(double x) { return x / (1.0 + std::exp(-2.0 * inner(x))); }
}  // namespace

FK_TEST(gelu_matches_the_tanh_form) {
  // the identity 0.5 (1 + tanh u) = 1 / (1 + exp(-2u)), in double, where 1 + tanh(u) does not cancel
  for (double x = -3.0; x <= 12.0; x += 0.0137) {
    FK_CHECK_REL(gelu_sigmoid_form(x), gelu_tanh_form(x), 1e-13);
  }
  // the float function against the double one: the rounding of u and of exp is amplified by |2u|
  // (exp's condition number), so allow a few ulps times (4 + 2|u|)
  for (double x = -12.0; x <= 12.0; x += 0.0137) {
    const float xf = static_cast<float>(x);
    const double ref = gelu_sigmoid_form(xf);
    const float got = fk::adaln::gelu_tanh_sigmoid(xf);
    FK_CHECK_NEAR(got, ref, 2.5e-7 * (4.0 + 2.0 * std::fabs(inner(xf))) * std::fabs(ref) + 1e-36);  // exp overflow: -0 instead of ~1e-38
  }
  FK_CHECK(fk::adaln::gelu_tanh_sigmoid(0.f) == 0.f);
}

FK_TEST(gelu_limits_and_nan) {
  const float inf = std::numeric_limits<float>::infinity();
  FK_CHECK(fk::adaln::gelu_tanh_sigmoid(-100.f) == 0.f);   // exp overflow -> x / inf = -0
  FK_CHECK(fk::adaln::gelu_tanh_sigmoid(100.f) == 100.f);  // exp underflow -> x / 1
  FK_CHECK(fk::adaln::gelu_tanh_sigmoid(1e30f) == 1e30f);
  FK_CHECK(std::isnan(fk::adaln::gelu_tanh_sigmoid(std::nanf(""))));
  FK_CHECK(fk::adaln::gelu_tanh_sigmoid(-inf) == 0.f || std::isnan(fk::adaln::gelu_tanh_sigmoid(-inf)));
}

FK_TEST(modulate_and_guide) {
  FK_CHECK(fk::adaln::modulate(2.f, 0.5f, 0.25f) == 2.f * 1.25f + 0.5f);
  FK_CHECK(fk::adaln::modulate(-1.f, 0.f, -1.f) == 0.f);  // scale -1 zeroes the row
  FK_CHECK(fk::adaln::guide(3.f, 1.f, 1.f) == 3.f);       // s = 1: the cond output
  FK_CHECK(fk::adaln::guide(3.f, 1.f, 0.f) == 1.f);       // s = 0: the uncond output
  FK_CHECK_NEAR(fk::adaln::guide(0.3f, -0.2f, 4.f), -0.2 + 4.0 * 0.5, 1e-6);
}

FK_TEST(chunked_stats_match_two_pass_over_the_row) {
  std::mt19937 gen(7);
  std::normal_distribution<double> nd(0.0, 1.0);
  const int sizes[] = {1, 7, 64, 72, 1152, 1000};
  const int chunks[] = {1, 16, 64, 100};
  for (int H : sizes) {
    // offset mean (|mean| >> std) is where E[x^2] - E[x]^2 would fail
    std::vector<float> v(H);
    for (float& e : v) e = static_cast<float>(1000.0 + 0.01 * nd(gen));
    double mean = 0.0;
    for (float e : v) mean += e;
    mean /= H;
    double m2 = 0.0;
    for (float e : v) m2 += (e - mean) * (e - mean);
    for (int ck : chunks) {
      TwoPassStats st;
      for (int k0 = 0; k0 < H; k0 += ck) {
        const int nb = std::min(ck, H - k0);
        float cm = 0.f;
        for (int k = k0; k < k0 + nb; ++k) cm += v[k];
        cm /= nb;
        float c2 = 0.f;
        for (int k = k0; k < k0 + nb; ++k) c2 += (v[k] - cm) * (v[k] - cm);
        st.merge(static_cast<float>(nb), cm, c2);
      }
      FK_CHECK(st.count == static_cast<float>(H));
      FK_CHECK_NEAR(st.mean, mean, 1e-6 * 1000.0 * 4);
      FK_CHECK_NEAR(st.m2 / H, m2 / H, 2e-3 * (m2 / H) + 1e-12);
      FK_CHECK_NEAR(st.rstd(1e-6f), 1.0 / std::sqrt(m2 / H + 1e-6), 2e-3 / std::sqrt(m2 / H + 1e-6));
    }
  }
  TwoPassStats empty;
  empty.merge(0.f, 5.f, 1.f);  // empty chunks are ignored
  FK_CHECK(empty.count == 0.f && empty.mean == 0.f);
}

// Brute force: build the (N, p*p*C_out) head output with distinct values,
// unpatchify it with explicit loops over the official reshape (n, h, w, p, q, c)
// -> (n, c, h, p, w, q), and check every eps column lands where PatchLayout says.
FK_TEST(unpatchify_layout_matches_reshape_permute) {
  const int cases[][3] = {{2, 4, 4}, {2, 3, 1}, {4, 2, 3}, {1, 4, 2}, {8, 1, 2}};  // p, C, grid
  for (const auto& cs : cases) {
    for (int c_out_mult = 1; c_out_mult <= 2; ++c_out_mult) {
      const int p = cs[0], C = cs[1], grid = cs[2], C_out = C * c_out_mult;
      const PatchLayout L{p, C, C_out, grid};
      const int S = grid * p, N = grid * grid, P = p * p * C_out;
      std::vector<int> img(static_cast<size_t>(C_out) * S * S, -1);
      for (int n = 0; n < N; ++n) {
        const int hh = n / grid, ww = n % grid;
        for (int o = 0; o < P; ++o) {
          const int c = o % C_out, pq = o / C_out, pi = pq / p, qj = pq % p;
          img[(static_cast<size_t>(c) * S + hh * p + pi) * S + ww * p + qj] = n * P + o;
        }
      }
      FK_CHECK(L.eps_columns() == p * p * C && L.side() == S);
      std::vector<int> seen(static_cast<size_t>(C) * S * S, 0);
      for (int n = 0; n < N; ++n) {
        for (int e = 0; e < L.eps_columns(); ++e) {
          int ch, row, col;
          L.pixel(n, e, &ch, &row, &col);
          FK_CHECK(ch >= 0 && ch < C && row >= 0 && row < S && col >= 0 && col < S);
          const int o = L.weight_row(e);
          FK_CHECK(img[(static_cast<size_t>(ch) * S + row) * S + col] == n * P + o);
          if (C_out == 2 * C) {  // the variance channel of the same pixel is column o + C
            FK_CHECK(img[(static_cast<size_t>(ch + C) * S + row) * S + col] == n * P + o + C);
          }
          FK_CHECK(L.flat(ch, row, col) == (static_cast<int64_t>(ch) * S + row) * S + col);
          ++seen[L.flat(ch, row, col)];
        }
      }
      bool all_once = true;
      for (int s : seen) all_once = all_once && s == 1;
      FK_CHECK(all_once);  // the eps part covers the (C, S, S) state exactly once
    }
  }
}

// Linear schedule, 1000 steps, index t: the constants from their definitions.
FK_TEST(ddpm_transition_matches_the_posterior) {
  const int T = 1000;
  std::vector<double> beta(T), abar(T);
  double prod = 1.0;
  for (int i = 0; i < T; ++i) {
    beta[i] = 1e-4 + (0.02 - 1e-4) * i / (T - 1);
    prod *= 1.0 - beta[i];
    abar[i] = prod;
  }
  const int idx[] = {1, 17, 500, 999};
  const float outs[] = {-2.5f, -0.3f, 0.f, 0.7f, 3.f};
  const float xs[] = {-1.5f, 0.2f, 2.f};
  const float vs[] = {-1.f, -0.2f, 0.5f, 1.f};
  for (int t : idx) {
    const double abar_prev = abar[t - 1];
    const double post_var = beta[t] * (1 - abar_prev) / (1 - abar[t]);
    RowCoefs k;
    k.sqrt_recip = static_cast<float>(std::sqrt(1.0 / abar[t]));
    k.sqrt_recipm1 = static_cast<float>(std::sqrt(1.0 / abar[t] - 1.0));
    k.coef1 = static_cast<float>(beta[t] * std::sqrt(abar_prev) / (1 - abar[t]));
    k.coef2 = static_cast<float>((1 - abar_prev) * std::sqrt(1 - beta[t]) / (1 - abar[t]));
    k.log_min = static_cast<float>(std::log(post_var));
    k.log_max = static_cast<float>(std::log(beta[t]));
    for (float o : outs)
      for (float x : xs)
        for (float v : vs)
          for (int flags = 0; flags < 8; ++flags) {
            const bool learned = flags & 1, xstart = flags & 2, clip = flags & 4;
            const fk::adaln::Transition tr = fk::adaln::ddpm_transition(o, v, x, k, learned, xstart, clip);
            double x0 = xstart ? o : std::sqrt(1.0 / abar[t]) * x - std::sqrt(1.0 / abar[t] - 1.0) * o;
            if (clip) x0 = std::min(1.0, std::max(-1.0, x0));
            const double mean = beta[t] * std::sqrt(abar_prev) / (1 - abar[t]) * x0 +
                                (1 - abar_prev) * std::sqrt(1 - beta[t]) / (1 - abar[t]) * x;
            const double frac = (v + 1.0) / 2.0;
            const double logvar = learned ? frac * std::log(beta[t]) + (1 - frac) * std::log(post_var)
                                          : std::log(post_var);
            const double scale = std::fabs(x0) + std::fabs(x) + std::fabs(o) * std::sqrt(1.0 / abar[t]) + 1.0;
            FK_CHECK_NEAR(tr.mean, mean, 2e-6 * scale * (1.0 + std::sqrt(1.0 / abar[t])));
            FK_CHECK_NEAR(tr.logvar, logvar, 2e-6 * (std::fabs(logvar) + 1.0));
            const double z = 0.75;
            FK_CHECK_NEAR(fk::adaln::sample_from(tr, static_cast<float>(z)), tr.mean + std::exp(0.5 * tr.logvar) * z,
                          1e-6 * (std::fabs(tr.mean) + 1.0));
          }
  }
}

FK_TEST(clip_lets_nan_through_and_table_gather) {
  FK_CHECK(std::isnan(fk::adaln::clip_unit(std::nanf(""))));
  FK_CHECK(fk::adaln::clip_unit(-3.f) == -1.f && fk::adaln::clip_unit(2.f) == 1.f);
  FK_CHECK(fk::adaln::clip_unit(0.25f) == 0.25f);
  // (6, T) row-major tables: row k, index t at k * T + t
  const int T = 5;
  std::vector<float> tab(fk::adaln::kNumTableRows * T);
  for (int k = 0; k < fk::adaln::kNumTableRows; ++k)
    for (int t = 0; t < T; ++t) tab[k * T + t] = 10.f * k + t;
  const RowCoefs c = fk::adaln::load_row_coefs(tab.data(), T, 3);
  FK_CHECK(c.sqrt_recip == 3.f && c.sqrt_recipm1 == 13.f && c.coef1 == 23.f && c.coef2 == 33.f);
  FK_CHECK(c.log_min == 43.f && c.log_max == 53.f);
}

FK_TEST(a_tile_pitch_is_bank_conflict_free) {
  for (int H = 2; H <= 4096; H += 2) {
    const int p = fk::adaln::a_tile_pitch16(H);
    FK_CHECK(p >= H && p % 8 == 0);          // rows stay 16-byte aligned
    FK_CHECK((p - 8) % 16 == 0 && p - 8 >= H);  // the K loop covers H in k16 steps
    // an A fragment: lanes (g, t) read word g * p/2 + t (+ k-step offset): 32 distinct banks
    bool distinct = true;
    int seen = 0;
    for (int g = 0; g < 8; ++g)
      for (int t = 0; t < 4; ++t) {
        const int bank = (g * (p / 2) + t) % 32;
        distinct = distinct && !(seen & (1 << bank));
        seen |= 1 << bank;
      }
    FK_CHECK(distinct);
  }
}

int main() { return fk_test::run_all(); }

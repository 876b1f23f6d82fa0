// Host tests of accept_math.h: element terms, decisions, reflection, the random
// stream layout and conversions, and the exactness of the whole per-sample rule
// (draft accept-or-residual emits p) with the very functions the kernels call.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fk_test.h"
#include "free_kernels/accept_math.h"

namespace acc = fk::accept;

// Hand values: float64 evaluations of the textbook formulas
//   log p(x) - log q(x) = -z_p^2/2 - lv_p/2 + xi^2/2 + lv_q/2 at x = mu_q + sigma_q xi, etc.
FK_TEST(element_terms_match_hand_values) {
  const double mp = 0.3, lvp = -1.2, mq = 0.25, lvq = -1.0, xi = 0.7, zs = -1.3;
  FK_CHECK_NEAR(acc::log_ratio_term<double>(mp, lvp, mq, lvq, xi), 0.1120875228588043, 1e-15);
  FK_CHECK_NEAR(acc::log_ratio_term<float>(mp, lvp, mq, lvq, xi), 0.1120875228588043, 2e-7);
  double z = 0;
  FK_CHECK_NEAR(acc::residual_term<double>(zs, mp, lvp, mq, lvq, &z), 0.1467432667102141, 1e-15);
  FK_CHECK_NEAR(z, -0.41345512692223435, 1e-15);
  float zf = 0;
  FK_CHECK_NEAR(acc::residual_term<float>(zs, mp, lvp, mq, lvq, &zf), 0.1467432667102141, 2e-7);
  FK_CHECK_NEAR(acc::whitened_diff<double>(mp, mq, lvp), 0.09110594001952542, 1e-16);
  // Reflection of xi about the hyperplane orthogonal to d (1-D: xi -> -xi).
  const double d = acc::whitened_diff<double>(mp, mq, lvp);
  const double coef = acc::reflection_coef<double>(d * xi, d * d);
  FK_CHECK_NEAR(acc::reflect<double>(mp, lvp, xi, d, coef), -0.08416814526581834, 1e-15);
  FK_CHECK_NEAR(acc::reflect<double>(mp, lvp, xi, d, coef), mp - std::exp(0.5 * lvp) * xi, 1e-15);
  // Equal variance: the general term reduces to <d, xi> - d^2 / 2.
  FK_CHECK_NEAR(acc::log_ratio_term<double>(mp, lvp, mq, lvp, xi), d * xi - 0.5 * d * d, 1e-15);
  // q == p: every term vanishes up to the rounding of x = mu + sigma xi and back.
  FK_CHECK_NEAR(acc::log_ratio_term<float>(0.1f, -0.5f, 0.1f, -0.5f, 1.7f), 0.0, 1e-6);
  FK_CHECK_NEAR(acc::residual_term<float>(1.7f, 0.1f, -0.5f, 0.1f, -0.5f, &zf), 0.0, 1e-6);
  FK_CHECK(acc::whitened_diff<float>(0.1f, 0.1f, -0.5f) == 0.0f);
}

FK_TEST(reflection_coefficient_at_zero_discrepancy) {
  FK_CHECK(acc::reflection_coef<float>(0.0f, 0.0f) == 0.0f);
  FK_CHECK(acc::reflection_coef<float>(3.0f, 0.0f) == 0.0f);
  FK_CHECK_NEAR(acc::reflection_coef<float>(1.5f, 4.0f), 0.75, 0);
  FK_CHECK(std::isnan(acc::reflection_coef<float>(NAN, NAN)));   // NaN in the rejected slot
  FK_CHECK(std::isnan(acc::reflection_coef<float>(NAN, 2.0f)));
  FK_CHECK(std::isnan(acc::reflection_coef<float>(NAN, 0.0f)));
  // d = 0: the output is the draft mu_p + sigma xi.
  FK_CHECK_NEAR(acc::reflect<float>(1.0f, 0.0f, 0.5f, 0.0f, 0.0f), 1.5, 1e-7);
}

FK_TEST(bonus_masks_noise) {
  FK_CHECK(acc::bonus_value<float>(0.25f, 0.0f, NAN, true) == 0.25f);          // never 0 * NaN
  FK_CHECK(acc::bonus_value<float>(0.25f, 1000.0f, 1.0f, true) == 0.25f);      // never 0 * inf
  FK_CHECK_NEAR(acc::bonus_value<double>(0.25, std::log(4.0), -1.5, false), 0.25 - 3.0, 1e-15);
}

FK_TEST(accept_decision) {
  const float u = 0.5f;
  FK_CHECK(acc::accept_draft(u, std::log(0.5f) + 1e-6f, 1.0f));
  FK_CHECK(!acc::accept_draft(u, std::log(0.5f) - 1e-6f, 1.0f));
  FK_CHECK(!acc::accept_draft(u, std::log(0.5f), 1.0f));  // strict: u < p/q
  FK_CHECK(!acc::accept_draft(u, NAN, 1.0f));             // NaN never accepts
  FK_CHECK(!acc::accept_draft(NAN, 0.0f, 1.0f));
  FK_CHECK(!acc::accept_draft(u, 0.0f, NAN));
  FK_CHECK(acc::accept_draft(u, INFINITY, 1.0f));
  // Relax: log u < lr / tau, tau >= 1 loosens a negative log ratio.
  FK_CHECK(!acc::accept_draft(u, -1.0f, 1.0f));
  FK_CHECK(acc::accept_draft(u, -1.0f, 2.0f));
}

FK_TEST(residual_keep_without_cancellation) {
  // 1 - q/p for q/p = exp(-1e-8): 1e-8, which 1 - expf(x) would round to 0.
  FK_CHECK_REL(acc::residual_keep_prob<float>(-1e-8f), 1e-8, 1e-5);
  FK_CHECK_REL(acc::residual_keep_prob<double>(-2.0), 1.0 - std::exp(-2.0), 1e-15);
  FK_CHECK(acc::residual_keep<float>(0.5e-8f, -1e-8f));
  FK_CHECK(!acc::residual_keep<float>(2e-8f, -1e-8f));
  FK_CHECK(!acc::residual_keep<float>(1e-30f, 0.0f));   // q >= p: never kept
  FK_CHECK(!acc::residual_keep<float>(1e-30f, 0.5f));
  FK_CHECK(!acc::residual_keep<float>(0.5f, NAN));
  FK_CHECK(acc::residual_keep<float>(0.999f, -INFINITY));  // q(z) = 0: always kept
}

FK_TEST(stream_layout_and_conversions) {
  FK_CHECK(acc::subsequence(3, acc::kTagResidualNormal, 7) == 0x0000000E00000007ull);
  FK_CHECK(acc::subsequence(0, acc::kTagAcceptUniform, 0) == 0ull);
  FK_CHECK(acc::rng_advance(6, 4096) == 4096);
  FK_CHECK(acc::rng_advance(8, 3) == 8);
  FK_CHECK(acc::rng_advance(0, 0) == 1);
  // uniform_open: the 2^24 grid shifted by half a step, strictly inside (0, 1).
  FK_CHECK(acc::uniform_open(0u) == std::ldexp(1.0f, -25));
  FK_CHECK(acc::uniform_open(0xffffffffu) == 1.0f - std::ldexp(1.0f, -25));
  FK_CHECK(acc::uniform_open(0x80000000u) == 0.5f + std::ldexp(1.0f, -25));
  // Box-Muller: smallest radius uniform 2^-33 -> 6.7637 sigma; u1 -> 1 gives radius 0.
  FK_CHECK_NEAR(acc::normal_from_words(0u, 0u), 6.763705635001895, 2e-6);
  FK_CHECK(acc::normal_from_words(0xffffffffu, 0u) == 0.0f);
  const fk::f32x2 q = acc::normal_pair_from_words(0u, 0x40000000u);  // theta = pi / 2
  FK_CHECK_NEAR(q.x, 0.0, 1e-5);
  FK_CHECK_NEAR(q.y, 6.763705635001895, 2e-6);
  // Stream helpers are Philox of the documented counter.
  const uint64_t seed = 0x0123456789abcdefull, off = 0x00000001fffffff0ull;
  const fk::u32x4 w = fk::philox4x32<10>(fk::u32x4{0xfffffff3u, 0x1u, 5u, (2u << 2) | 2u}, 0x89abcdefu, 0x01234567u);
  const fk::f32x2 pair = acc::normal_pair_from_words(w.x, w.y);
  FK_CHECK(acc::residual_normal(seed, off + 3, 2, 10) == pair.x);  // candidate 10: pair 5, cos
  FK_CHECK(acc::residual_normal(seed, off + 3, 2, 11) == pair.y);  // candidate 11: pair 5, sin
  const fk::u32x4 v = fk::philox4x32<10>(fk::u32x4{0xfffffff3u, 0x1u, 0u, (2u << 2) | 1u}, 0x89abcdefu, 0x01234567u);
  FK_CHECK(acc::stream_normal(seed, off + 3, acc::subsequence(2, acc::kTagBonusNormal, 0)) ==
           acc::normal_from_words(v.x, v.y));
}

// Normal CDF for the KS statistic.
static double phi_cdf(double x) { return 0.5 * std::erfc(-x / std::sqrt(2.0)); }

// One sample of the per-element rule with D = 1, via the kernels' functions:
// draft x~ = mu_q + sigma_q xi, accepted with prob min(1, p/q), else the
// residual (p - q)_+ by rejection from p.  The emitted value must follow p.
static float emit_one(uint64_t seed, uint32_t trial, float mp, float lvp, float mq, float lvq, bool skip_residual) {
  const float xi = acc::stream_normal(seed, trial, acc::subsequence(0, 0, 1));
  const float u = acc::stream_uniform(seed, trial, acc::subsequence(0, 0, 2));
  const float lr = acc::log_ratio_term(mp, lvp, mq, lvq, xi);
  if (acc::accept_draft(u, lr, 1.0f) || skip_residual) return mq + std::exp(0.5f * lvq) * xi;
  for (uint32_t k = 0; k < 100000; ++k) {
    const float zs = acc::residual_normal(seed, trial, 0, k);
    float z = 0;
    const float lq_lp = acc::residual_term(zs, mp, lvp, mq, lvq, &z);
    const float ur = acc::stream_uniform(seed, 0, acc::subsequence(trial, acc::kTagResidualUniform, k));
    if (acc::residual_keep(ur, lq_lp)) return z;
  }
  return NAN;
}

static double ks_vs_normal(std::vector<double> xs, double mean, double sd) {
  std::sort(xs.begin(), xs.end());
  const double n = static_cast<double>(xs.size());
  double dmax = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const double f = phi_cdf((xs[i] - mean) / sd);
    dmax = std::max(dmax, std::max(f - i / n, (i + 1) / n - f));
  }
  return dmax;
}

// KS test at alpha = 1e-3 (critical value 1.9495 / sqrt(n)), fixed seed, and a
// negative control (keeping the draft instead of the residual) that must fail.
FK_TEST(rule_emits_p_unequal_variance) {
  const int n = 20000;
  const double crit = 1.9495 / std::sqrt(static_cast<double>(n));
  const float mp = 0.4f, lvp = std::log(0.8f * 0.8f), mq = -0.3f, lvq = std::log(1.4f * 1.4f);
  std::vector<double> good, bad;
  for (int t = 0; t < n; ++t) {
    good.push_back(emit_one(7, t, mp, lvp, mq, lvq, false));
    bad.push_back(emit_one(7, t, mp, lvp, mq, lvq, true));
  }
  const double d_good = ks_vs_normal(good, mp, 0.8);
  const double d_bad = ks_vs_normal(bad, mp, 0.8);
  std::printf("  KS D (exact rule) = %.4f, (skip residual) = %.4f, critical %.4f\n", d_good, d_bad, crit);
  FK_CHECK(d_good < crit);
  FK_CHECK(d_bad > crit);
}

int main() { return fk_test::run_all(); }

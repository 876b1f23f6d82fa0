// Host tests of numerics.h against high-precision references (mpmath, 40
// digits) and against long-double brute force for the accumulators.
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "fk_test.h"
#include "free_kernels/numerics.h"

namespace {
const double kInf = std::numeric_limits<double>::infinity();
const float kInfF = std::numeric_limits<float>::infinity();

struct Ref {
  double x, y;
};
}  // namespace

// log Phi(x) = mpmath.log(mpmath.ncdf(x)).
FK_TEST(log_ndtr_reference_values) {
  const Ref refs[] = {
      {-40.0, -804.60844201375378817}, {-20.0, -203.91715537109726394}, {-10.0, -53.231285150512470578},
      {-5.5, -17.779376352625260511},  {-5.0, -15.064998393988725736},  {-3.0, -6.6077262215103495433},
      {-1.0, -1.8410216450092635058},  {0.0, -0.69314718055994530942},  {0.5, -0.36894641528865639307},
      {1.0, -0.17275377902344988953},  {3.0, -0.0013508099647481937988}, {6.0, -9.8658764552437573169e-10},
      {10.0, -7.6198530241605260704e-24},
  };
  for (const Ref& r : refs) {
    FK_CHECK_REL(fk::log_ndtr<double>(r.x), r.y, 1e-14);
    FK_CHECK_REL(fk::log_ndtr<float>(static_cast<float>(r.x)), r.y, 2e-6);
  }
}

FK_TEST(log_ndtr_edges_and_continuity) {
  FK_CHECK(fk::log_ndtr<double>(-kInf) == -kInf);
  FK_CHECK(fk::log_ndtr<double>(kInf) == 0.0);
  FK_CHECK(fk::log_ndtr<float>(-kInfF) == -kInfF);
  FK_CHECK(std::isnan(fk::log_ndtr<double>(std::nan(""))));
  FK_CHECK(std::isnan(fk::log_ndtr<float>(std::nanf(""))));
  // No jump where the formula switches (x = -5 and x = 0).
  for (double x0 : {-5.0, 0.0}) {
    const double lo = fk::log_ndtr<double>(std::nextafter(x0, -kInf));
    const double hi = fk::log_ndtr<double>(x0);
    FK_CHECK_REL(lo, hi, 1e-13);
    const float lof = fk::log_ndtr<float>(std::nextafter(static_cast<float>(x0), -kInfF));
    const float hif = fk::log_ndtr<float>(static_cast<float>(x0));
    FK_CHECK_REL(lof, hif, 2e-6);
  }
  // Monotone increasing on a grid across every branch.
  double prev = -kInf;
  for (double x = -60.0; x <= 12.0; x += 0.01) {
    const double y = fk::log_ndtr<double>(x);
    FK_CHECK(y >= prev);
    prev = y;
  }
}

// log(1 - exp(x)) = mpmath.log(1 - mpmath.exp(x)).
FK_TEST(log1mexp_reference_values) {
  const Ref refs[] = {
      {-1e-20, -46.051701859880913735}, {-1e-8, -18.420680748952365447}, {-1e-3, -6.9082552373154707118},
      {-0.5, -0.93275212956718857189},  {-0.6931471805599453, -0.69314718055994533261},
      {-1.0, -0.45867514538708189102},  {-5.0, -0.0067607494494885578259},
      {-20.0, -2.0611536245627349585e-9}, {-50.0, -1.928749847963917783e-22},
  };
  for (const Ref& r : refs) {
    FK_CHECK_REL(fk::log1mexp<double>(r.x), r.y, 1e-14);
    FK_CHECK_REL(fk::log1mexp<float>(static_cast<float>(r.x)), r.y, 2e-6);
  }
  FK_CHECK(fk::log1mexp<double>(0.0) == -kInf);
  FK_CHECK(fk::log1mexp<double>(-kInf) == 0.0);
  FK_CHECK(std::isnan(fk::log1mexp<double>(0.5)));
}

FK_TEST(log_add_exp_values) {
  FK_CHECK_REL(fk::log_add_exp<double>(0.0, 0.0), std::log(2.0), 1e-15);
  FK_CHECK_REL(fk::log_add_exp<double>(1000.0, 1000.0), 1000.0 + std::log(2.0), 1e-15);
  FK_CHECK_REL(fk::log_add_exp<double>(-1000.0, -1001.0), -1000.0 + std::log1p(std::exp(-1.0)), 1e-15);
  FK_CHECK(fk::log_add_exp<double>(-kInf, -kInf) == -kInf);
  FK_CHECK(fk::log_add_exp<double>(-kInf, 3.0) == 3.0);
  FK_CHECK(fk::log_add_exp<double>(kInf, 3.0) == kInf);
  FK_CHECK(fk::log_add_exp<float>(-kInfF, -2.0f) == -2.0f);
}

// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in mpmath.
FK_TEST(gelu_tanh_reference_values) {
  const Ref refs[] = {
      {-6.0, -8.4396467007622970837e-11}, {-3.0, -0.0036373920817730188378}, {-1.0, -0.15880800939172329522},
      {-0.5, -0.15428599017485607796},    {0.0, 0.0},                        {0.1, 0.053982751045435167588},
      {0.5, 0.34571400982514392204},      {1.0, 0.84119199060827670478},     {2.0, 1.9545976940877750188},
      {3.0, 2.9963626079182269812},       {10.0, 10.0},
  };
  for (const Ref& r : refs) {
    // Absolute + relative: the far negative tail is a difference of nearly equal terms.
    FK_CHECK_NEAR(fk::gelu_tanh<double>(r.x), r.y, 1e-15 + 1e-13 * std::fabs(r.y));
    FK_CHECK_NEAR(fk::gelu_tanh<float>(static_cast<float>(r.x)), r.y, 1e-7 + 1e-6 * std::fabs(r.y));
  }
  // gelu(x) - gelu(-x) = x.
  for (double x = -8.0; x <= 8.0; x += 0.25) {
    FK_CHECK_NEAR(fk::gelu_tanh<double>(x) - fk::gelu_tanh<double>(-x), x, 1e-14 * (1.0 + std::fabs(x)));
  }
  FK_CHECK(fk::gelu_tanh<float>(1e30f) == 1e30f);
  FK_CHECK(fk::gelu_tanh<float>(-1e30f) == 0.0f);
}

// Deterministic pseudo-random floats in [0, 1) for the accumulator tests.
namespace {
struct Lcg {
  uint32_t state;
  float next() {
    state = state * 1664525u + 1013904223u;
    return static_cast<float>(state >> 8) * 5.9604645e-08f;
  }
};
}  // namespace

// fp32 sum of 2^20 values in [0, 1): the plain sum loses ~5 digits to
// rounding, the compensated sum is within a few ulp of the exact value, also
// when partial sums are merged as the threads of a block would.
FK_TEST(compensated_sum_fp32) {
  const int n = 1 << 20;
  Lcg rng{2024u};
  std::vector<float> xs(n);
  long double exact = 0;
  for (float& x : xs) {
    x = rng.next();
    exact += x;
  }
  fk::CompensatedSum<float> acc;
  float naive = 0.0f;
  for (float x : xs) {
    acc.add(x);
    naive += x;
  }
  const double ex = static_cast<double>(exact);
  FK_CHECK_REL(acc.value(), ex, 2.5e-7);
  FK_CHECK(std::fabs(naive - ex) / ex > 1e-6);  // the problem being solved is real
  fk::CompensatedSum<float> parts[8];
  for (int i = 0; i < n; ++i) parts[i % 8].add(xs[i]);
  for (int p = 1; p < 8; ++p) parts[0].merge(parts[p]);
  FK_CHECK_REL(parts[0].value(), ex, 2.5e-7);
}

// Welford in fp32 on a LayerNorm-like row with |mean| = 100 std, where the
// one-pass E[x^2] - E[x]^2 in fp32 loses most digits of the variance.
FK_TEST(welford_fp32_stability_and_merge) {
  const int n = 4096;
  Lcg rng{12345u};
  std::vector<float> xs(n);
  for (float& x : xs) x = 100.0f + (rng.next() - 0.5f) * 3.4641016f;  // std 1
  long double mean = 0, var = 0;
  for (float x : xs) mean += x;
  mean /= n;
  for (float x : xs) var += (x - mean) * (x - mean);
  var /= n;
  const double m = static_cast<double>(mean), v = static_cast<double>(var);

  fk::Welford<float> w;
  float s = 0.0f, s2 = 0.0f;
  for (float x : xs) {
    w.add(x);
    s += x;
    s2 += x * x;
  }
  FK_CHECK_REL(w.mean, m, 3e-6);
  FK_CHECK_REL(w.variance(), v, 1e-4);
  FK_CHECK_REL(w.sample_variance(), v * n / (n - 1), 1e-4);
  const float naive_var = s2 / n - (s / n) * (s / n);
  FK_CHECK(std::fabs(naive_var - v) / v > 1e-3);  // the naive formula is visibly worse

  // Tree merge of 32 strided partial states (a warp's shuffle reduction).
  fk::Welford<float> lanes[32];
  for (int i = 0; i < n; ++i) lanes[i % 32].add(xs[i]);
  for (int offset = 16; offset > 0; offset /= 2) {
    for (int l = 0; l < offset; ++l) lanes[l].merge(lanes[l + offset]);
  }
  FK_CHECK(lanes[0].count == static_cast<float>(n));
  FK_CHECK_REL(lanes[0].mean, m, 3e-6);
  FK_CHECK_REL(lanes[0].variance(), v, 1e-4);

  // Merging with an empty state is the identity.
  fk::Welford<float> empty;
  fk::Welford<float> copy = w;
  copy.merge(empty);
  FK_CHECK(copy.mean == w.mean && copy.m2 == w.m2);
  empty.merge(w);
  FK_CHECK(empty.mean == w.mean && empty.m2 == w.m2);
}

int main() { return fk_test::run_all(); }

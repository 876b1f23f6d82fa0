// Host tests of the Philox4x32-10 generator and the conversions in philox.h.
#include <cmath>
#include <cstdint>
#include <vector>

#include "fk_test.h"
#include "free_kernels/philox.h"

using fk::u32x4;

// Known-answer vectors published with Random123 (kat_vectors, "philox4x32 10"):
// counter (4 words), key (2 words) -> output (4 words).
FK_TEST(philox_known_answers) {
  struct Kat {
    u32x4 ctr;
    uint32_t k0, k1;
    u32x4 want;
  };
  const Kat kats[] = {
      {{0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u}, 0x00000000u, 0x00000000u,
       {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, 0xffffffffu, 0xffffffffu,
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, 0xa4093822u, 0x299f31d0u,
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& k : kats) {
    const u32x4 got = fk::philox4x32<10>(k.ctr, k.k0, k.k1);
    FK_CHECK_EQ_U32(got.x, k.want.x);
    FK_CHECK_EQ_U32(got.y, k.want.y);
    FK_CHECK_EQ_U32(got.z, k.want.z);
    FK_CHECK_EQ_U32(got.w, k.want.w);
  }
}

// (seed, offset, subsequence) -> counter/key layout documented in philox.h.
FK_TEST(philox_stream_layout) {
  const uint64_t seed = 0x0123456789abcdefull;
  const uint64_t offset = 0xfedcba9876543210ull;
  const uint64_t sub = 0x1122334455667788ull;
  const u32x4 a = fk::philox_randint4x(seed, offset, sub);
  const u32x4 b = fk::philox4x32<10>(u32x4{0x76543210u, 0xfedcba98u, 0x55667788u, 0x11223344u}, 0x89abcdefu,
                                     0x01234567u);
  FK_CHECK_EQ_U32(a.x, b.x);
  FK_CHECK_EQ_U32(a.y, b.y);
  FK_CHECK_EQ_U32(a.z, b.z);
  FK_CHECK_EQ_U32(a.w, b.w);
  // Default subsequence 0 is the Triton stream (counter words 2-3 zero).
  const u32x4 c = fk::philox_randint4x(seed, 5);
  const u32x4 d = fk::philox4x32<10>(u32x4{5u, 0u, 0u, 0u}, 0x89abcdefu, 0x01234567u);
  FK_CHECK_EQ_U32(c.x, d.x);
  FK_CHECK_EQ_U32(c.w, d.w);
  // Different subsequences, offsets and seeds give different words.
  FK_CHECK(fk::philox_randint4x(seed, 5, 1).x != c.x);
  FK_CHECK(fk::philox_randint4x(seed, 6).x != c.x);
  FK_CHECK(fk::philox_randint4x(seed + 1, 5).x != c.x);
}

FK_TEST(uniform_conversions_edges) {
  // Triton's mapping folds the int32 reinterpretation onto [0, 2^31).
  FK_CHECK(fk::uniform_triton(0x00000000u) == 0.0f);
  FK_CHECK(fk::uniform_triton(0xffffffffu) == 0.0f);  // int -1 -> 0
  // The largest value: float(INT32_MAX) = 2^31 times a scale just below 2^-31.
  const float top = fk::uniform_triton(0x7fffffffu);
  FK_CHECK(top < 1.0f);
  FK_CHECK(top == 1.0f - std::ldexp(1.0f, -24));
  FK_CHECK(fk::uniform_triton(0x80000000u) == top);  // INT_MIN folds onto INT_MAX
  FK_CHECK(fk::uniform_triton(0x00000001u) == 4.6566127342e-10f);
  // 24-bit conversions: exact grid, strict ends.
  FK_CHECK(fk::uniform_open_closed(0x00000000u) == std::ldexp(1.0f, -24));
  FK_CHECK(fk::uniform_open_closed(0xffffffffu) == 1.0f);
  FK_CHECK(fk::uniform_closed_open(0x00000000u) == 0.0f);
  FK_CHECK(fk::uniform_closed_open(0xffffffffu) == 1.0f - std::ldexp(1.0f, -24));
  FK_CHECK(fk::uniform_closed_open(0xffffffffu) < 1.0f);
}

FK_TEST(box_muller_edges) {
  // u1 = 0 is clamped to 1e-7: finite, radius sqrt(-2 ln 1e-7) ~ 5.677.
  const fk::f32x2 z = fk::box_muller(0.0f, 0.0f);
  FK_CHECK(std::isfinite(z.x) && std::isfinite(z.y));
  FK_CHECK_NEAR(z.x, std::sqrt(-2.0 * std::log(1e-7)), 1e-4);
  FK_CHECK_NEAR(z.y, 0.0, 1e-6);
  const fk::f32x2 one = fk::box_muller(1.0f, 0.25f);  // radius 0
  FK_CHECK(one.x == 0.0f || std::fabs(one.x) < 1e-6f);
}

struct Moments {
  double n = 0, mean = 0, m2 = 0, m3 = 0, m4 = 0;
  // Pébay's one-pass update of the first four central moments.
  void add(double x) {
    const double n1 = n;
    n += 1;
    const double delta = x - mean;
    const double dn = delta / n;
    const double dn2 = dn * dn;
    const double t1 = delta * dn * n1;
    mean += dn;
    m4 += t1 * dn2 * (n * n - 3 * n + 3) + 6 * dn2 * m2 - 4 * dn * m3;
    m3 += t1 * dn * (n - 2) - 3 * dn * m2;
    m2 += t1;
  }
  double var() const { return m2 / n; }
  double skew() const { return std::sqrt(n) * m3 / std::pow(m2, 1.5); }
  double excess_kurtosis() const { return n * m4 / (m2 * m2) - 3.0; }
};

// 5-sigma bounds on the sample moments of n standard normals: false alarm
// rate ~1e-6 per check with fixed seeds (so the result is deterministic anyway).
FK_TEST(normal_moments) {
  const int n = 1 << 20;
  Moments one, four;
  for (int i = 0; i < n; ++i) one.add(fk::philox_randn(42, static_cast<uint64_t>(i)));
  for (int i = 0; i < n / 4; ++i) {
    const fk::f32x4 z = fk::philox_randn4x(7, static_cast<uint64_t>(i), 3);
    four.add(z.x);
    four.add(z.y);
    four.add(z.z);
    four.add(z.w);
  }
  for (const Moments* m : {&one, &four}) {
    FK_CHECK_NEAR(m->mean, 0.0, 5.0 / std::sqrt(n));
    FK_CHECK_NEAR(m->var(), 1.0, 5.0 * std::sqrt(2.0 / n));
    FK_CHECK_NEAR(m->skew(), 0.0, 5.0 * std::sqrt(6.0 / n));
    FK_CHECK_NEAR(m->excess_kurtosis(), 0.0, 5.0 * std::sqrt(24.0 / n));
  }
}

// The two normals of one Box-Muller pair and neighbouring offsets are uncorrelated.
FK_TEST(normal_correlations) {
  const int n = 1 << 18;
  double s_pair = 0, s_next = 0;
  float prev = fk::philox_randn(1, 0);
  for (int i = 1; i <= n; ++i) {
    const fk::f32x4 z = fk::philox_randn4x(1, static_cast<uint64_t>(i));
    s_pair += static_cast<double>(z.x) * z.y;
    const float cur = fk::philox_randn(1, static_cast<uint64_t>(i));
    s_next += static_cast<double>(prev) * cur;
    prev = cur;
  }
  FK_CHECK_NEAR(s_pair / n, 0.0, 5.0 / std::sqrt(n));
  FK_CHECK_NEAR(s_next / n, 0.0, 5.0 / std::sqrt(n));
}

// Uniforms: mean 1/2, variance 1/12, and a 64-bin histogram within 5 sigma per bin.
FK_TEST(uniform_histogram) {
  const int n = 1 << 20;
  const int bins = 64;
  std::vector<int> hist(bins, 0);
  double sum = 0, sum2 = 0;
  for (int i = 0; i < n; ++i) {
    const float u = fk::philox_uniform(123, static_cast<uint64_t>(i));
    FK_CHECK(u >= 0.0f && u <= 1.0f);
    sum += u;
    sum2 += static_cast<double>(u) * u;
    int b = static_cast<int>(u * bins);
    hist[b < bins ? b : bins - 1]++;
  }
  const double mean = sum / n;
  FK_CHECK_NEAR(mean, 0.5, 5.0 * std::sqrt(1.0 / 12.0 / n));
  FK_CHECK_NEAR(sum2 / n - mean * mean, 1.0 / 12.0, 5.0 * std::sqrt(1.0 / 180.0 / n));
  const double expect = static_cast<double>(n) / bins;
  const double sd = std::sqrt(expect * (1.0 - 1.0 / bins));
  for (int b = 0; b < bins; ++b) FK_CHECK_NEAR(hist[b], expect, 5.0 * sd);
}

int main() { return fk_test::run_all(); }

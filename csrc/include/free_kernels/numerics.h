// Numerically careful scalar helpers shared by the kernels and tested on the host.
//
// Every function is a template over float / double and calls the C math
// library by its type-specific name (logf / log, ...), which nvcc maps to
// CUDA's device math library and g++ to glibc.  Do NOT compile users of this
// header with -ffast-math / --use_fast_math: the compensated sums below rely on
// the compiler not reassociating floating-point additions.
#pragma once

#include <math.h>

#include <cstdint>

#include "free_kernels/config.h"

namespace fk {

namespace math_detail {

// Overload set that dispatches to the float or double C function.
#define FK_MATH_UNARY(name)                                                \
  FK_HOST_DEVICE FK_INLINE float name(float x) { return ::name##f(x); }    \
  FK_HOST_DEVICE FK_INLINE double name(double x) { return ::name(x); }
FK_MATH_UNARY(exp)
FK_MATH_UNARY(expm1)
FK_MATH_UNARY(log)
FK_MATH_UNARY(log1p)
FK_MATH_UNARY(erfc)
FK_MATH_UNARY(tanh)
FK_MATH_UNARY(sqrt)
FK_MATH_UNARY(fabs)
#undef FK_MATH_UNARY

template <typename T>
FK_HOST_DEVICE constexpr T infinity() {
  return static_cast<T>(HUGE_VAL);
}

}  // namespace math_detail

namespace fm = math_detail;  // short qualifier: fm::log(x) picks logf or log

// ------------------------------------------------------------------ log Phi
// log of the standard normal CDF on the whole line: relative error ~1e-16 in
// fp64; in fp32 <= ~1.3e-7 * (1 + x^2) (for x >> 0 the rounding of x / sqrt 2
// is amplified by the condition number ~x^2 of log Phi; for x <= 0, ~1 ulp).
//
//   x > 0      : log1p(-Q(x)) with Q(x) = erfc(x / sqrt 2) / 2  (Phi ~ 1, so
//                log(Phi) ~ -Q must not be computed as log(1 - Q))
//   -5 <= x <= 0: log(erfc(-x / sqrt 2) / 2)
//   x < -5     : Phi(x) = phi(x) * m(-x) with the Mills ratio m(t) from its
//                Laplace continued fraction m(t) = 1/(t + 1/(t + 2/(t + ...))),
//                so log Phi = -x^2/2 - log(2 pi)/2 - log(t + 1/(t + 2/...)).
//                erfc would underflow (fp32 below x ~ -13) and the fraction
//                converges fast here (10 terms: ~1e-9 at t = 5; 24: 1e-16).
template <typename T>
FK_HOST_DEVICE FK_INLINE T log_ndtr(T x) {
  const T kInvSqrt2 = T(0.70710678118654752440);
  const T kHalfLog2Pi = T(0.91893853320467274178);
  if (x > T(0)) return fm::log1p(T(-0.5) * fm::erfc(x * kInvSqrt2));
  if (x >= T(-5)) return fm::log(T(0.5) * fm::erfc(-x * kInvSqrt2));
  if (!(x == x)) return x;  // NaN (fails every comparison above)
  const T t = -x;
  constexpr int kTerms = sizeof(T) == 4 ? 10 : 24;
  T f = t;
  FK_UNROLL
  for (int k = kTerms; k >= 1; --k) f = t + T(k) / f;
  return T(-0.5) * x * x - kHalfLog2Pi - fm::log(f);
}

// ------------------------------------------------------------------ log1mexp
// log(1 - exp(x)) for x <= 0, i.e. log(1 - p) given log p (Maechler 2012):
// use expm1 near 0 (where 1 - exp(x) cancels) and log1p far from 0.
// log1mexp(0) = -inf; x > 0 gives NaN.
template <typename T>
FK_HOST_DEVICE FK_INLINE T log1mexp(T x) {
  const T kMinusLn2 = T(-0.69314718055994530942);
  return x > kMinusLn2 ? fm::log(-fm::expm1(x)) : fm::log1p(-fm::exp(x));
}

// log(exp(a) + exp(b)) without overflow; -inf inputs are handled.
template <typename T>
FK_HOST_DEVICE FK_INLINE T log_add_exp(T a, T b) {
  const T hi = a > b ? a : b;
  const T lo = a > b ? b : a;
  if (hi == -fm::infinity<T>()) return hi;  // both -inf
  if (hi == fm::infinity<T>()) return hi;
  return hi + fm::log1p(fm::exp(lo - hi));
}

// ------------------------------------------------------------------ gelu
// GELU with the tanh approximation, as torch.nn.functional.gelu(approximate="tanh")
// and the DiT MLP: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
template <typename T>
FK_HOST_DEVICE FK_INLINE T gelu_tanh(T x) {
  const T kSqrt2OverPi = T(0.79788456080286535588);
  const T kCoeff = T(0.044715);
  const T inner = kSqrt2OverPi * (x + kCoeff * x * x * x);
  return T(0.5) * x * (T(1) + fm::tanh(inner));
}

// ------------------------------------------------------------------ accumulation
// Neumaier (improved Kahan) compensated sum: error O(eps) independent of the
// number of terms, for fp32 reductions such as squared distances over a
// latent (4096+ terms) where a plain fp32 sum loses ~3 digits.
template <typename T>
struct CompensatedSum {
  T sum = T(0);
  T comp = T(0);  // running compensation (the low-order bits lost so far)

  FK_HOST_DEVICE FK_INLINE void add(T x) {
    const T t = sum + x;
    if (fm::fabs(sum) >= fm::fabs(x)) {
      comp += (sum - t) + x;
    } else {
      comp += (x - t) + sum;
    }
    sum = t;
  }

  // Combine with a partial sum from another thread / block.
  FK_HOST_DEVICE FK_INLINE void merge(const CompensatedSum& o) {
    add(o.sum);
    comp += o.comp;
  }

  FK_HOST_DEVICE FK_INLINE T value() const { return sum + comp; }
};

// Welford's running mean / variance with Chan et al.'s parallel merge, the
// stable way to get LayerNorm statistics in one pass (no E[x^2] - E[x]^2
// cancellation when |mean| >> std).  `count` is kept in T so that a merge is
// pure arithmetic (exact in fp32 up to 2^24 elements, ample for a row).
template <typename T>
struct Welford {
  T count = T(0);
  T mean = T(0);
  T m2 = T(0);  // sum of squared deviations from the mean

  FK_HOST_DEVICE FK_INLINE void add(T x) {
    count += T(1);
    const T delta = x - mean;
    mean += delta / count;
    m2 += delta * (x - mean);
  }

  FK_HOST_DEVICE FK_INLINE void merge(const Welford& o) {
    if (o.count == T(0)) return;
    if (count == T(0)) {
      *this = o;
      return;
    }
    const T n = count + o.count;
    const T delta = o.mean - mean;
    const T w = o.count / n;
    mean += delta * w;
    m2 += o.m2 + delta * delta * count * w;
    count = n;
  }

  // Population variance (divide by n), as LayerNorm uses.
  FK_HOST_DEVICE FK_INLINE T variance() const { return count > T(0) ? m2 / count : T(0); }
  // Sample variance (divide by n - 1).
  FK_HOST_DEVICE FK_INLINE T sample_variance() const { return count > T(1) ? m2 / (count - T(1)) : T(0); }
};

}  // namespace fk

// Scalar math of FREE's exact acceptance / residual resampling (speculative_accept).
//
// Shared by csrc/kernels/speculative_accept.cu and checked on the host by
// csrc/tests/test_accept_math.cpp; free_kernels/triton/speculative_accept.py
// spells out the very same formulas in Triton (keep the two in step).  The
// rule itself, shapes and semantics: free_kernels/reference/speculative_accept.py.
//
// Element terms (per element i of the D = C*H*W latent; sums over i are the
// log densities the rule compares):
//
//   equal variance (sigma_q = sigma_p = sigma), d = (mu_p - mu_q) / sigma:
//       log p(x~) - log q(x~) = <d, xi> - |d|^2 / 2        (two sums: dot, nrm)
//   general diagonal Gaussians, x~ = mu_q + sigma_q xi, z_p = (x~ - mu_p) / sigma_p:
//       log p(x~) - log q(x~) = sum 0.5 (xi - z_p)(xi + z_p) + 0.5 (lv_q - lv_p)
//   residual candidate z = mu_p + sigma_p zs (zs standard normal), z_q = (z - mu_q) / sigma_q:
//       log q(z) - log p(z)   = sum 0.5 (zs - z_q)(zs + z_q) + 0.5 (lv_p - lv_q)
//
// (a^2 - b^2 is formed as (a - b)(a + b): when q is close to p the two squares
// nearly cancel and the product form keeps the relative precision.)
//
// Random streams.  The kernels read rng_state = [seed, offset] (int64) and
// draw every number as Philox4x32-10 (philox.h) of
//     counter = (lo32(offset + i), hi32(offset + i), candidate, (sample << 2) | tag)
//     key     = (lo32(seed), hi32(seed))
// i.e. philox_randint4x(seed, offset + i, subsequence(sample, tag, candidate)):
//   tag 0  acceptance uniform of draft slot j         : i = j,  candidate field 0
//   tag 1  bonus-step normal of element i             : i,      candidate field 0
//   tag 2  residual candidates 2m and 2m + 1, element i: i,     candidate field m
//          (the two normals of one Box-Muller pair: r cos for 2m, r sin for 2m + 1)
//   tag 3  residual candidate k, its uniform          : i = 0,  candidate field k
// so one call uses offsets [offset, offset + max(D, L)) of every stream, and
// the kernel advances rng_state[1] by that much on the device (CUDA-graph
// replays then draw fresh numbers).  Samples are limited to 2^30.
//
//   uniform_open(w)       : ((w >> 8) + 1/2) 2^-24, strictly inside (0, 1),
//                           exactly representable (safe inside log()).
//   normal_pair_from_words(w0, w1): Box-Muller (r cos(theta), r sin(theta)) with
//                           u1 = w0 2^-32 + 2^-33 in (0, 1] (32 random bits:
//                           tails reach 6.8 sigma, where Triton's tl.randn stops
//                           at 5.7 sigma: 1e-11 instead of 1e-8 of the mass cut
//                           per element) and theta = 2 pi w1 2^-32;
//   normal_from_words(w0, w1): its first member (bonus noise).
#pragma once

#include <math.h>

#include <cstdint>

#include "free_kernels/common.h"

namespace fk {
namespace accept {

// ------------------------------------------------------------------ random streams
enum StreamTag : uint32_t {
  kTagAcceptUniform = 0,
  kTagBonusNormal = 1,
  kTagResidualNormal = 2,
  kTagResidualUniform = 3,
};

FK_HOST_DEVICE FK_INLINE uint64_t subsequence(uint32_t sample, uint32_t tag, uint32_t candidate) {
  return static_cast<uint64_t>(candidate) | (static_cast<uint64_t>((sample << 2) | (tag & 3u)) << 32);
}

// How far one call advances rng_state[1]: the largest per-stream offset used.
FK_HOST_DEVICE FK_INLINE int64_t rng_advance(int64_t L, int64_t D) {
  const int64_t m = L > D ? L : D;
  return m > 1 ? m : 1;
}

FK_HOST_DEVICE FK_INLINE float uniform_open(uint32_t w) {
  return (static_cast<float>(w >> 8) + 0.5f) * 5.9604644775390625e-08f;  // 2^-24
}

FK_HOST_DEVICE FK_INLINE f32x2 normal_pair_from_words(uint32_t w0, uint32_t w1) {
  const float u1 = static_cast<float>(w0) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;  // 2^-32, 2^-33
  const float theta = 6.283185307179586f * (static_cast<float>(w1) * 2.3283064365386963e-10f);
  const float r = sqrtf(-2.0f * logf(u1));
  return f32x2{r * cosf(theta), r * sinf(theta)};
}

FK_HOST_DEVICE FK_INLINE float normal_from_words(uint32_t w0, uint32_t w1) {
  return normal_pair_from_words(w0, w1).x;
}

FK_HOST_DEVICE FK_INLINE float stream_uniform(uint64_t seed, uint64_t offset, uint64_t sub) {
  return uniform_open(philox_randint4x(seed, offset, sub).x);
}

FK_HOST_DEVICE FK_INLINE float stream_normal(uint64_t seed, uint64_t offset, uint64_t sub) {
  const u32x4 w = philox_randint4x(seed, offset, sub);
  return normal_from_words(w.x, w.y);
}

// Normal of residual candidate k at element i (stream tag 2, pairs of candidates).
FK_HOST_DEVICE FK_INLINE float residual_normal(uint64_t seed, uint64_t offset_i, uint32_t sample, uint32_t k) {
  const u32x4 w = philox_randint4x(seed, offset_i, subsequence(sample, kTagResidualNormal, k >> 1));
  const f32x2 z = normal_pair_from_words(w.x, w.y);
  return (k & 1u) ? z.y : z.x;
}

// ------------------------------------------------------------------ element terms
// Whitened mean difference d = (mu_p - mu_q) / sigma_p of the equal-variance rule.
template <typename T>
FK_HOST_DEVICE FK_INLINE T whitened_diff(T mp, T mq, T lvp) {
  return (mp - mq) * fm::exp(T(-0.5) * lvp);
}

// One element of log p(x~) - log q(x~) at the draft x~ = mu_q + sigma_q xi.
template <typename T>
FK_HOST_DEVICE FK_INLINE T log_ratio_term(T mp, T lvp, T mq, T lvq, T xi) {
  const T x = mq + fm::exp(T(0.5) * lvq) * xi;
  const T zp = (x - mp) * fm::exp(T(-0.5) * lvp);
  return T(0.5) * (xi - zp) * (xi + zp) + T(0.5) * (lvq - lvp);
}

// One element of log q(z) - log p(z) at the candidate z = mu_p + sigma_p zs;
// *z receives the candidate.
template <typename T>
FK_HOST_DEVICE FK_INLINE T residual_term(T zs, T mp, T lvp, T mq, T lvq, T* z) {
  const T zz = mp + fm::exp(T(0.5) * lvp) * zs;
  const T zq = (zz - mq) * fm::exp(T(-0.5) * lvq);
  *z = zz;
  return T(0.5) * (zs - zq) * (zs + zq) + T(0.5) * (lvp - lvq);
}

// ------------------------------------------------------------------ decisions
// Accept the draft iff log u < log_ratio / tau (tau = 1: exact rule; relax:
// tau >= 1).  NaN anywhere never accepts (every comparison with NaN is false).
template <typename T>
FK_HOST_DEVICE FK_INLINE bool accept_draft(T u, T log_ratio, T tau) {
  return fm::log(u) < log_ratio / tau;
}

// 1 - q(z)/p(z) from lq_lp = log q(z) - log p(z) <= 0, without cancellation.
template <typename T>
FK_HOST_DEVICE FK_INLINE T residual_keep_prob(T lq_lp) {
  return -fm::expm1(lq_lp);
}

// Keep the residual candidate with probability max(0, 1 - q/p); NaN never keeps.
template <typename T>
FK_HOST_DEVICE FK_INLINE bool residual_keep(T u, T lq_lp) {
  return lq_lp < T(0) && u < residual_keep_prob(lq_lp);
}

// Reflection x = mu_p + sigma (xi - 2 <e, xi> e), e = d / |d|, written as
// mu_p + sigma (xi - coef d) with coef = 2 <d, xi> / |d|^2 (0 when d = 0: then
// every draft is accepted almost surely and the "reflection" is the draft).
// A NaN sum gives a NaN coefficient, so a NaN anywhere in the rejected slot
// turns the whole residual row NaN (never a plausible-looking output).
template <typename T>
FK_HOST_DEVICE FK_INLINE T reflection_coef(T dot, T nrm) {
  if (nrm > T(0)) return T(2) * dot / nrm;
  return nrm == T(0) ? T(0) * dot : nrm;  // 0 (NaN if dot is NaN), or the NaN of nrm
}

template <typename T>
FK_HOST_DEVICE FK_INLINE T reflect(T mp, T lvp, T xi, T d, T coef) {
  return mp + fm::exp(T(0.5) * lvp) * (xi - coef * d);
}

// Bonus step from p: mu_p + sigma_p noise, or the mean alone when the
// transition is the deterministic last one (noise masked, never multiplied).
template <typename T>
FK_HOST_DEVICE FK_INLINE T bonus_value(T mp, T lvp, T noise, bool deterministic) {
  return deterministic ? mp : mp + fm::exp(T(0.5) * lvp) * noise;
}

}  // namespace accept
}  // namespace fk

// Counter-based random numbers: Philox4x32-10 and the conversions built on it.
//
// Why counter-based: a kernel thread can compute the k-th random number of a
// stream directly from (seed, offset + k) without any state, so results do not
// depend on the launch geometry, and the CUDA kernels, the Triton kernels and
// the host (tests, `_C.philox_normal`) all produce the same stream.
//
// Conventions (chosen to coincide with `triton.language.random`, so that the
// `cuda` and `triton` backends of an op draw the *same* numbers for the same
// seed and offset):
//
//   counter = (lo32(offset), hi32(offset), lo32(subsequence), hi32(subsequence))
//   key     = (lo32(seed),   hi32(seed))
//
//   With subsequence == 0 this is exactly `tl.randint4x(seed, offset)` for an
//   int64 offset (and for an int32 offset below 2**31).  `subsequence` gives
//   2**64 independent streams per seed without offset arithmetic; in Triton it
//   is `tl.philox(seed, off_lo, off_hi, sub_lo, sub_hi)`.
//
//   uniform_triton(u)  -> float in [0, 1) : `tl.rand` / `uint_to_uniform_float`
//                         (the int32 reinterpretation folded onto [0, 2**31),
//                         times a scale just below 2**-31 so that the largest
//                         value is 1 - 2**-24; 0 is possible).
//   uniform_open_closed(u) -> float in (0, 1]: top 24 bits, (k + 1) * 2**-24.
//                         Exact, never 0: safe inside log().
//   uniform_closed_open(u) -> float in [0, 1): top 24 bits, k * 2**-24.
//                         Exact, never 1: safe for index = floor(u * n).
//
//   randn(seed, offset, sub)   -> the first output of Box-Muller applied to the
//                         first two uniform_triton words: `tl.randn`.
//   randn4x(seed, offset, sub) -> four normals from one counter: `tl.randn4x`.
//
//   The k-th normal of stream (seed, offset) is randn(seed, offset + k).
//
// fp32 transcendental functions differ in the last ulps between glibc, CUDA's
// libdevice and Triton's approximate PTX instructions, so normals agree across
// backends to ~1e-6 relative, not bitwise; the integer outputs agree exactly.
#pragma once

#include <math.h>

#include <cstdint>

#include "free_kernels/config.h"

namespace fk {

struct u32x4 {
  uint32_t x, y, z, w;
};

struct f32x2 {
  float x, y;
};

struct f32x4 {
  float x, y, z, w;
};

namespace philox_detail {

// Philox4x32 multipliers and Weyl key increments (Salmon et al., SC'11).
constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;

FK_HOST_DEVICE FK_INLINE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if FK_DEVICE_PASS
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
#endif
}

}  // namespace philox_detail

// The raw bijection: `Rounds` Philox rounds of `ctr` under key (k0, k1).
// Round i uses key + i * (kWeyl0, kWeyl1).
template <int Rounds = 10>
FK_HOST_DEVICE FK_INLINE u32x4 philox4x32(u32x4 ctr, uint32_t k0, uint32_t k1) {
  using namespace philox_detail;
  FK_UNROLL
  for (int r = 0; r < Rounds; ++r) {
    const uint32_t hi0 = mulhi32(kMul0, ctr.x);
    const uint32_t lo0 = kMul0 * ctr.x;
    const uint32_t hi1 = mulhi32(kMul1, ctr.z);
    const uint32_t lo1 = kMul1 * ctr.z;
    ctr = u32x4{hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return ctr;
}

// Four random words of stream (seed, subsequence) at position `offset`.
FK_HOST_DEVICE FK_INLINE u32x4 philox_randint4x(uint64_t seed, uint64_t offset, uint64_t subsequence = 0) {
  const u32x4 ctr{static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                  static_cast<uint32_t>(subsequence), static_cast<uint32_t>(subsequence >> 32)};
  return philox4x32<10>(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// ---------------------------------------------------------------- uniforms
// Triton's mapping (see the file comment).  `~i` is `-i - 1` without the
// signed-overflow trap at INT32_MIN.
FK_HOST_DEVICE FK_INLINE float uniform_triton(uint32_t u) {
  int32_t i = static_cast<int32_t>(u);
  i = i < 0 ? ~i : i;
  return static_cast<float>(i) * 4.6566127342e-10f;
}

FK_HOST_DEVICE FK_INLINE float uniform_open_closed(uint32_t u) {
  return static_cast<float>((u >> 8) + 1u) * 5.9604644775390625e-08f;  // 2**-24
}

FK_HOST_DEVICE FK_INLINE float uniform_closed_open(uint32_t u) {
  return static_cast<float>(u >> 8) * 5.9604644775390625e-08f;
}

// ---------------------------------------------------------------- normals
// Box-Muller in fp32 exactly as Triton's `pair_uniform_to_normal`: u1 is
// clamped to 1e-7 (so |z| <= 5.68), angle 2*pi*u2, returns (r cos, r sin).
FK_HOST_DEVICE FK_INLINE f32x2 box_muller(float u1, float u2) {
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float theta = 6.283185307179586f * u2;
  const float r = sqrtf(-2.0f * logf(u1));
  return f32x2{r * cosf(theta), r * sinf(theta)};
}

FK_HOST_DEVICE FK_INLINE float philox_uniform(uint64_t seed, uint64_t offset, uint64_t subsequence = 0) {
  return uniform_triton(philox_randint4x(seed, offset, subsequence).x);
}

FK_HOST_DEVICE FK_INLINE f32x4 philox_uniform4x(uint64_t seed, uint64_t offset, uint64_t subsequence = 0) {
  const u32x4 r = philox_randint4x(seed, offset, subsequence);
  return f32x4{uniform_triton(r.x), uniform_triton(r.y), uniform_triton(r.z), uniform_triton(r.w)};
}

FK_HOST_DEVICE FK_INLINE float philox_randn(uint64_t seed, uint64_t offset, uint64_t subsequence = 0) {
  const u32x4 r = philox_randint4x(seed, offset, subsequence);
  return box_muller(uniform_triton(r.x), uniform_triton(r.y)).x;
}

FK_HOST_DEVICE FK_INLINE f32x4 philox_randn4x(uint64_t seed, uint64_t offset, uint64_t subsequence = 0) {
  const f32x4 u = philox_uniform4x(seed, offset, subsequence);
  const f32x2 a = box_muller(u.x, u.y);
  const f32x2 b = box_muller(u.z, u.w);
  return f32x4{a.x, a.y, b.x, b.y};
}

}  // namespace fk

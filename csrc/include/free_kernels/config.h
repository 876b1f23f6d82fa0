// Compiler portability macros shared by every header under csrc/include/free_kernels/.
//
// Everything in these headers must compile in three settings:
//   * nvcc, device pass  (__CUDACC__ and __CUDA_ARCH__ defined)
//   * nvcc, host pass    (__CUDACC__ defined, __CUDA_ARCH__ not)
//   * plain g++/clang++  (neither defined): the ctest host tests and the
//     host-side helpers of the pybind11 module.
// No torch, no CUDA runtime headers here.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FK_HOST_DEVICE __host__ __device__
#define FK_INLINE __forceinline__
#else
#define FK_HOST_DEVICE
#define FK_INLINE inline __attribute__((always_inline))
#endif

// True only while nvcc compiles device code.
#if defined(__CUDA_ARCH__)
#define FK_DEVICE_PASS 1
#else
#define FK_DEVICE_PASS 0
#endif

// Full unrolling of short fixed-trip loops (Philox rounds, series terms).
// `#pragma unroll` in nvcc's device pass and clang; `GCC unroll` for g++.  In
// nvcc's host pass nothing: its front end rejects GCC pragmas there, and the
// host copies of these loops are not hot.
#if FK_DEVICE_PASS || (defined(__clang__) && !defined(__CUDACC__))
#define FK_UNROLL _Pragma("unroll")
#elif defined(__GNUC__) && !defined(__CUDACC__)
#define FK_UNROLL _Pragma("GCC unroll 16")
#else
#define FK_UNROLL
#endif

namespace fk {

// Ceil division for launch geometry (a, b > 0).
template <typename T>
FK_HOST_DEVICE constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

}  // namespace fk

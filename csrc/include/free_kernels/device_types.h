// The kernels' element types on the device (.cu files only): float32, __half
// and __nv_bfloat16 (fk::DType 0 / 1 / 2, dtype.h).
//
//   to_f32(v) / from_f32<T>(f)   fp32 <-> element type (round to nearest even)
//   load_any(p, code, i)         element i of a buffer whose type is a run-time code
//   Pack<T, kVec>                kVec elements in one 16-byte register pack
//   load_vec / store_vec         kVec consecutive elements <-> fp32 registers
//                                (kVec > 1: one 16-byte load / store)
//   warp_sum(v)                  sum over the 32 lanes of a warp (all lanes get it)
//   Mma<T>::run(c, a, b0, b1)    mma.sync m16n8k16, fp16 / bf16 operands, fp32 accumulators
//
// Arithmetic in the kernels is fp32; element types are only loaded and stored.
// Includes the CUDA half-type headers, so it is for csrc/kernels/*.cu only (the
// pybind11 module and the host tests never include it).  Under the host
// emulation of tests/cuda_emulation/ (fk_cuda_emu.h) the same definitions
// compile with g++; the tests replace Mma<T>::run calls with a software mma.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fk {

// ------------------------------------------------------------ conversions
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// element i of a float32 (0) / float16 (1) / bfloat16 (2) buffer
__device__ __forceinline__ float load_any(const void* p, int code, int64_t i) {
  if (code == 0) return static_cast<const float*>(p)[i];
  if (code == 1) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

// ------------------------------------------------------------ 16-byte vectors
// kVec elements in one 16-byte aligned register pack (a struct, not a union: the
// compiler keeps its members in registers and emits one 128-bit load / store)
template <typename T, int kVec>
struct alignas(16) Pack {
  T e[kVec];
};

// kVec consecutive elements starting at p (kVec > 1: one 16-byte load, p aligned)
template <typename T, int kVec>
__device__ __forceinline__ void load_vec(const T* p, float (&d)[kVec]) {
  if constexpr (kVec == 1) {
    d[0] = to_f32(p[0]);
  } else {
    static_assert(kVec * sizeof(T) == 16, "vector loads are 16 bytes");
    const Pack<T, kVec> v = *reinterpret_cast<const Pack<T, kVec>*>(p);
#pragma unroll
    for (int k = 0; k < kVec; ++k) d[k] = to_f32(v.e[k]);
  }
}

template <typename T, int kVec>
__device__ __forceinline__ void store_vec(T* p, const float (&s)[kVec]) {
  if constexpr (kVec == 1) {
    p[0] = from_f32<T>(s[0]);
  } else {
    static_assert(kVec * sizeof(T) == 16, "vector stores are 16 bytes");
    Pack<T, kVec> v;
#pragma unroll
    for (int k = 0; k < kVec; ++k) v.e[k] = from_f32<T>(s[k]);
    *reinterpret_cast<Pack<T, kVec>*>(p) = v;
  }
}

// ------------------------------------------------------------ warp reductions
// butterfly: every lane ends with the same sum, in the same order on every lane
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ------------------------------------------------------------ tensor cores
// D = A B + C for one m16n8k16 tile (A row-major, B "col": k contiguous), fp32
// accumulators in place; fragments in the PTX ISA layout (lane = 4 g + t: A rows
// g, g + 8 x k 2t, 2t + 1, 2t + 8, 2t + 9; B k 2t, 2t + 1, 2t + 8, 2t + 9 of
// column g; C rows g, g + 8 x columns 2t, 2t + 1).  Needs sm_80+.
template <typename T>
struct Mma;
template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

}  // namespace fk

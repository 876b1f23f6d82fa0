// Argument checks shared by the entry points of the elementwise-family kernels
// (modulated_layernorm.cu, gated_residual.cu, bias_gelu.cu): sizes, strides,
// dtype code, pointers.  A bad argument throws std::invalid_argument("<op>: ..."),
// which pybind11 turns into a Python ValueError.
//
// Host code only; no CUDA or torch headers (compiles under nvcc and g++).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

#include "free_kernels/dtype.h"

namespace fk {

[[noreturn]] inline void bad_argument(const char* fn, const std::string& what) {
  throw std::invalid_argument(std::string(fn) + ": " + what);
}

// (B, N, K) rows of K elements, n_strides element strides (all >= 0), one dtype code.
inline void check_rows_args(const char* fn, int64_t B, int64_t N, int64_t K, const std::vector<int64_t>& strides,
                            size_t n_strides, int64_t dtype_code) {
  if (B < 0 || N < 0 || K < 0) bad_argument(fn, "sizes must be >= 0");
  if (N > INT32_MAX || K > INT32_MAX) bad_argument(fn, "N and the row length must be < 2^31");
  if (strides.size() != n_strides) bad_argument(fn, "expected " + std::to_string(n_strides) + " strides");
  for (int64_t s : strides)
    if (s < 0) bad_argument(fn, "strides must be >= 0");
  if (!valid_dtype_code(dtype_code))
    bad_argument(fn, "dtype_code must be 0 (float32), 1 (float16) or 2 (bfloat16) (fk::DType)");
}

// Every pointer non-null and aligned to the element size of dtype_code.
inline void check_element_ptrs(const char* fn, std::initializer_list<uintptr_t> ptrs, int64_t dtype_code) {
  const uintptr_t align = static_cast<uintptr_t>(dtype_size(static_cast<DType>(dtype_code)));
  for (uintptr_t p : ptrs) {
    if (p == 0) bad_argument(fn, "null pointer");
    if (p % align) bad_argument(fn, "pointer not aligned to its element size");
  }
}

// 16-byte vector loads / stores need 16-byte aligned addresses.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace fk

// The one element-type code of the pybind ABI (Python mirror: free_kernels/ops/_abi.py DType).
//
// Every entry point that takes a `dtype_code` (or `dtype_codes`) uses these
// values; tests/test_library_ops.py checks that Python and C++ agree (from the
// extension's `dtype_codes()` and from this header's text).
#pragma once

#include <cstdint>

namespace fk {

enum class DType : int64_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

constexpr int64_t kNumDTypes = 3;

constexpr bool valid_dtype_code(int64_t code) { return code >= 0 && code < kNumDTypes; }

constexpr int64_t dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

}  // namespace fk

// Error checking for CUDA runtime calls and kernel launches (.cu files only).
//
// Every CUDA runtime call in csrc/kernels goes through FK_CUDA_CHECK, and
// every launch is followed by FK_CUDA_CHECK_LAUNCH().  Failures become
// std::runtime_error, which pybind11 turns into a Python RuntimeError.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace fk {

namespace cuda_detail {

inline const char* basename(const char* path) {
  const char* base = path;
  for (const char* p = path; *p; ++p) {
    if (*p == '/' || *p == '\\') base = p + 1;
  }
  return base;
}

}  // namespace cuda_detail

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
  std::string msg = "free_kernels._C: CUDA error ";
  msg += cudaGetErrorName(err);
  msg += " (";
  msg += cudaGetErrorString(err);
  msg += ") from `";
  msg += what;
  msg += "` at ";
  msg += cuda_detail::basename(file);
  msg += ":";
  msg += std::to_string(line);
  throw std::runtime_error(msg);
}

}  // namespace fk

#define FK_CUDA_CHECK(expr)                                              \
  do {                                                                   \
    const cudaError_t fk_err_ = (expr);                                  \
    if (fk_err_ != cudaSuccess) {                                        \
      ::fk::throw_cuda_error(fk_err_, #expr, __FILE__, __LINE__);        \
    }                                                                    \
  } while (0)

// After `kernel<<<...>>>(...)`: reports bad launch configurations and errors
// already pending on the device.  Asynchronous faults inside the kernel show
// up at the next synchronizing call (run with CUDA_LAUNCH_BLOCKING=1 to pin
// them to their launch).
#define FK_CUDA_CHECK_LAUNCH() FK_CUDA_CHECK(cudaGetLastError())

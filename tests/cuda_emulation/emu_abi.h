// C ABI helpers of the <op>_emu.cpp wrappers (host emulation, see fk_cuda_emu.h):
// an entry point returns 0, or 1 (std::invalid_argument: Python ValueError) /
// 2 (any other exception: RuntimeError) with the message in err[0 .. n_err).
#pragma once

#include <cstdint>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

inline int fk_emu_fail(const std::exception& e, char* err, int n_err, int code) {
  std::strncpy(err, e.what(), static_cast<size_t>(n_err) - 1);
  err[n_err - 1] = 0;
  return code;
}

// body runs inside a function with parameters `char* err, int n_err`
#define FK_EMU_TRY(body)                                                           \
  try {                                                                            \
    body;                                                                          \
    return 0;                                                                      \
  } catch (const std::invalid_argument& e) {                                       \
    return fk_emu_fail(e, err, n_err, 1);                                          \
  } catch (const std::exception& e) {                                              \
    return fk_emu_fail(e, err, n_err, 2);                                          \
  }

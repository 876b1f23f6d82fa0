// C ABI around csrc/kernels/speculative_accept.cu built under the host
// emulation (fk_cuda_emu.h), for ctypes (tests/cuda_emulation/harness.py).
// harness.py generates this translation unit's companion
// `speculative_accept_emu.cu.inc` (the .cu with its launches rewritten) and
// compiles both together.
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "speculative_accept_emu.cu.inc"

extern "C" {

int64_t emu_speculative_accept_workspace_bytes(int64_t B, int64_t L, int64_t D) {
  return fk::speculative_accept_workspace_bytes(B, L, D);
}

// Same arguments as _C.speculative_accept, strides as a pointer to 17 int64;
// returns 0, or 1 / 2 with the message in err (1: invalid argument, 2: other).
int emu_speculative_accept(uint64_t mean_p, uint64_t logvar_p, uint64_t mean_q, uint64_t logvar_q, uint64_t noise_q,
                           const int64_t* strides, uint64_t num_drafts, uint64_t deterministic_last,
                           uint64_t uniforms, uint64_t tau, uint64_t bonus_noise, uint64_t residual_noise,
                           uint64_t residual_uniforms, int64_t num_given, uint64_t rng_state, uint64_t workspace,
                           int64_t workspace_bytes, uint64_t out, uint64_t num_accepted, uint64_t log_ratio,
                           uint64_t residual_candidates, uint64_t fallbacks, int64_t B, int64_t L, int64_t D,
                           int dtype, int equal_variance, int64_t max_candidates, char* err, int err_len) {
  try {
    fk::speculative_accept(mean_p, logvar_p, mean_q, logvar_q, noise_q, std::vector<int64_t>(strides, strides + 17),
                           num_drafts, deterministic_last, uniforms, tau, bonus_noise, residual_noise,
                           residual_uniforms, num_given, rng_state, workspace, workspace_bytes, out, num_accepted,
                           log_ratio, residual_candidates, fallbacks, B, L, D, dtype, equal_variance != 0,
                           max_candidates, 0);
    return 0;
  } catch (const std::invalid_argument& e) {
    std::strncpy(err, e.what(), static_cast<size_t>(err_len) - 1);
    return 1;
  } catch (const std::exception& e) {
    std::strncpy(err, e.what(), static_cast<size_t>(err_len) - 1);
    return 2;
  }
}

}  // extern "C"

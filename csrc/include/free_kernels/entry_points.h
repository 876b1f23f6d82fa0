// Declarations of the CUDA entry points bound in csrc/bindings.cpp.
//
// This header is torch-free AND CUDA-free (plain integer types only), so the
// pybind11 module compiles with the host compiler alone.  The definitions
// live in csrc/kernels/*.cu and exist only in CUDA builds (FK_WITH_CUDA=1).
//
// Conventions for kernel entry points:
//   * device pointers arrive as uintptr_t (Python: `tensor.data_ptr()`),
//   * the stream as uintptr_t (Python: `torch.cuda.current_stream().cuda_stream`,
//     0 = legacy default stream),
//   * launches go to the calling thread's current CUDA device: the Python
//     wrapper makes the tensors' device current (`torch.cuda.device(t.device)`),
//   * each entry point calls check_cuda_available() first, validates its
//     arguments (std::invalid_argument -> ValueError) and checks the launch
//     (std::runtime_error -> RuntimeError).
//
// Adding an op: write csrc/kernels/<op>.cu, declare its entry point here and
// add one FK_DEF_CUDA line in bindings.cpp.  CMake globs csrc/kernels/*.cu.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fk {

// ---- runtime.cu ------------------------------------------------------------
// "" when a CUDA device can be used, else a human-readable reason.  Success is
// cached; a failure is re-probed on the next call (cheap).
std::string cuda_unusable_reason();
// Throws std::runtime_error("free_kernels._C: CUDA is not usable here: ...").
void check_cuda_available();
int device_count();
// Versions encoded as 1000 * major + 10 * minor (13000 = 13.0).
int cuda_runtime_version();
int cuda_driver_version();  // 0 when no driver is installed

// ---- fill.cu ---------------------------------------------------------------
// out[i] = value for i < n (float32 buffer).
void fill_f32(uintptr_t out, int64_t n, float value, uintptr_t stream);
// out[i] = philox_randn(seed, offset + i, subsequence): the device twin of
// the host binding philox_normal (see philox.h for the convention).
void fill_randn_f32(uintptr_t out, int64_t n, uint64_t seed, uint64_t offset, uint64_t subsequence,
                    uintptr_t stream);

// ---- verify_attention.cu ---------------------------------------------------
// Attention over the packed qkv (B, N, 3 * heads * head_dim) into out
// (B, N, heads * head_dim); strides in elements (any), head_dim 1..128,
// dtype_code 0 = float16, 1 = bfloat16; needs sm_80+.
void verify_attention(uintptr_t qkv, uintptr_t out, int64_t B, int64_t N, int64_t heads, int64_t head_dim,
                      int64_t s_qb, int64_t s_qn, int64_t s_qc, int64_t s_ob, int64_t s_on, int64_t s_oc,
                      int64_t dtype_code, uintptr_t stream);

// ---- speculative_accept.cu -------------------------------------------------
// FREE's acceptance + residual resampling for a round (two launches, see the
// .cu).  mean_p/logvar_p (B, L + 1, D), mean_q/logvar_q/noise_q (B, L, D) and
// out (B, D) share dtype_code 0 = float32, 1 = float16, 2 = bfloat16; strides
// (17, in elements): the five inputs' (b, l, d) then out's (b, d).
// num_drafts int64 (B,), deterministic_last bool (B,); optional (0 = absent)
// contiguous float32 uniforms / tau (B, L), bonus_noise (B, D),
// residual_noise (B, num_given, D) + residual_uniforms (B, num_given).
// rng_state: device int64 [seed, offset], advanced in place by max(D, L).
// Outputs: num_accepted int32 (B,), log_ratio float32 (B, L) contiguous,
// residual_candidates int32 (B,), fallbacks bool (B,).
int64_t speculative_accept_workspace_bytes(int64_t B, int64_t L, int64_t D);
void speculative_accept(uintptr_t mean_p, uintptr_t logvar_p, uintptr_t mean_q, uintptr_t logvar_q,
                        uintptr_t noise_q, const std::vector<int64_t>& strides, uintptr_t num_drafts,
                        uintptr_t deterministic_last, uintptr_t uniforms, uintptr_t tau, uintptr_t bonus_noise,
                        uintptr_t residual_noise, uintptr_t residual_uniforms, int64_t num_given,
                        uintptr_t rng_state, uintptr_t workspace, int64_t workspace_bytes, uintptr_t out,
                        uintptr_t num_accepted, uintptr_t log_ratio, uintptr_t residual_candidates,
                        uintptr_t fallbacks, int64_t B, int64_t L, int64_t D, int dtype, bool equal_variance,
                        int64_t max_candidates, uintptr_t stream);

}  // namespace fk

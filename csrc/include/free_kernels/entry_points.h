// Declarations of the entry points bound in csrc/bindings.cpp: the CUDA kernels
// and the host kernels (csrc/kernels/*.cpp, compiled in every build).
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
//   * element types arrive as `dtype_code`, an fk::DType value (dtype.h:
//     0 = float32, 1 = float16, 2 = bfloat16; Python: free_kernels/ops/_abi.py),
//   * each entry point calls check_cuda_available() first, validates its
//     arguments (std::invalid_argument -> ValueError) and checks the launch
//     (std::runtime_error -> RuntimeError).
//
// Adding an op: write csrc/kernels/<op>.cu (element types and conversions from
// device_types.h, shared scalar math in a header here), declare its entry point
// here and add one FK_DEF_CUDA line in bindings.cpp.  CMake globs csrc/kernels/*.cu.
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
// dtype_code 1 = float16, 2 = bfloat16 (fk::DType); needs sm_80+.
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

// ---- modulated_layernorm.cu, gated_residual.cu, bias_gelu.cu ------------
// The adaLN block's kernels; every tensor of a call has dtype_code 0 = float32,
// 1 = float16, 2 = bfloat16; strides in elements (any; out may alias x).
// modulated_layernorm: out = LayerNorm(x) * (1 + scale[b]) + shift[b], x / out
//   (B, N, H), shift / scale (B, H); strides (10): x (3), shift (2), scale (2), out (3).
void modulated_layernorm(uintptr_t x, uintptr_t shift, uintptr_t scale, uintptr_t out, int64_t B, int64_t N,
                         int64_t H, double eps, const std::vector<int64_t>& strides, int64_t dtype_code,
                         uintptr_t stream);
// gated_residual: out = x + gate[b] * y; strides (11): x (3), gate (2), y (3), out (3).
void gated_residual(uintptr_t x, uintptr_t gate, uintptr_t y, uintptr_t out, int64_t B, int64_t N, int64_t H,
                    const std::vector<int64_t>& strides, int64_t dtype_code, uintptr_t stream);
// bias_gelu: out = gelu_tanh(x + bias), x / out (B, N, K), bias (K,); strides (7): x (3), bias (1), out (3).
void bias_gelu(uintptr_t x, uintptr_t bias, uintptr_t out, int64_t B, int64_t N, int64_t K,
               const std::vector<int64_t>& strides, int64_t dtype_code, uintptr_t stream);

// ---- draft_epilogue.cu -----------------------------------------------------
// Drafted features -> next drafted state in one kernel (see the .cu).
// h (G*R, N, H), shift / scale (G*R, H), weight (p*p*C_out, H), bias share
// dtype_codes[0]; x (R, C, S, S) and noise have codes [1] and [2]
// (0 = float32, 1 = float16, 2 = bfloat16); tables float32 (6, T) with row
// stride table_stride; index int64 (R,); rng_state int64 [seed, offset], read
// and advanced by R*C*S*S when noise == 0; outputs float32 (R, C, S, S),
// out_noise optional (0).  strides (34, elements): h (3), shift (2), scale (2),
// weight (2), bias (1), x (4), noise (4), out_x (4), out_mean (4), out_logvar (4),
// out_noise (4).  Needs sm_80+.
void draft_epilogue(uintptr_t h, uintptr_t shift, uintptr_t scale, uintptr_t weight, uintptr_t bias, uintptr_t x,
                    uintptr_t tables, uintptr_t index, uintptr_t noise, uintptr_t rng_state, uintptr_t out_x,
                    uintptr_t out_mean, uintptr_t out_logvar, uintptr_t out_noise,
                    const std::vector<int64_t>& strides, const std::vector<int64_t>& dtype_codes, int64_t G,
                    int64_t R, int64_t N, int64_t H, int64_t C, int64_t S, int64_t patch_size, int64_t weight_rows,
                    int64_t table_stride, double eps, double cfg_scale, int64_t guidance_channels,
                    bool learned_variance, bool predict_xstart, bool clip_denoised, uintptr_t stream);

// ---- draft_epilogue_host.cpp (every build, CUDA or not) --------------------
// The same epilogue on the CPU: host pointers, every tensor float32 (dtype
// codes all 0), the arguments of draft_epilogue without the stream, plus
// table_len (T, the respaced steps: every index must lie in [0, T)).
// Single-threaded; rng_state (host int64 [seed, offset]) is advanced in place.
void draft_epilogue_host(uintptr_t h, uintptr_t shift, uintptr_t scale, uintptr_t weight, uintptr_t bias,
                         uintptr_t x, uintptr_t tables, uintptr_t index, uintptr_t noise, uintptr_t rng_state,
                         uintptr_t out_x, uintptr_t out_mean, uintptr_t out_logvar, uintptr_t out_noise,
                         const std::vector<int64_t>& strides, const std::vector<int64_t>& dtype_codes, int64_t G,
                         int64_t R, int64_t N, int64_t H, int64_t C, int64_t S, int64_t patch_size,
                         int64_t weight_rows, int64_t table_stride, int64_t table_len, double eps, double cfg_scale,
                         int64_t guidance_channels, bool learned_variance, bool predict_xstart, bool clip_denoised);

}  // namespace fk

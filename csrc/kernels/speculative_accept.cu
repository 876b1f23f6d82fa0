// FREE's exact acceptance + residual resampling for a whole batch: two launches.
//
// Semantics: free_kernels/reference/speculative_accept.py (the oracle).  Scalar
// math and the random-stream layout: free_kernels/accept_math.h (host-tested by
// csrc/tests/test_accept_math.cpp).  The Triton twin is
// free_kernels/triton/speculative_accept.py; both backends use the same streams.
//
// Launch 1, accept_reduce_kernel, grid (S, L, B), 256 threads: block (s, j, b)
//   reduces chunk s (kChunk = 2048 elements, 8 per thread, loads issued
//   together) of draft slot j of sample b in fp32 -- per-thread sums, warp
//   shuffles, then one shared-memory step across the 8 warps -- and writes two
//   partials: (<d, xi>, |d|^2) for equal variance (the log ratio is
//   dot - nrm / 2, and the reflection needs exactly these two sums), or
//   (log p - log q, 0).  Slots j >= num_drafts[b] return at once.  Block
//   (0, 0, 0) snapshots rng_state into the workspace and advances
//   rng_state[1] by max(D, L) on the device.
//
// Launch 2, accept_finish_kernel, grid (S2, B), 512 threads: warp 0 of every
//   block sums the partials of each slot (lane j: slot j, fixed order, so every
//   block of a sample reaches the same decision bit for bit), draws/reads the
//   uniforms, and a ballot gives the first rejection.  Then the block writes its
//   kChunk2-element chunk of `out`: the bonus step (mean only when
//   deterministic_last) or the reflection.  For unequal variance, block 0 of a
//   rejecting sample runs the exact rejection sampler of (p - q)_+ on its own:
//   kCPI candidates per iteration (two Box-Muller pairs), log q - log p reduced
//   over all D elements, keep the first with u < 1 - q/p, loop until kept or
//   max_candidates drawn (fallback: the last candidate, flagged), then
//   regenerate the kept candidate's normals from its counter and write the row.
//
// No host synchronisation, no data-dependent allocation: capturable in a CUDA
// graph; replays draw fresh numbers because the offset is advanced on the device.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "free_kernels/accept_math.h"
#include "free_kernels/cuda_check.h"
#include "free_kernels/device_types.h"
#include "free_kernels/entry_points.h"

namespace fk {

// Everything the two kernels read and write.  Big inputs are (B, L or L + 1, D)
// with arbitrary element strides; the small optional tensors are contiguous
// float32 (the Python wrapper converts them), nullptr when absent.
struct SpeculativeAcceptArgs {
  const void* mean_p = nullptr;    // (B, L + 1, D)  T
  const void* logvar_p = nullptr;  // (B, L + 1, D)  T
  const void* mean_q = nullptr;    // (B, L, D)      T
  const void* logvar_q = nullptr;  // (B, L, D)      T
  const void* noise_q = nullptr;   // (B, L, D)      T
  int64_t strides[5][3] = {};      // element strides (b, l, d) of the five above, in that order
  const int64_t* num_drafts = nullptr;        // (B,)
  const uint8_t* deterministic_last = nullptr;  // (B,) bool
  const float* uniforms = nullptr;            // (B, L) or nullptr
  const float* tau = nullptr;                 // (B, L) or nullptr
  const float* bonus_noise = nullptr;         // (B, D) or nullptr
  const float* residual_noise = nullptr;      // (B, K, D) or nullptr
  const float* residual_uniforms = nullptr;   // (B, K) or nullptr
  int64_t num_given = 0;                      // K
  int64_t* rng_state = nullptr;               // [seed, offset], advanced in place
  void* workspace = nullptr;                  // speculative_accept_workspace_bytes(B, L, D) bytes
  void* out = nullptr;                        // (B, D) T, strides out_strides
  int64_t out_strides[2] = {0, 1};
  int32_t* num_accepted = nullptr;            // (B,)
  float* log_ratio = nullptr;                 // (B, L) contiguous
  int32_t* residual_candidates = nullptr;     // (B,)
  bool* fallbacks = nullptr;                  // (B,)
  int64_t B = 0, L = 0, D = 0;
  int dtype = 0;                              // 0 float32, 1 float16, 2 bfloat16
  bool equal_variance = false;
  int64_t max_candidates = 100000;
};

namespace {

// Launch 1: 256 threads x 8 elements.  Launch 2: 512 threads x 4 elements (the
// same 2048-element chunks): the residual sampler runs in one block per sample,
// and its Philox / Box-Muller chains are latency-bound, so 16 warps per SM hide
// them better than 8 (<= 128 registers per thread at 512 threads).
constexpr int kThreads = 256;
constexpr int kPerThread = 8;
constexpr int kThreads2 = 512;
constexpr int kPerThread2 = 4;
constexpr int64_t kChunk = kThreads * kPerThread;     // launch 1: elements per block
constexpr int64_t kChunk2 = kThreads2 * kPerThread2;  // launch 2: elements per block
constexpr int kCPI = 4;                             // residual candidates per iteration (even)

// A (B, rows, D) input seen through its strides.
template <typename T>
struct Rows {
  const T* __restrict__ p;
  int64_t sb, sl, sd;
  __device__ __forceinline__ const T* row(int64_t b, int64_t l) const { return p + b * sb + l * sl; }
  __device__ __forceinline__ float at(const T* r, int64_t i) const { return to_f32(r[i * sd]); }
};

// Elements lo + r * kT + threadIdx.x (r < kP) of a row, 0 beyond D.
template <int kT, int kP, typename T>
__device__ __forceinline__ void load_chunk(const Rows<T>& R, const T* row, int64_t lo, int64_t D, float (&v)[kP]) {
#pragma unroll
  for (int r = 0; r < kP; ++r) {
    const int64_t i = lo + r * kT + threadIdx.x;
    v[r] = i < D ? R.at(row, i) : 0.0f;
  }
}

struct Workspace {
  int64_t* snapshot;  // [seed, offset] as read by launch 1
  float* partials;    // (B, L, S, 2)
};

__host__ __device__ inline int64_t num_chunks(int64_t D) { return (D + kChunk - 1) / kChunk; }
__host__ __device__ inline int64_t num_chunks2(int64_t D) { return (D + kChunk2 - 1) / kChunk2; }

__host__ __device__ inline Workspace carve(void* ws) {
  auto* base = static_cast<int64_t*>(ws);
  return Workspace{base, reinterpret_cast<float*>(base + 2)};
}

// Sum of N values over a block of kT threads; the result is valid in thread 0.
// Fixed order (shuffle tree inside each warp, then across warps in warp 0).
template <int kT, int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float* smem /* (kT / 32) * N */) {
  constexpr int kWarps = kT / 32;
  static_assert(kWarps <= 32, "one warp reduces the per-warp sums");
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int n = 0; n < N; ++n) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[n] += __shfl_xor_sync(0xffffffffu, v[n], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) smem[warp * N + n] = v[n];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
      v[n] = lane < kWarps ? smem[lane * N + n] : 0.0f;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v[n] += __shfl_xor_sync(0xffffffffu, v[n], o);
    }
  }
  __syncthreads();  // smem may be reused right after
}

// ------------------------------------------------------------------ launch 1
template <typename T, bool kEqualVar>
__global__ void __launch_bounds__(kThreads) accept_reduce_kernel(const SpeculativeAcceptArgs a) {
  __shared__ float red[(kThreads / 32) * 2];
  const int64_t s = blockIdx.x, j = blockIdx.y, b = blockIdx.z;
  const Workspace ws = carve(a.workspace);
  if (s == 0 && j == 0 && b == 0 && threadIdx.x == 0) {
    const int64_t seed = a.rng_state[0], off = a.rng_state[1];
    ws.snapshot[0] = seed;
    ws.snapshot[1] = off;
    a.rng_state[1] = off + accept::rng_advance(a.L, a.D);
  }
  int64_t nd = a.num_drafts[b];
  nd = nd < 0 ? 0 : (nd > a.L ? a.L : nd);
  if (j >= nd) return;  // uniform across the block

  const Rows<T> MP{static_cast<const T*>(a.mean_p), a.strides[0][0], a.strides[0][1], a.strides[0][2]};
  const Rows<T> LVP{static_cast<const T*>(a.logvar_p), a.strides[1][0], a.strides[1][1], a.strides[1][2]};
  const Rows<T> MQ{static_cast<const T*>(a.mean_q), a.strides[2][0], a.strides[2][1], a.strides[2][2]};
  const Rows<T> LVQ{static_cast<const T*>(a.logvar_q), a.strides[3][0], a.strides[3][1], a.strides[3][2]};
  const Rows<T> XI{static_cast<const T*>(a.noise_q), a.strides[4][0], a.strides[4][1], a.strides[4][2]};
  const T* mp = MP.row(b, j);
  const T* lvp = LVP.row(b, j);
  const T* mq = MQ.row(b, j);
  const T* lvq = LVQ.row(b, j);
  const T* xi = XI.row(b, j);

  // All loads of the chunk first (predicated, no branches), so that 8 x 4-5
  // independent loads per thread are in flight; then the arithmetic.
  const int64_t lo = s * kChunk;
  float vmp[kPerThread], vlvp[kPerThread], vmq[kPerThread], vxi[kPerThread], vlvq[kPerThread];
  load_chunk<kThreads>(MP, mp, lo, a.D, vmp);
  load_chunk<kThreads>(LVP, lvp, lo, a.D, vlvp);
  load_chunk<kThreads>(MQ, mq, lo, a.D, vmq);
  load_chunk<kThreads>(XI, xi, lo, a.D, vxi);
  if (!kEqualVar) load_chunk<kThreads>(LVQ, lvq, lo, a.D, vlvq);
  float acc[2] = {0.0f, 0.0f};
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    if (lo + r * kThreads + threadIdx.x < a.D) {
      if (kEqualVar) {
        const float d = accept::whitened_diff(vmp[r], vmq[r], vlvp[r]);
        acc[0] += d * vxi[r];
        acc[1] += d * d;
      } else {
        acc[0] += accept::log_ratio_term(vmp[r], vlvp[r], vmq[r], vlvq[r], vxi[r]);
      }
    }
  }
  block_sum<kThreads, 2>(acc, red);
  if (threadIdx.x == 0) {
    float* out = ws.partials + ((b * a.L + j) * num_chunks(a.D) + s) * 2;
    out[0] = acc[0];
    out[1] = acc[1];
  }
}

// ------------------------------------------------------------------ launch 2
// Exact rejection sampler of (p - q)_+ for sample b (whole block, whole row).
template <typename T>
__device__ void residual_sampler(const SpeculativeAcceptArgs& a, int64_t b, int64_t js, uint64_t seed,
                                 uint64_t off0, float* red) {
  __shared__ int64_t sh_chosen;
  __shared__ int64_t sh_count;
  __shared__ int sh_fb;
  __shared__ int sh_nan;
  const Rows<T> MP{static_cast<const T*>(a.mean_p), a.strides[0][0], a.strides[0][1], a.strides[0][2]};
  const Rows<T> LVP{static_cast<const T*>(a.logvar_p), a.strides[1][0], a.strides[1][1], a.strides[1][2]};
  const Rows<T> MQ{static_cast<const T*>(a.mean_q), a.strides[2][0], a.strides[2][1], a.strides[2][2]};
  const Rows<T> LVQ{static_cast<const T*>(a.logvar_q), a.strides[3][0], a.strides[3][1], a.strides[3][2]};
  const T* mp = MP.row(b, js);
  const T* lvp = LVP.row(b, js);
  const T* mq = MQ.row(b, js);
  const T* lvq = LVQ.row(b, js);
  const int64_t D = a.D, K = a.residual_noise ? a.num_given : 0;
  const float* rn = a.residual_noise ? a.residual_noise + b * K * D : nullptr;
  const uint32_t sample = static_cast<uint32_t>(b);

  int64_t k = 0;
  for (;;) {
    float acc[kCPI];
#pragma unroll
    for (int c = 0; c < kCPI; ++c) acc[c] = 0.0f;
    for (int64_t i = threadIdx.x; i < D; i += kThreads2) {
      const float vmp = MP.at(mp, i), vlvp = LVP.at(lvp, i), vmq = MQ.at(mq, i), vlvq = LVQ.at(lvq, i);
#pragma unroll
      for (int h = 0; h < kCPI / 2; ++h) {
        const int64_t c0 = k + 2 * h;
        float z0, z1, zz;
        if (c0 + 1 < K) {  // both members given (tests)
          z0 = rn[c0 * D + i];
          z1 = rn[(c0 + 1) * D + i];
        } else {
          const u32x4 w = philox_randint4x(
              seed, off0 + static_cast<uint64_t>(i),
              accept::subsequence(sample, accept::kTagResidualNormal, static_cast<uint32_t>(c0 >> 1)));
          const f32x2 z = accept::normal_pair_from_words(w.x, w.y);
          z0 = c0 < K ? rn[c0 * D + i] : z.x;
          z1 = z.y;
        }
        acc[2 * h] += accept::residual_term(z0, vmp, vlvp, vmq, vlvq, &zz);
        acc[2 * h + 1] += accept::residual_term(z1, vmp, vlvp, vmq, vlvq, &zz);
      }
    }
    block_sum<kThreads2, kCPI>(acc, red);
    if (threadIdx.x == 0) {
      int first = kCPI, n_nan = 0;
#pragma unroll
      for (int c = 0; c < kCPI; ++c) {
        const int64_t cand = k + c;
        const float lq_lp = acc[c];
        n_nan += isnan(lq_lp) ? 1 : 0;
        const float u = cand < K ? a.residual_uniforms[b * K + cand]
                                 : accept::stream_uniform(seed, off0,
                                                          accept::subsequence(sample, accept::kTagResidualUniform,
                                                                              static_cast<uint32_t>(cand)));
        if (first == kCPI && accept::residual_keep(u, lq_lp)) first = c;
      }
      int64_t chosen = -1, count = 0;
      int fb = 0, nan_row = 0;
      if (first < kCPI) {
        chosen = k + first;
        count = k + first + 1;
      } else if (n_nan == kCPI) {
        chosen = k;
        count = k + kCPI;
        nan_row = 1;
      } else if (k + kCPI >= a.max_candidates) {
        chosen = k + kCPI - 1;
        count = k + kCPI;
        fb = 1;
      }
      sh_chosen = chosen;
      sh_count = count;
      sh_fb = fb;
      sh_nan = nan_row;
    }
    __syncthreads();
    if (sh_chosen >= 0) break;  // uniform across the block
    k += kCPI;
  }

  // Write the emitted candidate: its normals regenerated from its counters.
  const int64_t chosen = sh_chosen;
  const bool nan_row = sh_nan != 0;
  T* out = static_cast<T*>(a.out) + b * a.out_strides[0];
  for (int64_t i = threadIdx.x; i < D; i += kThreads2) {
    const float zs = chosen < K ? rn[chosen * D + i]
                                : accept::residual_normal(seed, off0 + static_cast<uint64_t>(i), sample,
                                                          static_cast<uint32_t>(chosen));
    const float z = MP.at(mp, i) + expf(0.5f * LVP.at(lvp, i)) * zs;
    out[i * a.out_strides[1]] = from_f32<T>(nan_row ? __int_as_float(0x7fc00000) : z);
  }
  if (threadIdx.x == 0) {
    a.residual_candidates[b] = static_cast<int32_t>(sh_count);
    a.fallbacks[b] = sh_fb != 0;
  }
}

template <typename T, bool kEqualVar>
__global__ void __launch_bounds__(kThreads2) accept_finish_kernel(const SpeculativeAcceptArgs a) {
  __shared__ float red[(kThreads2 / 32) * kCPI];
  __shared__ int64_t sh_num_acc;
  __shared__ float sh_coef;
  const int64_t s = blockIdx.x, b = blockIdx.y;
  const int64_t L = a.L, D = a.D;
  const Workspace ws = carve(a.workspace);
  const uint64_t seed = static_cast<uint64_t>(ws.snapshot[0]);
  const uint64_t off0 = static_cast<uint64_t>(ws.snapshot[1]);
  int64_t nd = a.num_drafts[b];
  nd = nd < 0 ? 0 : (nd > L ? L : nd);
  const uint32_t sample = static_cast<uint32_t>(b);

  // ---- decision: warp 0, lane l judges slots j = 32 g + l
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const int64_t S = num_chunks(D);
    int64_t first = L;
    float dot_j = 0.0f, nrm_j = 0.0f;
    for (int64_t g = 0; g < L; g += 32) {
      const int64_t j = g + lane;
      float dot = 0.0f, nrm = 0.0f, lr = __int_as_float(0x7fc00000);
      bool rejected = false;
      if (j < nd) {
        const float* pp = ws.partials + (b * L + j) * S * 2;
        for (int64_t c = 0; c < S; ++c) {
          dot += pp[2 * c];
          nrm += pp[2 * c + 1];
        }
        lr = kEqualVar ? dot - 0.5f * nrm : dot;
        const float u = a.uniforms ? a.uniforms[b * L + j]
                                   : accept::stream_uniform(seed, off0 + static_cast<uint64_t>(j),
                                                            accept::subsequence(sample, accept::kTagAcceptUniform, 0));
        const float t = a.tau ? a.tau[b * L + j] : 1.0f;
        rejected = !accept::accept_draft(u, lr, t);
      }
      if (s == 0 && j < L) a.log_ratio[b * L + j] = lr;
      const unsigned mask = __ballot_sync(0xffffffffu, rejected);
      if (first == L && mask != 0u) {
        const int src = __ffs(mask) - 1;
        first = g + src;
        dot_j = __shfl_sync(0xffffffffu, dot, src);
        nrm_j = __shfl_sync(0xffffffffu, nrm, src);
      }
    }
    if (lane == 0) {
      const int64_t num_acc = first < nd ? first : nd;
      sh_num_acc = num_acc;
      sh_coef = accept::reflection_coef(dot_j, nrm_j);
      if (s == 0) {
        a.num_accepted[b] = static_cast<int32_t>(num_acc);
        a.residual_candidates[b] = 0;
        a.fallbacks[b] = false;
      }
    }
  }
  __syncthreads();
  const int64_t num_acc = sh_num_acc;
  const bool reject = num_acc < nd;

  const Rows<T> MP{static_cast<const T*>(a.mean_p), a.strides[0][0], a.strides[0][1], a.strides[0][2]};
  const Rows<T> LVP{static_cast<const T*>(a.logvar_p), a.strides[1][0], a.strides[1][1], a.strides[1][2]};
  T* out = static_cast<T*>(a.out) + b * a.out_strides[0];
  const int64_t lo = s * kChunk2;
  if (!reject) {
    // ---- every draft accepted: the bonus step from p_{num_drafts}
    const T* mp = MP.row(b, nd);
    const T* lvp = LVP.row(b, nd);
    const bool det = a.deterministic_last[b] != 0;
    const float* bn = a.bonus_noise ? a.bonus_noise + b * D : nullptr;
    float vmp[kPerThread2], vlvp[kPerThread2];
    load_chunk<kThreads2>(MP, mp, lo, D, vmp);
    load_chunk<kThreads2>(LVP, lvp, lo, D, vlvp);
#pragma unroll
    for (int r = 0; r < kPerThread2; ++r) {
      const int64_t i = lo + r * kThreads2 + threadIdx.x;
      if (i < D) {
        const float noise = det ? 0.0f
                            : bn ? bn[i]
                                 : accept::stream_normal(seed, off0 + static_cast<uint64_t>(i),
                                                         accept::subsequence(sample, accept::kTagBonusNormal, 0));
        out[i * a.out_strides[1]] = from_f32<T>(accept::bonus_value(vmp[r], vlvp[r], noise, det));
      }
    }
  } else if (kEqualVar) {
    // ---- reflection maximal coupling of the rejected slot
    const Rows<T> MQ{static_cast<const T*>(a.mean_q), a.strides[2][0], a.strides[2][1], a.strides[2][2]};
    const Rows<T> XI{static_cast<const T*>(a.noise_q), a.strides[4][0], a.strides[4][1], a.strides[4][2]};
    const T* mp = MP.row(b, num_acc);
    const T* lvp = LVP.row(b, num_acc);
    const T* mq = MQ.row(b, num_acc);
    const T* xi = XI.row(b, num_acc);
    const float coef = sh_coef;
    float vmp[kPerThread2], vlvp[kPerThread2], vmq[kPerThread2], vxi[kPerThread2];
    load_chunk<kThreads2>(MP, mp, lo, D, vmp);
    load_chunk<kThreads2>(LVP, lvp, lo, D, vlvp);
    load_chunk<kThreads2>(MQ, mq, lo, D, vmq);
    load_chunk<kThreads2>(XI, xi, lo, D, vxi);
#pragma unroll
    for (int r = 0; r < kPerThread2; ++r) {
      const int64_t i = lo + r * kThreads2 + threadIdx.x;
      if (i < D) {
        const float d = accept::whitened_diff(vmp[r], vmq[r], vlvp[r]);
        out[i * a.out_strides[1]] = from_f32<T>(accept::reflect(vmp[r], vlvp[r], vxi[r], d, coef));
      }
    }
  } else if (s == 0) {
    residual_sampler<T>(a, b, num_acc, seed, off0, red);
  }
}

template <typename T>
cudaError_t launch_typed(const SpeculativeAcceptArgs& a, cudaStream_t stream) {
  const dim3 block(kThreads), block2(kThreads2);
  const dim3 grid1(static_cast<unsigned>(num_chunks(a.D)), static_cast<unsigned>(a.L > 0 ? a.L : 1),
                   static_cast<unsigned>(a.B));
  const dim3 grid2(static_cast<unsigned>(num_chunks2(a.D)), static_cast<unsigned>(a.B));
  if (a.equal_variance) {
    accept_reduce_kernel<T, true><<<grid1, block, 0, stream>>>(a);
    accept_finish_kernel<T, true><<<grid2, block2, 0, stream>>>(a);
  } else {
    accept_reduce_kernel<T, false><<<grid1, block, 0, stream>>>(a);
    accept_finish_kernel<T, false><<<grid2, block2, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

int64_t speculative_accept_workspace_bytes(int64_t B, int64_t L, int64_t D) {
  const int64_t n = B * (L > 0 ? L : 1) * num_chunks(D > 0 ? D : 1) * 2;
  return 2 * static_cast<int64_t>(sizeof(int64_t)) + n * static_cast<int64_t>(sizeof(float));
}

// The raw launcher: no validation, no availability check; returns the launch status.
cudaError_t launch_speculative_accept(const SpeculativeAcceptArgs& a, cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  switch (a.dtype) {
    case 0:
      return launch_typed<float>(a, stream);
    case 1:
      return launch_typed<__half>(a, stream);
    case 2:
      return launch_typed<__nv_bfloat16>(a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// ------------------------------------------------------------------ entry point
void speculative_accept(uintptr_t mean_p, uintptr_t logvar_p, uintptr_t mean_q, uintptr_t logvar_q,
                        uintptr_t noise_q, const std::vector<int64_t>& strides, uintptr_t num_drafts,
                        uintptr_t deterministic_last, uintptr_t uniforms, uintptr_t tau, uintptr_t bonus_noise,
                        uintptr_t residual_noise, uintptr_t residual_uniforms, int64_t num_given,
                        uintptr_t rng_state, uintptr_t workspace, int64_t workspace_bytes, uintptr_t out,
                        uintptr_t num_accepted, uintptr_t log_ratio, uintptr_t residual_candidates,
                        uintptr_t fallbacks, int64_t B, int64_t L, int64_t D, int dtype, bool equal_variance,
                        int64_t max_candidates, uintptr_t stream) {
  check_cuda_available();
  const std::string fn = "speculative_accept";
  auto fail = [&](const std::string& what) { throw std::invalid_argument(fn + ": " + what); };
  if (B < 0 || L < 0 || D < 1) fail("need B >= 0, L >= 0, D >= 1");
  if (B >= (int64_t{1} << 30) || B > 65535) fail("at most 65535 samples per call");
  if (L > 65535) fail("at most 65535 draft slots");
  if (dtype < 0 || dtype > 2) fail("dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  if (strides.size() != 17) fail("strides needs 17 entries: 5 inputs x (b, l, d) + out (b, d)");
  if (max_candidates < 1 || max_candidates > (int64_t{1} << 30)) fail("max_candidates must lie in [1, 2^30]");
  if ((residual_noise == 0) != (residual_uniforms == 0)) fail("residual_noise and residual_uniforms go together");
  if (residual_noise != 0 && num_given < 0) fail("num_given must be >= 0");
  if (workspace_bytes < speculative_accept_workspace_bytes(B, L, D)) fail("workspace too small");
  if (B == 0) return;
  const uintptr_t required[] = {mean_p, logvar_p, num_drafts, deterministic_last, rng_state, workspace, out,
                                num_accepted, residual_candidates, fallbacks};
  for (uintptr_t ptr : required) {
    if (ptr == 0) fail("null pointer among the required buffers");
  }
  // the (B, L, D) drafts and the (B, L) log ratios are empty (null) when L == 0
  if (L > 0 && (mean_q == 0 || logvar_q == 0 || noise_q == 0 || log_ratio == 0)) {
    fail("null pointer among the draft buffers");
  }
  if (workspace % 16 != 0 || rng_state % 8 != 0 || num_drafts % 8 != 0) fail("misaligned workspace / int64 buffer");

  SpeculativeAcceptArgs a;
  a.mean_p = reinterpret_cast<const void*>(mean_p);
  a.logvar_p = reinterpret_cast<const void*>(logvar_p);
  a.mean_q = reinterpret_cast<const void*>(mean_q);
  a.logvar_q = reinterpret_cast<const void*>(logvar_q);
  a.noise_q = reinterpret_cast<const void*>(noise_q);
  for (int t = 0; t < 5; ++t)
    for (int k = 0; k < 3; ++k) a.strides[t][k] = strides[3 * t + k];
  a.out_strides[0] = strides[15];
  a.out_strides[1] = strides[16];
  a.num_drafts = reinterpret_cast<const int64_t*>(num_drafts);
  a.deterministic_last = reinterpret_cast<const uint8_t*>(deterministic_last);
  a.uniforms = reinterpret_cast<const float*>(uniforms);
  a.tau = reinterpret_cast<const float*>(tau);
  a.bonus_noise = reinterpret_cast<const float*>(bonus_noise);
  a.residual_noise = reinterpret_cast<const float*>(residual_noise);
  a.residual_uniforms = reinterpret_cast<const float*>(residual_uniforms);
  a.num_given = residual_noise ? num_given : 0;
  a.rng_state = reinterpret_cast<int64_t*>(rng_state);
  a.workspace = reinterpret_cast<void*>(workspace);
  a.out = reinterpret_cast<void*>(out);
  a.num_accepted = reinterpret_cast<int32_t*>(num_accepted);
  a.log_ratio = reinterpret_cast<float*>(log_ratio);
  a.residual_candidates = reinterpret_cast<int32_t*>(residual_candidates);
  a.fallbacks = reinterpret_cast<bool*>(fallbacks);
  a.B = B;
  a.L = L;
  a.D = D;
  a.dtype = dtype;
  a.equal_variance = equal_variance;
  a.max_candidates = max_candidates;
  FK_CUDA_CHECK(launch_speculative_accept(a, reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace fk

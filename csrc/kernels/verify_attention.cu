// verify_attention: non-causal multi-head attention read straight from the packed
// qkv projection, flash-attention style, on tensor cores (mma.sync m16n8k16,
// fp16 or bf16 operands, fp32 accumulation).
//
//   qkv (B, N, 3 * heads * head_dim), any strides, [q | k | v], heads inside each
//   out (B, N, heads * head_dim), any strides
//
// Tiling: one CTA = 4 warps = 64 query rows of one (batch row, head); each warp
// owns 16 rows for the whole kernel (its Q fragments stay in registers).  Keys
// are walked in blocks of 64 with an online softmax (running max and sum per
// row, in log2 units).  K and V tiles live in shared memory, single buffered,
// FA2 style overlap with cp.async: V(j) streams in while S = Q K(j)^T and the
// softmax run, K(j+1) streams in while O += P V(j) runs.
//
// Head dim: padded in shared memory to 64 / 80 / 128 (a multiple of the mma K
// step 16) with zero fill; 72 -> 80 = 5 k16 chunks.  Any N: rows past N load as
// zeros, scores of keys past N are set to -inf, rows past N are not stored.
//
// Loads: when every address is 16-byte aligned (unit channel stride, head_dim
// and all other strides multiples of 8 elements, 16-byte aligned pointers) tiles
// move with 16-byte cp.async (zero fill through src-size 0); otherwise an
// element-wise path handles arbitrary strides.  The output is staged through
// shared memory and written with 16-byte stores on the aligned path.
//
// FLOPs: 4 * B * heads * N^2 * head_dim.
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "free_kernels/attention_math.h"
#include "free_kernels/cuda_check.h"
#include "free_kernels/device_types.h"
#include "free_kernels/dtype.h"
#include "free_kernels/entry_points.h"

namespace fk {
namespace {

using namespace attn;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = 16 * kWarps;  // query rows per CTA
constexpr int kBlockN = 64;           // keys per iteration

// ------------------------------------------------------------ PTX wrappers
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// 16-byte global -> shared copy; valid == false writes 16 zero bytes.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// fp32 pairs -> one 32-bit register of two elements (the mma A / C fragment packing)
template <typename T>
struct TypeOps;

template <>
struct TypeOps<__half> {
  // low 16 bits = lo (the smaller column index), as the fragments expect
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct TypeOps<__nv_bfloat16> {
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// ------------------------------------------------------------ tile movement
// Copy rows [r0, r0 + ROWS) x columns [0, PAD) of a (rows, head_dim) matrix
// whose element (r, c) is at src[r * s_row + c * s_col] into a shared tile of
// pitch PAD + 8, zero-filling rows >= n_rows and columns >= head_dim.
template <int ROWS, int PAD, bool kVec>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* src, int r0, int n_rows,
                                          int head_dim, int64_t s_row, int64_t s_col, int tid) {
  constexpr int kPitch = PAD + 8;
  if constexpr (kVec) {
    constexpr int kChunks = PAD / 8;  // 16-byte chunks per row
#pragma unroll
    for (int c = tid; c < ROWS * kChunks; c += kThreads) {
      const int r = c / kChunks, ch = c % kChunks;
      const bool ok = chunk_valid(r0 + r, ch, n_rows, head_dim);
      const uint16_t* g = ok ? src + (int64_t)(r0 + r) * s_row + ch * 8 : src;
      cp_async_16(tile + r * kPitch + ch * 8, g, ok);
    }
  } else {
    for (int e = tid; e < ROWS * PAD; e += kThreads) {
      const int r = e / PAD, col = e % PAD;
      uint16_t v = 0;
      if (r0 + r < n_rows && col < head_dim) v = __ldg(src + (int64_t)(r0 + r) * s_row + (int64_t)col * s_col);
      tile[r * kPitch + col] = v;
    }
  }
}

// ------------------------------------------------------------------ kernel
template <typename T, int PAD, bool kVec>
__global__ void __launch_bounds__(kThreads)
    verify_attention_kernel(const uint16_t* __restrict__ qkv, uint16_t* __restrict__ out, int N, int heads,
                            int head_dim, int num_m_blocks, float scale_log2, int64_t s_qb, int64_t s_qn,
                            int64_t s_qc, int64_t s_ob, int64_t s_on, int64_t s_oc) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Ops = TypeOps<T>;
  constexpr int kPitch = PAD + 8;
  constexpr int kKSteps = PAD / 16;      // k16 steps of Q K^T, 16-wide d pairs of P V
  constexpr int kSTiles = kBlockN / 8;   // n8 accumulator tiles of S
  constexpr int kOTiles = PAD / 8;       // n8 accumulator tiles of O

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sK = sQ + kBlockM * kPitch;
  uint16_t* sV = sK + kBlockN * kPitch;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // flattened grid, query blocks of one (b, h) adjacent: their K/V share L2
  const int m_block = static_cast<int>(blockIdx.x % num_m_blocks);
  const int bh = static_cast<int>(blockIdx.x / num_m_blocks);
  const int b = bh / heads, h = bh % heads;
  const int64_t part = (int64_t)heads * head_dim * s_qc;  // q -> k -> v distance
  const uint16_t* q_g = qkv + b * s_qb + (int64_t)h * head_dim * s_qc;
  const uint16_t* k_g = q_g + part;
  const uint16_t* v_g = k_g + part;
  const int m0 = m_block * kBlockM;

  load_tile<kBlockM, PAD, kVec>(sQ, q_g, m0, N, head_dim, s_qn, s_qc, tid);
  load_tile<kBlockN, PAD, kVec>(sK, k_g, 0, N, head_dim, s_qn, s_qc, tid);
  if constexpr (kVec) { cp_async_commit(); cp_async_wait_all(); }
  __syncthreads();

  uint32_t qf[kKSteps][4];
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk)
    ldsm_x4(qf[kk], sQ + (warp * 16 + ldsm_a_row(lane)) * kPitch + kk * 16 + ldsm_a_col(lane));

  float o[kOTiles][4];
#pragma unroll
  for (int t = 0; t < kOTiles; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  // this lane's two rows: r = 0 -> row g, r = 1 -> row g + 8 of the warp's 16
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};  // per-lane partial sums, quad-reduced at the end

  const int n_blocks = ceil_div(N, kBlockN);
  for (int j = 0; j < n_blocks; ++j) {
    const int n0 = j * kBlockN;
    load_tile<kBlockN, PAD, kVec>(sV, v_g, n0, N, head_dim, s_qn, s_qc, tid);
    if constexpr (kVec) cp_async_commit();

    // ---- S = Q K^T (raw scores, fp32)
    float s[kSTiles][4];
#pragma unroll
    for (int t = 0; t < kSTiles; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int np = 0; np < kSTiles / 2; ++np) {
        uint32_t kb[4];
        ldsm_x4(kb, sK + (np * 16 + ldsm_k_row(lane)) * kPitch + kk * 16 + ldsm_k_col(lane));
        Mma<T>::run(s[2 * np], qf[kk], kb[0], kb[1]);
        Mma<T>::run(s[2 * np + 1], qf[kk], kb[2], kb[3]);
      }
    }

    // ---- mask keys past N (only the last block can have them)
    if (n0 + kBlockN > N) {
#pragma unroll
      for (int t = 0; t < kSTiles; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (n0 + t * 8 + mma_c_col(lane, i) >= N) s[t][i] = -INFINITY;
    }

    // ---- online softmax; elements (0,1) belong to row g, (2,3) to row g + 8
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int t = 0; t < kSTiles; ++t) mx = fmaxf(mx, fmaxf(s[t][2 * r], s[t][2 * r + 1]));
      // the 4 lanes of a quad hold the same row
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[r], mx * scale_log2);
      const float alpha = softmax_rescale(m_run[r], m_new);
      m_run[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int t = 0; t < kSTiles; ++t) {
#pragma unroll
        for (int i = 2 * r; i < 2 * r + 2; ++i) {
          const float p = softmax_weight(s[t][i] * scale_log2, m_new);
          s[t][i] = p;
          sum += p;
        }
      }
      l_run[r] = l_run[r] * alpha + sum;
#pragma unroll
      for (int t = 0; t < kOTiles; ++t) {
        o[t][2 * r] *= alpha;
        o[t][2 * r + 1] *= alpha;
      }
    }

    // V(j) has landed and every warp is done reading K(j): refill K
    if constexpr (kVec) cp_async_wait_all();
    __syncthreads();
    if (j + 1 < n_blocks) {
      load_tile<kBlockN, PAD, kVec>(sK, k_g, n0 + kBlockN, N, head_dim, s_qn, s_qc, tid);
      if constexpr (kVec) cp_async_commit();
    }

    // ---- O += P V: P comes straight from the S accumulators (C -> A layout)
#pragma unroll
    for (int kc = 0; kc < kBlockN / 16; ++kc) {
      uint32_t pa[4];
#pragma unroll
      for (int rr = 0; rr < 4; ++rr) {
        const float* st = s[2 * kc + p_from_s_tile(rr)];
        pa[rr] = Ops::pack(st[p_from_s_elem(rr)], st[p_from_s_elem(rr) + 1]);
      }
#pragma unroll
      for (int dp = 0; dp < kKSteps; ++dp) {
        uint32_t vb[4];
        ldsm_x4_trans(vb, sV + (kc * 16 + ldsm_v_row(lane)) * kPitch + dp * 16 + ldsm_v_col(lane));
        Mma<T>::run(o[2 * dp], pa, vb[0], vb[1]);
        Mma<T>::run(o[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }

    // K(j+1) has landed and every warp is done reading V(j)
    if constexpr (kVec) cp_async_wait_all();
    __syncthreads();
  }

  // ---- epilogue: normalise, stage this warp's 16 rows in sQ, store
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
  }
#pragma unroll
  for (int t = 0; t < kOTiles; ++t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + mma_c_row(lane, 2 * r);
      const int col = t * 8 + mma_c_col(lane, 2 * r);
      *reinterpret_cast<uint32_t*>(sQ + row * kPitch + col) =
          Ops::pack(o[t][2 * r] * inv[r], o[t][2 * r + 1] * inv[r]);
    }
  }
  __syncthreads();

  uint16_t* o_g = out + b * s_ob + (int64_t)h * head_dim * s_oc;
  if constexpr (kVec) {
    constexpr int kChunks = PAD / 8;
#pragma unroll
    for (int c = tid; c < kBlockM * kChunks; c += kThreads) {
      const int r = c / kChunks, ch = c % kChunks;
      if (chunk_valid(m0 + r, ch, N, head_dim))
        *reinterpret_cast<uint4*>(o_g + (int64_t)(m0 + r) * s_on + ch * 8) =
            *reinterpret_cast<const uint4*>(sQ + r * kPitch + ch * 8);
    }
  } else {
    for (int e = tid; e < kBlockM * PAD; e += kThreads) {
      const int r = e / PAD, col = e % PAD;
      if (m0 + r < N && col < head_dim) o_g[(int64_t)(m0 + r) * s_on + (int64_t)col * s_oc] = sQ[r * kPitch + col];
    }
  }
#else
  // mma.sync with bf16 and cp.async need sm_80+; the dispatcher never sends older devices here.
  __trap();
#endif
}

template <typename T, int PAD, bool kVec>
cudaError_t launch_typed(const void* qkv, void* out, int B, int N, int heads, int head_dim, int64_t s_qb,
                         int64_t s_qn, int64_t s_qc, int64_t s_ob, int64_t s_on, int64_t s_oc,
                         cudaStream_t stream) {
  auto kernel = verify_attention_kernel<T, PAD, kVec>;
  const int smem = (kBlockM + 2 * kBlockN) * smem_pitch(PAD) * 2;
  // > 48 KiB of dynamic shared memory (PAD 128) needs an opt-in, once per device
  // (one bit per device; re-setting it is harmless, so races are benign)
  static std::atomic<unsigned long long> opted_in{0};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const unsigned long long bit = 1ull << (dev & 63);
  if (!(opted_in.load(std::memory_order_relaxed) & bit)) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    opted_in.fetch_or(bit, std::memory_order_relaxed);
  }
  const int num_m_blocks = ceil_div(N, kBlockM);
  const long long grid = (long long)num_m_blocks * B * heads;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const float scale_log2 = static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(head_dim)));
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(
      static_cast<const uint16_t*>(qkv), static_cast<uint16_t*>(out), N, heads, head_dim, num_m_blocks, scale_log2,
      s_qb, s_qn, s_qc, s_ob, s_on, s_oc);
  return cudaGetLastError();
}

template <typename T, int PAD>
cudaError_t launch_aligned_or_not(const void* qkv, void* out, int B, int N, int heads, int head_dim, int64_t s_qb,
                                  int64_t s_qn, int64_t s_qc, int64_t s_ob, int64_t s_on, int64_t s_oc,
                                  cudaStream_t stream) {
  const bool vec = s_qc == 1 && s_oc == 1 && head_dim % 8 == 0 && s_qb % 8 == 0 && s_qn % 8 == 0 &&
                   s_ob % 8 == 0 && s_on % 8 == 0 && reinterpret_cast<uintptr_t>(qkv) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (vec) return launch_typed<T, PAD, true>(qkv, out, B, N, heads, head_dim, s_qb, s_qn, s_qc, s_ob, s_on, s_oc, stream);
  return launch_typed<T, PAD, false>(qkv, out, B, N, heads, head_dim, s_qb, s_qn, s_qc, s_ob, s_on, s_oc, stream);
}

template <typename T>
cudaError_t launch_dtype(const void* qkv, void* out, int B, int N, int heads, int head_dim, int64_t s_qb,
                         int64_t s_qn, int64_t s_qc, int64_t s_ob, int64_t s_on, int64_t s_oc, cudaStream_t stream) {
  switch (padded_head_dim(head_dim)) {
    case 64:
      return launch_aligned_or_not<T, 64>(qkv, out, B, N, heads, head_dim, s_qb, s_qn, s_qc, s_ob, s_on, s_oc, stream);
    case 80:
      return launch_aligned_or_not<T, 80>(qkv, out, B, N, heads, head_dim, s_qb, s_qn, s_qc, s_ob, s_on, s_oc, stream);
    case 128:
      return launch_aligned_or_not<T, 128>(qkv, out, B, N, heads, head_dim, s_qb, s_qn, s_qc, s_ob, s_on, s_oc, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

// dtype_code: fk::DType (dtype.h): kFloat16 or kBFloat16.  Strides in elements (any, including
// a slice of a bigger tensor).  head_dim 1..128.  Returns the launch error:
// cudaErrorInvalidValue for unsupported sizes or dtype codes.  Needs sm_80+
// (the Python dispatcher checks the device capability before calling).
cudaError_t launch_verify_attention(const void* qkv, void* out, int B, int N, int heads, int head_dim,
                                    int64_t s_qb, int64_t s_qn, int64_t s_qc, int64_t s_ob, int64_t s_on,
                                    int64_t s_oc, int dtype_code, cudaStream_t stream) {
  if (B < 0 || N < 0 || heads < 1 || padded_head_dim(head_dim) < 0) return cudaErrorInvalidValue;
  if (B == 0 || N == 0) return cudaSuccess;
  if (qkv == nullptr || out == nullptr) return cudaErrorInvalidValue;
  switch (static_cast<DType>(dtype_code)) {
    case DType::kFloat16:
      return launch_dtype<__half>(qkv, out, B, N, heads, head_dim, s_qb, s_qn, s_qc, s_ob, s_on, s_oc, stream);
    case DType::kBFloat16:
      return launch_dtype<__nv_bfloat16>(qkv, out, B, N, heads, head_dim, s_qb, s_qn, s_qc, s_ob, s_on, s_oc, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// Python entry point (free_kernels._C.verify_attention): raw pointers from
// tensor.data_ptr(), the stream from torch.cuda.current_stream().cuda_stream,
// launched on the current device.  Bad arguments raise ValueError (via
// std::invalid_argument), CUDA failures RuntimeError.
void verify_attention(uintptr_t qkv, uintptr_t out, int64_t B, int64_t N, int64_t heads, int64_t head_dim,
                      int64_t s_qb, int64_t s_qn, int64_t s_qc, int64_t s_ob, int64_t s_on, int64_t s_oc,
                      int64_t dtype_code, uintptr_t stream) {
  check_cuda_available();
  auto bad = [](const std::string& what) { throw std::invalid_argument("verify_attention: " + what); };
  if (B < 0 || N < 0 || B > INT32_MAX || N > INT32_MAX) bad("B and N must be in [0, 2^31)");
  if (heads < 1 || heads > INT32_MAX) bad("heads must be >= 1, got " + std::to_string(heads));
  if (head_dim < 1 || head_dim > 128) bad("head_dim must be in 1..128, got " + std::to_string(head_dim));
  if (dtype_code != static_cast<int64_t>(DType::kFloat16) && dtype_code != static_cast<int64_t>(DType::kBFloat16))
    bad("dtype_code must be 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype_code));
  if (s_qb < 0 || s_qn < 0 || s_qc < 0 || s_ob < 0 || s_on < 0 || s_oc < 0) bad("strides must be >= 0");
  if (B == 0 || N == 0) return;
  if (qkv == 0 || out == 0) bad("null pointer");
  if (qkv % 2 || out % 2) bad("pointers must be 2-byte aligned");
  if (static_cast<int64_t>(fk::ceil_div<int64_t>(N, kBlockM)) * B * heads > INT32_MAX) bad("grid too large");
  FK_CUDA_CHECK(launch_verify_attention(reinterpret_cast<const void*>(qkv), reinterpret_cast<void*>(out),
                                        static_cast<int>(B), static_cast<int>(N), static_cast<int>(heads),
                                        static_cast<int>(head_dim), s_qb, s_qn, s_qc, s_ob, s_on, s_oc,
                                        static_cast<int>(dtype_code), reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace fk

// draft_epilogue: drafted features -> next drafted state, in one kernel.
//
//   h (G*R, N, H)  ->  LayerNorm + adaLN modulate (shift / scale rows)
//                  ->  final linear (weight (p*p*C_out, H), bias), ON CHIP
//                  ->  unpatchify, classifier-free guidance (G = 2: rows [cond; uncond])
//                  ->  DDPM mean / log-variance at the row's respaced index
//                  ->  x_next = mean + exp(logvar / 2) * noise
//
// writing x_next, mean, logvar (and the noise used) as float32 (R, C, S, S).
// Scalar math: csrc/include/free_kernels/adaln_math.h (host-tested).  The
// Triton twin is free_kernels/triton/draft_epilogue.py, the oracle
// free_kernels/reference/draft_epilogue.py.
//
// One CTA (8 warps) = one sample row r and 16 / G tokens, i.e. exactly 16
// feature rows (both CFG halves of its tokens): one m16 tile.
//
//  1. LayerNorm: a warp per feature row copies the row into the shared A tile
//     (exact, in h's dtype; 16-byte loads, four per lane in flight, when the
//     row is contiguous and aligned), takes the two-pass statistics from shared
//     memory (fp32), then overwrites the row with the modulated values rounded
//     to h's dtype - the rounding point of the reference (LayerNorm output in dtype).
//  2. Linear, only the columns the transition needs: the eps part (p*p*C
//     columns) and, for learned variance, the variance part (p*p*C more); for
//     DiT-XL/2 32 of the 32 columns, for a fixed-variance learn_sigma model 16
//     of 32.  float16 / bfloat16: mma.sync m16n8k16 with fp32 accumulation, A
//     fragments from shared memory (conflict-free pitch, adaln::a_tile_pitch16),
//     B fragments (weight rows, k contiguous = the "col" operand) straight from
//     global memory / L1 - the weights are 2*p*p*C*H elements (74 KB for
//     DiT-XL/2), shared by every CTA, so they stay in L2.  One warp per n8
//     column tile; with fewer tiles than warps (DiT-XL/2: 4 tiles, 8 warps) the
//     K range is split over the idle warps and the partial accumulators are
//     summed through shared memory in a fixed order (deterministic).
//     float32 (and weights that are not 4-byte addressable in pairs): a warp
//     per column, lanes split K, fp32 FMAs, warp-shuffle reduction.
//  3. Epilogue, a thread per (token, eps column): bias, guidance, transition,
//     noise (given, or philox_randn(seed, offset + flat index,
//     kDraftNoiseSubsequence) - philox.h; the Triton twin draws the same
//     stream), stores.
//
// The (G*R, H) x (H, 2H) adaLN GEMM of c that produces shift / scale stays in
// torch (cuBLAS), as does everything before h.
//
// rng_state: int64 [seed, offset] on the device.  When noise is not given the
// kernel reads it and a one-thread kernel on the same stream then adds
// R*C*S*S to the offset: CUDA-graph replays draw fresh noise.  The same
// rng_state may also drive speculative_accept, whose streams (accept_math.h)
// use the Philox subsequence word (candidate, (sample << 2) | tag) with
// candidate field 0 for tags 0 (acceptance uniforms) and 1 (bonus normals):
// the draft noise takes tag 0 with candidate field 2^32 - 1, which no
// acceptance stream reaches, so drafts and acceptance tests never share
// random numbers (with subsequence 0 the draft noise of element j was a
// function of sample 0's acceptance uniform of slot j).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "free_kernels/adaln_math.h"
#include "free_kernels/common.h"
#include "free_kernels/cuda_check.h"
#include "free_kernels/device_types.h"
#include "free_kernels/entry_points.h"
#include "free_kernels/epilogue_args.h"

namespace fk {
namespace {

using adaln::kHeadRows;

constexpr int kWarps = 8;
using epilogue::kDraftNoiseSubsequence;
constexpr int kThreads = 32 * kWarps;

struct Strides4 {
  int64_t r, c, y, x;
};

struct Args {
  const void* h;
  const void* shift;
  const void* scale;
  const void* weight;
  const void* bias;
  const void* x;
  const void* noise;  // nullptr: draw from rng
  const float* tables;
  const int64_t* index;
  const int64_t* rng;
  float* out_x;
  float* out_mean;
  float* out_logvar;
  float* out_noise;  // nullptr: not written
  int G, R, N, H, C, S, p, C_out, grid_w;
  int PE, Q, Qp, T, n_tb, pitch, gc;
  int x_code, z_code;
  bool learned, xstart, clip;
  float eps, cfg_scale;
  int64_t tab_stride;
  int64_t s_hb, s_hn, s_hh, s_sb, s_sh, s_cb, s_ch, s_wo, s_wk, s_bias;
  Strides4 xs, zs, oxs, oms, ovs, ozs;
  bool vec_h;    // h rows: unit stride, 16-byte aligned -> 16-byte loads
  bool vec_mod;  // shift / scale rows: likewise
};

// by value: taking the address of a kernel-parameter array would force a local copy
__device__ __forceinline__ int64_t off4(const Strides4 s, int64_t r, int c, int y, int x) {
  return r * s.r + c * s.c + y * s.y + x * s.x;
}

// weight row of GEMM column q (eps columns [0, PE), variance columns [PE, 2 PE)), -1 past Q
__device__ __forceinline__ int column_row(const Args& a, const adaln::PatchLayout& L, int q) {
  if (q >= a.Q) return -1;
  return q < a.PE ? L.weight_row(q) : L.weight_row(q - a.PE) + a.C;
}

template <typename T, bool kMma>
__global__ void __launch_bounds__(kThreads) draft_epilogue_kernel(const Args a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* A = reinterpret_cast<T*>(smem_raw);                                          // kHeadRows x pitch
  float* mo = reinterpret_cast<float*>(smem_raw + sizeof(T) * kHeadRows * a.pitch);  // kHeadRows x Qp
  __shared__ adaln::RowCoefs coefs;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int r = blockIdx.x / a.n_tb;
  const int n0 = (blockIdx.x % a.n_tb) * a.T;
  const adaln::PatchLayout L{a.p, a.C, a.C_out, a.grid_w};
  const T* h = static_cast<const T*>(a.h);

  if (tid == 0) coefs = adaln::load_row_coefs(a.tables, a.tab_stride, a.index[r]);

  // ---- 1. modulated LayerNorm rows into the A tile (row = g * T + t)
  // Loads go kChunk vectors per lane at a time (independent loads in flight: the
  // row is read once from DRAM, so latency, not bandwidth, bounds this stage).
  constexpr int kV = 16 / static_cast<int>(sizeof(T));
  constexpr int kChunk = 4;
  using P = Pack<T, kV>;
  for (int row = warp; row < kHeadRows; row += kWarps) {
    T* arow = A + row * a.pitch;
    const int g = row / a.T, n = n0 + row % a.T;
    if (g >= a.G || n >= a.N) {  // padding rows of a partial token block: zeros
      for (int k = lane; k < a.pitch; k += 32) arow[k] = from_f32<T>(0.f);
      continue;
    }
    const int64_t hr = static_cast<int64_t>(g) * a.R + r;
    const T* hp = h + hr * a.s_hb + n * a.s_hn;
    float sum = 0.f;
    if (a.vec_h) {
      for (int base = lane * kV; base < a.H; base += 32 * kV * kChunk) {
        P v[kChunk];
#pragma unroll
        for (int i = 0; i < kChunk; ++i)
          if (base + i * 32 * kV < a.H) v[i] = *reinterpret_cast<const P*>(hp + base + i * 32 * kV);
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          if (base + i * 32 * kV < a.H) {
            *reinterpret_cast<P*>(arow + base + i * 32 * kV) = v[i];
#pragma unroll
            for (int j = 0; j < kV; ++j) sum += to_f32(v[i].e[j]);
          }
        }
      }
    } else {
#pragma unroll 4
      for (int k = lane; k < a.H; k += 32) {
        const T v = hp[k * a.s_hh];
        arow[k] = v;
        sum += to_f32(v);
      }
    }
    __syncwarp();  // pass 2 reads elements other lanes stored (vector path)
    const float mean = warp_sum(sum) / a.H;
    float sq = 0.f;
#pragma unroll 4
    for (int k = lane; k < a.H; k += 32) {
      const float d = to_f32(arow[k]) - mean;
      sq += d * d;
    }
    const float rstd = 1.0f / sqrtf(warp_sum(sq) / a.H + a.eps);
    const T* shp = static_cast<const T*>(a.shift) + hr * a.s_sb;
    const T* scp = static_cast<const T*>(a.scale) + hr * a.s_cb;
    if (a.vec_mod) {
      for (int base = lane * kV; base < a.H; base += 32 * kV * kChunk) {
        P sh[kChunk], sc[kChunk];
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          if (base + i * 32 * kV < a.H) {
            sh[i] = *reinterpret_cast<const P*>(shp + base + i * 32 * kV);
            sc[i] = *reinterpret_cast<const P*>(scp + base + i * 32 * kV);
          }
        }
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          const int k = base + i * 32 * kV;
          if (k < a.H) {
            P v = *reinterpret_cast<const P*>(arow + k);
#pragma unroll
            for (int j = 0; j < kV; ++j)
              v.e[j] = from_f32<T>(adaln::modulate((to_f32(v.e[j]) - mean) * rstd, to_f32(sh[i].e[j]),
                                                   to_f32(sc[i].e[j])));
            *reinterpret_cast<P*>(arow + k) = v;
          }
        }
      }
    } else {
#pragma unroll 4
      for (int k = lane; k < a.H; k += 32) {
        const float y = adaln::modulate((to_f32(arow[k]) - mean) * rstd, to_f32(shp[k * a.s_sh]),
                                        to_f32(scp[k * a.s_ch]));
        arow[k] = from_f32<T>(y);
      }
    }
    for (int k = a.H + lane; k < a.pitch; k += 32) arow[k] = from_f32<T>(0.f);  // K tail of the mma
  }
  __syncthreads();

  // ---- 2. the head's linear on the needed columns -> mo (fp32)
  const T* w = static_cast<const T*>(a.weight);
  if constexpr (kMma) {
    // one n8 column tile per job; when there are fewer tiles than warps, the K range of a tile
    // is split over wpt warps and the partial accumulators are summed in a fixed order
    __shared__ float red[kWarps * 128];
    const int gq = lane >> 2, tq = lane & 3;
    const int tiles = a.Qp / 8;
    const int wpt = tiles >= kWarps ? 1 : kWarps / tiles;
    const int ksteps = (a.pitch - 8) / 16;  // H rounded up to 16, in k16 steps
    const int per = (ksteps + wpt - 1) / wpt;
    for (int job = warp; job < tiles * wpt; job += kWarps) {
      const int tile = job / wpt, part = job % wpt;
      const int o = column_row(a, L, tile * 8 + gq);  // this lane's B column (n = gq)
      const T* wrow = w + (o < 0 ? 0 : static_cast<int64_t>(o) * a.s_wo);
      float c[4] = {0.f, 0.f, 0.f, 0.f};
      const int s_end = (part + 1) * per < ksteps ? (part + 1) * per : ksteps;
#pragma unroll 4
      for (int st = part * per; st < s_end; ++st) {
        const int k0 = st * 16;
        uint32_t af[4];
        const T* a_lo = A + gq * a.pitch + k0 + 2 * tq;
        const T* a_hi = a_lo + 8 * a.pitch;
        af[0] = *reinterpret_cast<const uint32_t*>(a_lo);
        af[1] = *reinterpret_cast<const uint32_t*>(a_hi);
        af[2] = *reinterpret_cast<const uint32_t*>(a_lo + 8);
        af[3] = *reinterpret_cast<const uint32_t*>(a_hi + 8);
        const int k_b = k0 + 2 * tq;  // H is even on this path: a pair is all in or all out
        const uint32_t b0 = (o >= 0 && k_b < a.H) ? __ldg(reinterpret_cast<const unsigned int*>(wrow + k_b)) : 0u;
        const uint32_t b1 =
            (o >= 0 && k_b + 8 < a.H) ? __ldg(reinterpret_cast<const unsigned int*>(wrow + k_b + 8)) : 0u;
        Mma<T>::run(c, af, b0, b1);
      }
      if (wpt == 1) {
        const int col = tile * 8 + 2 * tq;
        mo[gq * a.Qp + col] = c[0];
        mo[gq * a.Qp + col + 1] = c[1];
        mo[(gq + 8) * a.Qp + col] = c[2];
        mo[(gq + 8) * a.Qp + col + 1] = c[3];
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) red[job * 128 + lane * 4 + i] = c[i];
      }
    }
    if (wpt > 1) {
      __syncthreads();
      for (int idx = tid; idx < tiles * 128; idx += kThreads) {
        const int tile = idx / 128, e = idx % 128, ln = e / 4, i = e % 4;
        float v = 0.f;
        for (int part = 0; part < wpt; ++part) v += red[(tile * wpt + part) * 128 + e];
        const int row = (ln >> 2) + (i >> 1) * 8, col = tile * 8 + 2 * (ln & 3) + (i & 1);
        mo[row * a.Qp + col] = v;
      }
    }
  } else {
    for (int q = warp; q < a.Q; q += kWarps) {
      const int o = column_row(a, L, q);
      const int rows = q < a.PE ? kHeadRows : a.T;  // variance columns: cond rows only
      float acc[kHeadRows];
#pragma unroll
      for (int i = 0; i < kHeadRows; ++i) acc[i] = 0.f;
#pragma unroll 4
      for (int k = lane; k < a.H; k += 32) {
        const float wv = to_f32(w[static_cast<int64_t>(o) * a.s_wo + k * a.s_wk]);
#pragma unroll
        for (int i = 0; i < kHeadRows; ++i)
          if (i < rows) acc[i] = fmaf(to_f32(A[i * a.pitch + k]), wv, acc[i]);
      }
#pragma unroll
      for (int i = 0; i < kHeadRows; ++i) {
        const float v = warp_sum(acc[i]);
        if (lane == 0) mo[i * a.Qp + q] = v;
      }
    }
  }
  __syncthreads();

  // ---- 3. bias, guidance, transition, noise, stores
  const T* bias = static_cast<const T*>(a.bias);
  const adaln::RowCoefs k = coefs;
  const int64_t D = static_cast<int64_t>(a.C) * a.S * a.S;
  for (int idx = tid; idx < a.T * a.PE; idx += kThreads) {
    const int t = idx / a.PE, e = idx % a.PE, n = n0 + t;
    if (n >= a.N) continue;
    int ch, prow, pcol;
    L.pixel(n, e, &ch, &prow, &pcol);
    const int o = L.weight_row(e);
    const float b_eps = to_f32(bias[o * a.s_bias]);
    float out = mo[t * a.Qp + e] + b_eps;
    if (a.G == 2 && ch < a.gc) out = adaln::guide(out, mo[(a.T + t) * a.Qp + e] + b_eps, a.cfg_scale);
    const float var_value = a.learned ? mo[t * a.Qp + a.PE + e] + to_f32(bias[(o + a.C) * a.s_bias]) : 0.f;
    const float xv = load_any(a.x, a.x_code, off4(a.xs, r, ch, prow, pcol));
    const adaln::Transition tr = adaln::ddpm_transition(out, var_value, xv, k, a.learned, a.xstart, a.clip);
    float z;
    if (a.noise != nullptr) {
      z = load_any(a.noise, a.z_code, off4(a.zs, r, ch, prow, pcol));
    } else {
      const uint64_t seed = static_cast<uint64_t>(a.rng[0]);
      const uint64_t offset = static_cast<uint64_t>(a.rng[1]);
      z = philox_randn(seed, offset + static_cast<uint64_t>(r * D + L.flat(ch, prow, pcol)), kDraftNoiseSubsequence);
    }
    a.out_x[off4(a.oxs, r, ch, prow, pcol)] = adaln::sample_from(tr, z);
    a.out_mean[off4(a.oms, r, ch, prow, pcol)] = tr.mean;
    a.out_logvar[off4(a.ovs, r, ch, prow, pcol)] = tr.logvar;
    if (a.out_noise != nullptr) a.out_noise[off4(a.ozs, r, ch, prow, pcol)] = z;
  }
}

__global__ void advance_rng_offset(int64_t* rng, int64_t n) {
  if (threadIdx.x == 0) rng[1] += n;
}

using epilogue::bad;

// Dynamic shared memory above a kernel's default allowance (48 KiB minus its STATIC shared
// memory: the row coefficients, and the 4 KiB split-K reduction buffer on the mma path) needs an
// opt-in, and CUDA rejects an opt-in with static + dynamic above the device's per-block opt-in
// maximum (227 KiB on sm_90, 163 KiB on sm_80).  So request only what this call needs, after
// checking that static + dynamic fits; the size granted so far is cached per (kernel instance,
// device); the slow path is serialised, and the allowance only ever grows.
template <typename T, bool kMma>
cudaError_t ensure_smem(int smem, int64_t H) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> granted[kMaxDevices];  // static storage: zero = nothing known yet
  static std::mutex mu;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const bool cached = dev >= 0 && dev < kMaxDevices;
  if (cached && smem <= granted[dev].load(std::memory_order_acquire)) return cudaSuccess;
  std::lock_guard<std::mutex> lock(mu);
  const int have = cached ? granted[dev].load(std::memory_order_relaxed) : 0;
  if (smem <= have) return cudaSuccess;
  cudaFuncAttributes fa{};  // maxDynamicSharedSizeBytes: the current allowance (default or an earlier grant)
  err = cudaFuncGetAttributes(&fa, draft_epilogue_kernel<T, kMma>);
  if (err != cudaSuccess) return err;
  int grant = fa.maxDynamicSharedSizeBytes;
  if (smem > grant) {  // grow the allowance to exactly this call's need
    int limit = 0;
    err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (err != cudaSuccess) return err;
    if (static_cast<int64_t>(fa.sharedSizeBytes) + smem > limit)
      bad("H=" + std::to_string(H) + " needs " + std::to_string(fa.sharedSizeBytes) + " B static + " +
          std::to_string(smem) + " B dynamic shared memory per block, more than this device's opt-in limit of " +
          std::to_string(limit) + " B");
    err = cudaFuncSetAttribute(draft_epilogue_kernel<T, kMma>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    grant = smem;
  }
  if (cached) granted[dev].store(grant, std::memory_order_release);
  return cudaSuccess;
}

template <typename T, bool kMma>
cudaError_t launch_typed(const Args& a, int smem, cudaStream_t stream) {
  cudaError_t err = ensure_smem<T, kMma>(smem, a.H);
  if (err != cudaSuccess) return err;
  const unsigned grid = static_cast<unsigned>(static_cast<int64_t>(a.R) * a.n_tb);
  draft_epilogue_kernel<T, kMma><<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

void draft_epilogue(uintptr_t h, uintptr_t shift, uintptr_t scale, uintptr_t weight, uintptr_t bias, uintptr_t x,
                    uintptr_t tables, uintptr_t index, uintptr_t noise, uintptr_t rng_state, uintptr_t out_x,
                    uintptr_t out_mean, uintptr_t out_logvar, uintptr_t out_noise,
                    const std::vector<int64_t>& strides, const std::vector<int64_t>& dtype_codes, int64_t G,
                    int64_t R, int64_t N, int64_t H, int64_t C, int64_t S, int64_t patch_size, int64_t weight_rows,
                    int64_t table_stride, double eps, double cfg_scale, int64_t guidance_channels,
                    bool learned_variance, bool predict_xstart, bool clip_denoised, uintptr_t stream) {
  check_cuda_available();
  const epilogue::Dims d =
      epilogue::check_args(h, shift, scale, weight, bias, x, tables, index, noise, rng_state, out_x, out_mean,
                           out_logvar, out_noise, strides, dtype_codes, G, R, N, H, C, S, patch_size, weight_rows,
                           table_stride, guidance_channels, learned_variance);
  if (R == 0) return;

  Args a{};
  a.h = reinterpret_cast<const void*>(h);
  a.shift = reinterpret_cast<const void*>(shift);
  a.scale = reinterpret_cast<const void*>(scale);
  a.weight = reinterpret_cast<const void*>(weight);
  a.bias = reinterpret_cast<const void*>(bias);
  a.x = reinterpret_cast<const void*>(x);
  a.noise = noise ? reinterpret_cast<const void*>(noise) : nullptr;
  a.tables = reinterpret_cast<const float*>(tables);
  a.index = reinterpret_cast<const int64_t*>(index);
  a.rng = rng_state ? reinterpret_cast<const int64_t*>(rng_state) : nullptr;
  a.out_x = reinterpret_cast<float*>(out_x);
  a.out_mean = reinterpret_cast<float*>(out_mean);
  a.out_logvar = reinterpret_cast<float*>(out_logvar);
  a.out_noise = out_noise ? reinterpret_cast<float*>(out_noise) : nullptr;
  a.G = d.G;
  a.R = d.R;
  a.N = d.N;
  a.H = d.H;
  a.C = d.C;
  a.S = d.S;
  a.p = d.p;
  a.C_out = d.C_out;
  a.grid_w = d.grid_w;
  a.PE = d.PE;
  a.Q = d.Q;
  a.Qp = (a.Q + 7) / 8 * 8;
  a.T = kHeadRows / a.G;
  a.n_tb = static_cast<int>(ceil_div<int64_t>(N, a.T));
  a.pitch = adaln::a_tile_pitch16(a.H);
  a.gc = d.gc;
  a.x_code = static_cast<int>(dtype_codes[1]);
  a.z_code = static_cast<int>(dtype_codes[2]);
  a.learned = learned_variance;
  a.xstart = predict_xstart;
  a.clip = clip_denoised;
  a.eps = static_cast<float>(eps);
  a.cfg_scale = static_cast<float>(cfg_scale);
  a.tab_stride = table_stride;
  const int64_t* s = strides.data();
  a.s_hb = s[0]; a.s_hn = s[1]; a.s_hh = s[2];
  a.s_sb = s[3]; a.s_sh = s[4];
  a.s_cb = s[5]; a.s_ch = s[6];
  a.s_wo = s[7]; a.s_wk = s[8];
  a.s_bias = s[9];
  auto four = [&](int i) { return Strides4{s[i], s[i + 1], s[i + 2], s[i + 3]}; };
  a.xs = four(10);
  a.zs = four(14);
  a.oxs = four(18);
  a.oms = four(22);
  a.ovs = four(26);
  a.ozs = four(30);
  if (static_cast<int64_t>(R) * a.n_tb > INT32_MAX) bad("grid too large");
  {
    const int64_t kv = dtype_codes[0] == 0 ? 4 : 8;  // elements per 16-byte vector
    a.vec_h = a.s_hh == 1 && H % kv == 0 && a.s_hb % kv == 0 && a.s_hn % kv == 0 && h % 16 == 0;
    a.vec_mod = a.s_sh == 1 && a.s_ch == 1 && H % kv == 0 && a.s_sb % kv == 0 && a.s_cb % kv == 0 &&
                shift % 16 == 0 && scale % 16 == 0;
  }

  const int code = static_cast<int>(dtype_codes[0]);
  const size_t elem = code == 0 ? 4 : 2;
  const int64_t smem = static_cast<int64_t>(elem) * kHeadRows * a.pitch + 4LL * kHeadRows * a.Qp;
  if (smem > 227 * 1024) bad("H too large for the shared-memory A tile (" + std::to_string(smem) + " bytes)");
  if (weight % elem || h % elem || shift % elem || scale % elem || bias % elem) bad("misaligned pointer");
  // the mma path loads weight pairs as 32-bit words
  const bool mma = code != 0 && a.H % 2 == 0 && a.s_wk == 1 && a.s_wo % 2 == 0 && weight % 4 == 0;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int sm = static_cast<int>(smem);
  switch (code) {
    case 0: FK_CUDA_CHECK((launch_typed<float, false>(a, sm, st))); break;
    case 1: FK_CUDA_CHECK(mma ? (launch_typed<__half, true>(a, sm, st)) : (launch_typed<__half, false>(a, sm, st))); break;
    default:
      FK_CUDA_CHECK(mma ? (launch_typed<__nv_bfloat16, true>(a, sm, st)) : (launch_typed<__nv_bfloat16, false>(a, sm, st)));
      break;
  }
  if (a.noise == nullptr) {
    advance_rng_offset<<<1, 32, 0, st>>>(reinterpret_cast<int64_t*>(rng_state), static_cast<int64_t>(R) * C * S * S);
    FK_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace fk

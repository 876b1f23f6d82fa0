// Host emulation of the small part of CUDA that csrc/kernels/*.cu use, for
// running kernels on a CPU-only machine in tests (no GPU, no CUDA runtime).
//
// A "launch" runs the grid's blocks one after another on blockDim.x
// std::threads, so __syncthreads and warp shuffles / ballots are real
// barriers between real threads (C++20 std::barrier).  __shared__
// becomes `static`: shared by the threads of the running block, reused by the
// next block (blocks never overlap).  Device pointers are host pointers.
//
// Shared-memory limits ARE emulated, as a device enforces them: a launch with
// more dynamic shared memory than the kernel's allowance fails (the allowance is
// 48 KiB minus the kernel's static shared memory until cudaFuncSetAttribute
// raises it), and cudaFuncSetAttribute(MaxDynamicSharedMemorySize, n) fails
// when static + n exceeds the emulated per-block opt-in limit
// (fk_emu::g_optin_smem: 227 KiB as on sm_90; 163 KiB on sm_80).  The
// emulation cannot measure a kernel's static __shared__ footprint (it becomes
// a plain `static`), so it charges every kernel fk_emu::g_static_smem bytes
// (default 4160: the largest footprint of the emulated kernels, draft_epilogue's
// 4 KiB split-K buffer plus its row coefficients) - any nonzero value catches an
// opt-in of the whole device limit.
//
// Not emulated: memory-model corner cases beyond barrier ordering, timing,
// occupancy, atomics, textures.  It checks the kernels' LOGIC (indexing,
// reductions, decisions, loops), not their performance.
//
// Used through tests/cuda_emulation/harness.py: a .cu is copied with its
// `kernel<<<grid, block, smem, stream>>>(args)` launches rewritten to
// `fk_emu::launch(kernel, grid, block, smem, stream, args)` (and mma.sync calls,
// `Mma<T>::run(...)`, to the lane-exact software `fk_emu_mma<T>(...)` below) and
// compiled with g++ -std=c++20 -pthread -include fk_cuda_emu.h -I tests/cuda_emulation
// (whose cuda_*.h stand-ins lead back here).
#pragma once

#include <array>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <math.h>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct fk_emu_uint3 {
  unsigned x, y, z;
};
inline thread_local fk_emu_uint3 threadIdx{0, 0, 0};
inline thread_local fk_emu_uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// ---- runtime API subset
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 4,
  cudaErrorInvalidConfiguration = 9,
};
typedef struct fk_emu_stream* cudaStream_t;
inline thread_local cudaError_t fk_emu_last_error = cudaSuccess;
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = fk_emu_last_error;
  fk_emu_last_error = cudaSuccess;
  return e;
}

// ---- kernel attributes and the shared-memory rules of a device
struct cudaFuncAttributes {
  size_t sharedSizeBytes;         // static shared memory
  size_t constSizeBytes;
  size_t localSizeBytes;
  int maxThreadsPerBlock;
  int numRegs;
  int ptxVersion;
  int binaryVersion;
  int cacheModeCA;
  int maxDynamicSharedSizeBytes;  // the current dynamic allowance
  int preferredShmemCarveout;
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 0, cudaFuncAttributePreferredSharedMemoryCarveout = 1 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };

namespace fk_emu {
inline size_t g_optin_smem = 227 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin of sm_90
inline size_t g_static_smem = 4160;       // charged to every kernel (see the file comment)
constexpr size_t kDefaultSmem = 48 * 1024;
inline std::mutex g_attr_mu;
inline std::map<const void*, int>& dynamic_allowance() {
  static std::map<const void*, int> m;
  return m;
}
inline int allowance_of(const void* f) {
  std::lock_guard<std::mutex> lock(g_attr_mu);
  auto it = dynamic_allowance().find(f);
  return it != dynamic_allowance().end() ? it->second : static_cast<int>(kDefaultSmem - g_static_smem);
}
}  // namespace fk_emu

template <typename... KArgs>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, void (*f)(KArgs...)) {
  *attr = cudaFuncAttributes{};
  attr->sharedSizeBytes = fk_emu::g_static_smem;
  attr->maxThreadsPerBlock = 1024;
  attr->maxDynamicSharedSizeBytes = fk_emu::allowance_of(reinterpret_cast<const void*>(f));
  return cudaSuccess;
}

template <typename... KArgs>
cudaError_t cudaFuncSetAttribute(void (*f)(KArgs...), int attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || fk_emu::g_static_smem + static_cast<size_t>(value) > fk_emu::g_optin_smem) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(fk_emu::g_attr_mu);
  fk_emu::dynamic_allowance()[reinterpret_cast<const void*>(f)] = value;
  return cudaSuccess;
}

// one emulated device, 0, with the opt-in limit above
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = static_cast<int>(fk_emu::g_optin_smem);
  return cudaSuccess;
}

inline const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorEmulated"; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }

// ---- half types (storage + round-to-nearest-even conversions)
struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "half types must be 2 bytes");

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

namespace fk_emu {

struct Block {
  explicit Block(unsigned threads) : bar(threads) {
    const unsigned warps = (threads + 31) / 32;
    for (unsigned w = 0; w < warps; ++w) warp_bars.emplace_back(std::make_unique<std::barrier<>>(32));
    warp_buf.resize(warps);
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<std::array<uint64_t, 32>> warp_buf;
};

inline Block* g_block = nullptr;

inline unsigned lane() { return threadIdx.x & 31u; }
inline unsigned warp() { return threadIdx.x >> 5; }

// All 32 lanes publish a value, then each reads lane `src`'s.
template <typename T>
T exchange(T v, unsigned src) {
  static_assert(sizeof(T) <= 8, "exchange of at most 8 bytes");
  auto& buf = g_block->warp_buf[warp()];
  auto& bar = *g_block->warp_bars[warp()];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  buf[lane()] = bits;
  bar.arrive_and_wait();
  const uint64_t r = buf[src & 31u];
  bar.arrive_and_wait();
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

// One std::thread per thread of a block, created once per launch; they run
// the grid's blocks in order, with a block-wide barrier between blocks (so
// `static` shared memory is never used by two blocks at once).  A kernel
// thread that returns early must do so together with its whole block (true of
// the kernels tested here), as std::barrier counts every thread in each phase.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t /*stream*/,
            Args&&... args) {
  if (block.y != 1 || block.z != 1 || block.x % 32 != 0 || block.x > 1024) {
    fk_emu_last_error = cudaErrorInvalidValue;
    return;
  }
  if (smem > static_cast<size_t>(allowance_of(reinterpret_cast<const void*>(kernel)))) {
    fk_emu_last_error = cudaErrorInvalidValue;  // a device: "too many resources requested for launch"
    return;
  }
  Block blk(block.x);
  g_block = &blk;
  std::vector<std::thread> threads;
  threads.reserve(block.x);
  for (unsigned t = 0; t < block.x; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = fk_emu_uint3{t, 0, 0};
      blockDim = block;
      gridDim = grid;
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = fk_emu_uint3{x, y, z};
            kernel(args...);
            blk.bar.arrive_and_wait();  // the block is done before the next one starts
          }
    });
  }
  for (auto& th : threads) th.join();
  g_block = nullptr;
}

}  // namespace fk_emu

inline void __syncthreads() { fk_emu::g_block->bar.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  return fk_emu::exchange(v, fk_emu::lane() ^ static_cast<unsigned>(lane_mask));
}

template <typename T>
T __shfl_sync(unsigned /*mask*/, T v, int src) {
  return fk_emu::exchange(v, static_cast<unsigned>(src));
}

inline unsigned __ballot_sync(unsigned /*mask*/, int pred) {
  auto& buf = fk_emu::g_block->warp_buf[fk_emu::warp()];
  auto& bar = *fk_emu::g_block->warp_bars[fk_emu::warp()];
  buf[fk_emu::lane()] = pred ? 1u : 0u;
  bar.arrive_and_wait();
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l) m |= (buf[l] ? 1u : 0u) << l;
  bar.arrive_and_wait();
  return m;
}

inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) {
  fk_emu::g_block->warp_bars[fk_emu::warp()]->arrive_and_wait();
}

// ---- tensor cores
// mma.sync.m16n8k16.row.col with fp32 accumulation (the device's Mma<T>::run,
// device_types.h), lane-exact: every lane publishes its A / B registers, then
// computes its four accumulator elements from the PTX fragment layout (A: lane
// (g, t) holds rows g, g+8 x cols 2t, 2t+1, 2t+8, 2t+9; B: k 2t, 2t+1, 2t+8,
// 2t+9 of col g; C: rows g, g+8 x cols 2t, 2t+1).  T: __half or __nv_bfloat16.
template <typename T>
void fk_emu_mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  static_assert(sizeof(T) == 2, "mma operands are 16-bit");
  uint32_t A[32][4], B[32][2];
  for (int s = 0; s < 32; ++s) {
    for (int j = 0; j < 4; ++j) A[s][j] = __shfl_sync(0xffffffffu, a[j], s);
    B[s][0] = __shfl_sync(0xffffffffu, b0, s);
    B[s][1] = __shfl_sync(0xffffffffu, b1, s);
  }
  auto half = [](uint32_t w, int hi) {
    const uint16_t bits = static_cast<uint16_t>(hi ? w >> 16 : w & 0xffffu);
    T v;
    std::memcpy(&v, &bits, 2);
    if constexpr (std::is_same_v<T, __half>) {
      return __half2float(v);
    } else {
      return __bfloat162float(v);
    }
  };
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >> 1) * 8, col = 2 * t + (i & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) {
      const float av = half(A[(row % 8) * 4 + (k % 8) / 2][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k & 1);
      const float bv = half(B[col * 4 + (k % 8) / 2][k >= 8 ? 1 : 0], k & 1);
      acc += av * bv;
    }
    c[i] += acc;
  }
}

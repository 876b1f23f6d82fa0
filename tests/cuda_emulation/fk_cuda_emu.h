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
// Used by tests/test_speculative_accept.py: the .cu is copied with its
// `kernel<<<grid, block, smem, stream>>>(args)` launches rewritten to
// `fk_emu::launch(kernel, grid, block, smem, stream, args)` and compiled with
// g++ -std=c++20 -pthread -include fk_cuda_emu.h -I tests/cuda_emulation.
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
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

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
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4 };
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
// value 0 matches the stand-in macros some tests define for this name
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 0, cudaFuncAttributePreferredSharedMemoryCarveout = 1 };

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

// More specialised than a catch-all stand-in `template <typename F> cudaFuncSetAttribute(F, int, int)`,
// so overload resolution picks this one for kernels.
template <typename... KArgs>
cudaError_t cudaFuncSetAttribute(void (*f)(KArgs...), int attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || fk_emu::g_static_smem + static_cast<size_t>(value) > fk_emu::g_optin_smem) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(fk_emu::g_attr_mu);
  fk_emu::dynamic_allowance()[reinterpret_cast<const void*>(f)] = value;
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

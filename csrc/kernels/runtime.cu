// CUDA runtime probes shared by every entry point: is CUDA usable here, and
// versions.  The runtime is linked statically (cudart_static), so importing
// the extension never needs libcudart; libcuda (the driver) is looked up only
// when one of these functions first touches the runtime.
#include <cuda_runtime_api.h>

#include <atomic>
#include <stdexcept>
#include <string>

#include "free_kernels/cuda_check.h"
#include "free_kernels/entry_points.h"

namespace fk {

namespace {

// Set once a device was seen; afterwards the check is one relaxed load, so it
// costs nothing measurable in a launch-bound draft loop.
std::atomic<bool> g_cuda_ok{false};

std::string version_string(int v) {
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

std::string hint_for(cudaError_t err) {
  switch (err) {
    case cudaErrorInsufficientDriver: {
      int driver = 0;
      (void)cudaDriverGetVersion(&driver);  // 0 when no driver is installed
      if (driver == 0) return "no NVIDIA driver found";
      return "the NVIDIA driver supports CUDA " + version_string(driver) +
             " but this extension was built with the CUDA " + version_string(CUDART_VERSION) +
             " runtime: update the driver or rebuild with an older CUDA toolkit";
    }
    case cudaErrorNoDevice:
      return "no CUDA device is visible; check CUDA_VISIBLE_DEVICES";
    case cudaErrorInitializationError:
      return "no NVIDIA driver?";
    default:
      return "";
  }
}

}  // namespace

std::string cuda_unusable_reason() {
  if (g_cuda_ok.load(std::memory_order_relaxed)) return {};
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // the probe's error is not sticky: clear it for later calls
    std::string msg = cudaGetErrorString(err);
    msg += " (";
    msg += cudaGetErrorName(err);
    msg += ")";
    const std::string hint = hint_for(err);
    if (!hint.empty()) msg += " (" + hint + ")";
    return msg;
  }
  if (count == 0) return "no CUDA device is visible (check CUDA_VISIBLE_DEVICES)";
  g_cuda_ok.store(true, std::memory_order_relaxed);
  return {};
}

void check_cuda_available() {
  if (g_cuda_ok.load(std::memory_order_relaxed)) return;
  const std::string why = cuda_unusable_reason();
  if (!why.empty()) throw std::runtime_error("free_kernels._C: CUDA is not usable here: " + why);
}

int device_count() {
  check_cuda_available();
  int count = 0;
  FK_CUDA_CHECK(cudaGetDeviceCount(&count));
  return count;
}

int cuda_runtime_version() {
  int v = 0;
  FK_CUDA_CHECK(cudaRuntimeGetVersion(&v));  // answers without a driver
  return v;
}

int cuda_driver_version() {
  int v = 0;
  FK_CUDA_CHECK(cudaDriverGetVersion(&v));  // 0 without a driver, not an error
  return v;
}

}  // namespace fk

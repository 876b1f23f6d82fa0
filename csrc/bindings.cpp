// free_kernels._C: the one pybind11 module of the package.
//
// Compiled by the host C++ compiler only (no CUDA or torch headers), in two
// flavours selected by CMake:
//   FK_WITH_CUDA=1  kernels from csrc/kernels/*.cu are linked in, with the CUDA
//                   runtime linked statically;
//   FK_WITH_CUDA=0  host-only build (FREE_KERNELS_SKIP_CUDA=1 or no nvcc): every
//                   CUDA entry point still exists and raises RuntimeError saying
//                   the extension was built without CUDA.
// The host-side functions (Philox, math helpers) are identical in both and run
// the same code as the kernels (csrc/include/free_kernels/), so Python tests can
// compare the Triton and PyTorch paths against them on a CPU-only machine.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "free_kernels/common.h"
#include "free_kernels/dtype.h"
#include "free_kernels/entry_points.h"

// Compile definitions set by CMakeLists.txt (defaults keep a bare compile working).
#ifndef FK_WITH_CUDA
#define FK_WITH_CUDA 0
#endif
#ifndef FK_VERSION
#define FK_VERSION "0.0.0+unknown"
#endif
#ifndef FK_CUDA_ARCHS
#define FK_CUDA_ARCHS ""
#endif
#ifndef FK_CUDA_COMPILER_VERSION
#define FK_CUDA_COMPILER_VERSION ""
#endif
#ifndef FK_CUDA_DISABLED_REASON
#define FK_CUDA_DISABLED_REASON "host-only build"
#endif
#ifndef FK_BUILD_TYPE
#define FK_BUILD_TYPE ""
#endif
#ifndef FK_CXX_COMPILER
#define FK_CXX_COMPILER ""
#endif

namespace py = pybind11;

namespace {

// "80,90a,100-real" -> {80, 90, 100}: the numeric SM versions of the CMake
// architecture list, in order, without duplicates.  Entries without a leading
// number ("native", "all") are skipped; build_info() keeps the raw string.
std::vector<int> parse_archs(const std::string& list) {
  std::vector<int> out;
  size_t i = 0;
  while (i < list.size()) {
    size_t end = list.find(',', i);
    if (end == std::string::npos) end = list.size();
    int value = 0;
    bool any = false;
    for (size_t k = i; k < end && list[k] >= '0' && list[k] <= '9'; ++k) {
      value = value * 10 + (list[k] - '0');
      any = true;
    }
    bool seen = false;
    for (int v : out) seen = seen || v == value;
    if (any && !seen) out.push_back(value);
    i = end + 1;
  }
  return out;
}

#if !FK_WITH_CUDA
std::string without_cuda_message(const std::string& name) {
  return "free_kernels._C." + name + ": this extension was built without CUDA (" FK_CUDA_DISABLED_REASON
         "); reinstall with nvcc available and FREE_KERNELS_SKIP_CUDA unset to use CUDA kernels";
}

// Host-only build: a stub with the entry point's name that raises.
void def_without_cuda(py::module_& m, const char* name, const char* doc) {
  const std::string fn_name = name;
  m.def(
      name,
      [fn_name](const py::args&, const py::kwargs&) -> py::object {
        throw std::runtime_error(without_cuda_message(fn_name));
      },
      doc);
}
#endif

[[maybe_unused]] std::string version_string(int v) {
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

py::array_t<float> new_f32(int64_t n, const char* fn) {
  if (n < 0) throw std::invalid_argument(std::string(fn) + ": n must be >= 0, got " + std::to_string(n));
  return py::array_t<float>(static_cast<py::ssize_t>(n));
}

}  // namespace

// CUDA entry point: bound directly in CUDA builds; in host-only builds the
// function expression is dropped by the preprocessor (its symbol is not
// compiled) and a raising stub is bound under the same name.  Pass at least
// one py::arg after the docstring.
#if FK_WITH_CUDA
#define FK_DEF_CUDA(m, name, fn, doc, ...) (m).def(name, fn, doc, __VA_ARGS__)
#else
#define FK_DEF_CUDA(m, name, fn, doc, ...) def_without_cuda(m, name, doc)
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "free_kernels CUDA extension: torch-free kernels taking raw device pointers "
      "(tensor.data_ptr()) and a stream (torch.cuda.current_stream().cuda_stream), "
      "plus host mirrors of the shared device math.";

  // ------------------------------------------------------------ build facts
  m.def("built_with_cuda", []() { return FK_WITH_CUDA != 0; },
        "True when the CUDA kernels were compiled in (False for a host-only build).");
  m.def("cuda_archs", []() { return FK_WITH_CUDA ? parse_archs(FK_CUDA_ARCHS) : std::vector<int>{}; },
        "SM versions compiled in, e.g. [80, 90]; [] for a host-only build.");
  m.def("version", []() { return std::string(FK_VERSION); }, "Package version the extension was built from.");
  m.def(
      "dtype_codes",
      []() {
        py::dict d;
        d["float32"] = static_cast<int64_t>(fk::DType::kFloat32);
        d["float16"] = static_cast<int64_t>(fk::DType::kFloat16);
        d["bfloat16"] = static_cast<int64_t>(fk::DType::kBFloat16);
        return d;
      },
      "The element-type codes every entry point's dtype_code takes (fk::DType in dtype.h).");
  m.def(
      "build_info",
      []() {
        py::dict d;
        d["version"] = FK_VERSION;
        d["with_cuda"] = FK_WITH_CUDA != 0;
        d["cuda_architectures"] = FK_WITH_CUDA ? FK_CUDA_ARCHS : "";
        d["cuda_compiler_version"] = FK_WITH_CUDA ? FK_CUDA_COMPILER_VERSION : "";
        d["cuda_disabled_reason"] = FK_WITH_CUDA ? "" : FK_CUDA_DISABLED_REASON;
        d["cuda_runtime"] = FK_WITH_CUDA ? "static" : "";
        d["cxx_compiler"] = FK_CXX_COMPILER;
        d["build_type"] = FK_BUILD_TYPE;
        d["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) +
                        "." + std::to_string(PYBIND11_VERSION_PATCH);
        return d;
      },
      "Dict describing how the extension was built (for python -m free_kernels.info).");

  // ------------------------------------------------------------ CUDA runtime
#if FK_WITH_CUDA
  m.def(
      "cuda_runtime_version", []() -> py::object { return py::str(version_string(fk::cuda_runtime_version())); },
      "CUDA runtime version linked in (statically), e.g. '13.0'; None for a host-only build.");
  m.def(
      "cuda_driver_version",
      []() -> py::object {
        const int v = fk::cuda_driver_version();
        return v == 0 ? py::object(py::none()) : py::object(py::str(version_string(v)));
      },
      "Highest CUDA version the installed driver supports, e.g. '13.0'; None without a driver.");
  m.def(
      "cuda_unusable_reason",
      []() -> py::object {
        const std::string why = fk::cuda_unusable_reason();
        return why.empty() ? py::object(py::none()) : py::object(py::str(why));
      },
      "None when a CUDA device can be used, else why not (never raises).");
#else
  m.def("cuda_runtime_version", []() { return py::none(); }, "None: host-only build.");
  m.def("cuda_driver_version", []() { return py::none(); }, "None: host-only build.");
  m.def(
      "cuda_unusable_reason",
      []() {
        return std::string("free_kernels._C was built without CUDA (" FK_CUDA_DISABLED_REASON ")");
      },
      "Why CUDA cannot be used: this is a host-only build.");
#endif
  FK_DEF_CUDA(m, "check_cuda_available", &fk::check_cuda_available,
              "Return None if a CUDA device is usable, else raise RuntimeError with the reason. "
              "Every CUDA entry point runs this check first.",
              py::call_guard<py::gil_scoped_release>());
  FK_DEF_CUDA(m, "device_count", &fk::device_count,
              "Number of visible CUDA devices; RuntimeError when CUDA is not usable (e.g. no driver).",
              py::call_guard<py::gil_scoped_release>());

  // ------------------------------------------------------------ kernels
  FK_DEF_CUDA(m, "fill_f32", &fk::fill_f32,
              "fill_f32(out_ptr, n, value, stream): out[i] = value for a float32 CUDA buffer of n elements.",
              py::arg("out_ptr"), py::arg("n"), py::arg("value"), py::arg("stream") = 0,
              py::call_guard<py::gil_scoped_release>());
  FK_DEF_CUDA(m, "fill_randn_f32", &fk::fill_randn_f32,
              "fill_randn_f32(out_ptr, n, seed, offset, subsequence, stream): out[i] = the standard normal "
              "philox_normal(seed, offset, n, subsequence)[i], computed on the device.",
              py::arg("out_ptr"), py::arg("n"), py::arg("seed"), py::arg("offset") = 0,
              py::arg("subsequence") = 0, py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>());
  FK_DEF_CUDA(m, "verify_attention", &fk::verify_attention,
              "verify_attention(qkv_ptr, out_ptr, B, N, heads, head_dim, s_qb, s_qn, s_qc, s_ob, s_on, s_oc, "
              "dtype_code, stream): attention over the packed qkv (B, N, 3*heads*head_dim) written into out "
              "(B, N, heads*head_dim); strides in elements, dtype_code 1 = float16, 2 = bfloat16 (dtype_codes()).",
              py::arg("qkv_ptr"), py::arg("out_ptr"), py::arg("B"), py::arg("N"), py::arg("heads"),
              py::arg("head_dim"), py::arg("s_qb"), py::arg("s_qn"), py::arg("s_qc"), py::arg("s_ob"),
              py::arg("s_on"), py::arg("s_oc"), py::arg("dtype_code"), py::arg("stream") = 0,
              py::call_guard<py::gil_scoped_release>());
  FK_DEF_CUDA(m, "speculative_accept_workspace_bytes", &fk::speculative_accept_workspace_bytes,
              "speculative_accept_workspace_bytes(B, L, D): device scratch the speculative_accept call needs.",
              py::arg("B"), py::arg("L"), py::arg("D"));
  FK_DEF_CUDA(m, "speculative_accept", &fk::speculative_accept,
              "speculative_accept(...): FREE acceptance + residual resampling of a round, two launches on the "
              "stream, no host sync (see entry_points.h for the arguments; 0 = absent optional pointer).",
              py::arg("mean_p"), py::arg("logvar_p"), py::arg("mean_q"), py::arg("logvar_q"), py::arg("noise_q"),
              py::arg("strides"), py::arg("num_drafts"), py::arg("deterministic_last"), py::arg("uniforms"),
              py::arg("tau"), py::arg("bonus_noise"), py::arg("residual_noise"), py::arg("residual_uniforms"),
              py::arg("num_given"), py::arg("rng_state"), py::arg("workspace"), py::arg("workspace_bytes"),
              py::arg("out"), py::arg("num_accepted"), py::arg("log_ratio"), py::arg("residual_candidates"),
              py::arg("fallbacks"), py::arg("B"), py::arg("L"), py::arg("D"), py::arg("dtype_code"),
              py::arg("equal_variance"), py::arg("max_candidates"), py::arg("stream") = 0,
              py::call_guard<py::gil_scoped_release>());

  FK_DEF_CUDA(m, "modulated_layernorm", &fk::modulated_layernorm,
              "modulated_layernorm(x, shift, scale, out, B, N, H, eps, strides, dtype_code, stream): "
              "LayerNorm(x) * (1 + scale) + shift (see entry_points.h).",
              py::arg("x"), py::arg("shift"), py::arg("scale"), py::arg("out"), py::arg("B"), py::arg("N"),
              py::arg("H"), py::arg("eps"), py::arg("strides"), py::arg("dtype_code"), py::arg("stream") = 0,
              py::call_guard<py::gil_scoped_release>());
  FK_DEF_CUDA(m, "gated_residual", &fk::gated_residual,
              "gated_residual(x, gate, y, out, B, N, H, strides, dtype_code, stream): out = x + gate * y.",
              py::arg("x"), py::arg("gate"), py::arg("y"), py::arg("out"), py::arg("B"), py::arg("N"), py::arg("H"),
              py::arg("strides"), py::arg("dtype_code"), py::arg("stream") = 0,
              py::call_guard<py::gil_scoped_release>());
  FK_DEF_CUDA(m, "bias_gelu", &fk::bias_gelu,
              "bias_gelu(x, bias, out, B, N, K, strides, dtype_code, stream): out = gelu_tanh(x + bias).",
              py::arg("x"), py::arg("bias"), py::arg("out"), py::arg("B"), py::arg("N"), py::arg("K"),
              py::arg("strides"), py::arg("dtype_code"), py::arg("stream") = 0,
              py::call_guard<py::gil_scoped_release>());
  FK_DEF_CUDA(m, "draft_epilogue", &fk::draft_epilogue,
              "draft_epilogue(...): drafted features -> (x_next, mean, logvar) in one kernel (see entry_points.h "
              "for the arguments; 0 = absent optional pointer).",
              py::arg("h"), py::arg("shift"), py::arg("scale"), py::arg("weight"), py::arg("bias"), py::arg("x"),
              py::arg("tables"), py::arg("index"), py::arg("noise"), py::arg("rng_state"), py::arg("out_x"),
              py::arg("out_mean"), py::arg("out_logvar"), py::arg("out_noise"), py::arg("strides"),
              py::arg("dtype_codes"), py::arg("G"), py::arg("R"), py::arg("N"), py::arg("H"), py::arg("C"),
              py::arg("S"), py::arg("patch_size"), py::arg("weight_rows"), py::arg("table_stride"), py::arg("eps"),
              py::arg("cfg_scale"), py::arg("guidance_channels"), py::arg("learned_variance"),
              py::arg("predict_xstart"), py::arg("clip_denoised"), py::arg("stream") = 0,
              py::call_guard<py::gil_scoped_release>());

  // ------------------------------------------------------------ host kernels (every build)
  m.def("draft_epilogue_host", &fk::draft_epilogue_host,
        "draft_epilogue_host(...): the draft_epilogue kernel's computation on the CPU for float32 host tensors "
        "(the draft_epilogue arguments without the stream, plus table_len; see entry_points.h).",
        py::arg("h"), py::arg("shift"), py::arg("scale"), py::arg("weight"), py::arg("bias"), py::arg("x"),
        py::arg("tables"), py::arg("index"), py::arg("noise"), py::arg("rng_state"), py::arg("out_x"),
        py::arg("out_mean"), py::arg("out_logvar"), py::arg("out_noise"), py::arg("strides"),
        py::arg("dtype_codes"), py::arg("G"), py::arg("R"), py::arg("N"), py::arg("H"), py::arg("C"),
        py::arg("S"), py::arg("patch_size"), py::arg("weight_rows"), py::arg("table_stride"), py::arg("table_len"),
        py::arg("eps"), py::arg("cfg_scale"), py::arg("guidance_channels"), py::arg("learned_variance"),
        py::arg("predict_xstart"), py::arg("clip_denoised"), py::call_guard<py::gil_scoped_release>());

  // ------------------------------------------------------------ host RNG mirror
  m.def(
      "philox4x32",
      [](const std::array<uint32_t, 4>& counter, const std::array<uint32_t, 2>& key) {
        const fk::u32x4 r = fk::philox4x32<10>(fk::u32x4{counter[0], counter[1], counter[2], counter[3]},
                                                key[0], key[1]);
        return std::make_tuple(r.x, r.y, r.z, r.w);
      },
      "Philox4x32-10 of a 4-word counter under a 2-word key -> 4 uint32 words (Random123 convention).",
      py::arg("counter"), py::arg("key"));
  m.def(
      "philox_randint4x",
      [](uint64_t seed, uint64_t offset, int64_t n, uint64_t subsequence) {
        if (n < 0) throw std::invalid_argument("philox_randint4x: n must be >= 0");
        py::array_t<uint32_t> out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(4)});
        uint32_t* p = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          for (int64_t i = 0; i < n; ++i) {
            const fk::u32x4 r = fk::philox_randint4x(seed, offset + static_cast<uint64_t>(i), subsequence);
            p[4 * i + 0] = r.x;
            p[4 * i + 1] = r.y;
            p[4 * i + 2] = r.z;
            p[4 * i + 3] = r.w;
          }
        }
        return out;
      },
      "uint32 array (n, 4): row i = tl.randint4x(seed, offset + i) (with subsequence in counter words 2-3).",
      py::arg("seed"), py::arg("offset"), py::arg("n"), py::arg("subsequence") = 0);
  m.def(
      "philox_uniform",
      [](uint64_t seed, uint64_t offset, int64_t n, uint64_t subsequence) {
        py::array_t<float> out = new_f32(n, "philox_uniform");
        float* p = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          for (int64_t i = 0; i < n; ++i) p[i] = fk::philox_uniform(seed, offset + static_cast<uint64_t>(i), subsequence);
        }
        return out;
      },
      "float32 array: element i = tl.rand(seed, offset + i), uniform on [0, 1).",
      py::arg("seed"), py::arg("offset"), py::arg("n"), py::arg("subsequence") = 0);
  m.def(
      "philox_normal",
      [](uint64_t seed, uint64_t offset, int64_t n, uint64_t subsequence, int per_counter) {
        if (per_counter != 1 && per_counter != 4) {
          throw std::invalid_argument("philox_normal: per_counter must be 1 (tl.randn) or 4 (tl.randn4x)");
        }
        py::array_t<float> out = new_f32(n, "philox_normal");
        float* p = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          if (per_counter == 1) {
            for (int64_t i = 0; i < n; ++i) p[i] = fk::philox_randn(seed, offset + static_cast<uint64_t>(i), subsequence);
          } else {
            for (int64_t j = 0; 4 * j < n; ++j) {
              const fk::f32x4 z = fk::philox_randn4x(seed, offset + static_cast<uint64_t>(j), subsequence);
              const float v[4] = {z.x, z.y, z.z, z.w};
              for (int64_t k = 0; k < 4 && 4 * j + k < n; ++k) p[4 * j + k] = v[k];
            }
          }
        }
        return out;
      },
      "float32 array of standard normals, computed on the CPU with the kernels' code.\n"
      "per_counter=1: element i = tl.randn(seed, offset + i) (the CUDA kernels' convention);\n"
      "per_counter=4: element 4*j + k = tl.randn4x(seed, offset + j)[k].",
      py::arg("seed"), py::arg("offset"), py::arg("n"), py::arg("subsequence") = 0, py::arg("per_counter") = 1);

  // ------------------------------------------------------------ host math mirror
  py::module_ math = m.def_submodule(
      "math", "Host builds of the shared scalar math (csrc/include/free_kernels/numerics.h), vectorized "
              "over numpy arrays; *_f32 run in float32 as the kernels do, *_f64 in float64.");
  math.def("log_ndtr_f32", py::vectorize(&fk::log_ndtr<float>), "log Phi(x), float32.", py::arg("x"));
  math.def("log_ndtr_f64", py::vectorize(&fk::log_ndtr<double>), "log Phi(x), float64.", py::arg("x"));
  math.def("log1mexp_f32", py::vectorize(&fk::log1mexp<float>), "log(1 - exp(x)) for x <= 0, float32.",
           py::arg("x"));
  math.def("log1mexp_f64", py::vectorize(&fk::log1mexp<double>), "log(1 - exp(x)) for x <= 0, float64.",
           py::arg("x"));
  math.def("log_add_exp_f32", py::vectorize(&fk::log_add_exp<float>), "log(exp(a) + exp(b)), float32.",
           py::arg("a"), py::arg("b"));
  math.def("gelu_tanh_f32", py::vectorize(&fk::gelu_tanh<float>), "GELU (tanh approximation), float32.",
           py::arg("x"));
  math.def("gelu_tanh_f64", py::vectorize(&fk::gelu_tanh<double>), "GELU (tanh approximation), float64.",
           py::arg("x"));
}

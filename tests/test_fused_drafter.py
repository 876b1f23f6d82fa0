"""Fused drafter kernels: modulated_layernorm, gated_residual, bias_gelu, draft_epilogue.

Each kernel backend is checked against its float64 oracle (the reference in
``free_kernels/reference`` run in float64) with flash-attention's rule
(tests/_tolerance.py): the kernel's max error may be at most 2x the error of
PyTorch's own computation in the same dtype, plus the dtype's small floor
scaled by the output's magnitude.  ``draft_epilogue``'s oracle is the composition it replaces
(reference/draft_transition.py: ``target.forward_head`` -> guidance ->
``diffusion.transition_from_output`` -> ``mean + exp(logvar / 2) * noise``) on a
float64 copy of the target.

CPU: the Triton kernels run under TRITON_INTERPRET=1 (conftest), float32 and
float16, tiny shapes; the CUDA kernels run as "cuda-emu": the very .cu files
compiled by g++ against the host emulation of the CUDA built-ins in
tests/cuda_emulation/ (blocks of real threads, real barriers for
__syncthreads and shuffles; mma.sync replaced by a lane-exact software
m16n8k16 built from the PTX fragment layout), called through the same Python
wrappers as the real extension.  GPU tests (``gpu`` marker) run the real
``cuda`` and ``triton`` backends in float16 / bfloat16 at DiT-XL sizes, the
unaligned paths, and a CUDA-graph capture of one draft step with static buffers.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _tolerance import assert_flash_rule
from free_kernels import _env, ops
from free_kernels.diffusion import create_diffusion
from free_kernels.models.dit import DiT, DiTBlock
from free_kernels.ops import BackendUnavailable, get_op
from free_kernels.ops import _fused
from free_kernels.ops.drafter_forward import head_parameters, schedule_tables_on
from free_kernels.reference.bias_gelu import bias_gelu as ref_bias_gelu
from free_kernels.reference.draft_epilogue import draft_epilogue as ref_epilogue
from free_kernels.reference.draft_epilogue import schedule_tables
from free_kernels.reference.draft_transition import draft_transition as ref_composition
from free_kernels.reference.gated_residual import gated_residual as ref_gated
from free_kernels.reference.modulated_layernorm import modulated_layernorm as ref_mln

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
OPS = ("modulated_layernorm", "gated_residual", "bias_gelu", "draft_epilogue")
EMU_DIR = ROOT / "tests" / "cuda_emulation"

DTYPES_HERE = [torch.float32, torch.float16] if not CUDA else [torch.float16, torch.bfloat16, torch.float32]


def _triton_missing():
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - triton is a dependency
        return f"triton not importable: {e}"
    if not CUDA and not INTERPRET:
        return "Triton on CPU needs TRITON_INTERPRET=1 before triton is imported"
    return None


needs_triton = pytest.mark.skipif(_triton_missing() is not None, reason=str(_triton_missing()))


def rnd(shape, dtype, seed, scale=1.0, offset=0.0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(device=device, dtype=dtype)


# ============================================================ CUDA host emulation ("cuda-emu")
_EMU_EXTRA = r"""
// Extra stand-ins for the CUDA pieces modulated_layernorm.cu / draft_epilogue.cu use beyond fk_cuda_emu.h.
#pragma once
#include <cstring>
#define __align__(n) alignas(n)
#define cudaErrorInvalidConfiguration cudaErrorInvalidValue
#define cudaDevAttrMaxSharedMemoryPerBlockOptin 0
#define cudaFuncAttributeMaxDynamicSharedMemorySize 0
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, int, int) { *v = 227 * 1024; return cudaSuccess; }
template <typename F> cudaError_t cudaFuncSetAttribute(F, int, int) { return cudaSuccess; }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline void __syncwarp(unsigned = 0xffffffffu) { fk_emu::g_block->warp_bars[fk_emu::warp()]->arrive_and_wait(); }
inline float fk_emu_to_f32(__half v) { return __half2float(v); }
inline float fk_emu_to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// mma.sync.m16n8k16.row.col with fp32 accumulation, lane-exact: every lane publishes its A / B
// registers, then computes its four accumulator elements from the PTX fragment layout
// (A: lane (g, t) holds rows g, g+8 x cols 2t, 2t+1, 2t+8, 2t+9; B: k 2t, 2t+1, 2t+8, 2t+9 of col g;
//  C: rows g, g+8 x cols 2t, 2t+1).
template <typename T>
void fk_emu_mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
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
    return fk_emu_to_f32(v);
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
"""

_EMU_COMMON = r"""
#include <cstdint>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>
static int fk_emu_fail(const std::exception& e, char* err, int n, int code) {
  std::strncpy(err, e.what(), n - 1);
  err[n - 1] = 0;
  return code;
}
#define FK_EMU_TRY(body)                                                           \
  try { body; return 0; }                                                          \
  catch (const std::invalid_argument& e) { return fk_emu_fail(e, err, n_err, 1); } \
  catch (const std::exception& e) { return fk_emu_fail(e, err, n_err, 2); }
"""

# C ABI around each .cu built under the host emulation (one translation unit per .cu, as in the real build)
_EMU_WRAPPERS = {
    "modulated_layernorm": _EMU_COMMON + r"""
#include "modulated_layernorm_emu.cu.inc"
namespace fk { void check_cuda_available() {} }
extern "C" {
int emu_modulated_layernorm(uint64_t x, uint64_t sh, uint64_t sc, uint64_t out, int64_t B, int64_t N, int64_t H,
                            double eps, const int64_t* s, int64_t code, char* err, int n_err) {
  FK_EMU_TRY(fk::modulated_layernorm(x, sh, sc, out, B, N, H, eps, std::vector<int64_t>(s, s + 10), code, 0))
}
int emu_gated_residual(uint64_t x, uint64_t g, uint64_t y, uint64_t out, int64_t B, int64_t N, int64_t H,
                       const int64_t* s, int64_t code, char* err, int n_err) {
  FK_EMU_TRY(fk::gated_residual(x, g, y, out, B, N, H, std::vector<int64_t>(s, s + 11), code, 0))
}
int emu_bias_gelu(uint64_t x, uint64_t b, uint64_t out, int64_t B, int64_t N, int64_t K, const int64_t* s,
                  int64_t code, char* err, int n_err) {
  FK_EMU_TRY(fk::bias_gelu(x, b, out, B, N, K, std::vector<int64_t>(s, s + 7), code, 0))
}
}
""",
    "draft_epilogue": _EMU_COMMON + r"""
#include "draft_epilogue_emu.cu.inc"
extern "C" {
int emu_draft_epilogue(const uint64_t* p, const int64_t* s, const int64_t* codes, const int64_t* sizes,
                       const double* f, const int64_t* flags, char* err, int n_err) {
  FK_EMU_TRY(fk::draft_epilogue(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12],
                                p[13], std::vector<int64_t>(s, s + 34), std::vector<int64_t>(codes, codes + 3),
                                sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], sizes[6], sizes[7],
                                sizes[8], f[0], f[1], flags[0], flags[1] != 0, flags[2] != 0, flags[3] != 0, 0))
}
}
""",
}


class _EmulatedExtension:
    """ctypes stand-in for the four ``_C`` entry points the cuda wrappers call (same positional arguments)."""

    def __init__(self, path):
        import ctypes as ct

        self._ct = ct
        self._lib = ct.CDLL(str(path))
        self._err = ct.create_string_buffer(2048)

    def _arr(self, ctype, vals):
        return (ctype * len(vals))(*vals)

    def _check(self, rc):
        if rc == 1:
            raise ValueError(self._err.value.decode())
        if rc:
            raise RuntimeError(self._err.value.decode())

    def modulated_layernorm(self, x, sh, sc, out, B, N, H, eps, strides, code, stream=0):
        ct = self._ct
        self._check(self._lib.emu_modulated_layernorm(
            ct.c_uint64(x), ct.c_uint64(sh), ct.c_uint64(sc), ct.c_uint64(out), ct.c_int64(B), ct.c_int64(N),
            ct.c_int64(H), ct.c_double(eps), self._arr(ct.c_int64, strides), ct.c_int64(code), self._err, 2048))

    def gated_residual(self, x, g, y, out, B, N, H, strides, code, stream=0):
        ct = self._ct
        self._check(self._lib.emu_gated_residual(
            ct.c_uint64(x), ct.c_uint64(g), ct.c_uint64(y), ct.c_uint64(out), ct.c_int64(B), ct.c_int64(N),
            ct.c_int64(H), self._arr(ct.c_int64, strides), ct.c_int64(code), self._err, 2048))

    def bias_gelu(self, x, b, out, B, N, K, strides, code, stream=0):
        ct = self._ct
        self._check(self._lib.emu_bias_gelu(
            ct.c_uint64(x), ct.c_uint64(b), ct.c_uint64(out), ct.c_int64(B), ct.c_int64(N), ct.c_int64(K),
            self._arr(ct.c_int64, strides), ct.c_int64(code), self._err, 2048))

    def draft_epilogue(self, *a):
        ct = self._ct
        ptrs, strides, codes = a[:14], a[14], a[15]
        sizes = a[16:25]
        fl = a[25:27]
        flags = [int(a[27]), int(bool(a[28])), int(bool(a[29])), int(bool(a[30]))]
        self._check(self._lib.emu_draft_epilogue(
            self._arr(ct.c_uint64, ptrs), self._arr(ct.c_int64, strides), self._arr(ct.c_int64, codes),
            self._arr(ct.c_int64, sizes), self._arr(ct.c_double, fl), self._arr(ct.c_int64, flags), self._err, 2048))


_EMU = {}


def _emulated_extension():
    """Build (once per session) the host-emulated adaln / draft_epilogue kernels: (ext, None) or (None, why)."""
    if "ext" in _EMU or "why" in _EMU:
        return _EMU.get("ext"), _EMU.get("why")
    cxx = shutil.which("g++")
    if CUDA:
        _EMU["why"] = "a GPU is present: the real cuda backend is tested instead of the host emulation"
    elif cxx is None:
        _EMU["why"] = "no g++ for the host emulation"
    elif not (EMU_DIR / "fk_cuda_emu.h").is_file():
        _EMU["why"] = f"host emulation headers not found in {EMU_DIR}"
    else:
        d = Path(tempfile.mkdtemp(prefix="fk_adaln_emu_"))
        for name in ("modulated_layernorm", "draft_epilogue"):
            src = (ROOT / "csrc" / "kernels" / f"{name}.cu").read_text()
            src, n = re.subn(r"([A-Za-z_]\w*(?:<[^<>;()]*>)?)<<<([^>]*)>>>\(", r"fk_emu::launch(\1, \2, ", src)
            assert n >= 2, f"kernel launches not found in {name}.cu"
            src, n = re.subn(r"extern __shared__ __align__\(16\) unsigned char (\w+)\[\];",
                             r"alignas(16) static unsigned char \1[256 * 1024];", src)
            assert n == (1 if name == "draft_epilogue" else 0)
            src, n = re.subn(r"Mma<T>::run\(", "fk_emu_mma<T>(", src)
            assert n == (1 if name == "draft_epilogue" else 0)
            (d / f"{name}_emu.cu.inc").write_text(src)
        (d / "fk_emu_extra.h").write_text(_EMU_EXTRA)
        sources = []
        for name, text in _EMU_WRAPPERS.items():
            (d / f"{name}_emu.cpp").write_text(text)
            sources.append(str(d / f"{name}_emu.cpp"))
        cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-w",
               "-include", str(EMU_DIR / "fk_cuda_emu.h"), "-include", str(d / "fk_emu_extra.h"),
               f"-I{EMU_DIR}", f"-I{ROOT / 'csrc' / 'include'}", f"-I{d}", *sources,
               "-o", str(d / "libadaln_emu.so")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise AssertionError("host emulation build failed:\n" + r.stderr[-4000:])
        _EMU["ext"] = _EmulatedExtension(d / "libadaln_emu.so")
    return _EMU.get("ext"), _EMU.get("why")


def emu_impl(op_name, monkeypatch):
    """The op's cuda backend implementation bound to the emulated extension (CPU tensors, stream 0)."""
    ext, why = _emulated_extension()
    if ext is None:
        pytest.skip(f"cuda-emu unavailable: {why}")
    monkeypatch.setattr(_env, "extension", lambda: ext)
    monkeypatch.setattr(_fused, "stream_of", lambda t: 0)
    return get_op(op_name).backends["cuda"].load()  # a fresh closure: the cached real impl is untouched


# ============================================================ backends under test
def kernel_backends():
    """Parametrization: the fused backends that can run on this machine (or an emulation of them)."""
    out = [pytest.param("triton", id="triton", marks=needs_triton)]
    if CUDA:
        out.append(pytest.param("cuda", id="cuda"))
    else:
        out.append(pytest.param("cuda-emu", id="cuda-emu"))
    return out


def impl_for(op_name, backend, monkeypatch):
    if backend == "cuda-emu":
        return emu_impl(op_name, monkeypatch)
    op = get_op(op_name)
    return op.backends[backend].impl()


def call(op_name, backend, monkeypatch, *args, **kw):
    """Run the op on ``backend``: through the public dispatch point (explicit backend), or the emulation."""
    if backend == "cuda-emu":
        return emu_impl(op_name, monkeypatch)(*args, **kw)
    fn = {"modulated_layernorm": ops.modulated_layernorm, "gated_residual": ops.gated_residual,
          "bias_gelu": ops.bias_gelu, "draft_epilogue": ops.draft_epilogue}[op_name]
    return fn(*args, backend=backend, **kw)


# ============================================================ dispatch
def _ctx(device, dtype, **kw):
    return dict(device=torch.device(device), dtype=dtype, H=96, K=384, PE=16, **kw)


@pytest.mark.parametrize("name", OPS)
def test_cpu_tensors_default_to_torch_and_probes_answer(name):
    op = get_op(name)
    assert op.resolve(_ctx("cpu", torch.float32)).name == "torch"
    for dev in ("cpu", "cuda"):
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            for b, why in op.reasons(_ctx(dev, dt)).items():
                assert why is None or not why.startswith("probe failed"), f"{name} {b} {dev}: {why}"


@pytest.mark.parametrize("name", OPS)
def test_grad_and_mixed_dtypes_fall_back_to_torch_on_cuda(name):
    op = get_op(name)
    for extra in (dict(requires_grad=True), dict(mixed="mixed dtypes (y is torch.float32)")):
        ctx = _ctx("cuda", torch.float16, **extra)
        assert op.reasons(ctx)["triton"] is not None
        assert op.reasons(ctx)["cuda"] is not None
        assert op.resolve(ctx).name == "torch"


def test_explicit_requests_that_cannot_run_raise():
    x = rnd((2, 3, 32), torch.float32, 0)
    sh, sc = rnd((2, 32), torch.float32, 1), rnd((2, 32), torch.float32, 2)
    with pytest.raises(BackendUnavailable, match="cuda"):
        ops.modulated_layernorm(x, sh, sc, backend="cuda")
    with pytest.raises(BackendUnavailable, match="cuda"):
        ops.gated_residual(x, sh, x, backend="cuda")
    with pytest.raises(BackendUnavailable, match="cuda"):
        ops.bias_gelu(x, sh[0], backend="cuda")
    if _triton_missing() is None:
        xg = x.clone().requires_grad_(True)
        with pytest.raises(BackendUnavailable, match="forward-only"):
            ops.modulated_layernorm(xg, sh, sc, backend="triton")
        with pytest.raises(BackendUnavailable, match="mixed dtypes"):
            ops.gated_residual(x, sh.double(), x, backend="triton")


def test_explicit_triton_without_interpreter_raises(monkeypatch):
    if CUDA:
        pytest.skip("CPU-only check")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = rnd((1, 2, 32), torch.float32, 0)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        ops.modulated_layernorm(x, x[:, 0], x[:, 0], backend="triton")


def test_env_override_selects_backend(monkeypatch):
    if not INTERPRET:
        pytest.skip("needs the Triton interpreter on CPU")
    monkeypatch.setenv("FREE_KERNELS_BACKEND_GATED_RESIDUAL", "triton")
    assert get_op("gated_residual").resolve(_ctx("cpu", torch.float32)).name == "triton"
    assert get_op("bias_gelu").resolve(_ctx("cpu", torch.float32)).name == "torch"


def test_validation_names_the_argument():
    x = rnd((2, 3, 32), torch.float32, 0)
    with pytest.raises(ValueError, match="gate"):
        ops.gated_residual(x, x[0], x)
    with pytest.raises(ValueError, match="bias"):
        ops.bias_gelu(x, x[0, 0, :7])
    with pytest.raises(ValueError, match="weight"):
        ops.bias_gelu(x, x[0, 0], weight=x[0])
    with pytest.raises(ValueError, match="out"):
        ops.modulated_layernorm(x, x[:, 0], x[:, 0], out=x[:1])


def test_info_lists_the_new_ops():
    from free_kernels.info import _op_contexts
    from free_kernels.ops._dispatch import describe

    lines = describe({name: _op_contexts(name) for name in OPS})
    text = "\n".join(lines)
    for name in OPS:
        assert name in text


# ============================================================ modulated_layernorm
def _mln_case(B, N, H, dtype, seed, noncontig=False):
    if noncontig:
        # x: every other token of a (B, 2N, H + 8) buffer, columns 4 .. 4 + H; shift / scale: chunks of (B, 2H)
        x = rnd((B, 2 * N, H + 8), dtype, seed, scale=2.0, offset=0.5)[:, ::2, 4:4 + H]
    else:
        x = rnd((B, N, H), dtype, seed, scale=2.0, offset=0.5)
    mod = rnd((B, 2 * H), dtype, seed + 1, scale=0.3)
    shift, scale = mod.chunk(2, dim=1)
    return x, shift, scale


def _mln_oracle(x, shift, scale):
    return ref_mln(x.double().cpu(), shift.double().cpu(), scale.double().cpu())


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N", [1, 7, 16])
@pytest.mark.parametrize("H", [32, 96])
def test_modulated_layernorm_matches_reference(backend, dtype, N, H, monkeypatch):
    x, shift, scale = _mln_case(2, N, H, dtype, seed=N * 100 + H)
    out = call("modulated_layernorm", backend, monkeypatch, x, shift, scale, eps=1e-6)
    assert_flash_rule(out, _mln_oracle(x, shift, scale), ref_mln(x, shift, scale), dtype, f"{backend} N={N} H={H}")


@pytest.mark.parametrize("backend", kernel_backends())
def test_modulated_layernorm_strided_inputs_poisoned_strided_out(backend, monkeypatch):
    dtype = torch.float32 if not CUDA else torch.float16
    x, shift, scale = _mln_case(3, 7, 96, dtype, seed=5, noncontig=True)
    assert not x.is_contiguous() and shift.stride(0) == 2 * 96
    buf = torch.full((3, 7, 2 * 96), 7.0, dtype=dtype, device=DEV)
    out = buf[:, :, ::2]
    out.fill_(float("nan"))
    ret = call("modulated_layernorm", backend, monkeypatch, x, shift, scale, eps=1e-6, out=out)
    assert ret.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any(), "some output elements were never written"
    assert (buf[:, :, 1::2] == 7.0).all(), "kernel wrote outside out"
    assert_flash_rule(out, _mln_oracle(x, shift, scale), ref_mln(x, shift, scale), dtype, "strided")
    # channel stride != 1 on x (transposed storage): the element-wise path
    xt = rnd((3, 96, 7), dtype, 6).transpose(1, 2)
    out2 = call("modulated_layernorm", backend, monkeypatch, xt, shift, scale, eps=1e-6)
    assert_flash_rule(out2, _mln_oracle(xt, shift, scale), ref_mln(xt, shift, scale), dtype, "transposed")


@pytest.mark.parametrize("backend", kernel_backends())
def test_modulated_layernorm_offset_rows_are_stable(backend, monkeypatch):
    """|mean| >> std: the two-pass statistics keep full accuracy (E[x^2] - E[x]^2 would not)."""
    x = rnd((2, 5, 96), torch.float32, 9, scale=1e-2, offset=300.0)
    sh, sc = rnd((2, 96), torch.float32, 10, scale=0.1), rnd((2, 96), torch.float32, 11, scale=0.1)
    out = call("modulated_layernorm", backend, monkeypatch, x, sh, sc, eps=1e-6)
    # torch's own fp32 error here is ~1e-3 (the fp32 mean of values ~300 is only good to ~ulp(300) / std);
    # a one-pass E[x^2] - E[x]^2 in fp32 would be off by O(1)
    assert_flash_rule(out, _mln_oracle(x, sh, sc), ref_mln(x, sh, sc), torch.float32, "offset rows")


# ============================================================ gated_residual / bias_gelu
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N,H", [(1, 32), (7, 96), (16, 32)])
def test_gated_residual_matches_reference(backend, dtype, N, H, monkeypatch):
    x, y = rnd((2, N, H), dtype, N + H), rnd((2, N, H), dtype, N + H + 1)
    gate = rnd((2, 6 * H), dtype, 3).chunk(6, dim=1)[2]  # a chunk of the adaLN output, as in DiTBlock
    ref64 = ref_gated(x.double().cpu(), gate.double().cpu(), y.double().cpu())
    out = call("gated_residual", backend, monkeypatch, x, gate, y)
    assert_flash_rule(out, ref64, ref_gated(x, gate, y), dtype, f"{backend} N={N} H={H}")
    # in place into the residual stream
    xc = x.clone()
    ret = call("gated_residual", backend, monkeypatch, xc, gate, y, out=xc)
    assert ret.data_ptr() == xc.data_ptr()
    assert_flash_rule(xc, ref64, ref_gated(x, gate, y), dtype, "in place")


@pytest.mark.parametrize("backend", kernel_backends())
def test_gated_residual_strided_and_poisoned(backend, monkeypatch):
    dtype = torch.float32 if not CUDA else torch.float16
    x = rnd((2, 14, 100), dtype, 1)[:, ::2, 2:98]
    y = rnd((2, 96, 7), dtype, 2).transpose(1, 2)
    gate = rnd((2, 96), dtype, 3)
    out = torch.full((2, 7, 96), float("nan"), dtype=dtype, device=DEV)
    call("gated_residual", backend, monkeypatch, x, gate, y, out=out)
    assert not torch.isnan(out).any()
    ref64 = ref_gated(x.double().cpu(), gate.double().cpu(), y.double().cpu())
    assert_flash_rule(out, ref64, ref_gated(x, gate, y), dtype, "strided")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(1, 1, 32), (2, 7, 96), (16, 40)], ids=["1x1x32", "2x7x96", "16x40"])
def test_bias_gelu_matches_reference(backend, dtype, shape, monkeypatch):
    x = rnd(shape, dtype, sum(shape), scale=3.0)  # covers both GELU tails
    b = rnd((shape[-1],), dtype, 1)
    ref64 = ref_bias_gelu(x.double().cpu(), b.double().cpu())
    out = call("bias_gelu", backend, monkeypatch, x, b)
    assert_flash_rule(out, ref64, ref_bias_gelu(x, b), dtype, f"{backend} {shape}")
    xc = x.clone()
    call("bias_gelu", backend, monkeypatch, xc, b, out=xc)
    assert_flash_rule(xc, ref64, ref_bias_gelu(x, b), dtype, "in place")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_bias_gelu_with_weight_is_fc1_plus_gelu(backend, dtype, monkeypatch):
    x = rnd((2, 7, 32), dtype, 4)
    w = rnd((128, 32), dtype, 5, scale=32 ** -0.5)
    b = rnd((128,), dtype, 6, scale=0.5)
    ref64 = F.gelu(F.linear(x.double().cpu(), w.double().cpu(), b.double().cpu()), approximate="tanh")
    out = call("bias_gelu", backend, monkeypatch, x, b, weight=w)
    assert out.shape == (2, 7, 128)
    assert_flash_rule(out, ref64, ref_bias_gelu(x, b, weight=w), dtype, "fc1 + gelu")
    # poisoned strided out
    buf = torch.full((2, 7, 256), float("nan"), dtype=dtype, device=DEV)
    call("bias_gelu", backend, monkeypatch, x, b, weight=w, out=buf[:, :, ::2])
    assert not torch.isnan(buf[:, :, ::2]).any() and torch.isnan(buf[:, :, 1::2]).all()


# ============================================================ DiT wiring
def _old_block_forward(blk, x, c):
    """The DiTBlock forward as written before the fused ops (the official expression)."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = blk.adaLN_modulation(c).chunk(6, dim=1)
    x = x + gate_msa.unsqueeze(1) * blk.attn(ref_mln(x, shift_msa, scale_msa))
    h = ref_mln(x, shift_mlp, scale_mlp)
    return x + gate_mlp.unsqueeze(1) * blk.mlp.fc2(F.gelu(blk.mlp.fc1(h), approximate="tanh"))


def _random_block(H=32, heads=2, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    blk = DiTBlock(H, heads)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) * (0.3 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.05))
    return blk.to(dtype)


def test_dit_block_torch_path_is_bit_identical_to_the_official_expression():
    blk = _random_block()
    x, c = rnd((3, 7, 32), torch.float32, 1, device="cpu"), rnd((3, 32), torch.float32, 2, device="cpu")
    with torch.no_grad():
        assert torch.equal(blk(x, c), _old_block_forward(blk, x, c))
    # and with autograd on (training): same values, gradients flow through every op
    xg = x.clone().requires_grad_(True)
    y = blk(xg, c)
    assert torch.equal(y.detach(), _old_block_forward(blk, x, c).detach())
    y.square().sum().backward()
    assert xg.grad is not None and all(p.grad is not None for p in blk.parameters())


@needs_triton
def test_dit_block_through_fused_backends_matches(monkeypatch):
    """Every dispatch point of the block forced to triton (interpreter on CPU): same block output."""
    dtype = torch.float32 if not CUDA else torch.float16
    blk = _random_block(dtype=dtype).to(DEV)
    x, c = rnd((2, 4, 32), dtype, 3), rnd((2, 32), dtype, 4)
    with torch.no_grad():
        ref = blk(x, c)
        for name in ("MODULATED_LAYERNORM", "GATED_RESIDUAL", "BIAS_GELU"):
            monkeypatch.setenv(f"FREE_KERNELS_BACKEND_{name}", "triton")
        out = blk(x, c)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


# ============================================================ draft_epilogue
def make_target(learn_sigma=True, S=8, p=2, H=32, seed=0, dtype=torch.float32, device=DEV):
    """A tiny DiT whose head output is far from zero (adaLN-Zero init would output zeros)."""
    torch.manual_seed(seed)
    m = DiT(input_size=S, patch_size=p, in_channels=4, hidden_size=H, depth=1, num_heads=2, num_classes=5,
            learn_sigma=learn_sigma)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if name == "pos_embed":
                continue
            std = 0.3 / max(prm.shape[-1], 1) ** 0.5 if prm.dim() > 1 else 0.05
            prm.copy_(torch.randn(prm.shape, generator=g) * std)
        m.final_layer.linear.weight.mul_(3.0)
    return m.eval().to(device=device, dtype=dtype)


def epilogue_case(R=3, cfg=True, S=8, p=2, H=32, seed=0, dtype=torch.float32, steps="10", device=DEV):
    G = 2 if cfg else 1
    N = (S // p) ** 2
    h = rnd((G * R, N, H), dtype, seed + 10, device=device)
    c = rnd((G * R, H), dtype, seed + 11, device=device)
    x = rnd((R, 4, S, S), torch.float32, seed + 12, device=device)
    noise = rnd((R, 4, S, S), torch.float32, seed + 13, device=device)
    n = int(steps)
    idx = torch.tensor([(n - 1 - 3 * i) % n for i in range(R)], dtype=torch.int64, device=device)
    idx[-1] = max(1, int(idx[-1]))
    return h, c, x, noise, idx


def composition_oracle(target, diffusion, h, c, x, idx, noise, **kw):
    """The composition in float64 (tables stay the fp32 constants: exactly what every backend uses)."""
    import copy

    tgt = copy.deepcopy(target).to(device="cpu", dtype=torch.float64)
    with torch.no_grad():
        return ref_composition(tgt, diffusion, h.double().cpu(), c.double().cpu(), x.double().cpu(), idx.cpu(),
                               noise.double().cpu(), **kw)


def run_transition(backend, target, diffusion, h, c, x, idx, noise, monkeypatch, **kw):
    """ops.draft_transition on ``backend``; cuda-emu: the tensor-level cuda closure on the gathered tensors."""
    if backend != "cuda-emu":
        with torch.no_grad():
            return ops.draft_transition(target, diffusion, h, c, x, idx, noise, backend=backend, **kw)
    fn = emu_impl("draft_epilogue", monkeypatch)
    from free_kernels.diffusion.gaussian_diffusion import ModelMeanType

    with torch.no_grad():
        shift, scale, w, b, eps = head_parameters(target, c)
        kw = dict(kw)
        rng_state = kw.pop("rng_state", None)
        out = kw.pop("out", None)
        noise_out = kw.pop("noise_out", None)
        return fn(h, shift, scale, w, b, x, schedule_tables_on(diffusion, x.device), idx, noise,
                  patch_size=target.patch_size, cfg_scale=kw.get("cfg_scale", 1.0),
                  guidance_channels=kw.get("guidance_channels", 3), learned_variance=diffusion.learned_variance,
                  predict_xstart=diffusion.model_mean_type == ModelMeanType.START_X,
                  clip_denoised=kw.get("clip_denoised", False), eps=eps, rng_state=rng_state, out=out,
                  noise_out=noise_out)


def check_transition(res, ref64, same, dtype, what):
    for name, a, b, s in zip(("x_next", "mean", "logvar"), res, ref64, same):
        assert a.dtype == torch.float32, f"{what}: {name} is {a.dtype}"
        assert_flash_rule(a, b, s, dtype, f"{what} {name}")


EPI_CASES = [
    # learn_sigma, sigma_small (fixed variance kind), cfg, guidance_channels, clip, predict_xstart
    pytest.param(True, False, True, 3, False, False, id="learned-cfg3"),
    pytest.param(True, False, True, 4, True, False, id="learned-cfg4-clip"),
    pytest.param(True, False, False, 3, False, False, id="learned-nocfg"),
    pytest.param(False, False, True, 3, True, False, id="fixedlarge-cfg3-clip"),
    pytest.param(False, True, False, 3, False, False, id="fixedsmall-nocfg"),
    pytest.param(True, False, True, 3, True, True, id="learned-xstart-clip"),
]


def _diffusion(learn_sigma, sigma_small=False, predict_xstart=False, steps="10"):
    return create_diffusion(steps, learn_sigma=learn_sigma, sigma_small=sigma_small, predict_xstart=predict_xstart)


@pytest.mark.parametrize("learn,small,cfg,gc,clip,xstart", EPI_CASES)
def test_torch_tensor_epilogue_is_bit_exact_with_the_composition(learn, small, cfg, gc, clip, xstart):
    tgt = make_target(learn_sigma=learn, device="cpu")
    dif = _diffusion(learn, small, xstart)
    h, c, x, noise, idx = epilogue_case(cfg=cfg, device="cpu")
    kw = dict(cfg_scale=4.0, guidance_channels=gc, clip_denoised=clip)
    with torch.no_grad():
        ref = ref_composition(tgt, dif, h, c, x, idx, noise, **kw)
        res = ops.draft_transition(tgt, dif, h, c, x, idx, noise, **kw)  # torch backend on CPU
        shift, scale, w, b, eps = head_parameters(tgt, c)
        from free_kernels.diffusion.gaussian_diffusion import ModelMeanType

        ten = ops.draft_epilogue(h, shift, scale, w, b, x, schedule_tables(dif), idx, noise, patch_size=2,
                                 cfg_scale=4.0, guidance_channels=gc, learned_variance=dif.learned_variance,
                                 predict_xstart=dif.model_mean_type == ModelMeanType.START_X, clip_denoised=clip,
                                 eps=eps)
    for a, b_, t in zip(ref, res, ten):
        assert torch.equal(a, b_) and torch.equal(a, t)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("learn,small,cfg,gc,clip,xstart", EPI_CASES)
def test_draft_epilogue_matches_the_composition(backend, learn, small, cfg, gc, clip, xstart, monkeypatch):
    dtype = torch.float32
    tgt = make_target(learn_sigma=learn, dtype=dtype)
    dif = _diffusion(learn, small, xstart)
    h, c, x, noise, idx = epilogue_case(cfg=cfg, dtype=dtype)
    kw = dict(cfg_scale=4.0, guidance_channels=gc, clip_denoised=clip)
    ref64 = composition_oracle(tgt, dif, h, c, x, idx, noise, **kw)
    with torch.no_grad():
        same = ref_composition(tgt, dif, h, c, x, idx, noise, **kw)
    res = run_transition(backend, tgt, dif, h, c, x, idx, noise, monkeypatch, **kw)
    check_transition(res, ref64, same, dtype, f"{backend}")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("S,p,H", [(2, 2, 32), (8, 4, 96), (4, 2, 96)], ids=["N1", "p4-N4-H96", "N4-H96"])
def test_draft_epilogue_odd_geometries_fp16(backend, S, p, H, monkeypatch):
    dtype = torch.float16
    tgt = make_target(S=S, p=p, H=H, dtype=dtype)
    dif = _diffusion(True)
    h, c, x, noise, idx = epilogue_case(R=2, cfg=True, S=S, p=p, H=H, dtype=dtype, seed=S + p + H)
    kw = dict(cfg_scale=1.5, guidance_channels=3, clip_denoised=False)
    ref64 = composition_oracle(tgt, dif, h, c, x, idx, noise, **kw)
    with torch.no_grad():
        same = ref_composition(tgt, dif, h, c, x, idx, noise, **kw)
    res = run_transition(backend, tgt, dif, h, c, x, idx, noise, monkeypatch, **kw)
    check_transition(res, ref64, same, dtype, f"{backend} S={S} p={p} H={H}")


@pytest.mark.parametrize("backend", kernel_backends())
def test_draft_epilogue_strided_inputs_and_poisoned_outputs(backend, monkeypatch):
    tgt = make_target()
    dif = _diffusion(True)
    h, c, x, noise, idx = epilogue_case(R=2, cfg=True)
    # non-contiguous h (every other token of a wider buffer) and x (channels-last storage)
    hb = rnd((4, 32, 40), torch.float32, 30)
    hb[:, ::2, 3:35] = h
    h2 = hb[:, ::2, 3:35]
    x2 = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not h2.is_contiguous() and not x2.is_contiguous()
    kw = dict(cfg_scale=3.0, guidance_channels=3, clip_denoised=False)
    # outputs: slices of (R, L, D)-style sampler buffers, poisoned
    bufs = [torch.full((2, 3, 4 * 8 * 8), float("nan"), device=DEV) for _ in range(3)]
    out = tuple(b[:, 1].view(2, 4, 8, 8) for b in bufs)
    res = run_transition(backend, tgt, dif, h2, c, x2, idx, noise, monkeypatch, out=out, **kw)
    assert all(r.data_ptr() == o.data_ptr() for r, o in zip(res, out))
    for b in bufs:
        assert not torch.isnan(b[:, 1]).any(), "output element never written"
        assert torch.isnan(b[:, 0]).all() and torch.isnan(b[:, 2]).all(), "kernel wrote outside out"
    ref64 = composition_oracle(tgt, dif, h, c, x, idx, noise, **kw)
    with torch.no_grad():
        same = ref_composition(tgt, dif, h, c, x, idx, noise, **kw)
    check_transition(res, ref64, same, torch.float32, f"{backend} strided")


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_draft_epilogue_counter_based_noise(backend, monkeypatch):
    """noise=None: every backend draws philox_randn(seed, offset + flat index, the draft subsequence), keeps it
    in noise_out, advances."""
    ext = _env.extension()  # the real module (host Philox mirror), before cuda-emu patches the lookup
    if ext is None and backend in ("torch", "cuda-emu"):
        pytest.skip("needs the host Philox of free_kernels._C")
    tgt = make_target()
    dif = _diffusion(True)
    h, c, x, _, idx = epilogue_case(R=2, cfg=True)
    seed, offset = 1234567, 99
    rng = torch.tensor([seed, offset], dtype=torch.int64, device=DEV)
    kw = dict(cfg_scale=2.0, guidance_channels=3, clip_denoised=False)

    def draw(z):
        return run_transition(backend, tgt, dif, h, c, x, idx, None, monkeypatch, rng_state=rng, noise_out=z, **kw)

    z = torch.full(x.shape, float("nan"), device=DEV)
    res = draw(z)
    n = x.numel()
    assert rng.tolist() == [seed, offset + n], "rng_state offset not advanced by R*C*S*S"
    assert not torch.isnan(z).any()
    if ext is not None:
        from free_kernels.reference.draft_epilogue import DRAFT_NOISE_SUBSEQUENCE as sub
        host = torch.from_numpy(np.asarray(ext.philox_normal(seed, offset, n, subsequence=sub))).reshape(x.shape)
        torch.testing.assert_close(z.cpu(), host, rtol=1e-5, atol=1e-5)
    # the outputs are the transition of exactly that noise
    ref = run_transition(backend, tgt, dif, h, c, x, idx, z, monkeypatch, **kw)
    for a, b in zip(res, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # the next call continues the stream
    z2 = torch.empty_like(z)
    draw(z2)
    assert rng.tolist() == [seed, offset + 2 * n]
    assert not torch.allclose(z, z2)


def test_draft_epilogue_validation():
    tgt = make_target(device="cpu")
    dif = _diffusion(True)
    h, c, x, noise, idx = epilogue_case(device="cpu")
    shift, scale, w, b, eps = head_parameters(tgt, c)
    tab = schedule_tables(dif)
    base = dict(patch_size=2, learned_variance=True)
    with pytest.raises(ValueError, match="noise"):
        ops.draft_epilogue(h, shift, scale, w, b, x, tab, idx, None, **base)
    with pytest.raises(TypeError, match="index"):
        ops.draft_epilogue(h, shift, scale, w, b, x, tab, idx.int(), noise, **base)
    with pytest.raises(ValueError, match="h must have"):
        ops.draft_epilogue(h[:5], shift, scale, w, b, x, tab, idx, noise, **base)
    with pytest.raises(ValueError, match="learned variance"):
        ops.draft_epilogue(h, shift, scale, w[:16], b[:16], x, tab, idx, noise, **base)
    with pytest.raises(ValueError, match="tables"):
        ops.draft_epilogue(h, shift, scale, w, b, x, tab[:5], idx, noise, **base)
    with pytest.raises(ValueError, match="guidance_channels"):
        ops.draft_epilogue(h, shift, scale, w, b, x, tab, idx, noise, guidance_channels=5, **base)


def test_draft_transition_reasons_for_unknown_heads():
    from free_kernels.ops.drafter_forward import OP_EPI, _head_reason

    class NoHead(torch.nn.Module):
        patch_size = 2

    assert "final_layer" in _head_reason(NoHead())
    tgt = make_target(device="cpu")
    assert _head_reason(tgt) is None
    ctx = dict(device=torch.device("cuda"), dtype=torch.float16, H=32, PE=16, target_reason=_head_reason(NoHead()))
    assert "final_layer" in OP_EPI.reasons(ctx)["triton"]
    assert OP_EPI.resolve(ctx).name == "torch"


@needs_triton
def test_free_sampler_runs_with_fused_epilogue(monkeypatch):
    """The sampler's draft loop through the fused epilogue (triton; interpreter on CPU) completes."""
    from free_kernels.models.drafter import FeatureDrafter
    from free_kernels.sampler import FreeSampler

    monkeypatch.setenv("FREE_KERNELS_BACKEND_DRAFT_TRANSITION", "triton")
    tgt = make_target(S=4)
    dif = _diffusion(True, steps="6")
    drafter = FeatureDrafter.for_target(tgt, init="random", generator=torch.Generator().manual_seed(0))
    smp = FreeSampler(tgt, drafter, dif, draft_length=2, clip_denoised=True)
    g = torch.Generator(device=DEV).manual_seed(0)
    noise = torch.randn(2, 4, 4, 4, generator=g, device=DEV)
    out = smp.sample(noise, torch.tensor([1, 2], device=DEV), cfg_scale=2.0, generator=g)
    x = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(x).all()


# ============================================================ host math + offline GPU compilation
def test_adaln_math_header_host_tests(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path / "test_adaln_math"
    cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
           f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'tests'}",
           str(ROOT / "csrc" / "tests" / "test_adaln_math.cpp"), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", ["modulated_layernorm", "draft_epilogue"])
def test_cuda_kernels_compile_for_sm80_sm90_without_spills(name, tmp_path):
    """nvcc -Xptxas -v on the .cu for sm_80 and sm_90: every instance compiles with 0 spill bytes.

    (draft_epilogue has a 32-byte stack frame and no spills: cosf's Payne-Hanek range reduction
    inside philox_randn's Box-Muller, never taken since its angle is in [0, 2 pi).)
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-gencode", "arch=compute_80,code=sm_80",
           "-gencode", "arch=compute_90,code=sm_90", f"-I{ROOT / 'csrc' / 'include'}", "-c",
           str(ROOT / "csrc" / "kernels" / f"{name}.cu"), "-o", str(tmp_path / f"{name}.o"), "-Xptxas", "-v"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    assert len(spills) >= 4, r.stderr[-3000:]
    assert all(a == "0" and b == "0" for a, b in spills), f"register spills:\n{r.stderr}"
    assert "warning" not in r.stderr.lower(), r.stderr[-3000:]


_COMPILE_SNIPPET = textwrap.dedent("""
    import json, os, subprocess, sys, tempfile
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import free_kernels.triton.draft_epilogue as de
    import free_kernels.triton.modulated_layernorm as ad
    cc, which, dt = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dtype, ptr = dict(fp16=(torch.float16, "*fp16"), bf16=(torch.bfloat16, "*bf16"), fp32=(torch.float32, "*fp32"))[dt]
    if which == "draft_epilogue":
        meta = de.launch_meta(1152, 2, 4, dtype, interpret=False)
        fn = de._draft_epilogue_kernel
        ptrs = ["Hf", "SHIFT", "SCALE", "W", "BIAS", "X", "TAB", "IDX", "NOISE", "RNG", "OUT_X", "OUT_M", "OUT_V",
                "OUT_Z"]
        types = [ptr] * 5 + ["*fp32", "*fp32", "*i64", "*fp32", "*i64"] + ["*fp32"] * 4
        sig = dict(zip(ptrs, types))
        for n in ["R", "N", "H", "GRID_W"]:
            sig[n] = "i32"
        sig.update(eps="fp32", cfg_scale="fp32")
        for n in fn.arg_names[len(sig):]:
            if n not in meta and n not in ("C", "P", "C_OUT", "GC", "CFG", "LEARNED", "XSTART", "CLIP",
                                           "HAS_NOISE", "WRITE_Z"):
                sig[n] = "i64"
        const = dict(meta, C=4, P=2, C_OUT=8, GC=3, CFG=True, LEARNED=True, XSTART=False, CLIP=False,
                     HAS_NOISE=False, WRITE_Z=True)
        warps = 4
    else:
        fn = ad._modulated_layernorm_kernel
        sig = dict(X=ptr, SHIFT=ptr, SCALE=ptr, OUT=ptr, N="i32", H="i32", eps="fp32")
        for n in fn.arg_names[len(sig):]:
            if n != "BLOCK_H":
                sig[n] = "i64"
        const = dict(BLOCK_H=2048)
        warps = 4
    for k in const:
        sig[k] = "constexpr"
    results = []
    variants = [dict()] if which != "draft_epilogue" else [dict(HAS_NOISE=False), dict(HAS_NOISE=True)]
    for v in variants:
        k = triton.compile(ASTSource(fn, sig, dict(const, **v)), target=GPUTarget("cuda", cc, 32),
                           options=dict(num_warps=warps))
        # ptxas -v on the kernel's PTX reports spills precisely (a stack frame alone can be cosf's
        # never-taken Payne-Hanek range reduction inside tl.randn)
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "k.ptx")
            with open(src, "w") as f:
                f.write(k.asm["ptx"])
            r = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{cc}a" if cc == 90 else f"--gpu-name=sm_{cc}", src,
                                "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
        results.append(r.stderr + r.stdout)
    usage = chr(10).join(results)
    print(json.dumps(dict(usage=usage)))
""")


@pytest.mark.skipif(_triton_missing() is not None and not INTERPRET, reason="needs triton")
@pytest.mark.skipif(CUDA, reason="CPU-only check; on a GPU the kernels are launched by the gpu tests")
@pytest.mark.parametrize("which,dt", [("draft_epilogue", "fp16"), ("draft_epilogue", "bf16"),
                                      ("draft_epilogue", "fp32"), ("modulated_layernorm", "bf16")])
@pytest.mark.parametrize("cc", [80, 90])
def test_triton_kernels_compile_for_gpu_without_spills(cc, which, dt, tmp_path):
    """Compile the DiT-XL (H = 1152) Triton kernels for sm_80 / sm_90 on the CPU (no launch), check ptxas spills."""
    import json

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _COMPILE_SNIPPET, str(cc), which, dt], capture_output=True, text=True,
                       env=env, timeout=600)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("triton's ptxas is not available")
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info["usage"])
    assert spills, f"no ptxas report: {info['usage']}"
    assert all(a == "0" and b == "0" for a, b in spills), f"register spills on sm_{cc}: {info['usage']}"


# ============================================================ GPU
def _gpu_backends():
    return [pytest.param("triton", id="triton"), pytest.param("cuda", id="cuda")]


def _skip_unless(backend, name, dtype=torch.float16, **ctx):
    why = get_op(name).reasons(dict(device=torch.device("cuda"), dtype=dtype, H=1152, K=4608, PE=16, **ctx))[backend]
    if why is not None:
        pytest.skip(f"{backend} cannot run {name}: {why}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("N,H", [(256, 1152), (1024, 1152), (7, 72), (16, 96), (1, 4096)])
def test_gpu_adaln_kernels_match(backend, dtype, N, H):
    for name in ("modulated_layernorm", "gated_residual", "bias_gelu"):
        _skip_unless(backend, name, dtype)
    x, shift, scale = _mln_case(2, N, H, dtype, seed=N + H)
    out = ops.modulated_layernorm(x, shift, scale, backend=backend)
    assert_flash_rule(out, _mln_oracle(x, shift, scale), ref_mln(x, shift, scale), dtype, f"mln {N} {H}")
    y, gate = rnd((2, N, H), dtype, 1), rnd((2, H), dtype, 2)
    ref64 = ref_gated(x.double(), gate.double(), y.double())
    assert_flash_rule(ops.gated_residual(x, gate, y, backend=backend), ref64, ref_gated(x, gate, y), dtype, "gated")
    b = rnd((H,), dtype, 3)
    assert_flash_rule(ops.bias_gelu(x, b, backend=backend), ref_bias_gelu(x.double(), b.double()),
                      ref_bias_gelu(x, b), dtype, "bias_gelu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("S,p,H,R", [(32, 2, 1152, 1), (32, 2, 1152, 8), (64, 2, 1152, 2), (8, 2, 96, 3),
                                     (16, 4, 72, 2)])
@pytest.mark.parametrize("learn,cfg", [(True, True), (False, False)])
def test_gpu_draft_epilogue_matches(backend, dtype, S, p, H, R, learn, cfg):
    _skip_unless(backend, "draft_epilogue", dtype)
    tgt = make_target(learn_sigma=learn, S=S, p=p, H=H, dtype=dtype)
    dif = _diffusion(learn, steps="250")
    h, c, x, noise, idx = epilogue_case(R=R, cfg=cfg, S=S, p=p, H=H, dtype=dtype, steps="250", seed=S + H + R)
    kw = dict(cfg_scale=4.0, guidance_channels=3, clip_denoised=False)
    ref64 = composition_oracle(tgt, dif, h, c, x, idx, noise, **kw)
    with torch.no_grad():
        same = ref_composition(tgt, dif, h, c, x, idx, noise, **kw)
        res = ops.draft_transition(tgt, dif, h, c, x, idx, noise, backend=backend, **kw)
    check_transition(res, ref64, same, dtype, f"{backend} S={S} H={H} R={R}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_unaligned_paths(backend):
    """Odd offsets / strides: the CUDA element-wise paths (no 16-byte vectors, no mma weight pairs)."""
    dtype = torch.float16
    _skip_unless(backend, "modulated_layernorm", dtype)
    big = rnd((2, 9, 1152 + 3), dtype, 1)
    x = big[:, 1:8, 3:]  # 2-byte aligned only
    sh, sc = rnd((2, 1152 + 1), dtype, 2)[:, 1:], rnd((2, 1152), dtype, 3)
    assert_flash_rule(ops.modulated_layernorm(x, sh, sc, backend=backend), _mln_oracle(x, sh, sc),
                      ref_mln(x, sh, sc), dtype, "unaligned mln")
    tgt = make_target(S=8, p=2, H=96, dtype=dtype)
    with torch.no_grad():
        wbig = torch.zeros(33, 97, dtype=dtype, device=DEV)
        wbig[1:, 1:] = tgt.final_layer.linear.weight
        tgt.final_layer.linear.weight = torch.nn.Parameter(wbig[1:, 1:])  # rows at an odd element offset
    dif = _diffusion(True)
    h, c, x, noise, idx = epilogue_case(R=2, cfg=True, S=8, p=2, H=96, dtype=dtype)
    kw = dict(cfg_scale=4.0, guidance_channels=4, clip_denoised=True)
    ref64 = composition_oracle(tgt, dif, h, c, x, idx, noise, **kw)
    with torch.no_grad():
        same = ref_composition(tgt, dif, h, c, x, idx, noise, **kw)
        res = ops.draft_transition(tgt, dif, h, c, x, idx, noise, backend=backend, **kw)
    check_transition(res, ref64, same, dtype, "unaligned epilogue")


@pytest.mark.gpu
def test_gpu_backends_draw_the_same_noise_stream():
    _skip_unless("cuda", "draft_epilogue")
    _skip_unless("triton", "draft_epilogue")
    tgt = make_target(S=16, p=2, H=96, dtype=torch.float16)
    dif = _diffusion(True)
    h, c, x, _, idx = epilogue_case(R=2, cfg=True, S=16, p=2, H=96, dtype=torch.float16)
    zs = []
    for backend in ("cuda", "triton"):
        rng = torch.tensor([42, 7], dtype=torch.int64, device=DEV)
        z = torch.empty(x.shape, device=DEV)
        with torch.no_grad():
            ops.draft_transition(tgt, dif, h, c, x, idx, None, rng_state=rng, noise_out=z, backend=backend)
        assert rng.tolist() == [42, 7 + x.numel()]
        zs.append(z)
    torch.testing.assert_close(zs[0], zs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_cuda_graph_capture_of_one_draft_step(backend):
    """drafter forward + fused epilogue captured with static buffers and a device rng_state: replay == eager."""
    from free_kernels.models.drafter import FeatureDrafter

    dtype = torch.bfloat16
    for name in ("modulated_layernorm", "gated_residual", "bias_gelu", "draft_epilogue"):
        _skip_unless(backend, name, dtype)
    env = {f"FREE_KERNELS_BACKEND_{n.upper()}": backend
           for n in ("modulated_layernorm", "gated_residual", "bias_gelu", "draft_transition")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        tgt = make_target(S=32, p=2, H=1152, dtype=dtype)
        tgt.num_heads = 16
        dif = _diffusion(True, steps="250")
        drafter = FeatureDrafter.for_target(tgt, init="random", generator=torch.Generator().manual_seed(0)).to(dtype)
        R, G = 2, 2
        h_prev = rnd((G * R, 256, 1152), dtype, 1)
        x = rnd((R, 4, 32, 32), torch.float32, 2)
        idx = torch.tensor([200, 150], device=DEV)
        t = torch.as_tensor(np.asarray(dif.timestep_map)[idx.cpu().numpy()], device=DEV).repeat(G)
        y = torch.tensor([1, 2, tgt.num_classes, tgt.num_classes], device=DEV)  # [cond; uncond (null class)]
        rng = torch.tensor([7, 0], dtype=torch.int64, device=DEV)
        outs = tuple(torch.empty(x.shape, device=DEV) for _ in range(3))
        z = torch.empty(x.shape, device=DEV)

        def step():
            h = ops.drafter_forward(drafter, h_prev, x.to(dtype).repeat(G, 1, 1, 1), t, y)
            c = tgt.embed_condition(t, y)
            return ops.draft_transition(tgt, dif, h, c, x, idx, None, cfg_scale=4.0, rng_state=rng, out=outs,
                                        noise_out=z)

        with torch.no_grad():
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                step()  # warm-up: kernel compilation / loading and the schedule-table cache
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            rng.copy_(torch.tensor([7, 0]))
            step()
            eager = [o.clone() for o in outs] + [z.clone()]
            rng.copy_(torch.tensor([7, 0]))
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            rng.copy_(torch.tensor([7, 0]))
            for o in outs + (z,):
                o.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(z, eager[3])  # counter-based noise: bit for bit
            for a, b in zip(eager[:3], outs):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            assert rng.tolist() == [7, x.numel()]
            g.replay()  # the offset lives on the device: fresh noise
            torch.cuda.synchronize()
            assert not torch.equal(z, eager[3])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

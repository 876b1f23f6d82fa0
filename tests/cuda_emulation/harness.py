"""The kernel backends under test, and the CUDA kernels on a CPU-only machine ("cuda-emu").

``kernel_backends()`` / ``call(op, backend, ...)``: the fused backends of an op
that can run here - ``triton`` (on CPU under TRITON_INTERPRET=1, set by
tests/conftest.py) and ``cuda`` on a GPU, or on a CPU-only machine ``cuda-emu``:
the very csrc/kernels/<op>.cu compiled by g++ against the host emulation of the
CUDA built-ins (fk_cuda_emu.h: blocks of real threads, real barriers for
__syncthreads and shuffles, mma.sync replaced by a lane-exact software
m16n8k16), called through the op's own Python wrapper.

For an op, ``build(op)`` copies csrc/kernels/<op>.cu with its launches
``kernel<<<grid, block, smem, stream>>>(args)`` rewritten to
``fk_emu::launch(kernel, grid, block, smem, stream, args)`` (plus the op's own
rewrites, ``REWRITES``) to ``<op>_emu.cu.inc``, and compiles it with its C ABI
wrapper ``<op>_emu.cpp`` (this folder) and ``runtime_emu.cpp`` into one shared
library: g++ -std=c++20 -pthread -include fk_cuda_emu.h, one translation unit per
.cu as in the real build.  Each library is built once per test session.

``EmulatedExtension`` is the ctypes stand-in for the ``free_kernels._C`` entry
points of those ops, with the same positional arguments, so the ops' own cuda
wrappers (free_kernels/ops/<op>.py) run against it: ``emu_impl`` returns an op's
cuda backend bound to it ("cuda-emu").

Test files import this module as ``cuda_emulation.harness`` (tests/ on sys.path).
"""
from __future__ import annotations

import ctypes as ct
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

EMU_DIR = Path(__file__).resolve().parent
ROOT = EMU_DIR.parents[1]
KERNELS = ROOT / "csrc" / "kernels"

LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;()]*>)?)<<<([^>]*)>>>\(")
# launches each .cu must have (a rewrite that finds fewer means the source changed shape)
MIN_LAUNCHES = {"modulated_layernorm": 1, "gated_residual": 2, "bias_gelu": 2, "draft_epilogue": 2,
                "speculative_accept": 4}
# (pattern, replacement, expected number of matches) beyond the launches
REWRITES: Dict[str, List[Tuple[str, str, int]]] = {
    "draft_epilogue": [
        # dynamic shared memory: a static buffer (blocks of a grid run one after another)
        (r"extern __shared__ __align__\(16\) unsigned char (\w+)\[\];",
         r"alignas(16) static unsigned char \1[256 * 1024];", 1),
        # mma.sync: the lane-exact software m16n8k16 of fk_cuda_emu.h
        (r"Mma<T>::run\(", "fk_emu_mma<T>(", 1),
    ],
}

_BUILD_DIR: Dict[str, Path] = {}
_LIBS: Dict[str, Path] = {}


def unavailable_reason() -> Optional[str]:
    """Why "cuda-emu" cannot run here (None: it can)."""
    if torch.cuda.is_available():
        return "a GPU is present: the real cuda backend is tested instead of the host emulation"
    if shutil.which("g++") is None:
        return "no g++ for the host emulation"
    return None


def emulated_source(op: str) -> str:
    """csrc/kernels/<op>.cu with its launches (and the op's REWRITES) rewritten for the emulation."""
    src = (KERNELS / f"{op}.cu").read_text()
    src, n = LAUNCH.subn(r"fk_emu::launch(\1, \2, ", src)
    assert n >= MIN_LAUNCHES[op], f"kernel launches not found in {op}.cu ({n})"
    for pattern, repl, expected in REWRITES.get(op, ()):
        src, n = re.subn(pattern, repl, src)
        assert n == expected, f"{op}.cu: {pattern!r} matched {n} times, expected {expected}"
    return src


def build(op: str) -> Path:
    """The shared library of ``op`` under the emulation (built on first use)."""
    if op in _LIBS:
        return _LIBS[op]
    if "dir" not in _BUILD_DIR:
        _BUILD_DIR["dir"] = Path(tempfile.mkdtemp(prefix="fk_cuda_emu_"))
    d = _BUILD_DIR["dir"]
    (d / f"{op}_emu.cu.inc").write_text(emulated_source(op))
    lib = d / f"lib{op}_emu.so"
    cmd = [shutil.which("g++") or "g++", "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-w",
           "-include", str(EMU_DIR / "fk_cuda_emu.h"), f"-I{EMU_DIR}", f"-I{ROOT / 'csrc' / 'include'}", f"-I{d}",
           str(EMU_DIR / f"{op}_emu.cpp"), str(EMU_DIR / "runtime_emu.cpp"), "-o", str(lib)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise AssertionError(f"host emulation build of {op}.cu failed:\n" + r.stderr[-4000:])
    _LIBS[op] = lib
    return lib


class EmulatedExtension:
    """ctypes stand-in for the ``_C`` entry points of the emulated kernels (same positional arguments)."""

    def __init__(self):
        self._libs: Dict[str, ct.CDLL] = {}
        self._err = ct.create_string_buffer(2048)

    def _lib(self, op: str) -> ct.CDLL:
        if op not in self._libs:
            lib = ct.CDLL(str(build(op)))
            if op == "speculative_accept":
                u64, i64 = ct.c_uint64, ct.c_int64
                lib.emu_speculative_accept_workspace_bytes.restype = i64
                lib.emu_speculative_accept_workspace_bytes.argtypes = [i64, i64, i64]
                lib.emu_speculative_accept.restype = ct.c_int
                lib.emu_speculative_accept.argtypes = (
                    [u64] * 5 + [ct.POINTER(i64)] + [u64] * 7 + [i64, u64, u64, i64] + [u64] * 5
                    + [i64, i64, i64, ct.c_int, ct.c_int, i64, ct.c_char_p, ct.c_int])
            self._libs[op] = lib
        return self._libs[op]

    @staticmethod
    def _arr(ctype, vals):
        return (ctype * len(vals))(*vals)

    def _check(self, rc):
        if rc == 1:
            raise ValueError(self._err.value.decode())
        if rc:
            raise RuntimeError(self._err.value.decode())

    def modulated_layernorm(self, x, sh, sc, out, B, N, H, eps, strides, code, stream=0):
        self._check(self._lib("modulated_layernorm").emu_modulated_layernorm(
            ct.c_uint64(x), ct.c_uint64(sh), ct.c_uint64(sc), ct.c_uint64(out), ct.c_int64(B), ct.c_int64(N),
            ct.c_int64(H), ct.c_double(eps), self._arr(ct.c_int64, strides), ct.c_int64(code), self._err, 2048))

    def gated_residual(self, x, g, y, out, B, N, H, strides, code, stream=0):
        self._check(self._lib("gated_residual").emu_gated_residual(
            ct.c_uint64(x), ct.c_uint64(g), ct.c_uint64(y), ct.c_uint64(out), ct.c_int64(B), ct.c_int64(N),
            ct.c_int64(H), self._arr(ct.c_int64, strides), ct.c_int64(code), self._err, 2048))

    def bias_gelu(self, x, b, out, B, N, K, strides, code, stream=0):
        self._check(self._lib("bias_gelu").emu_bias_gelu(
            ct.c_uint64(x), ct.c_uint64(b), ct.c_uint64(out), ct.c_int64(B), ct.c_int64(N), ct.c_int64(K),
            self._arr(ct.c_int64, strides), ct.c_int64(code), self._err, 2048))

    def draft_epilogue(self, *a):
        ptrs, strides, codes = a[:14], a[14], a[15]
        sizes = a[16:25]
        fl = a[25:27]
        flags = [int(a[27]), int(bool(a[28])), int(bool(a[29])), int(bool(a[30]))]
        self._check(self._lib("draft_epilogue").emu_draft_epilogue(
            self._arr(ct.c_uint64, ptrs), self._arr(ct.c_int64, strides), self._arr(ct.c_int64, codes),
            self._arr(ct.c_int64, sizes), self._arr(ct.c_double, fl), self._arr(ct.c_int64, flags), self._err, 2048))

    def speculative_accept_workspace_bytes(self, B, L, D):
        return self._lib("speculative_accept").emu_speculative_accept_workspace_bytes(B, L, D)

    def speculative_accept(self, *a):
        a = list(a)
        a[5] = (ct.c_int64 * 17)(*a[5])
        rc = self._lib("speculative_accept").emu_speculative_accept(*a[:25], int(a[25]), int(bool(a[26])), a[27],
                                                                    self._err, len(self._err))
        self._check(rc)


_EXT: Dict[str, EmulatedExtension] = {}


def extension() -> Tuple[Optional[EmulatedExtension], Optional[str]]:
    """(the session's emulated extension, None), or (None, why it cannot run here)."""
    why = unavailable_reason()
    if why is not None:
        return None, why
    if "ext" not in _EXT:
        _EXT["ext"] = EmulatedExtension()
    return _EXT["ext"], None


def emu_impl(op_name: str, monkeypatch):
    """The op's cuda backend implementation bound to the emulated extension (CPU tensors, stream 0).

    Skips the calling test when the emulation cannot run here; builds the op's library on first use.
    """
    from free_kernels import _env
    from free_kernels.ops import _fused, get_op

    ext, why = extension()
    if ext is None:
        pytest.skip(f"cuda-emu unavailable: {why}")
    ext._lib(op_name)  # build now: a build failure fails the test, not the first call inside the op
    monkeypatch.setattr(_env, "extension", lambda: ext)
    monkeypatch.setattr(_fused, "stream_of", lambda t: 0)
    return get_op(op_name).backends["cuda"].load()  # a fresh closure: the cached real impl is untouched


# ---------------------------------------------------------------- the backends under test
def triton_missing() -> Optional[str]:
    """Why the triton backend cannot run here (None: it can)."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - triton is a dependency
        return f"triton not importable: {e}"
    if not CUDA and not INTERPRET:
        return "Triton on CPU needs TRITON_INTERPRET=1 before triton is imported"
    return None


needs_triton = pytest.mark.skipif(triton_missing() is not None, reason=str(triton_missing()))


def kernel_backends():
    """Parametrization: the fused backends that can run on this machine (or an emulation of them)."""
    out = [pytest.param("triton", id="triton", marks=needs_triton)]
    out.append(pytest.param("cuda", id="cuda") if CUDA else pytest.param("cuda-emu", id="cuda-emu"))
    return out


def call(op_name: str, backend: str, monkeypatch, *args, **kw):
    """Run the op on ``backend``: through the public dispatch point (explicit backend), or the emulation."""
    if backend == "cuda-emu":
        return emu_impl(op_name, monkeypatch)(*args, **kw)
    from free_kernels import ops

    return getattr(ops, op_name)(*args, backend=backend, **kw)


def probe_ctx(device, dtype, **kw) -> dict:
    """A dispatch context with the shape keys the fused ops' probes read (H, K, PE)."""
    return dict(device=torch.device(device), dtype=dtype, H=96, K=384, PE=16, **kw)


def gpu_skip_unless(op_name: str, backend: str, dtype=torch.float16) -> None:
    """Skip a GPU test when ``backend`` cannot run ``op_name`` for DiT-XL sizes on this GPU (with the reason)."""
    from free_kernels.ops import get_op

    why = get_op(op_name).reasons(dict(device=torch.device("cuda"), dtype=dtype, H=1152, K=4608, PE=16))[backend]
    if why is not None:
        pytest.skip(f"{backend} cannot run {op_name}: {why}")


def gpu_backends():
    """Parametrization of the GPU tests: both fused backends."""
    return [pytest.param("triton", id="triton"), pytest.param("cuda", id="cuda")]


def rnd(shape, dtype, seed, scale=1.0, offset=0.0, device=DEV):
    """Normal(offset, scale) drawn in float64 from ``seed``, then cast: the same values on every machine."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(device=device, dtype=dtype)


# ---------------------------------------------------------------- offline GPU compilation (CPU machine)
def assert_cuda_compiles_without_spills(op: str, tmp_path: Path, min_instances: int = 4) -> None:
    """nvcc -Xptxas -v on csrc/kernels/<op>.cu for sm_80 and sm_90: compiles, every instance 0 spill bytes,
    no warnings.  Skips without nvcc."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-gencode", "arch=compute_80,code=sm_80",
           "-gencode", "arch=compute_90,code=sm_90", f"-I{ROOT / 'csrc' / 'include'}", "-c",
           str(KERNELS / f"{op}.cu"), "-o", str(tmp_path / f"{op}.o"), "-Xptxas", "-v"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    assert len(spills) >= min_instances, r.stderr[-3000:]
    assert all(a == "0" and b == "0" for a, b in spills), f"register spills:\n{r.stderr}"
    assert "warning" not in r.stderr.lower(), r.stderr[-3000:]


def triton_ptxas_usage(snippet: str, args, cc: int, tmp_path: Path) -> str:
    """ptxas -v of Triton kernels compiled for sm_<cc> on this (CPU) machine, without a launch.

    ``snippet`` is a script run with TRITON_INTERPRET=0 and ``args`` on its command line; its last output
    line is a JSON list of the PTX texts it compiled (``triton.compile(...).asm["ptx"]``).  ptxas reports
    spills precisely (a stack frame alone can be cosf's never-taken Payne-Hanek range reduction inside
    tl.randn).  Skips when Triton's ptxas is not available."""
    import json
    import sys

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's ptxas is not available")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", snippet, *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    usage = []
    for i, ptx in enumerate(json.loads(r.stdout.strip().splitlines()[-1])):
        src = tmp_path / f"k{i}.ptx"
        src.write_text(ptx)
        arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
        p = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(src), "-o", str(tmp_path / f"k{i}.cubin")],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        usage.append(p.stderr + p.stdout)
    return "\n".join(usage)


def assert_no_spills(usage: str, what: str) -> None:
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", usage)
    assert spills, f"no ptxas report: {usage}"
    assert all(a == "0" and b == "0" for a, b in spills), f"register spills ({what}): {usage}"

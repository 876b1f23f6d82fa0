"""verify_attention: triton and cuda backends against the fp64 reference.

Accuracy rule (flash-attention's, tests/_tolerance.py): a kernel's max error
against the oracle (the reference in float64) may be at most 2x the error of
PyTorch's own naive attention computed in the same dtype, plus the dtype's
small floor.

CPU: the Triton kernel runs under TRITON_INTERPRET=1 (set by conftest), fp32
and fp16 (plus one bf16 case: the interpreter converts after loading), small
shapes.  GPU (``gpu`` marker): fp16 / bf16, larger N, both the triton and the
cuda backend, including the CUDA kernel's element-wise (unaligned) path.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _tolerance import assert_flash_rule
from free_kernels.ops import BackendUnavailable, get_op
from free_kernels.ops.verify_attention import verify_attention
from free_kernels.reference.verify_attention import verify_attention as reference

ROOT = Path(__file__).resolve().parents[1]
OP = get_op("verify_attention")
CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

def _triton_missing():
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - triton is a dependency
        return f"triton not importable: {e}"
    return None


needs_triton = pytest.mark.skipif(_triton_missing() is not None, reason=str(_triton_missing()))
needs_triton_runtime = pytest.mark.skipif(
    not CUDA and not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1 before triton is imported")


# ------------------------------------------------------------------ helpers
def make_qkv(B, N, heads, hd, dtype, device="cpu", seed=0, row_scales=None):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3 * heads * hd, generator=g, dtype=torch.float64)
    if row_scales is not None:  # per-token scale of q and k: very different logit ranges per row
        s = torch.tensor(row_scales, dtype=torch.float64)[torch.arange(N) % len(row_scales)]
        qkv[:, :, : 2 * heads * hd] *= s[None, :, None]
    return qkv.to(dtype=dtype, device=device)


def oracle(qkv, heads):
    return reference(qkv.double().cpu(), heads)


def torch_same_dtype(qkv, heads):
    """Naive attention entirely in qkv's dtype: PyTorch's own error in that dtype."""
    B, N, C = qkv.shape
    hd = C // (3 * heads)
    q, k, v = qkv.reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    a = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    return (a @ v).transpose(1, 2).reshape(B, N, heads * hd)


def assert_close_flash_rule(out, qkv, heads, what=""):
    assert_flash_rule(out, oracle(qkv, heads), torch_same_dtype(qkv, heads), qkv.dtype, what)


def run_triton(qkv, heads, out=None, **kw):
    return verify_attention(qkv, heads, out=out, backend="triton", **kw)


# ------------------------------------------------------------ dispatch (CPU)
def test_cpu_tensors_default_to_torch():
    qkv = make_qkv(2, 5, 2, 8, torch.float32)
    ctx = dict(device=qkv.device, dtype=qkv.dtype, head_dim=8, N=5)
    assert OP.resolve(ctx).name == "torch"
    torch.testing.assert_close(verify_attention(qkv, 2), reference(qkv, 2), rtol=0, atol=0)


def test_explicit_cuda_request_on_cpu_raises():
    qkv = make_qkv(1, 4, 1, 64, torch.float16)
    with pytest.raises(BackendUnavailable, match="cuda"):
        verify_attention(qkv, 1, backend="cuda")


def test_explicit_triton_request_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    qkv = make_qkv(1, 4, 1, 64, torch.float32)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        verify_attention(qkv, 1, backend="triton")


def test_triton_rejects_head_dim_above_256():
    ctx = dict(device=torch.device("cpu"), dtype=torch.float32, head_dim=264, N=4)
    assert "264" in OP.reasons(ctx)["triton"]
    qkv = make_qkv(1, 2, 1, 264, torch.float32)
    with pytest.raises(BackendUnavailable, match="head_dim"):
        verify_attention(qkv, 1, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_probes_give_reasons_not_errors(dtype):
    """Every backend answers for a CUDA context, even on a CPU-only torch (info / auto dispatch)."""
    for dev in ("cuda", "cpu"):
        ctx = dict(device=torch.device(dev), dtype=dtype, head_dim=72, N=256)
        for name, why in OP.reasons(ctx).items():
            assert why is None or not why.startswith("probe failed"), f"{name} on {dev}: {why}"


def test_env_override_selects_triton(monkeypatch):
    if not INTERPRET:
        pytest.skip("needs the Triton interpreter on CPU")
    monkeypatch.setenv("FREE_KERNELS_BACKEND_VERIFY_ATTENTION", "triton")
    ctx = dict(device=torch.device("cpu"), dtype=torch.float32, head_dim=64, N=4)
    assert OP.resolve(ctx).name == "triton"


def test_head_dim_split_rule():
    from free_kernels.triton.verify_attention import split_head_dim

    assert split_head_dim(72) == (64, 16)      # DiT-XL: 80 columns, not 128
    assert split_head_dim(64) == (64, 0)
    assert split_head_dim(128) == (128, 0)
    assert split_head_dim(96) == (64, 32)
    assert split_head_dim(100) == (128, 0)     # 64 + 64 is no better than padding
    assert split_head_dim(8) == (16, 0)        # the dot needs K >= 16
    assert split_head_dim(72, split=False) == (128, 0)
    with pytest.raises(ValueError):
        split_head_dim(257)


# -------------------------------------------------- triton on the interpreter
@needs_triton
@needs_triton_runtime
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("hd", [72, 64])
@pytest.mark.parametrize("N", [1, 7, 97, 256])
def test_triton_matches_reference(N, hd, dtype):
    if N == 256 and not CUDA and (hd, dtype) != (72, torch.float16):
        pytest.skip("N=256 on the interpreter only for the DiT-XL case (time)")
    B, heads = (2, 2) if N < 256 else (1, 1)
    qkv = make_qkv(B, N, heads, hd, dtype, device="cuda" if CUDA else "cpu", seed=N + hd)
    assert_close_flash_rule(run_triton(qkv, heads), qkv, heads, f"N={N} hd={hd} {dtype}")


@needs_triton
@needs_triton_runtime
def test_triton_bf16_on_interpreter_or_gpu():
    qkv = make_qkv(2, 40, 2, 72, torch.bfloat16, device="cuda" if CUDA else "cpu", seed=3)
    assert_close_flash_rule(run_triton(qkv, 2), qkv, 2, "bf16")


@needs_triton
@needs_triton_runtime
def test_triton_padded_head_dim_mode_matches():
    """split=False pads 72 to one 128-wide chunk instead of 64 + 16: same result."""
    qkv = make_qkv(1, 33, 2, 72, torch.float32, device="cuda" if CUDA else "cpu", seed=5)
    if CUDA:
        qkv = qkv.half()
    a = run_triton(qkv, 2)
    from free_kernels.triton.verify_attention import verify_attention as tv

    b = tv(qkv, 2, config=dict(split=False))
    assert_close_flash_rule(b, qkv, 2, "padded")
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@needs_triton
@needs_triton_runtime
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_very_different_row_scales(dtype):
    # tokens alternate q/k scales 1e-2 (flat softmax) and 30 (one-hot softmax)
    qkv = make_qkv(2, 45, 2, 72, dtype, device="cuda" if CUDA else "cpu", seed=11, row_scales=[1e-2, 30.0])
    assert_close_flash_rule(run_triton(qkv, 2), qkv, 2, f"row scales {dtype}")


@needs_triton
@needs_triton_runtime
def test_triton_non_contiguous_qkv_and_out():
    dev = "cuda" if CUDA else "cpu"
    dtype = torch.float16 if CUDA else torch.float32
    B, N, heads, hd = 2, 37, 2, 72
    C = 3 * heads * hd
    # qkv: a window of a bigger tensor (row pitch C + 40, offset 16 columns, 2 tokens)
    big = make_qkv(B, N + 3, 1, C + 40, dtype, device=dev, seed=21).reshape(B, N + 3, 3 * (C + 40))
    qkv = big[:, 2:N + 2, 16:16 + C]
    assert not qkv.is_contiguous() and qkv.stride(2) == 1
    # out: every other column of a wider buffer (channel stride 2), sentinel elsewhere
    buf = torch.full((B, N, 2 * heads * hd), 7.0, dtype=dtype, device=dev)
    out = buf[:, :, ::2]
    ret = run_triton(qkv, heads, out=out)
    assert ret.data_ptr() == out.data_ptr()
    assert_close_flash_rule(out, qkv, heads, "strided")
    assert (buf[:, :, 1::2] == 7.0).all(), "kernel wrote outside out"
    # channel-strided qkv: (B, C, N) storage seen as (B, N, C)
    qkv_t = make_qkv(B, C, 1, N, dtype, device=dev, seed=22).reshape(B, C, 3 * N)[:, :, :N].transpose(1, 2)
    assert qkv_t.stride(2) != 1
    assert_close_flash_rule(run_triton(qkv_t, heads), qkv_t, heads, "transposed")


@needs_triton
@needs_triton_runtime
@pytest.mark.parametrize("N", [1, 33])
def test_triton_writes_every_output_element(N):
    dev = "cuda" if CUDA else "cpu"
    dtype = torch.float16 if CUDA else torch.float32
    qkv = make_qkv(2, N, 2, 72, dtype, device=dev, seed=N)
    out = torch.full((2, N, 2 * 72), float("nan"), dtype=dtype, device=dev)
    run_triton(qkv, 2, out=out)
    assert not torch.isnan(out).any(), "some output elements were never written"
    assert_close_flash_rule(out, qkv, 2, "poisoned")


def test_triton_empty_inputs():
    if _triton_missing():
        pytest.skip(_triton_missing())
    from free_kernels.triton.verify_attention import verify_attention as tv

    qkv = torch.zeros(0, 5, 3 * 72, dtype=torch.float32)
    assert tv(qkv, 1).shape == (0, 5, 72)


# ------------------------------------------------ offline GPU compilation (CPU)
_COMPILE_SNIPPET = textwrap.dedent("""
    import json, os, subprocess, sys, tempfile
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from free_kernels.triton.verify_attention import _verify_attention_fwd, launch_meta
    hd, cc = 72, int(sys.argv[1])
    meta, cfg = launch_meta(hd, torch.float16, interpret=False)
    sig = dict(QKV="*fp16", OUT="*fp16", N="i32", HEADS="i32", num_m_blocks="i32", qk_scale="fp32",
               s_qb="i32", s_qn="i32", s_qc="constexpr", s_ob="i32", s_on="i32", s_oc="constexpr")
    sig.update({k: "constexpr" for k in meta})
    const = dict(meta, s_qc=1, s_oc=1)
    names = list(sig)
    # what a launch on the packed DiT layout specialises: 16-aligned pointers and strides
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("QKV", "OUT", "s_qb", "s_qn", "s_ob", "s_on")}
    k = triton.compile(ASTSource(_verify_attention_fwd, sig, const, attrs), target=GPUTarget("cuda", cc, 32),
                       options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = ""
    if os.path.exists(tool):
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    print(json.dumps(dict(shared=k.metadata.shared, usage=usage)))
""")


@needs_triton
@pytest.mark.skipif(CUDA, reason="CPU-only check; on a GPU the kernel is launched by the gpu tests")
@pytest.mark.parametrize("cc", [80, 90])
def test_triton_kernel_compiles_for_gpu_without_spills(cc, tmp_path):
    """Compile the DiT-XL (head dim 72, fp16) kernel for sm_80 / sm_90 on the CPU (no launch)."""
    import json

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _COMPILE_SNIPPET, str(cc)], capture_output=True, text=True,
                       env=env, timeout=300)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("triton's ptxas is not available")
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["shared"] > 0
    if info["usage"]:
        assert "STACK:0 " in info["usage"], f"register spills on sm_{cc}: {info['usage']}"


# --------------------------------------------- CUDA header math (host, g++)
def test_attention_math_header_host_tests(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path / "test_attention_math"
    cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
           f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'tests'}",
           str(ROOT / "csrc" / "tests" / "test_attention_math.cpp"), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ GPU
def _cuda_backend_reason():
    if not CUDA:
        return "no CUDA device"
    ctx = dict(device=torch.device("cuda"), dtype=torch.float16, head_dim=72, N=16)
    return OP.reasons(ctx)["cuda"]


GPU_BACKENDS = ["triton", "cuda"]


def _skip_unless_backend(backend):
    if backend == "cuda":
        why = _cuda_backend_reason()
        if why is not None:
            pytest.skip(f"cuda backend unavailable: {why}")
    elif _triton_missing():
        pytest.skip(_triton_missing())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("hd", [72, 64, 128])
@pytest.mark.parametrize("N", [1, 7, 97, 256, 1000, 1024])
def test_gpu_matches_reference(N, hd, dtype, backend):
    _skip_unless_backend(backend)
    B, heads = (3, 4) if N <= 256 else (2, 2)
    qkv = make_qkv(B, N, heads, hd, dtype, device="cuda", seed=N * 7 + hd)
    out = verify_attention(qkv, heads, backend=backend)
    assert_close_flash_rule(out, qkv, heads, f"{backend} N={N} hd={hd} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_row_scales_poison_and_strides(dtype, backend):
    _skip_unless_backend(backend)
    B, N, heads, hd = 3, 300, 4, 72
    C = 3 * heads * hd
    # very different row scales
    qkv = make_qkv(B, N, heads, hd, dtype, device="cuda", seed=1, row_scales=[1e-2, 30.0, 1.0])
    out = torch.full((B, N, heads * hd), float("nan"), dtype=dtype, device="cuda")
    verify_attention(qkv, heads, out=out, backend=backend)
    assert not torch.isnan(out).any()
    assert_close_flash_rule(out, qkv, heads, "row scales")
    # a 16-byte aligned window of a bigger tensor (vectorised path of the cuda kernel)
    big = make_qkv(B, N + 2, 1, C + 64, dtype, device="cuda", seed=2).reshape(B, N + 2, 3 * (C + 64))
    qkv = big[:, 1:N + 1, 64:64 + C]
    assert_close_flash_rule(verify_attention(qkv, heads, backend=backend), qkv, heads, "aligned window")
    # an odd offset (2-byte aligned only) and channel stride 2 on out: the element-wise path
    qkv_odd = big[:, 1:N + 1, 3:3 + C]
    buf = torch.full((B, N, 2 * heads * hd), 5.0, dtype=dtype, device="cuda")
    out = buf[:, :, ::2]
    verify_attention(qkv_odd, heads, out=out, backend=backend)
    assert_close_flash_rule(out, qkv_odd, heads, "unaligned window")
    assert (buf[:, :, 1::2] == 5.0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_cuda_graph_capture(backend):
    _skip_unless_backend(backend)
    qkv = make_qkv(4, 256, 16, 72, torch.float16, device="cuda", seed=9)
    out = torch.empty(4, 256, 16 * 72, dtype=torch.float16, device="cuda")
    verify_attention(qkv, 16, out=out, backend=backend)  # warm-up / compile outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    out.fill_(float("nan"))
    with torch.cuda.graph(g):
        verify_attention(qkv, 16, out=out, backend=backend)
    g.replay()
    torch.cuda.synchronize()
    assert_close_flash_rule(out, qkv, 16, "graph replay")


@pytest.mark.gpu
def test_gpu_auto_dispatch_prefers_cuda_then_triton():
    ctx = dict(device=torch.device("cuda"), dtype=torch.float16, head_dim=72, N=256)
    reasons = OP.reasons(ctx)
    expected = next(n for n in ("cuda", "triton", "torch") if reasons[n] is None)
    assert OP.resolve(ctx).name == expected
    # fp32 CUDA tensors are left to torch by the triton backend (and the cuda one)
    ctx32 = dict(ctx, dtype=torch.float32)
    assert OP.resolve(ctx32).name == "torch"

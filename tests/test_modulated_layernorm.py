"""modulated_layernorm: the triton and cuda kernels against the float64 oracle, dispatch, compilation.

Oracle: free_kernels/reference/modulated_layernorm.py in float64; accuracy rule
and dtype table: tests/_tolerance.py (flash-attention's: at most 2x PyTorch's
own error in the dtype, plus a small floor).

CPU: the Triton kernel runs under TRITON_INTERPRET=1 (conftest), the CUDA
kernel as "cuda-emu" (csrc/kernels/modulated_layernorm.cu under the host
emulation, tests/cuda_emulation/harness.py), float32 and float16, tiny shapes.
GPU (``gpu`` marker): the real ``cuda`` and ``triton`` backends in float16 /
bfloat16 / float32 at DiT-XL widths, and the unaligned path.
"""
from __future__ import annotations

import textwrap

import pytest
import torch

from _tolerance import assert_flash_rule
from cuda_emulation.harness import (CUDA, DEV, INTERPRET, assert_cuda_compiles_without_spills, assert_no_spills, call,
                                    gpu_backends, gpu_skip_unless, kernel_backends, rnd, triton_missing,
                                    triton_ptxas_usage)
from free_kernels import ops
from free_kernels.ops import BackendUnavailable
from free_kernels.reference.modulated_layernorm import modulated_layernorm as ref_mln

OP = "modulated_layernorm"


def mln_case(B, N, H, dtype, seed, noncontig=False):
    if noncontig:
        # x: every other token of a (B, 2N, H + 8) buffer, columns 4 .. 4 + H; shift / scale: chunks of (B, 2H)
        x = rnd((B, 2 * N, H + 8), dtype, seed, scale=2.0, offset=0.5)[:, ::2, 4:4 + H]
    else:
        x = rnd((B, N, H), dtype, seed, scale=2.0, offset=0.5)
    mod = rnd((B, 2 * H), dtype, seed + 1, scale=0.3)
    shift, scale = mod.chunk(2, dim=1)
    return x, shift, scale


def mln_oracle(x, shift, scale):
    return ref_mln(x.double().cpu(), shift.double().cpu(), scale.double().cpu())


# ============================================================ dispatch
def test_explicit_requests_that_cannot_run_raise():
    x = rnd((2, 3, 32), torch.float32, 0)
    sh, sc = rnd((2, 32), torch.float32, 1), rnd((2, 32), torch.float32, 2)
    with pytest.raises(BackendUnavailable, match="cuda"):
        ops.modulated_layernorm(x, sh, sc, backend="cuda")
    if triton_missing() is None:
        xg = x.clone().requires_grad_(True)
        with pytest.raises(BackendUnavailable, match="forward-only"):
            ops.modulated_layernorm(xg, sh, sc, backend="triton")


def test_explicit_triton_without_interpreter_raises(monkeypatch):
    if CUDA:
        pytest.skip("CPU-only check")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = rnd((1, 2, 32), torch.float32, 0)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        ops.modulated_layernorm(x, x[:, 0], x[:, 0], backend="triton")


def test_validation_names_the_argument():
    x = rnd((2, 3, 32), torch.float32, 0)
    with pytest.raises(ValueError, match="out"):
        ops.modulated_layernorm(x, x[:, 0], x[:, 0], out=x[:1])


# ============================================================ kernels against the oracle (CPU: interpreter / emulation)
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N", [1, 7, 16])
@pytest.mark.parametrize("H", [32, 96])
def test_modulated_layernorm_matches_reference(backend, dtype, N, H, monkeypatch):
    x, shift, scale = mln_case(2, N, H, dtype, seed=N * 100 + H)
    out = call(OP, backend, monkeypatch, x, shift, scale, eps=1e-6)
    assert_flash_rule(out, mln_oracle(x, shift, scale), ref_mln(x, shift, scale), dtype, f"{backend} N={N} H={H}")


@pytest.mark.parametrize("backend", kernel_backends())
def test_modulated_layernorm_strided_inputs_poisoned_strided_out(backend, monkeypatch):
    dtype = torch.float32 if not CUDA else torch.float16
    x, shift, scale = mln_case(3, 7, 96, dtype, seed=5, noncontig=True)
    assert not x.is_contiguous() and shift.stride(0) == 2 * 96
    buf = torch.full((3, 7, 2 * 96), 7.0, dtype=dtype, device=DEV)
    out = buf[:, :, ::2]
    out.fill_(float("nan"))
    ret = call(OP, backend, monkeypatch, x, shift, scale, eps=1e-6, out=out)
    assert ret.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any(), "some output elements were never written"
    assert (buf[:, :, 1::2] == 7.0).all(), "kernel wrote outside out"
    assert_flash_rule(out, mln_oracle(x, shift, scale), ref_mln(x, shift, scale), dtype, "strided")
    # channel stride != 1 on x (transposed storage): the element-wise path
    xt = rnd((3, 96, 7), dtype, 6).transpose(1, 2)
    out2 = call(OP, backend, monkeypatch, xt, shift, scale, eps=1e-6)
    assert_flash_rule(out2, mln_oracle(xt, shift, scale), ref_mln(xt, shift, scale), dtype, "transposed")


@pytest.mark.parametrize("backend", kernel_backends())
def test_modulated_layernorm_offset_rows_are_stable(backend, monkeypatch):
    """|mean| >> std: the two-pass statistics keep full accuracy (E[x^2] - E[x]^2 would not)."""
    x = rnd((2, 5, 96), torch.float32, 9, scale=1e-2, offset=300.0)
    sh, sc = rnd((2, 96), torch.float32, 10, scale=0.1), rnd((2, 96), torch.float32, 11, scale=0.1)
    out = call(OP, backend, monkeypatch, x, sh, sc, eps=1e-6)
    # torch's own fp32 error here is ~1e-3 (the fp32 mean of values ~300 is only good to ~ulp(300) / std);
    # a one-pass E[x^2] - E[x]^2 in fp32 would be off by O(1)
    assert_flash_rule(out, mln_oracle(x, sh, sc), ref_mln(x, sh, sc), torch.float32, "offset rows")


# ============================================================ offline GPU compilation (CPU)
def test_cuda_kernel_compiles_for_sm80_sm90_without_spills(tmp_path):
    """nvcc -Xptxas -v on csrc/kernels/modulated_layernorm.cu for sm_80 and sm_90: 0 spill bytes, no warnings."""
    assert_cuda_compiles_without_spills(OP, tmp_path)


_COMPILE_SNIPPET = textwrap.dedent("""
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import free_kernels.triton.modulated_layernorm as m
    cc, dt = int(sys.argv[1]), sys.argv[2]
    ptr = dict(fp16="*fp16", bf16="*bf16", fp32="*fp32")[dt]
    fn = m._modulated_layernorm_kernel
    sig = dict(X=ptr, SHIFT=ptr, SCALE=ptr, OUT=ptr, N="i32", H="i32", eps="fp32")
    for n in fn.arg_names[len(sig):]:
        if n != "BLOCK_H":
            sig[n] = "i64"
    const = dict(BLOCK_H=2048)
    sig.update({k: "constexpr" for k in const})
    k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", cc, 32), options=dict(num_warps=4))
    print(json.dumps([k.asm["ptx"]]))
""")


@pytest.mark.skipif(triton_missing() is not None and not INTERPRET, reason="needs triton")
@pytest.mark.skipif(CUDA, reason="CPU-only check; on a GPU the kernels are launched by the gpu tests")
@pytest.mark.parametrize("dt", ["bf16"])
@pytest.mark.parametrize("cc", [80, 90])
def test_triton_kernel_compiles_for_gpu_without_spills(cc, dt, tmp_path):
    """The DiT-XL (H = 1152: BLOCK_H 2048) Triton kernel for sm_80 / sm_90 on the CPU (no launch): no spills."""
    assert_no_spills(triton_ptxas_usage(_COMPILE_SNIPPET, [cc, dt], cc, tmp_path), f"sm_{cc} {dt}")


# ============================================================ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("N,H", [(256, 1152), (1024, 1152), (7, 72), (16, 96), (1, 4096)])
def test_gpu_modulated_layernorm_matches(backend, dtype, N, H):
    gpu_skip_unless(OP, backend, dtype)
    x, shift, scale = mln_case(2, N, H, dtype, seed=N + H)
    out = ops.modulated_layernorm(x, shift, scale, backend=backend)
    assert_flash_rule(out, mln_oracle(x, shift, scale), ref_mln(x, shift, scale), dtype, f"mln {N} {H}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_unaligned_path(backend):
    """Odd offsets / strides: the CUDA element-wise path (no 16-byte vectors)."""
    dtype = torch.float16
    gpu_skip_unless(OP, backend, dtype)
    big = rnd((2, 9, 1152 + 3), dtype, 1)
    x = big[:, 1:8, 3:]  # 2-byte aligned only
    sh, sc = rnd((2, 1152 + 1), dtype, 2)[:, 1:], rnd((2, 1152), dtype, 3)
    assert_flash_rule(ops.modulated_layernorm(x, sh, sc, backend=backend), mln_oracle(x, sh, sc),
                      ref_mln(x, sh, sc), dtype, "unaligned mln")

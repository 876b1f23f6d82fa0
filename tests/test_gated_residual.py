"""gated_residual: the triton and cuda kernels against the float64 oracle, dispatch, compilation.

Oracle: free_kernels/reference/gated_residual.py in float64; accuracy rule and
dtype table: tests/_tolerance.py.  CPU: Triton under TRITON_INTERPRET=1, the
CUDA kernel as "cuda-emu" (csrc/kernels/gated_residual.cu under the host
emulation, tests/cuda_emulation/harness.py), float32 and float16.  GPU
(``gpu`` marker): the real backends in float16 / bfloat16 / float32 at DiT-XL widths.
"""
from __future__ import annotations

import pytest
import torch

from _tolerance import assert_flash_rule
from cuda_emulation.harness import (CUDA, DEV, INTERPRET, assert_cuda_compiles_without_spills, call, gpu_backends,
                                    gpu_skip_unless, kernel_backends, probe_ctx, rnd, triton_missing)
from free_kernels import ops
from free_kernels.ops import BackendUnavailable, get_op
from free_kernels.reference.gated_residual import gated_residual as ref_gated

OP = "gated_residual"


def gated_oracle(x, gate, y):
    return ref_gated(x.double().cpu(), gate.double().cpu(), y.double().cpu())


# ============================================================ dispatch
def test_explicit_requests_that_cannot_run_raise():
    x = rnd((2, 3, 32), torch.float32, 0)
    sh = rnd((2, 32), torch.float32, 1)
    with pytest.raises(BackendUnavailable, match="cuda"):
        ops.gated_residual(x, sh, x, backend="cuda")
    if triton_missing() is None:
        with pytest.raises(BackendUnavailable, match="mixed dtypes"):
            ops.gated_residual(x, sh.double(), x, backend="triton")


def test_env_override_selects_backend(monkeypatch):
    if not INTERPRET:
        pytest.skip("needs the Triton interpreter on CPU")
    monkeypatch.setenv("FREE_KERNELS_BACKEND_GATED_RESIDUAL", "triton")
    assert get_op("gated_residual").resolve(probe_ctx("cpu", torch.float32)).name == "triton"
    assert get_op("bias_gelu").resolve(probe_ctx("cpu", torch.float32)).name == "torch"


def test_validation_names_the_argument():
    x = rnd((2, 3, 32), torch.float32, 0)
    with pytest.raises(ValueError, match="gate"):
        ops.gated_residual(x, x[0], x)


# ============================================================ kernels against the oracle (CPU: interpreter / emulation)
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N,H", [(1, 32), (7, 96), (16, 32)])
def test_gated_residual_matches_reference(backend, dtype, N, H, monkeypatch):
    x, y = rnd((2, N, H), dtype, N + H), rnd((2, N, H), dtype, N + H + 1)
    gate = rnd((2, 6 * H), dtype, 3).chunk(6, dim=1)[2]  # a chunk of the adaLN output, as in DiTBlock
    ref64 = gated_oracle(x, gate, y)
    out = call(OP, backend, monkeypatch, x, gate, y)
    assert_flash_rule(out, ref64, ref_gated(x, gate, y), dtype, f"{backend} N={N} H={H}")
    # in place into the residual stream
    xc = x.clone()
    ret = call(OP, backend, monkeypatch, xc, gate, y, out=xc)
    assert ret.data_ptr() == xc.data_ptr()
    assert_flash_rule(xc, ref64, ref_gated(x, gate, y), dtype, "in place")


@pytest.mark.parametrize("backend", kernel_backends())
def test_gated_residual_strided_and_poisoned(backend, monkeypatch):
    dtype = torch.float32 if not CUDA else torch.float16
    x = rnd((2, 14, 100), dtype, 1)[:, ::2, 2:98]
    y = rnd((2, 96, 7), dtype, 2).transpose(1, 2)
    gate = rnd((2, 96), dtype, 3)
    out = torch.full((2, 7, 96), float("nan"), dtype=dtype, device=DEV)
    call(OP, backend, monkeypatch, x, gate, y, out=out)
    assert not torch.isnan(out).any()
    assert_flash_rule(out, gated_oracle(x, gate, y), ref_gated(x, gate, y), dtype, "strided")


# ============================================================ offline GPU compilation (CPU)
def test_cuda_kernel_compiles_for_sm80_sm90_without_spills(tmp_path):
    """nvcc -Xptxas -v on csrc/kernels/gated_residual.cu for sm_80 and sm_90: 0 spill bytes, no warnings."""
    assert_cuda_compiles_without_spills(OP, tmp_path)


# ============================================================ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("N,H", [(256, 1152), (1024, 1152), (7, 72), (16, 96), (1, 4096)])
def test_gpu_gated_residual_matches(backend, dtype, N, H):
    gpu_skip_unless(OP, backend, dtype)
    x = rnd((2, N, H), dtype, N + H, scale=2.0, offset=0.5)
    y, gate = rnd((2, N, H), dtype, 1), rnd((2, H), dtype, 2)
    assert_flash_rule(ops.gated_residual(x, gate, y, backend=backend), gated_oracle(x, gate, y),
                      ref_gated(x, gate, y), dtype, f"gated {N} {H}")

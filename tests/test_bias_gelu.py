"""bias_gelu: the triton and cuda kernels against the float64 oracle, dispatch, compilation.

Oracle: free_kernels/reference/bias_gelu.py in float64; accuracy rule and dtype
table: tests/_tolerance.py.  CPU: Triton under TRITON_INTERPRET=1, the CUDA
kernel as "cuda-emu" (csrc/kernels/bias_gelu.cu under the host emulation,
tests/cuda_emulation/harness.py), float32 and float16.  GPU (``gpu`` marker):
the real backends in float16 / bfloat16 / float32 at DiT-XL widths.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _tolerance import assert_flash_rule
from cuda_emulation.harness import (DEV, assert_cuda_compiles_without_spills, call, gpu_backends, gpu_skip_unless,
                                    kernel_backends, rnd)
from free_kernels import ops
from free_kernels.ops import BackendUnavailable
from free_kernels.reference.bias_gelu import bias_gelu as ref_bias_gelu

OP = "bias_gelu"


# ============================================================ dispatch
def test_explicit_requests_that_cannot_run_raise():
    x = rnd((2, 3, 32), torch.float32, 0)
    with pytest.raises(BackendUnavailable, match="cuda"):
        ops.bias_gelu(x, x[0, 0], backend="cuda")


def test_validation_names_the_argument():
    x = rnd((2, 3, 32), torch.float32, 0)
    with pytest.raises(ValueError, match="bias"):
        ops.bias_gelu(x, x[0, 0, :7])
    with pytest.raises(ValueError, match="weight"):
        ops.bias_gelu(x, x[0, 0], weight=x[0])


# ============================================================ kernels against the oracle (CPU: interpreter / emulation)
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(1, 1, 32), (2, 7, 96), (16, 40)], ids=["1x1x32", "2x7x96", "16x40"])
def test_bias_gelu_matches_reference(backend, dtype, shape, monkeypatch):
    x = rnd(shape, dtype, sum(shape), scale=3.0)  # covers both GELU tails
    b = rnd((shape[-1],), dtype, 1)
    ref64 = ref_bias_gelu(x.double().cpu(), b.double().cpu())
    out = call(OP, backend, monkeypatch, x, b)
    assert_flash_rule(out, ref64, ref_bias_gelu(x, b), dtype, f"{backend} {shape}")
    xc = x.clone()
    call(OP, backend, monkeypatch, xc, b, out=xc)
    assert_flash_rule(xc, ref64, ref_bias_gelu(x, b), dtype, "in place")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_bias_gelu_with_weight_is_fc1_plus_gelu(backend, dtype, monkeypatch):
    x = rnd((2, 7, 32), dtype, 4)
    w = rnd((128, 32), dtype, 5, scale=32 ** -0.5)
    b = rnd((128,), dtype, 6, scale=0.5)
    ref64 = F.gelu(F.linear(x.double().cpu(), w.double().cpu(), b.double().cpu()), approximate="tanh")
    out = call(OP, backend, monkeypatch, x, b, weight=w)
    assert out.shape == (2, 7, 128)
    assert_flash_rule(out, ref64, ref_bias_gelu(x, b, weight=w), dtype, "fc1 + gelu")
    # poisoned strided out
    buf = torch.full((2, 7, 256), float("nan"), dtype=dtype, device=DEV)
    call(OP, backend, monkeypatch, x, b, weight=w, out=buf[:, :, ::2])
    assert not torch.isnan(buf[:, :, ::2]).any() and torch.isnan(buf[:, :, 1::2]).all()


# ============================================================ offline GPU compilation (CPU)
def test_cuda_kernel_compiles_for_sm80_sm90_without_spills(tmp_path):
    """nvcc -Xptxas -v on csrc/kernels/bias_gelu.cu for sm_80 and sm_90: 0 spill bytes, no warnings."""
    assert_cuda_compiles_without_spills(OP, tmp_path)


# ============================================================ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("N,H", [(256, 1152), (1024, 1152), (7, 72), (16, 96), (1, 4096)])
def test_gpu_bias_gelu_matches(backend, dtype, N, H):
    gpu_skip_unless(OP, backend, dtype)
    x = rnd((2, N, H), dtype, N + H, scale=2.0, offset=0.5)
    b = rnd((H,), dtype, 3)
    assert_flash_rule(ops.bias_gelu(x, b, backend=backend), ref_bias_gelu(x.double(), b.double()),
                      ref_bias_gelu(x, b), dtype, f"bias_gelu {N} {H}")

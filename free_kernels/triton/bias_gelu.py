"""Triton kernel of ``bias_gelu``: ``out = gelu_tanh(x + bias)`` (the DiT MLP's fc1 epilogue).

x, out (B, N, K), bias (K,), any strides (64-bit row offsets), fp32 arithmetic
and one rounding on the store.  Grid (token rows, K / BLOCK); ``out`` may be
``x``.  GELU's ``0.5 * (1 + tanh(u))`` is evaluated as ``sigmoid(2u) =
1 / (1 + exp(-2u))`` (the same function, no cancellation near u = 0, exp
overflow gives the right limit 0), the form csrc/include/free_kernels/adaln_math.h
uses too.  Bytes: 2 * M*K*elem + K*elem.

The CUDA twin is csrc/kernels/bias_gelu.cu, the oracle free_kernels/reference/bias_gelu.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._env import triton_interpret
from ._common import ELEMENTWISE_BLOCK, check_dtype, grid_rows


@triton.jit
def _gelu_tanh(z):
    """0.5 z (1 + tanh(c (z + 0.044715 z^3))) == z / (1 + exp(-2 c (z + 0.044715 z^3))).

    The exponent is capped at 88 (exp(88) ~ 1.7e38, still finite in fp32): for
    z << 0 the result is then ~1e-37 instead of -0, and the CPU interpreter
    (numpy) raises no overflow warnings.
    """
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    return z / (1.0 + tl.exp(tl.minimum(-2.0 * u, 88.0)))


@triton.jit
def _bias_gelu_kernel(
    X, BIAS, OUT, N, K,
    s_xb, s_xn, s_xk, s_bk, s_ob, s_on, s_ok,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // N).to(tl.int64)
    n = (row % N).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(X + b * s_xb + n * s_xn + offs * s_xk, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(BIAS + offs * s_bk, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + b * s_ob + n * s_on + offs * s_ok, _gelu_tanh(x + bias).to(OUT.dtype.element_ty), mask=mask)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out = gelu_tanh(x + bias) for x (B, N, K) (any strides), bias (K,); out may be x."""
    check_dtype("bias_gelu", x)
    B, N, K = x.shape
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if B * N == 0 or K == 0:
        return out
    block = min(ELEMENTWISE_BLOCK, max(16, triton.next_power_of_2(K)))
    grid = (grid_rows(B * N), triton.cdiv(K, block))
    _bias_gelu_kernel[grid](
        x, bias, out, N, K, *x.stride(), bias.stride(0), *out.stride(),
        BLOCK=block, num_warps=1 if triton_interpret() else 4,
    )
    return out

"""Triton kernel of ``gated_residual``: ``out = x + gate[b] * y`` (the adaLN-Zero block's gated residual add).

x, y, out (B, N, H), gate (B, H), any strides (64-bit row offsets), one fma in
fp32 and one rounding on the store.  Grid (token rows, H / BLOCK).  ``out`` may
be ``x`` (each element is read before it is written by the same program).
Bytes: 3 * B*N*H*elem + B*H*elem.

The CUDA twin is csrc/kernels/gated_residual.cu, the oracle
free_kernels/reference/gated_residual.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._env import triton_interpret
from ._common import ELEMENTWISE_BLOCK, check_dtype, grid_rows


@triton.jit
def _gated_residual_kernel(
    X, GATE, Y, OUT, N, H,
    s_xb, s_xn, s_xh, s_gb, s_gh, s_yb, s_yn, s_yh, s_ob, s_on, s_oh,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // N).to(tl.int64)
    n = (row % N).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(X + b * s_xb + n * s_xn + offs * s_xh, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + b * s_gb + offs * s_gh, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + b * s_yb + n * s_yn + offs * s_yh, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + b * s_ob + n * s_on + offs * s_oh, (x + g * y).to(OUT.dtype.element_ty), mask=mask)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out = x + gate[:, None, :] * y; x, y, out (B, N, H), gate (B, H), any strides (out may be x)."""
    check_dtype("gated_residual", x)
    B, N, H = x.shape
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if B * N == 0 or H == 0:
        return out
    block = min(ELEMENTWISE_BLOCK, max(16, triton.next_power_of_2(H)))
    grid = (grid_rows(B * N), triton.cdiv(H, block))
    _gated_residual_kernel[grid](
        x, gate, y, out, N, H, *x.stride(), *gate.stride(), *y.stride(), *out.stride(),
        BLOCK=block, num_warps=1 if triton_interpret() else 4,
    )
    return out

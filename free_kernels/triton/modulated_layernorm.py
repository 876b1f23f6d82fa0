"""Triton kernel of ``modulated_layernorm``: ``out = LayerNorm(x) * (1 + scale[b]) + shift[b]``.

x, out (B, N, H), shift / scale (B, H), any strides (64-bit row offsets),
computing in fp32 and rounding once on the store.  ONE program per token row:
the whole row is held in registers (``BLOCK_H`` = next power of two >= H,
masked), so the statistics are the exact two-pass ones (mean, then the mean of
squared deviations, fp32) and x is read once.  ``y = (x - mean) * rstd * (1 +
scale) + shift`` with the row's (B, H) shift / scale.
Bytes: 2 * B*N*H*elem + 2 * B*H*elem.

Under ``TRITON_INTERPRET=1`` every load is converted to fp32 right away (the
interpreter cannot do bf16 arithmetic), which this kernel does anyway.

The CUDA twin is csrc/kernels/modulated_layernorm.cu, the oracle
free_kernels/reference/modulated_layernorm.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._env import triton_interpret
from ._common import check_dtype, grid_rows

MAX_H = 16384  # the row lives in registers


@triton.jit
def _modulated_layernorm_kernel(
    X, SHIFT, SCALE, OUT, N, H, eps,
    s_xb, s_xn, s_xh, s_sb, s_sh, s_cb, s_ch, s_ob, s_on, s_oh,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // N).to(tl.int64)
    n = (row % N).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(X + b * s_xb + n * s_xn + offs * s_xh, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / H
    d = tl.where(mask, x - mean, 0.0)
    var = tl.sum(d * d, axis=0) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    sh = tl.load(SHIFT + b * s_sb + offs * s_sh, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(SCALE + b * s_cb + offs * s_ch, mask=mask, other=0.0).to(tl.float32)
    y = (d * rstd) * (1.0 + sc) + sh
    tl.store(OUT + b * s_ob + n * s_on + offs * s_oh, y.to(OUT.dtype.element_ty), mask=mask)


def _ln_warps(block_h: int) -> int:
    return 1 if triton_interpret() else (4 if block_h <= 2048 else 8 if block_h <= 8192 else 16)


def modulated_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (B, N, H), shift / scale (B, H), any strides; ``out`` (B, N, H) written in place when given."""
    check_dtype("modulated_layernorm", x)
    B, N, H = x.shape
    if H > MAX_H:
        raise ValueError(f"triton modulated_layernorm holds a row in registers: H {H} > {MAX_H}")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if B * N == 0 or H == 0:
        return out
    block_h = max(16, triton.next_power_of_2(H))
    _modulated_layernorm_kernel[(grid_rows(B * N),)](
        x, shift, scale, out, N, H, float(eps),
        *x.stride(), *shift.stride(), *scale.stride(), *out.stride(),
        BLOCK_H=block_h, num_warps=_ln_warps(block_h),
    )
    return out

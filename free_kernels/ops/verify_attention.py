"""Dispatch point: batched multi-timestep verification attention.

``verify_attention(qkv, num_heads, *, out=None, backend=None)`` reads the packed
qkv projection (B, N, 3 * heads * head_dim) and returns (B, N, heads * head_dim),
ready for the output projection.  Rows of the batch are independent, so one call
verifies every (sample, draft) row at its own timestep.

FLOPs (for benchmarks): 4 * B * heads * N^2 * head_dim.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_tensor
from ._dispatch import Backend, dtype_reason, extension_reason, first_reason, get_op, triton_reason

OP = get_op("verify_attention")


def _load_torch():
    from ..reference.verify_attention import verify_attention as f

    return f


OP.register(Backend("torch", _load_torch))


def flops(B: int, N: int, heads: int, head_dim: int) -> int:
    return 4 * B * heads * N * N * head_dim


def _validate(qkv, num_heads, out):
    check_tensor("qkv", qkv, dim=3, floating=True)
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if qkv.shape[-1] % (3 * num_heads):
        raise ValueError(
            f"qkv last dim {qkv.shape[-1]} is not 3 * num_heads * head_dim for num_heads={num_heads}"
        )
    if out is not None:
        B, N, three_d = qkv.shape
        check_tensor("out", out, shape=(B, N, three_d // 3), dtype=qkv.dtype, device=qkv.device)


def verify_attention(qkv: torch.Tensor, num_heads: int, *, out: Optional[torch.Tensor] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    _validate(qkv, num_heads, out)
    ctx = dict(device=qkv.device, dtype=qkv.dtype, head_dim=qkv.shape[-1] // (3 * num_heads), N=qkv.shape[1])
    return OP.resolve(ctx, backend).impl()(qkv, num_heads, out=out)

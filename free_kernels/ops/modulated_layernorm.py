"""Dispatch point: LayerNorm (no affine) + adaLN modulate, shared by DiT blocks, drafter and head.

Part of the drafter-forward op family.  Bytes (for benchmarks): read x once,
write y once, plus the (B, H) shift/scale: 2 * B * N * H * elem + 2 * B * H * elem.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_tensor
from ._dispatch import Backend, get_op

OP = get_op("modulated_layernorm")


def _load_torch():
    from ..reference.modulated_layernorm import modulated_layernorm as f

    return f


OP.register(Backend("torch", _load_torch))


def modulated_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, eps: float = 1e-6,
                        out: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    check_tensor("x", x, dim=3, floating=True)
    B, _, H = x.shape
    check_tensor("shift", shift, shape=(B, H), device=x.device)
    check_tensor("scale", scale, shape=(B, H), device=x.device)
    ctx = dict(device=x.device, dtype=x.dtype, H=H)
    return OP.resolve(ctx, backend).impl()(x, shift, scale, eps=eps, out=out)

"""Reference adaLN modulate: LayerNorm (no affine) then x * (1 + scale) + shift."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def modulated_layernorm(x, shift, scale, eps: float = 1e-6, out=None):
    """x: (B, N, H); shift, scale: (B, H).  Same op order as the official DiT."""
    y = F.layer_norm(x, (x.shape[-1],), eps=eps)
    y = y * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    if out is not None:
        out.copy_(y)
        return out
    return y

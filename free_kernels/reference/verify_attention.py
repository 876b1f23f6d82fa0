"""Reference multi-head attention on a packed qkv projection."""
from __future__ import annotations

import torch


def verify_attention(qkv: torch.Tensor, num_heads: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal softmax attention.

    qkv: (B, N, 3 * heads * head_dim), laid out [q | k | v], heads split inside each.
    Returns (B, N, heads * head_dim).  Computation in the input dtype, fp32 softmax
    accumulation for half types (the math SDPA backend's rule), same layout as
    the official DiT attention.
    """
    B, N, three_d = qkv.shape
    d = three_d // 3
    hd = d // num_heads
    q, k, v = qkv.view(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    scale = hd ** -0.5
    if qkv.dtype in (torch.float16, torch.bfloat16):
        attn = (q.float() * scale) @ k.float().transpose(-2, -1)
        o = (attn.softmax(dim=-1) @ v.float()).to(qkv.dtype)
    else:
        attn = (q * scale) @ k.transpose(-2, -1)
        o = attn.softmax(dim=-1) @ v
    o = o.transpose(1, 2).reshape(B, N, d)
    if out is not None:
        out.copy_(o)
        return out
    return o

"""Reference gated residual add of the adaLN-Zero block: x + gate[:, None, :] * y."""
from __future__ import annotations

import torch


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, out=None) -> torch.Tensor:
    """x, y: (B, N, H); gate: (B, H).

    Exactly the expression the official DiT block evaluates (product rounded to
    the dtype, then the sum), so the DiT's torch path is unchanged by routing
    through this op.  ``out`` (may be ``x`` itself) receives the result.
    """
    r = x + gate.unsqueeze(1) * y
    if out is not None:
        out.copy_(r)
        return out
    return r

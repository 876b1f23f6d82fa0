"""Reference GELU (tanh approximation) epilogue of the DiT MLP's first linear layer."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, weight: Optional[torch.Tensor] = None,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """gelu_tanh(x + bias), or with ``weight`` given gelu_tanh(x @ weight.T + bias).

    The ``weight`` form is ``F.gelu(F.linear(x, weight, bias), approximate="tanh")``,
    bit for bit what ``Mlp`` computed before it used this op (nn.Linear is
    F.linear), so routing the DiT MLP through the op leaves the torch path
    unchanged.
    """
    if weight is not None:
        r = F.gelu(F.linear(x, weight, bias), approximate="tanh")
    else:
        r = F.gelu(x + bias, approximate="tanh")
    if out is not None:
        out.copy_(r)
        return out
    return r

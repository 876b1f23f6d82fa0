"""Dispatch point of ``drafter_forward``: one drafter evaluation (the drafter protocol call).

* ``drafter_forward(drafter, h_prev, x, t, y)``: the torch backend calls the
  drafter module (whose DiT blocks reach the fused ``modulated_layernorm`` /
  ``gated_residual`` / ``bias_gelu`` kernels through their own dispatch points).
* ``drafter_extras(drafter, t_next, c)``: the optional inputs a drafter declares.

The draft step's other op, ``draft_transition`` (the epilogue from drafted
features to the next state), has its own module, ``ops/draft_transition.py``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import Backend, get_op

OP_FWD = get_op("drafter_forward")


def _load_torch_fwd():
    def f(drafter, h_prev, x, t, y, **extra):
        return drafter(h_prev, x, t, y, **extra)

    return f


def drafter_extras(drafter, t_next=None, c=None) -> dict:
    """The optional inputs a drafter declares it takes (drafter protocol, ``free_kernels.models.drafter``).

    ``accepts_t_next``: the original timestep of the state being drafted (the
    drafter conditions on the step it drafts); ``accepts_condition``: the
    target's conditioning ``c = embed_condition(t, y)`` of the parent, computed
    once per draft step by the caller instead of again inside the drafter.
    """
    extra = {}
    if t_next is not None and getattr(drafter, "accepts_t_next", False):
        extra["t_next"] = t_next
    if c is not None and getattr(drafter, "accepts_condition", False):
        extra["c"] = c
    return extra


OP_FWD.register(Backend("torch", _load_torch_fwd))


def drafter_forward(drafter, h_prev: torch.Tensor, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                    t_next: Optional[torch.Tensor] = None, c: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """h = drafter(h_prev, x, t, y); ``t_next`` / ``c`` are passed only to drafters that declare them."""
    ctx = dict(device=x.device, dtype=x.dtype, drafter=type(drafter).__name__)
    h = OP_FWD.resolve(ctx, backend).impl()(drafter, h_prev, x, t, y, **drafter_extras(drafter, t_next, c))
    if not torch.is_tensor(h) or h.shape != h_prev.shape:
        raise ValueError(
            f"drafter returned {tuple(h.shape) if torch.is_tensor(h) else type(h).__name__}, expected features "
            f"of shape {tuple(h_prev.shape)} (drafter protocol: h = drafter(h_prev, x, t, y))"
        )
    return h

"""Dispatch points of the drafter-forward op family.

* ``drafter_forward(drafter, h_prev, x, t, y)``: one drafter evaluation (the
  protocol call).  The torch backend calls the drafter module; fused backends
  (issue: fused drafter forward) take a :class:`FeatureDrafter`'s weights.
* ``draft_transition(target, diffusion, h, x, index, y_rows, ...)``: the draft-step
  epilogue, from drafted features to the next drafted state: target head,
  guidance, DDPM mean / log-variance, x = mean + sigma * noise.  Returns
  (x_next, mean, logvar) - what the acceptance step needs.
* ``modulated_layernorm`` (own module) is the third member, shared with the DiT blocks.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import Backend, get_op

OP_FWD = get_op("drafter_forward")
OP_EPI = get_op("draft_transition")


def _load_torch_fwd():
    def f(drafter, h_prev, x, t, y):
        return drafter(h_prev, x, t, y)

    return f


def _load_torch_epi():
    from ..reference.draft_transition import draft_transition as f

    return f


OP_FWD.register(Backend("torch", _load_torch_fwd))
OP_EPI.register(Backend("torch", _load_torch_epi))


def drafter_forward(drafter, h_prev: torch.Tensor, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                    backend: Optional[str] = None) -> torch.Tensor:
    ctx = dict(device=x.device, dtype=x.dtype, drafter=type(drafter).__name__)
    h = OP_FWD.resolve(ctx, backend).impl()(drafter, h_prev, x, t, y)
    if not torch.is_tensor(h) or h.shape != h_prev.shape:
        raise ValueError(
            f"drafter returned {tuple(h.shape) if torch.is_tensor(h) else type(h).__name__}, expected features "
            f"of shape {tuple(h_prev.shape)} (drafter protocol: h = drafter(h_prev, x, t, y))"
        )
    return h


def draft_transition(target, diffusion, h, c, x, index, noise, *, cfg_scale: float = 1.0,
                     guidance_channels: int = 3, clip_denoised: bool = False,
                     backend: Optional[str] = None):
    ctx = dict(device=x.device, dtype=x.dtype)
    return OP_EPI.resolve(ctx, backend).impl()(target, diffusion, h, c, x, index, noise, cfg_scale=cfg_scale,
                                               guidance_channels=guidance_channels, clip_denoised=clip_denoised)

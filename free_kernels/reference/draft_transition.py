"""Reference draft-step epilogue: drafted features -> next drafted state."""
from __future__ import annotations

from typing import Optional

import torch

from .guidance import guide_output
from .verify_transition import verify_transition


def guided_transition(diffusion, out, x, index, *, cfg: bool, cfg_scale: float, guidance_channels: int,
                      in_channels: int, clip_denoised: bool):
    """Model output (2R rows [cond; uncond] under CFG, else R) -> guided transition of the R states ``x``.

    The same rule the baseline sampler applies through ``forward_with_cfg``.
    """
    if cfg:
        out = guide_output(out, cfg_scale, guidance_channels, in_channels)[: x.shape[0]]
    return diffusion.transition_from_output(out, x, index, clip_denoised=clip_denoised)


def draft_transition(target, diffusion, h, c, x, index, noise, *, cfg_scale=1.0, guidance_channels=3,
                     clip_denoised=False, tables: Optional[torch.Tensor] = None):
    """h, c: (G*R, N, H), (G*R, H) drafted features and conditioning (G = 2 under CFG).

    Returns (x_next, mean, log_variance), each (R, C, S, S): the target's transition from x given the
    drafted features (the verification's rule, :func:`~.verify_transition.verify_transition`, on
    drafted instead of verified features), then x_next = mean + exp(log_variance / 2) * noise.
    ``tables``: ``diffusion.schedule_tables()`` on x's device (built when None).
    """
    mean, logvar = verify_transition(target, diffusion, h, c, x, index, cfg_scale=cfg_scale,
                                     guidance_channels=guidance_channels, clip_denoised=clip_denoised,
                                     tables=tables)
    x_next = mean + torch.exp(0.5 * logvar) * noise
    return x_next, mean, logvar

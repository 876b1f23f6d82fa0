"""Reference draft-step epilogue: drafted features -> next drafted state."""
from __future__ import annotations

import torch

from .guidance import guide_output


def guided_transition(diffusion, out, x, index, *, cfg: bool, cfg_scale: float, guidance_channels: int,
                      in_channels: int, clip_denoised: bool):
    """Model output (2R rows [cond; uncond] under CFG, else R) -> guided transition of the R states ``x``.

    The same rule the baseline sampler applies through ``forward_with_cfg``.
    """
    if cfg:
        out = guide_output(out, cfg_scale, guidance_channels, in_channels)[: x.shape[0]]
    return diffusion.transition_from_output(out, x, index, clip_denoised=clip_denoised)


def draft_transition(target, diffusion, h, c, x, index, noise, *, cfg_scale=1.0, guidance_channels=3,
                     clip_denoised=False):
    """h, c: (G*R, N, H), (G*R, H) drafted features and conditioning (G = 2 under CFG).

    Returns (x_next, mean, log_variance), each (R, C, S, S).
    """
    out = target.forward_head(h, c).float()  # transitions in fp32 whatever the model dtype
    cfg = h.shape[0] == 2 * x.shape[0]
    tr = guided_transition(diffusion, out, x, index, cfg=cfg, cfg_scale=cfg_scale,
                           guidance_channels=guidance_channels, in_channels=x.shape[1],
                           clip_denoised=clip_denoised)
    mean, logvar = tr["mean"], tr["log_variance"]
    x_next = mean + torch.exp(0.5 * logvar) * noise
    return x_next, mean, logvar

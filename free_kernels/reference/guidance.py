"""Classifier-free guidance of a doubled-batch DiT output: the one rule every sampler applies.

The oracle of the rule, in the reference layer (it needs only torch): the reference compositions
(``draft_transition``, ``draft_epilogue``, ``verify_transition``) apply it here, and the diffusion
and model layers re-export it under their public names (``free_kernels.diffusion.guidance``,
``free_kernels.models.dit``).  The fused ``draft_epilogue`` kernels implement the same rule.
"""
from __future__ import annotations

import torch


def guided_channels(guidance_channels: int, in_channels: int) -> int:
    """How many noise channels the rule guides: ``guidance_channels`` (3 official, 4 diffusers, or any
    1..in_channels), capped at the model's ``in_channels``; anything else raises."""
    if guidance_channels not in (3, 4) and not (1 <= guidance_channels <= in_channels):
        raise ValueError(f"guidance_channels must be 3 (official) or 4 (diffusers), got {guidance_channels}")
    return min(guidance_channels, in_channels)


def guide_output(out: torch.Tensor, cfg_scale: float, guidance_channels: int, in_channels: int) -> torch.Tensor:
    """Apply classifier-free guidance to a doubled-batch model output.

    ``out`` is (2B, C_out, S, S): rows [cond; uncond].  Returns the same shape
    with channels ``[:guidance_channels]`` replaced by uncond + s * (cond - uncond)
    in both halves (the official layout).  For models with fewer than
    ``guidance_channels`` noise channels (e.g. single-channel pixel models)
    both rules guide every noise channel and never the variance channels.
    """
    guidance_channels = guided_channels(guidance_channels, in_channels)
    eps, rest = out[:, :guidance_channels], out[:, guidance_channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)

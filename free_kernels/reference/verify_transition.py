"""Reference verification transition: the target's own transition of the states it verified.

``target.forward_head`` -> float32 -> guidance (under CFG) -> the DDPM mean and
log-variance at each row's respaced index: what the baseline sampler computes
with ``diffusion.transition_from_output`` on the guided output of
``forward_with_cfg``, bit for bit on the CPU in float32 (tests/test_verify_transition.py).

The transition reads the schedule from ``diffusion.schedule_tables()`` (the
float32 rounding ``transition_from_output`` applies) rather than from the
diffusion's float64 arrays, so that with the tables already on the device
nothing is copied from the host (CUDA-graph capture, torch.compile).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .draft_epilogue import transition
from .guidance import guide_output


def verify_transition(target, diffusion, h, c, x, index, *, cfg_scale: float = 1.0, guidance_channels: int = 3,
                      clip_denoised: bool = False, tables: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, log_variance), each (R, C, S, S) float32, of the target's transition from the states ``x``.

    h, c: (G*R, N, H), (G*R, H) the target's top-block features and conditioning of the rows
    (G = 2 under CFG: rows [cond; uncond]); x (R, C, S, S); index (R,) respaced indices.
    ``tables``: ``diffusion.schedule_tables()`` on x's device (built here when None).
    """
    R, C = x.shape[:2]
    out = target.forward_head(h, c).float()  # transitions in fp32 whatever the model dtype
    if R and h.shape[0] == 2 * R:
        out = guide_output(out, cfg_scale, guidance_channels, C)[:R]
    if tables is None:
        tables = diffusion.schedule_tables().to(x.device)
    return transition(out, x, tables, index, learned_variance=diffusion.learned_variance,
                      predict_xstart=diffusion.predicts_xstart, clip_denoised=clip_denoised)

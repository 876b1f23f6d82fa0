"""Classifier-free guidance of a doubled-batch DiT output (public name), and when it is on.

The rule itself lives with the oracles, in :mod:`free_kernels.reference.guidance`, so that the
reference compositions below this layer can apply it; this module keeps its public path
``free_kernels.diffusion.guidance.guide_output``.
"""
from __future__ import annotations

from ..reference.guidance import guide_output  # noqa: F401  (public here)

__all__ = ["guide_output", "uses_cfg"]


def uses_cfg(cfg_scale: float) -> bool:
    """Classifier-free guidance is on: ``cfg_scale > 1`` (the official ``sample_ddp.py`` rule)."""
    return float(cfg_scale) > 1.0

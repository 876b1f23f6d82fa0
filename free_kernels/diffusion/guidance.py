"""Classifier-free guidance of a doubled-batch DiT output (public name).

The rule itself lives with the oracles, in :mod:`free_kernels.reference.guidance`, so that the
reference compositions below this layer can apply it; this module keeps its public path
``free_kernels.diffusion.guidance.guide_output``.
"""
from __future__ import annotations

from ..reference.guidance import guide_output  # noqa: F401  (public here)

__all__ = ["guide_output"]

"""free_kernels: lossless speculative sampling (FREE) for Diffusion Transformers, with fused kernels."""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops  # noqa: F401
from .diffusion import create_diffusion  # noqa: F401
from .models import DiT, DiT_models, find_model  # noqa: F401
from .models import FeatureDrafter, FrozenFeatureDrafter  # noqa: F401
from .relax import RelaxPolicy  # noqa: F401
from .sampler import FreeSampler, FreeStats  # noqa: F401

"""Short public name of the diffusers integration::

    from free_kernels.pipeline import FreeDiTPipeline

The code lives in :mod:`free_kernels.integrations.diffusers`; importing this name gives that
module itself (one module object under two names).
"""
import sys

from .integrations import diffusers as _diffusers

sys.modules[__name__] = _diffusers

"""Short public name of the drop-in for the official DiT scripts::

    from free_kernels.dit import create_diffusion, find_model, DiT_models

The code lives in :mod:`free_kernels.integrations.official`; importing this name gives that
module itself (one module object under two names, so attributes and patches are shared).
"""
import sys

from .integrations import official as _official

sys.modules[__name__] = _official

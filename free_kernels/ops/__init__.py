"""Public ops, one dispatch point each (see ``_dispatch``).

Each op but the module-level compositions ``drafter_forward`` / ``draft_transition`` /
``verify_transition`` (they take a drafter, a target or a diffusion, which an operator schema cannot
carry) is also a ``torch.library`` operator, ``torch.ops.free_kernels.<op>`` and ``<op>_out`` (see
``_library``).
"""
from ._dispatch import (  # noqa: F401
    OPS, BackendEnvironmentWarning, BackendUnavailable, check_environment, environment_problems, get_op,
)
from .drafter_forward import drafter_forward  # noqa: F401
from .draft_transition import draft_transition, schedule_tables_on  # noqa: F401
from .verify_transition import verify_transition  # noqa: F401
from .modulated_layernorm import modulated_layernorm  # noqa: F401
from .verify_attention import verify_attention  # noqa: F401
from .speculative_accept import speculative_accept  # noqa: F401
from .gated_residual import gated_residual  # noqa: F401
from .bias_gelu import bias_gelu  # noqa: F401
from .draft_epilogue import draft_epilogue  # noqa: F401

"""The target protocol: what the FREE sampler, a drafter and the ops need of a target DiT.

Our :class:`~free_kernels.models.DiT`, :class:`~free_kernels.models.DiffusersDiTTarget`
(diffusers' ``DiTTransformer2DModel``) and :class:`~free_kernels.models.OfficialDiTTarget`
(a module with the official repository's attribute layout) provide it:

* attributes ``hidden_size``, ``patch_size``, ``in_channels``, ``out_channels``,
  ``input_size``, ``num_classes``, ``num_heads``, ``learn_sigma``;
* ``forward_features(x, t, y) -> (h, c)``: top-block features (B, N, H) and the
  adaLN conditioning (B, H); ``forward_head(h, c) -> out`` (B, C_out, S, S);
* ``embed_tokens(x) -> (B, N, H)`` (patch + position embedding) and
  ``embed_condition(t, y) -> (B, H)`` (the conditioning vector).

Optional (:class:`FusableHead`), what the fused draft-step epilogue needs to run
the head itself instead of calling ``forward_head``:

* ``head_parameters(c) -> HeadParameters(shift, scale, weight, bias, eps)``: the
  head as ``linear(LayerNorm_eps(h) * (1 + scale) + shift)`` for conditioning c
  (the adaLN GEMM of c runs here, in torch; ``weight`` (p*p*C_out, H), ``bias``);
* ``head_fusion_problem() -> Optional[str]``: why the fused epilogue cannot
  implement this target's head (e.g. an affine LayerNorm), None when it can.

A target without them works everywhere; its heads take the torch path (the ops
say so when a fused backend is requested).

Nothing here imports a model: the layers below (ops, reference) receive targets
as arguments and use only what this protocol names.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, Tuple, runtime_checkable

import torch
import torch.nn as nn

TARGET_METHODS = ("forward_features", "forward_head", "embed_tokens", "embed_condition")
# optional: a target with both lets the fused draft-step epilogue run its head (FusableHead)
HEAD_METHODS = ("head_parameters", "head_fusion_problem")
TARGET_ATTRS = ("in_channels", "num_classes", "input_size", "hidden_size", "patch_size", "num_heads")
# the attributes a drafter must agree with (saved with it as its signature)
MATCH_KEYS = ("hidden_size", "patch_size", "in_channels", "input_size", "num_classes")


@runtime_checkable
class Target(Protocol):
    """Static description of the protocol (``isinstance`` checks the methods only; use
    :func:`follows_target_protocol` for the full check)."""

    hidden_size: int
    patch_size: int
    in_channels: int
    out_channels: int
    input_size: int
    num_classes: int
    num_heads: int
    learn_sigma: bool

    def forward_features(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
                         ) -> Tuple[torch.Tensor, torch.Tensor]: ...

    def forward_head(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor: ...

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor: ...

    def embed_condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class HeadParameters(NamedTuple):
    """The target's head for conditioning c: ``out = linear(LayerNorm_eps(h) * (1 + scale) + shift)``
    (a LayerNorm without affine parameters), then unpatchify."""

    shift: torch.Tensor   # (B, H)
    scale: torch.Tensor   # (B, H)
    weight: torch.Tensor  # (p * p * C_out, H)
    bias: torch.Tensor    # (p * p * C_out,)
    eps: float


@runtime_checkable
class FusableHead(Protocol):
    """The optional part of the target protocol: a head the fused epilogue can run."""

    def head_parameters(self, c: torch.Tensor) -> HeadParameters: ...

    def head_fusion_problem(self) -> Optional[str]: ...


def adaln_head_problem(norm, linear) -> Optional[str]:
    """Why ``linear(norm(h) * (1 + scale) + shift)`` is not a head the fused epilogue implements, or None.

    Shared by the targets' ``head_fusion_problem``: the epilogue implements a LayerNorm without
    affine parameters followed by a linear layer with a bias.
    """
    if not hasattr(norm, "eps"):
        return f"the head's norm ({type(norm).__name__}) is not a LayerNorm"
    if getattr(norm, "weight", None) is not None or getattr(norm, "bias", None) is not None:
        return "the head's LayerNorm has an affine weight (the fused epilogue implements the no-affine adaLN head)"
    if not isinstance(linear, nn.Linear) or linear.bias is None:
        return "the head's output layer is not a Linear with a bias"
    return None


def follows_target_protocol(m) -> bool:
    """True when ``m`` has every method and attribute of the target protocol."""
    return all(callable(getattr(m, k, None)) for k in TARGET_METHODS) and all(hasattr(m, k) for k in TARGET_ATTRS)


def target_signature(target) -> dict:
    """The target attributes a drafter must agree with."""
    missing = [k for k in MATCH_KEYS + ("num_heads",) if not hasattr(target, k)]
    if missing:
        raise TypeError(
            f"target {type(target).__name__} does not follow the target protocol: missing attributes {missing} "
            f"(see free_kernels.models.protocol)"
        )
    return {k: int(getattr(target, k)) for k in MATCH_KEYS}

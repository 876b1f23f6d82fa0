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

Nothing here imports a model: the layers below (ops, reference) receive targets
as arguments and use only what this protocol names.
"""
from __future__ import annotations

from typing import Protocol, Tuple, runtime_checkable

import torch
import torch.nn as nn

TARGET_METHODS = ("forward_features", "forward_head", "embed_tokens", "embed_condition")
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


def as_target(model):
    """``model`` if it follows the target protocol, else a module with the official DiT attribute layout
    wrapped as :class:`~free_kernels.models.OfficialDiTTarget` (no copy).  Anything else is returned
    unchanged (and fails the protocol check where it is used)."""
    if all(hasattr(model, k) for k in MATCH_KEYS + ("num_heads",)) and callable(
            getattr(model, "forward_features", None)):
        return model
    if isinstance(model, nn.Module):
        from .official_adapter import OfficialDiTTarget, official_layout_problems

        if not official_layout_problems(model):
            return OfficialDiTTarget(model)
    return model

"""A module with the official DiT attribute layout (e.g. the official repository's own ``DiT``)
as a FREE target: :class:`OfficialDiTTarget` wraps it, no copy, in the target protocol
(:mod:`free_kernels.models.protocol`).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..diffusion.guidance import guide_output
from .dit import _cfg_double
from .protocol import MATCH_KEYS, HeadParameters, adaln_head_problem

__all__ = ["OfficialDiTTarget", "as_target", "official_layout_problems"]


def official_layout_problems(m) -> list:
    """What an official-layout DiT module lacks (empty list: it has the layout)."""
    problems = []
    for name in ("x_embedder", "t_embedder", "y_embedder", "pos_embed", "blocks", "final_layer"):
        if not hasattr(m, name):
            problems.append(name)
    if problems:
        return problems
    if not hasattr(m.x_embedder, "proj"):
        problems.append("x_embedder.proj")
    if not torch.is_tensor(m.pos_embed) or m.pos_embed.dim() != 3:
        problems.append("pos_embed (a (1, N, H) tensor)")
    try:
        blocks = list(m.blocks)
    except TypeError:
        blocks = []
    if not blocks:
        problems.append("blocks (a non-empty list of DiT blocks)")
    for attr in ("adaLN_modulation", "attn", "mlp"):
        if blocks and not all(hasattr(b, attr) for b in blocks):
            problems.append(f"blocks[i].{attr}")
    for attr in ("adaLN_modulation", "linear"):
        if not hasattr(m.final_layer, attr):
            problems.append(f"final_layer.{attr}")
    if not (hasattr(m.y_embedder, "embedding_table") or hasattr(m.y_embedder, "num_classes")):
        problems.append("y_embedder.embedding_table")
    return problems


def _first(*vals):
    for v in vals:
        if v is not None:
            return v
    return None


def _as_int(v):
    if isinstance(v, (tuple, list)):
        v = v[0]
    return None if v is None else int(v)


class OfficialDiTTarget(nn.Module):
    """A module with the official DiT attribute layout, in the FREE target protocol.

    The module is kept as ``self.model`` (a submodule: no copy).  The methods
    call its own submodules in the order of the official ``DiT.forward``::

        h = x_embedder(x) + pos_embed
        c = t_embedder(t) + y_embedder(y, training)
        for block in blocks: h = block(h, c)           # forward_features -> (h, c)
        out = unpatchify(final_layer(h, c))            # forward_head

    so ``forward`` returns what the module's ``forward`` returns (bit-identical
    for the official DiT; ``tests/test_dropin.py`` checks it on an
    official-layout module).  Shape attributes are read from the module, or
    inferred from its tensors when the module does not carry them.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        problems = official_layout_problems(model)
        if problems:
            raise TypeError(
                f"{type(model).__name__} does not have the official DiT layout: missing {problems}"
            )
        self.model = model
        self.train(model.training)
        proj = model.x_embedder.proj
        pe = model.pos_embed
        self.hidden_size = int(pe.shape[-1])
        n_tok = int(pe.shape[1])
        grid = int(round(math.sqrt(n_tok)))
        if grid * grid != n_tok:
            raise ValueError(f"pos_embed has {n_tok} tokens, not a square grid")
        self.patch_size = _as_int(_first(getattr(model, "patch_size", None),
                                         getattr(proj, "kernel_size", None)))
        self.in_channels = _as_int(_first(getattr(model, "in_channels", None), getattr(proj, "in_channels", None)))
        lin = model.final_layer.linear
        p2 = self.patch_size * self.patch_size
        self.out_channels = _as_int(_first(getattr(model, "out_channels", None), lin.out_features // p2))
        self.learn_sigma = bool(getattr(model, "learn_sigma", self.out_channels == 2 * self.in_channels))
        self.input_size = grid * self.patch_size
        ye = model.y_embedder
        self.num_classes = _as_int(_first(getattr(ye, "num_classes", None),
                                          ye.embedding_table.num_embeddings - 1 if hasattr(ye, "embedding_table") else None))
        self.num_heads = _as_int(_first(getattr(model, "num_heads", None),
                                        getattr(model.blocks[0].attn, "num_heads", None)))
        if self.num_heads is None:
            raise TypeError(f"{type(model).__name__}: cannot tell the head count (no num_heads attribute)")
        self.depth = len(model.blocks)

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.x_embedder(x) + self.model.pos_embed

    def embed_condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.t_embedder(t) + m.y_embedder(y, m.training)

    def forward_features(self, x, t, y) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.embed_tokens(x)
        c = self.embed_condition(t, y)
        for block in self.model.blocks:
            h = block(h, c)
        return h, c

    def unpatchify(self, out: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "unpatchify"):
            return self.model.unpatchify(out)
        p, C = self.patch_size, self.out_channels
        side = int(round(out.shape[1] ** 0.5))
        out = out.reshape(out.shape[0], side, side, p, p, C)
        out = torch.einsum("nhwpqc->nchpwq", out)
        return out.reshape(out.shape[0], C, side * p, side * p)

    def forward_head(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.unpatchify(self.model.final_layer(h, c))

    def head_parameters(self, c: torch.Tensor) -> HeadParameters:
        """The official final layer for conditioning c (B, H): ``adaLN_modulation(c)`` split into
        shift / scale (computed here), ``linear``'s weight and bias, ``norm_final``'s eps."""
        fl = self.model.final_layer
        shift, scale = fl.adaLN_modulation(c).chunk(2, dim=1)
        return HeadParameters(shift, scale, fl.linear.weight, fl.linear.bias, float(fl.norm_final.eps))

    def head_fusion_problem(self) -> Optional[str]:
        """Why the fused epilogue cannot run the module's final layer, or None.

        The official ``FinalLayer`` computes ``linear(modulate(norm_final(h), shift, scale))`` with
        ``shift, scale = adaLN_modulation(c).chunk(2)``; a final layer with that layout is taken to
        compute that.
        """
        fl = self.model.final_layer
        if not hasattr(fl, "norm_final"):
            return f"{type(self.model).__name__}.final_layer has no norm_final (the official FinalLayer's LayerNorm)"
        return adaln_head_problem(fl.norm_final, fl.linear)

    def forward(self, x, t, y):
        return self.forward_head(*self.forward_features(x, t, y))

    def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels: int = 3):
        out = self.forward(*_cfg_double(x), t, y)
        return guide_output(out, cfg_scale, guidance_channels, self.in_channels)


def as_target(model):
    """``model`` if it follows the target protocol, else a module with the official DiT attribute layout
    wrapped as :class:`OfficialDiTTarget` (no copy).  Anything else is returned unchanged (and fails the
    protocol check where it is used).  (Here rather than in :mod:`.protocol`, which imports no model.)"""
    if all(hasattr(model, k) for k in MATCH_KEYS + ("num_heads",)) and callable(
            getattr(model, "forward_features", None)):
        return model
    if isinstance(model, nn.Module) and not official_layout_problems(model):
        return OfficialDiTTarget(model)
    return model

"""diffusers' ``DiTTransformer2DModel`` as a FREE target.

:class:`DiffusersDiTTarget` wraps a ``DiTTransformer2DModel`` *as is* and
exposes the target protocol of :class:`free_kernels.models.dit.DiT`
(``forward_features`` / ``forward_head`` / ``embed_tokens`` /
``embed_condition`` / ``forward_with_cfg`` and the shape attributes).  It runs
diffusers' own modules in diffusers' own order, so ``forward`` is
**bit-identical** to ``model(x, timestep=t, class_labels=y).sample``
(``torch.equal`` in the tests, fp32 on CPU; measured max |diff| = 0 also in bf16,
with shared or per-block embedders).

Converting the weights into this package's :class:`~free_kernels.models.dit.DiT`
instead (and back) is :mod:`free_kernels.models.diffusers_convert`; a converted
model computes the official DiT's function, which differs from diffusers' (see
there).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_finite
from .dit import _cfg_double, guide_output
from .protocol import HeadParameters, adaln_head_problem

__all__ = ["DiffusersDiTTarget"]


def _is_diffusers_dit(obj) -> bool:
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, DiTTransformer2DModel)


def _check_supported_config(cfg: Mapping[str, Any]) -> None:
    """Reject diffusers DiT configs whose block is not the DiT block."""
    problems = []
    if cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        problems.append(f"norm_type={cfg.get('norm_type')!r} (need 'ada_norm_zero')")
    if cfg.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        problems.append(f"activation_fn={cfg.get('activation_fn')!r} (need 'gelu-approximate')")
    if not cfg.get("attention_bias", True):
        problems.append("attention_bias=False (the DiT attention has biases)")
    if cfg.get("norm_elementwise_affine", False):
        problems.append("norm_elementwise_affine=True (DiT LayerNorms have no affine parameters)")
    if problems:
        raise ValueError("unsupported DiTTransformer2DModel config: " + "; ".join(problems))


# =====================================================================================
# Adapter
# =====================================================================================
class DiffusersDiTTarget(nn.Module):
    """Wrap a diffusers ``DiTTransformer2DModel`` in the FREE target protocol.

    The wrapped model is kept as ``self.model`` (a submodule: ``.to()``,
    ``.eval()``, ``.half()`` and ``state_dict()`` go through to it, under the
    prefix ``model.``).  Nothing is copied or re-implemented: every method calls
    diffusers' own submodules in the order ``DiTTransformer2DModel.forward``
    does, so results are bit-identical to diffusers.

    Conditioning, and what ``c`` is
        diffusers gives every block its own ``norm1.emb``
        (``CombinedTimestepLabelEmbeddings``: timestep sinusoid -> MLP, plus the
        label table), and its final layer uses **block 0's** embedding.  In
        converted hub checkpoints all blocks hold the same embedder weights; a
        freshly constructed (or independently trained) model may not.

        * ``forward_features`` always lets each block compute its own
          embedding, exactly as diffusers does, whatever the weights.
        * ``c`` (returned by ``forward_features`` and ``embed_condition``) is
          block 0's embedding, shape (B, H).  That is exactly what the head
          needs, and it is the (B, H) vector a FREE drafter block should
          condition its adaLN on.  When all blocks share their embedder weights
          (:meth:`shares_condition_embedding`), it is also exactly what every
          block's adaLN sees.  When they do not, :meth:`block_conditions`
          returns all of them (depth, B, H).

    Output layout
        ``forward`` returns the ``sample`` tensor (B, out_channels, S, S):
        channels ``[:in_channels]`` are the noise prediction, and with a learned
        variance (``out_channels == 2 * in_channels``) the remaining channels are
        the variance interpolation value, as in the official DiT.

    Label dropout
        In ``train()`` mode diffusers' label embedder drops labels at random
        (independently in each block's embedder); use ``eval()`` for sampling,
        which is what the bit-identity statement refers to.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if isinstance(model, DiffusersDiTTarget):
            model = model.model
        if not _is_diffusers_dit(model):
            raise TypeError(
                f"DiffusersDiTTarget wraps a diffusers DiTTransformer2DModel, got {type(model).__name__}"
            )
        cfg = model.config
        _check_supported_config(cfg)
        self.model = model
        self.in_channels = int(cfg.in_channels)
        self.out_channels = int(model.out_channels)
        if self.out_channels == 2 * self.in_channels:
            self.learn_sigma = True
        elif self.out_channels == self.in_channels:
            self.learn_sigma = False
        else:
            raise ValueError(
                f"out_channels must be in_channels ({self.in_channels}) or 2 * in_channels (learned sigma), "
                f"got {self.out_channels}"
            )
        self.patch_size = int(cfg.patch_size)
        self.num_heads = int(cfg.num_attention_heads)
        self.hidden_size = int(model.inner_dim)
        self.input_size = int(cfg.sample_size)
        self.num_classes = int(cfg.num_embeds_ada_norm)
        self.depth = len(model.transformer_blocks)

    # ---------------------------------------------------------------- helpers
    @property
    def config(self):
        """The wrapped model's diffusers config."""
        return self.model.config

    def _emb(self, i: int) -> nn.Module:
        return self.model.transformer_blocks[i].norm1.emb

    def shares_condition_embedding(self) -> bool:
        """True when every block's ``norm1.emb`` has exactly block 0's weights.

        (Compares tensors: a device sync on GPU.  Call it once, not per step.)
        """
        ref = dict(self._emb(0).named_parameters())
        for i in range(1, self.depth):
            for name, p in self._emb(i).named_parameters():
                if p.shape != ref[name].shape or not torch.equal(p, ref[name]):
                    return False
        return True

    def _check_inputs(self, x, t, y) -> None:
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        S = self.input_size
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] != S or x.shape[3] != S:
            raise ValueError(f"x must have shape (B, {self.in_channels}, {S}, {S}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        B = x.shape[0]
        if not torch.is_tensor(t) or t.dim() != 1 or t.shape[0] != B:
            raise ValueError(f"t must be a 1-D tensor of {B} timesteps, got {getattr(t, 'shape', t)}")
        if t.dtype == torch.bool:
            raise TypeError("t must hold numeric timesteps, got dtype torch.bool")
        if not torch.is_tensor(y) or y.dim() != 1 or y.shape[0] != B:
            raise ValueError(f"y must be a 1-D tensor of {B} labels, got {getattr(y, 'shape', y)}")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise TypeError(f"y must be an integer tensor of class labels, got dtype {y.dtype}")
        dev = self.model.pos_embed.proj.weight.device
        if x.device != dev or t.device != dev or y.device != dev:
            raise ValueError(
                f"x, t, y must be on the model's device {dev}; got x on {x.device}, t on {t.device}, y on {y.device}"
            )
        check_finite("x", x)

    def _check_condition_args(self, t, y) -> None:
        if not torch.is_tensor(t) or t.dim() != 1:
            raise ValueError(f"t must be a 1-D tensor of timesteps, got {getattr(t, 'shape', t)}")
        if not torch.is_tensor(y) or y.dim() != 1 or y.shape[0] != t.shape[0]:
            raise ValueError(f"y must be a 1-D tensor of {t.shape[0]} labels, got {getattr(y, 'shape', y)}")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise TypeError(f"y must be an integer tensor of class labels, got dtype {y.dtype}")

    def _hidden_dtype(self) -> torch.dtype:
        # diffusers passes hidden_states.dtype, i.e. the patch embedding's output dtype
        return self.model.pos_embed.proj.weight.dtype

    # -------------------------------------------------------------- protocol
    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + fixed 2-D sin-cos position embedding: (B, C, S, S) -> (B, N, H)."""
        return self.model.pos_embed(x)

    def embed_condition(self, t: torch.Tensor, y: torch.Tensor, hidden_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Block 0's conditioning embedding (B, H): what the head (and, with shared
        embedders, every block) feeds to its adaLN modulation."""
        self._check_condition_args(t, y)
        return self._emb(0)(t, y, hidden_dtype=hidden_dtype or self._hidden_dtype())

    def block_conditions(self, t: torch.Tensor, y: torch.Tensor, hidden_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Every block's own conditioning embedding, stacked: (depth, B, H)."""
        self._check_condition_args(t, y)
        dt = hidden_dtype or self._hidden_dtype()
        return torch.stack([self._emb(i)(t, y, hidden_dtype=dt) for i in range(self.depth)], dim=0)

    def forward_features(self, x, t, y) -> Tuple[torch.Tensor, torch.Tensor]:
        """Patch embedding and all blocks: (h (B, N, H), c (B, H) = block 0's embedding)."""
        self._check_inputs(x, t, y)
        h = self.model.pos_embed(x)
        for block in self.model.transformer_blocks:
            h = block(
                h,
                attention_mask=None,
                encoder_hidden_states=None,
                encoder_attention_mask=None,
                timestep=t,
                cross_attention_kwargs=None,
                class_labels=y,
            )
        c = self._emb(0)(t, y, hidden_dtype=h.dtype)
        return h, c

    def unpatchify(self, out: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C_out) -> (B, C_out, S, S), diffusers' (= the official) token layout."""
        p, C = self.patch_size, self.out_channels
        side = int(round(out.shape[1] ** 0.5))
        if side * side != out.shape[1]:
            raise ValueError(f"token count {out.shape[1]} is not a square")
        out = out.reshape(-1, side, side, p, p, C)
        out = torch.einsum("nhwpqc->nchpwq", out)
        return out.reshape(-1, C, side * p, side * p)

    def forward_head(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """diffusers' output layers: LN (eps 1e-6), shift/scale from ``proj_out_1``,
        ``proj_out_2``, unpatchify.  (B, N, H), (B, H) -> (B, C_out, S, S)."""
        H = self.hidden_size
        if not torch.is_tensor(h) or h.dim() != 3 or h.shape[2] != H:
            raise ValueError(f"h must have shape (B, N, {H}), got {getattr(h, 'shape', h)}")
        if not torch.is_tensor(c) or c.dim() != 2 or c.shape != (h.shape[0], H):
            raise ValueError(f"c must have shape ({h.shape[0]}, {H}), got {getattr(c, 'shape', c)}")
        m = self.model
        shift, scale = m.proj_out_1(F.silu(c)).chunk(2, dim=1)
        out = m.norm_out(h) * (1 + scale[:, None]) + shift[:, None]
        return self.unpatchify(m.proj_out_2(out))

    def head_parameters(self, c: torch.Tensor) -> HeadParameters:
        """diffusers' output layers for conditioning c (B, H): shift / scale from ``proj_out_1``
        (computed here), ``proj_out_2``'s weight and bias, ``norm_out``'s eps (target protocol,
        fused-head part)."""
        m = self.model
        shift, scale = m.proj_out_1(F.silu(c)).chunk(2, dim=1)
        return HeadParameters(shift, scale, m.proj_out_2.weight, m.proj_out_2.bias, float(m.norm_out.eps))

    def head_fusion_problem(self) -> Optional[str]:
        """Why the fused epilogue cannot run diffusers' output layers, or None (see models/protocol.py)."""
        return adaln_head_problem(self.model.norm_out, self.model.proj_out_2)

    def forward(self, x, t, y) -> torch.Tensor:
        """``forward_head(*forward_features(x, t, y))`` == diffusers ``model(x, t, y).sample``."""
        return self.forward_head(*self.forward_features(x, t, y))

    def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels: int = 4):
        """Classifier-free guidance on a doubled batch ([z; z], labels [y; null]).

        Runs the first half of ``x`` twice, like the official ``forward_with_cfg``.
        The default ``guidance_channels=4`` is diffusers' ``DiTPipeline`` rule
        (all noise channels guided); pass 3 for the official DiT rule.
        """
        out = self.forward(*_cfg_double(x), t, y)
        return guide_output(out, cfg_scale, guidance_channels, self.in_channels)

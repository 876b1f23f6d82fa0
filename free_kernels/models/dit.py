"""Diffusion Transformer, compatible with the official DiT checkpoints.

Module names, parameter names and shapes follow the published DiT checkpoints
(see ``docs`` in the README), so ``model.load_state_dict(official_sd, strict=True)``
works.  The forward pass is split for FREE:

* ``forward_features(x, t, y) -> (h, c)``: patch embedding, conditioning and
  every transformer block; ``h`` are the top-block features (B, N, H).
* ``forward_head(h, c) -> out``: final adaLN layer, linear and unpatchify.

``forward(x, t, y) == forward_head(*forward_features(x, t, y))`` exactly (it is
implemented that way).

Attention calls :func:`free_kernels.ops.verify_attention`, the dispatch point
of the verification-attention kernels; on CPU it resolves to the PyTorch
reference.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .. import ops
from ..diffusion.guidance import guide_output  # noqa: F401  (also public as free_kernels.models.dit.guide_output)
from .._checks import check_finite
from .protocol import HeadParameters, adaln_head_problem

__all__ = [
    "DiT",
    "DiT_models",
    "DiTBlock",
    "FinalLayer",
    "TimestepEmbedder",
    "LabelEmbedder",
    "find_model",
    "get_2d_sincos_pos_embed",
    "timestep_embedding",
    "modulate",
]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with (B, H) shift/scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, laid out [cos, sin].

    Frequencies are exp(-ln(max_period) * k / half), computed in fp32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Timestep -> 256-d sinusoid -> Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; row ``num_classes`` is the null (CFG) class.

    Label dropout is only used in training (``force_drop_ids`` or the
    ``dropout_prob`` with ``train=True``); sampling never drops labels.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None, generator=None):
        if force_drop_ids is None:
            drop_ids = (
                torch.rand(labels.shape[0], device=labels.device, generator=generator)
                < self.dropout_prob
            )
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels, train: bool = False, force_drop_ids=None, generator=None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids, generator)
        return self.embedding_table(labels)


class Mlp(nn.Module):
    """H -> 4H -> H with GELU (tanh approximation); official names fc1 / fc2."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden, bias=True)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size, bias=True)

    def forward(self, x):
        # fc1 + GELU through the bias_gelu dispatch point (torch: exactly F.gelu(self.fc1(x), "tanh"))
        return self.fc2(ops.bias_gelu(x, self.fc1.bias, weight=self.fc1.weight))


class Attention(nn.Module):
    """Multi-head self-attention on a fused qkv projection (official names qkv / proj).

    The attention itself goes through :func:`free_kernels.ops.verify_attention`,
    which reads the packed (B, N, 3H) projection in place.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        qkv = self.qkv(x)
        o = ops.verify_attention(qkv, self.num_heads)
        return self.proj(o)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        # x + gate[:, None] * branch, through the gated_residual dispatch point (torch: that expression)
        x = ops.gated_residual(x, gate_msa, self.attn(ops.modulated_layernorm(x, shift_msa, scale_msa, eps=1e-6)))
        x = ops.gated_residual(x, gate_mlp, self.mlp(ops.modulated_layernorm(x, shift_mlp, scale_mlp, eps=1e-6)))
        return x


class FinalLayer(nn.Module):
    """adaLN final layer: LN, modulate, Linear(H, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(ops.modulated_layernorm(x, shift, scale, eps=1e-6))


class PatchEmbed(nn.Module):
    """Conv2d(kernel = stride = p) flattened to tokens (official name x_embedder.proj)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DiT(nn.Module):
    """Class-conditional DiT (Peebles & Xie, 2023), official checkpoint layout."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 (2-D sin-cos embedding)")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.input_size = input_size
        self.num_classes = num_classes
        self.depth = depth
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels,
            hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob, num_classes=num_classes, learn_sigma=learn_sigma,
        )

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # fixed sin-cos embedding, stored (non-trainable) as in the official checkpoints
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self):
        """adaLN-Zero initialisation: a fresh model outputs zeros."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.x_embedder.num_patches ** 0.5))
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    # ------------------------------------------------------------- validation
    def _check_inputs(self, x, t, y):
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] != self.input_size or x.shape[3] != self.input_size:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, {self.input_size}, {self.input_size}), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        B = x.shape[0]
        if not torch.is_tensor(t) or t.dim() != 1 or t.shape[0] != B:
            raise ValueError(f"t must be a 1-D tensor of {B} timesteps, got {getattr(t, 'shape', t)}")
        if not torch.is_tensor(y) or y.dim() != 1 or y.shape[0] != B:
            raise ValueError(f"y must be a 1-D tensor of {B} labels, got {getattr(y, 'shape', y)}")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise TypeError(f"y must be an integer tensor of class labels, got dtype {y.dtype}")
        if x.device != self.pos_embed.device or t.device != x.device or y.device != x.device:
            raise ValueError(
                f"x, t, y must be on the model's device {self.pos_embed.device}; got x on {x.device}, "
                f"t on {t.device}, y on {y.device}"
            )
        check_finite("x", x)

    # ---------------------------------------------------------------- forward
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, S, S)."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        if h * w != x.shape[1]:
            raise ValueError(f"token count {x.shape[1]} is not a square")
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + position embedding: (B, C, S, S) -> (B, N, H)."""
        return self.x_embedder(x) + self.pos_embed

    def embed_condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Conditioning vector c = t_embed(t) + y_embed(y): (B, H).

        As in the official DiT, labels are dropped at random (to the null class)
        with ``class_dropout_prob`` while the module is in ``train()`` mode; call
        ``eval()`` for sampling.
        """
        return self.t_embedder(t) + self.y_embedder(y, self.training)

    def forward_features(self, x, t, y) -> Tuple[torch.Tensor, torch.Tensor]:
        """Everything up to and including the last block: (h (B, N, H), c (B, H))."""
        self._check_inputs(x, t, y)
        h = self.embed_tokens(x)
        c = self.embed_condition(t, y)
        for block in self.blocks:
            h = block(h, c)
        return h, c

    def forward_head(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final layer + unpatchify: (B, N, H), (B, H) -> (B, C_out, S, S)."""
        return self.unpatchify(self.final_layer(h, c))

    def head_parameters(self, c: torch.Tensor) -> HeadParameters:
        """The final layer for conditioning c (B, H): its adaLN shift / scale (computed here), the
        linear's weight and bias and the LayerNorm's eps (target protocol, fused-head part)."""
        fl = self.final_layer
        shift, scale = fl.adaLN_modulation(c).chunk(2, dim=1)
        return HeadParameters(shift, scale, fl.linear.weight, fl.linear.bias, float(fl.norm_final.eps))

    def head_fusion_problem(self) -> Optional[str]:
        """Why the fused epilogue cannot run this final layer, or None (see models/protocol.py)."""
        return adaln_head_problem(self.final_layer.norm_final, self.final_layer.linear)

    def forward(self, x, t, y):
        h, c = self.forward_features(x, t, y)
        return self.forward_head(h, c)

    def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels: int = 3):
        """Classifier-free guidance on a doubled batch ([z; z], labels [y; null]).

        The first half of ``x`` is run twice (conditional and unconditional
        rows, in one forward).  Only the first ``guidance_channels`` channels
        of the noise prediction are guided: 3 is the official DiT rule, 4 the
        diffusers rule (all of eps).  The remaining channels stay each half's own.
        """
        out = self.forward(*_cfg_double(x), t, y)
        return guide_output(out, cfg_scale, guidance_channels, self.in_channels)


def _cfg_double(x):
    if x.shape[0] % 2:
        raise ValueError(f"forward_with_cfg expects a doubled batch (even size), got batch {x.shape[0]}")
    half = x[: x.shape[0] // 2]
    return (torch.cat([half, half], dim=0),)


# ----------------------------------------------------------- position embedding
def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos embedding (N, D): half the channels for rows, half for columns."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w first, as in MAE
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# ------------------------------------------------------------------- configs
_CONFIGS: Dict[str, Tuple[int, int, int]] = {
    # name: (depth, hidden, heads)
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def _make_config(size: str, patch: int):
    depth, hidden, heads = _CONFIGS[size]

    def ctor(**kwargs):
        for k in ("depth", "hidden_size", "num_heads", "patch_size"):
            if k in kwargs:
                raise TypeError(f"DiT-{size}/{patch} fixes {k}; use DiT(...) for a custom architecture")
        return DiT(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads, **kwargs)

    ctor.__name__ = f"DiT_{size}_{patch}"
    ctor.__doc__ = f"DiT-{size}/{patch}: depth {depth}, hidden {hidden}, {heads} heads, patch {patch}."
    return ctor


DiT_models = {f"DiT-{s}/{p}": _make_config(s, p) for s in ("XL", "L", "B", "S") for p in (2, 4, 8)}
for _name, _ctor in DiT_models.items():
    globals()[_ctor.__name__] = _ctor
    __all__.append(_ctor.__name__)


def create_model(name: str, **kwargs) -> DiT:
    """Build a config from :data:`DiT_models` by name, with a clear error for unknown names."""
    if name not in DiT_models:
        raise KeyError(f"unknown DiT config {name!r}; choose one of {sorted(DiT_models)}")
    return DiT_models[name](**kwargs)


# ------------------------------------------------------------------- loading
def find_model(path: str, map_location="cpu") -> Dict[str, torch.Tensor]:
    """Load a DiT state dict from a local checkpoint, like the official helper.

    Accepts a plain state dict, a training checkpoint with an ``"ema"`` entry
    (the EMA weights are returned; the official ``train.py`` checkpoints, whose
    ``"args"`` entry is an ``argparse.Namespace``, included), or a
    ``.safetensors`` file.  Official weights cannot be downloaded here: pass a
    local path.  Loading is safe (``weights_only=True``: tensors and plain data,
    plus exactly ``argparse.Namespace``); a file that would run code, or a
    damaged one, raises ``ValueError`` naming the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint {path!r} not found (find_model only loads local files; download official "
            f"DiT weights yourself and pass their path)"
        )
    import argparse

    from .._checks import safe_load_safetensors, safe_torch_load

    if path.endswith(".safetensors"):
        return safe_load_safetensors(path, "checkpoint", device=str(map_location))[0]
    checkpoint = safe_torch_load(path, "checkpoint", map_location=map_location, allow=(argparse.Namespace,))
    if isinstance(checkpoint, dict) and "ema" in checkpoint:
        checkpoint = checkpoint["ema"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(checkpoint).__name__})")
    return checkpoint


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def blocks_config_problem(cfg: dict, state: dict, hidden: int) -> Optional[str]:
    """Why the ``depth`` / ``num_heads`` / ``mlp_ratio`` of ``cfg`` cannot describe the DiT blocks
    (``blocks.<i>.``) of the weights ``state`` of width ``hidden`` (None: they can), from shapes alone."""
    depth = cfg.get("depth")
    if depth is not None:
        found = {k.split(".")[1] for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
        if not _is_int(depth) or depth != len(found):
            return f"depth {depth!r}, but the weights hold {len(found)} blocks"
    heads = cfg.get("num_heads")
    if heads is not None and (not _is_int(heads) or not 1 <= heads <= hidden or hidden % heads):
        return f"num_heads {heads!r} does not divide the weights' width {hidden}"
    ratio = cfg.get("mlp_ratio")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if ratio is not None and fc1 is not None:
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not math.isfinite(ratio) \
                or int(hidden * ratio) != fc1.shape[0]:
            return f"mlp_ratio {ratio!r}, but the weights' MLP is {fc1.shape[0]} wide for width {hidden}"
    return None


def config_problem(cfg: dict, state: dict) -> Optional[str]:
    """Why ``cfg`` (:class:`DiT` keyword arguments) cannot be the config of the weights ``state`` (None: it
    may be), from their shapes alone: checked before the DiT is built, so that a config claiming huge sizes
    allocates nothing.  Keys the weights lack are left to the strict load."""
    for key in ("input_size", "patch_size", "in_channels", "hidden_size", "num_classes"):
        v = cfg.get(key)
        if v is not None and (not _is_int(v) or v < 1):
            return f"{key} {v!r} is not a positive integer"
    w = state.get("x_embedder.proj.weight")
    if w is None or w.dim() != 4:
        return None
    H, C, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    for key, have in (("hidden_size", H), ("in_channels", C), ("patch_size", p)):
        if key in cfg and cfg[key] != have:
            return f"{key} {cfg[key]!r}, but the weights have {have}"
    pos = state.get("pos_embed")
    size = cfg.get("input_size")
    if pos is not None and size is not None and (size % p or (size // p) ** 2 != pos.shape[1]):
        return f"input_size {size!r}, but the weights have {pos.shape[1]} positions of patch {p}"
    table = state.get("y_embedder.embedding_table.weight")
    classes = cfg.get("num_classes")
    if table is not None and classes is not None and table.shape[0] - classes not in (0, 1):
        return f"num_classes {classes!r}, but the weights embed {table.shape[0]} labels"
    return blocks_config_problem(cfg, state, H)


def load_state_dict_strict(model: DiT, state_dict) -> None:
    """Strict load with an error that lists missing / unexpected keys and bad shapes."""
    if isinstance(state_dict, dict) and "ema" in state_dict and isinstance(state_dict["ema"], dict):
        state_dict = state_dict["ema"]
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    extra = sorted(set(state_dict) - set(own))
    bad = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if extra:
            parts.append(f"unexpected keys ({len(extra)}): {extra[:8]}{' ...' if len(extra) > 8 else ''}")
        if bad:
            parts.append(f"shape mismatches ({len(bad)}): {bad[:8]}{' ...' if len(bad) > 8 else ''}")
        raise ValueError("state dict does not match this DiT: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)

"""Weight conversion between diffusers' ``DiTTransformer2DModel`` and this package's DiT.

:func:`convert_diffusers_to_dit` / :func:`convert_dit_to_diffusers` map the
weights between diffusers' key layout and the official DiT layout that
:class:`~free_kernels.models.dit.DiT` loads.  The weight mapping itself is
lossless (a round trip gives back the identical state dict), but the two
implementations do not compute the same function from the same weights:

* timestep sinusoid: diffusers uses ``Timesteps(256, flip_sin_to_cos=True,
  downscale_freq_shift=1)``, i.e. frequencies ``exp(-ln(1e4) k / 127)``; the
  official DiT uses ``exp(-ln(1e4) k / 128)`` (same [cos, sin] layout);
* the LayerNorm in front of each block's MLP (diffusers' ``norm3``) uses the
  config's ``norm_eps``, 1e-5 by default (the value the hub DiT checkpoints
  are expected to carry; check their config); the
  official DiT uses 1e-6 everywhere (diffusers' ``norm1`` and ``norm_out``
  already use 1e-6).

Everything else (patch + 2-D sin-cos position embedding, label table with the
null row last, adaLN-Zero chunk order shift/scale/gate, tanh-GELU MLP,
attention scale, final layer shift/scale order, unpatchify) is the same
function.  Hub checkpoints such as ``facebook/DiT-XL-2-256`` were produced by
diffusers' conversion script from the official weights (one embedder copied
into every block), so :func:`convert_diffusers_to_dit` on them
gives back the *official* model; the differences measured below are
diffusers' deviation from it, not a conversion error.

Measured on random weights (fp32, CPU, timesteps spread over 0..999), two configs:
[T] the tests' config (sample 8, patch 2, hidden 64, 2 heads, 2 layers, 10
classes, every weight N(0, 0.1^2), outputs of max ~2.8) and [S] DiT-S/2 shape
(sample 32, hidden 384, 6 heads, 12 layers, 1000 classes, weights
N(0, 1/fan_in), outputs of max ~4.6):

* our DiT(converted) vs the stock diffusers model (norm_eps 1e-5, shift 1):
  max |diff| 1.45 [T], 2.5 [S] -- the same order as the outputs.  Almost all
  of it is the timestep frequencies; the eps 1e-5 -> 1e-6 part alone is
  1.7e-5 [T], 1.0e-5 [S].  (How much the frequency mismatch moves a *trained*
  model's outputs could not be measured here: no trained weights are reachable.)
  It is a genuinely different function: a sampler run with one is not expected
  to reproduce the other's samples.
* our DiT vs ``convert_dit_to_diffusers(dit, semantics="official")`` (norm_eps
  1e-6 and the official timestep frequencies): outputs 7.2e-7 [T], 1.7e-6 [S];
  top-block features h 9.5e-7 [T], 2.4e-6 [S]; conditioning c identical.
  That is fp32 rounding (split vs fused qkv GEMMs, SDPA vs the reference
  attention, LayerNorm op order).
* weight round trips DiT -> diffusers -> DiT and diffusers -> DiT -> diffusers
  (``semantics="diffusers"``): identical tensors, identical outputs.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .diffusers_adapter import DiffusersDiTTarget, _check_supported_config, _is_diffusers_dit
from .dit import DiT, get_2d_sincos_pos_embed

__all__ = ["convert_diffusers_to_dit", "convert_dit_to_diffusers", "set_timestep_semantics"]


def _require_diffusers():
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError as e:  # pragma: no cover - exercised only without diffusers
        raise ImportError(
            "diffusers is required to build a DiTTransformer2DModel (pip install diffusers)"
        ) from e
    return DiTTransformer2DModel


_BLOCK_RE = re.compile(r"^transformer_blocks\.(\d+)\.")
_EMB_PREFIX = "norm1.emb."
_EMB_KEYS = (
    "timestep_embedder.linear_1.weight",
    "timestep_embedder.linear_1.bias",
    "timestep_embedder.linear_2.weight",
    "timestep_embedder.linear_2.bias",
    "class_embedder.embedding_table.weight",
)
_BLOCK_MAP = {  # official name under blocks.{i}. <- diffusers name under transformer_blocks.{i}.
    "attn.proj.weight": "attn1.to_out.0.weight",
    "attn.proj.bias": "attn1.to_out.0.bias",
    "mlp.fc1.weight": "ff.net.0.proj.weight",
    "mlp.fc1.bias": "ff.net.0.proj.bias",
    "mlp.fc2.weight": "ff.net.2.weight",
    "mlp.fc2.bias": "ff.net.2.bias",
    "adaLN_modulation.1.weight": "norm1.linear.weight",
    "adaLN_modulation.1.bias": "norm1.linear.bias",
}
_TOP_MAP = {
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "final_layer.linear.weight": "proj_out_2.weight",
    "final_layer.linear.bias": "proj_out_2.bias",
    "final_layer.adaLN_modulation.1.weight": "proj_out_1.weight",
    "final_layer.adaLN_modulation.1.bias": "proj_out_1.bias",
}
_EMB_MAP = {
    "t_embedder.mlp.0.weight": "timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight",
}
_QKV = ("attn1.to_q", "attn1.to_k", "attn1.to_v")


def _diffusers_keys(depth: int) -> List[str]:
    keys = list(_TOP_MAP.values())
    for i in range(depth):
        pre = f"transformer_blocks.{i}."
        keys += [pre + _EMB_PREFIX + k for k in _EMB_KEYS]
        keys += [pre + v for v in _BLOCK_MAP.values()]
        keys += [pre + q + s for q in _QKV for s in (".weight", ".bias")]
    return keys


def convert_diffusers_to_dit(
    state_dict_or_model: Union[nn.Module, Mapping[str, torch.Tensor]],
    *,
    config: Optional[Mapping[str, Any]] = None,
    num_heads: Optional[int] = None,
    input_size: Optional[int] = None,
    unshared_embeddings: str = "error",
) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """diffusers DiT weights -> (``DiT(**kwargs)`` kwargs, official-layout state dict).

    ``state_dict_or_model`` is a ``DiTTransformer2DModel``, a
    :class:`DiffusersDiTTarget`, or a diffusers-layout state dict.  A state dict
    does not record the head count or the latent size (diffusers keeps the
    position embedding as a non-persistent buffer), so pass them, either as
    ``num_heads`` / ``input_size`` or as the model's diffusers ``config``
    (``num_attention_heads``, ``sample_size``).

    The returned state dict loads strictly into ``DiT(**kwargs)``.  Mapping:
    ``to_q/to_k/to_v`` are concatenated (in that order) into the fused ``qkv``;
    the embedders come from block 0's ``norm1.emb``; ``proj_out_1`` /
    ``proj_out_2`` become the final layer; ``pos_embed`` is taken from the
    model's buffer when a model is given, else recomputed (the same values).

    diffusers has one embedder per block, the official DiT one in total.  If
    blocks hold different embedder weights the model cannot be expressed
    exactly: ``unshared_embeddings="error"`` (default) raises,
    ``"first"`` uses block 0's (which is what diffusers' head uses).

    The converted DiT computes the *official* function, which differs from
    diffusers' (timestep frequencies /127 vs /128, MLP LayerNorm eps 1e-5 vs
    1e-6): see the module docstring for measured differences.
    """
    if unshared_embeddings not in ("error", "first"):
        raise ValueError(f"unshared_embeddings must be 'error' or 'first', got {unshared_embeddings!r}")
    pos_embed = None
    if isinstance(state_dict_or_model, DiffusersDiTTarget):
        state_dict_or_model = state_dict_or_model.model
    if isinstance(state_dict_or_model, nn.Module):
        if not _is_diffusers_dit(state_dict_or_model):
            raise TypeError(
                f"expected a DiTTransformer2DModel, DiffusersDiTTarget or state dict, "
                f"got {type(state_dict_or_model).__name__}"
            )
        model = state_dict_or_model
        config = dict(model.config)
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        pos_embed = model.pos_embed.pos_embed.detach()
    elif isinstance(state_dict_or_model, Mapping):
        sd = dict(state_dict_or_model)
    else:
        raise TypeError(
            f"expected a DiTTransformer2DModel, DiffusersDiTTarget or state dict, got {type(state_dict_or_model).__name__}"
        )
    config = dict(config or {})
    _check_supported_config(config)
    if num_heads is None:
        num_heads = config.get("num_attention_heads")
    if input_size is None:
        input_size = config.get("sample_size")
    if num_heads is None or input_size is None:
        raise ValueError(
            "a diffusers state dict does not record the head count or latent size: pass num_heads= and "
            "input_size= (or config= with num_attention_heads and sample_size)"
        )
    sd.pop("pos_embed.pos_embed", None)  # present only when saved with pos_embed_max_size

    # ---- infer the architecture from the tensors
    for k in ("pos_embed.proj.weight", "proj_out_2.weight", "transformer_blocks.0.ff.net.0.proj.weight"):
        if k not in sd:
            raise ValueError(f"not a diffusers DiTTransformer2DModel state dict: missing {k!r}")
    hidden, in_channels, p, p2 = sd["pos_embed.proj.weight"].shape
    if p != p2:
        raise ValueError(f"non-square patch kernel {p}x{p2}")
    depth = 1 + max(int(m.group(1)) for m in map(_BLOCK_RE.match, sd) if m)
    n_rows = sd["proj_out_2.weight"].shape[0]
    if n_rows % (p * p):
        raise ValueError(f"proj_out_2 has {n_rows} rows, not a multiple of patch_size^2 = {p * p}")
    out_channels = n_rows // (p * p)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"out_channels {out_channels} must be in_channels {in_channels} or twice it")
    table_rows = sd[f"transformer_blocks.0.{_EMB_PREFIX}class_embedder.embedding_table.weight"].shape[0]
    mlp_hidden = sd["transformer_blocks.0.ff.net.0.proj.weight"].shape[0]
    if hidden % int(num_heads):
        raise ValueError(f"hidden size {hidden} is not divisible by num_heads {num_heads}")
    if input_size % p:
        raise ValueError(f"input_size {input_size} is not divisible by patch_size {p}")
    num_classes = int(config.get("num_embeds_ada_norm") or table_rows - 1)
    if table_rows not in (num_classes, num_classes + 1):
        raise ValueError(f"label table has {table_rows} rows for {num_classes} classes")

    expected = set(_diffusers_keys(depth))
    missing = sorted(expected - set(sd))
    extra = sorted(set(sd) - expected)
    if missing or extra:
        raise ValueError(
            f"state dict does not match a {depth}-block diffusers DiT: missing {missing[:8]}, unexpected {extra[:8]}"
        )

    # ---- per-block embedders
    differing = [
        i for i in range(1, depth)
        if any(not torch.equal(sd[f"transformer_blocks.{i}.{_EMB_PREFIX}{k}"],
                               sd[f"transformer_blocks.0.{_EMB_PREFIX}{k}"]) for k in _EMB_KEYS)
    ]
    if differing and unshared_embeddings == "error":
        raise ValueError(
            f"blocks {differing[:8]}{' ...' if len(differing) > 8 else ''} have conditioning embedders different "
            f"from block 0's; the official DiT has a single embedder, so this model cannot be converted exactly "
            f"(pass unshared_embeddings='first' to use block 0's for all blocks)"
        )

    kwargs = dict(
        input_size=int(input_size),
        patch_size=int(p),
        in_channels=int(in_channels),
        hidden_size=int(hidden),
        depth=int(depth),
        num_heads=int(num_heads),
        mlp_ratio=mlp_hidden / hidden,
        class_dropout_prob=0.1 if table_rows == num_classes + 1 else 0.0,
        num_classes=num_classes,
        learn_sigma=out_channels == 2 * in_channels,
    )

    out: Dict[str, torch.Tensor] = {}
    if pos_embed is None:
        grid = int(input_size) // int(p)
        pos_embed = torch.from_numpy(get_2d_sincos_pos_embed(int(hidden), grid)).float().unsqueeze(0)
    out["pos_embed"] = pos_embed.clone()
    for ours, theirs in _TOP_MAP.items():
        out[ours] = sd[theirs].clone()
    for ours, theirs in _EMB_MAP.items():
        out[ours] = sd[f"transformer_blocks.0.{_EMB_PREFIX}{theirs}"].clone()
    for i in range(depth):
        pre = f"transformer_blocks.{i}."
        for ours, theirs in _BLOCK_MAP.items():
            out[f"blocks.{i}.{ours}"] = sd[pre + theirs].clone()
        for s in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{s}"] = torch.cat([sd[f"{pre}{q}.{s}"] for q in _QKV], dim=0)
    return kwargs, out


def set_timestep_semantics(model: nn.Module, semantics: str) -> None:
    """Switch a diffusers DiT's timestep sinusoid between ``"diffusers"``
    (frequencies /127, ``downscale_freq_shift=1``) and ``"official"`` (/128, shift 0).

    This sets the ``downscale_freq_shift`` attribute of every block's
    ``Timesteps`` module.  It is runtime state, not config: ``save_pretrained``
    does not record it and a reloaded model has diffusers' frequencies again.
    """
    shift = {"official": 0, "diffusers": 1}.get(semantics)
    if shift is None:
        raise ValueError(f"semantics must be 'official' or 'diffusers', got {semantics!r}")
    if isinstance(model, DiffusersDiTTarget):
        model = model.model
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift


def convert_dit_to_diffusers(dit: DiT, semantics: str = "official") -> nn.Module:
    """Our (official-layout) :class:`DiT` -> an equivalent ``DiTTransformer2DModel``.

    ``semantics="official"`` (default) builds the diffusers model with
    ``norm_eps=1e-6`` and switches its timestep sinusoid to the official
    frequencies (:func:`set_timestep_semantics`), so it computes the same
    function as ``dit`` up to fp32 rounding (measured max abs 7e-7 .. 1.7e-6 on
    outputs of max 3 .. 5).  ``semantics="diffusers"`` gives what diffusers' own DiT
    conversion produces (``norm_eps=1e-5``, stock frequencies), a
    different function (module docstring).  Every block receives the same
    embedder weights.  A DiT without a null label row (``class_dropout_prob=0``)
    gets a zero row appended, since diffusers always allocates one.
    The model is returned in eval mode on ``dit``'s device and dtype.
    """
    DiTTransformer2DModel = _require_diffusers()
    if semantics not in ("official", "diffusers"):
        raise ValueError(f"semantics must be 'official' or 'diffusers', got {semantics!r}")
    if not isinstance(dit, DiT):
        raise TypeError(f"expected a free_kernels DiT, got {type(dit).__name__}")
    H, heads = dit.hidden_size, dit.num_heads
    mlp_ratio = dit.config.get("mlp_ratio", 4.0)
    if int(H * mlp_ratio) != 4 * H:
        raise ValueError(f"diffusers' DiT block has a fixed MLP ratio of 4, this DiT has {mlp_ratio}")
    sd = {k: v.detach() for k, v in dit.state_dict().items()}
    ref = sd["pos_embed"]
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=H // heads,
        in_channels=dit.in_channels,
        out_channels=dit.out_channels,
        num_layers=dit.depth,
        sample_size=dit.input_size,
        patch_size=dit.patch_size,
        num_embeds_ada_norm=dit.num_classes,
        norm_eps=1e-6 if semantics == "official" else 1e-5,
    ).to(device=ref.device)
    if ref.dtype != torch.float32:  # (diffusers warns on any dtype cast, even a no-op one)
        model = model.to(dtype=ref.dtype)

    table = sd["y_embedder.embedding_table.weight"]
    if table.shape[0] == dit.num_classes:
        table = torch.cat([table, table.new_zeros(1, table.shape[1])], dim=0)
    emb = {theirs: sd[ours] for ours, theirs in _EMB_MAP.items()}
    emb["class_embedder.embedding_table.weight"] = table

    new: Dict[str, torch.Tensor] = {theirs: sd[ours] for ours, theirs in _TOP_MAP.items()}
    for i in range(dit.depth):
        pre = f"transformer_blocks.{i}."
        for k, v in emb.items():
            new[pre + _EMB_PREFIX + k] = v
        for ours, theirs in _BLOCK_MAP.items():
            new[pre + theirs] = sd[f"blocks.{i}.{ours}"]
        for s in ("weight", "bias"):
            for q, part in zip(_QKV, sd[f"blocks.{i}.attn.qkv.{s}"].chunk(3, dim=0)):
                new[f"{pre}{q}.{s}"] = part
    model.load_state_dict({k: v.clone() for k, v in new.items()}, strict=True)
    with torch.no_grad():
        model.pos_embed.pos_embed.copy_(ref.to(model.pos_embed.pos_embed.dtype))
    set_timestep_semantics(model, semantics)
    return model.eval()

"""FREE drafters: predict the target's top-block features of a newly sampled state.

Drafter protocol (what :class:`free_kernels.FreeSampler` calls)::

    h = drafter(h_prev, x, t, y)

* ``h_prev`` (B, N, H): top-block features of x's parent (exact from the last
  verification, or drafted in this round);
* ``x`` (B, C, S, S): the newly sampled state;
* ``t`` (B,): ORIGINAL timesteps (0 .. 999) of x;
* ``y`` (B,): labels, the null class (``num_classes``) on unconditional CFG rows;
* returns ``h`` (B, N, H): predicted top-block features of x at t.

The sampler then applies the target's frozen head to ``h``.  Any module or
callable with this signature is a drafter.

Target protocol (what a drafter and the sampler need of the target; our
:class:`~free_kernels.models.DiT` and the diffusers adapter provide it):

* attributes ``hidden_size``, ``patch_size``, ``in_channels``, ``out_channels``,
  ``input_size``, ``num_classes``, ``num_heads``, ``learn_sigma``;
* ``forward_features(x, t, y) -> (h, c)`` and ``forward_head(h, c) -> out``;
* ``embed_tokens(x) -> (B, N, H)`` (patch + position embedding) and
  ``embed_condition(t, y) -> (B, H)`` (the adaLN conditioning vector).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn as nn

from .dit import DiTBlock

DRAFTER_FORMAT = "free_kernels.FeatureDrafter/1"
_MATCH_KEYS = ("hidden_size", "patch_size", "in_channels", "input_size", "num_classes")


def target_signature(target) -> dict:
    """The target attributes a drafter must agree with."""
    missing = [k for k in _MATCH_KEYS + ("num_heads",) if not hasattr(target, k)]
    if missing:
        raise TypeError(
            f"target {type(target).__name__} does not follow the target protocol: missing attributes {missing} "
            f"(see free_kernels.models.drafter)"
        )
    return {k: int(getattr(target, k)) for k in _MATCH_KEYS}


def as_target(model):
    """``model`` if it follows the target protocol, else a module with the official DiT attribute layout
    (the official repository's own ``DiT``) wrapped as :class:`free_kernels.dit.OfficialDiTTarget`
    (no copy), as the drop-in does.  Anything else is returned unchanged (and fails the protocol check)."""
    if all(hasattr(model, k) for k in _MATCH_KEYS + ("num_heads",)) and callable(
            getattr(model, "forward_features", None)):
        return model
    if isinstance(model, nn.Module):
        from ..dit import OfficialDiTTarget, _official_layout_problems

        if not _official_layout_problems(model):
            return OfficialDiTTarget(model)
    return model


class FrozenFeatureDrafter(nn.Module):
    """Training-free baseline: the next state's features are the parent's (h = h_prev).

    The feature-space version of the frozen-target drafter; the learned drafter
    must beat it.
    """

    def __init__(self, target=None):
        super().__init__()
        self.signature = target_signature(as_target(target)) if target is not None else None

    def forward(self, h_prev, x, t, y):
        return h_prev


class FeatureDrafter(nn.Module):
    """Feature-level autoregressive drafter (FREE).

    ``fuse``: Linear(2H -> H) on [h_prev, embed_tokens(x)], then ``depth`` adaLN
    DiT blocks at the target's width conditioned on ``embed_condition(t, y)``.
    The target's embedders and head are reused frozen and are NOT part of this
    module's state (they are looked up on the target at call time).

    ``init="identity"`` (default) starts as the frozen drafter (fuse = [I, 0],
    blocks adaLN-Zero), the right starting point for distillation;
    ``init="random"`` gives fresh random weights (a deliberately poor drafter,
    used by the exactness tests).
    """

    def __init__(self, hidden_size: int, num_heads: int, depth: int = 1, mlp_ratio: float = 4.0,
                 signature: Optional[dict] = None):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.depth = depth
        self.mlp_ratio = mlp_ratio
        self.signature = dict(signature or {})
        self.fuse = nn.Linear(2 * hidden_size, hidden_size, bias=True)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self._target = None  # not a registered submodule: never saved with the drafter
        self.extra = {}  # training record saved with the drafter (see save / load)

    # ------------------------------------------------------------ building
    @classmethod
    def for_target(cls, target, depth: int = 1, init: str = "identity", mlp_ratio: float = 4.0,
                   generator: Optional[torch.Generator] = None) -> "FeatureDrafter":
        target = as_target(target)
        sig = target_signature(target)
        d = cls(sig["hidden_size"], int(target.num_heads), depth=depth, mlp_ratio=mlp_ratio, signature=sig)
        d.reset_parameters(init, generator=generator)
        dev = next(target.parameters()).device if isinstance(target, nn.Module) else None
        if dev is not None:
            d.to(dev)
        d.attach(target)
        return d

    def reset_parameters(self, init: str = "identity", generator: Optional[torch.Generator] = None):
        H = self.hidden_size
        with torch.no_grad():
            if init == "identity":
                self.fuse.weight.zero_()
                self.fuse.weight[:, :H].copy_(torch.eye(H))
                self.fuse.bias.zero_()
                for blk in self.blocks:
                    for m in blk.modules():
                        if isinstance(m, nn.Linear):
                            nn.init.xavier_uniform_(m.weight, generator=generator)
                            nn.init.zeros_(m.bias)
                    nn.init.zeros_(blk.adaLN_modulation[-1].weight)
                    nn.init.zeros_(blk.adaLN_modulation[-1].bias)
            elif init == "random":
                for m in self.modules():
                    if isinstance(m, nn.Linear):
                        nn.init.normal_(m.weight, std=(1.0 / m.in_features) ** 0.5, generator=generator)
                        nn.init.normal_(m.bias, std=0.02, generator=generator)
            else:
                raise ValueError(f"init must be 'identity' or 'random', got {init!r}")

    def attach(self, target) -> "FeatureDrafter":
        """Bind to a target (checks that the drafter was built for it)."""
        target = as_target(target)
        sig = target_signature(target)
        if self.signature:
            bad = {k: (self.signature.get(k), sig[k]) for k in _MATCH_KEYS if self.signature.get(k) != sig[k]}
            if bad:
                raise ValueError(
                    "drafter was built for another target: "
                    + ", ".join(f"{k}: drafter {a} vs target {b}" for k, (a, b) in bad.items())
                )
        else:
            self.signature = sig
        object.__setattr__(self, "_target", target)
        return self

    @property
    def target(self):
        if self._target is None:
            raise RuntimeError("drafter is not attached to a target: call drafter.attach(target)")
        return self._target

    # ------------------------------------------------------------- forward
    def forward(self, h_prev: torch.Tensor, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = self.target
        e = target.embed_tokens(x)
        if h_prev.shape != e.shape:
            raise ValueError(f"h_prev has shape {tuple(h_prev.shape)}, expected {tuple(e.shape)} for this x")
        c = target.embed_condition(t, y)
        h = self.fuse(torch.cat([h_prev.to(e.dtype), e], dim=-1))
        for blk in self.blocks:
            h = blk(h, c)
        return h

    def flops_per_token(self) -> int:
        """Multiply-adds x2 of the drafter's linear layers per token (attention excluded)."""
        H = self.hidden_size
        per_block = 2 * (3 * H * H + H * H + 2 * int(self.mlp_ratio * H) * H)
        return 2 * 2 * H * H + self.depth * per_block

    # ------------------------------------------------------------ save/load
    def config(self) -> dict:
        return dict(format=DRAFTER_FORMAT, hidden_size=self.hidden_size, num_heads=self.num_heads,
                    depth=self.depth, mlp_ratio=self.mlp_ratio, signature=self.signature)

    def save(self, path: str, extra: Optional[dict] = None) -> None:
        """Write ``path`` (.safetensors: weights + config) and ``path`` with .json (the same config, readable).

        The config (with ``extra``) is stored inside the .safetensors metadata,
        so weights and config are replaced together in one atomic rename; the
        .json beside it is a copy for people and tools that read JSON.  Each file
        is written to a temporary name, fsynced and renamed.
        """
        from .._checks import atomic_save_safetensors, atomic_write_json

        base = path[: -len(".safetensors")] if path.endswith(".safetensors") else path
        os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        cfg = self.config()
        if extra:
            cfg["extra"] = extra
        atomic_save_safetensors(tensors, base + ".safetensors", metadata={_META_KEY: json.dumps(cfg)})
        atomic_write_json(base + ".json", cfg)

    @staticmethod
    def read_config(path: str) -> dict:
        """The config a drafter file was saved with (``extra`` included), without loading weights.

        Read from the .safetensors metadata (written atomically with the weights);
        files saved before the metadata existed fall back to the .json beside them.
        """
        from .._checks import FileProblem, read_json_file

        base = path[: -len(".safetensors")] if path.endswith(".safetensors") else path
        if not os.path.isfile(base + ".safetensors"):
            raise FileNotFoundError(f"drafter file {base + '.safetensors'!r} not found")
        meta = _safetensors_metadata(base + ".safetensors")
        if _META_KEY in meta:
            try:
                cfg = json.loads(meta[_META_KEY])
            except ValueError:
                raise FileProblem(f"drafter {base + '.safetensors'!r}: damaged config metadata") from None
        else:
            if not os.path.isfile(base + ".json"):
                raise FileNotFoundError(f"drafter file {base + '.json'!r} not found (the config of "
                                        f"{base + '.safetensors'!r}, which has none inside)")
            cfg = read_json_file(base + ".json", "drafter config")
        if not isinstance(cfg, dict) or cfg.get("format") != DRAFTER_FORMAT:
            got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
            raise ValueError(f"{base}: not a FeatureDrafter config (format {got!r})")
        return cfg

    @classmethod
    def load(cls, path: str, target=None, map_location="cpu") -> "FeatureDrafter":
        """Load a drafter saved by :meth:`save`; with ``target`` given, check it matches and attach.

        ``drafter.extra`` holds the training record saved with it ({} if none).
        """
        from .._checks import safe_load_safetensors

        base = path[: -len(".safetensors")] if path.endswith(".safetensors") else path
        cfg = cls.read_config(base)
        try:
            d = cls(int(cfg["hidden_size"]), int(cfg["num_heads"]), depth=int(cfg["depth"]),
                    mlp_ratio=cfg.get("mlp_ratio", 4.0), signature=cfg.get("signature"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"drafter {base + '.safetensors'!r}: incomplete config ({e})") from None
        state, _ = safe_load_safetensors(base + ".safetensors", "drafter", device=str(map_location))
        try:
            d.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ValueError(f"drafter {base + '.safetensors'!r} does not match its config: {first}") from None
        d.extra = dict(cfg.get("extra") or {})
        d.to(map_location)
        if target is not None:
            d.attach(target)
        return d


_META_KEY = "free_kernels.drafter_config"


def _safetensors_metadata(path: str) -> dict:
    from .._checks import FileProblem

    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # damaged header: name the file
        raise FileProblem(f"drafter {path!r} is damaged or not a .safetensors file ({e})") from None

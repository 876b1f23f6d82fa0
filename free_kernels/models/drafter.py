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
callable with this signature is a drafter.  Two optional keyword inputs are
passed only to drafters that declare them (class attributes):

* ``accepts_t_next = True``: ``t_next`` (B,), the original timestep of the
  state the transition from x drafts (x is at ``t``; the respaced stride is
  ``t - t_next``), so one drafter serves every respacing;
* ``accepts_condition = True``: ``c`` (B, H) = ``embed_condition(t, y)``, which
  the caller computes once per draft step for the drafter and the head; a drafter
  with a ``draft_condition(t, y)`` method computes it for the caller (e.g. from a
  table: :meth:`FeatureDrafter.draft_condition`).

The target protocol (what a drafter and the sampler need of the target) is
described in :mod:`free_kernels.models.protocol`.
"""
from __future__ import annotations

import json
import math
import os
import weakref
from typing import Optional

import torch
import torch.nn as nn

from .dit import DiTBlock, LabelEmbedder, blocks_config_problem
from .official_adapter import as_target  # noqa: F401  (public here too)
from .protocol import MATCH_KEYS as _MATCH_KEYS
from .protocol import target_signature  # noqa: F401  (public here too)

DRAFTER_FORMAT = "free_kernels.FeatureDrafter/1"
STRIDE_FREQ = 64  # sinusoid size of the stride embedding (see FeatureDrafter.stride_embedding)


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
    DiT blocks at the target's width conditioned on ``embed_condition(t, y)``
    plus, when the caller passes ``t_next``, a stride embedding
    ``stride_proj(sinusoid(t - t_next))`` (zero-initialised: with it zero, or
    without ``t_next``, the drafter is exactly the unconditioned one), so one
    drafter serves every respacing.  ``c`` given by the caller is used as is.
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
        self.stride_proj = nn.Linear(STRIDE_FREQ, hidden_size, bias=False)
        nn.init.zeros_(self.stride_proj.weight)
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
                self.stride_proj.weight.zero_()
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
                        if m.bias is not None:
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
    accepts_t_next = True
    accepts_condition = True

    @staticmethod
    def stride_sinusoid(stride: torch.Tensor) -> torch.Tensor:
        """(B,) respaced strides in original timesteps -> (B, STRIDE_FREQ) sinusoid (periods 2 pi .. ~1e4 steps)."""
        from .dit import timestep_embedding

        return timestep_embedding(stride, STRIDE_FREQ, max_period=2000.0)

    def stride_embedding(self, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """(B, H) added to c: ``stride_proj(sinusoid(t - t_next))``."""
        return self.stride_proj(self.stride_sinusoid((t - t_next).to(torch.float32)).to(self.stride_proj.weight.dtype))

    def forward(self, h_prev: torch.Tensor, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                t_next: Optional[torch.Tensor] = None, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        target = self.target
        if c is None:
            c = target.embed_condition(t, y)
        if self.fast_inference and x.device.type == "cpu" and x.dtype == self.fuse.weight.dtype \
                and x.shape[-1] == x.shape[-2] and not torch.compiler.is_compiling() \
                and not (torch.is_grad_enabled() and any(q.requires_grad for q in self.parameters())):
            plan = self._fast_plan(target)
            if plan is not None:
                # the folded path never computes the patch embedding (it is part of the fusion GEMM)
                pp = plan["p"]
                expect = (x.shape[0], (x.shape[-2] // pp) * (x.shape[-1] // pp), self.fuse.out_features)
                if tuple(h_prev.shape) != expect:
                    raise ValueError(f"h_prev has shape {tuple(h_prev.shape)}, expected {expect} for this x")
                return self._fast_forward(plan, h_prev, x, t, t_next, c)
        e = target.embed_tokens(x)
        if h_prev.shape != e.shape:
            raise ValueError(f"h_prev has shape {tuple(h_prev.shape)}, expected {tuple(e.shape)} for this x")
        if t_next is not None:
            c = c + self.stride_embedding(t, t_next).to(c.dtype)
        h = self.fuse(torch.cat([h_prev.to(e.dtype), e], dim=-1))
        for blk in self.blocks:
            h = blk(h, c)
        return h

    # ----------------------------------------------------- inference path
    # The draft step runs at tiny sizes (batch 1-2 x 16 tokens on the demo), where the cost is the number of
    # ops and module calls, not FLOPs.  Without autograd the drafter runs a folded form of the same function:
    # the patch embedding (a conv) and the position embedding are folded into the fusion Linear (one GEMM on
    # [h_prev, raw patches] plus a per-token bias), the stride embedding is a table lookup, the adaLN "1 +
    # scale" is folded into the modulation bias, and the block is written as plain torch calls.  It equals
    # the module path up to float rounding (tests/test_drafter_respacing.py); training uses the module path.
    # CPU tensors only: there the block ops resolve to their torch references anyway, while on a GPU the
    # module path is the one that reaches the fused kernels (modulated_layernorm, gated_residual,
    # bias_gelu, verify_attention).
    fast_inference = True

    def _fast_plan(self, target):
        emb = getattr(target, "x_embedder", None)
        conv = getattr(emb, "proj", None)
        pos = getattr(target, "pos_embed", None)
        if not (isinstance(conv, nn.Conv2d) and torch.is_tensor(pos) and conv.bias is not None
                and conv.kernel_size == conv.stride and conv.padding == (0, 0) and conv.groups == 1):
            return None  # not our DiT layout: the module path
        wt = self.fuse.weight
        if pos.dtype != wt.dtype or conv.weight.dtype != wt.dtype:
            return None
        tensors = [*_own_parameters(self), conv.weight, conv.bias, pos]
        key = (str(wt.device), wt.dtype, tuple((q.data_ptr(), q._version) for q in tensors))
        cached = getattr(self, "_fast_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.inference_mode(False), torch.no_grad():
            plan = self._build_fast_plan(conv, pos)
        object.__setattr__(self, "_fast_cache", (key, plan))
        return plan

    def _build_fast_plan(self, conv, pos):
        H = self.hidden_size
        W1, W2 = self.fuse.weight[:, :H], self.fuse.weight[:, H:]
        wconv = conv.weight.reshape(H, -1)                                   # (H, C p p)
        wcat = torch.cat([W1, W2 @ wconv], dim=1).t().contiguous()           # (H + C p p, H)
        bias_tok = ((pos.reshape(-1, H) + conv.bias) @ W2.t() + self.fuse.bias).contiguous()   # (N, H)
        blocks = []
        for blk in self.blocks:
            ada = blk.adaLN_modulation[-1]
            b = ada.bias.clone()
            b[H:2 * H] += 1  # scale_msa -> 1 + scale_msa
            b[4 * H:5 * H] += 1  # scale_mlp -> 1 + scale_mlp
            blocks.append(dict(ada_w=ada.weight, ada_b=b, qkv_w=blk.attn.qkv.weight, qkv_b=blk.attn.qkv.bias,
                               proj_w=blk.attn.proj.weight, proj_b=blk.attn.proj.bias,
                               fc1_w=blk.mlp.fc1.weight, fc1_b=blk.mlp.fc1.bias,
                               fc2_w=blk.mlp.fc2.weight, fc2_b=blk.mlp.fc2.bias, heads=blk.attn.num_heads))
        w = self.stride_proj.weight
        table = None
        if bool(w.any()):  # strides 0 .. 1000 (original timesteps); zero weights: no stride term at all
            s = torch.arange(1001, device=w.device, dtype=torch.float32)
            table = (self.stride_sinusoid(s).to(w.dtype) @ w.t()).contiguous()
        return dict(p=int(conv.kernel_size[0]), wcat=wcat, bias_tok=bias_tok, blocks=blocks, table=table)

    @staticmethod
    def _fast_block(b, h, c_act):
        F = torch.nn.functional
        B, N, H = h.shape
        mod = torch.addmm(b["ada_b"], c_act, b["ada_w"].t()).unsqueeze(1)     # (B, 1, 6H)
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
        a = torch.addcmul(sh1, F.layer_norm(h, (H,), eps=1e-6), sc1)
        qkv = F.linear(a, b["qkv_w"], b["qkv_b"]).view(B, N, 3, b["heads"], H // b["heads"]).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(B, N, H)
        h = torch.addcmul(h, g1, F.linear(o, b["proj_w"], b["proj_b"]))
        a = torch.addcmul(sh2, F.layer_norm(h, (H,), eps=1e-6), sc2)
        m = F.linear(F.gelu(F.linear(a, b["fc1_w"], b["fc1_b"]), approximate="tanh"), b["fc2_w"], b["fc2_b"])
        return torch.addcmul(h, g2, m)

    def _fast_forward(self, plan, h_prev, x, t, t_next, c):
        B, C, S, _ = x.shape
        p = plan["p"]
        g = S // p
        patches = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)
        h = torch.matmul(torch.cat([h_prev.to(patches.dtype), patches], dim=-1), plan["wcat"]).add_(plan["bias_tok"])
        if t_next is not None and plan["table"] is not None:
            c = c + plan["table"][(t - t_next).clamp(0, 1000)].to(c.dtype)
        c_act = torch.nn.functional.silu(c)
        for b in plan["blocks"]:
            h = self._fast_block(b, h, c_act)
        return h

    def draft_condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The conditioning c of a draft step, ``target.embed_condition(t, y)`` (drafter protocol, optional).

        On the inference path (CPU, no autograd, our DiT layout's ``t_embedder`` / ``y_embedder``, timesteps
        0..999) the timestep embedding is a row of a table of the target's embedder over the 1000 training
        timesteps, built once per target weights: one gather instead of a sinusoid and a two-layer MLP per
        draft step.  Equal to ``embed_condition`` up to float rounding; a proposal only has to be the
        distribution it is drawn from, which the caller's c defines for the drafter and the head alike.
        """
        target = self.target
        table = None
        if self.fast_inference and t.device.type == "cpu" and not torch.compiler.is_compiling() \
                and not torch.is_grad_enabled() and not getattr(target, "training", False):
            table = self._timestep_table(target)
        if table is None or t.dtype not in (torch.int64, torch.int32) or t.numel() == 0:
            return target.embed_condition(t, y)
        try:  # index_select checks the range itself (a timestep outside 0..999: the embedder computes it)
            rows = torch.index_select(table, 0, t)
        except (IndexError, RuntimeError):
            return target.embed_condition(t, y)
        ye = target.y_embedder
        if type(ye) is LabelEmbedder:  # sampling never drops labels: the table row itself
            return rows + torch.nn.functional.embedding(y, ye.embedding_table.weight)
        return rows + ye(y, False)

    def _timestep_table(self, target) -> Optional[torch.Tensor]:
        emb = getattr(target, "t_embedder", None)
        if not isinstance(emb, nn.Module) or not isinstance(getattr(target, "y_embedder", None), nn.Module):
            return None
        params = _own_parameters(emb)
        if not params:
            return None
        key = tuple((q.data_ptr(), q._version, q.dtype, str(q.device)) for q in params)
        cached = getattr(self, "_t_table", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.inference_mode(False), torch.no_grad():
            table = emb(torch.arange(1000, device=params[0].device)).contiguous()
        object.__setattr__(self, "_t_table", (key, table))
        return table

    def flops_per_token(self) -> int:
        """Multiply-adds x2 of the drafter's linear layers per token (attention excluded)."""
        H = self.hidden_size
        per_block = 2 * (3 * H * H + H * H + 2 * int(self.mlp_ratio * H) * H)
        return 2 * 2 * H * H + self.depth * per_block  # stride embedding: per sample, not per token

    # ------------------------------------------------------------ save/load
    def config(self) -> dict:
        return dict(format=DRAFTER_FORMAT, hidden_size=self.hidden_size, num_heads=self.num_heads,
                    depth=self.depth, mlp_ratio=self.mlp_ratio, signature=self.signature, stride_conditioning=True)

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
            except (ValueError, RecursionError):
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
        name = base + ".safetensors"
        extra = cfg.get("extra") or {}
        why = training_record_problem(extra) if isinstance(extra, dict) else "not a JSON object"
        if why is not None:
            raise ValueError(f"drafter {name!r}: recorded training setting {why}")
        state, _ = safe_load_safetensors(name, "drafter", device=str(map_location))
        fuse = state.get("fuse.weight")
        hidden = int(fuse.shape[0]) if fuse is not None and fuse.dim() == 2 else None
        why = None
        if hidden is not None:  # sizes against the weights before building: huge claimed ones allocate nothing
            why = (f"hidden_size {cfg.get('hidden_size')!r}, but the weights have {hidden}"
                   if cfg.get("hidden_size") != hidden else blocks_config_problem(cfg, state, hidden))
        if why is not None:
            raise ValueError(f"drafter {name!r} does not match its config: {why}")
        try:
            d = cls(int(cfg["hidden_size"]), int(cfg["num_heads"]), depth=int(cfg["depth"]),
                    mlp_ratio=cfg.get("mlp_ratio", 4.0), signature=cfg.get("signature"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"drafter {name!r}: incomplete config ({e})") from None
        stride_absent = "stride_proj.weight" not in state and not cfg.get("stride_conditioning")
        if stride_absent:  # saved before the stride conditioning existed: it stays zero (the drafter ignores t_next)
            state = dict(state, **{"stride_proj.weight": torch.zeros_like(d.stride_proj.weight)})
        try:
            d.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ValueError(f"drafter {base + '.safetensors'!r} does not match its config: {first}") from None
        d.extra = dict(cfg.get("extra") or {})
        if stride_absent:
            d.extra["stride_conditioning"] = "absent from the file: zero (the drafter ignores the drafted stride)"
        d.to(map_location)
        if target is not None:
            d.attach(target)
        return d


_META_KEY = "free_kernels.drafter_config"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _respacing_problem(r) -> Optional[str]:
    from ..diffusion.respace import space_timesteps

    if not isinstance(r, str) or not r.strip():
        return f"{r!r} is not a respacing string"
    try:
        space_timesteps(1000, r)
    except (ValueError, TypeError, AssertionError) as e:
        return f"{r!r} is not a respacing ({e})"
    return None


def _profile_problem(values) -> Optional[str]:
    if not isinstance(values, list) or not values:
        return "is not a non-empty list"
    bad = [v for v in values if v is not None and not (_number(v) and 0.0 <= v <= 1.0)]
    return None if not bad else f"holds {bad[0]!r}, not an acceptance in [0, 1]"


def training_record_problem(extra: dict) -> Optional[str]:
    """Why the training record saved with a drafter (``extra``: the settings it was trained for, which the
    tools take as their defaults and the draft-length planner as its prior) is unusable, as ``"FIELD = VALUE:
    why"``; None when every recorded setting is one the command-line options accept (absent ones are fine)."""
    from .._checks import cfg_scale_problem

    checks = {
        "cfg_scale": cfg_scale_problem,
        "num_steps": lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= 1
        else "must be an integer >= 1",
        "guidance_channels": lambda v: None if v in (3, 4) and not isinstance(v, bool) else "must be 3 or 4",
        "variance": lambda v: None if v in ("learned", "fixed") else "must be 'learned' or 'fixed'",
        "steps": _respacing_problem,
        "respacings": lambda v: (next((p for p in map(_respacing_problem, v) if p), None)
                                 if isinstance(v, list) and v else "must be a non-empty list of respacings"),
        "acceptance_profile": lambda v: (
            next((f"[{k!r}] " + p if p else f"key {k!r} is not a number of steps"
                  for k, p in ((k, _profile_problem(x)) for k, x in v.items())
                  if p or not (isinstance(k, str) and k.isdigit() and int(k) >= 1)), None)
            if isinstance(v, dict) and v else _profile_problem(v)),
    }
    for key, check in checks.items():
        value = extra.get(key)
        if value is None:
            continue
        why = check(value)
        if why is not None:
            return f"{key} = {value!r}: {why}"[:300]
    return None


_PARAM_SLOTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _own_parameters(module: nn.Module) -> list:
    """``list(module.parameters())`` without walking the module tree on every call: the (submodule, name)
    slots are listed once per module (structure is fixed after construction); reading the slots each time
    still sees a parameter that was replaced.  For the per-draft-step cache keys of the inference path."""
    slots = _PARAM_SLOTS.get(module)
    if slots is None:  # weak references: the table must not keep the module (its key) alive
        slots = _PARAM_SLOTS[module] = [(weakref.ref(m), n) for m in module.modules()
                                        for n, q in m._parameters.items() if q is not None]
    return [r()._parameters[n] for r, n in slots]


def _safetensors_metadata(path: str) -> dict:
    from .._checks import FileProblem

    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # damaged header: name the file
        raise FileProblem(f"drafter {path!r} is damaged or not a .safetensors file ({e})") from None

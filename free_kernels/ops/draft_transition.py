"""Dispatch point of ``draft_transition``: the draft-step epilogue, from drafted features to the next state.

``draft_transition(target, diffusion, h, c, x, index, noise, ...)``: target
head, guidance, DDPM mean / log-variance, x = mean + sigma * noise.  Returns
(x_next, mean, logvar) - what the acceptance step needs.

Backends:

* ``torch``: the reference composition (reference/draft_transition.py:
  ``target.forward_head`` -> guidance -> ``diffusion.transition_from_output``).
* ``cuda`` / ``triton`` (CUDA tensors), ``cpu`` (CPU tensors: the host kernel, see
  ops/draft_epilogue.py): the one-kernel ``draft_epilogue`` op on the head's
  parameters and the diffusion's schedule tables.  The target gives its head
  through the optional part of the target protocol (models/protocol.py:
  ``head_parameters(c)``, where the (G*R, H) x (H, 2H) adaLN GEMM of c runs in
  torch, and ``head_fusion_problem()``); the diffusion gives
  ``schedule_tables()`` (cached here per device), ``learned_variance``,
  ``predicts_xstart`` and ``fused_transition_problem()``.  A target or diffusion
  without them takes the torch backend; an explicit request for a fused one
  raises with the reason.

This module uses only those public names of the objects it is given; it
imports neither the models nor the diffusion.

Static-buffer interface (CUDA-graph capture of a draft step): pass ``index`` as a
device int64 tensor, ``out=(x_next, mean, logvar)`` float32 buffers, and either a
static ``noise`` buffer or ``rng_state`` (int64 [seed, offset] on the device,
advanced in place) with ``noise_out`` to keep the noise; call once before
capture (fills the schedule-table cache and compiles / loads the kernels).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from . import _fused
from .draft_epilogue import cpu_prefers_torch, states_are_f32
from ._dispatch import Backend, Op, get_op, size_class

OP = get_op("draft_transition")
INFO_CTX = dict(H=1152, M=512, PE=16, target_reason=None, diffusion_reason=None)  # DiT-XL/2, batch 1 with CFG
# shape class of the measured priority table: feature rows M = G * R * N (as draft_epilogue)
OP.shape_class = lambda ctx: size_class(ctx["M"], 2048)
OP.host_prefers_torch = cpu_prefers_torch  # the host kernel's limit (draft_epilogue)
OP.inherit_from("draft_epilogue")  # its fused backends run the draft_epilogue kernels: its variable counts


# ------------------------------------------------------------ what the fused backends need of the objects
def head_reason(target) -> Optional[str]:
    """Why the fused epilogue cannot run ``target``'s head (None: it can), from the target protocol."""
    problem = getattr(target, "head_fusion_problem", None)
    if not callable(problem) or not callable(getattr(target, "head_parameters", None)):
        return (f"target {type(target).__name__} does not implement head_parameters(c) / head_fusion_problem() "
                f"(the optional part of the target protocol, free_kernels.models.protocol): the fused epilogue "
                f"cannot read its head (final_layer), which runs through forward_head in torch")
    return problem()


def diffusion_reason(diffusion) -> Optional[str]:
    """Why the fused epilogue cannot compute ``diffusion``'s transition (None: it can)."""
    problem = getattr(diffusion, "fused_transition_problem", None)
    if not callable(problem) or not callable(getattr(diffusion, "schedule_tables", None)):
        return (f"diffusion {type(diffusion).__name__} has no schedule_tables() / fused_transition_problem() "
                f"(GaussianDiffusion's): the fused epilogue cannot read its schedule")
    return problem()


def head_parameters(target, c: torch.Tensor):
    """``target.head_parameters(c)``: (shift, scale, weight, bias, eps) of the head for conditioning c."""
    return target.head_parameters(c)


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def schedule_tables_on(diffusion, device) -> torch.Tensor:
    """``diffusion.schedule_tables()`` (6, T) float32 on ``device``, cached (one H2D copy per device)."""
    per = _TABLES.setdefault(diffusion, {})
    key = str(torch.device(device))
    t = per.get(key)
    if t is None:
        t = per[key] = diffusion.schedule_tables().to(device)
    return t


def epilogue_context(op: Op, target, diffusion, h, c, x, noise, backend: Optional[str]):
    """(dispatch context, head parameters or None) of a call that may run the ``draft_epilogue`` kernels.

    The head's parameters (and with them the adaLN GEMM of c) are computed only where a fused backend
    can be chosen: CUDA tensors, an explicit request, or CPU tensors the host kernel takes (so the torch
    composition, which computes them inside ``forward_head``, never pays for them twice); the chosen
    backend receives them.
    """
    head_why = head_reason(target)
    odd = [f"{n} is {t.dtype}" for n, t in (("x", x), ("noise", noise))
           if torch.is_tensor(t) and t.dtype not in _fused.KERNEL_DTYPES]
    ctx = dict(device=x.device, dtype=h.dtype, H=h.shape[-1], M=h.shape[0] * h.shape[1],
               requires_grad=_fused.needs_grad(h, c, x), target_reason=head_why,
               diffusion_reason=diffusion_reason(diffusion), f32_states=states_are_f32(x, noise),
               mixed=f"{', '.join(odd)}: the kernels read float32 / float16 / bfloat16 states" if odd else None)
    head = None
    if head_why is None:
        p = int(target.patch_size)
        ctx["PE"] = p * p * x.shape[1]
        req = op.requested(backend)
        # CPU tensors: the host kernel when it can run the call as far as is known before the head's weights
        if x.device.type == "cuda" or req not in (None, "torch") or (req is None and op.resolve(ctx).name != "torch"):
            head = target.head_parameters(c)
            ctx["requires_grad"] = _fused.needs_grad(h, c, x, *head[:4])
            if head.weight.dtype != h.dtype:
                ctx["weight_reason"] = f"h is {h.dtype} but the head's weights are {head.weight.dtype}"
    return ctx, head


def fused_supports(name: str):
    """The ``supports`` probe of a fused backend of an op built on ``draft_epilogue``."""
    from .draft_epilogue import OP as OP_TENSOR

    def supports(ctx: dict) -> Optional[str]:
        why = _fused.first_reason(ctx.get("target_reason"), ctx.get("diffusion_reason"), ctx.get("weight_reason"))
        if why is not None:
            return why
        return OP_TENSOR.backends[name].supports(ctx)

    return supports


# ------------------------------------------------------------ backends
def _load_torch():
    from ..reference.draft_epilogue import philox_noise, write_out
    from ..reference.draft_transition import draft_transition as ref

    def f(target, diffusion, h, c, x, index, noise, *, cfg_scale, guidance_channels, clip_denoised,
          rng_state=None, out=None, noise_out=None, head=None):
        if noise is None and torch.compiler.is_compiling() and head_reason(target) is None \
                and diffusion_reason(diffusion) is None:
            # torch.compile: draw the counter-based noise inside the draft_epilogue operator (its torch
            # backend is this composition, bit for bit on float32) instead of a host read traced here
            return _load_fused("torch")()(target, diffusion, h, c, x, index, noise, cfg_scale=cfg_scale,
                                          guidance_channels=guidance_channels, clip_denoised=clip_denoised,
                                          rng_state=rng_state, out=out, noise_out=noise_out, head=head)
        if noise is None:
            noise = philox_noise(rng_state, tuple(x.shape), x.device)
        res = ref(target, diffusion, h, c, x, index, noise, cfg_scale=cfg_scale,
                  guidance_channels=guidance_channels, clip_denoised=clip_denoised,
                  tables=schedule_tables_on(diffusion, x.device))
        if noise_out is not None:
            noise_out.copy_(noise)
        return write_out(out, res)

    return f


def _load_fused(name: str):
    def load():
        from ..reference.guidance import guided_channels
        from .draft_epilogue import draft_epilogue

        def f(target, diffusion, h, c, x, index, noise, *, cfg_scale, guidance_channels, clip_denoised,
              rng_state=None, out=None, noise_out=None, head=None):
            shift, scale, weight, bias, eps = head if head is not None else target.head_parameters(c)
            tables = schedule_tables_on(diffusion, x.device)
            if index.dtype != torch.int64:
                index = index.to(torch.int64)
            return draft_epilogue(h, shift, scale, weight, bias, x, tables, index, noise,
                                  patch_size=int(target.patch_size), cfg_scale=cfg_scale,
                                  guidance_channels=guided_channels(guidance_channels, x.shape[1]),
                                  learned_variance=diffusion.learned_variance, predict_xstart=diffusion.predicts_xstart, clip_denoised=clip_denoised, eps=eps,
                                  rng_state=rng_state, out=out, noise_out=noise_out, backend=name)

        return f

    return load


OP.register(Backend("torch", _load_torch))
for _name in ("triton", "cuda", "cpu"):
    OP.register(Backend(_name, _load_fused(_name), fused_supports(_name)))


def draft_transition(target, diffusion, h, c, x, index, noise, *, cfg_scale: float = 1.0,
                     guidance_channels: int = 3, clip_denoised: bool = False,
                     rng_state: Optional[torch.Tensor] = None, out=None, noise_out: Optional[torch.Tensor] = None,
                     backend: Optional[str] = None):
    """(x_next, mean, logvar) of the drafted transition at respaced ``index`` (R,).

    h, c: (G*R, N, H), (G*R, H) drafted features and conditioning (G = 2 under CFG, rows
    [cond; uncond]); x (R, C, S, S).  ``noise`` (R, C, S, S) or None with ``rng_state`` (see the
    module docstring for the capture interface); ``out`` / ``noise_out`` optional float32 buffers.
    """
    ctx, head = epilogue_context(OP, target, diffusion, h, c, x, noise, backend)
    return OP.resolve(ctx, backend).impl()(target, diffusion, h, c, x, index, noise, cfg_scale=cfg_scale,
                                           guidance_channels=guidance_channels, clip_denoised=clip_denoised,
                                           rng_state=rng_state, out=out, noise_out=noise_out, head=head)


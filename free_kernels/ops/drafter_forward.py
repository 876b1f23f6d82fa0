"""Dispatch points of the drafter-forward op family.

* ``drafter_forward(drafter, h_prev, x, t, y)``: one drafter evaluation (the
  protocol call).  The torch backend calls the drafter module (whose DiT blocks
  reach the fused ``modulated_layernorm`` / ``gated_residual`` / ``bias_gelu``
  kernels through their own dispatch points).
* ``draft_transition(target, diffusion, h, c, x, index, noise, ...)``: the
  draft-step epilogue, from drafted features to the next drafted state: target
  head, guidance, DDPM mean / log-variance, x = mean + sigma * noise.  Returns
  (x_next, mean, logvar) - what the acceptance step needs.  The torch backend
  is the reference composition (reference/draft_transition.py); the ``cuda`` /
  ``triton`` backends gather the head's parameters (the (G*R, H) x (H, 2H)
  adaLN GEMM of c stays in torch) and the diffusion's schedule tables (cached
  per device) and run the one-kernel ``draft_epilogue`` op.
* ``modulated_layernorm`` (own module) is the third member, shared with the DiT blocks.

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
import torch.nn.functional as F

from . import _fused
from ._dispatch import Backend, get_op, size_class

OP_FWD = get_op("drafter_forward")
OP_EPI = get_op("draft_transition")
# shape class of the measured priority table: feature rows M = G * R * N (as draft_epilogue)
OP_EPI.shape_class = lambda ctx: size_class(ctx["M"], 2048)


def _load_torch_fwd():
    def f(drafter, h_prev, x, t, y, **extra):
        return drafter(h_prev, x, t, y, **extra)

    return f


def drafter_extras(drafter, t_next=None, c=None) -> dict:
    """The optional inputs a drafter declares it takes (drafter protocol, ``free_kernels.models.drafter``).

    ``accepts_t_next``: the original timestep of the state being drafted (the
    drafter conditions on the step it drafts); ``accepts_condition``: the
    target's conditioning ``c = embed_condition(t, y)`` of the parent, computed
    once per draft step by the caller instead of again inside the drafter.
    """
    extra = {}
    if t_next is not None and getattr(drafter, "accepts_t_next", False):
        extra["t_next"] = t_next
    if c is not None and getattr(drafter, "accepts_condition", False):
        extra["c"] = c
    return extra


def _load_torch_epi():
    from ..reference.draft_transition import draft_transition as ref

    def f(target, diffusion, h, c, x, index, noise, *, cfg_scale, guidance_channels, clip_denoised,
          rng_state=None, out=None, noise_out=None):
        if noise is None and torch.compiler.is_compiling() and _head_reason(target) is None \
                and _diffusion_reason(diffusion) is None:
            # torch.compile: draw the counter-based noise inside the draft_epilogue operator (its torch
            # backend is this composition, bit for bit on float32) instead of a host read traced here
            return _load_fused_epi("torch")()(target, diffusion, h, c, x, index, noise, cfg_scale=cfg_scale,
                                              guidance_channels=guidance_channels, clip_denoised=clip_denoised,
                                              rng_state=rng_state, out=out, noise_out=noise_out)
        if noise is None:
            from ..reference.draft_epilogue import philox_noise

            noise = philox_noise(rng_state, tuple(x.shape), x.device)
        res = ref(target, diffusion, h, c, x, index, noise, cfg_scale=cfg_scale,
                  guidance_channels=guidance_channels, clip_denoised=clip_denoised)
        if noise_out is not None:
            noise_out.copy_(noise)
        if out is not None:
            for buf, val in zip(out, res):
                buf.copy_(val)
            return tuple(out)
        return res

    return f


# ------------------------------------------------------------ fused epilogue
def head_parameters(target, c: torch.Tensor):
    """(shift, scale, weight, bias, eps) of the target's final layer for conditioning c.

    Knows our DiT (``final_layer``: adaLN_modulation, norm_final, linear) and
    the diffusers adapter (``model.proj_out_1`` / ``norm_out`` / ``proj_out_2``).
    The adaLN GEMM of c runs here, in torch.
    """
    fl = getattr(target, "final_layer", None)
    if fl is not None:
        shift, scale = fl.adaLN_modulation(c).chunk(2, dim=1)
        return shift, scale, fl.linear.weight, fl.linear.bias, float(fl.norm_final.eps)
    m = target.model
    shift, scale = m.proj_out_1(F.silu(c)).chunk(2, dim=1)
    return shift, scale, m.proj_out_2.weight, m.proj_out_2.bias, float(m.norm_out.eps)


def _head_reason(target) -> Optional[str]:
    fl = getattr(target, "final_layer", None)
    if fl is not None:
        if all(hasattr(fl, a) for a in ("adaLN_modulation", "linear", "norm_final")):
            norm = fl.norm_final
        else:
            return f"{type(target).__name__}.final_layer lacks adaLN_modulation / norm_final / linear"
    else:
        m = getattr(target, "model", None)
        if m is None or not all(hasattr(m, a) for a in ("proj_out_1", "proj_out_2", "norm_out")):
            return (f"target {type(target).__name__} has neither a DiT final_layer nor diffusers' "
                    f"proj_out_1 / norm_out / proj_out_2: the fused epilogue does not know its head")
        norm = m.norm_out
    if getattr(norm, "weight", None) is not None:
        return "the head's LayerNorm has an affine weight (the fused epilogue implements the no-affine adaLN head)"
    if not hasattr(norm, "eps"):
        return "the head's norm is not a LayerNorm"
    return None


def _diffusion_reason(diffusion) -> Optional[str]:
    from ..diffusion.gaussian_diffusion import ModelMeanType

    if getattr(diffusion, "model_mean_type", None) not in (ModelMeanType.EPSILON, ModelMeanType.START_X):
        return f"model_mean_type {getattr(diffusion, 'model_mean_type', None)} is not supported (EPSILON, START_X)"
    if not diffusion.learned_variance and diffusion.model_var_type not in getattr(diffusion, "_fixed_var", {}):
        return f"model_var_type {diffusion.model_var_type} is not supported"
    return None


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def schedule_tables_on(diffusion, device) -> torch.Tensor:
    """The (6, T) float32 schedule tables of ``diffusion`` on ``device``, cached (one H2D copy per device)."""
    from ..reference.draft_epilogue import schedule_tables

    per = _TABLES.setdefault(diffusion, {})
    key = str(torch.device(device))
    t = per.get(key)
    if t is None:
        t = per[key] = schedule_tables(diffusion).to(device)
    return t


def _load_fused_epi(name: str):
    def load():
        from ..diffusion.gaussian_diffusion import ModelMeanType
        from .draft_epilogue import draft_epilogue

        def f(target, diffusion, h, c, x, index, noise, *, cfg_scale, guidance_channels, clip_denoised,
              rng_state=None, out=None, noise_out=None):
            shift, scale, weight, bias, eps = head_parameters(target, c)
            tables = schedule_tables_on(diffusion, x.device)
            if index.dtype != torch.int64:
                index = index.to(torch.int64)
            return draft_epilogue(h, shift, scale, weight, bias, x, tables, index, noise,
                                  patch_size=int(target.patch_size), cfg_scale=cfg_scale,
                                  guidance_channels=guidance_channels, learned_variance=diffusion.learned_variance,
                                  predict_xstart=diffusion.model_mean_type == ModelMeanType.START_X,
                                  clip_denoised=clip_denoised, eps=eps, rng_state=rng_state, out=out,
                                  noise_out=noise_out, backend=name)

        return f

    return load


def _fused_epi_supports(name: str):
    from .draft_epilogue import OP as OP_TENSOR

    def supports(ctx: dict) -> Optional[str]:
        why = _fused.first_reason(ctx.get("target_reason"), ctx.get("diffusion_reason"), ctx.get("weight_reason"))
        if why is not None:
            return why
        return OP_TENSOR.backends[name].supports(ctx)

    return supports


OP_FWD.register(Backend("torch", _load_torch_fwd))
OP_EPI.register(Backend("torch", _load_torch_epi))
for _name in ("triton", "cuda"):
    OP_EPI.register(Backend(_name, _load_fused_epi(_name), _fused_epi_supports(_name)))


def drafter_forward(drafter, h_prev: torch.Tensor, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                    t_next: Optional[torch.Tensor] = None, c: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """h = drafter(h_prev, x, t, y); ``t_next`` / ``c`` are passed only to drafters that declare them."""
    ctx = dict(device=x.device, dtype=x.dtype, drafter=type(drafter).__name__)
    h = OP_FWD.resolve(ctx, backend).impl()(drafter, h_prev, x, t, y, **drafter_extras(drafter, t_next, c))
    if not torch.is_tensor(h) or h.shape != h_prev.shape:
        raise ValueError(
            f"drafter returned {tuple(h.shape) if torch.is_tensor(h) else type(h).__name__}, expected features "
            f"of shape {tuple(h_prev.shape)} (drafter protocol: h = drafter(h_prev, x, t, y))"
        )
    return h


def draft_transition(target, diffusion, h, c, x, index, noise, *, cfg_scale: float = 1.0,
                     guidance_channels: int = 3, clip_denoised: bool = False,
                     rng_state: Optional[torch.Tensor] = None, out=None, noise_out: Optional[torch.Tensor] = None,
                     backend: Optional[str] = None):
    """(x_next, mean, logvar) of the drafted transition at respaced ``index`` (R,).

    ``noise`` (R, C, S, S) or None with ``rng_state`` (see the module docstring
    for the capture interface); ``out`` / ``noise_out`` optional float32 buffers.
    """
    head_why = _head_reason(target)
    params = _head_params(target) if head_why is None else []
    odd = [f"{n} is {t.dtype}" for n, t in (("x", x), ("noise", noise))
           if torch.is_tensor(t) and t.dtype not in _fused.KERNEL_DTYPES]
    ctx = dict(device=x.device, dtype=h.dtype, H=h.shape[-1], M=h.shape[0] * h.shape[1],
               requires_grad=_fused.needs_grad(h, c, x, *params),
               target_reason=head_why, diffusion_reason=_diffusion_reason(diffusion),
               mixed=f"{', '.join(odd)}: the kernels read float32 / float16 / bfloat16 states" if odd else None)
    if head_why is None:
        p = int(target.patch_size)
        ctx["PE"] = p * p * x.shape[1]
        if params[-2].dtype != h.dtype:
            ctx["weight_reason"] = f"h is {h.dtype} but the head's weights are {params[-2].dtype}"
    return OP_EPI.resolve(ctx, backend).impl()(target, diffusion, h, c, x, index, noise, cfg_scale=cfg_scale,
                                               guidance_channels=guidance_channels, clip_denoised=clip_denoised,
                                               rng_state=rng_state, out=out, noise_out=noise_out)


def _head_params(target):
    """[adaLN weight, adaLN bias, linear weight, linear bias] of a head that ``_head_reason`` accepted."""
    fl = getattr(target, "final_layer", None)
    if fl is not None:
        ada = fl.adaLN_modulation[-1]
        return [ada.weight, ada.bias, fl.linear.weight, fl.linear.bias]
    m = target.model
    return [m.proj_out_1.weight, m.proj_out_1.bias, m.proj_out_2.weight, m.proj_out_2.bias]

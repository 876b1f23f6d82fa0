"""Dispatch point of ``verify_transition``: the target's own transition of the states it verified.

``verify_transition(target, diffusion, h, c, x, index, *, cfg_scale, guidance_channels,
clip_denoised, out=None, backend=None) -> (mean, logvar)``

h, c (G*R, N, H), (G*R, H): the target's top-block features and conditioning
of the R verified states x (R, C, S, S) (G = 2 under CFG: rows [cond; uncond]);
index (R,) int64 respaced indices.  Returns the float32 mean and log-variance
(R, C, S, S) of the target's reverse transition from each state: head,
guidance, DDPM transition - what the baseline computes with
``diffusion.transition_from_output`` on the guided ``forward_with_cfg`` output.
``out=(mean, logvar)``: float32 buffers written in place (any strides).

Backends:

* ``torch``: reference/verify_transition.py (bit for bit the baseline's
  transition on the CPU in float32), with the schedule tables cached on the
  device (no host copy: CUDA-graph capture and torch.compile see device tensors only).
* ``cuda`` / ``triton``: the ``draft_epilogue`` kernels on the head's parameters
  (``target.head_parameters(c)``), the diffusion's schedule tables and a zero
  noise buffer.  The kernels compute the mean and log-variance from h, x and the
  tables alone - the noise enters only x_next = mean + exp(logvar / 2) * noise,
  which is discarded here - so the two outputs are exactly what the draft side's
  epilogue computes for the same rows, within the kernels' tolerance of the
  torch reference (the ``draft_epilogue`` tests' flash-attention rule).
  Targets or diffusions that lack the protocol's fused-head part take ``torch``
  (see ops/draft_transition.py).

Like ``draft_transition`` this op takes a target and a diffusion, Python objects
that an operator schema cannot carry, so it is a module-level dispatch point and
not a ``torch.library`` operator; its fused backends run the
``torch.ops.free_kernels.draft_epilogue`` operator.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._checks import check_tensor
from ._dispatch import Backend, get_op, size_class
from .draft_transition import epilogue_context, fused_supports, schedule_tables_on

OP = get_op("verify_transition")
# shape class of the measured priority table: feature rows M = G * R * N (as draft_epilogue)
OP.shape_class = lambda ctx: size_class(ctx["M"], 2048)
OP.inherit_from("draft_epilogue")  # its fused backends run the draft_epilogue kernels: its variable counts


def _load_torch():
    from ..reference.draft_epilogue import write_out
    from ..reference.verify_transition import verify_transition as ref

    def f(target, diffusion, h, c, x, index, *, cfg_scale, guidance_channels, clip_denoised, out=None,
          head=None):
        res = ref(target, diffusion, h, c, x, index, cfg_scale=cfg_scale, guidance_channels=guidance_channels,
                  clip_denoised=clip_denoised, tables=schedule_tables_on(diffusion, x.device))
        return write_out(out, res)

    return f


# device -> [(zeros, scratch)] flat float32 buffers, the last the largest.  The fused backends feed the
# draft_epilogue kernel a zero noise and a discarded x_next; allocating and zero-filling them per call
# would add an allocation and a memset to every verification.  Grown buffers are kept (never freed):
# a captured CUDA graph may still address an earlier one.
_SCRATCH: dict = {}


def zero_and_scratch(shape, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """A read-only float32 zero tensor and a write-only float32 scratch tensor of ``shape`` on ``device``."""
    n = 1
    for d in shape:
        n *= int(d)
    if torch.compiler.is_compiling():  # traced: no module state in the graph
        return (torch.zeros(shape, dtype=torch.float32, device=device),
                torch.empty(shape, dtype=torch.float32, device=device))
    bufs = _SCRATCH.setdefault(str(torch.device(device)), [])
    if not bufs or bufs[-1][0].numel() < n:
        size = max(n, 2 * bufs[-1][0].numel()) if bufs else n
        bufs.append((torch.zeros(size, dtype=torch.float32, device=device),
                     torch.empty(size, dtype=torch.float32, device=device)))
    zeros, scratch = bufs[-1]
    return zeros[:n].view(shape), scratch[:n].view(shape)


def _load_fused(name: str):
    def load():
        from .draft_epilogue import draft_epilogue

        def f(target, diffusion, h, c, x, index, *, cfg_scale, guidance_channels, clip_denoised, out=None,
              head=None):
            shift, scale, weight, bias, eps = head if head is not None else target.head_parameters(c)
            if index.dtype != torch.int64:
                index = index.to(torch.int64)
            zero, x_next = zero_and_scratch(tuple(x.shape), x.device)  # x_next (= mean) is discarded
            if out is None:
                out = tuple(torch.empty(x.shape, dtype=torch.float32, device=x.device) for _ in range(2))
            draft_epilogue(h, shift, scale, weight, bias, x, schedule_tables_on(diffusion, x.device), index, zero,
                           patch_size=int(target.patch_size), cfg_scale=cfg_scale,
                           guidance_channels=guidance_channels, learned_variance=diffusion.learned_variance,
                           predict_xstart=diffusion.predicts_xstart, clip_denoised=clip_denoised, eps=eps,
                           out=(x_next, out[0], out[1]), backend=name)
            return tuple(out)

        return f

    return load


OP.register(Backend("torch", _load_torch))
for _name in ("triton", "cuda"):
    OP.register(Backend(_name, _load_fused(_name), fused_supports(_name)))


def _validate(h, c, x, index, out) -> None:
    check_tensor("x", x, dim=4, floating=True)
    R = x.shape[0]
    check_tensor("h", h, dim=3, floating=True, device=x.device)
    if h.shape[0] not in (R, 2 * R):
        raise ValueError(f"h must have R or 2R rows (R = {R} states, 2R under CFG), got {h.shape[0]}")
    check_tensor("c", c, shape=(h.shape[0], h.shape[2]), floating=True, device=x.device)
    check_tensor("index", index, shape=(R,), floating=False, device=x.device)
    if out is not None:
        if len(out) != 2:
            raise ValueError("out must be a tuple (mean, logvar)")
        for name, t in zip(("out[0] (mean)", "out[1] (logvar)"), out):
            check_tensor(name, t, shape=tuple(x.shape), dtype=torch.float32, device=x.device)


def verify_transition(target, diffusion, h: torch.Tensor, c: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
                      *, cfg_scale: float = 1.0, guidance_channels: int = 3, clip_denoised: bool = False,
                      out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                      backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) of the target's transition from the R states ``x`` at respaced ``index`` (R,).

    See the module docstring for shapes, ``out`` and the backends.
    """
    _validate(h, c, x, index, out)
    ctx, head = epilogue_context(OP, target, diffusion, h, c, x, None, backend)
    return OP.resolve(ctx, backend).impl()(target, diffusion, h, c, x, index, cfg_scale=cfg_scale,
                                           guidance_channels=guidance_channels, clip_denoised=clip_denoised,
                                           out=out, head=head)

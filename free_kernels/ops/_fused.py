"""Probes and launch helpers shared by the fused adaLN / drafter ops.

The fused kernels (``modulated_layernorm``, ``gated_residual``, ``bias_gelu``,
``draft_epilogue``) are forward-only: they write through raw pointers and have
no backward.  Their backends therefore refuse calls whose inputs need a
gradient (training the drafter on a GPU falls back to the torch reference
automatically; an explicit request raises with that reason).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _abi
from ._dispatch import dtype_reason, extension_reason, first_reason, triton_reason

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# dtype codes of the csrc entry points: the one ABI enum (_abi.DType = fk::DType in csrc)
CUDA_DTYPE_CODE = _abi._CODE


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def grad_reason(ctx: dict) -> Optional[str]:
    if ctx.get("requires_grad"):
        return ("inputs require grad and the fused kernel is forward-only "
                "(run under torch.no_grad() / inference_mode, or use backend='torch')")
    return None


def capability_reason(ctx: dict) -> Optional[str]:
    dev = torch.device(ctx["device"])
    if dev.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "CUDA is not available to torch (CPU-only build or no driver)"
    return _capability_reason(dev.index if dev.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability_reason(index: int) -> Optional[str]:
    # cached per device: the probes run on every call of a latency-bound draft loop
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return f"the kernels are built for sm_80 / sm_90 only, device has compute capability {major}.{minor}"
    return None


def mixed_dtype_reason(ref: torch.Tensor, **others: Optional[torch.Tensor]) -> Optional[str]:
    """Why the fused kernels cannot take these operands together (they use one dtype), or None.

    The torch reference promotes mixed dtypes (e.g. fp32 residual stream + bf16
    branch); the kernels leave such calls to it instead of raising.
    """
    dt = ref.dtype
    for t in others.values():
        if t is not None and t.dtype != dt:
            break
    else:
        return None  # the common case, without building a message
    bad = [f"{k} is {t.dtype}" for k, t in others.items() if t is not None and t.dtype != ref.dtype]
    if bad:
        return f"mixed dtypes ({', '.join(bad)}, x is {ref.dtype}): the fused kernels take one dtype"
    return None


def triton_supports(ctx: dict, extra: Optional[str] = None) -> Optional[str]:
    return first_reason(triton_reason(ctx), dtype_reason(ctx, KERNEL_DTYPES), ctx.get("mixed"), grad_reason(ctx),
                        extra, capability_reason(ctx))


def cuda_supports(ctx: dict, symbol: str, extra: Optional[str] = None) -> Optional[str]:
    return first_reason(extension_reason(ctx, symbol), dtype_reason(ctx, KERNEL_DTYPES), ctx.get("mixed"),
                        grad_reason(ctx), extra, capability_reason(ctx))


def as_3d(name: str, t: torch.Tensor) -> torch.Tensor:
    """A (B, N, K) VIEW of ``t`` (1-D / 2-D: leading 1s; more dims: leading dims merged when strides allow)."""
    if t.dim() == 3:
        return t
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 1:
        return t.view(1, 1, -1)
    if t.dim() > 3:
        try:
            return t.view(-1, t.shape[-2], t.shape[-1])
        except RuntimeError:
            raise ValueError(f"{name}: leading dimensions of shape {tuple(t.shape)} / strides {t.stride()} "
                             f"cannot be merged into one without a copy") from None
    raise ValueError(f"{name} must have at least 1 dimension, got shape {tuple(t.shape)}")


def on_device(t: torch.Tensor):
    """Context manager making ``t``'s CUDA device current (kernels launch on the current device)."""
    import contextlib

    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def stream_of(t: torch.Tensor) -> int:
    """The launch stream (a module attribute, so the host-emulation tests can stand in stream 0)."""
    return _abi.stream(t)


strides = _abi.strides

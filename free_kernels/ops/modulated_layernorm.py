"""Dispatch point: LayerNorm (no affine) + adaLN modulate, shared by DiT blocks, drafter and head.

``modulated_layernorm(x, shift, scale, *, eps=1e-6, out=None, backend=None)``:
x (B, N, H), shift / scale (B, H) -> LayerNorm(x) * (1 + scale) + shift,
statistics in fp32, one rounding to x's dtype.

Backends: ``cuda`` (csrc/kernels/modulated_layernorm.cu: one warp per token row,
the row held in registers, 16-byte loads when aligned) -> ``triton``
(free_kernels/triton/modulated_layernorm.py: one program per row) -> ``torch``
(the reference: F.layer_norm, then the modulate in the dtype).  Fused backends
are forward-only (see ``_fused``).

Part of the drafter-forward op family.  Bytes (for benchmarks): read x once,
write y once, plus the (B, H) shift/scale: 2 * B * N * H * elem + 2 * B * H * elem.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_tensor
from . import _abi, _fused, _library
from ._dispatch import Backend, get_op, size_class

OP = get_op("modulated_layernorm")
INFO_CTX = dict(H=1152, M=512)
# shape class of the measured priority table: token rows M = B * N per call
SMALL_ROWS = 2048
OP.shape_class = lambda ctx: size_class(ctx["M"], SMALL_ROWS)


def _load_torch():
    from ..reference.modulated_layernorm import modulated_layernorm as f

    return f


OP.register(Backend("torch", _load_torch))


def _h_reason(ctx: dict, limit: int) -> Optional[str]:
    H = ctx.get("H")
    if H is not None and H > limit:
        return f"H {H} > {limit} is not supported"
    return None


def _load_triton():
    from ..triton.modulated_layernorm import modulated_layernorm as f

    return f


def _load_cuda():
    from .. import _env

    ext = _env.extension()

    def modulated_layernorm_cuda(x, shift, scale, eps=1e-6, out=None):
        B, N, H = x.shape
        if out is None:
            out = torch.empty((B, N, H), dtype=x.dtype, device=x.device)
        with _fused.on_device(x):
            ext.modulated_layernorm(x.data_ptr(), shift.data_ptr(), scale.data_ptr(), out.data_ptr(), B, N, H,
                                    float(eps), list(_fused.strides(x, shift, scale, out)),
                                    _abi.dtype_code(x.dtype), _fused.stream_of(x))
        return out

    return modulated_layernorm_cuda


TRITON_MAX_H = 16384  # the triton kernel holds a row in registers


def _triton_supports(ctx: dict) -> Optional[str]:
    return _fused.triton_supports(ctx, _h_reason(ctx, TRITON_MAX_H))


def _cuda_supports(ctx: dict) -> Optional[str]:
    return _fused.cuda_supports(ctx, "modulated_layernorm")


OP.register(Backend("triton", _load_triton, _triton_supports))
OP.register(Backend("cuda", _load_cuda, _cuda_supports))


def _context(x, shift, scale, out=None, requires_grad=False) -> dict:
    B, N, H = x.shape
    return dict(device=x.device, dtype=x.dtype, H=H, M=B * N, requires_grad=requires_grad,
                mixed=_fused.mixed_dtype_reason(x, shift=shift, scale=scale, out=out))


# ---------------------------------------------------------------- torch.ops.free_kernels
def _op_impl(x, shift, scale, eps=1e-6, backend=None):
    return OP.resolve(_context(x, shift, scale), backend).impl()(x, shift, scale, eps=eps, out=None).contiguous()


def _op_fake(x, shift, scale, eps=1e-6, backend=None):
    return x.new_empty(x.shape, dtype=_library.promote(x, shift, scale))


def _op_out_impl(x, shift, scale, out, eps=1e-6, backend=None):
    OP.resolve(_context(x, shift, scale, out), backend).impl()(x, shift, scale, eps=eps, out=out)


def _op_out_fake(x, shift, scale, out, eps=1e-6, backend=None):
    return None


LIB_OP = _library.define(
    "modulated_layernorm", "(Tensor x, Tensor shift, Tensor scale, float eps=1e-06, str? backend=None) -> Tensor",
    _op_impl, _op_fake)
LIB_OP_OUT = _library.define(
    "modulated_layernorm_out",
    "(Tensor x, Tensor shift, Tensor scale, Tensor(a!) out, float eps=1e-06, str? backend=None) -> ()",
    _op_out_impl, _op_out_fake)


def modulated_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, eps: float = 1e-6,
                        out: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    check_tensor("x", x, dim=3, floating=True)
    B, _, H = x.shape
    check_tensor("shift", shift, shape=(B, H), device=x.device)
    check_tensor("scale", scale, shape=(B, H), device=x.device)
    if out is not None:
        check_tensor("out", out, shape=tuple(x.shape), floating=True, device=x.device)
    if _fused.needs_grad(x, shift, scale):  # forward-only kernels: the reference, outside the op
        return OP.resolve(_context(x, shift, scale, out, True), backend).impl()(x, shift, scale, eps=eps, out=out)
    if out is None:
        return (_op_impl if _library.eager(x) else LIB_OP)(x, shift, scale, eps, backend)
    (_op_out_impl if _library.eager(x) else LIB_OP_OUT)(x, shift, scale, out, eps, backend)
    return out

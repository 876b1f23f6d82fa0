"""Dispatch point: the gated residual add of the adaLN-Zero block, ``x + gate[:, None, :] * y``.

``gated_residual(x, gate, y, *, out=None, backend=None)``: x, y (B, N, H), gate
(B, H) -> (B, N, H) in x's dtype.  ``out=x`` updates the residual stream in
place (fused backends: each element is read before it is written by the same
thread; the torch reference computes the result, then copies).

Backends: ``cuda`` (csrc/kernels/gated_residual.cu) -> ``triton``
(free_kernels/triton/gated_residual.py) -> ``torch`` (the reference: exactly
the official block's ``x + gate * y``).
Fused backends compute in fp32 (one fma) and round once; forward-only.

Bytes (for benchmarks): 3 * B * N * H * elem + B * H * elem.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_tensor
from . import _abi, _fused, _library
from ._dispatch import Backend, get_op, size_class

OP = get_op("gated_residual")
INFO_CTX = dict(H=1152, M=512)
# shape class of the measured priority table: token rows M = B * N per call
SMALL_ROWS = 2048
OP.shape_class = lambda ctx: size_class(ctx["M"], SMALL_ROWS)


def _load_torch():
    from ..reference.gated_residual import gated_residual as f

    return f


def _load_triton():
    from ..triton.gated_residual import gated_residual as f

    return f


def _load_cuda():
    from .. import _env

    ext = _env.extension()

    def gated_residual_cuda(x, gate, y, out=None):
        B, N, H = x.shape
        if out is None:
            out = torch.empty((B, N, H), dtype=x.dtype, device=x.device)
        with _fused.on_device(x):
            ext.gated_residual(x.data_ptr(), gate.data_ptr(), y.data_ptr(), out.data_ptr(), B, N, H,
                               list(_fused.strides(x, gate, y, out)), _abi.dtype_code(x.dtype),
                               _fused.stream_of(x))
        return out

    return gated_residual_cuda


OP.register(Backend("torch", _load_torch))
OP.register(Backend("triton", _load_triton, lambda ctx: _fused.triton_supports(ctx)))
OP.register(Backend("cuda", _load_cuda, lambda ctx: _fused.cuda_supports(ctx, "gated_residual")))


def nbytes(B: int, N: int, H: int, elem: int) -> int:
    return (3 * B * N * H + B * H) * elem


def _context(x, gate, y, out=None, requires_grad=False) -> dict:
    B, N, H = x.shape
    return dict(device=x.device, dtype=x.dtype, H=H, M=B * N, requires_grad=requires_grad,
                mixed=_fused.mixed_dtype_reason(x, gate=gate, y=y, out=out))


# ---------------------------------------------------------------- torch.ops.free_kernels
def _op_impl(x, gate, y, backend=None):
    return OP.resolve(_context(x, gate, y), backend).impl()(x, gate, y, out=None).contiguous()


def _op_fake(x, gate, y, backend=None):
    return x.new_empty(x.shape, dtype=_library.promote(x, gate, y))


def _op_out_impl(x, gate, y, out, backend=None):
    OP.resolve(_context(x, gate, y, out), backend).impl()(x, gate, y, out=out)


def _op_out_fake(x, gate, y, out, backend=None):
    return None


LIB_OP = _library.define("gated_residual", "(Tensor x, Tensor gate, Tensor y, str? backend=None) -> Tensor",
                         _op_impl, _op_fake)
# out may be x itself (the residual stream updated in place): every element is read before it is written
LIB_OP_OUT = _library.define("gated_residual_out",
                             "(Tensor x, Tensor gate, Tensor y, Tensor(a!) out, str? backend=None) -> ()",
                             _op_out_impl, _op_out_fake)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, *, out: Optional[torch.Tensor] = None,
                   backend: Optional[str] = None) -> torch.Tensor:
    check_tensor("x", x, dim=3, floating=True)
    B, N, H = x.shape
    check_tensor("gate", gate, shape=(B, H), floating=True, device=x.device)
    check_tensor("y", y, shape=(B, N, H), floating=True, device=x.device)
    if out is not None:
        check_tensor("out", out, shape=(B, N, H), floating=True, device=x.device)
    if _fused.needs_grad(x, gate, y):  # forward-only kernels: the reference, outside the op
        return OP.resolve(_context(x, gate, y, out, True), backend).impl()(x, gate, y, out=out)
    if out is None:
        return (_op_impl if _library.eager(x) else LIB_OP)(x, gate, y, backend)
    (_op_out_impl if _library.eager(x) else LIB_OP_OUT)(x, gate, y, out, backend)
    return out

"""Dispatch point: GELU (tanh approximation) fused as the epilogue of a linear layer.

``bias_gelu(x, bias, *, weight=None, out=None, backend=None)``:

* ``weight=None``: ``gelu_tanh(x + bias)`` for x (..., K), bias (K,);
* ``weight`` (K, K_in) given: ``gelu_tanh(x @ weight.T + bias)`` for x (..., K_in),
  i.e. ``F.gelu(F.linear(x, weight, bias), approximate="tanh")`` - the DiT MLP's
  fc1 + GELU.  The torch reference computes exactly that expression (so the
  DiT's torch path is bit for bit what it was); the fused backends run the GEMM
  WITHOUT bias in torch (cuBLAS) and then the fused bias + GELU kernel in place
  on its output: one elementwise pass instead of the bias epilogue + a
  separate GELU read / write.

``out`` (x's shape; may be x itself when ``weight`` is None) is written in place.

Backends: ``cuda`` (csrc/kernels/bias_gelu.cu) -> ``triton`` (free_kernels/triton/bias_gelu.py)
-> ``torch``.  Fused backends are forward-only (see ``_fused``).

Bytes of the fused epilogue (for benchmarks): 2 * M * K * elem + K * elem.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._checks import check_tensor
from . import _abi, _fused, _library
from ._dispatch import Backend, get_op, size_class

OP = get_op("bias_gelu")
INFO_CTX = dict(K=4608, M=512)
# shape class of the measured priority table: token rows M (all of x's leading dims) per call
SMALL_ROWS = 2048
OP.shape_class = lambda ctx: size_class(ctx["M"], SMALL_ROWS)


def _load_torch():
    from ..reference.bias_gelu import bias_gelu as f

    return f


def _with_gemm(epilogue):
    """Wrap a (x3d, bias, out3d) epilogue launcher into the op's signature."""

    def run(x, bias, weight=None, out=None):
        if weight is not None:
            h = F.linear(x, weight)  # the GEMM alone; bias + GELU fused below, in place
            target = h if out is None else out
            epilogue(_fused.as_3d("x", h), bias, _fused.as_3d("out", target))
            return target
        if out is None:
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        epilogue(_fused.as_3d("x", x), bias, _fused.as_3d("out", out))
        return out

    return run


def _load_triton():
    from ..triton.bias_gelu import bias_gelu

    return _with_gemm(lambda x3, b, o3: bias_gelu(x3, b, out=o3))


def _load_cuda():
    from .. import _env

    ext = _env.extension()

    def epilogue(x3, bias, o3):
        B, N, K = x3.shape
        with _fused.on_device(x3):
            ext.bias_gelu(x3.data_ptr(), bias.data_ptr(), o3.data_ptr(), B, N, K,
                          list(_fused.strides(x3, bias, o3)), _abi.dtype_code(x3.dtype),
                          _fused.stream_of(x3))

    return _with_gemm(epilogue)


OP.register(Backend("torch", _load_torch))
OP.register(Backend("triton", _load_triton, lambda ctx: _fused.triton_supports(ctx)))
OP.register(Backend("cuda", _load_cuda, lambda ctx: _fused.cuda_supports(ctx, "bias_gelu")))


def nbytes(M: int, K: int, elem: int) -> int:
    return (2 * M * K + K) * elem


def _context(x, bias, weight=None, out=None, requires_grad=False) -> dict:
    return dict(device=x.device, dtype=x.dtype, K=bias.shape[0], M=x.numel() // max(x.shape[-1], 1),
                requires_grad=requires_grad, mixed=_fused.mixed_dtype_reason(x, bias=bias, weight=weight, out=out))


def _out_shape(x, bias, weight):
    return (*x.shape[:-1], bias.shape[0]) if weight is not None else tuple(x.shape)


# ---------------------------------------------------------------- torch.ops.free_kernels
def _op_impl(x, bias, weight=None, backend=None):
    return OP.resolve(_context(x, bias, weight), backend).impl()(x, bias, weight=weight, out=None).contiguous()


def _op_fake(x, bias, weight=None, backend=None):
    dt = x.dtype if weight is not None else _library.promote(x, bias)
    return x.new_empty(_out_shape(x, bias, weight), dtype=dt)


def _op_out_impl(x, bias, out, weight=None, backend=None):
    OP.resolve(_context(x, bias, weight, out), backend).impl()(x, bias, weight=weight, out=out)


def _op_out_fake(x, bias, out, weight=None, backend=None):
    return None


LIB_OP = _library.define("bias_gelu", "(Tensor x, Tensor bias, Tensor? weight=None, str? backend=None) -> Tensor",
                         _op_impl, _op_fake)
LIB_OP_OUT = _library.define(
    "bias_gelu_out", "(Tensor x, Tensor bias, Tensor(a!) out, Tensor? weight=None, str? backend=None) -> ()",
    _op_out_impl, _op_out_fake)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, *, weight: Optional[torch.Tensor] = None,
              out: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    check_tensor("x", x, floating=True)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    check_tensor("bias", bias, dim=1, floating=True, device=x.device)
    K = bias.shape[0]
    if weight is not None:
        check_tensor("weight", weight, shape=(K, x.shape[-1]), floating=True, device=x.device)
    elif x.shape[-1] != K:
        raise ValueError(f"bias has {K} elements but x's last dimension is {x.shape[-1]}")
    if out is not None:
        check_tensor("out", out, shape=_out_shape(x, bias, weight), floating=True, device=x.device)
    if _fused.needs_grad(x, bias, weight):  # forward-only kernels: the reference, outside the op
        return OP.resolve(_context(x, bias, weight, out, True), backend).impl()(x, bias, weight=weight, out=out)
    if out is None:
        return (_op_impl if _library.eager(x) else LIB_OP)(x, bias, weight, backend)
    (_op_out_impl if _library.eager(x) else LIB_OP_OUT)(x, bias, out, weight, backend)
    return out

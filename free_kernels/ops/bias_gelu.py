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

Backends: ``cuda`` (csrc/kernels/adaln.cu) -> ``triton`` (free_kernels/triton/adaln.py)
-> ``torch``.  Fused backends are forward-only (see ``_fused``).

Bytes of the fused epilogue (for benchmarks): 2 * M * K * elem + K * elem.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._checks import check_tensor
from . import _fused
from ._dispatch import Backend, get_op

OP = get_op("bias_gelu")
INFO_CTX = dict(K=4608)


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
    from ..triton.adaln import bias_gelu

    return _with_gemm(lambda x3, b, o3: bias_gelu(x3, b, out=o3))


def _load_cuda():
    from .. import _env

    ext = _env.extension()

    def epilogue(x3, bias, o3):
        B, N, K = x3.shape
        with _fused.on_device(x3):
            ext.bias_gelu(x3.data_ptr(), bias.data_ptr(), o3.data_ptr(), B, N, K,
                          list(_fused.strides(x3, bias, o3)), _fused.CUDA_DTYPE_CODE[x3.dtype],
                          _fused.stream_of(x3))

    return _with_gemm(epilogue)


OP.register(Backend("torch", _load_torch))
OP.register(Backend("triton", _load_triton, lambda ctx: _fused.triton_supports(ctx)))
OP.register(Backend("cuda", _load_cuda, lambda ctx: _fused.cuda_supports(ctx, "bias_gelu")))


def nbytes(M: int, K: int, elem: int) -> int:
    return (2 * M * K + K) * elem


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, *, weight: Optional[torch.Tensor] = None,
              out: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    check_tensor("x", x, floating=True)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    check_tensor("bias", bias, dim=1, floating=True, device=x.device)
    K = bias.shape[0]
    if weight is not None:
        check_tensor("weight", weight, shape=(K, x.shape[-1]), floating=True, device=x.device)
        out_shape = (*x.shape[:-1], K)
    else:
        if x.shape[-1] != K:
            raise ValueError(f"bias has {K} elements but x's last dimension is {x.shape[-1]}")
        out_shape = tuple(x.shape)
    if out is not None:
        check_tensor("out", out, shape=out_shape, floating=True, device=x.device)
    ctx = dict(device=x.device, dtype=x.dtype, K=K, requires_grad=_fused.needs_grad(x, bias, weight),
               mixed=_fused.mixed_dtype_reason(x, bias=bias, weight=weight, out=out))
    return OP.resolve(ctx, backend).impl()(x, bias, weight=weight, out=out)

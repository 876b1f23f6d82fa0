"""Dispatch point: batched multi-timestep verification attention.

``verify_attention(qkv, num_heads, *, out=None, backend=None)`` reads the packed
qkv projection (B, N, 3 * heads * head_dim) and returns (B, N, heads * head_dim),
ready for the output projection.  Rows of the batch are independent, so one call
verifies every (sample, draft) row at its own timestep.

FLOPs (for benchmarks): 4 * B * heads * N^2 * head_dim.
"""
from __future__ import annotations

from typing import Optional

import torch

import functools

from .._checks import check_tensor
from . import _abi, _library
from ._fused import grad_reason, needs_grad
from ._dispatch import Backend, dtype_reason, extension_reason, first_reason, get_op, size_class, triton_reason

OP = get_op("verify_attention")
# shape class of the measured priority table: tokens per call B * N (launch / occupancy bound at or below)
SMALL_TOKENS = 8192
OP.shape_class = lambda ctx: size_class(ctx["B"] * ctx["N"], SMALL_TOKENS)


def _load_torch():
    from ..reference.verify_attention import verify_attention as f

    return f


OP.register(Backend("torch", _load_torch))

MAX_HEAD_DIM_TRITON = 256
MAX_HEAD_DIM_CUDA = 128
CUDA_DTYPES = (torch.float16, torch.bfloat16)


def _capability_reason(ctx: dict, what: str) -> Optional[str]:
    dev = torch.device(ctx["device"])
    if dev.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "CUDA is not available to torch (CPU-only build or no driver)"
    major, minor = _capability(dev.index if dev.index is not None else torch.cuda.current_device())
    if major < 8:
        return f"{what} needs compute capability >= 8.0 (mma.sync bf16 / cp.async), device has {major}.{minor}"
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


def _head_dim_reason(ctx: dict, limit: int) -> Optional[str]:
    hd = ctx.get("head_dim")
    if hd is not None and hd > limit:
        return f"head_dim {hd} > {limit} is not supported"
    return None


# ---------------------------------------------------------------- triton
def _triton_supports(ctx: dict) -> Optional[str]:
    from .. import _env

    why = first_reason(
        grad_reason(ctx),
        triton_reason(ctx),
        dtype_reason(ctx, (torch.float16, torch.bfloat16, torch.float32)),
        _head_dim_reason(ctx, MAX_HEAD_DIM_TRITON),
    )
    if why is not None or _env.triton_interpret():
        return why  # the interpreter runs everything (bf16 is converted to fp32 after loading)
    if torch.device(ctx["device"]).type == "cuda" and ctx.get("dtype") == torch.float32:
        return ("float32 CUDA tensors are left to torch: Triton's IEEE fp32 dot spills registers at every "
                "tile size (the kernel's fp32 path is for the CPU interpreter)")
    return _capability_reason(ctx, "the triton kernel")


def _load_triton():
    from ..triton.verify_attention import verify_attention as f

    return f


OP.register(Backend("triton", _load_triton, _triton_supports))


# ---------------------------------------------------------------- cuda (csrc)
def _cuda_supports(ctx: dict) -> Optional[str]:
    why = first_reason(
        grad_reason(ctx),
        extension_reason(ctx, "verify_attention"),
        dtype_reason(ctx, CUDA_DTYPES),
        _head_dim_reason(ctx, MAX_HEAD_DIM_CUDA),
    )
    return why if why is not None else _capability_reason(ctx, "the cuda kernel")


def _load_cuda():
    from .. import _env

    ext = _env.extension()

    def verify_attention_cuda(qkv: torch.Tensor, num_heads: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = qkv.shape
        head_dim = C // (3 * num_heads)
        if out is None:
            out = torch.empty((B, N, num_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
        dev = qkv.device
        if dev.index is not None and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                return verify_attention_cuda(qkv, num_heads, out)
        ext.verify_attention(qkv.data_ptr(), out.data_ptr(), B, N, num_heads, head_dim,
                             *qkv.stride(), *out.stride(), _abi.dtype_code(qkv.dtype), _abi.stream(qkv))
        return out

    return verify_attention_cuda


OP.register(Backend("cuda", _load_cuda, _cuda_supports))


def flops(B: int, N: int, heads: int, head_dim: int) -> int:
    return 4 * B * heads * N * N * head_dim


def _validate(qkv, num_heads, out):
    check_tensor("qkv", qkv, dim=3, floating=True)
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if qkv.shape[-1] % (3 * num_heads):
        raise ValueError(
            f"qkv last dim {qkv.shape[-1]} is not 3 * num_heads * head_dim for num_heads={num_heads}"
        )
    if out is not None:
        B, N, three_d = qkv.shape
        check_tensor("out", out, shape=(B, N, three_d // 3), dtype=qkv.dtype, device=qkv.device)


def _context(qkv: torch.Tensor, num_heads: int, requires_grad: bool = False) -> dict:
    B, N, C = qkv.shape
    return dict(device=qkv.device, dtype=qkv.dtype, head_dim=C // (3 * num_heads), B=B, N=N,
                requires_grad=requires_grad)


# ---------------------------------------------------------------- torch.ops.free_kernels
def _op_impl(qkv, num_heads, backend=None):
    return OP.resolve(_context(qkv, num_heads), backend).impl()(qkv, num_heads, out=None).contiguous()


def _op_fake(qkv, num_heads, backend=None):
    B, N, C = qkv.shape
    return qkv.new_empty((B, N, C // 3))


def _op_out_impl(qkv, num_heads, out, backend=None):
    OP.resolve(_context(qkv, num_heads), backend).impl()(qkv, num_heads, out=out)


def _op_out_fake(qkv, num_heads, out, backend=None):
    return None


LIB_OP = _library.define("verify_attention", "(Tensor qkv, int num_heads, str? backend=None) -> Tensor",
                         _op_impl, _op_fake)
LIB_OP_OUT = _library.define("verify_attention_out",
                             "(Tensor qkv, int num_heads, Tensor(a!) out, str? backend=None) -> ()",
                             _op_out_impl, _op_out_fake)


def verify_attention(qkv: torch.Tensor, num_heads: int, *, out: Optional[torch.Tensor] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Validate, then ``torch.ops.free_kernels.verify_attention[_out]`` (which picks the backend).

    A call that needs a gradient runs the torch reference here (the fused kernels are forward-only;
    an explicit fused request then raises with that reason).
    """
    _validate(qkv, num_heads, out)
    if needs_grad(qkv):
        return OP.resolve(_context(qkv, num_heads, True), backend).impl()(qkv, num_heads, out=out)
    if out is None:
        return (_op_impl if _library.eager(qkv) else LIB_OP)(qkv, num_heads, backend)
    (_op_out_impl if _library.eager(qkv) else LIB_OP_OUT)(qkv, num_heads, out, backend)
    return out

"""Triton kernels of the adaLN block: modulated LayerNorm, gated residual add, bias + GELU.

All three are memory-bound one-pass kernels over (B, N, K) tensors with any
strides (64-bit row offsets), computing in fp32 and rounding once on the store:

* ``modulated_layernorm``: ONE program per token row.  The whole row is held in
  registers (``BLOCK_H`` = next power of two >= H, masked), so the statistics
  are the exact two-pass ones (mean, then the mean of squared deviations, fp32)
  and x is read once.  ``y = (x - mean) * rstd * (1 + scale) + shift`` with the
  row's (B, H) shift / scale.  Bytes: 2 * B*N*H*elem + 2 * B*H*elem.
* ``gated_residual``: ``out = x + gate[b] * y``; grid (token rows, H / BLOCK).
  ``out`` may be ``x`` (each element is read before it is written by the same
  program).  Bytes: 3 * B*N*H*elem + B*H*elem.
* ``bias_gelu``: ``out = gelu_tanh(x + bias)``; grid (rows, K / BLOCK); in place
  allowed.  GELU's ``0.5 * (1 + tanh(u))`` is evaluated as ``sigmoid(2u) =
  1 / (1 + exp(-2u))`` (the same function, no cancellation near u = 0, exp
  overflow gives the right limit 0), the form csrc/include/free_kernels/adaln_math.h
  uses too.  Bytes: 2 * M*K*elem + K*elem.

Under ``TRITON_INTERPRET=1`` every load is converted to fp32 right away (the
interpreter cannot do bf16 arithmetic), which these kernels do anyway.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._env import triton_interpret

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_H = 16384          # modulated_layernorm: the row lives in registers
ELEMENTWISE_BLOCK = 1024


@triton.jit
def _gelu_tanh(z):
    """0.5 z (1 + tanh(c (z + 0.044715 z^3))) == z / (1 + exp(-2 c (z + 0.044715 z^3))).

    The exponent is capped at 88 (exp(88) ~ 1.7e38, still finite in fp32): for
    z << 0 the result is then ~1e-37 instead of -0, and the CPU interpreter
    (numpy) raises no overflow warnings.
    """
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    return z / (1.0 + tl.exp(tl.minimum(-2.0 * u, 88.0)))


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _modulated_layernorm_kernel(
    X, SHIFT, SCALE, OUT, N, H, eps,
    s_xb, s_xn, s_xh, s_sb, s_sh, s_cb, s_ch, s_ob, s_on, s_oh,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // N).to(tl.int64)
    n = (row % N).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(X + b * s_xb + n * s_xn + offs * s_xh, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / H
    d = tl.where(mask, x - mean, 0.0)
    var = tl.sum(d * d, axis=0) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    sh = tl.load(SHIFT + b * s_sb + offs * s_sh, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(SCALE + b * s_cb + offs * s_ch, mask=mask, other=0.0).to(tl.float32)
    y = (d * rstd) * (1.0 + sc) + sh
    tl.store(OUT + b * s_ob + n * s_on + offs * s_oh, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_kernel(
    X, GATE, Y, OUT, N, H,
    s_xb, s_xn, s_xh, s_gb, s_gh, s_yb, s_yn, s_yh, s_ob, s_on, s_oh,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // N).to(tl.int64)
    n = (row % N).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(X + b * s_xb + n * s_xn + offs * s_xh, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + b * s_gb + offs * s_gh, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + b * s_yb + n * s_yn + offs * s_yh, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + b * s_ob + n * s_on + offs * s_oh, (x + g * y).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_kernel(
    X, BIAS, OUT, N, K,
    s_xb, s_xn, s_xk, s_bk, s_ob, s_on, s_ok,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // N).to(tl.int64)
    n = (row % N).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(X + b * s_xb + n * s_xn + offs * s_xk, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(BIAS + offs * s_bk, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + b * s_ob + n * s_on + offs * s_ok, _gelu_tanh(x + bias).to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers
def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton {name} supports {SUPPORTED_DTYPES}, got {t.dtype}")


def _grid_rows(rows: int) -> int:
    # program_id(0) is limited to 2**31 - 1 programs; rows beyond that are not a DiT size
    if rows >= 2 ** 31:
        raise ValueError(f"{rows} token rows: the triton kernels launch one program per row (< 2**31)")
    return rows


def _ln_warps(block_h: int) -> int:
    return 1 if triton_interpret() else (4 if block_h <= 2048 else 8 if block_h <= 8192 else 16)


def modulated_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (B, N, H), shift / scale (B, H), any strides; ``out`` (B, N, H) written in place when given."""
    _check_dtype("modulated_layernorm", x)
    B, N, H = x.shape
    if H > MAX_H:
        raise ValueError(f"triton modulated_layernorm holds a row in registers: H {H} > {MAX_H}")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if B * N == 0 or H == 0:
        return out
    block_h = max(16, triton.next_power_of_2(H))
    _modulated_layernorm_kernel[(_grid_rows(B * N),)](
        x, shift, scale, out, N, H, float(eps),
        *x.stride(), *shift.stride(), *scale.stride(), *out.stride(),
        BLOCK_H=block_h, num_warps=_ln_warps(block_h),
    )
    return out


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out = x + gate[:, None, :] * y; x, y, out (B, N, H), gate (B, H), any strides (out may be x)."""
    _check_dtype("gated_residual", x)
    B, N, H = x.shape
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if B * N == 0 or H == 0:
        return out
    block = min(ELEMENTWISE_BLOCK, max(16, triton.next_power_of_2(H)))
    grid = (_grid_rows(B * N), triton.cdiv(H, block))
    _gated_residual_kernel[grid](
        x, gate, y, out, N, H, *x.stride(), *gate.stride(), *y.stride(), *out.stride(),
        BLOCK=block, num_warps=1 if triton_interpret() else 4,
    )
    return out


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out = gelu_tanh(x + bias) for x (B, N, K) (any strides), bias (K,); out may be x."""
    _check_dtype("bias_gelu", x)
    B, N, K = x.shape
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if B * N == 0 or K == 0:
        return out
    block = min(ELEMENTWISE_BLOCK, max(16, triton.next_power_of_2(K)))
    grid = (_grid_rows(B * N), triton.cdiv(K, block))
    _bias_gelu_kernel[grid](
        x, bias, out, N, K, *x.stride(), bias.stride(0), *out.stride(),
        BLOCK=block, num_warps=1 if triton_interpret() else 4,
    )
    return out

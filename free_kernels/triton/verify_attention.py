"""Triton kernel: non-causal multi-head attention straight from the packed qkv projection.

One program computes ``BLOCK_M`` query rows of one (batch row, head) pair with a
flash-attention style online softmax over key blocks of ``BLOCK_N``.  The kernel
reads q, k and v IN PLACE from ``qkv`` (B, N, 3 * heads * head_dim) through its
three strides (so a slice of a bigger tensor needs no copy) and writes
(B, N, heads * head_dim) through the strides of ``out``: no split, transpose or
contiguous copies on either side, unlike torch SDPA.

Head dim that is not a power of two (DiT-XL: 72).  ``tl.arange`` and ``tl.dot``
need power-of-two extents, so the head dim is covered by at most two chunks:

* ``D0`` = the largest power of two <= head_dim (at least 16, the smallest dot K),
* ``D1`` = the remainder rounded up to a power of two (at least 16), or 0.

72 = 64 + 8 is therefore computed as 64 + 16 = 80 columns instead of padding to
128: 1.6x less wasted tensor-core work in both GEMMs and 40% fewer accumulator
registers.  Padded columns are loaded as zeros (masked loads), so they add
nothing to q.k and produce columns that are never stored.  The split is chosen
only when it beats plain padding (72 -> 80 < 128, 96 -> 96 < 128, but 100 ->
64 + 64 = 128 = padding); ``config={"split": False}`` forces the padded single
chunk so a GPU benchmark can compare both.

Sequence masking: query rows >= N are loaded as zeros and never stored; key
blocks are walked without masks up to the last full block, then one masked
tail block (keys >= N get -inf scores, their k/v rows load as zeros so that
0 * garbage can never produce NaN).

Precision: fp16 / bf16 operands feed ``tl.dot`` natively with fp32
accumulation, the softmax statistics are fp32, the probabilities are rounded to
the input dtype for the P @ V product (the flash-attention rule).  fp32 inputs
use ``input_precision="ieee"`` (no TF32) so the result matches the fp32
reference.  Under ``TRITON_INTERPRET=1`` (CPU) bf16 tiles are converted to
fp32 right after loading, since the interpreter cannot do bf16 arithmetic.

FLOPs: 4 * B * heads * N^2 * head_dim (see ``free_kernels.ops.verify_attention.flops``).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._env import triton_interpret

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _load_tile(base, rows, cols, s_row, s_col, row_lim, col_lim,
               MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr, UPCAST: tl.constexpr):
    """Load base[rows, cols] (rows x cols tile) with zeros outside the limits."""
    ptrs = base + rows[:, None] * s_row + cols[None, :] * s_col
    if MASK_ROWS and MASK_COLS:
        t = tl.load(ptrs, mask=(rows[:, None] < row_lim) & (cols[None, :] < col_lim), other=0.0)
    elif MASK_ROWS:
        t = tl.load(ptrs, mask=rows[:, None] < row_lim, other=0.0)
    elif MASK_COLS:
        t = tl.load(ptrs, mask=cols[None, :] < col_lim, other=0.0)
    else:
        t = tl.load(ptrs)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _kv_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, start_n, N, s_qn, s_qc, qk_scale,
              HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
              MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK_N: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              SCALE_Q: tl.constexpr):
    """Fold one block of BLOCK_N keys into the running (acc, m, l) of the query tile."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    # k loaded transposed, (D, BLOCK_N), so q @ kT needs no in-register transpose
    kt0 = _load_tile(k_base, offs_d0, offs_n, s_qc, s_qn, HEAD_DIM, N, MASK_D0, MASK_N, UPCAST)
    qk = tl.dot(q0, kt0, input_precision=INPUT_PRECISION)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        kt1 = _load_tile(k_base, offs_d1, offs_n, s_qc, s_qn, HEAD_DIM, N, MASK_D1, MASK_N, UPCAST)
        qk = tl.dot(q1, kt1, qk, input_precision=INPUT_PRECISION)
    # scores in log2 units: exp(s * scale) == exp2(s * scale * log2(e)); fp32
    # tiles had the scale folded into q already (the reference's order)
    if not SCALE_Q:
        qk = qk * qk_scale
    if MASK_N:
        qk = tl.where(offs_n[None, :] < N, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v0 = _load_tile(v_base, offs_n, offs_d0, s_qn, s_qc, N, HEAD_DIM, MASK_N, MASK_D0, UPCAST)
    p = p.to(v0.dtype)
    acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=INPUT_PRECISION)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        v1 = _load_tile(v_base, offs_n, offs_d1, s_qn, s_qc, N, HEAD_DIM, MASK_N, MASK_D1, UPCAST)
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=INPUT_PRECISION)
    return acc0, acc1, m_new, l_i


@triton.jit
def _verify_attention_fwd(
    QKV, OUT, N, HEADS, num_m_blocks, qk_scale,
    s_qb, s_qn, s_qc, s_ob, s_on, s_oc,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, SCALE_Q: tl.constexpr,
):
    # 1-D grid, query blocks of one (b, h) adjacent so their k/v stay in L2
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    pid_bh = pid // num_m_blocks
    b = pid_bh // HEADS
    h = pid_bh % HEADS
    # 64-bit offsets (a slice of a big tensor can exceed 2^31 elements); built
    # from tensors because HEADS / strides equal to 1 arrive as constexprs
    b64 = b.to(tl.int64)
    col64 = (h * HEAD_DIM).to(tl.int64)
    part64 = b64 * 0 + HEADS * HEAD_DIM  # distance from q to k (and k to v) in columns
    q_base = QKV + b64 * s_qb + col64 * s_qc
    k_base = q_base + part64 * s_qc
    v_base = k_base + part64 * s_qc
    o_base = OUT + b64 * s_ob + col64 * s_oc

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, D0)
    q0 = _load_tile(q_base, offs_m, offs_d0, s_qn, s_qc, N, HEAD_DIM, True, MASK_D0, UPCAST)
    if SCALE_Q:
        q0 = q0 * qk_scale
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        q1 = _load_tile(q_base, offs_m, offs_d1, s_qn, s_qc, N, HEAD_DIM, True, MASK_D1, UPCAST)
        if SCALE_Q:
            q1 = q1 * qk_scale
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    else:  # placeholders, never read
        q1 = q0
        acc1 = acc0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc0, acc1, m_i, l_i = _kv_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, start_n, N,
                                         s_qn, s_qc, qk_scale, HEAD_DIM, D0, D1, MASK_D0, MASK_D1,
                                         BLOCK_N, False, UPCAST, INPUT_PRECISION, SCALE_Q)
    if n_full < N:
        acc0, acc1, m_i, l_i = _kv_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, n_full, N,
                                         s_qn, s_qc, qk_scale, HEAD_DIM, D0, D1, MASK_D0, MASK_D1,
                                         BLOCK_N, True, UPCAST, INPUT_PRECISION, SCALE_Q)

    inv_l = 1.0 / l_i
    row_ok = offs_m[:, None] < N
    o_ptrs = o_base + offs_m[:, None] * s_on + offs_d0[None, :] * s_oc
    o0 = (acc0 * inv_l[:, None]).to(OUT.dtype.element_ty)
    if MASK_D0:
        tl.store(o_ptrs, o0, mask=row_ok & (offs_d0[None, :] < HEAD_DIM))
    else:
        tl.store(o_ptrs, o0, mask=row_ok)
    if D1 > 0:
        o_ptrs1 = o_base + offs_m[:, None] * s_on + offs_d1[None, :] * s_oc
        o1 = (acc1 * inv_l[:, None]).to(OUT.dtype.element_ty)
        if MASK_D1:
            tl.store(o_ptrs1, o1, mask=row_ok & (offs_d1[None, :] < HEAD_DIM))
        else:
            tl.store(o_ptrs1, o1, mask=row_ok)


# ----------------------------------------------------------------------------- host side
def _pow2_floor(x: int) -> int:
    return 1 << (x.bit_length() - 1)


def split_head_dim(head_dim: int, split: bool = True) -> Tuple[int, int]:
    """(D0, D1): the power-of-two chunks covering ``head_dim`` (D1 = 0: one chunk).

    >>> split_head_dim(72), split_head_dim(64), split_head_dim(128), split_head_dim(72, split=False)
    ((64, 16), (64, 0), (128, 0), (128, 0))
    """
    if head_dim < 1 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} outside 1..{MAX_HEAD_DIM}")
    padded = max(16, triton.next_power_of_2(head_dim))
    if not split:
        return padded, 0
    d0 = max(16, _pow2_floor(head_dim))
    rest = head_dim - d0
    if rest <= 0:
        return d0, 0
    d1 = max(16, triton.next_power_of_2(rest))
    if d0 + d1 >= padded:
        return padded, 0
    return d0, d1


# Block sizes, measure-free starting points keyed on the padded head width and
# the dtype: (max padded width, BLOCK_M, BLOCK_N, num_warps, num_stages).
# Checked offline (triton.compile for sm_80 / sm_90 + cuobjdump, see the tests)
# to compile without register spills for head dims 64, 72 (split 64+16) and
# 128 in fp16/bf16; the GPU benchmark sweeps alternatives via ``config=``.
_HALF_CONFIGS = (
    (128, 128, 64, 8, 3),
    (256, 32, 32, 4, 2),
)
# fp32 on a GPU goes through Triton's FMA (IEEE) dot, which spills heavily at
# any tile size; the op's dispatcher therefore leaves fp32 CUDA tensors to
# torch and this row only serves direct calls.
_FP32_CONFIGS = (
    (256, 32, 32, 4, 1),
)
# interpreter: one small config (no autotune there); 32 keeps several key
# blocks plus a masked tail in the tests' sizes.
_INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, num_warps=1, num_stages=1)


def pick_config(head_dim: int, dtype: torch.dtype, interpret: Optional[bool] = None) -> Dict:
    """Launch configuration from the table (plus the head-dim split)."""
    if interpret is None:
        interpret = triton_interpret()
    d0, d1 = split_head_dim(head_dim)
    cfg = dict(split=True)
    if interpret:
        cfg.update(_INTERPRET_CONFIG)
        return cfg
    table = _FP32_CONFIGS if dtype == torch.float32 else _HALF_CONFIGS
    width = d0 + d1
    for max_w, bm, bn, warps, stages in table:
        if width <= max_w:
            cfg.update(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
            return cfg
    raise ValueError(f"head_dim {head_dim} too large")


def launch_meta(head_dim: int, dtype: torch.dtype, interpret: bool,
                config: Optional[Dict] = None) -> Tuple[Dict, Dict]:
    """(constexpr arguments of the kernel, launch config) for one call shape."""
    cfg = pick_config(head_dim, dtype, interpret)
    if config:
        cfg.update(config)
    d0, d1 = split_head_dim(head_dim, cfg["split"])
    upcast = bool(interpret and dtype == torch.bfloat16)
    meta = dict(
        HEAD_DIM=head_dim, D0=d0, D1=d1, MASK_D0=d0 > head_dim, MASK_D1=d0 + d1 > head_dim,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        UPCAST=upcast, INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        # fp32 tiles (fp32 inputs, bf16 upcast under the interpreter): scale q once,
        # as the reference does; half tiles keep exact q and scale the fp32 scores
        SCALE_Q=dtype == torch.float32 or upcast,
    )
    return meta, cfg


def verify_attention(qkv: torch.Tensor, num_heads: int, out: Optional[torch.Tensor] = None, *,
                     config: Optional[Dict] = None) -> torch.Tensor:
    """Attention over packed qkv (B, N, 3 * heads * head_dim) -> (B, N, heads * head_dim).

    ``out`` (any strides) is written in place when given.  ``config`` overrides
    entries of :func:`pick_config` (BLOCK_M, BLOCK_N, num_warps, num_stages,
    split) for benchmarking.
    """
    B, N, C = qkv.shape
    if C % (3 * num_heads):
        raise ValueError(f"qkv last dim {C} is not divisible by 3 * num_heads ({3 * num_heads})")
    head_dim = C // (3 * num_heads)
    if qkv.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton verify_attention supports {SUPPORTED_DTYPES}, got {qkv.dtype}")
    if out is None:
        out = torch.empty((B, N, num_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    if B == 0 or N == 0:
        return out
    # offsets inside one batch row are computed in 32 bits (batch offsets in 64)
    row_span = max((N - 1) * qkv.stride(1) + (C - 1) * qkv.stride(2),
                   (N - 1) * out.stride(1) + (out.shape[2] - 1) * out.stride(2))
    if row_span >= 2**31:
        raise ValueError(f"one batch row spans {row_span} elements; the triton kernel needs < 2**31")
    interpret = triton_interpret()
    meta, cfg = launch_meta(head_dim, qkv.dtype, interpret, config)
    num_m_blocks = triton.cdiv(N, cfg["BLOCK_M"])
    grid = (num_m_blocks * B * num_heads,)
    _verify_attention_fwd[grid](
        qkv, out, N, num_heads, num_m_blocks, head_dim ** -0.5 * math.log2(math.e),
        qkv.stride(0), qkv.stride(1), qkv.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        **meta, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out

"""Launcher helpers shared by the Triton kernels of the adaLN block's ops
(modulated_layernorm.py, gated_residual.py, bias_gelu.py).

These ops take (B, N, K) tensors of one dtype with any strides and launch one
program per token row (grid axis 0) - at most 2**31 - 1 rows.
"""
from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ELEMENTWISE_BLOCK = 1024  # elements of a row per program of the elementwise kernels


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton {name} supports {SUPPORTED_DTYPES}, got {t.dtype}")


def grid_rows(rows: int) -> int:
    # program_id(0) is limited to 2**31 - 1 programs; rows beyond that are not a DiT size
    if rows >= 2 ** 31:
        raise ValueError(f"{rows} token rows: the triton kernels launch one program per row (< 2**31)")
    return rows

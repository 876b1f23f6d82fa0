"""The pybind ABI of the csrc entry points: one dtype enum, one pointer / stride / stream helper.

Mirrors ``csrc/include/free_kernels/dtype.h`` (``fk::DType``); the extension
exports the C++ values as ``free_kernels._C.dtype_codes()`` and a test checks
that both sides agree.  Every op that calls the extension takes its codes,
pointers and strides from here.
"""
from __future__ import annotations

import enum
from typing import List, Optional

import torch


class DType(enum.IntEnum):
    """Element-type code of a ``dtype_code`` argument (= ``fk::DType``)."""

    FLOAT32 = 0
    FLOAT16 = 1
    BFLOAT16 = 2


TORCH_DTYPE = {torch.float32: DType.FLOAT32, torch.float16: DType.FLOAT16, torch.bfloat16: DType.BFLOAT16}
# plain ints for the hot path (an IntEnum member costs a conversion in pybind)
_CODE = {dt: int(code) for dt, code in TORCH_DTYPE.items()}


def dtype_code(dtype: torch.dtype) -> int:
    """The ``dtype_code`` of a torch dtype; ValueError for a dtype the kernels do not take."""
    try:
        return _CODE[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no csrc dtype code (float32, float16, bfloat16)") from None


def ptr(t: Optional[torch.Tensor]) -> int:
    """Device address of ``t`` (0 = absent optional pointer)."""
    return 0 if t is None else t.data_ptr()


def strides(*tensors: torch.Tensor) -> List[int]:
    """The tensors' strides in elements, concatenated in argument order."""
    out: List[int] = []
    for t in tensors:
        out.extend(t.stride())
    return out


def stream(t: torch.Tensor) -> int:
    """The current CUDA stream of ``t``'s device as an integer handle."""
    return torch.cuda.current_stream(t.device).cuda_stream

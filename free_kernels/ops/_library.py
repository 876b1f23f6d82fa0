"""The ``free_kernels`` operator namespace (``torch.ops.free_kernels.*``).

Each public op is defined here with ``torch.library.Library`` (a schema, one
Python kernel registered for CPU and CUDA that still dispatches among the op's
backends, and a fake implementation), so ``torch.compile`` traces it as one
opaque node and CUDA-graph capture sees only its launches.

Why ``Library.define`` + ``impl`` rather than ``torch.library.custom_op``: on
the CPU, a call through a ``Library`` op costs ~3 us over a direct Python call,
a ``custom_op`` ~15 us (its Python wrapper infers and checks the schema on
every call) - and a draft loop makes ~20 op calls per drafter block.
Both give the same opaque operator to torch.compile and CUDA graphs.

In eager mode the public wrappers call the operator's kernel directly (see
:func:`eager`); torch.compile, fake tensors and dispatch modes go through the
operator.  Ops are forward-only (no autograd formula): the public Python wrappers send
calls that need a gradient to the torch reference directly, outside the op.
Destination-passing variants (``<op>_out``) write caller-provided buffers
(declared ``Tensor(a!)``) and return nothing, which is what static-buffer
CUDA-graph capture needs.  Functional variants return fresh contiguous tensors
(what their fake implementations promise; the torch references may follow an
input's strides, the kernels allocate contiguous outputs).
"""
from __future__ import annotations

from typing import Callable

import torch

NAMESPACE = "free_kernels"
LIB = torch.library.Library(NAMESPACE, "DEF")


def define(name: str, schema: str, impl: Callable, fake: Callable):
    """Define ``free_kernels::<name><schema>`` with ``impl`` for CPU and CUDA tensors; returns the OpOverload."""
    LIB.define(name + schema)
    LIB.impl(name, impl, "CPU")
    LIB.impl(name, impl, "CUDA")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIB)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)


def eager(t: torch.Tensor) -> bool:
    """True when a wrapper may call its operator's kernel directly (same code, no dispatcher round trip).

    That is: not being traced by torch.compile, a plain tensor (not a FakeTensor or other subclass)
    and no TorchDispatchMode active (make_fx, FakeTensorMode, export).  The operator boundary
    costs ~3 us per call for a few arguments and ~20 us for speculative_accept's 23 on the CPU, and
    gives nothing in eager mode: a CUDA graph captures the same launches either way.
    """
    if torch.compiler.is_compiling():
        return False
    return type(t) is torch.Tensor and _dispatch_modes is not None and _dispatch_modes() == 0


def promote(*tensors) -> torch.dtype:
    """The result dtype of the torch references' arithmetic on these operands (None skipped)."""
    dt = None
    for t in tensors:
        if t is None:
            continue
        dt = t.dtype if dt is None else torch.promote_types(dt, t.dtype)
    return dt

"""One dispatch point per op: an ordered list of backends, each able to say why it cannot run.

Order for CUDA tensors: ``cuda`` (the csrc extension) -> ``triton`` -> ``torch``.
CPU tensors take ``torch`` unless a backend is requested explicitly.

A backend is requested by the ``backend=`` argument of the op, by
``FREE_KERNELS_BACKEND_<OP>`` (e.g. ``FREE_KERNELS_BACKEND_VERIFY_ATTENTION=triton``)
or by ``FREE_KERNELS_BACKEND`` for every op.  An explicit request that cannot
run raises :class:`BackendUnavailable` with the reasons; it never silently runs
something else.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

BACKEND_ORDER = ("cuda", "triton", "torch")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the given inputs."""


@dataclass
class Backend:
    """One implementation of an op.

    ``load`` returns the implementation (imported lazily, so that importing
    the package never imports triton or the extension).  ``supports(ctx)``
    returns ``None`` when the backend can run the call described by ``ctx``
    (a dict with at least ``device``), or a reason string.
    """

    name: str
    load: Callable[[], Callable]
    supports: Callable[[dict], Optional[str]] = lambda ctx: None
    _impl: Optional[Callable] = None

    def impl(self) -> Callable:
        if self._impl is None:
            self._impl = self.load()
        return self._impl


@dataclass
class Op:
    name: str
    backends: Dict[str, Backend] = field(default_factory=dict)

    def register(self, backend: Backend) -> None:
        if backend.name not in BACKEND_ORDER:
            raise ValueError(f"unknown backend {backend.name!r}")
        self.backends[backend.name] = backend

    # ------------------------------------------------------------------
    def requested(self, backend: Optional[str]) -> Optional[str]:
        req = backend or os.environ.get(f"FREE_KERNELS_BACKEND_{self.name.upper()}") or os.environ.get(
            "FREE_KERNELS_BACKEND"
        )
        if req in (None, "", "auto"):
            return None
        if req not in BACKEND_ORDER:
            raise ValueError(f"{self.name}: unknown backend {req!r}; choose one of {BACKEND_ORDER} or 'auto'")
        return req

    def reasons(self, ctx: dict) -> Dict[str, Optional[str]]:
        """For each backend in priority order: None if it can run ``ctx``, else why not."""
        out: Dict[str, Optional[str]] = {}
        for name in BACKEND_ORDER:
            b = self.backends.get(name)
            if b is None:
                out[name] = f"{self.name} has no {name} implementation"
                continue
            try:
                out[name] = b.supports(ctx)
            except Exception as e:  # a broken probe must not take the op down
                out[name] = f"probe failed: {type(e).__name__}: {e}"
        return out

    def resolve(self, ctx: dict, backend: Optional[str] = None) -> Backend:
        req = self.requested(backend)
        if req is not None:
            b = self.backends.get(req)
            why = self.reasons(ctx)[req]
            if b is None or why is not None:
                raise BackendUnavailable(f"{self.name}: backend {req!r} was requested but cannot run: {why}")
            return b
        device = ctx.get("device")
        if device is None or torch.device(device).type != "cuda":
            return self.backends["torch"]
        why = self.reasons(ctx)
        for name in BACKEND_ORDER:
            if why[name] is None:
                return self.backends[name]
        raise BackendUnavailable(f"{self.name}: no backend can run: {why}")


OPS: Dict[str, Op] = {}


def get_op(name: str) -> Op:
    if name not in OPS:
        OPS[name] = Op(name)
    return OPS[name]


# -------------------------------------------------------------- common probes
def cuda_tensor_reason(ctx: dict) -> Optional[str]:
    dev = ctx.get("device")
    if dev is None or torch.device(dev).type != "cuda":
        return f"inputs are on {dev}, not a CUDA device"
    return None


def triton_reason(ctx: dict) -> Optional[str]:
    from .. import _env

    why = _env.triton_unavailable_reason()
    if why is not None:
        return why
    dev = ctx.get("device")
    if dev is not None and torch.device(dev).type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available to torch (CPU-only build or no driver)"
    if dev is not None and torch.device(dev).type != "cuda" and not _env.triton_interpret():
        return f"inputs are on {dev} and TRITON_INTERPRET is not set (Triton runs CPU tensors only under the interpreter)"
    if _env.triton_interpret() and ctx.get("dtype") == torch.bfloat16:
        # the interpreter loads bf16 but kernels convert to fp32 right after loading
        return None
    return None


def extension_reason(ctx: dict, symbol: str) -> Optional[str]:
    from .. import _env

    why = cuda_tensor_reason(ctx)
    if why is not None:
        return why
    why = _env.extension_unavailable_reason(symbol)
    return why


def dtype_reason(ctx: dict, allowed: Sequence[torch.dtype]) -> Optional[str]:
    dt = ctx.get("dtype")
    if dt is not None and dt not in allowed:
        return f"dtype {dt} not supported (supports {', '.join(str(a) for a in allowed)})"
    return None


def first_reason(*reasons: Optional[str]) -> Optional[str]:
    for r in reasons:
        if r is not None:
            return r
    return None


def describe(ops_ctx: Dict[str, List[dict]]) -> List[str]:
    """Lines for ``python -m free_kernels.info``: resolution per op and context.

    One block per op; consecutive contexts with the same outcome share a line.
    Each backend is shown once per group: ``ok`` or why it cannot run.
    """
    lines = []
    for op_name, ctxs in ops_ctx.items():
        op = OPS[op_name]
        lines.append(f"  {op_name}")
        groups: List[list] = []  # [labels, chosen, reasons]
        for ctx in ctxs:
            try:
                chosen = op.resolve(ctx).name
            except BackendUnavailable as e:
                chosen = f"(none: {e})"
            reasons = op.reasons(ctx)
            if groups and groups[-1][1] == chosen and groups[-1][2] == reasons:
                groups[-1][0].append(ctx.get("label", ""))
            else:
                groups.append([[ctx.get("label", "")], chosen, reasons])
        for labels, chosen, reasons in groups:
            lines.append(f"    {', '.join(labels)} -> {chosen}")
            for name, why in reasons.items():
                mark = "*" if name == chosen else " "
                lines.append(f"      {mark} {name:<7} {'ok' if why is None else why}")
    return lines

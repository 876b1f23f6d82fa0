"""NVTX ranges for Nsight Systems / Nsight Compute, in the ``free_kernels`` domain.

OFF unless the environment variable ``FREE_KERNELS_NVTX=1`` is set (read once,
when this module is imported; :func:`set_enabled` changes it at run time).
When off, :func:`nvtx_range` returns one shared do-nothing context manager and
:func:`nvtx_phase` returns after one boolean test: no NVTX library call, no
allocation, no environment lookup.

When on, ranges are emitted through the ``nvtx`` package (a dependency of this
package) in the domain ``free_kernels``; that works on any machine - without a
profiler attached the calls are no-ops.  If ``nvtx`` cannot be imported, the
fallback is ``torch.cuda.nvtx`` (default domain, messages prefixed
``free_kernels:``), used only when CUDA is available, because it raises on a
CPU-only torch.  With neither, ranges stay silent.

Range names used by the package (see ``python/README.md`` for nsys/ncu lines):

* ``draft``    - the drafter forwards and draft transitions of a FREE round
* ``verify``   - the one batched multi-timestep target call of a round
* ``accept``   - speculative acceptance (and the residual resampling in it)
* ``resample`` - the residual sampler, when its owner wraps it separately
* ``decode``   - VAE decode in ``python/sample.py`` / ``python/sample_ddp.py``

Two forms:

``with nvtx_range("verify"): ...``
    a push/pop pair around a block (nestable);

``nvtx_phase("draft"); ...; nvtx_phase("verify"); ...; nvtx_phase(None)``
    consecutive phases of one loop, each call closing the phase the same
    thread opened before: one line per phase boundary, no re-indentation
    (what the sampler uses).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional

__all__ = ["DOMAIN", "ENV_VAR", "RANGES", "nvtx_range", "nvtx_phase", "is_enabled", "set_enabled", "backend"]

DOMAIN = "free_kernels"
ENV_VAR = "FREE_KERNELS_NVTX"
RANGES = ("draft", "verify", "accept", "resample", "decode")

_NULL = contextlib.nullcontext()  # shared, reusable and re-entrant
_COLORS = {"draft": "green", "verify": "blue", "accept": "orange", "resample": "red", "decode": "purple"}


def _env_on() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


_ON: bool = _env_on()
_backend = None        # resolved lazily at the first range while on
_ranges = {}           # name -> reusable _Range
_local = threading.local()


class _NvtxPackage:
    name = "nvtx"

    def __init__(self, mod):
        self._domain = mod.get_domain(DOMAIN)
        self._attrs = {}

    def push(self, name: str) -> None:
        a = self._attrs.get(name)
        if a is None:
            a = self._attrs[name] = self._domain.get_event_attributes(message=name, color=_COLORS.get(name, "gray"))
        self._domain.push_range(a)

    def pop(self) -> None:
        self._domain.pop_range()


class _TorchCuda:
    name = "torch.cuda.nvtx"

    def __init__(self, mod):
        self._nvtx = mod

    def push(self, name: str) -> None:
        self._nvtx.range_push(f"{DOMAIN}:{name}")

    def pop(self) -> None:
        self._nvtx.range_pop()


class _Silent:
    name = "none"

    def push(self, name: str) -> None:
        pass

    def pop(self) -> None:
        pass


def _resolve_backend():
    global _backend
    if _backend is None:
        try:
            import nvtx as _mod  # the NVTX package (NVIDIA/NVTX python bindings)

            _backend = _NvtxPackage(_mod)
        except Exception:  # not installed, or its library failed to load
            import torch

            # torch.cuda.nvtx raises on a CPU-only build: only with CUDA present
            _backend = _TorchCuda(torch.cuda.nvtx) if torch.cuda.is_available() else _Silent()
    return _backend


class _Range:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        _resolve_backend().push(self.name)
        return self

    def __exit__(self, *exc):
        _resolve_backend().pop()
        return False


def nvtx_range(name: str):
    """Context manager: an NVTX push/pop range ``name`` in the ``free_kernels`` domain.

    Returns a shared null context when NVTX is off (the default).
    """
    if not _ON:
        return _NULL
    r = _ranges.get(name)
    if r is None:
        r = _ranges[name] = _Range(str(name))
    return r


def nvtx_phase(name: Optional[str]) -> None:
    """Close the phase range this thread opened last (if any) and open ``name`` (None: open nothing).

    For loops with consecutive phases (draft -> verify -> accept), one call per
    boundary; a final ``nvtx_phase(None)`` closes the last phase.
    """
    if not _ON:
        return
    b = _resolve_backend()
    if getattr(_local, "open", False):
        b.pop()
        _local.open = False
    if name is not None:
        b.push(str(name))
        _local.open = True


def is_enabled() -> bool:
    return _ON


def set_enabled(flag: Optional[bool] = None) -> bool:
    """Turn ranges on/off at run time; ``None`` re-reads ``FREE_KERNELS_NVTX``.  Returns the new state."""
    global _ON
    _ON = _env_on() if flag is None else bool(flag)
    return _ON


def backend() -> str:
    """Name of the backend ranges go to when on: ``nvtx``, ``torch.cuda.nvtx`` or ``none``."""
    return _resolve_backend().name

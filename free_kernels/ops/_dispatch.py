"""One dispatch point per op: an ordered list of backends, each able to say why it cannot run.

Order for CUDA tensors: the measured order of ``backend_priority.json`` for
(op, device name, dtype, shape class) when the table has that entry, else the
default ``cuda`` (the csrc extension) -> ``triton`` -> ``torch``.  CPU tensors
take ``cpu`` (a host kernel of the csrc extension, where the op has one and it
can run the call) -> ``torch``; other backends only when requested explicitly.

A backend is requested by the ``backend=`` argument of the op, by
``FREE_KERNELS_BACKEND_<OP>`` (e.g. ``FREE_KERNELS_BACKEND_VERIFY_ATTENTION=triton``)
or by ``FREE_KERNELS_BACKEND`` for every op.  An explicit request that cannot
run raises :class:`BackendUnavailable` with the reasons; it never silently runs
something else.

Resolution is cached per op on (request, override variables, TRITON_INTERPRET,
table path, context): a call site builds its context dict with a fixed set of
keys (device, dtype, the sizes its probes and its shape class read), so a
repeated call costs one dict lookup.  Changing ``FREE_KERNELS_BACKEND*``,
``TRITON_INTERPRET`` or ``FREE_KERNELS_PRIORITY_FILE`` changes the key.
"""
from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

BACKEND_ORDER = ("cuda", "triton", "torch")  # default order for CUDA tensors
HOST_ORDER = ("cpu", "torch")  # order for CPU tensors
BACKENDS = ("cuda", "triton", "cpu", "torch")  # every backend name
PRIORITY_FILE_ENV = "FREE_KERNELS_PRIORITY_FILE"
DEFAULT_PRIORITY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend_priority.json")
_CACHE_LIMIT = 1024
_environ = os.environ
# The cache key reads the override variables on every call: os.environ.get costs ~1 us per missing
# variable (a KeyError inside), the raw bytes mapping behind it ~0.05 us.  Same values, same changes.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None)
if not isinstance(_ENV_DATA, dict) or _ENCODE is None:  # pragma: no cover - non-CPython os.environ
    _ENV_DATA, _ENCODE = None, None


def _env_key(name: str):
    """What the cache key stores for variable ``name``: its raw entry (bytes) or the str fallback."""
    return _ENCODE(name) if _ENCODE is not None else name


_K_ALL, _K_INTERPRET, _K_TABLE = (_env_key(n) for n in ("FREE_KERNELS_BACKEND", "TRITON_INTERPRET",
                                                         "FREE_KERNELS_PRIORITY_FILE"))
_env_get = _ENV_DATA.get if _ENV_DATA is not None else os.environ.get


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


def size_class(n: int, threshold: int) -> str:
    """``"small"`` when ``n <= threshold`` else ``"large"`` (the shape classes of the priority table)."""
    return "small" if n <= threshold else "large"


@dataclass
class Op:
    name: str
    backends: Dict[str, Backend] = field(default_factory=dict)
    # context -> shape class label of the priority table (None: every call is "any")
    shape_class: Optional[Callable[[dict], str]] = None
    # context -> why torch is the faster choice for this CPU call although the host kernel can run it
    # (e.g. too much work for a single-threaded kernel), or None; the ``cpu`` backend then comes second
    host_prefers_torch: Optional[Callable[[dict], Optional[str]]] = None
    _cache: Dict[tuple, Backend] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._env_name = f"FREE_KERNELS_BACKEND_{self.name.upper()}"
        self._env_k = _env_key(self._env_name)

    def register(self, backend: Backend) -> None:
        if backend.name not in BACKENDS:
            raise ValueError(f"unknown backend {backend.name!r}")
        self.backends[backend.name] = backend
        self._cache.clear()

    def clear_cache(self) -> None:
        self._cache.clear()

    # ------------------------------------------------------------------
    def requested(self, backend: Optional[str]) -> Optional[str]:
        req = backend or _environ.get(self._env_name) or _environ.get("FREE_KERNELS_BACKEND")
        if req in (None, "", "auto"):
            return None
        if req not in BACKENDS:
            raise ValueError(f"{self.name}: unknown backend {req!r}; choose one of {BACKENDS} or 'auto'")
        return req

    def _reason(self, name: str, ctx: dict) -> Optional[str]:
        b = self.backends.get(name)
        if b is None:
            return f"{self.name} has no {name} implementation"
        try:
            return b.supports(ctx)
        except Exception as e:  # a broken probe must not take the op down
            return f"probe failed: {type(e).__name__}: {e}"

    def names(self) -> Tuple[str, ...]:
        """The default CUDA order, then the host backends this op has (``cpu``)."""
        return BACKEND_ORDER + tuple(n for n in HOST_ORDER if n not in BACKEND_ORDER and n in self.backends)

    def reasons(self, ctx: dict) -> Dict[str, Optional[str]]:
        """For each backend of :meth:`names`: None if it can run ``ctx``, else why not."""
        return {name: self._reason(name, ctx) for name in self.names()}

    def classify(self, ctx: dict) -> str:
        if self.shape_class is None:
            return "any"
        try:
            return self.shape_class(ctx)
        except Exception:  # missing size keys (e.g. a bare info context)
            return "any"

    def order_for(self, ctx: dict) -> Tuple[Tuple[str, ...], str]:
        """(backend order for ``ctx``, where it came from: a measured table entry or the default)."""
        device = ctx.get("device")
        if device is None or torch.device(device).type != "cuda":
            if "cpu" in self.backends:
                why = self.host_prefers_torch(ctx) if self.host_prefers_torch is not None else None
                if why is not None:
                    return ("torch", "cpu"), f"CPU tensors, torch first: {why}"
                return HOST_ORDER, "CPU tensors: the host kernel where it can run, else torch"
            return ("torch",), "CPU tensors take torch unless a backend is requested"
        path = priority_file()
        table = priority_table(path)
        if not table:
            return BACKEND_ORDER, f"default order (no measured entries in {os.path.basename(path)})"
        try:
            dev_name = device_name(torch.device(device))
        except Exception as e:
            return BACKEND_ORDER, f"default order (device name unknown: {type(e).__name__}: {e})"
        dt = str(ctx.get("dtype")).replace("torch.", "")
        sc = self.classify(ctx)
        for key in ((self.name, dev_name, dt, sc), (self.name, dev_name, dt, "*")):
            order = table.get(key)
            if order is not None:
                full = tuple(order) + tuple(b for b in BACKEND_ORDER if b not in order)
                return full, f"measured ({os.path.basename(path)}: {'/'.join(key)})"
        return BACKEND_ORDER, (f"default order (no entry for {self.name}/{dev_name}/{dt}/{sc} in "
                               f"{os.path.basename(path)})")

    def _resolve(self, ctx: dict, backend: Optional[str]) -> Backend:
        req = self.requested(backend)
        if req is not None:
            why = self._reason(req, ctx)
            if why is not None:
                raise BackendUnavailable(f"{self.name}: backend {req!r} was requested but cannot run: {why}")
            return self.backends[req]
        device = ctx.get("device")
        if (device is None or torch.device(device).type != "cuda") and "cpu" not in self.backends:
            return self.backends["torch"]
        order, _ = self.order_for(ctx)
        why = {}
        for name in order:
            why[name] = self._reason(name, ctx)
            if why[name] is None:
                return self.backends[name]
        raise BackendUnavailable(f"{self.name}: no backend can run: {why}")

    def resolve(self, ctx: dict, backend: Optional[str] = None) -> Backend:
        """The backend for ``ctx`` (cached; an explicit request that cannot run raises, never cached)."""
        get = _env_get
        try:
            key = (backend, get(self._env_k), get(_K_ALL), get(_K_INTERPRET), get(_K_TABLE), *ctx.items())
            hit = self._cache.get(key)
        except TypeError:  # an unhashable context value: resolve without the cache
            return self._resolve(ctx, backend)
        if hit is not None:
            return hit
        b = self._resolve(ctx, backend)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = b
        return b


OPS: Dict[str, Op] = {}


def get_op(name: str) -> Op:
    if name not in OPS:
        OPS[name] = Op(name)
    return OPS[name]


def clear_caches() -> None:
    """Forget every cached resolution, the priority tables and device names (tests; a swapped table file)."""
    for op in OPS.values():
        op.clear_cache()
    _load_priority_table.cache_clear()
    _device_name.cache_clear()


# -------------------------------------------------------------- measured priority table
def priority_file() -> str:
    """The priority table in use: ``$FREE_KERNELS_PRIORITY_FILE`` or the one shipped with the package."""
    return _environ.get(PRIORITY_FILE_ENV) or DEFAULT_PRIORITY_FILE


def priority_table(path: Optional[str] = None) -> Dict[Tuple[str, str, str, str], Tuple[str, ...]]:
    """{(op, device name, dtype, shape class): backend order} read once per path (empty if absent/unreadable)."""
    return _load_priority_table(path or priority_file())


@functools.lru_cache(maxsize=8)
def _load_priority_table(path: str) -> Dict[Tuple[str, str, str, str], Tuple[str, ...]]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            doc = json.load(f)
        table = {}
        for e in doc.get("entries", []):
            order = tuple(e["order"])
            bad = [b for b in order if b not in BACKEND_ORDER]
            if bad:
                raise ValueError(f"unknown backends {bad} in entry {e}")
            table[(e["op"], e["device"], e["dtype"], e.get("shape_class", "*"))] = order
        return table
    except Exception as e:  # a broken table must not take the ops down: default order, loudly
        warnings.warn(f"free_kernels: ignoring backend priority table {path}: {type(e).__name__}: {e}")
        return {}


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` of a CUDA device, cached per index (queried on first use, never at import)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_name(index)


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


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
    return None


def extension_reason(ctx: dict, symbol: str) -> Optional[str]:
    from .. import _env

    why = cuda_tensor_reason(ctx)
    if why is not None:
        return why
    why = _env.extension_unavailable_reason(symbol)
    return why


def host_kernel_reason(ctx: dict, symbol: str) -> Optional[str]:
    """Why the extension's host kernel ``symbol`` cannot run ``ctx`` as a backend (None: it can)."""
    from .. import _env

    dev = ctx.get("device")
    if dev is None or torch.device(dev).type != "cpu":
        return f"inputs are on {dev}, not the CPU (the host kernel reads host memory)"
    return _env.host_entry_unavailable_reason(symbol)


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
    Each backend is shown once per group (in the order tried): ``ok`` or why it
    cannot run; ``order:`` says whether the order is a measured table entry or the default.
    """
    lines = []
    for op_name, ctxs in ops_ctx.items():
        op = OPS[op_name]
        lines.append(f"  {op_name}")
        groups: List[list] = []  # [labels, chosen, reasons, source]
        for ctx in ctxs:
            try:
                chosen = op.resolve(ctx).name
            except BackendUnavailable as e:
                chosen = f"(none: {e})"
            order, source = op.order_for(ctx)
            reasons = {name: op._reason(name, ctx) for name in order + tuple(b for b in op.names()
                                                                           if b not in order)}
            if groups and groups[-1][1] == chosen and groups[-1][2] == reasons and groups[-1][3] == source:
                groups[-1][0].append(ctx.get("label", ""))
            else:
                groups.append([[ctx.get("label", "")], chosen, reasons, source])
        for labels, chosen, reasons, source in groups:
            lines.append(f"    {', '.join(labels)} -> {chosen}   [order: {source}]")
            for name, why in reasons.items():
                mark = "*" if name == chosen else " "
                lines.append(f"      {mark} {name:<7} {'ok' if why is None else why}")
    return lines

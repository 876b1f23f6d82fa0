"""One dispatch point per op: an ordered list of backends, each able to say why it cannot run.

Order for CUDA tensors: the measured order of ``backend_priority.json`` for
(op, device name, dtype, shape class) when the table has that entry, else the
default ``cuda`` (the csrc extension) -> ``triton`` -> ``torch``.  CPU tensors
take ``cpu`` (a host kernel of the csrc extension, where the op has one and it
can run the call) -> ``torch``; other backends only when requested explicitly.

A backend is requested by the ``backend=`` argument of the op, by
``FREE_KERNELS_BACKEND_<OP>`` (e.g. ``FREE_KERNELS_BACKEND_VERIFY_ATTENTION=triton``)
or by ``FREE_KERNELS_BACKEND`` for every op:

* the argument and the per-op variable are strict: an unknown name, or one the
  op does not have, raises ``ValueError`` and a backend that cannot run the call
  raises :class:`BackendUnavailable`, each in one line naming where the request
  came from; nothing else is run silently.  An op built on another op's kernel
  (``Op.inherits``: ``draft_transition`` and ``verify_transition`` run the
  ``draft_epilogue`` kernels) also follows that op's variable, where it has the
  backend named, unless its own variable is set;
* the global variable is a preference: it applies to each call where the op has
  that backend and the backend can run the call; elsewhere the op keeps its own
  order, and a value that is not a backend name (exactly, lower case) is
  ignored, each with a one-line :class:`BackendEnvironmentWarning` once.

``auto`` or an empty value means no request.  :func:`environment_problems` lists
what is wrong with the variables as they are set (the tools check it before
loading anything; ``python -m free_kernels.info`` prints it).

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


class BackendEnvironmentWarning(UserWarning):
    """A ``FREE_KERNELS_BACKEND`` value that is ignored (for an op, or altogether)."""


GLOBAL_ENV = "FREE_KERNELS_BACKEND"
_WARNED: set = set()


def _warn_once(msg: str) -> None:
    """One line on stderr (through ``warnings``, so it can be filtered), once per process."""
    if msg in _WARNED:
        return
    _WARNED.add(msg)
    # an explicit location whose source is never looked up: the warning prints as one line
    warnings.warn_explicit(msg, BackendEnvironmentWarning, "<environment>", 0, module="free_kernels.ops")


def _choices() -> str:
    return ", ".join(BACKENDS) + " or auto"


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
    # ops whose kernels this op runs: their per-op variables govern it too (after its own)
    inherits: Tuple[str, ...] = ()
    _cache: Dict[tuple, Backend] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._env_name = env_name(self.name)
        self._env_k = _env_key(self._env_name)
        self.inherit_from(*self.inherits)

    def inherit_from(self, *op_names: str) -> None:
        """This op runs the kernels of ``op_names``: their per-op variables govern it too (after its own)."""
        self.inherits = tuple(op_names)
        self._inherited_k = tuple(_env_key(env_name(n)) for n in self.inherits)
        self._cache.clear()

    def env_names(self) -> Tuple[str, ...]:
        """The per-op variables that govern this op, in priority order (its own, then inherited ones)."""
        return (self._env_name,) + tuple(env_name(n) for n in self.inherits)

    def register(self, backend: Backend) -> None:
        if backend.name not in BACKENDS:
            raise ValueError(f"unknown backend {backend.name!r}")
        self.backends[backend.name] = backend
        self._cache.clear()

    def clear_cache(self) -> None:
        self._cache.clear()

    # ------------------------------------------------------------------
    def requested(self, backend: Optional[str]) -> Optional[str]:
        """The backend asked for by ``backend`` or the environment (None: the op's own order).  A bad argument
        or per-op variable raises ValueError; a bad global value is ignored with a warning."""
        return self._request(backend)[0]

    def _request(self, backend: Optional[str]) -> Tuple[Optional[str], str]:
        """(backend name or None, where the request came from: ``backend='x'`` or ``VARIABLE=x``)."""
        if backend is not None:
            if backend in ("", "auto"):
                return None, ""
            if backend not in BACKENDS:
                raise ValueError(f"{self.name}: unknown backend {backend!r}; choose one of {_choices()}")
            return backend, f"backend={backend!r}"
        for i, var in enumerate(self.env_names()):
            raw = _environ.get(var)
            if not raw:
                continue
            if raw == "auto":
                return None, ""
            if raw not in BACKENDS:
                raise ValueError(f"{var}={raw!r} is not a backend name: choose one of {_choices()} "
                                 f"(exactly, lower case)")
            if raw not in self.backends:
                if i:  # an inherited variable where this op does not run that kernel: its own order
                    continue
                raise ValueError(f"{var}={raw}: {self.name} has no {raw} backend (it has "
                                 f"{', '.join(b for b in BACKENDS if b in self.backends)})")
            return raw, f"{var}={raw}"
        raw = _environ.get(GLOBAL_ENV)
        if not raw or raw == "auto":
            return None, ""
        if raw not in BACKENDS:
            _warn_once(f"{GLOBAL_ENV}={raw!r} is not a backend name (one of {_choices()}, exactly, lower case): "
                       f"ignored")
            return None, ""
        why = _machine_reason_cached(raw, _env_get(_K_INTERPRET))
        if why is not None:
            _warn_once(f"{GLOBAL_ENV}={raw}: {raw} cannot run on this machine ({why}); every op keeps its own order")
            return None, ""
        if raw not in self.backends:
            having = sorted(n for n, op in OPS.items() if raw in op.backends)
            _warn_once(f"{GLOBAL_ENV}={raw} applies to the ops that have a {raw} backend "
                       f"({', '.join(having) or 'none'}); the others keep their own order")
            return None, ""
        return raw, f"{GLOBAL_ENV}={raw}"

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
        req, source = self._request(backend)
        if req is not None:
            why = self._reason(req, ctx)
            if why is None:
                return self.backends[req]
            if not source.startswith(GLOBAL_ENV + "="):
                raise BackendUnavailable(f"{self.name}: backend {req!r} was requested ({source}) but cannot run: "
                                         f"{why}")
            _warn_once(f"{source}: {req} cannot run {self.name} here ({why}); it keeps its own order")
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
            if self._inherited_k:
                key = (backend, get(self._env_k), tuple(get(k) for k in self._inherited_k), get(_K_ALL),
                       get(_K_INTERPRET), get(_K_TABLE), *ctx.items())
            else:
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


def env_name(op_name: str) -> str:
    """The per-op override variable of ``op_name``: ``FREE_KERNELS_BACKEND_<OP>``."""
    return f"{GLOBAL_ENV}_{op_name.upper()}"


def machine_reason(name: str) -> Optional[str]:
    """Why backend ``name`` cannot run on this machine at all (None: it can run some calls)."""
    from .. import _env

    if name == "torch":
        return None
    if name == "cpu":
        return _env._load_extension()[1]
    cuda = torch.cuda.is_available()
    if name == "cuda":
        return _env.extension_unavailable_reason() if cuda else "CUDA is not available to torch here"
    if name == "triton":
        why = _env.triton_unavailable_reason()
        if why is None and not cuda and not _env.triton_interpret():
            why = "no CUDA device here, and TRITON_INTERPRET is not set"
        return why
    return f"unknown backend {name!r}"


@functools.lru_cache(maxsize=16)
def _machine_reason_cached(name: str, interpret) -> Optional[str]:
    return machine_reason(name)


def environment_problems() -> Tuple[List[str], List[str]]:
    """(errors, warnings) about the ``FREE_KERNELS_BACKEND*`` variables as set now, one line each.

    Errors (a per-op variable is strict): a value that is not a backend name, a variable that names no op,
    a backend the op does not have or that cannot run on this machine.  Warnings (the global variable is a
    preference): a value that is not a backend name, or a backend that cannot run here.
    """
    import importlib

    importlib.import_module(__name__.rsplit(".", 1)[0])  # every op registered
    errors: List[str] = []
    warns: List[str] = []
    by_var = {env_name(n): op for n, op in OPS.items()}
    for var in sorted(k for k in _environ if k.startswith(GLOBAL_ENV + "_")):
        raw = _environ[var]
        op = by_var.get(var)
        if op is None:
            errors.append(f"{var} names no op (per-op variables: {', '.join(sorted(by_var))})")
        elif raw in ("", "auto"):
            continue
        elif raw not in BACKENDS:
            errors.append(f"{var}={raw!r} is not a backend name: choose one of {_choices()} (exactly, lower case)")
        elif raw not in op.backends:
            errors.append(f"{var}={raw}: {op.name} has no {raw} backend (it has "
                          f"{', '.join(b for b in BACKENDS if b in op.backends)})")
        elif machine_reason(raw) is not None:
            errors.append(f"{var}={raw}: {raw} cannot run on this machine ({machine_reason(raw)})")
    raw = _environ.get(GLOBAL_ENV)
    if raw and raw != "auto":
        if raw not in BACKENDS:
            warns.append(f"{GLOBAL_ENV}={raw!r} is not a backend name (one of {_choices()}, exactly, lower case): "
                         f"ignored")
        elif machine_reason(raw) is not None:
            warns.append(f"{GLOBAL_ENV}={raw}: {raw} cannot run on this machine ({machine_reason(raw)}); every op "
                         f"keeps its own order")
    return errors, warns


def check_environment() -> None:
    """Warn (once each) about an ignored global value; raise ValueError with the first per-op problem."""
    errors, warns = environment_problems()
    for w in warns:
        _warn_once(w)
    if errors:
        raise ValueError(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))


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
    _machine_reason_cached.cache_clear()


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
            except Exception as e:  # BackendUnavailable, or a bad override variable: reported, never raised
                chosen = f"(none: {e})"
            order, source = op.order_for(ctx)
            reasons = {name: op._reason(name, ctx) for name in order + tuple(b for b in op.names()
                                                                           if b not in order)}
            if groups and groups[-1][1] == chosen and groups[-1][2] == reasons and groups[-1][3] == source:
                groups[-1][0].append(ctx.get("label", ""))
            else:
                groups.append([[ctx.get("label", "")], chosen, reasons, source])
        try:
            requested = op._request(None)[1]
        except ValueError:
            requested = ""  # the bad variable is named in the resolution itself
        for labels, chosen, reasons, source in groups:
            lines.append(f"    {', '.join(labels)} -> {chosen}   [order: {source}"
                         f"{f'; requested by {requested}' if requested else ''}]")
            for name, why in reasons.items():
                mark = "*" if name == chosen else " "
                lines.append(f"      {mark} {name:<7} {'ok' if why is None else why}")
    return lines

"""The draft planner's cost cache: measured round costs on disk that can never hurt a run.

One JSON file, ``planner_costs_v5.json`` in ``$FREE_KERNELS_CACHE`` (default ``~/.cache/free_kernels``)::

    {"schema": 5, "entries": {EXACT_KEY: ENTRY, ...}}
    ENTRY = {"schema": 5, "prior_key": str, "written": seconds since the epoch, "device": str,
             "calibrated": COSTS or null,     # the calibration's round costs (what plan="frozen" uses)
             "learned": COSTS or null,        # what adaptive runs measured since (their prior next time)
             "parts_ms": PARTS or null,       # the calibration's parts, for the printout
             "calibration_s": seconds or null}
    COSTS = {THREADS: [seconds of one round drafting L = 0, 1, ..., Lmax], ...}
            THREADS: "1", "2", ... (CPU intra-op threads the round ran at) or "-" (no thread choice: GPU)
    PARTS = {"verify_1_row_ms": ms, "draft_step_ms": ms, "accept_ms": ms}

Keys.  The *prior key* (:func:`prior_key`) hashes what a round's cost depends on: the device (on the CPU its
model, vector ISA and thread count, and whether the draft epilogue's host kernel is built), the target's and
drafter's classes and sizes, dtype, batch, guidance, layout and the torch and free_kernels versions.  The
*exact key* (:func:`exact_key`) adds this checkout of the package (its location on disk) and the identity of
the loaded weights: costs written by another checkout, or for other weights of the same shape, share the prior
key only and are at most a prior (an adaptive run starts from them and follows its own round times; a frozen
plan calibrates anew).

Reading.  Every value is checked before use: the schema version, the types, every cost a finite positive
number of seconds below an hour, thread keys, list lengths.  A file that cannot be read (a directory of that
name, no permission), is not JSON (truncated, nested past Python's recursion limit), is not this schema, or an
entry that fails a check, is ignored with ONE warning line naming the file and what is wrong, and the costs
are measured again.

Writing.  Under an exclusive ``fcntl.flock`` on a sidecar ``planner_costs_v5.json.lock``, the file is read
again, the one entry merged in (other entries kept, damaged ones dropped, at most :data:`MAX_ENTRIES` newest),
written to a temporary file in the same directory and renamed over it: concurrent runs lose no entry and a
reader never sees half a file.  A failed write (read-only folder, a directory in the way) removes its
temporary file and prints one warning line; the run goes on without caching.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import torch

try:  # POSIX; elsewhere writes are atomic but not serialised between processes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

SCHEMA = 5
FILE_NAME = f"planner_costs_v{SCHEMA}.json"
MAX_ENTRIES = 64
MAX_FILE_BYTES = 4 << 20        # a cache of MAX_ENTRIES entries is a few hundred KB
MAX_ROUND_S = 3600.0            # a round cost above an hour is not a measurement
MAX_LENGTHS = 65                # round costs for L = 0..64 at most
MAX_THREAD_KEYS = 16

Costs = Dict[Optional[int], List[float]]   # thread count (None: no thread choice) -> seconds per L

_warned: set = set()


def default_cache_dir() -> str:
    return os.environ.get("FREE_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "free_kernels")


def warn(path: str, what: str) -> None:
    """One warning line on stderr naming the cache file (once per process for the same file and problem)."""
    if (path, what) in _warned:
        return
    _warned.add((path, what))
    sys.stdout.flush()
    print(f"free_kernels: warning: planner cost cache {path}: {what}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ validation
def _is_seconds(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 < v < MAX_ROUND_S


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def check_costs(costs, where: str) -> Optional[str]:
    """What is wrong with a COSTS object, or None."""
    if not isinstance(costs, dict) or not costs:
        return f"{where} is {_short(costs)}, expected a non-empty object of thread count -> round seconds"
    if len(costs) > MAX_THREAD_KEYS:
        return f"{where} has {len(costs)} thread counts (at most {MAX_THREAD_KEYS})"
    lengths = set()
    for k, v in costs.items():
        if not (k == "-" or (isinstance(k, str) and k.isdigit() and 1 <= int(k) <= 4096)):
            return f"{where} has thread key {_short(k)} (expected '1', '2', ... or '-')"
        if not isinstance(v, list) or not 1 <= len(v) <= MAX_LENGTHS:
            return f"{where}[{k!r}] is {_short(v)}, expected a list of 1 to {MAX_LENGTHS} round costs"
        for i, x in enumerate(v):
            if not _is_seconds(x):
                return f"{where}[{k!r}][{i}] is {_short(x)}, expected seconds in (0, {MAX_ROUND_S:g})"
        lengths.add(len(v))
    if "-" in costs and len(costs) > 1:
        return f"{where} mixes '-' with thread counts"
    if len(lengths) > 1:
        return f"{where} has lists of different lengths"
    return None


def check_entry(e) -> Optional[str]:
    """What is wrong with a cache ENTRY, or None."""
    if not isinstance(e, dict):
        return f"the entry is {_short(e)}, expected an object"
    if e.get("schema") != SCHEMA:
        return f"the entry's schema is {_short(e.get('schema'))}, expected {SCHEMA}"
    if not isinstance(e.get("prior_key"), str) or not 0 < len(e["prior_key"]) <= 64:
        return f"prior_key is {_short(e.get('prior_key'))}, expected a key string"
    w = e.get("written")
    if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
        return f"written is {_short(w)}, expected seconds since the epoch"
    if not isinstance(e.get("device", ""), str):
        return f"device is {_short(e.get('device'))}, expected a string"
    if e.get("calibrated") is None and e.get("learned") is None:
        return "the entry holds neither calibrated nor learned costs"
    for name in ("calibrated", "learned"):
        if e.get(name) is not None:
            why = check_costs(e[name], name)
            if why:
                return why
    parts = e.get("parts_ms")
    if parts is not None:
        if not isinstance(parts, dict) or set(parts) != {"verify_1_row_ms", "draft_step_ms", "accept_ms"}:
            return f"parts_ms is {_short(parts)}, expected verify_1_row_ms / draft_step_ms / accept_ms"
        for k, v in parts.items():
            if not _is_seconds(v):
                return f"parts_ms[{k!r}] is {_short(v)}, expected a positive number of milliseconds"
    cs = e.get("calibration_s")
    if cs is not None and not (_is_seconds(cs) or (type(cs) in (int, float) and cs == 0)):
        return f"calibration_s is {_short(cs)}, expected seconds"
    return None


def costs_from_json(costs: dict) -> Costs:
    return {(None if k == "-" else int(k)): [float(x) for x in v] for k, v in costs.items()}


def costs_to_json(costs: Costs) -> dict:
    return {("-" if k is None else str(int(k))): [float(x) for x in v] for k, v in costs.items()}


# ------------------------------------------------------------------ the file
class CostCache:
    """The cost cache file in ``directory`` (default :func:`default_cache_dir`)."""

    def __init__(self, directory: Optional[str] = None):
        self.directory = directory or default_cache_dir()
        self.path = os.path.join(self.directory, FILE_NAME)
        self.unusable = False   # unreadable or unwritable: warned once, nothing written

    def _load(self, report: bool) -> Dict[str, object]:
        """The file's entries (unvalidated), {} when absent or damaged (with one warning when ``report``)."""
        path = self.path
        try:
            if os.path.isdir(path):
                raise IsADirectoryError(21, "is a directory")
            size = os.path.getsize(path)
            if size > MAX_FILE_BYTES:
                raise ValueError(f"{size} bytes, more than a cost cache holds ({MAX_FILE_BYTES})")
            with open(path, "r", encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except OSError as e:
            self.unusable = True
            if report:
                warn(path, f"cannot be read ({e.strerror or e}); costs are measured and not cached")
            return {}
        except (ValueError, RecursionError, UnicodeDecodeError) as e:
            if report:
                kind = "nested too deeply" if isinstance(e, RecursionError) else f"not valid JSON ({e})"
                warn(path, f"{kind}; ignored, costs measured again and the file rewritten")
            return {}
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("entries"), dict):
            if report:
                warn(path, f"not a schema-{SCHEMA} cost cache; ignored, costs measured again and the file rewritten")
            return {}
        return data["entries"]

    def lookup(self, exact: str, prior: str) -> Tuple[Optional[dict], str]:
        """(entry, "exact") for this checkout and these weights, else (the newest entry of the same prior key,
        "prior"), else (None, "").  Damaged entries on the way are reported (one line) and skipped."""
        entries = self._load(report=True)
        problems = []
        hit = entries.get(exact)
        if hit is not None:
            why = check_entry(hit)
            if why is None and hit["prior_key"] == prior:
                return hit, "exact"
            problems.append(why or "the entry's prior_key does not match its setting")
        best = None
        for k, e in entries.items():
            if k == exact or not isinstance(e, dict) or e.get("prior_key") != prior:
                continue
            why = check_entry(e)
            if why:
                problems.append(why)
            elif best is None or e["written"] > best["written"]:
                best = e
        if problems:
            more = f" (and {len(problems) - 1} more damaged entries)" if len(problems) > 1 else ""
            warn(self.path, f"entry for this setting is damaged: {problems[0]}{more}; ignored, measuring again")
        return (best, "prior") if best is not None else (None, "")

    def store(self, exact: str, fields: dict) -> bool:
        """Merge ``fields`` into the entry ``exact`` (created if absent) under the lock; True when written."""
        if self.unusable:
            return False
        path = self.path
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            self.unusable = True
            warn(path, f"cannot create its folder ({e.strerror or e}); costs are not cached")
            return False
        tmp = None
        try:
            with open(path + ".lock", "a") as lock:
                if fcntl is not None:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                entries = {k: e for k, e in self._load(report=False).items()
                           if isinstance(k, str) and check_entry(e) is None}
                old = entries.get(exact) or {}
                entry = {**old, **fields, "schema": SCHEMA, "written": time.time()}
                why = check_entry(entry)
                if why:  # never write what a reader would reject
                    raise ValueError(f"refusing to cache an invalid entry: {why}")
                entries[exact] = entry
                if len(entries) > MAX_ENTRIES:
                    keep = sorted(entries, key=lambda k: entries[k]["written"], reverse=True)[:MAX_ENTRIES]
                    entries = {k: entries[k] for k in keep}
                fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{FILE_NAME}.", suffix=".tmp")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(dict(schema=SCHEMA, entries=entries), f, indent=1, allow_nan=False)
                os.replace(tmp, path)
                tmp = None
            return True
        except (OSError, ValueError) as e:
            self.unusable = True
            warn(path, f"cannot be written ({getattr(e, 'strerror', None) or e}); costs are not cached")
            return False
        finally:
            if tmp is not None:
                try:
                    os.remove(tmp)
                except OSError:
                    pass


# ------------------------------------------------------------------ keys
def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def device_name(dev: torch.device) -> str:
    """A short name of the device (what the calibration's progress line and the cache entry show)."""
    return _device_name(dev)


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo) and the vector ISA torch's CPU kernels use: two machines
    that both call themselves x86_64 (an AVX2 and an AVX-512 one) differ about 2x in a GEMM."""
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cap = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "?")()
    return f"{name or platform.machine()} ({cap})"


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("free-kernels")
    except PackageNotFoundError:
        return "?"


def _host_epilogue() -> bool:
    """Whether a CPU draft step can take the draft epilogue's host kernel: it is built, and no backend
    override (``FREE_KERNELS_BACKEND[_DRAFT_TRANSITION]``) asks for another one."""
    from .. import _env
    from ..ops.draft_transition import OP

    return _env.host_entry_unavailable_reason("draft_epilogue_host") is None and OP.requested(None) in (None, "cpu")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]


def prior_key(sampler, B: int, G: int, dev: torch.device) -> str:
    """What a round's cost depends on: device (on the CPU its model, vector ISA, thread count and whether the
    draft epilogue's host kernel is built), target (class, size, dtype), drafter (class, size), batch,
    guidance, layout, torch and free_kernels versions."""
    t = sampler.target
    params = [p for p in t.parameters()] if isinstance(t, torch.nn.Module) else []
    sig = dict(cls=type(t).__name__, n_params=sum(p.numel() for p in params),
               dtype=str(params[0].dtype) if params else "?",
               shape=[int(getattr(t, a, 0)) for a in ("in_channels", "input_size", "patch_size", "hidden_size")],
               drafter=type(sampler.drafter).__name__,
               drafter_params=sum(p.numel() for p in sampler.drafter.parameters())
               if isinstance(sampler.drafter, torch.nn.Module) else 0)
    cpu = dev.type == "cpu"
    return _hash(dict(schema=SCHEMA, device=_device_name(dev), target=sig, B=B, G=G, layout=sampler.layout,
                      torch=torch.__version__, package=_package_version(),
                      # a CPU round's cost depends on the intra-op thread count as much as on the device
                      threads=torch.get_num_threads() if cpu else None, cpu=_cpu_model() if cpu else None,
                      # a draft step on the CPU costs ~2x more without the draft epilogue's host kernel
                      host_epilogue=_host_epilogue() if cpu else None))


def checkout() -> str:
    """This copy of the package: its folder on disk (another clone or install is another checkout)."""
    return os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def weights_identity(*modules) -> str:
    """Names, shapes, dtypes and a strided sample of every parameter's values (one device read per module):
    another load of other weights of the same shape gets another identity."""
    h = hashlib.sha256()
    for m in modules:
        h.update(type(m).__name__.encode())
        if not isinstance(m, torch.nn.Module):
            continue
        picks = []
        for name, p in m.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            flat = p.detach().reshape(-1)
            if flat.numel():
                picks.append(flat[:: max(1, flat.numel() // 8)][:8].float())
        if picks:
            h.update(torch.cat(picks).cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def exact_key(prior: str, sampler) -> str:
    """The prior key, this checkout and the loaded weights (target and drafter)."""
    return _hash(dict(prior=prior, checkout=checkout(), weights=weights_identity(sampler.target, sampler.drafter)))

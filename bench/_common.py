"""Shared harness of the GPU benchmarks: environment header, timing, tables, JSON.

Every bench script prints the same header (device, capability, SMs, torch / triton / CUDA /
Python versions, extension state, driver) and the exact command, times with the same helpers,
and writes ``--json`` documents the same way, so that bench/run_gpu.py and
bench/update_priority.py can read any of them.

Timing helpers (all need CUDA):

* :func:`do_bench_ms` - ``triton.testing.do_bench`` median in ms (warm-up, L2 cleared per rep);
* :func:`graph_us` - per-call time of ``calls`` invocations captured in one CUDA graph;
* :func:`graphed` - capture a callable once, return the replay;
* :func:`event_ms` - median over reps of CUDA-event time of ``iters`` calls (after a warm-up).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from typing import Callable, Dict, Iterable, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# ------------------------------------------------------------------ environment
def environment() -> Dict[str, str]:
    """Device and versions: the header every result needs (bench/RESULTS.md)."""
    env: Dict[str, str] = {}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   sms=str(props.multi_processor_count))
    else:
        env["device"] = "cpu"
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # pragma: no cover - triton is a dependency
        env["triton"] = f"unavailable ({type(e).__name__})"
    env.update(torch=torch.__version__, cuda=str(torch.version.cuda), python=platform.python_version())
    try:
        from free_kernels import _env

        ext = _env.extension()
        if ext is not None:
            env["extension"] = "cuda" if ext.built_with_cuda() else "host-only"
            drv = getattr(ext, "cuda_driver_version", lambda: None)()
            if drv:
                env["driver_cuda"] = str(drv)
        else:
            env["extension"] = "not built"
    except Exception as e:  # pragma: no cover
        env["extension"] = f"error: {e}"
    return env


def command_line(script: str, argv: Optional[List[str]]) -> str:
    return "python " + " ".join([os.path.relpath(script, ROOT)] + list(argv if argv is not None else sys.argv[1:]))


def print_header(title: str, script: str, argv: Optional[List[str]], env: Optional[Dict[str, str]] = None) -> Dict:
    """Print ``<title>  key=value ...`` and ``command: ...``; returns the environment."""
    env = environment() if env is None else env
    print(f"{title}  " + "  ".join(f"{k}={v}" for k, v in env.items()))
    print(f"command: {command_line(script, argv)}", flush=True)
    return env


def needs_cuda(name: str, hint: str = "") -> bool:
    """True (after saying so) when there is no CUDA device: the caller returns 0."""
    if torch.cuda.is_available():
        return False
    print(f"{name}: needs a CUDA GPU (torch.cuda.is_available() is False); nothing to time." + (f"\n{hint}" if hint else ""))
    return True


# ------------------------------------------------------------------ timing
def do_bench_ms(fn: Callable, warmup: int = 25, rep: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def graphed(fn: Callable[[], object], warm: int = 3) -> Callable[[], object]:
    """Capture ``fn`` (static inputs / outputs inside) in a CUDA graph after ``warm`` side-stream calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def graph_us(fn: Callable, calls: int = 20) -> Optional[float]:
    """Per-call time (us) of ``calls`` invocations captured in one CUDA graph (None if capture fails)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        g.replay()
        torch.cuda.synchronize()
        return 1e3 * do_bench_ms(g.replay) / calls
    except Exception:
        torch.cuda.synchronize()
        return None


def event_ms(fn: Callable[[], object], warmup: int, iters: int, reps: int) -> float:
    """Median over ``reps`` of (CUDA-event time of ``iters`` calls) / iters, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    res = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        res.append(a.elapsed_time(b) / iters)
    return statistics.median(res)


# ------------------------------------------------------------------ output
def fmt(v, spec: str) -> str:
    """``format(v, spec)``, or '-' for None."""
    return "-" if v is None else format(v, spec)


def markdown_table(header: Iterable[str], rows: Iterable[Iterable], with_header: bool = True) -> List[str]:
    """Markdown table lines (RESULTS.md pastes them as they are)."""
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] if with_header else []
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return lines


def write_json(path: Optional[str], doc: Dict) -> None:
    """Write ``doc`` atomically (a reader never sees half a file) and say so."""
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)
    print(f"wrote {path}")


# ------------------------------------------------------------------ comparisons
def sampler_of_revision(rev: str):
    """``FreeSampler`` as of git revision ``rev``: that revision's free_kernels/sampler.py (from ``git show``),
    loaded inside this package (its ops, models and planner are the working tree's)."""
    import importlib.util
    import subprocess
    import tempfile

    got = subprocess.run(["git", "show", f"{rev}:free_kernels/sampler.py"], cwd=ROOT, capture_output=True,
                         text=True)
    if got.returncode != 0:
        raise ValueError(f"revision {rev!r}: no free_kernels/sampler.py there ({got.stderr.strip()[:120]})")
    src = got.stdout
    path = os.path.join(tempfile.mkdtemp(), "sampler.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"free_kernels._sampler_{rev}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.FreeSampler

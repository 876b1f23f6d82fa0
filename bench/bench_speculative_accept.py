"""Benchmark: speculative_accept (acceptance + residual resampling of a FREE round), fp32.

One run compares, per (variance mode, B, L, D):
  * triton, cuda: our two-launch kernels (rng_state on the device, outputs
    preallocated), timed eagerly and replayed from a CUDA graph;
  * torch: the eager reference (the oracle; float64 reductions, host syncs in
    its rejection loop);
  * torch.compile of the reference (dynamic shapes; graph breaks at its host
    syncs).  If compiling fails the row says why.

Inputs are a realistic round, never zeros: per-draft acceptance about 75 %
(whitened mean discrepancy |d| ~ 0.6, plus a 1 %-per-element log-variance error
in the learned-variance mode), num_drafts = L for every sample, so most
samples reject somewhere and the residual sampler runs.

Timing: ``triton.testing.do_bench`` median (warm-up first, L2 cleared before
every repetition); "graph" = a CUDA graph of 20 calls replayed, per call.
GB/s = ``bytes_moved(B, L, D)`` (free_kernels/ops/speculative_accept.py:
4 * (5 L + 3) * B * D bytes, every draft inspected) / time.  Ceilings measured
in the same run: HBM bandwidth (a 1 GiB device copy: read + write) -> the
"HBM bound" time of each shape, and the single-launch floor (an empty Triton
kernel, eager and graph-replayed).

    python bench/bench_speculative_accept.py                  # full grid (GPU)
    python bench/bench_speculative_accept.py --quick          # B in {1, 32}, L = 6
    python bench/bench_speculative_accept.py --no-compile --json out.json

``main(argv)`` is importable (bench/run_gpu.py).  Without CUDA it says so and
returns 0.  CPU microbenchmark of the reference (pytest-benchmark):
``pytest bench/bench_speculative_accept.py --benchmark-only``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import do_bench_ms, fmt, needs_cuda, print_header, write_json  # noqa: E402
from _common import graph_us as _graph_us  # noqa: E402

from free_kernels.ops.speculative_accept import OP, bytes_moved, speculative_accept  # noqa: E402
from free_kernels.reference.speculative_accept import speculative_accept as reference  # noqa: E402

BS = (1, 8, 32)
LS = (4, 6, 8)
DS = (4096, 16384)
MODES = ("learnedvar", "eqvar")
GRAPH_CALLS = 20


# ------------------------------------------------------------------ inputs
def make_round(B: int, L: int, D: int, equal_variance: bool, device="cuda", seed: int = 0, dnorm: float = 0.6):
    """A realistic round: per-draft |d| ~ dnorm (acceptance ~ 2 Phi(-dnorm/2) ~ 76 %)."""
    g = torch.Generator(device=device).manual_seed(seed)
    mean_p = torch.randn(B, L + 1, D, device=device, generator=g)
    logvar_p = -2.0 + 0.3 * torch.randn(B, L + 1, D, device=device, generator=g)
    sig = torch.exp(0.5 * logvar_p[:, :L])
    mean_q = mean_p[:, :L] + dnorm / math.sqrt(D) * sig * torch.randn(B, L, D, device=device, generator=g)
    if equal_variance:
        logvar_q = logvar_p[:, :L].clone()
    else:
        logvar_q = logvar_p[:, :L] + 0.01 * torch.randn(B, L, D, device=device, generator=g)
    noise_q = torch.randn(B, L, D, device=device, generator=g)
    num_drafts = torch.full((B,), L, dtype=torch.int64, device=device)
    det = torch.zeros(B, dtype=torch.bool, device=device)
    return (mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts, det)


# ------------------------------------------------------------------ timing
def bench_us(fn: Callable) -> float:
    return 1e3 * do_bench_ms(fn)


def graph_us(fn: Callable, calls: int = GRAPH_CALLS) -> Optional[float]:
    """Per-call time of ``calls`` invocations captured in one CUDA graph (None if capture fails)."""
    return _graph_us(fn, calls)


def hbm_gbps(nbytes: int = 1 << 30) -> float:
    x = torch.empty(nbytes // 4, device="cuda").normal_()
    y = torch.empty_like(x)
    us = bench_us(lambda: y.copy_(x))
    return 2 * nbytes / (us * 1e-6) / 1e9


try:  # an empty kernel for the launch floor (module level: Triton reads the source)
    import triton as _triton

    @_triton.jit
    def _empty_kernel(x_ptr):
        pass
except Exception:  # pragma: no cover - triton missing
    _empty_kernel = None


def launch_floor_us() -> Tuple[float, Optional[float]]:
    x = torch.empty(1, device="cuda")
    _empty = _empty_kernel

    def run():
        _empty[(1,)](x)

    run()
    return bench_us(run), graph_us(run)


# ------------------------------------------------------------------ providers
def make_ours(backend: str, args, equal_variance: bool):
    B, L1, D = args[0].shape
    why = OP.reasons(dict(device=args[0].device, dtype=args[0].dtype, B=B))[backend]
    if why is not None:
        return None, why, None
    dev = args[0].device
    rs = torch.tensor([1234, 0], dtype=torch.int64, device=dev)
    bufs = dict(out=torch.empty(B, D, device=dev), num_accepted=torch.empty(B, dtype=torch.int32, device=dev),
                log_ratio=torch.empty(B, L1 - 1, device=dev),
                residual_candidates=torch.empty(B, dtype=torch.int32, device=dev),
                fallbacks=torch.empty(B, dtype=torch.bool, device=dev))

    def run():
        return speculative_accept(*args, equal_variance=equal_variance, rng_state=rs, backend=backend, **bufs)

    try:
        res = run()
        torch.cuda.synchronize()
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:140]}", None
    return run, None, res


def make_reference(args, equal_variance: bool, compiled: bool):
    g = torch.Generator(device=args[0].device).manual_seed(0)
    f = reference
    if compiled:
        import logging

        # the reference's host syncs (bool(any_reject.any()), its rejection loop) are graph breaks: expected
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
        try:
            f = torch.compile(reference, dynamic=True)
        except Exception as e:
            return None, f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", None

    def run():
        return f(*args, equal_variance=equal_variance, generator=g)

    try:
        res = run()
        torch.cuda.synchronize()
    except Exception as e:
        what = "torch.compile" if compiled else "reference"
        return None, f"{what} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", None
    return run, None, res


def run_shape(mode: str, B: int, L: int, D: int, hbm: float, compile_ref: bool) -> List[Dict]:
    eq = mode == "eqvar"
    args = make_round(B, L, D, eq, seed=B * 1000 + L * 10 + D % 97)
    nbytes = bytes_moved(B, L, D)
    providers = [("triton", lambda: make_ours("triton", args, eq)), ("cuda", lambda: make_ours("cuda", args, eq)),
                 ("torch", lambda: make_reference(args, eq, False))]
    if compile_ref:
        providers.append(("torch.compile", lambda: make_reference(args, eq, True)))
    rows = []
    for name, factory in providers:
        fn, why, res = factory()
        row = dict(mode=mode, B=B, L=L, D=D, provider=name, bytes=nbytes, hbm_bound_us=nbytes / (hbm * 1e3))
        if fn is None:
            row.update(us=None, graph_us=None, gbps=None, acc=None, cand=None, note=f"n/a ({why})")
        else:
            us = bench_us(fn)
            gus = graph_us(fn) if name in ("triton", "cuda") else None
            acc = res.num_accepted.float().mean().item() / L
            cand = res.residual_candidates.float().mean().item()
            row.update(us=us, graph_us=gus, gbps=nbytes / (us * 1e-6) / 1e9, acc=acc, cand=cand, note="")
        rows.append(row)
    ref_us = next((r["us"] for r in rows if r["provider"] == "torch" and r["us"]), None)
    comp_us = next((r["us"] for r in rows if r["provider"] == "torch.compile" and r["us"]), None)
    for r in rows:
        r["x_eager"] = ref_us / r["us"] if (ref_us and r["us"]) else None
        r["x_compile"] = comp_us / r["us"] if (comp_us and r["us"]) else None
    del args
    torch.cuda.empty_cache()
    return rows


def _f(v, spec):
    return fmt(v, spec)


def format_rows(rows: List[Dict], hbm: float, header: bool) -> List[str]:
    lines = []
    if header:
        lines.append(f"{'mode':<11}{'B':>3}{'L':>3}{'D':>7}  {'provider':<14}{'us':>9}{'graph us':>10}{'GB/s':>8}"
                     f"{'%HBM':>6}{'HBM us':>8}{'x eager':>9}{'x compile':>10}{'acc':>6}{'cand':>6}  note")
    for r in rows:
        pct = _f(100 * r["gbps"] / hbm if r["gbps"] else None, ".0f")
        lines.append(f"{r['mode']:<11}{r['B']:>3}{r['L']:>3}{r['D']:>7}  {r['provider']:<14}{_f(r['us'], '.1f'):>9}"
                     f"{_f(r['graph_us'], '.1f'):>10}{_f(r['gbps'], '.0f'):>8}{pct:>6}{r['hbm_bound_us']:>8.1f}"
                     f"{_f(r['x_eager'], '.1f'):>9}{_f(r['x_compile'], '.1f'):>10}{_f(r['acc'], '.2f'):>6}"
                     f"{_f(r['cand'], '.1f'):>6}  {r['note']}")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="B in {1, 32}, L = 6 only")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of learnedvar, eqvar")
    p.add_argument("--json", default=None, help="write the rows and environment to this file")
    args = p.parse_args(argv)

    if needs_cuda("bench_speculative_accept",
                  "CPU microbenchmark of the reference: pytest bench/bench_speculative_accept.py --benchmark-only"):
        return 0
    os.environ.setdefault("FREE_KERNELS_CHECK_NAN", "0")

    env = print_header("speculative_accept benchmark", __file__, argv)
    hbm = hbm_gbps()
    floor, floor_graph = launch_floor_us()
    print(f"ceiling: HBM copy bandwidth {hbm:.0f} GB/s (1 GiB read + write); single-launch floor: empty Triton "
          f"kernel {floor:.1f} us eager, {_f(floor_graph, '.2f')} us per launch in a CUDA graph")
    print("bytes = 4 * (5 L + 3) * B * D; time = do_bench median (L2 cleared per rep); graph = CUDA graph of "
          f"{GRAPH_CALLS} calls, per call; acc = accepted fraction of drafts, cand = mean residual candidates")
    bs = (1, 32) if args.quick else BS
    ls = (6,) if args.quick else LS
    rows_all: List[Dict] = []
    for mode in [m.strip() for m in args.modes.split(",")]:
        for D in DS:
            for L in ls:
                for B in bs:
                    rows = run_shape(mode, B, L, D, hbm, compile_ref=not args.no_compile)
                    print("\n".join(format_rows(rows, hbm, header=not rows_all)), flush=True)
                    rows_all.extend(rows)
    write_json(args.json, dict(environment=env, hbm_gbps=hbm, launch_floor_us=floor,
                               launch_floor_graph_us=floor_graph, rows=rows_all))
    return 0


# ------------------------------------------------- pytest-benchmark (CPU ok)
def _cpu_round(equal_variance: bool):
    return make_round(2, 4, 256, equal_variance, device="cpu")


def test_reference_cpu_learned_variance(benchmark):
    """The torch reference (the CPU path), B = 2, L = 4, D = 256, unequal variance (rejection sampler)."""
    args = _cpu_round(False)
    g = torch.Generator().manual_seed(0)
    res = benchmark(reference, *args, equal_variance=False, generator=g)
    assert res.out.shape == (2, 256)


def test_reference_cpu_equal_variance(benchmark):
    """The torch reference, B = 2, L = 4, D = 256, equal variance (reflection)."""
    args = _cpu_round(True)
    g = torch.Generator().manual_seed(0)
    res = benchmark(reference, *args, equal_variance=True, generator=g)
    assert res.out.shape == (2, 256)


if __name__ == "__main__":
    sys.exit(main())

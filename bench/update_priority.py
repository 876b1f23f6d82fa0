"""Build the measured backend priority table from the microbenchmarks' JSON outputs.

    python bench/update_priority.py --out free_kernels/ops/backend_priority.json \\
        va.json accept.json drafter.json

Inputs (recognised by their rows, any order, several devices allowed):

* ``bench/bench_verify_attention.py --json``: rows (provider, B, N, dtype, ms); providers
  ``cuda`` and ``triton`` time the op's backends (``triton-pad128`` and ``sdpa-*`` are other
  configurations / baselines, not backends, and are left out);
* ``bench/bench_speculative_accept.py --json``: rows (mode, B, L, D, provider, us), float32
  inputs; providers ``cuda``, ``triton``, ``torch`` (the reference = the torch backend);
* ``bench/bench_drafter.py --json``: draft-step rows (B, tokens, dtype, provider, ms) with every
  fused op forced to one backend: ``fused`` (default dispatch = ``cuda``), ``triton`` and
  ``eager-ref`` (``torch``); the order applies to the drafter's fused ops
  (modulated_layernorm, gated_residual, bias_gelu, draft_epilogue, draft_transition) at the
  drafter's token-row count M = 2 B tokens (CFG-doubled rows).

Each row is placed in its op's shape class by the op's own ``shape_class`` (the function the
dispatcher uses).  Per (op, device, dtype, shape class), backends are ordered by the geometric
mean of their times over the shapes every measured backend ran; a backend with no time there
is left out (the dispatcher appends missing backends in the default order cuda -> triton -> torch).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DRAFTER_OPS = ("modulated_layernorm", "gated_residual", "bias_gelu", "draft_epilogue", "draft_transition")
DRAFTER_PROVIDERS = {"fused": "cuda", "triton": "triton", "eager-ref": "torch"}
ATTENTION_PROVIDERS = {"cuda": "cuda", "triton": "triton"}
ACCEPT_PROVIDERS = {"cuda": "cuda", "triton": "triton", "torch": "torch"}

# (op, device, dtype, shape class) -> shape key -> backend -> time
Measurements = Dict[Tuple[str, str, str, str], Dict[tuple, Dict[str, float]]]


def _shape_class(op: str, ctx: dict) -> str:
    from free_kernels.ops import OPS

    return OPS[op].classify(ctx)


def _kind(doc: dict) -> Optional[str]:
    rows = doc.get("rows") or []
    if not rows:
        return None
    r = rows[0]
    if "heads" in r and "N" in r:
        return "verify_attention"
    if "mode" in r and "L" in r:
        return "speculative_accept"
    if "kind" in r and "tokens" in r:
        return "drafter"
    return None


def collect(docs: Iterable[Tuple[str, dict]]) -> Tuple[Measurements, Dict[tuple, set]]:
    """Times per (op, device, dtype, class) and shape; plus the source files of each key."""
    meas: Measurements = defaultdict(lambda: defaultdict(dict))
    sources: Dict[tuple, set] = defaultdict(set)

    def add(op, device, dtype, ctx, shape, backend, t, src):
        if t is None or not (t > 0):
            return
        key = (op, device, dtype, _shape_class(op, ctx))
        meas[key][shape][backend] = float(t)
        sources[key].add(src)

    for src, doc in docs:
        kind = _kind(doc)
        device = (doc.get("environment") or {}).get("device")
        if kind is None or not device:
            print(f"update_priority: {src}: not a recognised benchmark JSON (no device or rows), skipped")
            continue
        if device == "cpu":  # the table orders backends for CUDA tensors only
            print(f"update_priority: {src}: measured on the CPU, skipped")
            continue
        for r in doc["rows"]:
            if kind == "verify_attention":
                b = ATTENTION_PROVIDERS.get(r.get("provider"))
                if b is not None:
                    add("verify_attention", device, r["dtype"], dict(B=r["B"], N=r["N"]),
                        (r["B"], r["N"], r.get("heads"), r.get("head_dim")), b, r.get("ms"), src)
            elif kind == "speculative_accept":
                b = ACCEPT_PROVIDERS.get(r.get("provider"))
                if b is not None:
                    add("speculative_accept", device, r.get("dtype", "float32"), dict(B=r["B"], L=r["L"], D=r["D"]),
                        (r["mode"], r["B"], r["L"], r["D"]), b, r.get("us"), src)
            elif kind == "drafter" and r.get("kind") == "draft":
                b = DRAFTER_PROVIDERS.get(r.get("provider"))
                if b is not None:
                    M = 2 * r["B"] * r["tokens"]
                    for op in DRAFTER_OPS:
                        add(op, device, r["dtype"], dict(M=M), (r["B"], r["tokens"]), b, r.get("ms"), src)
    return meas, sources


def _geomean(v: List[float]) -> float:
    return math.exp(sum(math.log(x) for x in v) / len(v))


def order_entry(shapes: Dict[tuple, Dict[str, float]]) -> Tuple[List[str], Dict[str, float], int]:
    """(backends fastest first, geometric-mean time of each, number of shapes compared)."""
    backends = sorted({b for per in shapes.values() for b in per})
    common = [s for s, per in shapes.items() if all(b in per for b in backends)]
    if common:
        times = {b: _geomean([shapes[s][b] for s in common]) for b in backends}
        n = len(common)
    else:  # no shape ran on every backend: each backend over the shapes it ran
        times = {b: _geomean([per[b] for per in shapes.values() if b in per]) for b in backends}
        n = 0
    return sorted(backends, key=lambda b: times[b]), times, n


def build(docs: Iterable[Tuple[str, dict]]) -> dict:
    meas, sources = collect(docs)
    entries = []
    for key in sorted(meas):
        order, times, n = order_entry(meas[key])
        op, device, dtype, sc = key
        entries.append(dict(op=op, device=device, dtype=dtype, shape_class=sc, order=order,
                            geomean_time={b: round(t, 6) for b, t in times.items()}, shapes_compared=n,
                            sources=sorted(sources[key])))
    return {
        "format": 1,
        "about": ("Measured backend order per (op, device, dtype, shape class), fastest first; written by "
                  "bench/update_priority.py from the microbenchmark JSON outputs. Missing entries use the default "
                  "order cuda -> triton -> torch."),
        "entries": entries,
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="table to write (e.g. free_kernels/ops/backend_priority.json)")
    p.add_argument("inputs", nargs="+", help="JSON files written by the benchmarks' --json")
    args = p.parse_args(argv)
    docs = []
    for path in args.inputs:
        with open(path) as f:
            docs.append((os.path.basename(path), json.load(f)))
    table = build(docs)
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    for e in table["entries"]:
        times = ", ".join(f"{b} {t:.4g}" for b, t in e["geomean_time"].items())
        print(f"{e['op']:<20} {e['device']:<24} {e['dtype']:<9} {e['shape_class']:<6} "
              f"{' > '.join(e['order']):<24} ({times}; {e['shapes_compared']} shapes)")
    print(f"wrote {args.out}: {len(table['entries'])} entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())

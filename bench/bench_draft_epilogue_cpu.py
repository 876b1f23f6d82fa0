"""Benchmark: the draft-step epilogue on the CPU, host kernel (``cpu``) against the torch composition.

``ops.draft_epilogue`` on float32 CPU tensors, backend ``cpu`` (csrc/kernels/draft_epilogue_host.cpp, one
single-threaded call) and ``torch`` (reference/draft_epilogue.py: ~40 torch ops), at 1 thread and at
torch's thread count, for the demo's draft step (R = 1 and 10 samples, CFG, H = 128, 16 tokens, p = 4,
C = 1) and larger heads up to DiT-XL/2's (H = 1152, 256 tokens, p = 2, C = 4).  ``work`` is the head
GEMM's multiply-adds as the backend's probe counts them (feature rows x H x eps columns x 2); the
``cpu`` backend declines calls above ``CPU_MAX_WORK`` (ops/draft_epilogue.py), where this table shows
torch's GEMM winning.  Both backends are timed interleaved, min over ``--reps`` of the mean of
``--iters`` calls, through the public op (validation and dispatch included).

    python bench/bench_draft_epilogue_cpu.py
    python bench/bench_draft_epilogue_cpu.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from free_kernels import _env, ops  # noqa: E402
from free_kernels.diffusion import create_diffusion  # noqa: E402

# (label, R, H, S, p, C): G = 2 (CFG) everywhere, learned variance (C_out = 2C)
SHAPES = [
    ("demo, batch 1", 1, 128, 16, 4, 1),
    ("demo, batch 10", 10, 128, 16, 4, 1),
    ("H 384, 64 tokens, batch 4", 4, 384, 16, 2, 4),
    ("H 1152, 64 tokens, batch 1", 1, 1152, 16, 2, 4),
    ("DiT-XL/2 256 px, batch 1", 1, 1152, 32, 2, 4),
    ("DiT-XL/2 256 px, batch 2", 2, 1152, 32, 2, 4),
]


def case(R, H, S, p, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = (S // p) ** 2
    P = p * p * 2 * C

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    return dict(h=rnd(2 * R, N, H), shift=rnd(2 * R, H, scale=0.1), scale=rnd(2 * R, H, scale=0.1),
                weight=rnd(P, H, scale=H ** -0.5), bias=rnd(P, scale=0.1), x=rnd(R, C, S, S),
                noise=rnd(R, C, S, S), p=p)


def timed(fn, iters, reps):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters * 1e6)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    why = _env.host_entry_unavailable_reason("draft_epilogue_host")
    if why is not None:
        print(f"the cpu backend cannot run here: {why}")
        return 0
    dif = create_diffusion("250")
    tables = dif.schedule_tables()
    threads = sorted({1, torch.get_num_threads()})
    rows = []
    print(f"draft_epilogue on the CPU, us per call (torch {torch.__version__}, {os.cpu_count()} CPUs)")
    print("| shape | work (multiply-adds) | threads | torch | cpu | torch / cpu |")
    print("|---|---|---|---|---|---|")
    for label, R, H, S, p, C in SHAPES:
        t = case(R, H, S, p, C)
        idx = torch.full((R,), 125, dtype=torch.int64)
        work = 2 * R * (S // p) ** 2 * H * p * p * C * 2

        def call(backend):
            return ops.draft_epilogue(t["h"], t["shift"], t["scale"], t["weight"], t["bias"], t["x"], tables, idx,
                                      t["noise"], patch_size=p, cfg_scale=2.0, guidance_channels=min(3, C),
                                      learned_variance=True, backend=backend)

        for th in threads:
            torch.set_num_threads(th)
            best = {"torch": float("inf"), "cpu": float("inf")}
            with torch.inference_mode():
                for b in best:
                    for _ in range(5):
                        call(b)
                for _ in range(a.reps):
                    for b in best:
                        best[b] = min(best[b], timed(lambda: call(b), a.iters, 1))
            row = dict(shape=label, R=R, H=H, S=S, p=p, C=C, work=work, threads=th, torch_us=best["torch"],
                       cpu_us=best["cpu"])
            rows.append(row)
            print(f"| {label} | {work} | {th} | {best['torch']:.1f} | {best['cpu']:.1f} | "
                  f"{best['torch'] / best['cpu']:.2f} |", flush=True)
    torch.set_num_threads(max(threads))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(command=" ".join(sys.argv), torch=torch.__version__, cpus=os.cpu_count(), rows=rows), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

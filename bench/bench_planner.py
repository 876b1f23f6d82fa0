"""draft_length="auto" against every fixed L and the baseline, in one run (issue: drafting that pays).

    python bench/bench_planner.py                               # demo, 250 steps, CFG 2, batch 1 (2 images) and 10
    python bench/bench_planner.py --images 4 --batches 1 --json runs/planner.json

For each batch size: the baseline ancestral sampler, exact FREE with the
planner (after its calibration, which is reported separately) and exact FREE
with every fixed L in 1..8, on the same images (x_T and labels), interleaved
per image batch so that load from other jobs hits every method alike.  Prints
seconds per image, the speed-up over the baseline and auto's ratio to the best
fixed L.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import free_kernels as fk
from free_kernels.cli.common import UsageError, check_cfg_scale, load_drafter, load_target, sample_baseline


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2, help="images at batch 1 (default 2)")
    ap.add_argument("--batches", default="1,10")
    ap.add_argument("--steps", default="250")
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--max-length", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        cfg = check_cfg_scale(args.cfg_scale)  # guidance above 1, in the baseline and in FREE alike
    except UsageError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    target, _ = load_target(None)  # the embedded demo DiT and its drafter
    drafter, _, _ = load_drafter(None, target, demo_target=True)
    d = fk.create_diffusion(args.steps)
    print(f"device cpu ({platform.machine()}), torch {torch.__version__}, threads {args.threads}; demo, "
          f"{args.steps} steps, CFG {cfg}")
    results = {}
    for B in [int(b) for b in args.batches.split(",")]:
        n = args.images if B == 1 else B
        g = torch.Generator().manual_seed(B)
        noise = torch.randn(n, 1, 16, 16, generator=g)
        y = torch.arange(n) % 10
        samplers = {"auto": fk.FreeSampler(target, drafter, d)}
        t0 = time.perf_counter()
        samplers["auto"].prepare(B, cfg)
        calib = time.perf_counter() - t0
        for L in range(1, args.max_length + 1):
            samplers[f"L={L}"] = fk.FreeSampler(target, drafter, d, draft_length=L)
        wall = {k: 0.0 for k in ["baseline", *samplers]}
        for a in range(0, n, B):
            z, yy = noise[a:a + B], y[a:a + B]
            t0 = time.perf_counter()
            sample_baseline(target, d, z, yy, cfg_scale=cfg)
            wall["baseline"] += time.perf_counter() - t0
            for k, s in samplers.items():
                t0 = time.perf_counter()
                s.sample(z, yy, cfg_scale=cfg, generator=torch.Generator().manual_seed(a))
                wall[k] += time.perf_counter() - t0
        per = {k: v / n for k, v in wall.items()}
        best_fixed = min((v, k) for k, v in per.items() if k.startswith("L="))
        results[B] = dict(per_image_s=per, calibration_s=calib, best_fixed=best_fixed[1],
                          auto_vs_best_fixed=best_fixed[0] / per["auto"],
                          speedup={k: per["baseline"] / v for k, v in per.items()})
        print(f"\nbatch {B} ({n} images; planner calibration {calib:.1f} s, once, cached)")
        print("| sampler | s/image | speed-up |")
        print("|---|---|---|")
        for k, v in per.items():
            print(f"| {k} | {v:.3f} | {per['baseline'] / v:.2f}x |")
        print(f"auto vs the best fixed L ({best_fixed[1]}): {best_fixed[0] / per['auto']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

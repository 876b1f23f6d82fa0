"""Demo-model FREE measurements for bench/RESULTS.md (one run, one device).

    python bench/bench_demo.py --out runs/bench_demo.json            # everything, CPU ok
    python bench/bench_demo.py --quick                                # small smoke version

Sections (all on the embedded demo DiT and its shipped drafter unless named):
1. steps per target call and acceptance (early / middle / late thirds of the schedule) for
   250 and 50 steps, draft lengths 2, 4, 6, 8, learned variance;
2. learned vs fixed variance (250 steps, L = 6);
3. drafters: frozen (training-free), shipped (depth 1), and any extra drafters passed with
   ``--drafter NAME=PATH`` (e.g. depth 2, or another loss);
4. wall clock per image of the baseline vs exact FREE vs FREE (relax) at batch 1 and 8;
5. quality (digit classifier): accuracy and Frechet distance for baseline (two independent runs
   give the sampling noise), exact FREE and FREE (relax).
Prints markdown tables; ``--out`` also stores the raw numbers as JSON.

Models, seeds and the baseline are free-sample's (:mod:`free_kernels.cli.common`): the demo
target and drafter through the one loader, x_T and the baseline's step noise from one stream
per sample (a sample does not depend on its batch), and the official sampling call with
guidance above scale 1.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

import free_kernels as fk
from free_kernels.cli.common import (
    FREE_STREAM, UsageError, baseline_generators, check_cfg_scale, derive_seed, initial_noise, load_drafter,
    load_target, sample_baseline,
)
from free_kernels.models import FeatureDrafter, FrozenFeatureDrafter


def _inputs(n, seed, C, S, num_classes=10):
    """x_T (free-sample's per-sample streams) and labels 0, 1, ... (mod classes)."""
    return initial_noise(seed, n, (C, S, S)), torch.arange(n) % num_classes


def run_free(target, drafter, steps, L, n, seed, *, learned=True, cfg=1.0, relax=None):
    d = fk.create_diffusion(steps, learn_sigma=learned)
    s = fk.FreeSampler(target, drafter, d, draft_length=L, relax=relax)
    noise, y = _inputs(n, seed, target.in_channels, target.input_size)
    t0 = time.perf_counter()
    out, st = s.sample(noise, y, cfg_scale=cfg,
                       generator=torch.Generator().manual_seed(derive_seed(seed, FREE_STREAM, 0)))
    return out, st, time.perf_counter() - t0


def run_baseline(target, steps, n, seed, *, learned=True, cfg=1.0):
    """The official sampling loop (cli.common.sample_baseline) on n samples with free-sample's streams."""
    d = fk.create_diffusion(steps, learn_sigma=learned)
    noise, y = _inputs(n, seed, target.in_channels, target.input_size)
    cond, uncond = baseline_generators(seed, n, cfg_scale=cfg)
    t0 = time.perf_counter()
    out = sample_baseline(target, d, noise, y, cfg_scale=cfg, generator=cond, uncond_generator=uncond)
    return out, time.perf_counter() - t0


def fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--n", type=int, default=32, help="samples per acceptance measurement")
    p.add_argument("--quality-n", type=int, default=500, help="samples per quality measurement")
    p.add_argument("--quality-baselines", type=int, default=2,
                   help="independent baseline runs in the quality section (>= 2; their pairwise FDs are the noise)")
    p.add_argument("--quality-relax", default="0.5,2.0", help="relax strengths in the quality section ('' = none)")
    p.add_argument("--cfg-scale", type=float, default=None, help="default: the drafter's training CFG")
    p.add_argument("--drafter", action="append", default=[], help="NAME=PATH extra drafters to compare")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--sections", default="1,2,3,4,5")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = {int(s) for s in args.sections.split(",")}
    try:
        target, _ = load_target(None)  # the embedded demo DiT
        shipped, _, extra = load_drafter(None, target, demo_target=True)
        cfg = check_cfg_scale(args.cfg_scale if args.cfg_scale is not None else extra.get("cfg_scale", 1.0))
    except UsageError as e:
        p.error(str(e))
    n = 4 if args.quick else args.n
    qn = 20 if args.quick else args.quality_n
    res = dict(device=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
               torch=torch.__version__, cfg_scale=cfg, n=n, sections={})
    print(f"# demo FREE benchmark: torch {torch.__version__}, {torch.get_num_threads()} CPU threads, cfg {cfg}, "
          f"n={n} samples per cell\n")

    if 1 in sections:
        rows = []
        print("## steps per target call (exact FREE, learned variance, shipped drafter)\n")
        print("| steps | L | steps/target call | acceptance | early | middle | late | target calls |")
        print("|---|---|---|---|---|---|---|---|")
        for steps in ("250", "50"):
            for L in (2, 4, 6, 8):
                _, st, wall = run_free(target, shipped, steps, L, n, seed=1, cfg=cfg)
                e, m, l = st.as_dict()["acceptance_early_middle_late"]
                rows.append(dict(steps=steps, L=L, spc=st.steps_per_target_call, acc=st.acceptance_rate,
                                 early=e, middle=m, late=l, target_calls=st.target_calls, wall=wall,
                                 acceptance_by_index=st.acceptance_by_index))
                print(f"| {steps} | {L} | {st.steps_per_target_call:.2f} | {fmt(st.acceptance_rate, 3)} | "
                      f"{fmt(e, 3)} | {fmt(m, 3)} | {fmt(l, 3)} | {st.target_calls} |", flush=True)
        res["sections"]["draft_length"] = rows
        print()

    if 2 in sections:
        rows = []
        print("## learned vs fixed variance (250 steps, L = 6)\n")
        print("| variance | drafter | steps/target call | acceptance | early | middle | late | residual candidates / rejection |")
        print("|---|---|---|---|---|---|---|---|")
        for learned in (True, False):
            for name, dr in (("shipped", shipped), ("frozen", FrozenFeatureDrafter(target))):
                _, st, _ = run_free(target, dr, "250", 6, n, seed=1, learned=learned, cfg=cfg)
                e, m, l = st.as_dict()["acceptance_early_middle_late"]
                rc = st.residual_candidates / max(st.residual_rejections, 1) if learned else None
                rows.append(dict(learned=learned, drafter=name, spc=st.steps_per_target_call,
                                 acc=st.acceptance_rate, early=e, middle=m, late=l, cand_per_rej=rc,
                                 max_candidates=st.residual_max_candidates, fallbacks=st.residual_fallbacks))
                print(f"| {'learned' if learned else 'fixed (large)'} | {name} | {st.steps_per_target_call:.2f} | "
                      f"{fmt(st.acceptance_rate, 3)} | {fmt(e, 3)} | {fmt(m, 3)} | {fmt(l, 3)} | {fmt(rc, 1)} |",
                      flush=True)
        res["sections"]["variance"] = rows
        print()

    if 3 in sections:
        rows = []
        drafters = [("frozen (training-free)", FrozenFeatureDrafter(target)), ("shipped", shipped)]
        for spec in args.drafter:
            name, path = spec.split("=", 1)
            drafters.append((name, FeatureDrafter.load(path, target=target)))
        print("## drafters (250 steps, L = 6, learned variance)\n")
        print("| drafter | depth | steps/target call | acceptance | early | middle | late |")
        print("|---|---|---|---|---|---|---|")
        for name, dr in drafters:
            _, st, _ = run_free(target, dr, "250", 6, n, seed=1, cfg=cfg)
            e, m, l = st.as_dict()["acceptance_early_middle_late"]
            depth = getattr(dr, "depth", 0)
            rows.append(dict(drafter=name, depth=depth, spc=st.steps_per_target_call, acc=st.acceptance_rate,
                             early=e, middle=m, late=l))
            print(f"| {name} | {depth} | {st.steps_per_target_call:.2f} | {fmt(st.acceptance_rate, 3)} | "
                  f"{fmt(e, 3)} | {fmt(m, 3)} | {fmt(l, 3)} |", flush=True)
        res["sections"]["drafters"] = rows
        print()

    if 4 in sections:
        rows = []
        print("## wall clock per image, 250 steps, L = 6 (CPU)\n")
        print("| batch | baseline s/img | exact FREE s/img | speed-up | FREE (relax 0.5, approx.) s/img | speed-up |")
        print("|---|---|---|---|---|---|")
        for B in (1, 8):
            reps = 1 if args.quick else (4 if B == 1 else 1)
            tb = tf = tr = 0.0
            for r in range(reps):
                _, w = run_baseline(target, "250", B, seed=10 + r, cfg=cfg)
                tb += w
                _, _, w = run_free(target, shipped, "250", 6, B, seed=10 + r, cfg=cfg)
                tf += w
                _, _, w = run_free(target, shipped, "250", 6, B, seed=10 + r, cfg=cfg, relax=0.5)
                tr += w
            per = reps * B
            rows.append(dict(batch=B, baseline=tb / per, free=tf / per, relax=tr / per))
            print(f"| {B} | {tb / per:.3f} | {tf / per:.3f} | {tb / tf:.2f}x | {tr / per:.3f} | {tb / tr:.2f}x |",
                  flush=True)
        res["sections"]["wall"] = rows
        print()

    if 5 in sections:
        try:
            from free_kernels.demo.classifier import load_classifier
            from free_kernels.demo.metrics import digit_quality, fd_between
        except ImportError as e:
            print(f"(quality section skipped: {e})")
        else:
            clf = load_classifier()
            rows = []
            print(f"## quality ({qn} samples each, 250 steps, digit classifier)\n")
            print("| sampler | steps/target call | accuracy | FD vs real digits | FD vs baseline run A |")
            print("|---|---|---|---|---|")
            base_a, _ = run_baseline(target, "250", qn, seed=100, cfg=cfg)
            _, y = _inputs(qn, 100, target.in_channels, target.input_size)
            runs = [("baseline run A", base_a, None)]
            if args.quality_baselines < 2:
                raise SystemExit("--quality-baselines must be >= 2")
            bases = [base_a]
            for k in range(1, args.quality_baselines):
                bk, _ = run_baseline(target, "250", qn, seed=200 if k == 1 else 300 + 100 * k, cfg=cfg)
                bases.append(bk)
                runs.append((f"baseline run {chr(ord('A') + k)}", bk, None))
            out, st, _ = run_free(target, shipped, "250", 6, qn, seed=300, cfg=cfg)
            runs.append(("exact FREE (L=6)", out, st))
            lams = [float(v) for v in args.quality_relax.split(",") if v.strip()]
            for lam in lams:
                out, st, _ = run_free(target, shipped, "250", 6, qn, seed=300, cfg=cfg, relax=lam)
                runs.append((f"FREE (relax {lam}, approximate)", out, st))
            for name, x, st in runs:
                q = digit_quality(x, y, clf)
                fdb = fd_between(x, base_a, clf) if name != "baseline run A" else 0.0
                rows.append(dict(name=name, spc=st.steps_per_target_call if st else 1.0, accuracy=q["accuracy"],
                                 fd=q["fd"], fd_vs_baseline=fdb))
                print(f"| {name} | {st.steps_per_target_call if st else 1.0:.2f} | {q['accuracy']:.3f} | "
                      f"{q['fd']:.2f} | {fdb:.2f} |", flush=True)
            res["sections"]["quality"] = rows
            if len(bases) > 2:  # the noise of the distance: every pair of baseline runs, and FREE to each
                pairs = [fd_between(bases[i], bases[j], clf) for i in range(len(bases)) for j in range(i + 1, len(bases))]
                exact = next(x for name, x, _ in runs if name.startswith("exact FREE"))
                to_free = [fd_between(exact, b, clf) for b in bases]
                print(f"\nFD between baseline runs ({len(pairs)} pairs): min {min(pairs):.2f}, median "
                      f"{float(np.median(pairs)):.2f}, max {max(pairs):.2f}; exact FREE to each baseline run: min "
                      f"{min(to_free):.2f}, median {float(np.median(to_free)):.2f}, max {max(to_free):.2f}")
                res["sections"]["quality_noise"] = dict(baseline_pairs=pairs, exact_free_to_baselines=to_free)
            print()

    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2, default=float)
    return res


if __name__ == "__main__":
    main()

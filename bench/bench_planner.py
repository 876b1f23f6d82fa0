"""draft_length="auto" against every fixed L and the baseline, on a quiet machine and with one core busy.

    python bench/bench_planner.py                               # demo, 250 steps, CFG 2, batch 1, 4, 10; quiet + busy
    python bench/bench_planner.py --images 4 --batches 1 --load quiet --json runs/planner.json
    python bench/bench_planner.py --no-fixed --compare-rev HEAD~3    # also auto with an earlier sampler
    python bench/bench_planner.py --no-fixed --torch-epilogue         # also auto without the host epilogue

Every FREE sampler is calibrated first, on the machine as it is (quiet), and the calibration seconds are
reported per sampler.  Then, for each ``--load`` condition in turn (``quiet``; ``busy``: a plain Python
busy loop started for the duration of the condition's runs and pinned to the last core where the OS allows,
the issue's "one core busy"), and each batch size: the baseline ancestral sampler at 1 thread and at
``--threads`` (default: torch's default, all cores), exact FREE with the adaptive planner at ``--threads``
("auto": its plan picks 1 thread or all per round and follows what rounds cost now), the frozen planner
("auto (frozen)": the quiet calibration alone, what ``--reproducible`` runs), auto at 1 thread, and every
fixed L in 1..``--max-length`` at ``--threads``, on the same images (x_T and labels), interleaved per image
batch (the order rotating from batch to batch) so that other load hits every method alike; ``--repeats``
image batches at batch sizes above 1.  Samplers start fresh in each condition (their planners read the
costs cached while quiet).  Prints seconds per image, the speed-up over the faster baseline of the same
condition, auto's ratio to the best fixed L, and the sampler's own draft-phase time per drafter call.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time

import torch

import free_kernels as fk
from free_kernels.cli.common import UsageError, check_cfg_scale, load_drafter, load_target, sample_baseline

LOADS = ("quiet", "busy")


@contextlib.contextmanager
def environment(values):
    """Set the environment variables ``values`` (a dict or None) for the block, restoring them after."""
    before = {k: os.environ.get(k) for k in (values or {})}
    os.environ.update(values or {})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def busy_core(on: bool, niceness: int = 0):
    """A plain Python busy loop in its own process for the block (pinned to the last core where the OS allows);
    stopped, by its own process id, when the block ends."""
    if not on:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=(lambda: os.nice(niceness)) if niceness else None)
    try:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(proc.pid, {cores[-1]})
        time.sleep(0.5)  # let it take its core
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2, help="images at batch 1 (default 2)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="image batches at every batch size above 1 (default 3; a run of one batch per method "
                         "is at the mercy of a few seconds of load)")
    ap.add_argument("--batches", default="1,4,10")
    ap.add_argument("--load", default="quiet,busy",
                    help="conditions, in order: quiet, busy (a busy loop on one core); default quiet,busy")
    ap.add_argument("--busy-nice", type=int, default=0,
                    help="niceness of the busy loop (default 0: an ordinary process; a smoke test on a shared "
                         "machine may pass 19)")
    ap.add_argument("--steps", default="250")
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--max-length", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="FREE's thread cap (default 0: torch's default)")
    ap.add_argument("--drafter", action="append", default=[], metavar="NAME=PATH",
                    help="also run auto (at the cap) with this drafter file; repeatable")
    ap.add_argument("--no-fixed", action="store_true", help="skip the fixed-L rows")
    ap.add_argument("--torch-epilogue", action="store_true",
                    help="also run auto (at the cap) with the draft epilogue on its torch composition "
                         "(FREE_KERNELS_BACKEND_DRAFT_TRANSITION=torch: no host kernel), calibrated so")
    ap.add_argument("--compare-rev", default=None, metavar="REV",
                    help="also run auto (at the cap) with the sampler of this git revision (its sampler.py only)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        cfg = check_cfg_scale(args.cfg_scale)  # guidance above 1, in the baseline and in FREE alike
    except UsageError as e:
        ap.error(str(e))
    if args.images < 1:
        ap.error(f"--images must be >= 1, got {args.images}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.max_length < 1:
        ap.error(f"--max-length must be >= 1, got {args.max_length}")
    loads = [w.strip() for w in args.load.split(",") if w.strip()]
    if not loads or any(w not in LOADS for w in loads):
        ap.error(f"--load must list quiet and/or busy, got {args.load!r}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        ap.error(f"--batches must list ints >= 1, got {args.batches!r}")
    cap = args.threads or torch.get_num_threads()
    target, _ = load_target(None)  # the embedded demo DiT and its drafter
    drafter, _, _ = load_drafter(None, target, demo_target=True)
    extra = []
    for spec in args.drafter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            ap.error(f"--drafter {spec!r}: expected NAME=PATH")
        extra.append((name, load_drafter(path, target)[0]))
    old_sampler = None
    if args.compare_rev:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _common import sampler_of_revision

        try:
            old_sampler = sampler_of_revision(args.compare_rev)
        except ValueError as e:
            ap.error(f"--compare-rev: {e}")
    d = fk.create_diffusion(args.steps)
    print(f"device cpu ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, FREE thread cap "
          f"{cap}; demo, {args.steps} steps, CFG {cfg}; conditions {', '.join(loads)}")
    print("command: python " + " ".join([os.path.relpath(__file__)] + list(sys.argv[1:] if argv is None else argv)))

    envs = {"auto (torch epilogue)": {"FREE_KERNELS_BACKEND_DRAFT_TRANSITION": "torch"}}

    def samplers(B):
        """{name: (sampler or None for the baseline, threads)} in a fixed order, fresh planners."""
        runs = {"baseline (1 thread)": (None, 1)}
        if cap > 1:
            runs[f"baseline ({cap} threads)"] = (None, cap)
        runs["auto"] = (fk.FreeSampler(target, drafter, d), cap)
        runs["auto (frozen)"] = (fk.FreeSampler(target, drafter, d, plan="frozen"), cap)
        if cap > 1:
            runs["auto (1 thread)"] = (fk.FreeSampler(target, drafter, d), 1)
        for name, dr in extra:
            runs[f"auto ({name})"] = (fk.FreeSampler(target, dr, d), cap)
        if old_sampler is not None:
            runs[f"auto (sampler of {args.compare_rev})"] = (old_sampler(target, drafter, d), cap)
        if args.torch_epilogue:
            runs["auto (torch epilogue)"] = (fk.FreeSampler(target, drafter, d), cap)
        for L in range(1, 0 if args.no_fixed else args.max_length + 1):
            runs[f"L={L}"] = (fk.FreeSampler(target, drafter, d, draft_length=L), cap)
        return runs

    # every calibration on the machine as it is now (quiet), before any condition's runs
    calib = {}
    for B in batches:
        for k, (s, th) in samplers(B).items():
            if s is not None and getattr(s, "planner", None) is not None:
                torch.set_num_threads(th)
                t0 = time.perf_counter()
                with environment(envs.get(k)):
                    s.prepare(B, cfg)
                calib[(B, k)] = time.perf_counter() - t0
        print(f"batch {B}: calibration " + ", ".join(f"{k} {v:.1f} s" for (b, k), v in calib.items() if b == B)
              + " (cached: the conditions' samplers read it)")

    results = {}
    for load in loads:
        for B in batches:
            n = args.images if B == 1 else B * args.repeats
            g = torch.Generator().manual_seed(B)
            noise = torch.randn(n, 1, 16, 16, generator=g)
            y = torch.arange(n) % 10
            runs = samplers(B)
            for k, (s, th) in runs.items():  # fresh planners read the cached costs before the load starts
                if s is not None and getattr(s, "planner", None) is not None:
                    torch.set_num_threads(th)
                    with environment(envs.get(k)):
                        s.prepare(B, cfg)
            wall = {k: 0.0 for k in runs}
            phases = {k: [0.0, 0] for k in runs}  # the sampler's own draft-phase time and drafter calls
            replanned = {k: [0, 0] for k in runs}
            with busy_core(load == "busy", args.busy_nice):
                for a in range(0, n, B):
                    z, yy = noise[a:a + B], y[a:a + B]
                    names = list(runs)
                    r = (a // B) % len(names)  # each batch starts the rotation at another method
                    for k in names[r:] + names[:r]:
                        s, th = runs[k]
                        torch.set_num_threads(th)
                        with environment(envs.get(k)):
                            t0 = time.perf_counter()
                            if s is None:
                                sample_baseline(target, d, z, yy, cfg_scale=cfg)
                            else:
                                _, st = s.sample(z, yy, cfg_scale=cfg, generator=torch.Generator().manual_seed(a))
                                phases[k][0] += st.time_draft_s
                                phases[k][1] += st.drafter_calls
                                if st.plan:
                                    replanned[k][0] += st.plan.get("replanned_rounds", 0)
                                    replanned[k][1] += st.rounds
                            wall[k] += time.perf_counter() - t0
            torch.set_num_threads(cap)
            per = {k: v / n for k, v in wall.items()}
            base = min(v for k, v in per.items() if k.startswith("baseline"))
            fixed = [(v, k) for k, v in per.items() if k.startswith("L=")]
            best_fixed = min(fixed) if fixed else (float("nan"), None)
            draft_ms = {k: (1e3 * t / c if c else None) for k, (t, c) in phases.items()}
            results[f"{load}/{B}"] = dict(
                load=load, batch=B, images=n, per_image_s=per, speedup={k: base / v for k, v in per.items()},
                calibration_s={k: v for (b, k), v in calib.items() if b == B}, best_fixed=best_fixed[1],
                auto_vs_best_fixed=best_fixed[0] / per["auto"] if fixed else None,
                replanned_rounds={k: v for k, v in replanned.items() if v[1]}, draft_ms_per_drafter_call=draft_ms)
            print(f"\n{load}, batch {B} ({n} images)")
            print("| sampler | threads | s/image | speed-up | calibration s | rounds re-planned | draft ms / call |")
            print("|---|---|---|---|---|---|---|")
            for k, v in per.items():
                dm = "-" if draft_ms[k] is None else f"{draft_ms[k]:.3f}"
                cs = calib.get((B, k))
                rp = replanned[k]
                print(f"| {k} | {runs[k][1]} | {v:.3f} | {base / v:.2f}x | {'-' if cs is None else f'{cs:.1f}'} | "
                      f"{f'{rp[0]} / {rp[1]}' if rp[1] else '-'} | {dm} |")
            print("speed-up against the faster baseline of this condition" + (
                f"; auto vs the best fixed L ({best_fixed[1]}): {best_fixed[0] / per['auto']:.2f}x" if fixed else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""Benchmark: acceptance along the dimension ladder (D = 256, 1024, 4096), one command.

Every rung is a class-conditional DiT on the same MNIST digit family (free_kernels.demo.data.DATASETS)
with its drafter trained by the shipped recipe (``free-train-drafter --loss ... --respacings
50,100,250,1000``).  Per rung it measures:

* steps per target call of exact FREE at 50 and 250 steps, fixed L = ``--draft-length`` (a batch of
  ``--samples``) and ``draft_length="auto"`` (batch 1, ``--auto-samples`` images, this machine's plan);
* acceptance along the schedule (accepted / judged drafts per respaced index, fixed L, 250 steps);
* the whitened error per element |d|^2 / D along the schedule: |d|^2 = sum over the D output elements
  of ((mu_target - mu_draft) / sigma)^2 for one draft from the exact parent features, on
  ``--eval-trajectories`` fresh baseline trajectories at 250 steps; the equal-variance acceptance it
  predicts, 2 Phi(-|d| / 2) (= 1 - erf(|d| / (2 sqrt 2))), is printed beside the measured one;
* optionally (``--quality N``) sample quality through the digit classifier: accuracy of N
  class-conditional samples of two baseline runs and one exact FREE run (L = 6) at 250 steps, FD
  between the two baseline runs against FD of FREE to the first (every digit of a sample is classified:
  a mosaic shows four);

and projects |d|^2 / D to D = 16384 from a power-law fit over the rungs (assumptions printed with it).
Writes ``--out`` (JSON), ``--plot`` (PNG: acceptance and |d|^2 / D against the timestep, one curve per D)
and prints a markdown table.

    python bench/bench_ladder.py                                  # the three rungs, shipped / runs/ files
    python bench/bench_ladder.py --rung digits32=runs/digits32_dit/demo_dit.safetensors,runs/digits32_drafter/drafter.safetensors
    python bench/bench_ladder.py --quality 200 --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import free_kernels as fk  # noqa: E402
from free_kernels.cli.common import load_drafter, load_target  # noqa: E402
from free_kernels.demo import DRAFTER_FILE, TARGET_FILE, demo_files  # noqa: E402
from free_kernels.demo.data import dataset_spec, digit_tiles  # noqa: E402
from free_kernels.distill import evaluate_acceptance, generate_trajectories  # noqa: E402

RUNGS = ("digits16", "digits32", "mosaic")


def default_files(name):
    """(target, drafter) of a rung: the shipped demo's where it ships, else the training commands' outputs."""
    if name == "digits16":
        return TARGET_FILE, DRAFTER_FILE
    shipped = demo_files(name)
    if shipped is not None:
        return shipped
    return f"runs/{name}_dit/demo_dit.safetensors", f"runs/{name}_drafter/drafter.safetensors"


def parse_rungs(items):
    rungs = {n: default_files(n) for n in RUNGS}
    for item in items or []:
        name, _, files = item.partition("=")
        if name not in RUNGS or files.count(",") != 1:
            raise SystemExit(f"error: --rung {item!r}: expected NAME=TARGET,DRAFTER with NAME in {', '.join(RUNGS)}")
        rungs[name] = tuple(files.split(","))
    return rungs


def predicted_acceptance(d2):
    """2 Phi(-|d| / 2): the acceptance of a draft whose mean is |d| whitened units off (equal variances)."""
    return [None if v is None else float(math.erfc(math.sqrt(max(v, 0.0)) / (2 * math.sqrt(2)))) for v in d2]


def run_free(target, drafter, steps, L, noise, y, cfg, gc, seed):
    s = fk.FreeSampler(target, drafter, fk.create_diffusion(str(steps)), draft_length=L)
    with torch.inference_mode():
        x, st = s.sample(noise, y, cfg_scale=cfg, guidance_channels=gc, generator=torch.Generator().manual_seed(seed))
    return x, st


def run_auto(target, drafter, steps, noise, y, cfg, gc, seed):
    parts = []
    for i in range(noise.shape[0]):
        _, st = run_free(target, drafter, steps, "auto", noise[i:i + 1], y[i:i + 1], cfg, gc, seed + i)
        parts.append(st)
    return fk.FreeStats.merged(parts)


def baseline(target, steps, noise, y, cfg, gc, seed):
    from free_kernels.cli.common import sample_baseline

    with torch.inference_mode():
        return sample_baseline(target, fk.create_diffusion(str(steps)), noise, y, cfg_scale=cfg,
                               guidance_channels=gc, generator=torch.Generator().manual_seed(seed))


def measure_rung(name, target_file, drafter_file, args):
    spec = dataset_spec(name)
    target, _ = load_target(target_file)
    drafter, _, extra = load_drafter(drafter_file, target)
    C, S = int(target.in_channels), int(target.input_size)
    if (C, S) != (spec["in_channels"], spec["input_size"]):
        raise SystemExit(f"error: {target_file} is {C}x{S}x{S}, not the {name} rung's layout")
    D = C * S * S
    cfg = float(extra.get("cfg_scale", args.cfg_scale))
    gc = int(extra.get("guidance_channels", 3))
    g = torch.Generator().manual_seed(args.seed)
    n = args.samples
    noise = torch.randn(n, C, S, S, generator=g)
    y = torch.arange(n) % 10
    row = dict(rung=name, D=D, tokens=int(target.x_embedder.num_patches), target=target_file, drafter=drafter_file,
               cfg_scale=cfg, guidance_channels=gc, samples=n, auto_samples=args.auto_samples)
    for steps in (50, 250):
        t0 = time.perf_counter()
        _, st = run_free(target, drafter, steps, args.draft_length, noise, y, cfg, gc, args.seed + 1)
        row[f"spc_L{args.draft_length}_{steps}"] = st.steps_per_target_call
        row[f"acc_thirds_{steps}"] = st.as_dict()["acceptance_early_middle_late"]
        if steps == 250:
            row["acceptance_by_index_250"] = st.acceptance_by_index
        sta = run_auto(target, drafter, steps, noise[: args.auto_samples], y[: args.auto_samples], cfg, gc,
                       args.seed + 2)
        row[f"spc_auto_{steps}"] = sta.steps_per_target_call
        print(f"  {name} {steps} steps: L={args.draft_length} {row[f'spc_L{args.draft_length}_{steps}']:.2f}, "
              f"auto {row[f'spc_auto_{steps}']:.2f} steps per call ({time.perf_counter() - t0:.0f} s)", flush=True)
    # |d|^2 / D along the schedule on fresh trajectories (one draft from the exact parent features)
    dif = fk.create_diffusion("250")
    traj = generate_trajectories(target, dif, args.eval_trajectories, cfg_scale=cfg, guidance_channels=gc,
                                 seed=args.seed + 3, progress=False)
    kl, d2 = evaluate_acceptance(drafter, target, dif, traj, cfg_scale=cfg, guidance_channels=gc, device="cpu")
    N = dif.num_timesteps
    # position k of the loop drafts respaced index i = N - 1 - k; report per respaced index i (drafted i - 1)
    d2_by_index = [None] * N
    for k in range(1, N - 1):
        d2_by_index[N - 1 - k] = float(d2[k])
    row["d2_per_element_by_index_250"] = [None if v is None else v / D for v in d2_by_index]
    row["predicted_acceptance_by_index_250"] = predicted_acceptance(d2_by_index)
    row["timesteps_250"] = [int(t) for t in np.asarray(dif.timestep_map)]
    thirds = [(2 / 3, 1.01), (1 / 3, 2 / 3), (0, 1 / 3)]
    row["d2_per_element_thirds"] = [
        float(np.median([v for i, v in enumerate(row["d2_per_element_by_index_250"])
                         if v is not None and lo <= i / N < hi])) for lo, hi in thirds]
    if args.quality:
        row["quality"] = quality(name, target, drafter, cfg, gc, args)
    return row


def quality(name, target, drafter, cfg, gc, args):
    from free_kernels.demo.metrics import digit_quality, fd_between

    C, S = int(target.in_channels), int(target.input_size)
    n = args.quality
    y = torch.arange(n) % 10
    out = {}
    runs = {}
    for tag, seed in (("baseline_a", 11), ("baseline_b", 12), ("free", 13)):
        g = torch.Generator().manual_seed(args.seed + seed)
        noise = torch.randn(n, C, S, S, generator=g)
        t0 = time.perf_counter()
        if tag == "free":
            x, _ = run_free(target, drafter, 250, args.draft_length, noise, y, cfg, gc, args.seed + seed)
        else:
            x = baseline(target, 250, noise, y, cfg, gc, args.seed + seed)
        tiles = digit_tiles(x.float(), name)
        labels = y.repeat_interleave(tiles.shape[0] // n)
        runs[tag] = tiles
        q = digit_quality(tiles, labels)
        out[f"accuracy_{tag}"] = float(q["accuracy"])
        print(f"  {name} quality {tag}: accuracy {q['accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out["fd_baseline_a_b"] = float(fd_between(runs["baseline_a"], runs["baseline_b"]))
    out["fd_free_baseline_a"] = float(fd_between(runs["free"], runs["baseline_a"]))
    out["fd_free_baseline_b"] = float(fd_between(runs["free"], runs["baseline_b"]))
    out["samples"] = n
    return out


def projection(rows, D_new=16384):
    """Power-law fit of median |d|^2 / D per third over the rungs; the acceptance and steps per call it implies."""
    Ds = np.array([r["D"] for r in rows], dtype=float)
    out = dict(D=D_new, thirds=[])
    for third in range(3):
        e = np.array([r["d2_per_element_thirds"][third] for r in rows])
        if len(Ds) >= 2 and np.all(e > 0):
            slope, icpt = np.polyfit(np.log(Ds), np.log(e), 1)
        else:
            slope, icpt = 0.0, float(np.log(e[-1]))
        e_new = float(np.exp(icpt + slope * np.log(D_new)))
        d2_new = e_new * D_new
        a = float(math.erfc(math.sqrt(d2_new) / (2 * math.sqrt(2))))
        out["thirds"].append(dict(slope=float(slope), d2_per_element=e_new, d2=d2_new, acceptance=a))
    # steps per target call at L = 6 with the projected acceptance of each third (a third of the rounds' steps each)
    L = 6
    spc = [(1 - a ** (L + 1)) / (1 - a) if a < 1 else L + 1.0 for a in (t["acceptance"] for t in out["thirds"])]
    out["steps_per_call_L6"] = 3.0 / sum(1.0 / s for s in spc)
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for r in rows:
        ts = np.array(r["timesteps_250"])
        acc = np.array([np.nan if v is None else v for v in r["acceptance_by_index_250"]])
        w = 5
        sm = np.convolve(np.nan_to_num(acc), np.ones(w) / w, mode="same") / np.maximum(
            np.convolve(~np.isnan(acc), np.ones(w) / w, mode="same"), 1e-9)
        line, = ax1.plot(ts, sm, label=f"D = {r['D']} ({r['rung']}), measured")
        pred = np.array([np.nan if v is None else v for v in r["predicted_acceptance_by_index_250"]])
        ax1.plot(ts, pred, "--", color=line.get_color(), alpha=0.6, lw=1)
        e = np.array([np.nan if v is None else v for v in r["d2_per_element_by_index_250"]])
        ax2.semilogy(ts, e, color=line.get_color(), label=f"D = {r['D']}")
    ax1.set_xlabel("timestep t (250-step schedule; sampling runs right to left)")
    ax1.set_ylabel("accepted fraction of drafts")
    ax1.set_title("exact FREE acceptance (solid: measured, 5-index mean;\ndashed: 2 Phi(-|d|/2) from |d|^2)",
                  fontsize=9)
    ax1.set_ylim(0, 1.02)
    ax1.invert_xaxis()
    ax1.legend(fontsize=8)
    ax2.set_xlabel("timestep t")
    ax2.set_ylabel("|d|^2 / D (whitened error per element)")
    ax2.set_title("drafter error per output element", fontsize=9)
    ax2.invert_xaxis()
    ax2.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rung", action="append", help="NAME=TARGET,DRAFTER (override a rung's files)")
    p.add_argument("--only", default=",".join(RUNGS), help="comma-separated rungs to measure")
    p.add_argument("--samples", type=int, default=16, help="batch of the fixed-L runs")
    p.add_argument("--auto-samples", type=int, default=4, help="batch-1 images of the auto runs")
    p.add_argument("--eval-trajectories", type=int, default=16)
    p.add_argument("--draft-length", type=int, default=6)
    p.add_argument("--cfg-scale", type=float, default=2.0, help="used where the drafter records none")
    p.add_argument("--quality", type=int, default=0, help="samples per run of the quality check (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="bench/results/ladder.json")
    p.add_argument("--plot", default="bench/results/ladder_acceptance.png")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rungs = parse_rungs(args.rung)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    for n in names:
        if n not in rungs:
            raise SystemExit(f"error: --only {n!r}: choose from {', '.join(RUNGS)}")
        for f in rungs[n]:
            if not os.path.isfile(f):
                raise SystemExit(f"error: {n}: {f!r} not found (train it: see bench/RESULTS.md, 'dimension ladder')")
    rows = []
    for n in names:
        print(f"rung {n}: {rungs[n][0]} + {rungs[n][1]}", flush=True)
        rows.append(measure_rung(n, *rungs[n], args))
    proj = projection(rows) if len(rows) >= 2 else None
    L = args.draft_length
    print(f"\n| rung | D | tokens | steps/call 50 (L={L} / auto) | steps/call 250 (L={L} / auto) | "
          f"acc. early / mid / late (250) | median |d|^2/D early / mid / late |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a = " / ".join("-" if v is None else f"{v:.3f}" for v in r["acc_thirds_250"])
        e = " / ".join(f"{v:.2e}" for v in r["d2_per_element_thirds"])
        print(f"| {r['rung']} | {r['D']} | {r['tokens']} | {r[f'spc_L{L}_50']:.2f} / {r['spc_auto_50']:.2f} | "
              f"{r[f'spc_L{L}_250']:.2f} / {r['spc_auto_250']:.2f} | {a} | {e} |")
    for r in rows:
        if "quality" in r:
            q = r["quality"]
            print(f"quality {r['rung']} ({q['samples']} samples, 250 steps): accuracy baseline "
                  f"{q['accuracy_baseline_a']:.3f} / {q['accuracy_baseline_b']:.3f}, FREE {q['accuracy_free']:.3f}; "
                  f"FD baseline-baseline {q['fd_baseline_a_b']:.2f}, FREE-baseline {q['fd_free_baseline_a']:.2f} / "
                  f"{q['fd_free_baseline_b']:.2f}")
    if proj:
        print(f"\nprojection to D = {proj['D']} (power law of median |d|^2/D per third over the rungs, same recipe, "
              f"width and token count; acceptance 2 Phi(-|d|/2) per draft):")
        for name, t in zip(("early", "middle", "late"), proj["thirds"]):
            print(f"  {name}: slope {t['slope']:+.2f}, |d|^2/D {t['d2_per_element']:.2e}, |d|^2 {t['d2']:.2f}, "
                  f"acceptance {t['acceptance']:.3f}")
        print(f"  steps per target call at L = 6, 250 steps: {proj['steps_per_call_L6']:.2f}")
    doc = dict(rows=rows, projection=proj, args=vars(args), torch=torch.__version__,
               threads=torch.get_num_threads())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    plot(rows, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return doc


if __name__ == "__main__":
    main()

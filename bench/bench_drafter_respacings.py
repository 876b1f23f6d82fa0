"""Benchmark: one drafter for every respacing, and the cost of a draft step (demo, CPU).

1. Table: exact FREE (L = ``--draft-length``, CFG ``--cfg-scale``) at 50 / 100 / 250 / 1000 steps with
   * ``--drafter`` (default: the shipped demo drafter, stride-conditioned, ``free-train-drafter --respacings``),
   * the demo drafter of git commit ``--old-rev`` (default: the one trained on 250-step trajectories
     only, a per-schedule drafter; ``--old-rev 1be461a``: the full-width multi-respacing drafter),
   * the training-free frozen drafter (h = h_prev).
   Same x_T, labels and sampler seed for every drafter; steps per target call and acceptance
   (overall, early / middle / late thirds of the schedule).
2. Cost: one draft step (the drafter's draft_condition + drafter + head / transition through ``ops.draft_transition``)
   against one target forward (forward_features + forward_head), batch 1 with CFG (2 rows), at 1 and 2
   threads: "before" = the drafter's module path computing its own conditioning (the draft step before
   the stride conditioning and the folded inference path), "after" = the folded path with the shared c
   and t_next, as the sampler calls it now.  The three are timed interleaved (min over repeats of the
   mean of ``--iters`` calls) so load from other jobs on a shared machine hits them alike.

    python bench/bench_drafter_respacings.py                    # table + cost
    python bench/bench_drafter_respacings.py --only cost
    python bench/bench_drafter_respacings.py --samples 16 --samples-1000 8 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import free_kernels as fk  # noqa: E402
from free_kernels import ops  # noqa: E402
from free_kernels.cli.common import load_drafter, load_target  # noqa: E402
from free_kernels.demo import DRAFTER_FILE  # noqa: E402

OLD_REV = "e1bee339e9108533e7f5b3335500283f059894e4"  # the 250-step demo drafter (3.92 steps per call at 250)
ASSET = "free_kernels/demo/assets/demo_drafter"


def old_drafter(rev: str, target):
    tmp = tempfile.mkdtemp(prefix="old_drafter_")
    for ext in (".safetensors", ".json"):
        data = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{ASSET}{ext}"], check=True,
                              capture_output=True).stdout
        with open(os.path.join(tmp, "d" + ext), "wb") as f:
            f.write(data)
    return fk.FeatureDrafter.load(os.path.join(tmp, "d"), target=target).eval()


def table(target, drafters, steps_list, n, n1000, L, cfg, seed):
    rows = []
    for steps in steps_list:
        k = n1000 if steps >= 1000 else n
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(k, 1, 16, 16, generator=g)
        y = torch.arange(k) % 10
        for name, d in drafters.items():
            s = fk.FreeSampler(target, d, fk.create_diffusion(str(steps)), draft_length=L)
            t0 = time.perf_counter()
            with torch.inference_mode():
                _, st = s.sample(noise, y, cfg_scale=cfg, generator=torch.Generator().manual_seed(seed + 1))
            dt = time.perf_counter() - t0
            e, m, l_ = st.as_dict()["acceptance_early_middle_late"]
            row = dict(steps=steps, drafter=name, samples=k, steps_per_target_call=st.steps_per_target_call,
                       acceptance=st.acceptance_rate, early=e, middle=m, late=l_, wall_s=round(dt, 1))
            rows.append(row)
            print(f"| {steps} | {name} | {k} | {row['steps_per_target_call']:.2f} | {row['acceptance']:.3f} | "
                  f"{e:.3f} / {m:.3f} / {l_:.3f} |", flush=True)
    return rows


def cost(target, drafter, threads, iters, reps):
    torch.set_num_threads(threads)
    dif = fk.create_diffusion("250")
    x = torch.randn(1, 1, 16, 16)
    xx = x.repeat(2, 1, 1, 1)
    t, tn, y = torch.tensor([500, 500]), torch.tensor([496, 496]), torch.tensor([3, 10])
    h = torch.randn(2, 16, 128)
    idx, noise = torch.tensor([125]), torch.randn(1, 1, 16, 16)

    def before():
        drafter.fast_inference = False
        c = target.embed_condition(t, y)
        hh = drafter(h, xx, t, y)  # the drafter recomputes c itself
        return ops.draft_transition(target, dif, hh, c, x, idx, noise, cfg_scale=2.0, backend="torch")

    def after():
        drafter.fast_inference = True
        c = drafter.draft_condition(t, y)  # what the sampler calls (a table lookup on this path)
        hh = ops.drafter_forward(drafter, h, xx, t, y, t_next=tn, c=c)
        return ops.draft_transition(target, dif, hh, c, x, idx, noise, cfg_scale=2.0)

    def drafter_before():
        drafter.fast_inference = False
        return drafter(h, xx, t, y)

    def drafter_after():
        drafter.fast_inference = True
        return ops.drafter_forward(drafter, h, xx, t, y, t_next=tn, c=c0)

    def transition():  # the default backend: the host kernel where it can run
        return ops.draft_transition(target, dif, h, c0, x, idx, noise, cfg_scale=2.0)

    def transition_torch():  # the torch composition
        return ops.draft_transition(target, dif, h, c0, x, idx, noise, cfg_scale=2.0, backend="torch")

    def tgt():
        hf, c = target.forward_features(xx, t, y)
        return target.forward_head(hf, c)

    fns = dict(draft_before=before, draft_after=after, drafter_before=drafter_before, drafter_after=drafter_after,
               transition=transition, transition_torch=transition_torch, target=tgt)
    best = {k: float("inf") for k in fns}
    with torch.inference_mode():
        c0 = target.embed_condition(t, y)
        for f in fns.values():
            for _ in range(20):
                f()
        for _ in range(reps):
            for k, f in fns.items():
                t0 = time.perf_counter()
                for _ in range(iters):
                    f()
                best[k] = min(best[k], (time.perf_counter() - t0) / iters * 1e3)
    drafter.fast_inference = True
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("table", "cost"), default=None)
    p.add_argument("--drafter", default=DRAFTER_FILE, help="the multi-respacing drafter (default: the shipped one)")
    p.add_argument("--old-rev", default=OLD_REV)
    p.add_argument("--rows", default="new,old,frozen", help="drafters in the table: new, old, frozen")
    p.add_argument("--steps", default="50,100,250,1000")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--samples-1000", type=int, default=8)
    p.add_argument("--draft-length", type=int, default=6)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="threads for the table")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    target, _ = load_target(None)  # the embedded demo DiT
    new, _, _ = load_drafter(a.drafter, target)
    out = dict(command=" ".join(sys.argv), torch=torch.__version__, device="cpu", cpus=os.cpu_count())
    if a.only in (None, "table"):
        torch.set_num_threads(a.threads)
        rows = a.rows.split(",")
        drafters = {}
        if "new" in rows:
            drafters[f"--drafter ({os.path.basename(a.drafter)})"] = new
        if "old" in rows:
            drafters[f"demo drafter of {a.old_rev[:8]}"] = old_drafter(a.old_rev, target)
        if "frozen" in rows:
            drafters["frozen"] = fk.FrozenFeatureDrafter(target)
        print(f"exact FREE, L = {a.draft_length}, CFG {a.cfg_scale}, {a.threads} thread(s)")
        print("| steps | drafter | samples | steps / target call | acceptance | early / middle / late |")
        print("|---|---|---|---|---|---|")
        out["table"] = table(target, drafters, [int(s) for s in a.steps.split(",")], a.samples, a.samples_1000,
                             a.draft_length, a.cfg_scale, a.seed)
    if a.only in (None, "cost"):
        out["cost"] = {}
        print("\ndraft step vs target forward, batch 1 (2 rows with CFG), ms (min over repeats)")
        print("| threads | draft step before | after | drafter before / after | transition torch / default | "
              "target forward | ratio before | ratio after |")
        print("|---|---|---|---|---|---|---|---|")
        for th in (1, 2):
            b = cost(target, new, th, a.iters, a.reps)
            out["cost"][th] = b
            print(f"| {th} | {b['draft_before']:.3f} | {b['draft_after']:.3f} | {b['drafter_before']:.3f} / "
                  f"{b['drafter_after']:.3f} | {b['transition_torch']:.3f} / {b['transition']:.3f} | "
                  f"{b['target']:.3f} | "
                  f"{b['draft_before'] / b['target']:.3f} | {b['draft_after'] / b['target']:.3f} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

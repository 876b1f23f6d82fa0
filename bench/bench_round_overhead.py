"""Host overhead of a FREE round: sampler wall time minus the time spent inside the model and op calls.

    python bench/bench_round_overhead.py                       # demo DiT, batch 1 (250 steps) and 64 (50 steps)
    python bench/bench_round_overhead.py --batch 1 --steps 250 --json runs/overhead.json
    python bench/bench_round_overhead.py --compare-rev 813dabc      # also the sampler of that commit, same run

Every call the sampler makes into the target (``forward_features``,
``forward_head``, ``embed_condition``), the drafter (``ops.drafter_forward``)
and the draft / verify / accept ops (``ops.draft_transition``, ``ops.verify_transition``,
``ops.speculative_accept``)
is timed (outermost call only, so nested calls are not counted twice); what is
left of the sampler's wall time is host work: bookkeeping, indexing, copies,
randomness, Python.  On a CUDA device every timed call is followed by a
synchronisation so that device time is attributed to the call (this slows the
run down; the figure of interest is the share, not the absolute time).
Also prints the dispatch cost of one op call (backend resolution) in µs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import free_kernels as fk
from free_kernels import ops
from free_kernels.cli.common import load_drafter, load_target

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import sampler_of_revision  # noqa: E402


class _Clock:
    def __init__(self, device):
        self.total = 0.0
        self.depth = 0
        self.cuda = torch.device(device).type == "cuda"

    def wrap(self, fn):
        def timed(*a, **k):
            if self.depth:
                return fn(*a, **k)
            self.depth += 1
            if self.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if self.cuda:
                    torch.cuda.synchronize()
                self.total += time.perf_counter() - t0
                self.depth -= 1

        return timed


def measure(batch: int, steps: str, L: int, cfg: float, device: str, seed: int = 0, sampler_cls=None) -> dict:
    target, _ = load_target(None, device)  # the embedded demo DiT and its drafter
    drafter, _, _ = load_drafter(None, target, device, demo_target=True)
    d = fk.create_diffusion(steps, learn_sigma=True)
    sampler = (sampler_cls or fk.FreeSampler)(target, drafter, d, draft_length=L)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, target.in_channels, target.input_size, target.input_size, generator=g).to(device)
    y = (torch.arange(batch) % 10).to(device)
    # warm-up (kernel loading, allocator)
    sampler.sample(noise[:1], y[:1], cfg_scale=cfg, generator=torch.Generator(device=device).manual_seed(1))
    clock = _Clock(device)
    saved = {}
    for name in ("forward_features", "forward_head", "embed_condition"):
        saved[name] = getattr(target, name)
        setattr(target, name, clock.wrap(saved[name]))
    saved_ops = {n: getattr(ops, n) for n in ("drafter_forward", "draft_transition", "verify_transition",
                                              "speculative_accept")}
    for n, f in saved_ops.items():
        setattr(ops, n, clock.wrap(f))
    try:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, st = sampler.sample(noise, y, cfg_scale=cfg, generator=torch.Generator(device=device).manual_seed(2))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    finally:
        for n, f in saved.items():
            setattr(target, n, f)
        for n, f in saved_ops.items():
            setattr(ops, n, f)
    host = wall - clock.total
    return dict(batch=batch, steps=steps, draft_length=L, cfg=cfg, rounds=st.rounds, wall_s=wall,
                model_and_ops_s=clock.total, host_s=host, host_per_round_ms=1e3 * host / st.rounds,
                round_ms=1e3 * wall / st.rounds, host_share=host / wall,
                steps_per_target_call=st.steps_per_target_call)


def dispatch_cost(n: int = 2000) -> dict:
    """µs per call of the backend resolution of each op (CPU context, no kernel run)."""
    from free_kernels.ops._dispatch import OPS

    out = {}
    for name, op in sorted(OPS.items()):
        ctx = dict(device=torch.device("cpu"), dtype=torch.float32, B=1, H=128)
        try:
            op.resolve(ctx)
        except Exception:  # noqa: BLE001 - an op without a CPU path is simply not measured
            continue
        t0 = time.perf_counter()
        for _ in range(n):
            op.resolve(ctx)
        out[name] = 1e6 * (time.perf_counter() - t0) / n
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, action="append", help="batch size(s); default 1 and 64")
    ap.add_argument("--steps", default=None, help="respacing; default 250 at batch 1, 50 otherwise")
    ap.add_argument("--draft-length", type=int, default=6)
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    ap.add_argument("--compare-rev", default=None, help="also measure the sampler of this git revision")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per sampler, interleaved; the fastest is reported (resists load from other jobs)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = args.batch or [1, 64]
    print(f"device {args.device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    samplers = [("current", None)]
    if args.compare_rev:
        samplers.insert(0, (args.compare_rev, sampler_of_revision(args.compare_rev)))
    rows = []
    for b in batches:
        steps = args.steps or ("250" if b == 1 else "50")
        best = {}
        for _ in range(args.repeats):
            for name, cls in samplers:
                r = measure(b, steps, args.draft_length, args.cfg_scale, args.device, sampler_cls=cls)
                r["sampler"] = name
                if name not in best or r["wall_s"] < best[name]["wall_s"]:
                    best[name] = r
        rows += [best[name] for name, _ in samplers]
    print("| sampler | batch | steps | rounds | wall s | round ms | host ms/round | host share | steps/call |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['batch']} | {r['steps']} | {r['rounds']} | {r['wall_s']:.2f} | {r['round_ms']:.2f} "
              f"| {r['host_per_round_ms']:.2f} | {100 * r['host_share']:.1f}% | {r['steps_per_target_call']:.2f} |")
    dc = dispatch_cost()
    print("dispatch cost per resolution (µs): " + ", ".join(f"{k} {v:.2f}" for k, v in dc.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, dispatch_us=dc, torch=torch.__version__), f, indent=1)
    return rows


if __name__ == "__main__":
    main()

"""The FREE round on a GPU: eager vs CUDA-graph replay, and replay == eager bit for bit.

    python bench/bench_round_graphs.py --json runs/round_graphs.json          # CUDA only
    python bench/bench_round_graphs.py --batch 1 --batch 16 --steps 250

For each batch size (demo DiT and its drafter, 250 steps, CFG 2, L = 6, learned
variance): the same run from the same seed with the static layout eager
(``graphs=False``), with the round captured and replayed (``graphs=True``), and
with the compact layout (the CPU default).  Prints the wall time per round and
per image of each, the replay speed-up, and whether the replayed samples equal
the eager ones bit for bit (they must: same kernels, same order, same keyed
randomness).  Exit status 1 when they differ.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import free_kernels as fk
from free_kernels.cli.common import load_drafter, load_target


def run(target, drafter, d, noise, y, *, layout, graphs, L, cfg, seed=3):
    s = fk.FreeSampler(target, drafter, d, draft_length=L, layout=layout, graphs=graphs)
    dev = noise.device
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out, st = s.sample(noise, y, cfg_scale=cfg, generator=torch.Generator(device=dev).manual_seed(seed))
    torch.cuda.synchronize()
    return out, st, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--steps", default="250")
    ap.add_argument("--draft-length", type=int, default=6)
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_round_graphs: needs a CUDA device")
        return 2
    dev = torch.device("cuda")
    target, _ = load_target(None, dev)  # the embedded demo DiT and its drafter
    drafter, _, _ = load_drafter(None, target, dev, demo_target=True)
    d = fk.create_diffusion(args.steps, learn_sigma=True)
    print(f"device {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    rows, ok = [], True
    for B in args.batch or [1, 4, 16]:
        g = torch.Generator().manual_seed(B)
        noise = torch.randn(B, target.in_channels, target.input_size, target.input_size, generator=g).to(dev)
        y = (torch.arange(B) % 10).to(dev)
        run(target, drafter, d, noise[:1], y[:1], layout="static", graphs=False, L=args.draft_length,
            cfg=args.cfg_scale)  # warm-up: kernels, autotuning, allocator
        res = {}
        for name, layout, graphs in (("eager", "static", False), ("graphs", "static", True),
                                     ("compact", "compact", False)):
            res[name] = run(target, drafter, d, noise, y, layout=layout, graphs=graphs, L=args.draft_length,
                            cfg=args.cfg_scale)
        same = torch.equal(res["eager"][0], res["graphs"][0])
        ok &= same
        r = dict(batch=B, replay_equals_eager=same, graphs_note=res["graphs"][1].graphs)
        for name, (_, st, wall) in res.items():
            r[f"{name}_s"] = wall
            r[f"{name}_ms_per_round"] = 1e3 * wall / max(st.rounds, 1)
            r[f"{name}_steps_per_call"] = st.steps_per_target_call
        r["graph_speedup"] = r["eager_s"] / r["graphs_s"]
        rows.append(r)
    print("| batch | eager ms/round | graphs ms/round | compact ms/round | replay speed-up | replay == eager |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['eager_ms_per_round']:.2f} | {r['graphs_ms_per_round']:.2f} | "
              f"{r['compact_ms_per_round']:.2f} | {r['graph_speedup']:.2f}x | {r['replay_equals_eager']} |")
    bad = [r for r in rows if r["graphs_note"] != "replayed"]
    for r in bad:
        print(f"batch {r['batch']}: graphs not used: {r['graphs_note']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, device=torch.cuda.get_device_name(dev), torch=torch.__version__), f, indent=1)
    return 0 if ok and not bad else 1


if __name__ == "__main__":
    sys.exit(main())

"""Continuous vs fixed batching: samples per second for N demo samples at batch B (one run, one device).

    python bench/bench_stream.py --steps 50                # 256 samples, batch 16, 50 steps, CFG 2, L = 6
    python bench/bench_stream.py --samples 64 --steps 50 --device cuda --json runs/stream.json

Fixed batching: ``FreeSampler.sample`` on consecutive batches of B requests
(a batch ends when its slowest sample does: FREE samples take different numbers
of rounds).  Continuous batching: ``FreeSampler.sample_stream`` over all
requests with B slots (a finished sample's slot takes the next request).  Both
use the same requests (seed, label), the demo DiT and its drafter.  Also
reports slot occupancy (sample-rounds / (B x rounds)) and target calls.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import free_kernels as fk
from free_kernels.cli.common import load_drafter, load_target


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", default="250")
    ap.add_argument("--draft-length", type=int, default=6)
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the demo's matrices are too small for more to pay)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    target, _ = load_target(None, dev)  # the embedded demo DiT and its drafter
    drafter, _, _ = load_drafter(None, target, dev, demo_target=True)
    d = fk.create_diffusion(args.steps, learn_sigma=True)
    s = fk.FreeSampler(target, drafter, d, draft_length=args.draft_length)
    reqs = [(1000 + i, i % 10) for i in range(args.samples)]
    C, S = target.in_channels, target.input_size
    print(f"device {args.device} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else platform.machine()}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; {args.samples} samples, batch {args.batch}, "
          f"{args.steps} steps, CFG {args.cfg_scale}, L = {args.draft_length}")
    list(s.sample_stream(reqs[:2], batch_size=2, cfg_scale=args.cfg_scale, device=dev))  # warm-up

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # fixed batching: consecutive batches, each sample's x_T from its seed as in the stream
    sync()
    t0 = time.perf_counter()
    calls = rounds = sample_rounds = rows = drows = 0
    for k in range(0, len(reqs), args.batch):
        part = reqs[k:k + args.batch]
        noise = torch.stack([torch.randn((C, S, S), generator=torch.Generator().manual_seed(sd))
                             for sd, _ in part]).to(dev)
        y = torch.tensor([lab for _, lab in part], device=dev)
        _, st = s.sample(noise, y, cfg_scale=args.cfg_scale,
                         generator=torch.Generator(device=dev).manual_seed(k))
        calls += st.target_calls
        rows += st.target_rows
        drows += st.drafter_rows
        rounds += st.rounds
        sample_rounds += sum(st.sample_rounds)
    sync()
    fixed_s = time.perf_counter() - t0
    fixed = dict(seconds=fixed_s, samples_per_s=len(reqs) / fixed_s, target_calls=calls, target_rows=rows,
                 drafter_rows=drows, occupancy=sample_rounds / (args.batch * rounds))

    sync()
    t0 = time.perf_counter()
    n = len(list(s.sample_stream(reqs, batch_size=args.batch, cfg_scale=args.cfg_scale, device=dev)))
    sync()
    stream_s = time.perf_counter() - t0
    st = s.last_stats
    stream = dict(seconds=stream_s, samples_per_s=n / stream_s, target_calls=st.target_calls,
                  target_rows=st.target_rows, drafter_rows=st.drafter_rows,
                  occupancy=sum(st.sample_rounds) / (args.batch * st.rounds))
    print("| batching | seconds | samples/s | target calls | target rows | drafter rows | slot occupancy |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("fixed", fixed), ("continuous", stream)):
        print(f"| {name} | {r['seconds']:.1f} | {r['samples_per_s']:.2f} | {r['target_calls']} | {r['target_rows']} | "
              f"{r['drafter_rows']} | {100 * r['occupancy']:.0f}% |")
    print(f"continuous / fixed: {stream['samples_per_s'] / fixed['samples_per_s']:.2f}x samples per second")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(fixed=fixed, continuous=stream, args=vars(args), torch=torch.__version__), f, indent=1)


if __name__ == "__main__":
    main()

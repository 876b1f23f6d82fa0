"""End-to-end: baseline vs exact FREE vs FREE (relax) in one run, and the DiT-XL/2 round-cost projection.

    python bench/bench_e2e.py                        # demo model (CPU or GPU), batch 1, 8, 32
    python bench/bench_e2e.py --xl                   # + DiT-XL/2 geometry round costs (GPU)

Part 1 (demo DiT + shipped drafter, 250 steps, L = 6): wall time per image at batch 1, 8, 32,
target calls and steps per target call for the baseline ancestral sampler, exact FREE and FREE
(relax, approximate), measured in the same process one after the other.

Part 2 (``--xl``, needs CUDA; random weights, fp16): one target step of DiT-XL/2 (256 or 1024
tokens) at batch B vs one FREE round: L draft steps (1-block FeatureDrafter + head) + one
verification forward of B*(L+1) rows + the acceptance op. With the per-step acceptance ``a``
measured on the demo (or ``--acceptance``) a round advances (1 - a^(L+1)) / (1 - a) steps, so

    projected speed-up = steps_per_round * t_target_step / t_round

This is a PROJECTION (it assumes the XL drafter reaches the demo's acceptance); it is labelled
so wherever it is printed.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import free_kernels as fk
from bench_demo import baseline_sample  # bench/ is on sys.path when run as a script


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def part1(batches, device, cfg, n_rep, relax):
    from free_kernels.demo import DRAFTER_FILE, load_target
    from free_kernels.diffusion import per_sample_generators
    from free_kernels.models import FeatureDrafter

    target = load_target(device=device)
    drafter = FeatureDrafter.load(DRAFTER_FILE, target=target, map_location=device)
    d = fk.create_diffusion("250")
    rows = []
    print("| batch | sampler | s / image | target calls | steps / target call | speed-up vs baseline |")
    print("|---|---|---|---|---|---|")
    for B in batches:
        g = torch.Generator().manual_seed(B)
        noise = torch.randn(B, target.in_channels, target.input_size, target.input_size, generator=g).to(device)
        y = (torch.arange(B) % 10).to(device)
        res = {}
        for name in ("baseline", "FREE (exact)", f"FREE (relax {relax}, approximate)"):
            tt = 0.0
            calls = spc = None
            for r in range(n_rep):
                _sync()
                t0 = time.perf_counter()
                with torch.no_grad():
                    if name == "baseline":
                        gens = per_sample_generators(range(r * 1000, r * 1000 + B), device=device)
                        baseline_sample(target, d, noise, y, cfg, gens)
                        calls, spc = d.num_timesteps, 1.0
                    else:
                        s = fk.FreeSampler(target, drafter, d, draft_length=6,
                                           relax=None if name == "FREE (exact)" else relax)
                        _, st = s.sample(noise, y, cfg_scale=cfg,
                                         generator=torch.Generator(device=device).manual_seed(r))
                        calls, spc = st.target_calls, st.steps_per_target_call
                _sync()
                tt += time.perf_counter() - t0
            res[name] = (tt / (n_rep * B), calls, spc)
        base = res["baseline"][0]
        for name, (per, calls, spc) in res.items():
            rows.append(dict(batch=B, sampler=name, s_per_image=per, target_calls=calls, spc=spc,
                             speedup=base / per))
            print(f"| {B} | {name} | {per:.4f} | {calls} | {spc:.2f} | {base / per:.2f}x |", flush=True)
    return rows


def _time(fn, reps=20):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=reps * 10, return_mode="median") * 1e-3


def part2(acceptance, tokens_list, batches, dtype=torch.float16):
    from free_kernels.models import DiT_models, FeatureDrafter
    from free_kernels.train import expected_steps

    rows = []
    dev = "cuda"
    print("\n| tokens | batch | L | target step ms | draft step ms | verify ms | accept ms | round ms | "
          "steps/round (a=%.3f) | projected speed-up |" % acceptance)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for tokens in tokens_list:
        S = int(round(tokens ** 0.5)) * 2
        m = DiT_models["DiT-XL/2"](input_size=S).to(dev, dtype).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02)
        dr = FeatureDrafter.for_target(m, init="random").to(dev, dtype).eval()
        diff = fk.create_diffusion("250")
        for B in batches:
            x = torch.randn(B, 4, S, S, device=dev, dtype=dtype)
            t = torch.full((B,), 500, device=dev)
            y = torch.zeros(B, dtype=torch.long, device=dev)
            with torch.no_grad():
                t_step = _time(lambda: m(x, t, y))
                h, c = m.forward_features(x, t, y)
                idx = torch.full((B,), 100, device=dev)

                def draft_step():
                    hh = dr(h, x, t, y)
                    return fk.ops.draft_transition(m, diff, hh, c, x, idx, x)

                t_draft = _time(draft_step)
                for L in (2, 4, 6, 8):
                    xv = torch.randn(B * (L + 1), 4, S, S, device=dev, dtype=dtype)
                    tv = torch.full((B * (L + 1),), 500, device=dev)
                    yv = torch.zeros(B * (L + 1), dtype=torch.long, device=dev)
                    t_ver = _time(lambda: m(xv, tv, yv))
                    D = 4 * S * S
                    mp, lvp = torch.randn(B, L + 1, D, device=dev), torch.randn(B, L + 1, D, device=dev) * 0.1 - 3
                    mq, xi = mp[:, :L] + 0.01, torch.randn(B, L, D, device=dev)
                    nd = torch.full((B,), L, device=dev, dtype=torch.int32)
                    det = torch.zeros(B, dtype=torch.bool, device=dev)
                    t_acc = _time(lambda: fk.ops.speculative_accept(mp, lvp, mq, lvp[:, :L], xi, nd, det,
                                                                    equal_variance=False))
                    t_round = L * t_draft + t_ver + t_acc
                    spr = expected_steps(acceptance, L)
                    proj = spr * t_step / t_round
                    rows.append(dict(tokens=tokens, batch=B, L=L, t_step=t_step, t_draft=t_draft, t_verify=t_ver,
                                     t_accept=t_acc, t_round=t_round, steps_per_round=spr, projection=proj))
                    print(f"| {tokens} | {B} | {L} | {t_step * 1e3:.2f} | {t_draft * 1e3:.2f} | {t_ver * 1e3:.2f} | "
                          f"{t_acc * 1e3:.3f} | {t_round * 1e3:.2f} | {spr:.2f} | {proj:.2f}x (projection) |",
                          flush=True)
        del m, dr
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--cfg-scale", type=float, default=None, help="default: the drafter's training CFG")
    ap.add_argument("--relax", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--xl", action="store_true")
    ap.add_argument("--acceptance", type=float, default=None,
                    help="per-step acceptance for the projection (default: measured on the demo at L=6)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    from free_kernels.demo import DRAFTER_FILE

    cfg = args.cfg_scale
    if cfg is None:
        with open(DRAFTER_FILE[: -len(".safetensors")] + ".json") as f:
            cfg = float(json.load(f).get("extra", {}).get("cfg_scale", 1.0))
    print(f"# end-to-end: torch {torch.__version__}, device {args.device}"
          f"{' ' + torch.cuda.get_device_name() if args.device == 'cuda' else ''}, cfg {cfg}\n")
    out = dict(part1=part1([int(b) for b in args.batches.split(",")], args.device, cfg, args.reps, args.relax))
    if args.xl:
        if not torch.cuda.is_available():
            print("\n--xl needs CUDA: skipped")
        else:
            a = args.acceptance
            if a is None:
                with open(DRAFTER_FILE[: -len(".safetensors")] + ".json") as f:
                    a = float(json.load(f).get("extra", {}).get("acceptance", 0.7))
            out["part2"] = part2(a, (256, 1024), (1, 8))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

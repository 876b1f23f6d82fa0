"""End-to-end: baseline vs exact FREE vs FREE (relax) in one run, and the DiT-XL/2 round costs.

    python bench/bench_e2e.py                               # demo model (CPU or GPU), batch 1, 4, 16
    python bench/bench_e2e.py --xl                          # + DiT-XL/2 at 256 px (GPU)
    python bench/bench_e2e.py --xl --quick --json e2e.json  # what bench/run_gpu.py runs (L = 6 only)

Part 1 (demo DiT + shipped drafter, 250 steps, L = 6, the drafter's training CFG): wall time per
image at each batch, target calls and steps per target call for the baseline ancestral sampler
(``p_sample_loop``), exact FREE and FREE (relax, approximate), measured in the same process one
after the other: the MEASURED speed-up.  Then one profiled exact-FREE run per batch (on CUDA the
sampler's ``profile=True`` synchronises around each phase): baseline step, and per round the
draft, verify and accept times and the rest (host work between phases), in ms.

Part 2 (``--xl``, needs CUDA; DiT-XL/2 geometry at 256 px = 256 tokens, random weights, CFG so
2B rows per step, bench/bench_drafter.py's ``Setup``): per batch B

* target step: one CFG step of the 28-block target (2B rows) with its transition;
* draft step: the 1-block drafter + the fused draft epilogue (2B rows);
* verify: one forward of 2B (L + 1) rows (every draft and the bonus position);
* accept: the speculative_accept op on (B, L + 1, 4 * 32 * 32) learned-variance means;
* round (sum) = L draft + verify + accept; round (measured) = the same sequence run back to
  back, synchronised once per round; host ms = the time the host needs to ISSUE one round
  (no synchronisation): when it is above the measured round, the round is launch-bound.

With the per-step acceptance ``a`` measured on the demo (or ``--acceptance``) a round advances
(1 - a^(L+1)) / (1 - a) steps, so

    projected speed-up = steps_per_round * t_target_step / t_round

This is a PROJECTION (it assumes an XL drafter reaching the demo's acceptance); it is labelled
so wherever it is printed.  Times: CUDA events, median of repetitions (bench/_common.py).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import free_kernels as fk  # noqa: E402
from _common import event_ms, fmt, markdown_table, print_header, write_json  # noqa: E402
from free_kernels.cli.common import (  # noqa: E402
    load_drafter, load_target, per_sample_generators, sample_baseline,
)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _sampler(target, drafter, d, relax=None, profile=False):
    kw = {}
    if profile and "profile" in inspect.signature(fk.FreeSampler.__init__).parameters:
        kw["profile"] = True
    return fk.FreeSampler(target, drafter, d, draft_length=6, relax=relax, **kw)


def part1(batches, device, cfg, n_rep, relax):
    target, _ = load_target(None, device)  # the embedded demo DiT and its drafter
    drafter, _, _ = load_drafter(None, target, device, demo_target=True)
    d = fk.create_diffusion("250")
    rows, phases = [], []
    print("## demo model: measured wall clock (250 steps, L = 6)\n")
    print("| batch | sampler | s / image | target calls | steps / target call | speed-up vs baseline |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():  # warm-up: Triton compiles, cuBLAS handles, caches
        g = torch.Generator().manual_seed(0)
        z = torch.randn(2, target.in_channels, target.input_size, target.input_size, generator=g).to(device)
        _sampler(target, drafter, d).sample(z, torch.arange(2).to(device), cfg_scale=cfg,
                                            generator=torch.Generator(device=device).manual_seed(0))
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
                        sample_baseline(target, d, noise, y, cfg_scale=cfg, generator=gens)
                        calls, spc = d.num_timesteps, 1.0
                    else:
                        s = _sampler(target, drafter, d, relax=None if name == "FREE (exact)" else relax)
                        _, st = s.sample(noise, y, cfg_scale=cfg,
                                         generator=torch.Generator(device=device).manual_seed(r))
                        calls, spc = st.target_calls, st.steps_per_target_call
                _sync()
                tt += time.perf_counter() - t0
            res[name] = (tt / (n_rep * B), calls, spc, tt / n_rep)
        base = res["baseline"][0]
        for name, (per, calls, spc, wall) in res.items():
            rows.append(dict(batch=B, sampler=name, s_per_image=per, target_calls=calls, spc=spc,
                             speedup=base / per, wall_s=wall))
            print(f"| {B} | {name} | {per:.4f} | {calls} | {spc:.2f} | {base / per:.2f}x |", flush=True)
        # one profiled exact run: per-phase times per round
        with torch.no_grad():
            s = _sampler(target, drafter, d, profile=True)
            _sync()
            t0 = time.perf_counter()
            _, st = s.sample(noise, y, cfg_scale=cfg, generator=torch.Generator(device=device).manual_seed(99))
            _sync()
            wall = time.perf_counter() - t0
        sd = st.as_dict()
        rounds = max(1, int(sd.get("rounds") or 0))
        ph = {k: 1e3 * float(sd.get(f"time_{k}_s") or 0.0) / rounds for k in ("draft", "verify", "accept")}
        rest = 1e3 * wall / rounds - sum(ph.values())
        phases.append(dict(batch=B, rounds=rounds, baseline_step_ms=1e3 * res["baseline"][3] / d.num_timesteps,
                           draft_ms_per_round=ph["draft"], verify_ms_per_round=ph["verify"],
                           accept_ms_per_round=ph["accept"], other_ms_per_round=rest,
                           round_ms=1e3 * wall / rounds, profiled=any(ph.values())))
    print("\n## demo model: one round, profiled exact FREE (ms; 'other' = host work between phases)\n")
    print("\n".join(markdown_table(
        ("batch", "baseline step", "rounds", "draft / round", "verify / round", "accept / round", "other / round",
         "round"),
        [(p["batch"], fmt(p["baseline_step_ms"], ".3f"), p["rounds"], fmt(p["draft_ms_per_round"], ".3f"),
          fmt(p["verify_ms_per_round"], ".3f"), fmt(p["accept_ms_per_round"], ".3f"),
          fmt(p["other_ms_per_round"], ".3f"), fmt(p["round_ms"], ".3f")) for p in phases])), flush=True)
    if not all(p["profiled"] for p in phases):
        print("(per-phase times are zero where the sampler does not profile on this device)")
    return rows, phases


def part2(acceptance, batches, draft_lengths, dtype, reps):
    from bench_drafter import Setup  # noqa: E402  (bench/ is on sys.path)
    from free_kernels.distill import expected_steps

    dev = "cuda"
    tokens = 256  # 256 px: latent 32, patch 2
    rows = []
    print(f"\n## DiT-XL/2, 256 px ({tokens} tokens), {str(dtype).replace('torch.', '')}, CFG (2B rows): "
          f"one round vs one target step (ms; projection at a = {acceptance:.3f})\n")
    head = ("batch", "L", "target step", "draft step", "draft / target", "verify (2B(L+1) rows)", "accept",
            "round (sum)", "round (measured)", "host issue / round", "steps / round", "projected speed-up")
    print("\n".join(markdown_table(head, [])), flush=True)
    for B in batches:
        st = None
        torch.cuda.empty_cache()
        st = Setup(B, tokens, dtype)
        m = st.target
        S = m.input_size
        with torch.no_grad():
            t_step = event_ms(st.target_step, 3, 10, reps)
            t_draft = event_ms(st.draft_step, 3, 10, reps)
            for L in draft_lengths:
                R = 2 * B * (L + 1)
                xv = torch.randn(R, 4, S, S, device=dev, dtype=dtype)
                tv = torch.full((R,), 500, device=dev)
                yv = torch.zeros(R, dtype=torch.long, device=dev)

                def verify():
                    return m(xv, tv, yv)

                t_ver = event_ms(verify, 2, 5, reps)
                D = 4 * S * S
                mp, lvp = torch.randn(B, L + 1, D, device=dev), torch.randn(B, L + 1, D, device=dev) * 0.1 - 3
                mq, xi = mp[:, :L] + 0.01, torch.randn(B, L, D, device=dev)
                lvq = lvp[:, :L] + 0.01 * torch.randn(B, L, D, device=dev)
                nd = torch.full((B,), L, device=dev, dtype=torch.int64)
                det = torch.zeros(B, dtype=torch.bool, device=dev)

                def accept():
                    return fk.ops.speculative_accept(mp, lvp, mq, lvq, xi, nd, det, equal_variance=False)

                t_acc = event_ms(accept, 3, 10, reps)

                def one_round():
                    for _ in range(L):
                        st.draft_step()
                    verify()
                    return accept()

                for _ in range(2):
                    one_round()
                _sync()
                n_r = 3
                t0 = time.perf_counter()
                for _ in range(n_r):
                    one_round()
                t_host = (time.perf_counter() - t0) / n_r  # issue time (the queue may also have blocked)
                _sync()
                t_meas = (time.perf_counter() - t0) / n_r
                t_sum = L * t_draft + t_ver + t_acc
                spr = expected_steps(acceptance, L)
                proj = spr * t_step / t_sum
                proj_meas = spr * t_step / (1e3 * t_meas)
                row = dict(tokens=tokens, batch=B, L=L, t_step=t_step * 1e-3, t_draft=t_draft * 1e-3,
                           t_verify=t_ver * 1e-3, t_accept=t_acc * 1e-3, t_round=t_sum * 1e-3,
                           t_round_measured=t_meas, t_host_issue=t_host, steps_per_round=spr, projection=proj,
                           projection_measured_round=proj_meas, draft_over_target=t_draft / t_step)
                rows.append(row)
                print("\n".join(markdown_table(head, [(
                    B, L, f"{t_step:.3f}", f"{t_draft:.3f}", f"{t_draft / t_step:.3f}", f"{t_ver:.3f}",
                    f"{t_acc:.3f}", f"{t_sum:.2f}", f"{1e3 * t_meas:.2f}", f"{1e3 * t_host:.2f}", f"{spr:.2f}",
                    f"{proj:.2f}x / {proj_meas:.2f}x (projection: sum / measured round)")], with_header=False)),
                    flush=True)
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--cfg-scale", type=float, default=None, help="default: the drafter's training CFG")
    ap.add_argument("--relax", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=1, help="repetitions of each demo sampling run")
    ap.add_argument("--xl", action="store_true", help="also the DiT-XL/2 round costs (CUDA)")
    ap.add_argument("--quick", action="store_true", help="XL: L = 6 only, fewer timing repetitions")
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"), help="XL weights and activations")
    ap.add_argument("--acceptance", type=float, default=None,
                    help="per-step acceptance for the projection (default: measured on the demo at L=6)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    from free_kernels.demo import DRAFTER_FILE

    with open(DRAFTER_FILE[: -len(".safetensors")] + ".json") as f:
        extra = json.load(f).get("extra", {})
    cfg = float(extra.get("cfg_scale", 1.0)) if args.cfg_scale is None else args.cfg_scale
    env = print_header("# end-to-end", __file__, argv)
    print(f"cfg {cfg}, demo on {args.device}\n")
    batches = [int(b) for b in args.batches.split(",")]
    rows, phases = part1(batches, args.device, cfg, args.reps, args.relax)
    out = dict(environment=env, cfg_scale=cfg, part1=rows, part1_phases=phases)
    write_json(args.json, out)  # part 1 survives a failure in part 2
    if args.xl:
        if not torch.cuda.is_available():
            print("\n--xl needs CUDA: skipped")
        else:
            a = args.acceptance if args.acceptance is not None else float(extra.get("acceptance", 0.7))
            dtype = dict(fp16=torch.float16, bf16=torch.bfloat16)[args.dtype]
            out["part2"] = part2(a, batches, (6,) if args.quick else (2, 4, 6, 8), dtype, 3 if args.quick else 5)
            write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

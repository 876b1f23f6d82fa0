"""GPU smoke checks run by bench/run_gpu.py (each prints a ``RESULT_JSON {...}`` line last).

    python bench/gpu_smoke.py check
        The CUDA backend must be usable: torch sees a GPU, free_kernels._C is built with CUDA for
        an arch that runs on this device, and every op with a ``cuda`` backend can run it for CUDA
        float16 tensors (the backend each op resolves to is reported: it may come from a measured
        priority table); then one real call of the cheapest fused op on the cuda and triton
        backends is compared with torch.  Exit 1, with every reason printed, otherwise.

    python bench/gpu_smoke.py sample --backend cuda
        The embedded demo DiT sampled on the GPU with exact FREE (shipped drafter, 250 steps,
        L = 6, the drafter's training CFG), every op that has the backend forced to it
        (``FREE_KERNELS_BACKEND_<OP>``; a forced op that cannot run raises): steps per target call
        and acceptance by thirds of the schedule next to the CPU figures (bench/RESULTS.md:
        4.27 steps per call, 0.95 / 0.94 / 0.68), and two-sample KS tests of FREE against the
        baseline ``p_sample_loop`` on fixed projections (Bonferroni, overall false-alarm rate
        1e-3; independent noise on both sides).  Exit 2 when the KS test rejects.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

CPU_FIGURES = dict(steps_per_target_call=4.27, acceptance_thirds=[0.95, 0.94, 0.68])  # bench/RESULTS.md


def check() -> int:
    from free_kernels import info, ops

    problems = []
    doc = info.collect()
    t, ext = doc["torch"], doc["extension"]
    out = dict(torch=t.get("version"), torch_cuda=t.get("cuda"), cuda_available=t.get("cuda_available"),
               extension_cuda=ext.get("built_with_cuda"), archs=ext.get("cuda_archs"),
               driver=ext.get("cuda_driver"), runtime=ext.get("cuda_runtime"))
    if not t.get("cuda_available"):
        problems.append(f"torch {t.get('version')} does not see a CUDA device (torch.version.cuda={t.get('cuda')})")
    if not ext.get("importable"):
        problems.append(f"free_kernels._C is not importable: {ext.get('unavailable_reason')}")
    elif not ext.get("built_with_cuda"):
        problems.append(f"free_kernels._C was built without CUDA: {ext.get('build', {}).get('cuda_disabled_reason')}")
    if ext.get("unavailable_reason"):
        problems.append(f"extension: {ext['unavailable_reason']}")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        out["device"] = torch.cuda.get_device_name()
        out["capability"] = f"{cap[0]}.{cap[1]}"
        archs = [int(a) for a in (ext.get("cuda_archs") or [])]
        if archs and not any(a // 10 == cap[0] and a <= cap[0] * 10 + cap[1] for a in archs):
            problems.append(f"extension built for sm_{archs}, device is sm_{cap[0]}{cap[1]}")
    resolved = {}
    for name, rows in doc["ops"].items():
        for row in rows:
            if not row["context"].startswith("cuda float16"):
                continue
            reasons = row.get("reasons") or {}
            resolved[name] = row.get("backend")
            # usable is what is asserted; which backend goes first may come from the measured priority table
            if "cuda" in reasons and reasons["cuda"] is not None and "has no cuda" not in reasons["cuda"]:
                problems.append(f"op {name} ({row['context']}): cuda cannot run: {reasons['cuda']} "
                                f"(resolves to {row.get('backend')}; triton: {reasons.get('triton')})")
            break
    out["resolved_fp16"] = resolved
    if not problems:  # one real call of the cheapest fused op on each fused backend
        x = torch.randn(2, 7, 96, device="cuda", dtype=torch.float16)
        sh, sc = torch.randn(2, 96, device="cuda", dtype=torch.float16), torch.randn(2, 96, device="cuda",
                                                                                    dtype=torch.float16)
        want = ops.modulated_layernorm(x, sh, sc, backend="torch").float()
        for backend in ("cuda", "triton"):
            try:
                got = ops.modulated_layernorm(x, sh, sc, backend=backend).float()
                torch.cuda.synchronize()
                err = (got - want).abs().max().item()
                out[f"mln_{backend}_max_err"] = round(err, 5)
                if not err < 1e-2:
                    problems.append(f"modulated_layernorm[{backend}] differs from torch by {err}")
            except Exception as e:
                problems.append(f"modulated_layernorm[{backend}] raised {type(e).__name__}: {e}")
    for p in problems:
        print(f"CUDA BACKEND NOT USABLE: {p}")
    if not problems:
        print("cuda backend usable: " + ", ".join(f"{k}={v}" for k, v in out.items() if k != "resolved_fp16"))
    out["problems"] = len(problems)
    print("RESULT_JSON " + json.dumps(out, default=str))
    return 1 if problems else 0


def _projections(x: torch.Tensor, k: int = 4, seed: int = 0) -> dict:
    x = x.reshape(x.shape[0], -1).double().cpu()
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(x.shape[1], k, generator=g, dtype=torch.float64)
    d /= d.norm(dim=0, keepdim=True)
    out = {"mean": x.mean(1), "std": x.std(1)}
    for i in range(k):
        out[f"proj{i}"] = x @ d[:, i]
    return out


def _sync(dev) -> None:
    if str(dev).startswith("cuda"):
        torch.cuda.synchronize()


def sample(args) -> int:
    from scipy.stats import ks_2samp

    import free_kernels as fk
    from free_kernels.cli.common import load_drafter, load_target, per_sample_generators, sample_baseline

    dev = args.device
    forced = args.backend or os.environ.get("FREE_KERNELS_BACKEND") or "auto"
    if forced != "auto":
        # FREE_KERNELS_BACKEND_<OP> for every op that has this backend (drafter_forward is torch-only, and a
        # global FREE_KERNELS_BACKEND would make it raise): an op that then cannot run raises, never falls back
        os.environ.pop("FREE_KERNELS_BACKEND", None)
        for name, op in fk.ops.OPS.items():
            if forced in op.backends:
                os.environ[f"FREE_KERNELS_BACKEND_{name.upper()}"] = forced
    target, _ = load_target(None, dev)  # the embedded demo DiT and its drafter
    drafter, _, extra = load_drafter(None, target, dev, demo_target=True)
    cfg = float(extra.get("cfg_scale", 1.0)) if args.cfg_scale is None else args.cfg_scale
    d = fk.create_diffusion(str(args.steps))
    n, C, S = args.n, target.in_channels, target.input_size
    g = torch.Generator().manual_seed(args.seed)
    noise_f = torch.randn(n, C, S, S, generator=g).to(dev)
    noise_b = torch.randn(n, C, S, S, generator=g).to(dev)  # independent: a two-sample test
    y = (torch.arange(n) % 10).to(dev)
    print(f"demo DiT on {torch.cuda.get_device_name() if dev == 'cuda' else dev}, backend {forced}, n={n}, steps={args.steps}, "
          f"L={args.draft_length}, cfg={cfg}", flush=True)

    sampler = fk.FreeSampler(target, drafter, d, draft_length=args.draft_length)
    with torch.no_grad():  # warm-up (Triton compiles, cuBLAS handles) on a small batch
        sampler.sample(noise_f[:2], y[:2], cfg_scale=cfg, generator=torch.Generator(device=dev).manual_seed(7))
    _sync(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        xf, st = sampler.sample(noise_f, y, cfg_scale=cfg, generator=torch.Generator(device=dev).manual_seed(1))
    _sync(dev)
    t_free = time.perf_counter() - t0
    t0 = time.perf_counter()
    xb = sample_baseline(target, d, noise_b, y, cfg_scale=cfg,
                         generator=per_sample_generators(range(10_000, 10_000 + n), device=dev))
    _sync(dev)
    t_base = time.perf_counter() - t0

    sd = st.as_dict()
    thirds = [None if v is None else round(v, 3) for v in sd["acceptance_early_middle_late"]]
    pf, pb = _projections(xf), _projections(xb)
    pvals = {k: float(ks_2samp(pf[k].numpy(), pb[k].numpy()).pvalue) for k in pf}
    alpha = 1e-3 / len(pvals)
    ks_ok = min(pvals.values()) >= alpha
    finite = bool(torch.isfinite(xf).all())
    res = dict(backend=forced, n=n, spc=round(st.steps_per_target_call, 3), spc_cpu=CPU_FIGURES["steps_per_target_call"],
               thirds=thirds, thirds_cpu=CPU_FIGURES["acceptance_thirds"], target_calls=st.target_calls,
               t_free_s=round(t_free, 3), t_base_s=round(t_base, 3), speedup=round(t_base / t_free, 2),
               ks_min_p=round(min(pvals.values()), 5), ks_alpha=alpha, ks_ok=ks_ok, finite=finite,
               fallbacks=sd.get("residual_fallbacks"))
    print(f"SMOKE {forced}: steps/call {res['spc']} (CPU {res['spc_cpu']}), acceptance thirds {thirds} "
          f"(CPU {CPU_FIGURES['acceptance_thirds']}), target calls {st.target_calls}")
    print(f"SMOKE {forced}: wall FREE {t_free:.2f} s vs baseline {t_base:.2f} s ({res['speedup']}x) for {n} samples")
    print("KS FREE vs baseline: " + ", ".join(f"{k} p={v:.3g}" for k, v in pvals.items())
          + f" -> {'consistent' if ks_ok else 'REJECTED'} at overall 1e-3")
    print("RESULT_JSON " + json.dumps(res))
    return 0 if (ks_ok and finite) else 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check")
    s = sub.add_parser("sample")
    s.add_argument("--backend", default=None, help="force every op to this backend (FREE_KERNELS_BACKEND)")
    s.add_argument("--n", type=int, default=200)
    s.add_argument("--steps", type=int, default=250)
    s.add_argument("--draft-length", type=int, default=6)
    s.add_argument("--cfg-scale", type=float, default=None, help="default: the drafter's training CFG")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a check of this script only
    args = ap.parse_args(argv)
    if getattr(args, "device", "cuda") == "cpu":
        return sample(args)
    if not torch.cuda.is_available():
        print("gpu_smoke: needs a CUDA GPU (torch.cuda.is_available() is False)")
        print("RESULT_JSON " + json.dumps({"problems": 1, "cuda_available": False}))
        return 1
    return check() if args.cmd == "check" else sample(args)


if __name__ == "__main__":
    sys.exit(main())

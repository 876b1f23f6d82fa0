"""Dispatch cost per op call on the CPU: public op (validation + backend choice + call) minus its torch reference.

Tiny tensors, so the reference's own work is a few microseconds and the difference is the host cost
the dispatch point adds to every call of a latency-bound draft loop.

    python bench/bench_dispatch.py [--iters 20000] [--registration]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from free_kernels import ops  # noqa: E402


def per_call_us(fn: Callable[[], object], iters: int) -> float:
    """Best of 5 batches, in this thread's CPU time (robust to other processes on a shared machine)."""
    for _ in range(min(500, iters)):
        fn()
    best = float("inf")
    for _ in range(5):
        t = time.thread_time()
        for _ in range(iters // 5):
            fn()
        best = min(best, (time.thread_time() - t) / (iters // 5) * 1e6)
    return best


def cases() -> Dict[str, tuple]:
    from free_kernels.reference.bias_gelu import bias_gelu as r_bg
    from free_kernels.reference.gated_residual import gated_residual as r_gr
    from free_kernels.reference.modulated_layernorm import modulated_layernorm as r_ml
    from free_kernels.reference.speculative_accept import speculative_accept as r_sa
    from free_kernels.reference.verify_attention import verify_attention as r_va

    g = torch.Generator().manual_seed(0)
    B, N, H = 2, 4, 16
    x = torch.randn(B, N, H, generator=g)
    s, c = torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)
    y = torch.randn(B, N, H, generator=g)
    bias = torch.randn(H, generator=g)
    qkv = torch.randn(B, N, 3 * H, generator=g)
    L, D = 2, 8
    mp, lp = torch.randn(B, L + 1, D, generator=g), -torch.rand(B, L + 1, D, generator=g)
    mq, lq, nq = mp[:, :L] + 0.1, lp[:, :L].clone(), torch.randn(B, L, D, generator=g)
    nd, det = torch.full((B,), L, dtype=torch.int64), torch.zeros(B, dtype=torch.bool)
    gen = torch.Generator().manual_seed(1)
    return {
        "modulated_layernorm": (lambda: ops.modulated_layernorm(x, s, c), lambda: r_ml(x, s, c)),
        "gated_residual": (lambda: ops.gated_residual(x, s, y), lambda: r_gr(x, s, y)),
        "bias_gelu": (lambda: ops.bias_gelu(x, bias), lambda: r_bg(x, bias)),
        "verify_attention": (lambda: ops.verify_attention(qkv, 2), lambda: r_va(qkv, 2)),
        "speculative_accept": (
            lambda: ops.speculative_accept(mp, lp, mq, lq, nq, nd, det, equal_variance=True, generator=gen),
            lambda: r_sa(mp, lp, mq, lq, nq, nd, det, equal_variance=True, generator=gen)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20000)
    p.add_argument("--registration", action="store_true",
                   help="also time a trivial op registered with torch.library.Library vs torch.library.custom_op")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("FREE_KERNELS_CHECK_NAN", "0")
    print(f"torch {torch.__version__}, CPU, 1 thread, thread CPU time, best of 5 x {args.iters // 5} calls")
    print(f"{'op':<22}{'op us':>9}{'reference us':>14}{'dispatch us':>13}")
    with torch.no_grad():
        for name, (op, ref) in cases().items():
            iters = args.iters if name != "speculative_accept" else max(1000, args.iters // 10)
            a, b = per_call_us(op, iters), per_call_us(ref, iters)
            print(f"{name:<22}{a:>9.2f}{b:>14.2f}{a - b:>13.2f}")
    if args.registration:
        registration_cost(args.iters)
    print("backend resolution for a CUDA-tensor context (every backend probed; no GPU needed):")
    for name, ctx in cuda_contexts().items():
        op = ops.OPS[name]

        def resolve(op=op, ctx=ctx):
            try:
                op.resolve(ctx)
            except ops.BackendUnavailable:
                pass

        print(f"{name:<22}{per_call_us(resolve, args.iters):>9.2f} us")
    return 0


def registration_cost(iters: int) -> None:
    """Per-call cost of the two torch.library registrations, on a trivial op (x.clone() / out.copy_(x))."""
    from torch.library import Library

    lib = Library("fk_bench_registration", "DEF")
    lib.define("f(Tensor x, str? backend=None) -> Tensor")
    lib.impl("f", lambda x, backend=None: x.clone(), "CPU")
    lib.define("f_out(Tensor x, Tensor(a!) out) -> ()")
    lib.impl("f_out", lambda x, out: (out.copy_(x), None)[1], "CPU")

    @torch.library.custom_op("fk_bench_registration::g", mutates_args=())
    def g(x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        return x.clone()

    @torch.library.custom_op("fk_bench_registration::g_out", mutates_args=("out",))
    def g_out(x: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(x)

    x = torch.randn(4, 8)
    out = torch.empty_like(x)
    f, f_out = torch.ops.fk_bench_registration.f.default, torch.ops.fk_bench_registration.f_out.default
    print("operator registration, trivial op:")
    for name, fn in (("direct python call", lambda: x.clone()), ("Library define+impl", lambda: f(x)),
                     ("Library, mutating", lambda: f_out(x, out)), ("custom_op", lambda: g(x)),
                     ("custom_op, mutating", lambda: g_out(x, out))):
        print(f"  {name:<22}{per_call_us(fn, iters):>9.2f} us")


def cuda_contexts() -> Dict[str, dict]:
    """Dispatch contexts of CUDA calls (DiT-XL/2 sizes), with every key any version of the op reads."""
    dev = torch.device("cuda")
    fused = dict(device=dev, dtype=torch.float16, H=1152, K=4608, M=512, requires_grad=False, mixed=None)
    return {
        "modulated_layernorm": fused,
        "gated_residual": fused,
        "bias_gelu": fused,
        "verify_attention": dict(device=dev, dtype=torch.float16, head_dim=72, B=2, N=256, requires_grad=False),
        "speculative_accept": dict(device=dev, dtype=torch.float32, equal_variance=False, given_randomness=False,
                                   B=8, L=6, D=4096),
    }


if __name__ == "__main__":
    sys.exit(main())

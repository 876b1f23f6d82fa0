"""Benchmark: verify_attention (packed qkv -> attention output) on DiT-XL shapes.

One run compares, per shape and dtype:
  * ours: the triton kernel (head dim split 64 + 16), the same kernel padded to
    128 (``config={"split": False}``: measures the split), the cuda kernel
    (mma.sync, head dim padded to 80);
  * torch SDPA forced to each backend (flash, efficient, cudnn, math) through
    ``torch.nn.attention.sdpa_kernel``, INCLUDING what the DiT attention does
    around it: view/permute of the packed qkv into (B, H, N, d) q, k, v (SDPA
    makes whatever internal copies it needs) and the transpose + reshape copy of
    the output back to (B, N, H * d).  Ours read and write those layouts directly.

Timing: ``triton.testing.do_bench`` median (it warms up and clears L2 before
every repetition).  TFLOP/s = 4 * B * H * N^2 * d / time (QK^T and PV, no
softmax).  Ceiling: dense fp16 / bf16 matmul 8192^3 TFLOP/s on the same device.
"max err" is the max |out - reference in fp32| of each provider.

    python bench/bench_verify_attention.py                 # full table (GPU)
    python bench/bench_verify_attention.py --quick         # N=256, B=2,14 only
    python bench/bench_verify_attention.py --json out.json # also save the rows

On a machine without CUDA it says so and exits 0.  A CPU microbenchmark of the
reference at a tiny size runs under pytest-benchmark:
``pytest bench/bench_verify_attention.py --benchmark-only``.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import do_bench_ms, needs_cuda, print_header, write_json  # noqa: E402

from free_kernels.ops.verify_attention import OP, flops, verify_attention  # noqa: E402
from free_kernels.reference.verify_attention import verify_attention as reference  # noqa: E402

HEADS = 16
HEAD_DIM = 72
NS = (256, 1024)
BS = (2, 14, 56, 112)
DTYPES = (torch.float16, torch.bfloat16)
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


# ------------------------------------------------------------------ providers
def sdpa_packed(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """What the DiT attention does with SDPA: split the packed qkv, attend, merge heads."""
    B, N, C = qkv.shape
    hd = C // (3 * heads)
    q, k, v = qkv.view(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return o.transpose(1, 2).reshape(B, N, heads * hd)


def _sdpa_backend_enum(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


def make_sdpa(name: str, qkv: torch.Tensor, heads: int) -> Tuple[Optional[Callable], Optional[str]]:
    """A callable running SDPA forced to ``name``, or (None, reason) when it cannot run."""
    from torch.nn.attention import sdpa_kernel

    backend = _sdpa_backend_enum(name)

    def run():
        with sdpa_kernel([backend]):
            return sdpa_packed(qkv, heads)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run()
            torch.cuda.synchronize()
        except Exception as e:  # "No available kernel": the warnings say why
            why = [str(w.message).splitlines()[0] for w in caught if "kernel" in str(w.message).lower()
                   or "requires" in str(w.message).lower() or "support" in str(w.message).lower()]
            reason = "; ".join(dict.fromkeys(why)) or f"{type(e).__name__}: {str(e).splitlines()[0]}"
            return None, reason[:160]
    return run, None


def make_ours(backend: str, qkv: torch.Tensor, heads: int, out: torch.Tensor,
              config: Optional[Dict] = None) -> Tuple[Optional[Callable], Optional[str]]:
    ctx = dict(device=qkv.device, dtype=qkv.dtype, head_dim=qkv.shape[-1] // (3 * heads), N=qkv.shape[1])
    why = OP.reasons(ctx)[backend]
    if why is not None:
        return None, why
    if config is not None:
        from free_kernels.triton.verify_attention import verify_attention as tv

        def run():
            return tv(qkv, heads, out, config=config)
    else:
        def run():
            return verify_attention(qkv, heads, out=out, backend=backend)
    try:
        run()
        torch.cuda.synchronize()
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:140]}"
    return run, None


def reference_fp32(qkv: torch.Tensor, heads: int, chunk: int = 8) -> torch.Tensor:
    """fp32 reference on the device, a few batch rows at a time (bounded memory)."""
    outs = [reference(qkv[i:i + chunk].float(), heads) for i in range(0, qkv.shape[0], chunk)]
    return torch.cat(outs)


# ------------------------------------------------------------------ timing
def bench_ms(fn: Callable) -> float:
    return do_bench_ms(fn)


def matmul_ceiling(dtype: torch.dtype, n: int = 8192) -> float:
    """Dense n^3 matmul TFLOP/s: the tensor-core ceiling of this device for ``dtype``."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=dtype, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=dtype, generator=g)
    ms = bench_ms(lambda: a @ b)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def run_shape(B: int, N: int, dtype: torch.dtype, heads: int = HEADS, head_dim: int = HEAD_DIM) -> List[Dict]:
    g = torch.Generator(device="cuda").manual_seed(B * 131 + N)
    qkv = torch.randn(B, N, 3 * heads * head_dim, device="cuda", dtype=dtype, generator=g)
    out = torch.empty(B, N, heads * head_dim, device="cuda", dtype=dtype)
    ref = reference_fp32(qkv, heads)
    fl = flops(B, N, heads, head_dim)

    providers: List[Tuple[str, Callable[[], Tuple[Optional[Callable], Optional[str]]]]] = [
        ("triton", lambda: make_ours("triton", qkv, heads, out)),
        ("triton-pad128", lambda: make_ours("triton", qkv, heads, out, config={"split": False})),
        ("cuda", lambda: make_ours("cuda", qkv, heads, out)),
    ] + [(f"sdpa-{n}", (lambda n=n: make_sdpa(n, qkv, heads))) for n in SDPA_BACKENDS]

    rows = []
    for name, factory in providers:
        fn, why = factory()
        row = dict(provider=name, B=B, N=N, heads=heads, head_dim=head_dim, dtype=str(dtype).replace("torch.", ""))
        if fn is None:
            row.update(ms=None, tflops=None, err=None, note=f"n/a ({why})")
        else:
            got = fn()
            torch.cuda.synchronize()
            err = (got.float() - ref).abs().max().item()
            ms = bench_ms(fn)
            row.update(ms=ms, tflops=fl / (ms * 1e-3) / 1e12, err=err, note="")
        rows.append(row)
        torch.cuda.empty_cache()
    best_sdpa = min((r["ms"] for r in rows if r["provider"].startswith("sdpa") and r["ms"]), default=None)
    for r in rows:
        r["vs_best_sdpa"] = (best_sdpa / r["ms"]) if (best_sdpa and r["ms"]) else None
    del qkv, out, ref
    torch.cuda.empty_cache()
    return rows


def format_rows(rows: List[Dict], ceilings: Dict[str, float]) -> List[str]:
    lines = [f"{'dtype':<9}{'B':>4}{'N':>6}  {'provider':<15}{'time ms':>10}{'TFLOP/s':>9}{'% ceil':>8}"
             f"{'x best SDPA':>12}{'max err':>10}  note"]
    for r in rows:
        ceil = ceilings.get(r["dtype"])
        if r["ms"] is None:
            lines.append(f"{r['dtype']:<9}{r['B']:>4}{r['N']:>6}  {r['provider']:<15}{'-':>10}{'-':>9}{'-':>8}"
                         f"{'-':>12}{'-':>10}  {r['note']}")
            continue
        pct = f"{100 * r['tflops'] / ceil:.0f}%" if ceil else "-"
        vs = f"{r['vs_best_sdpa']:.2f}" if r["vs_best_sdpa"] else "-"
        lines.append(f"{r['dtype']:<9}{r['B']:>4}{r['N']:>6}  {r['provider']:<15}{r['ms']:>10.4f}{r['tflops']:>9.1f}"
                     f"{pct:>8}{vs:>12}{r['err']:>10.2e}  {r['note']}")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N=256, B in {2, 14} only")
    p.add_argument("--json", default=None, help="write the rows and environment to this file")
    p.add_argument("--dtypes", default="fp16,bf16", help="comma list of fp16, bf16")
    p.add_argument("--no-compile", action="store_true",
                   help="accepted for a uniform command line: this benchmark has no torch.compile provider")
    args = p.parse_args(argv)

    if needs_cuda("bench_verify_attention",
                  "CPU microbenchmark of the reference: pytest bench/bench_verify_attention.py --benchmark-only"):
        return 0
    os.environ.setdefault("FREE_KERNELS_CHECK_NAN", "0")

    env = print_header("verify_attention benchmark", __file__, argv)
    dtypes = [dict(fp16=torch.float16, bf16=torch.bfloat16)[d.strip()] for d in args.dtypes.split(",")]
    ceilings = {str(dt).replace("torch.", ""): matmul_ceiling(dt) for dt in dtypes}
    for k, v in ceilings.items():
        print(f"ceiling: dense {k} matmul 8192^3 = {v:.1f} TFLOP/s")
    print(f"heads={HEADS} head_dim={HEAD_DIM}; FLOPs = 4*B*H*N^2*d; time = do_bench median (L2 cleared per rep)")

    ns = (256,) if args.quick else NS
    bs = (2, 14) if args.quick else BS
    all_rows: List[Dict] = []
    for dt in dtypes:
        for N in ns:
            for B in bs:
                rows = run_shape(B, N, dt)
                all_rows.extend(rows)
                print("\n".join(format_rows(rows, ceilings)[(0 if len(all_rows) == len(rows) else 1):]), flush=True)
    write_json(args.json, dict(environment=env, ceilings_tflops=ceilings, rows=all_rows))
    return 0


# ------------------------------------------------- pytest-benchmark (CPU ok)
def test_reference_tiny_cpu(benchmark):
    """The torch reference (the CPU path) at a tiny DiT-like size."""
    qkv = torch.randn(2, 64, 3 * 4 * HEAD_DIM)
    out = benchmark(reference, qkv, 4)
    assert out.shape == (2, 64, 4 * HEAD_DIM)


if __name__ == "__main__":
    sys.exit(main())

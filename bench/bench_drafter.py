"""Benchmark: one FREE draft step vs one target step, DiT-XL/2 geometry.

A draft step = one drafter evaluation (fuse Linear(2H -> H) + ONE DiT-XL block,
H = 1152, 16 heads of 72) on the CFG-doubled rows plus the draft epilogue (the
target's frozen head, guidance, DDPM mean / log-variance, x = mean + sigma * xi),
random weights (timing does not depend on them).  Shapes: batch B in {1, 8}
(2B rows under CFG), 256 tokens (256 px, latent 32) and 1024 tokens (512 px,
latent 64).

Providers, in one run:

* ``eager-ref``        every op on its torch reference (FREE_KERNELS_BACKEND=torch; attention is the
                       naive reference: scores materialised in fp32);
* ``eager-ref+sdpa``   the same with attention through torch SDPA (what an official DiT runs eagerly);
* ``compile-ref``      ``torch.compile`` of eager-ref+sdpa (default mode: Inductor fuses the elementwise
                       work, no CUDA graphs);
* ``compile-ref-ro``   ``torch.compile(mode="reduce-overhead")`` of the same (Inductor + CUDA graphs);
* ``fused``            default dispatch: cuda backends (verify_attention, modulated_layernorm,
                       gated_residual, bias_gelu, draft_epilogue), cuBLAS for the GEMMs;
* ``fused+graph``      the fused step captured once in a CUDA graph (static buffers) and replayed;
* ``triton``, ``triton+graph``  every fused op forced to its triton backend.

and the target's full step (28 blocks + head + guidance + transition, one CFG
batch of 2B rows) eager-fused and graph-replayed.  The last column is the draft
step's time over the target step's time in the same mode (eager / graph):
FREE needs it well below the acceptance it buys (this project's budget: ~5% of
the target's FLOPs per draft step; one XL block is ~3.5%).

Timing: CUDA events around ``--iters`` calls after ``--warmup`` calls, median of
``--reps`` repetitions.  FREE_KERNELS_CHECK_NAN=0 (no host syncs in input checks).

    python bench/bench_drafter.py                      # all shapes and providers (GPU)
    python bench/bench_drafter.py --quick --no-compile  # B=1, 256 tokens, no torch.compile
    python bench/bench_drafter.py --json out.json

``main(argv)`` returns 0; without CUDA it says so and returns 0.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import event_ms, graphed, needs_cuda, print_header, write_json  # noqa: E402

from free_kernels import ops  # noqa: E402
from free_kernels.diffusion import create_diffusion  # noqa: E402
from free_kernels.models.dit import DiT  # noqa: E402
from free_kernels.models.drafter import FeatureDrafter  # noqa: E402
from free_kernels.reference.draft_transition import guided_transition  # noqa: E402

HIDDEN, HEADS, DEPTH, PATCH, C = 1152, 16, 28, 2, 4
BATCHES = (1, 8)
TOKENS = (256, 1024)
CFG_SCALE = 4.0
FUSED_OPS = ("verify_attention", "modulated_layernorm", "gated_residual", "bias_gelu", "draft_transition",
             "draft_epilogue")


# ------------------------------------------------------------------ helpers
@contextlib.contextmanager
def backend_env(mapping: Dict[str, Optional[str]]):
    """Temporarily set FREE_KERNELS_BACKEND* variables (None removes one)."""
    old = {k: os.environ.get(k) for k in mapping}
    try:
        for k, v in mapping.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def all_ops(backend: Optional[str]) -> Dict[str, Optional[str]]:
    env = {"FREE_KERNELS_BACKEND": None}
    env.update({f"FREE_KERNELS_BACKEND_{n.upper()}": backend for n in FUSED_OPS})
    return env


@contextlib.contextmanager
def sdpa_attention():
    """Route verify_attention's torch backend through SDPA (the eager official-DiT attention)."""
    from free_kernels.ops.verify_attention import OP

    b = OP.backends["torch"]

    def sdpa(qkv, num_heads, out=None):
        B, N, three_d = qkv.shape
        hd = three_d // (3 * num_heads)
        q, k, v = qkv.view(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, num_heads * hd)
        if out is not None:
            out.copy_(o)
            return out
        return o

    saved = b._impl
    b._impl = sdpa
    try:
        yield
    finally:
        b._impl = saved


def time_ms(fn: Callable[[], object], warmup: int, iters: int, reps: int) -> float:
    """Median over ``reps`` of (CUDA-event time of ``iters`` calls) / iters."""
    return event_ms(fn, warmup, iters, reps)


# ------------------------------------------------------------------ the two steps
class Setup:
    """Target (28 blocks), drafter (1 block) and static inputs for one (B, tokens) shape."""

    def __init__(self, B: int, tokens: int, dtype: torch.dtype, seed: int = 0, device: str = "cuda"):
        side = int(round(tokens ** 0.5)) * PATCH
        torch.manual_seed(seed)
        dev = torch.device(device)
        self.target = DiT(input_size=side, patch_size=PATCH, in_channels=C, hidden_size=HIDDEN, depth=DEPTH,
                          num_heads=HEADS, num_classes=1000, learn_sigma=True).to(dev, dtype).eval()
        self.target.requires_grad_(False)
        with torch.no_grad():  # non-zero adaLN / head weights (the adaLN-Zero init outputs zeros)
            for name, p in self.target.named_parameters():
                if "adaLN" in name or "final_layer.linear" in name:
                    p.normal_(0, 0.02)
        self.drafter = FeatureDrafter.for_target(self.target, depth=1, init="random",
                                                 generator=torch.Generator().manual_seed(seed)).to(dev, dtype)
        self.drafter.requires_grad_(False)
        self.diffusion = create_diffusion("250")
        g = torch.Generator(device=dev).manual_seed(seed)
        self.B, self.G, self.dtype = B, 2, dtype
        R = B
        self.x = torch.randn(R, C, side, side, device=dev, generator=g)
        self.noise = torch.randn(R, C, side, side, device=dev, generator=g)
        self.h_prev = torch.randn(2 * R, tokens, HIDDEN, device=dev, dtype=dtype, generator=g)
        self.idx = torch.full((R,), 200, device=dev, dtype=torch.int64)
        t = torch.as_tensor(self.diffusion.timestep_map, device=dev)[self.idx]
        self.t = t.repeat(2)
        y = torch.randint(0, 1000, (R,), device=dev, generator=g)
        self.y = torch.cat([y, torch.full_like(y, 1000)])
        self.outs = tuple(torch.empty(self.x.shape, device=dev) for _ in range(3))
        self.xx = self.x.to(dtype).repeat(2, 1, 1, 1)

    def draft_step(self):
        h = ops.drafter_forward(self.drafter, self.h_prev, self.xx, self.t, self.y)
        c = self.target.embed_condition(self.t, self.y)
        return ops.draft_transition(self.target, self.diffusion, h, c, self.x, self.idx, self.noise,
                                    cfg_scale=CFG_SCALE, out=self.outs)

    def draft_step_functional(self):
        """The same step without out= buffers (for torch.compile)."""
        h = ops.drafter_forward(self.drafter, self.h_prev, self.xx, self.t, self.y)
        c = self.target.embed_condition(self.t, self.y)
        return ops.draft_transition(self.target, self.diffusion, h, c, self.x, self.idx, self.noise,
                                    cfg_scale=CFG_SCALE)

    def target_step(self):
        h, c = self.target.forward_features(self.xx, self.t, self.y)
        out = self.target.forward_head(h, c)
        tr = guided_transition(self.diffusion, out, self.x, self.idx, cfg=True, cfg_scale=CFG_SCALE,
                               guidance_channels=3, in_channels=C, clip_denoised=False)
        self.outs[1].copy_(tr["mean"])
        self.outs[2].copy_(tr["log_variance"])
        return self.outs

    def flops_ratio(self) -> float:
        tok = self.h_prev.shape[1]
        d = self.drafter.flops_per_token()
        per_block = 2 * (3 * HIDDEN * HIDDEN + HIDDEN * HIDDEN + 2 * 4 * HIDDEN * HIDDEN) + 4 * tok * HIDDEN
        return (d + 4 * tok * HIDDEN) / (DEPTH * per_block)


def run_shape(B: int, tokens: int, dtype: torch.dtype, args) -> List[Dict]:
    st = Setup(B, tokens, dtype)
    rows: List[Dict] = []

    def add(name: str, make: Callable[[], Callable[[], object]], env: Dict, kind: str, sdpa: bool = False):
        row = dict(B=B, tokens=tokens, dtype=str(dtype).replace("torch.", ""), provider=name, kind=kind)
        try:
            with torch.no_grad(), backend_env(env), (sdpa_attention() if sdpa else contextlib.nullcontext()):
                fn = make()
                row["ms"] = time_ms(fn, args.warmup, args.iters, args.reps)
                row["note"] = ""
        except Exception as e:  # a provider that cannot run says why, the others still run
            row["ms"] = None
            row["note"] = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        rows.append(row)
        torch.cuda.empty_cache()

    add("eager-ref", lambda: st.draft_step, all_ops("torch"), "draft")
    add("eager-ref+sdpa", lambda: st.draft_step, all_ops("torch"), "draft", sdpa=True)
    if not args.no_compile:
        import torch._dynamo

        torch._dynamo.reset()
        add("compile-ref", lambda: torch.compile(st.draft_step_functional), all_ops("torch"), "draft", sdpa=True)
        torch._dynamo.reset()
        add("compile-ref-ro", lambda: torch.compile(st.draft_step_functional, mode="reduce-overhead"),
            all_ops("torch"), "draft", sdpa=True)
        torch._dynamo.reset()
    add("fused", lambda: st.draft_step, all_ops(None), "draft")
    add("fused+graph", lambda: graphed(st.draft_step), all_ops(None), "draft")
    add("triton", lambda: st.draft_step, all_ops("triton"), "draft")
    add("triton+graph", lambda: graphed(st.draft_step), all_ops("triton"), "draft")
    add("target", lambda: st.target_step, all_ops(None), "target")
    add("target+graph", lambda: graphed(st.target_step), all_ops(None), "target")

    tgt = {r["provider"]: r["ms"] for r in rows if r["kind"] == "target"}
    for r in rows:
        base = tgt.get("target+graph") if r["provider"].endswith(("graph", "-ro")) else tgt.get("target")
        r["vs_target"] = (r["ms"] / base) if (r["ms"] and base and r["kind"] == "draft") else None
    rows.append(dict(B=B, tokens=tokens, dtype=rows[0]["dtype"], provider="(FLOP ratio draft/target)",
                     kind="info", ms=None, vs_target=st.flops_ratio(), note="linear layers + attention"))
    del st
    torch.cuda.empty_cache()
    return rows


def format_rows(rows: List[Dict], header: bool) -> List[str]:
    """Markdown table rows (bench/run_gpu.py collects lines starting with '|')."""
    lines = []
    if header:
        lines.append("| dtype | B | tokens | provider | ms | draft / target | note |")
        lines.append("|---|---:|---:|---|---:|---:|---|")
    for r in rows:
        ms = f"{r['ms']:.4f}" if r["ms"] else "-"
        vt = f"{r['vs_target']:.3f}" if r["vs_target"] else "-"
        lines.append(f"| {r['dtype']} | {r['B']} | {r['tokens']} | {r['provider']} | {ms} | {vt} | {r['note']} |")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="B=1, 256 tokens only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers (slow to build)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None, help="write the rows and environment to this file")
    args = p.parse_args(argv)

    if needs_cuda("bench_drafter"):
        return 0
    os.environ.setdefault("FREE_KERNELS_CHECK_NAN", "0")
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16)[args.dtype]
    env = print_header("device:", __file__, argv)
    print(f"DiT-XL/2: H={HIDDEN}, {HEADS} heads, target {DEPTH} blocks, drafter 1 block; CFG (2B rows); "
          f"ms = median of {args.reps} x CUDA events over {args.iters} calls")
    all_rows: List[Dict] = []
    shapes = [(1, 256)] if args.quick else [(B, T) for T in TOKENS for B in BATCHES]
    for B, T in shapes:
        rows = run_shape(B, T, dtype, args)
        print("\n".join(format_rows(rows, header=not all_rows)), flush=True)
        all_rows.extend(rows)
    write_json(args.json, dict(environment=env, rows=all_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One small call of every GPU kernel, for compute-sanitizer (run by bench/run_gpu.py).

    compute-sanitizer --tool memcheck python bench/sanitize_cases.py
    compute-sanitizer --tool racecheck python bench/sanitize_cases.py --only draft_epilogue
    python bench/sanitize_cases.py --list

Every case runs on the ``cuda`` backend (the csrc kernels) and on ``triton``, with the paths that
differ inside a kernel: verify_attention at head dim 64 / 72 / 128 (128 opts in to more than
48 KiB of shared memory), a partial tile (N = 97) and an unaligned, strided qkv view (the
scalar-load path); speculative_accept with equal and learned variance (reflection and the
rejection residual sampler); the adaLN kernels; draft_epilogue in float16 (mma path), bfloat16,
float32 at DiT-XL width (H = 1152: the shared-memory opt-in path), with counter-based noise from
a device rng_state, and with non-contiguous h; the fill kernels of the extension.

Exits non-zero if any case raises; the sanitizer reports memory errors / races itself.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from free_kernels import ops  # noqa: E402


def cases():
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def rn(*s, dtype=torch.float32):
        return torch.randn(*s, device=dev, generator=g).to(dtype)

    for backend in ("cuda", "triton"):
        # ---- verify_attention
        for hd in (64, 72, 128):
            qkv = rn(2, 97, 3 * 2 * hd, dtype=torch.float16)
            yield f"verify_attention[{backend}, hd={hd}, N=97]", lambda b=backend, q=qkv: ops.verify_attention(q, 2, backend=b)
        wide = rn(2, 33, 3 * 2 * 72 + 3, dtype=torch.bfloat16)
        unaligned = wide[:, :, 1:1 + 3 * 2 * 72]  # 2-byte offset: no 16-byte vector loads
        yield (f"verify_attention[{backend}, unaligned bf16 view]",
               lambda b=backend, q=unaligned: ops.verify_attention(q, 2, backend=b))
        # ---- speculative_accept
        B, L, D = 3, 4, 97
        mp, lvp = rn(B, L + 1, D), rn(B, L + 1, D) * 0.1 - 3
        mq, lvq, xi = mp[:, :L] + 0.1 * rn(B, L, D), lvp[:, :L] + 0.01 * rn(B, L, D), rn(B, L, D)
        nd = torch.tensor([L, 2, 0], device=dev, dtype=torch.int32)
        det = torch.tensor([False, True, False], device=dev)
        for eq in (True, False):
            yield (f"speculative_accept[{backend}, equal_variance={eq}]",
                   lambda b=backend, e=eq: ops.speculative_accept(
                       mp, lvp, mq, (lvp[:, :L] if e else lvq), xi, nd, det, equal_variance=e, backend=b))
        # ---- adaLN kernels
        x = rn(2, 7, 96, dtype=torch.float16)
        sh, sc = rn(2, 96, dtype=torch.float16), rn(2, 96, dtype=torch.float16)
        yield f"modulated_layernorm[{backend}]", lambda b=backend: ops.modulated_layernorm(x, sh, sc, backend=b)
        for name in ("gated_residual", "bias_gelu"):
            fn = getattr(ops, name, None)
            if fn is None:
                continue
            if name == "gated_residual":
                yield f"{name}[{backend}]", lambda b=backend, f=fn: f(x, sc, x.clone(), backend=b)
            else:
                yield f"{name}[{backend}]", lambda b=backend, f=fn: f(x, sc[0], backend=b)
        # ---- draft_epilogue
        for dtype, H, strided, rng in ((torch.float16, 96, False, False), (torch.bfloat16, 96, True, True),
                                       (torch.float32, 1152, False, True)):
            args, kw = _epilogue_case(rn, dev, dtype, H, strided, rng)
            tag = f"{str(dtype).replace('torch.', '')}, H={H}{', strided h' if strided else ''}{', rng_state' if rng else ''}"
            yield f"draft_epilogue[{backend}, {tag}]", lambda b=backend, a=args, k=kw: ops.draft_epilogue(*a, backend=b, **k)
    # ---- fill kernels of the extension
    from free_kernels import _env

    ext = _env.extension()
    if ext is not None and ext.built_with_cuda():
        buf = torch.empty(1001, device=dev)
        stream = torch.cuda.current_stream().cuda_stream
        yield "fill_f32[cuda]", lambda: ext.fill_f32(buf.data_ptr(), buf.numel(), 1.5, stream)
        yield "fill_randn_f32[cuda]", lambda: ext.fill_randn_f32(buf.data_ptr(), buf.numel(), 7, 3, 1, stream)


def _epilogue_case(rn, dev, dtype, H, strided, rng):
    from free_kernels.diffusion import create_diffusion
    from free_kernels.reference.draft_epilogue import schedule_tables

    R, C, S, p, G = 3, 4, 8, 2, 2
    N = (S // p) ** 2
    if strided:  # every other token of a wider buffer
        h = rn(G * R, 2 * N, H + 8, dtype=dtype)[:, ::2, 4:4 + H]
    else:
        h = rn(G * R, N, H, dtype=dtype)
    shift, scale = rn(G * R, H, dtype=dtype) * 0.1, rn(G * R, H, dtype=dtype) * 0.1
    weight, bias = rn(p * p * 2 * C, H, dtype=dtype) * 0.05, rn(p * p * 2 * C, dtype=dtype) * 0.05
    x = rn(R, C, S, S)
    tables = schedule_tables(create_diffusion("250")).to(dev)
    index = torch.tensor([249, 100, 1], device=dev, dtype=torch.int64)
    kw = dict(patch_size=p, cfg_scale=2.0, guidance_channels=3, learned_variance=True)
    if rng:
        kw["rng_state"] = torch.tensor([1234, 5], device=dev, dtype=torch.int64)
        noise = None
    else:
        noise = rn(R, C, S, S)
    return (h, shift, scale, weight, bias, x, tables, index, noise), kw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run the cases whose name contains this text")
    ap.add_argument("--list", action="store_true", help="print the case names (needs CUDA to build them)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sanitize_cases: needs a CUDA GPU")
        return 0
    bad = ran = 0
    for name, fn in cases():
        if args.only and args.only not in name:
            continue
        if args.list:
            print(name)
            continue
        ran += 1
        try:
            fn()
            torch.cuda.synchronize()
            print(f"ok    {name}", flush=True)
        except Exception:
            bad += 1
            print(f"FAIL  {name}\n{traceback.format_exc()}", flush=True)
    if not args.list:
        print(f"sanitize_cases: {ran - bad} ok, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

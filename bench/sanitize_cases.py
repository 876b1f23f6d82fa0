"""One small call of every GPU kernel, for compute-sanitizer (run by bench/run_gpu.py).

    compute-sanitizer --tool memcheck python bench/sanitize_cases.py

Exits non-zero if any case raises; the sanitizer reports memory errors / races itself.
"""
from __future__ import annotations

import sys
import traceback

import torch

from free_kernels import ops


def cases():
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def rn(*s, dtype=torch.float32):
        return torch.randn(*s, device=dev, generator=g).to(dtype)

    for backend in ("cuda", "triton"):
        for hd in (64, 72):
            qkv = rn(2, 97, 3 * 2 * hd, dtype=torch.float16)
            yield f"verify_attention[{backend}, hd={hd}]", lambda b=backend, q=qkv: ops.verify_attention(q, 2, backend=b)
        B, L, D = 3, 4, 97
        mp, lvp = rn(B, L + 1, D), rn(B, L + 1, D) * 0.1 - 3
        mq, lvq, xi = mp[:, :L] + 0.1 * rn(B, L, D), lvp[:, :L] + 0.01 * rn(B, L, D), rn(B, L, D)
        nd = torch.tensor([L, 2, 0], device=dev, dtype=torch.int32)
        det = torch.tensor([False, True, False], device=dev)
        for eq in (True, False):
            yield (f"speculative_accept[{backend}, equal_variance={eq}]",
                   lambda b=backend, e=eq: ops.speculative_accept(
                       mp, lvp, mq, (lvp[:, :L] if e else lvq), xi, nd, det, equal_variance=e, backend=b))
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


def main():
    if not torch.cuda.is_available():
        print("sanitize_cases: needs a CUDA GPU")
        return 0
    bad = 0
    for name, fn in cases():
        try:
            fn()
            torch.cuda.synchronize()
            print(f"ok    {name}")
        except Exception:
            bad += 1
            print(f"FAIL  {name}\n{traceback.format_exc()}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

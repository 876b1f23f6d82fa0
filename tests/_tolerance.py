"""The accuracy rule of the kernel tests and its one dtype table.

Flash-attention's rule.  A kernel's output ``out`` is compared with the oracle
``ref64`` (the op's reference run in float64 on the same inputs) and with
PyTorch's own computation in the kernel's dtype, ``same_dtype`` (the reference
run in that dtype, inputs as given)::

    max |out - ref64|  <=  2 * max |same_dtype - ref64|  +  FLOOR[dtype] * max(1, max |ref64|)

i.e. the kernel may be at most ~2x as wrong as PyTorch itself in that dtype.
The floor keeps the bound meaningful where PyTorch's error happens to be ~0
(an exact computation, outputs that round the same way); it is a fraction of
an ulp at 1 for the half types and ~17 ulps at 1 for float32, and scales with
the output's magnitude (an absolute floor would be a looser relative bound for
small outputs than for large ones).

Used by every kernel test (tests/test_<op>.py).  Comparisons of two results
that differ by rounding only (a kernel that computes in fp32 against its
float64 oracle with the same decisions, e.g. speculative_accept's outputs)
use ``CLOSE[dtype]`` as atol and rtol: a few ulps at 1 in the output's dtype.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

# dtype -> (FLOOR: the flash rule's floor, relative to max(1, max |ref64|);
#           CLOSE: atol = rtol of rounding-only comparisons)
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float32: (2e-6, 2e-5),
    torch.float16: (2e-4, 2e-3),
    torch.bfloat16: (2e-3, 1e-2),
}
FLOOR = {dt: t[0] for dt, t in TOLERANCES.items()}
CLOSE = {dt: t[1] for dt, t in TOLERANCES.items()}


def flash_bound(ref64: torch.Tensor, same_dtype: torch.Tensor, dtype: torch.dtype) -> Tuple[float, float, float]:
    """(bound, PyTorch's own error, magnitude scale) of the flash rule for outputs compared with ``ref64``."""
    ref64 = ref64.double().cpu()
    err_pt = (same_dtype.double().cpu() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    return 2 * err_pt + FLOOR[dtype] * scale, err_pt, scale


def assert_flash_rule(out: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor, dtype: torch.dtype,
                      what: str = "") -> None:
    """max |out - ref64| <= 2 * max |same_dtype - ref64| + FLOOR[dtype] * max(1, max |ref64|)."""
    out = out.double().cpu()
    ref64 = ref64.double().cpu()
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out - ref64).abs().max().item()
    bound, err_pt, scale = flash_bound(ref64, same_dtype, dtype)
    assert err <= bound, (f"{what}: max error {err:.3g} > 2 x torch's {err_pt:.3g} + {FLOOR[dtype]:.1g} x "
                          f"{scale:.3g} ({dtype})")


def close_tol(dtype: torch.dtype) -> dict:
    """atol / rtol for ``torch.testing.assert_close`` of rounding-only differences in ``dtype``."""
    return dict(atol=CLOSE[dtype], rtol=CLOSE[dtype])

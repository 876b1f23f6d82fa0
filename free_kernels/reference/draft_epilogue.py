"""Reference draft-step epilogue with a tensor-only signature: the torch backend of ``draft_epilogue``.

It computes exactly what the composition ``reference/draft_transition.py``
(``target.forward_head`` -> ``guide_output`` -> ``diffusion.transition_from_output``
-> ``mean + exp(logvar / 2) * noise``) computes, with the head's parameters and
the diffusion's schedule passed as tensors:

* ``shift, scale`` (G*R, H): the final layer's adaLN modulation of c;
* ``weight, bias`` (P, H), (P,): the final linear, P = p * p * C_out;
* ``tables`` (6, T) float32: per respaced index, the rows of :data:`TABLE_ROWS`
  (float64 schedule -> float32, the rounding ``extract`` applies; built by
  ``GaussianDiffusion.schedule_tables()``), gathered at ``index`` (R,) per row.

Tests check this function against the composition bit for bit on the CPU, and
the fused kernels against both.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .guidance import guide_output
from .modulated_layernorm import modulated_layernorm

# row order of the schedule tables: the kernels' ABI (csrc/kernels/draft_epilogue.cu and
# triton/draft_epilogue.py read rows by these positions); GaussianDiffusion.schedule_tables() builds them
TABLE_ROWS = (
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar_min",   # learned: posterior_log_variance_clipped; fixed: the fixed log-variance
    "logvar_max",   # learned: log_betas;                      fixed: the fixed log-variance
)
NUM_TABLES = len(TABLE_ROWS)


def schedule_tables(diffusion) -> torch.Tensor:
    """(6, T) float32 CPU tensor of the per-index constants the epilogue needs (rows: TABLE_ROWS).

    ``diffusion.schedule_tables()``: the diffusion builds its own tables (it knows its variance kind).
    """
    return diffusion.schedule_tables()


def unpatchify(out: torch.Tensor, patch_size: int, out_channels: int) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, S, S): the DiT's (= diffusers') token layout."""
    p, c = patch_size, out_channels
    h = w = int(round(out.shape[1] ** 0.5))
    if h * w != out.shape[1]:
        raise ValueError(f"token count {out.shape[1]} is not a square")
    out = out.reshape(out.shape[0], h, w, p, p, c)
    out = torch.einsum("nhwpqc->nchpwq", out)
    return out.reshape(out.shape[0], c, h * p, h * p)


def _coefs(tables: torch.Tensor, index: torch.Tensor, ndim: int) -> torch.Tensor:
    """The six per-row float32 values (6, R, 1, ..., 1), gathered in one op, to broadcast against (R, C, S, S).

    ``diffusion.extract`` materialises each coefficient by adding zeros of the full shape; every use
    here is elementwise, so broadcasting gives the same float32 values with one gather instead of
    six gathers, six zero fills and six additions.
    """
    g = tables.to(index.device).index_select(1, index)
    return g.view(g.shape[0], g.shape[1], *([1] * (ndim - 1)))


def transition(model_output: torch.Tensor, x: torch.Tensor, tables: torch.Tensor, index: torch.Tensor, *,
               learned_variance: bool, predict_xstart: bool = False, clip_denoised: bool = False
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, log_variance) with the operations of ``GaussianDiffusion.transition_from_output``."""
    C = x.shape[1]
    co = _coefs(tables, index, x.dim())
    if learned_variance:
        if model_output.shape[1] != 2 * C:
            raise ValueError(f"learned variance needs {2 * C} output channels, got {model_output.shape[1]}")
        model_output, model_var_values = torch.split(model_output, C, dim=1)
        frac = (model_var_values + 1) / 2
        logvar = frac * co[5] + (1 - frac) * co[4]
    else:
        if model_output.shape[1] == 2 * C:
            model_output = model_output[:, :C]
        elif model_output.shape[1] != C:
            raise ValueError(f"model output has {model_output.shape[1]} channels, expected {C}")
        logvar = co[4].expand(x.shape).contiguous()
    if predict_xstart:
        x0 = model_output
    else:
        x0 = co[0] * x - co[1] * model_output
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    mean = co[2] * x0 + co[3] * x
    return mean, logvar


# Philox subsequence of the draft noise: csrc/kernels/draft_epilogue.cu kDraftNoiseSubsequence and
# free_kernels/triton/draft_epilogue.py DRAFT_NOISE_SUBSEQUENCE (tag 0 with candidate field 2^32 - 1,
# a stream none of speculative_accept's uses)
DRAFT_NOISE_SUBSEQUENCE = 0xFFFFFFFF


def philox_noise(rng_state: torch.Tensor, shape, device) -> torch.Tensor:
    """Standard normals of the kernels' counter-based stream, computed on the host.

    Element i of the row-major ``shape`` is ``philox_randn(seed, offset + i,
    DRAFT_NOISE_SUBSEQUENCE)`` (csrc/include/free_kernels/philox.h; the draft
    noise's own Philox subsequence, apart from speculative_accept's streams),
    from the host mirror in ``free_kernels._C``.  Advances ``rng_state[1]`` by
    the element count.
    """
    from .. import _env

    ext = _env.extension()
    if ext is None:
        raise RuntimeError("draft_epilogue (torch backend): noise=None with rng_state needs the host Philox of "
                           f"free_kernels._C, which is not importable: {_env.extension_unavailable_reason()}")
    seed, offset = (int(v) for v in rng_state.tolist())
    n = int(np.prod(shape))
    z = torch.from_numpy(np.asarray(ext.philox_normal(seed & (2 ** 64 - 1), offset & (2 ** 64 - 1), n,
                                                      subsequence=DRAFT_NOISE_SUBSEQUENCE)))
    rng_state[1] += n
    return z.reshape(shape).to(device)


def write_out(out, values):
    """Destination passing of the torch backends: ``values`` copied into the caller's ``out`` buffers
    (returned as a tuple), or ``values`` themselves when ``out`` is None."""
    if out is None:
        return tuple(values)
    for buf, val in zip(out, values):
        buf.copy_(val)
    return tuple(out)


def draft_epilogue(h, shift, scale, weight, bias, x, tables, index, noise=None, *, patch_size: int,
                   cfg_scale: float = 1.0, guidance_channels: int = 3, learned_variance: bool,
                   predict_xstart: bool = False, clip_denoised: bool = False, eps: float = 1e-6,
                   rng_state: Optional[torch.Tensor] = None, out=None, noise_out: Optional[torch.Tensor] = None):
    """Drafted features -> (x_next, mean, log_variance), each (R, C, S, S).

    h (G*R, N, H) with G = 2 under CFG (rows [cond; uncond]), x (R, C, S, S),
    index (R,) respaced indices.  ``noise`` (R, C, S, S) or, when None, the
    counter-based stream of ``rng_state`` (int64 [seed, offset], advanced).
    ``out``: optional (x_next, mean, logvar) buffers; ``noise_out`` receives the
    noise that was used.
    """
    R, C = x.shape[:2]
    y = modulated_layernorm(h, shift, scale, eps=eps)
    o = unpatchify(F.linear(y, weight, bias), patch_size, weight.shape[0] // (patch_size * patch_size))
    if h.shape[0] == 2 * R:
        o = guide_output(o, cfg_scale, guidance_channels, C)[:R]
    mean, logvar = transition(o, x, tables, index, learned_variance=learned_variance,
                              predict_xstart=predict_xstart, clip_denoised=clip_denoised)
    if noise is None:
        if rng_state is None:
            raise ValueError("draft_epilogue: pass noise or rng_state")
        noise = philox_noise(rng_state, tuple(x.shape), x.device)
    x_next = mean + torch.exp(0.5 * logvar) * noise
    if noise_out is not None:
        noise_out.copy_(noise)
    return write_out(out, (x_next, mean, logvar))

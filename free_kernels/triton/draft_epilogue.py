"""Triton kernel: the whole draft-step epilogue in one launch.

From drafted features h (G*R, N, H) to the next drafted state, per program one
sample row r and ``BLOCK_T`` tokens (both CFG rows of those tokens):

1. head LayerNorm statistics of each token (fp32, chunks of ``BK`` columns
   merged with Chan's formula: one read, no E[x^2] - E[x]^2 cancellation);
2. modulate with the row's shift / scale, round to h's dtype (where the
   reference rounds the LayerNorm output), and multiply by the final linear
   ON CHIP: ``tl.dot`` of the (BLOCK_T, BK) tile with the weight rows of the
   eps channels and, for learned variance, of the variance channels, fp32
   accumulation.  The final linear is only P = p*p*C_out wide (32 for DiT-XL/2),
   so doing it inside the epilogue costs ~2*P FLOPs per loaded element and
   saves writing / re-reading the (G*R, N, P) model output and ~10 launches;
3. bias, classifier-free guidance (channels < guidance_channels of the eps part
   become ``u + s (c - u)`` from the cond / uncond rows; variance channels are the
   cond row's own, as ``guide_output(...)[:R]``), unpatchify (token (hh, ww),
   column (i, j, ch) -> pixel (ch, hh*p + i, ww*p + j)), the DDPM transition with
   the row's schedule constants gathered from ``tables[:, index[r]]``
   (learned-range or fixed log-variance, eps or x0 prediction, optional clip to
   [-1, 1]) and ``x_next = mean + exp(logvar / 2) * noise``, everything after
   the dot in fp32;
4. stores x_next, mean, logvar (and the noise used, when asked) as float32.

Noise: given (any float dtype, any strides), or drawn in the kernel from the
counter-based stream ``rng_state = [seed, offset]`` (int64 device tensor):
element (r, c, y, x) is ``philox_randn(seed, offset + ((r*C + c)*S + y)*S + x,
DRAFT_NOISE_SUBSEQUENCE)`` of csrc/include/free_kernels/philox.h (``tl.randn``'s
conversion of the Philox words of that subsequence): its own stream, apart
from speculative_accept's, so the two ops can share one ``rng_state``.  The launcher then
advances ``rng_state[1]`` by R*C*S*S on the device (a separate tiny add on the
same stream), so a captured CUDA graph draws fresh noise on every replay.

FLOPs (for benchmarks): 2 * G*R*N*H * (P_eps * G_eff) for the on-chip linear,
memory: G*R*N*H*elem (h read once from DRAM, the second pass hits L2) + P*H*elem
per program (weights, L2) + 4 * R*C*S*S * 4 (x read, 3 outputs).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, uint_to_uniform_float

from .._env import triton_interpret

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# Philox subsequence of the draft noise (csrc/kernels/draft_epilogue.cu kDraftNoiseSubsequence): the
# candidate field 2^32 - 1 with tag 0, which none of speculative_accept's streams uses, so a
# rng_state shared with the acceptance op never hands the same numbers to both.
DRAFT_NOISE_SUBSEQUENCE = 0xFFFFFFFF
DRAFT_NOISE_SUB_LO = tl.constexpr(DRAFT_NOISE_SUBSEQUENCE & 0xFFFFFFFF)
DRAFT_NOISE_SUB_HI = tl.constexpr(DRAFT_NOISE_SUBSEQUENCE >> 32)
# Triton launches allow at most 65,535 programs along grid axes 1 and 2
MAX_GRID_YZ = 65535


@triton.jit
def _row_stats(h_row, toks, tmask, H, eps, s_hn, s_hh, BLOCK_T: tl.constexpr, BK: tl.constexpr):
    """LayerNorm mean and 1/std of BLOCK_T tokens of one feature row, chunked (Chan's parallel merge)."""
    mean = tl.zeros([BLOCK_T], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < H
        v = tl.load(h_row + toks[:, None] * s_hn + ks[None, :] * s_hh,
                    mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        n_before = k0 * 1.0  # (int -> fp32 that also works for the interpreter's python ints)
        nb = tl.minimum(H - k0, BK) * 1.0
        cm = tl.sum(v, axis=1) / nb
        dv = tl.where(kmask[None, :], v - cm[:, None], 0.0)
        cm2 = tl.sum(dv * dv, axis=1)
        n = n_before + nb
        delta = cm - mean
        mean = mean + delta * (nb / n)
        m2 = m2 + cm2 + delta * delta * (n_before * nb / n)
    rstd = 1.0 / tl.sqrt(m2 / H + eps)
    return mean, rstd


@triton.jit
def _head_tile(h_row, sh_row, sc_row, W, toks, tmask, w_eps, emask, H, eps,
               s_hn, s_hh, s_sh, s_ch, s_wo, s_wk, C: tl.constexpr,
               BLOCK_T: tl.constexpr, BK: tl.constexpr, PE_P: tl.constexpr, WITH_VAR: tl.constexpr,
               A_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(BLOCK_T, PE_P) fp32 products of the modulated LayerNorm rows with the eps (and var) weight rows."""
    mean, rstd = _row_stats(h_row, toks, tmask, H, eps, s_hn, s_hh, BLOCK_T, BK)
    acc_e = tl.zeros([BLOCK_T, PE_P], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_T, PE_P], dtype=tl.float32)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < H
        v = tl.load(h_row + toks[:, None] * s_hn + ks[None, :] * s_hh,
                    mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        sh = tl.load(sh_row + ks * s_sh, mask=kmask, other=0.0).to(tl.float32)
        sc = tl.load(sc_row + ks * s_ch, mask=kmask, other=0.0).to(tl.float32)
        a = ((v - mean[:, None]) * rstd[:, None]) * (1.0 + sc[None, :]) + sh[None, :]
        a = tl.where(kmask[None, :], a, 0.0).to(A_DTYPE)
        wmask = kmask[:, None] & emask[None, :]
        we = tl.load(W + w_eps[None, :] * s_wo + ks[:, None] * s_wk, mask=wmask, other=0.0).to(A_DTYPE)
        acc_e = tl.dot(a, we, acc_e, input_precision=INPUT_PRECISION)
        if WITH_VAR:
            wv = tl.load(W + (w_eps + C)[None, :] * s_wo + ks[:, None] * s_wk, mask=wmask, other=0.0).to(A_DTYPE)
            acc_v = tl.dot(a, wv, acc_v, input_precision=INPUT_PRECISION)
    return acc_e, acc_v


@triton.jit
def _draft_epilogue_kernel(
    Hf, SHIFT, SCALE, W, BIAS, X, TAB, IDX, NOISE, RNG, OUT_X, OUT_M, OUT_V, OUT_Z,
    R, N, H, GRID_W, eps, cfg_scale,
    s_hb, s_hn, s_hh, s_sb, s_sh, s_cb, s_ch, s_wo, s_wk, s_bias, s_tab,
    s_xr, s_xc, s_xy, s_xx, s_nr, s_nc, s_ny, s_nx,
    s_oxr, s_oxc, s_oxy, s_oxx, s_omr, s_omc, s_omy, s_omx,
    s_ovr, s_ovc, s_ovy, s_ovx, s_ozr, s_ozc, s_ozy, s_ozx,
    C: tl.constexpr, P: tl.constexpr, C_OUT: tl.constexpr, GC: tl.constexpr,
    CFG: tl.constexpr, LEARNED: tl.constexpr, XSTART: tl.constexpr, CLIP: tl.constexpr,
    HAS_NOISE: tl.constexpr, WRITE_Z: tl.constexpr,
    BLOCK_T: tl.constexpr, BK: tl.constexpr, PE_P: tl.constexpr,
    A_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    PE: tl.constexpr = P * P * C
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < N
    e = tl.arange(0, PE_P)
    emask = e < PE
    ch = e % C
    ij = e // C
    w_eps = ij * C_OUT + ch  # weight row of eps channel ch at patch position ij

    # ---- on-chip head: LayerNorm + modulate + linear (eps and variance columns)
    acc_c, acc_v = _head_tile(Hf + r * s_hb, SHIFT + r * s_sb, SCALE + r * s_cb, W, toks, tmask, w_eps, emask,
                              H, eps, s_hn, s_hh, s_sh, s_ch, s_wo, s_wk, C, BLOCK_T, BK, PE_P, LEARNED,
                              A_DTYPE, INPUT_PRECISION)
    b_eps = tl.load(BIAS + w_eps * s_bias, mask=emask, other=0.0).to(tl.float32)
    eps_out = acc_c + b_eps[None, :]
    if CFG:
        ru = r + R
        acc_u, _unused = _head_tile(Hf + ru * s_hb, SHIFT + ru * s_sb, SCALE + ru * s_cb, W, toks, tmask, w_eps,
                                    emask, H, eps, s_hn, s_hh, s_sh, s_ch, s_wo, s_wk, C, BLOCK_T, BK, PE_P,
                                    False, A_DTYPE, INPUT_PRECISION)
        eps_u = acc_u + b_eps[None, :]
        guided = eps_u + cfg_scale * (eps_out - eps_u)
        eps_out = tl.where((ch < GC)[None, :], guided, eps_out)

    # ---- per-row schedule constants
    t_idx = tl.load(IDX + r)
    sqrt_recip = tl.load(TAB + t_idx)
    sqrt_recipm1 = tl.load(TAB + s_tab + t_idx)
    coef1 = tl.load(TAB + 2 * s_tab + t_idx)
    coef2 = tl.load(TAB + 3 * s_tab + t_idx)
    log_min = tl.load(TAB + 4 * s_tab + t_idx)

    # ---- unpatchify: (token, column) -> (channel, pixel row, pixel col)
    tok64 = toks.to(tl.int64)
    prow = (tok64 // GRID_W)[:, None] * P + (ij // P)[None, :]
    pcol = (tok64 % GRID_W)[:, None] * P + (ij % P)[None, :]
    ch2 = ch[None, :]
    m2 = tmask[:, None] & emask[None, :]
    xv = tl.load(X + r * s_xr + ch2 * s_xc + prow * s_xy + pcol * s_xx, mask=m2, other=0.0).to(tl.float32)

    # ---- DDPM transition (operation order of GaussianDiffusion.transition_from_output)
    if LEARNED:
        b_var = tl.load(BIAS + (w_eps + C) * s_bias, mask=emask, other=0.0).to(tl.float32)
        frac = (acc_v + b_var[None, :] + 1.0) / 2.0
        log_max = tl.load(TAB + 5 * s_tab + t_idx)
        logvar = frac * log_max + (1.0 - frac) * log_min
    else:
        logvar = tl.zeros([BLOCK_T, PE_P], dtype=tl.float32) + log_min
    if XSTART:
        x0 = eps_out
    else:
        x0 = sqrt_recip * xv - sqrt_recipm1 * eps_out
    if CLIP:
        x0 = tl.where(x0 < -1.0, -1.0, tl.where(x0 > 1.0, 1.0, x0))  # NaN passes through, as clamp
    mean = coef1 * x0 + coef2 * xv

    if HAS_NOISE:
        z = tl.load(NOISE + r * s_nr + ch2 * s_nc + prow * s_ny + pcol * s_nx, mask=m2, other=0.0).to(tl.float32)
    else:
        seed = tl.load(RNG)
        offset = tl.load(RNG + 1)
        S = GRID_W * P
        flat = ((r * C + ch2) * S + prow) * S + pcol
        # tl.randn(seed, offset + flat) of subsequence DRAFT_NOISE_SUBSEQUENCE (philox.h philox_randn)
        o = offset + flat
        o_lo = (o & 0xFFFFFFFF).to(tl.uint32)
        o_hi = ((o >> 32) & 0xFFFFFFFF).to(tl.uint32)
        zero = o_lo * 0
        w0, w1, _w2, _w3 = tl.philox(seed, o_lo, o_hi, (zero + DRAFT_NOISE_SUB_LO).to(tl.uint32),
                                     (zero + DRAFT_NOISE_SUB_HI).to(tl.uint32))
        z, _z1 = pair_uniform_to_normal(uint_to_uniform_float(w0), uint_to_uniform_float(w1))
    x_next = mean + tl.exp(0.5 * logvar) * z

    tl.store(OUT_X + r * s_oxr + ch2 * s_oxc + prow * s_oxy + pcol * s_oxx, x_next, mask=m2)
    tl.store(OUT_M + r * s_omr + ch2 * s_omc + prow * s_omy + pcol * s_omx, mean, mask=m2)
    tl.store(OUT_V + r * s_ovr + ch2 * s_ovc + prow * s_ovy + pcol * s_ovx, logvar, mask=m2)
    if WRITE_Z:
        tl.store(OUT_Z + r * s_ozr + ch2 * s_ozc + prow * s_ozy + pcol * s_ozx, z, mask=m2)


# ----------------------------------------------------------------------------- host side
def launch_meta(H: int, patch_size: int, C: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Block sizes (constexprs) for one call shape."""
    pe = patch_size * patch_size * C
    upcast = interpret and dtype == torch.bfloat16  # the interpreter has no bf16 arithmetic
    return dict(
        BLOCK_T=16,  # tl.dot needs M >= 16
        # fp32 (IEEE FMA dot) at BK = 64 spills on sm_80 / sm_90; 32 does not (checked offline by the tests)
        BK=min(32 if dtype == torch.float32 else 64, max(16, triton.next_power_of_2(H))),
        PE_P=max(16, triton.next_power_of_2(pe)),
        A_DTYPE=tl.float32 if upcast else _TL_DTYPE[dtype],
        INPUT_PRECISION="ieee" if (dtype == torch.float32 or upcast) else "tf32",
    )


def _out_buffers(x: torch.Tensor, out) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if out is not None:
        return tuple(out)
    return tuple(torch.empty(x.shape, dtype=torch.float32, device=x.device) for _ in range(3))


def draft_epilogue(h, shift, scale, weight, bias, x, tables, index, noise=None, *, patch_size: int,
                   cfg_scale: float = 1.0, guidance_channels: int = 3, learned_variance: bool,
                   predict_xstart: bool = False, clip_denoised: bool = False, eps: float = 1e-6,
                   rng_state: Optional[torch.Tensor] = None, out=None, noise_out: Optional[torch.Tensor] = None):
    """See :func:`free_kernels.ops.draft_epilogue.draft_epilogue` (validated there); returns (x_next, mean, logvar)."""
    if h.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton draft_epilogue supports {SUPPORTED_DTYPES}, got {h.dtype}")
    R, C, S, _ = x.shape
    GR, N, H = h.shape
    p = int(patch_size)
    c_out = weight.shape[0] // (p * p)
    grid_w = S // p
    x_next, mean, logvar = _out_buffers(x, out)
    if R == 0:
        return x_next, mean, logvar
    has_noise = noise is not None
    if not has_noise and rng_state is None:
        raise ValueError("draft_epilogue: pass noise or rng_state")
    noise_t = noise if has_noise else x  # placeholder pointer, never read
    index = index.contiguous()  # the kernel reads index + r (the sampler passes a column of its (B, L + 1) table)
    rng_t = rng_state if rng_state is not None else index  # placeholder, never read
    z_t = noise_out if noise_out is not None else x_next   # placeholder, never written
    meta = launch_meta(H, p, C, h.dtype, triton_interpret())
    grid = (triton.cdiv(N, meta["BLOCK_T"]), R)
    if R > MAX_GRID_YZ:
        raise ValueError(f"draft_epilogue (triton): R = {R} sample rows is more than the {MAX_GRID_YZ} programs a "
                         "Triton launch allows along grid axis 1; split the batch")
    if grid[0] > 2 ** 31 - 1:
        raise ValueError(f"draft_epilogue (triton): {grid[0]} token blocks is more than the 2**31 - 1 programs a "
                         "Triton launch allows along grid axis 0")
    _draft_epilogue_kernel[grid](
        h, shift, scale, weight, bias, x, tables, index, noise_t, rng_t, x_next, mean, logvar, z_t,
        R, N, H, grid_w, float(eps), float(cfg_scale),
        *h.stride(), *shift.stride(), *scale.stride(), *weight.stride(), bias.stride(0), tables.stride(0),
        *x.stride(), *noise_t.stride(), *x_next.stride(), *mean.stride(), *logvar.stride(), *z_t.stride(),
        C=C, P=p, C_OUT=c_out, GC=int(guidance_channels), CFG=GR == 2 * R, LEARNED=bool(learned_variance),
        XSTART=bool(predict_xstart), CLIP=bool(clip_denoised), HAS_NOISE=has_noise,
        WRITE_Z=noise_out is not None, **meta, num_warps=1 if triton_interpret() else 4,
    )
    if not has_noise:
        rng_state[1:].add_(R * C * S * S)
    return x_next, mean, logvar

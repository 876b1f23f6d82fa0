"""Triton kernels: FREE's exact acceptance + residual resampling for a whole batch, two launches.

Semantics are those of :mod:`free_kernels.reference.speculative_accept` (the
oracle); the scalar formulas are the ones of ``csrc/include/free_kernels/accept_math.h``
(shared with the CUDA kernel).

Launch 1, ``_accept_reduce_kernel``, grid (S, L, B): program (s, j, b) reduces
chunk s (``CHUNK`` = ``BLOCK * ITERS`` elements) of draft slot j of sample b in
fp32: a BLOCK-wide vector accumulator (each lane sums ``ITERS`` terms in
order), then ``tl.sum`` (a tree).  It writes two partials per (b, j, s):
``(<d, xi>, |d|^2)`` for equal variance (the log ratio is ``dot - nrm / 2``
and the reflection needs exactly these two sums, so no second pass over the
drafts), or ``(log p - log q, 0)`` otherwise.  Slots j >= num_drafts[b] exit
at once.  Program (0, 0, 0) also copies ``rng_state`` into a snapshot and
advances ``rng_state[1]`` on the device (see the stream layout below).

Launch 2, ``_accept_finish_kernel``, grid (S2, B): every program of sample b
sums the (L, S) partials in the same fixed order (so all of them reach the same
decision bit for bit, no atomics), finds the first rejection (slots <
num_drafts, ``log u < log_ratio / tau``, NaN never accepts) and writes its
chunk of ``out``:

* all accepted: the bonus step ``mu_p + sigma_p * noise`` from p_{num_drafts}
  (the mean alone when ``deterministic_last``);
* rejection, equal variance: the reflection ``mu_p + sigma (xi - c d)`` with
  ``c = 2 <d, xi> / |d|^2`` (0 when d = 0);
* rejection, unequal variance: program s == 0 alone runs the exact rejection
  sampler of (p - q)_+ ON THE DEVICE: it draws ``CPI`` candidates at a time
  (two (CPI / 2, RBLOCK) tiles: the cos and sin members of Box-Muller pairs;
  z = mu_p + sigma_p zs, zs counter-based normals),
  reduces ``log q(z) - log p(z)`` over all D elements, keeps the first
  candidate with ``u < 1 - q/p``, loops until one is kept or ``max_candidates``
  were drawn (then the last one is emitted and ``fallbacks`` set, as the
  reference does), and regenerates the kept candidate's normals (counter-based:
  nothing is stored) to write the whole row.

Outputs are written in place into caller-provided buffers, no host sync, no
allocation that depends on data: the pair of launches can be captured in a
CUDA graph, and replays draw fresh numbers because the offset lives on the
device.

Random streams (accept_math.h): Philox4x32-10 with counter
``(lo32(offset + i), hi32(offset + i), candidate, (sample << 2) | tag)`` and key
``seed``; tag 0 acceptance uniforms (i = slot), 1 bonus normals (i = element),
2 residual-candidate normals (i = element; candidates 2m and 2m + 1 are the
cos / sin members of the pair drawn with candidate field m), 3
residual-candidate uniforms (i = 0, candidate field k).  One call advances the offset by ``max(D, L)``.  Explicit
``uniforms`` / ``bonus_noise`` / ``residual_noise`` + ``residual_uniforms``
replace the corresponding streams (the first K candidates come from
``residual_noise``, later ones from the generator, as in the reference).

Differences to the reference, all documented there as "garbage" or as
granularity: ``log_ratio`` holds NaN for slots >= num_drafts; the residual
sampler's fallback happens after the first batch of ``CPI`` candidates that
reaches ``max_candidates`` (the reference batches the given candidates first,
then ``candidates_per_iter``); reductions are fp32 (tree of per-lane sums)
instead of fp64; under ``deterministic_last`` the noise is masked, not
multiplied by 0 (differs only for non-finite noise).

NaN: a NaN read by a draft's log ratio makes it a rejection; the residual
output then carries the NaN (reflection: the whole row; rejection sampler:
the whole row once every candidate's log ratio is NaN).  A NaN in the bonus
transition propagates element-wise.  Never a silent accept.  (The reference's
reflection maps a NaN |d| to e = 0 and emits a finite row there; the kernels
deliberately keep the NaN.)
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from .._env import triton_interpret
from ..reference.speculative_accept import AcceptResult

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

TAG_ACCEPT_UNIFORM = tl.constexpr(0)
TAG_BONUS_NORMAL = tl.constexpr(1)
TAG_RESIDUAL_NORMAL = tl.constexpr(2)
TAG_RESIDUAL_UNIFORM = tl.constexpr(3)

DEFAULT_CONFIG: Dict[str, int] = dict(
    BLOCK=1024,      # launch 1: elements per vector step
    ITERS=2,         # launch 1: steps per program (CHUNK = BLOCK * ITERS)
    BLOCK2=1024,     # launch 2: elements per vector step of the bonus / reflection write
    ITERS2=2,        # launch 2: steps per program
    RBLOCK=512,      # residual sampler: elements per step of its (CPI / 2, RBLOCK) tiles
    CPI=4,           # residual sampler: candidates per iteration (even power of two: Box-Muller pairs)
    num_warps=4,
    num_warps2=8,
)


def rng_advance(L: int, D: int) -> int:
    """Offsets one call consumes per stream (accept_math.h ``rng_advance``)."""
    return max(L, D, 1)


# ----------------------------------------------------------------------------- random numbers
@triton.jit
def _philox_words(seed, offset, sub_lo, sub_hi):
    """philox.h ``philox_randint4x(seed, offset, sub_hi << 32 | sub_lo)``; offset int64, all same shape."""
    lo = (offset & 0xFFFFFFFF).to(tl.uint32)
    hi = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return tl.philox(seed, lo, hi, sub_lo.to(tl.uint32), sub_hi.to(tl.uint32))


@triton.jit
def _uniform_open(w):
    """accept_math.h ``uniform_open``: ((w >> 8) + 1/2) 2^-24 in (0, 1)."""
    return ((w >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08


@triton.jit
def _normal_from_words(w0, w1):
    """accept_math.h ``normal_from_words``: Box-Muller (first member) with a 32-bit radius uniform in (0, 1]."""
    u1 = w0.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    u2 = w1.to(tl.float32) * 2.3283064365386963e-10
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@triton.jit
def _neg_expm1(x):
    """1 - exp(x) for x <= 0 without cancellation (Kahan: (1 - e) * x / log(e))."""
    e = tl.exp(x)
    le = tl.log(tl.where((e > 0.0) & (e < 1.0), e, 0.5))
    r = (1.0 - e) * (x / le)
    r = tl.where(e == 1.0, -x, r)
    return tl.where(e == 0.0, 1.0, r)


# ----------------------------------------------------------------------------- launch 1
@triton.jit
def _accept_reduce_kernel(
    mp_ptr, lvp_ptr, mq_ptr, lvq_ptr, xi_ptr, nd_ptr, part_ptr, rng_ptr, snap_ptr,
    D, L, S, rng_adv,
    s_mp_b, s_mp_l, s_mp_d, s_lvp_b, s_lvp_l, s_lvp_d,
    s_mq_b, s_mq_l, s_mq_d, s_lvq_b, s_lvq_l, s_lvq_d, s_xi_b, s_xi_l, s_xi_d,
    EQUAL_VAR: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    s = tl.program_id(0)
    j = tl.program_id(1)
    b = tl.program_id(2)
    if (s == 0) & (j == 0) & (b == 0):
        seed = tl.load(rng_ptr)
        off = tl.load(rng_ptr + 1)
        tl.store(snap_ptr, seed)
        tl.store(snap_ptr + 1, off)
        tl.store(rng_ptr + 1, off + rng_adv)
    nd = tl.minimum(tl.maximum(tl.load(nd_ptr + b).to(tl.int32), 0), L)
    if j < nd:
        b64 = b.to(tl.int64)
        j64 = j.to(tl.int64)
        acc0 = tl.zeros([BLOCK], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK], dtype=tl.float32)
        lo = s * (BLOCK * ITERS)
        for it in range(ITERS):
            offs = lo + it * BLOCK + tl.arange(0, BLOCK)
            m = offs < D
            o64 = offs.to(tl.int64)
            mp = tl.load(mp_ptr + b64 * s_mp_b + j64 * s_mp_l + o64 * s_mp_d, mask=m, other=0.0).to(tl.float32)
            lvp = tl.load(lvp_ptr + b64 * s_lvp_b + j64 * s_lvp_l + o64 * s_lvp_d, mask=m, other=0.0).to(tl.float32)
            mq = tl.load(mq_ptr + b64 * s_mq_b + j64 * s_mq_l + o64 * s_mq_d, mask=m, other=0.0).to(tl.float32)
            xi = tl.load(xi_ptr + b64 * s_xi_b + j64 * s_xi_l + o64 * s_xi_d, mask=m, other=0.0).to(tl.float32)
            if EQUAL_VAR:
                d = (mp - mq) * tl.exp(-0.5 * lvp)
                acc0 += tl.where(m, d * xi, 0.0)
                acc1 += tl.where(m, d * d, 0.0)
            else:
                lvq = tl.load(lvq_ptr + b64 * s_lvq_b + j64 * s_lvq_l + o64 * s_lvq_d, mask=m,
                              other=0.0).to(tl.float32)
                x = mq + tl.exp(0.5 * lvq) * xi
                zp = (x - mp) * tl.exp(-0.5 * lvp)
                acc0 += tl.where(m, 0.5 * (xi - zp) * (xi + zp) + 0.5 * (lvq - lvp), 0.0)
        base = ((b64 * L + j64) * S + s) * 2
        tl.store(part_ptr + base, tl.sum(acc0, axis=0))
        tl.store(part_ptr + base + 1, tl.sum(acc1, axis=0))


# ----------------------------------------------------------------------------- launch 2
@triton.jit
def _write_reflection(mp_row, lvp_row, mq_row, xi_row, out_row, s_mp_d, s_lvp_d, s_mq_d, s_xi_d, s_out_d,
                      coef, lo, D, BLOCK2: tl.constexpr, ITERS2: tl.constexpr):
    """out = mu_p + sigma (xi - coef d) over this program's chunk (reflection maximal coupling)."""
    for it in range(ITERS2):
        offs = lo + it * BLOCK2 + tl.arange(0, BLOCK2)
        m = offs < D
        o64 = offs.to(tl.int64)
        mp = tl.load(mp_row + o64 * s_mp_d, mask=m).to(tl.float32)
        lvp = tl.load(lvp_row + o64 * s_lvp_d, mask=m).to(tl.float32)
        mq = tl.load(mq_row + o64 * s_mq_d, mask=m).to(tl.float32)
        xi = tl.load(xi_row + o64 * s_xi_d, mask=m).to(tl.float32)
        d = (mp - mq) * tl.exp(-0.5 * lvp)
        o = mp + tl.exp(0.5 * lvp) * (xi - coef * d)
        tl.store(out_row + o64 * s_out_d, o.to(out_row.dtype.element_ty), mask=m)


@triton.jit
def _write_bonus(mp_row, lvp_row, bn_row, out_row, s_mp_d, s_lvp_d, s_bn_d, s_out_d, det, seed, off0, sub_hi,
                 lo, D, HAS_BN: tl.constexpr, BLOCK2: tl.constexpr, ITERS2: tl.constexpr):
    """out = mu_p + sigma_p noise (mu_p alone when det) over this program's chunk."""
    for it in range(ITERS2):
        offs = lo + it * BLOCK2 + tl.arange(0, BLOCK2)
        m = offs < D
        o64 = offs.to(tl.int64)
        mp = tl.load(mp_row + o64 * s_mp_d, mask=m).to(tl.float32)
        lvp = tl.load(lvp_row + o64 * s_lvp_d, mask=m).to(tl.float32)
        if HAS_BN:
            noise = tl.load(bn_row + o64 * s_bn_d, mask=m).to(tl.float32)
        else:
            zero = offs.to(tl.uint32) * 0
            w0, w1, _w2, _w3 = _philox_words(seed, off0 + o64, zero, zero + sub_hi)
            noise = _normal_from_words(w0, w1)
        o = tl.where(det, mp, mp + tl.exp(0.5 * lvp) * noise)
        tl.store(out_row + o64 * s_out_d, o.to(out_row.dtype.element_ty), mask=m)


@triton.jit
def _candidate_normals(rn_row, s_rn_k, s_rn_d, pair, offs, m, seed, off0, sub_hi, K_GIVEN,
                       HAS_RN: tl.constexpr):
    """Standard normals of candidates 2 pair and 2 pair + 1 (pair: (C,)) at elements offs (R,).

    One Philox counter per (pair, element) gives both members of a Box-Muller pair
    (accept_math.h ``residual_normal``); candidates below K_GIVEN read ``residual_noise``.
    Returns two (C, R) tiles: even and odd candidates.
    """
    o64 = offs.to(tl.int64)
    zero = pair[:, None].to(tl.uint32) * 0 + offs[None, :].to(tl.uint32) * 0
    off2 = off0 + o64[None, :] + zero.to(tl.int64)
    w0, w1, _w2, _w3 = _philox_words(seed, off2, zero + pair[:, None].to(tl.uint32), zero + sub_hi)
    u1 = w0.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    theta = 6.283185307179586 * (w1.to(tl.float32) * 2.3283064365386963e-10)
    r = tl.sqrt(-2.0 * tl.log(u1))
    z_even = r * tl.cos(theta)
    z_odd = r * tl.sin(theta)
    if HAS_RN:
        c_even = 2 * pair
        g_even = c_even < K_GIVEN
        g_odd = (c_even + 1) < K_GIVEN
        base = rn_row + c_even[:, None].to(tl.int64) * s_rn_k + o64[None, :] * s_rn_d
        z_even = tl.where(g_even[:, None],
                          tl.load(base, mask=g_even[:, None] & m[None, :], other=0.0).to(tl.float32), z_even)
        z_odd = tl.where(g_odd[:, None],
                         tl.load(base + s_rn_k, mask=g_odd[:, None] & m[None, :], other=0.0).to(tl.float32), z_odd)
    return z_even, z_odd


@triton.jit
def _residual_uniforms(ru_row, s_ru_k, cand, seed, off0, sub_hi, K_GIVEN, HAS_RN: tl.constexpr):
    zero = cand.to(tl.uint32) * 0
    wu, _u1, _u2, _u3 = _philox_words(seed, off0 + zero.to(tl.int64), cand.to(tl.uint32), zero + sub_hi)
    ur = _uniform_open(wu)
    if HAS_RN:
        given = cand < K_GIVEN
        ur = tl.where(given, tl.load(ru_row + cand.to(tl.int64) * s_ru_k, mask=given, other=0.5).to(tl.float32), ur)
    return ur


@triton.jit
def _residual_sampler(mp_row, lvp_row, mq_row, lvq_row, rn_row, ru_row, out_row, cand_p, fb_p,
                      s_mp_d, s_lvp_d, s_mq_d, s_lvq_d, s_rn_k, s_rn_d, s_ru_k, s_out_d,
                      seed, off0, sub_normal, sub_uniform, D, K_GIVEN, MAX_CAND,
                      HAS_RN: tl.constexpr, RBLOCK: tl.constexpr, CPI: tl.constexpr):
    """Exact rejection sampler of (p - q)_+ for one row, looping on the device; writes the whole row.

    Each iteration evaluates CPI candidates (CPI / 2 Box-Muller pairs) at once:
    log q(z) - log p(z) reduced over all D elements, keep the first candidate
    with u < 1 - q/p.  Stops at the first kept candidate, when every candidate of
    the batch is NaN (NaN inputs: the row becomes NaN), or once MAX_CAND
    candidates were drawn (fallback: the last candidate, as the reference).
    """
    HALF: tl.constexpr = CPI // 2
    pvec = tl.arange(0, HALF)
    zero_p = pvec * 0
    k = tl.sum(zero_p, axis=0)      # candidates drawn so far (int32 scalar, a multiple of CPI)
    chosen = k - 1                  # index of the emitted candidate; -1 while looping
    count = k
    flag_fb = k
    flag_nan = k
    while chosen < 0:
        pair = k // 2 + pvec
        acc_e = tl.zeros([HALF, RBLOCK], dtype=tl.float32)
        acc_o = tl.zeros([HALF, RBLOCK], dtype=tl.float32)
        for d0 in range(0, D, RBLOCK):
            offs = d0 + tl.arange(0, RBLOCK)
            m = offs < D
            o64 = offs.to(tl.int64)
            mp = tl.load(mp_row + o64 * s_mp_d, mask=m, other=0.0).to(tl.float32)
            lvp = tl.load(lvp_row + o64 * s_lvp_d, mask=m, other=0.0).to(tl.float32)
            mq = tl.load(mq_row + o64 * s_mq_d, mask=m, other=0.0).to(tl.float32)
            lvq = tl.load(lvq_row + o64 * s_lvq_d, mask=m, other=0.0).to(tl.float32)
            z_e, z_o = _candidate_normals(rn_row, s_rn_k, s_rn_d, pair, offs, m, seed, off0, sub_normal,
                                          K_GIVEN, HAS_RN)
            sig_p = tl.exp(0.5 * lvp)[None, :]
            isig_q = tl.exp(-0.5 * lvq)[None, :]
            half_dlv = (0.5 * (lvp - lvq))[None, :]
            zq_e = (mp[None, :] + sig_p * z_e - mq[None, :]) * isig_q
            zq_o = (mp[None, :] + sig_p * z_o - mq[None, :]) * isig_q
            acc_e += tl.where(m[None, :], 0.5 * (z_e - zq_e) * (z_e + zq_e) + half_dlv, 0.0)
            acc_o += tl.where(m[None, :], 0.5 * (z_o - zq_o) * (z_o + zq_o) + half_dlv, 0.0)
        lq_e = tl.sum(acc_e, axis=1)                     # log q(z) - log p(z) of candidates k + 2 pvec
        lq_o = tl.sum(acc_o, axis=1)                     # ... and k + 2 pvec + 1
        c_e = k + 2 * pvec
        u_e = _residual_uniforms(ru_row, s_ru_k, c_e, seed, off0, sub_uniform, K_GIVEN, HAS_RN)
        u_o = _residual_uniforms(ru_row, s_ru_k, c_e + 1, seed, off0, sub_uniform, K_GIVEN, HAS_RN)
        keep_e = (lq_e < 0.0) & (u_e < _neg_expm1(tl.minimum(lq_e, 0.0)))
        keep_o = (lq_o < 0.0) & (u_o < _neg_expm1(tl.minimum(lq_o, 0.0)))
        first_k = tl.minimum(tl.min(tl.where(keep_e, 2 * pvec, CPI), axis=0),
                             tl.min(tl.where(keep_o, 2 * pvec + 1, CPI), axis=0))
        n_nan = tl.sum((lq_e != lq_e).to(tl.int32), axis=0) + tl.sum((lq_o != lq_o).to(tl.int32), axis=0)
        if first_k < CPI:
            chosen = k + first_k
            count = k + first_k + 1
        elif n_nan == CPI:
            chosen = k
            count = k + CPI
            flag_nan = flag_nan + 1
        elif k + CPI >= MAX_CAND:
            chosen = k + CPI - 1
            count = k + CPI
            flag_fb = flag_fb + 1
        k = k + CPI
    # ---- write the emitted candidate (its normals regenerated from its counter: nothing stored)
    pair_c = chosen // 2 + tl.arange(0, 1)
    odd = (chosen % 2) == 1
    for d0 in range(0, D, RBLOCK):
        offs = d0 + tl.arange(0, RBLOCK)
        m = offs < D
        o64 = offs.to(tl.int64)
        mp = tl.load(mp_row + o64 * s_mp_d, mask=m, other=0.0).to(tl.float32)
        lvp = tl.load(lvp_row + o64 * s_lvp_d, mask=m, other=0.0).to(tl.float32)
        z_e, z_o = _candidate_normals(rn_row, s_rn_k, s_rn_d, pair_c, offs, m, seed, off0, sub_normal, K_GIVEN,
                                      HAS_RN)
        zs = tl.where(odd, z_o, z_e)
        z = mp[None, :] + tl.exp(0.5 * lvp)[None, :] * zs
        z = tl.where(flag_nan > 0, float("nan"), z)
        tl.store(out_row + o64[None, :] * s_out_d, z.to(out_row.dtype.element_ty), mask=m[None, :])
    tl.store(cand_p, count)
    tl.store(fb_p, flag_fb > 0)


@triton.jit
def _accept_finish_kernel(
    mp_ptr, lvp_ptr, mq_ptr, lvq_ptr, xi_ptr, nd_ptr, det_ptr,
    u_ptr, tau_ptr, bn_ptr, rn_ptr, ru_ptr, part_ptr, snap_ptr,
    out_ptr, nacc_ptr, lr_ptr, cand_ptr, fb_ptr,
    D, L, S, K_GIVEN, MAX_CAND,
    s_mp_b, s_mp_l, s_mp_d, s_lvp_b, s_lvp_l, s_lvp_d,
    s_mq_b, s_mq_l, s_mq_d, s_lvq_b, s_lvq_l, s_lvq_d, s_xi_b, s_xi_l, s_xi_d,
    s_out_b, s_out_d, s_u_b, s_u_l, s_tau_b, s_tau_l, s_bn_b, s_bn_d,
    s_rn_b, s_rn_k, s_rn_d, s_ru_b, s_ru_k,
    EQUAL_VAR: tl.constexpr, HAS_U: tl.constexpr, HAS_TAU: tl.constexpr, HAS_BN: tl.constexpr,
    HAS_RN: tl.constexpr, LP: tl.constexpr, SP: tl.constexpr,
    BLOCK2: tl.constexpr, ITERS2: tl.constexpr, RBLOCK: tl.constexpr, CPI: tl.constexpr,
):
    s = tl.program_id(0)
    b = tl.program_id(1)
    b64 = b.to(tl.int64)
    seed = tl.load(snap_ptr)
    off0 = tl.load(snap_ptr + 1)
    nd = tl.minimum(tl.maximum(tl.load(nd_ptr + b).to(tl.int32), 0), L)
    det = tl.load(det_ptr + b).to(tl.int32) != 0

    # ---- decision (identical in every program of sample b: same data, same order)
    slots = tl.arange(0, LP)
    valid = slots < nd
    sidx = tl.arange(0, SP)
    pmask = valid[:, None] & (sidx[None, :] < S)
    pbase = ((b64 * L + slots[:, None].to(tl.int64)) * S + sidx[None, :]) * 2
    dot = tl.sum(tl.load(part_ptr + pbase, mask=pmask, other=0.0), axis=1)
    nrm = tl.sum(tl.load(part_ptr + pbase + 1, mask=pmask, other=0.0), axis=1)
    if EQUAL_VAR:
        lr = dot - 0.5 * nrm
    else:
        lr = dot
    if HAS_U:
        u = tl.load(u_ptr + b64 * s_u_b + slots * s_u_l, mask=valid, other=0.5).to(tl.float32)
    else:
        zero_l = slots.to(tl.uint32) * 0
        wa, _a1, _a2, _a3 = _philox_words(seed, off0 + slots.to(tl.int64), zero_l,
                                          zero_l + (b * 4 + TAG_ACCEPT_UNIFORM))
        u = _uniform_open(wa)
    thr = lr
    if HAS_TAU:
        thr = lr / tl.load(tau_ptr + b64 * s_tau_b + slots * s_tau_l, mask=valid, other=1.0).to(tl.float32)
    acc_ok = tl.log(u) < thr                       # NaN compares false: never accepted
    rejected = valid & (acc_ok == 0)
    first = tl.min(tl.where(rejected, slots, LP), axis=0)
    num_acc = tl.minimum(first, nd)
    reject = num_acc < nd

    if s == 0:
        tl.store(nacc_ptr + b, num_acc)
        tl.store(lr_ptr + b64 * L + slots, tl.where(valid, lr, float("nan")), mask=slots < L)
        # overwritten by the residual sampler when it runs (same program, program order)
        tl.store(cand_ptr + b, num_acc * 0)
        tl.store(fb_ptr + b, num_acc < 0)

    lo = s * (BLOCK2 * ITERS2)
    # row of p read by the output: the rejected slot, or p_{num_drafts} for the bonus
    jp64 = tl.where(reject, num_acc, nd).to(tl.int64)
    jq64 = tl.minimum(num_acc, tl.maximum(L - 1, 0)).to(tl.int64)
    mp_row = mp_ptr + b64 * s_mp_b + jp64 * s_mp_l
    lvp_row = lvp_ptr + b64 * s_lvp_b + jp64 * s_lvp_l
    out_row = out_ptr + b64 * s_out_b
    if reject:
        mq_row = mq_ptr + b64 * s_mq_b + jq64 * s_mq_l
        if EQUAL_VAR:
            sel = slots == num_acc
            dot_j = tl.sum(tl.where(sel, dot, 0.0), axis=0)
            nrm_j = tl.sum(tl.where(sel, nrm, 0.0), axis=0)
            # accept_math.h reflection_coef: 0 when d = 0, NaN when a sum is NaN
            coef = tl.where(nrm_j > 0.0, 2.0 * dot_j / tl.where(nrm_j > 0.0, nrm_j, 1.0),
                            tl.where(nrm_j == 0.0, 0.0 * dot_j, nrm_j))
            _write_reflection(mp_row, lvp_row, mq_row, xi_ptr + b64 * s_xi_b + jq64 * s_xi_l, out_row,
                              s_mp_d, s_lvp_d, s_mq_d, s_xi_d, s_out_d, coef, lo, D, BLOCK2, ITERS2)
        else:
            if s == 0:
                _residual_sampler(mp_row, lvp_row, mq_row, lvq_ptr + b64 * s_lvq_b + jq64 * s_lvq_l,
                                  rn_ptr + b64 * s_rn_b, ru_ptr + b64 * s_ru_b, out_row, cand_ptr + b, fb_ptr + b,
                                  s_mp_d, s_lvp_d, s_mq_d, s_lvq_d, s_rn_k, s_rn_d, s_ru_k, s_out_d,
                                  seed, off0, b * 4 + TAG_RESIDUAL_NORMAL, b * 4 + TAG_RESIDUAL_UNIFORM,
                                  D, K_GIVEN, MAX_CAND, HAS_RN, RBLOCK, CPI)
    else:
        _write_bonus(mp_row, lvp_row, bn_ptr + b64 * s_bn_b, out_row, s_mp_d, s_lvp_d, s_bn_d, s_out_d, det,
                     seed, off0, b * 4 + TAG_BONUS_NORMAL, lo, D, HAS_BN, BLOCK2, ITERS2)


# ----------------------------------------------------------------------------- launcher
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _strides(t: Optional[torch.Tensor], n: int):
    return tuple(t.stride()) if t is not None else (0,) * n


def speculative_accept(
    mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts, deterministic_last, *,
    equal_variance: bool, uniforms=None, bonus_noise=None, residual_noise=None, residual_uniforms=None,
    tau=None, generator: Optional[torch.Generator] = None, out=None, candidates_per_iter: int = 8,
    max_candidates: int = 100_000, rng_state: Optional[torch.Tensor] = None,
    num_accepted: Optional[torch.Tensor] = None, log_ratio: Optional[torch.Tensor] = None,
    residual_candidates: Optional[torch.Tensor] = None, fallbacks: Optional[torch.Tensor] = None,
    config: Optional[dict] = None,
) -> AcceptResult:
    """Triton backend of :func:`free_kernels.ops.speculative_accept` (same arguments and result).

    ``rng_state``: int64 tensor ``[seed, offset]`` on the inputs' device, read by
    the kernels and advanced in place by ``max(D, L)``; when None one is drawn
    from ``generator``.  ``num_accepted`` / ``log_ratio`` / ``residual_candidates``
    / ``fallbacks`` / ``out`` may be preallocated (CUDA-graph capture).
    ``candidates_per_iter`` is accepted for signature compatibility; the kernel
    batches ``config["CPI"]`` candidates per iteration.
    """
    del candidates_per_iter
    cfg = dict(DEFAULT_CONFIG)
    if config:
        cfg.update(config)
    B, L1, D = mean_p.shape
    L = L1 - 1
    dev = mean_p.device
    if mean_p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton speculative_accept: dtype {mean_p.dtype} not supported")
    if not 1 <= int(max_candidates) <= 2 ** 30:
        raise ValueError(f"max_candidates must lie in [1, 2**30], got {max_candidates}")
    if B >= 2 ** 30:
        raise ValueError("at most 2**30 samples per call (random stream layout)")
    if rng_state is None:
        from ..reference.philox import make_rng_state

        rng_state = make_rng_state(dev, generator)
    if out is None:
        out = torch.empty(B, D, dtype=mean_p.dtype, device=dev)
    if num_accepted is None:
        num_accepted = torch.empty(B, dtype=torch.int32, device=dev)
    if log_ratio is None:
        log_ratio = torch.empty(B, L, dtype=torch.float32, device=dev)
    if residual_candidates is None:
        residual_candidates = torch.empty(B, dtype=torch.int32, device=dev)
    if fallbacks is None:
        fallbacks = torch.empty(B, dtype=torch.bool, device=dev)
    if B == 0:
        return AcceptResult(out=out, num_accepted=num_accepted, log_ratio=log_ratio,
                            residual_candidates=residual_candidates, fallbacks=fallbacks)

    chunk = cfg["BLOCK"] * cfg["ITERS"]
    S = triton.cdiv(D, chunk)
    chunk2 = cfg["BLOCK2"] * cfg["ITERS2"]
    S2 = triton.cdiv(D, chunk2)
    part = torch.empty(max(B * L * S * 2, 1), dtype=torch.float32, device=dev)
    snap = torch.empty(2, dtype=torch.int64, device=dev)
    det = deterministic_last if deterministic_last.dtype == torch.bool else deterministic_last != 0
    has_rn = residual_noise is not None
    K = residual_noise.shape[1] if has_rn else 0
    dummy = part  # never dereferenced when its HAS_* flag is False

    _accept_reduce_kernel[(S, max(L, 1), B)](
        mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts, part, rng_state, snap,
        D, L, S, rng_advance(L, D),
        *mean_p.stride(), *logvar_p.stride(), *mean_q.stride(), *logvar_q.stride(), *noise_q.stride(),
        EQUAL_VAR=bool(equal_variance), BLOCK=cfg["BLOCK"], ITERS=cfg["ITERS"], num_warps=cfg["num_warps"],
    )
    _accept_finish_kernel[(S2, B)](
        mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts, det,
        uniforms if uniforms is not None else dummy, tau if tau is not None else dummy,
        bonus_noise if bonus_noise is not None else dummy, residual_noise if has_rn else dummy,
        residual_uniforms if has_rn else dummy, part, snap,
        out, num_accepted, log_ratio, residual_candidates, fallbacks,
        D, L, S, K, int(max_candidates),
        *mean_p.stride(), *logvar_p.stride(), *mean_q.stride(), *logvar_q.stride(), *noise_q.stride(),
        *out.stride(), *_strides(uniforms, 2), *_strides(tau, 2), *_strides(bonus_noise, 2),
        *_strides(residual_noise, 3), *_strides(residual_uniforms, 2),
        EQUAL_VAR=bool(equal_variance), HAS_U=uniforms is not None, HAS_TAU=tau is not None,
        HAS_BN=bonus_noise is not None, HAS_RN=has_rn, LP=_next_pow2(max(L, 1)), SP=_next_pow2(S),
        BLOCK2=cfg["BLOCK2"], ITERS2=cfg["ITERS2"], RBLOCK=cfg["RBLOCK"], CPI=cfg["CPI"],
        num_warps=cfg["num_warps2"],
    )
    return AcceptResult(out=out, num_accepted=num_accepted, log_ratio=log_ratio,
                        residual_candidates=residual_candidates, fallbacks=fallbacks)


def interpreter_config() -> dict:
    """Small blocks for ``TRITON_INTERPRET=1`` runs (several chunks even at tiny D)."""
    return dict(BLOCK=32, ITERS=1, BLOCK2=32, ITERS2=2, RBLOCK=32, CPI=4, num_warps=1, num_warps2=1)


__all__ = ["speculative_accept", "rng_advance", "interpreter_config", "SUPPORTED_DTYPES",
           "triton_interpret"]

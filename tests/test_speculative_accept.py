"""Kernel backends of ``speculative_accept`` (Triton, CUDA) against the oracle.

* Exact comparisons: with the same explicit randomness (``uniforms``,
  ``bonus_noise``, ``residual_noise`` + ``residual_uniforms``) a kernel must take
  the identical accept decisions (``num_accepted``) and write ``out`` /
  ``log_ratio`` within fp32 rounding of the float64 reference (``out``:
  rounded once to its dtype, tolerance ``CLOSE[dtype]`` of tests/_tolerance.py).  The residual
  rejection sampler is compared on the rows where the reference found its
  candidate among the given ones (after those both sides switch to their own
  generators).
* Randomness the kernels draw themselves (rng_state = [seed, offset]): the
  documented Philox stream layout (checked against an independent numpy
  Philox), in-place offset advance, and goodness of fit of the emitted state.
* Distribution tests of the residual samplers: with p, q 1-D/2-D Gaussians of
  unequal variance, the state emitted after one draft (the accepted draft, or
  the residual sample on rejection) must be distributed as p.  One-sample KS
  tests, false-alarm rate ALPHA = 1e-3 per test (Bonferroni over coordinates),
  fixed seeds, and negative controls (reflection under unequal variance;
  keeping the draft on rejection) that the same test must reject.

On a CPU-only machine the Triton kernels run under TRITON_INTERPRET=1 (set by
conftest.py) at tiny sizes, and the CUDA kernels run as "cuda-emu": the very
csrc/kernels/speculative_accept.cu, compiled by g++ against a host emulation
of the CUDA built-ins it uses (tests/cuda_emulation/: blocks of real threads,
real barriers for __syncthreads / shuffles / ballots), called through the same
Python wrapper as the real extension.  The real CUDA backend, CUDA-graph
capture and the latent-size cases carry the ``gpu`` marker.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from _tolerance import close_tol
from cuda_emulation import harness
from free_kernels import _env
from free_kernels.ops import speculative_accept as op
from free_kernels.ops._dispatch import BackendUnavailable, get_op
from free_kernels.reference.speculative_accept import speculative_accept as reference

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
ALPHA = 1e-3
OP = get_op("speculative_accept")

# "cuda-emu": the CUDA kernels of csrc/kernels/speculative_accept.cu compiled with g++ against a host
# emulation of the CUDA built-ins they use (tests/cuda_emulation/), called through the same Python
# wrapper as the real extension.  CPU-only machines; a GPU runs the real "cuda" backend instead.
BACKENDS = [pytest.param("triton", id="triton"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
            pytest.param("cuda-emu", id="cuda-emu")]
OPS_MODULE = sys.modules[OP.backends["torch"].load.__module__]


def _emulated_extension():
    """The session's host-emulated CUDA extension (tests/cuda_emulation/harness.py): (ext, None) or (None, why)."""
    return harness.extension()


def _skip_unless_runnable(backend: str, dtype=torch.float32):
    if backend == "cuda-emu":
        why = _emulated_extension()[1]
    else:
        why = OP.backends[backend].supports(dict(device=DEV, dtype=dtype, B=1))
    if why is not None:
        pytest.skip(f"{backend} backend cannot run here: {why}")


def _small_config(backend: str, device=DEV):
    """Under the interpreter: small blocks, so several chunks / programs are exercised even at tiny D."""
    if backend == "triton" and device.type == "cpu":
        from free_kernels.triton.speculative_accept import interpreter_config

        return dict(config=interpreter_config())
    return {}


def run(backend, *args, **kw):
    """The public op with an explicit backend (raises if it cannot run)."""
    _skip_unless_runnable(backend, args[0].dtype)
    if backend == "cuda-emu":
        return run_impl(backend, *args, **kw)
    kw = {**_small_config(backend, args[0].device), **kw}
    return op(*args, backend=backend, **kw)


def run_impl(backend, *args, **kw):
    """The backend implementation directly (bypasses the CPU-side NaN refusal of the public op)."""
    _skip_unless_runnable(backend, args[0].dtype)
    if backend == "cuda-emu":
        kw.pop("config", None)
        return OPS_MODULE.cuda_call(_emulated_extension()[0], 0, *args, **kw)
    kw = {**_small_config(backend, args[0].device), **kw}
    return OP.backends[backend].impl()(*args, **kw)


# ----------------------------------------------------------------------------- cases
def make_case(B, L, D, *, equal_variance, dnorm=0.8, seed=0, nd=None, K=32, device=DEV, dtype=torch.float32):
    """Random round with per-draft whitened discrepancy |d| ~ dnorm (acceptance ~ 2 Phi(-dnorm / 2))."""
    g = torch.Generator().manual_seed(seed)
    mp = torch.randn(B, L + 1, D, generator=g, dtype=torch.float64)
    lvp = -1.0 + 0.1 * torch.randn(B, L + 1, D, generator=g, dtype=torch.float64)
    sig = torch.exp(0.5 * lvp[:, :L])
    mq = mp[:, :L] + dnorm / math.sqrt(D) * sig * torch.randn(B, L, D, generator=g, dtype=torch.float64)
    if equal_variance:
        lvq = lvp[:, :L].clone()
    else:
        lvq = lvp[:, :L] + 0.5 * dnorm / math.sqrt(D) * torch.randn(B, L, D, generator=g, dtype=torch.float64)
    xi = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    if nd is None:
        nd = torch.randint(0, L + 1, (B,), generator=g)
    nd = torch.as_tensor(nd, dtype=torch.int64).expand(B).clone()
    det = torch.rand(B, generator=g) < 0.3
    rnd = dict(uniforms=torch.rand(B, L, generator=g), bonus_noise=torch.randn(B, D, generator=g),
               residual_noise=torch.randn(B, K, D, generator=g), residual_uniforms=torch.rand(B, K, generator=g))
    args = [t.to(device=device, dtype=dtype) for t in (mp, lvp, mq, lvq, xi)] + [nd.to(device), det.to(device)]
    rnd = {k: v.to(device) for k, v in rnd.items()}
    return args, rnd


def _lr_scale(args, equal_variance):
    """Sum over elements of |each term| of the log ratio (float64): the fp32 rounding scale of the sum."""
    mp, lvp, mq, lvq, xi = (t.double() for t in args[:5])
    L = mq.shape[1]
    mp, lvp = mp[:, :L], lvp[:, :L]
    if equal_variance:
        d = (mp - mq) * torch.exp(-0.5 * lvp)
        return (d * xi).abs().sum(-1) + 0.5 * (d * d).sum(-1)
    x = mq + torch.exp(0.5 * lvq) * xi
    zp = (x - mp) * torch.exp(-0.5 * lvp)
    return (0.5 * zp * zp + 0.5 * lvp.abs() + 0.5 * xi * xi + 0.5 * lvq.abs()).sum(-1)


def assert_matches(res, ref, args, equal_variance, *, K=None, dtype=torch.float32):
    """Identical decisions, log ratios within fp32 rounding, out close (rows the comparison covers): the output
    is rounded once to ``dtype`` from fp32 arithmetic, so its tolerance is _tolerance.CLOSE[dtype]."""
    nd = args[5].cpu()
    assert torch.equal(res.num_accepted.cpu().long(), ref.num_accepted.cpu().long()), (
        res.num_accepted.tolist(), ref.num_accepted.tolist())
    L = args[2].shape[1]
    if L:
        valid = torch.arange(L)[None, :] < nd[:, None]
        tol = 1e-6 * _lr_scale(args, equal_variance).cpu() + 1e-6
        err = (res.log_ratio.cpu().double() - ref.log_ratio.cpu().double()).abs()
        assert bool((err[valid] <= tol[valid]).all()), f"log ratio error {err[valid].max():.3g}"
    rows = torch.ones(len(nd), dtype=torch.bool)
    if K is not None:  # residual rows whose candidate came from the given ones
        rows = ref.residual_candidates.cpu() <= K
        assert rows.float().mean() > 0.5
        resid = (ref.num_accepted.cpu().long() < nd) & rows
        assert torch.equal(res.residual_candidates.cpu()[resid], ref.residual_candidates.cpu()[resid])
        assert not bool(res.fallbacks.cpu()[rows].any())
    torch.testing.assert_close(res.out.cpu()[rows].float(), ref.out.cpu()[rows].float(), **close_tol(dtype),
                               equal_nan=True)
    return rows


# ----------------------------------------------------------------------------- exact comparisons
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("equal_variance", [True, False], ids=["eqvar", "learnedvar"])
@pytest.mark.parametrize("B,L,D", [(1, 1, 1), (1, 1, 97), (3, 4, 97), (2, 3, 130)])
def test_matches_reference(backend, equal_variance, B, L, D):
    args, rnd = make_case(B, L, D, equal_variance=equal_variance, seed=B * 1000 + L * 10 + D)
    ref = reference(*args, equal_variance=equal_variance, **rnd)
    res = run(backend, *args, equal_variance=equal_variance, **rnd)
    assert_matches(res, ref, args, equal_variance, K=rnd["residual_noise"].shape[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("equal_variance", [True, False], ids=["eqvar", "learnedvar"])
def test_odd_large_row(backend, equal_variance):
    """D = 4095 (odd, not a multiple of any block) with the default launch configuration."""
    B, L, D = 2, 2, 4095
    args, rnd = make_case(B, L, D, equal_variance=equal_variance, seed=7, nd=[2, 2], K=8)
    ref = reference(*args, equal_variance=equal_variance, **rnd)
    default_config = dict(config={}) if backend == "triton" else {}
    res = run(backend, *args, equal_variance=equal_variance, **default_config, **rnd)
    assert_matches(res, ref, args, equal_variance, K=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("equal_variance", [True, False], ids=["eqvar", "learnedvar"])
def test_all_accept_when_q_equals_p(backend, equal_variance):
    B, L, D = 3, 3, 97
    args, rnd = make_case(B, L, D, equal_variance=equal_variance, seed=3, nd=[3, 1, 0])
    args[2] = args[0][:, :L].clone()
    args[3] = args[1][:, :L].clone()
    ref = reference(*args, equal_variance=equal_variance, **rnd)
    res = run(backend, *args, equal_variance=equal_variance, **rnd)
    assert res.num_accepted.cpu().tolist() == [3, 1, 0]
    assert_matches(res, ref, args, equal_variance)
    if equal_variance:  # d = 0 exactly: the log ratio is exactly 0
        assert bool((res.log_ratio.cpu()[0] == 0).all())
    else:  # x~ = mu_q + sigma_q xi maps back to xi only up to rounding
        assert bool((res.log_ratio.cpu()[0].abs() < 1e-5).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("equal_variance", [True, False], ids=["eqvar", "learnedvar"])
def test_all_reject_far_apart(backend, equal_variance):
    """Means 30 whitened units apart: every first draft rejected, residual samplers accept at once."""
    B, L, D = 3, 2, 97
    args, rnd = make_case(B, L, D, equal_variance=equal_variance, seed=4, nd=[2, 2, 1], dnorm=30.0)
    ref = reference(*args, equal_variance=equal_variance, **rnd)
    res = run(backend, *args, equal_variance=equal_variance, **rnd)
    assert res.num_accepted.cpu().tolist() == [0, 0, 0]
    rows = assert_matches(res, ref, args, equal_variance, K=rnd["residual_noise"].shape[1])
    assert bool(rows.all())
    if not equal_variance:
        assert res.residual_candidates.cpu().tolist() == ref.residual_candidates.cpu().tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_discrepancy_equal_variance(backend):
    """|d| = 0: log ratio 0, accepted unless u == 1; a forced rejection reflects about nothing (e = 0)."""
    B, L, D = 2, 2, 97
    args, rnd = make_case(B, L, D, equal_variance=True, seed=5, nd=[2, 2])
    args[2] = args[0][:, :L].clone()
    ref = reference(*args, equal_variance=True, **rnd)
    res = run(backend, *args, equal_variance=True, **rnd)
    assert res.num_accepted.cpu().tolist() == [2, 2]
    assert_matches(res, ref, args, True)
    rnd["uniforms"] = torch.ones_like(rnd["uniforms"])  # log u = 0 is not < 0: reject slot 0
    ref = reference(*args, equal_variance=True, **rnd)
    res = run(backend, *args, equal_variance=True, **rnd)
    assert res.num_accepted.cpu().tolist() == [0, 0]
    assert_matches(res, ref, args, True)
    draft = args[2][:, 0] + torch.exp(0.5 * args[1][:, 0]) * args[4][:, 0]
    torch.testing.assert_close(res.out, draft, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("equal_variance", [True, False], ids=["eqvar", "learnedvar"])
def test_num_drafts_zero_and_mixed(backend, equal_variance):
    B, L, D = 4, 3, 50
    args, rnd = make_case(B, L, D, equal_variance=equal_variance, seed=6, nd=[0, 3, 1, 0])
    ref = reference(*args, equal_variance=equal_variance, **rnd)
    res = run(backend, *args, equal_variance=equal_variance, **rnd)
    assert_matches(res, ref, args, equal_variance, K=rnd["residual_noise"].shape[1])
    assert res.num_accepted.cpu()[[0, 3]].tolist() == [0, 0]
    # slots >= num_drafts are not judged: the kernels mark their log ratio NaN
    assert bool(torch.isnan(res.log_ratio.cpu()[0]).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_draft_slots(backend):
    """L = 0: mean_q is (B, 0, D); the output is the exact step from p_0."""
    B, D = 2, 33
    args, rnd = make_case(B, 1, D, equal_variance=False, seed=8, nd=[0, 0])
    args = [args[0][:, :1].contiguous(), args[1][:, :1].contiguous()] + [t[:, :0] for t in args[2:5]] + args[5:]
    rnd = dict(uniforms=rnd["uniforms"][:, :0], bonus_noise=rnd["bonus_noise"])
    ref = reference(*args, equal_variance=False, **rnd)
    res = run(backend, *args, equal_variance=False, **rnd)
    assert res.log_ratio.shape == (B, 0)
    assert_matches(res, ref, args, False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_last_masks_noise(backend):
    B, L, D = 3, 2, 97
    args, rnd = make_case(B, L, D, equal_variance=True, seed=9, nd=[0, 1, 2], dnorm=0.0)
    args[6] = torch.tensor([True, True, False], device=DEV)
    rnd["bonus_noise"][0, 3] = float("nan")  # masked, never multiplied by 0
    ref = reference(*args, equal_variance=True, **rnd)
    res = run(backend, *args, equal_variance=True, **rnd)
    assert res.num_accepted.cpu().tolist() == [0, 1, 2]
    assert torch.equal(res.out[0], args[0][0, 0])
    assert torch.equal(res.out[1], args[0][1, 1])
    assert torch.isfinite(res.out).all()
    torch.testing.assert_close(res.out[1:], ref.out[1:], **close_tol(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("equal_variance", [True, False], ids=["eqvar", "learnedvar"])
def test_tau_relax(backend, equal_variance):
    B, L, D = 4, 4, 64
    args, rnd = make_case(B, L, D, equal_variance=equal_variance, seed=10, nd=[4, 4, 4, 4], dnorm=1.5)
    tau = 2.0 + 4.0 * torch.rand(B, L, generator=torch.Generator().manual_seed(1)).to(DEV)
    ref = reference(*args, equal_variance=equal_variance, tau=tau, **rnd)
    res = run(backend, *args, equal_variance=equal_variance, tau=tau, **rnd)
    assert_matches(res, ref, args, equal_variance, K=rnd["residual_noise"].shape[1])
    exact = run(backend, *args, equal_variance=equal_variance, **rnd)
    assert int(res.num_accepted.sum()) > int(exact.num_accepted.sum())  # relax accepts more here
    ones = run(backend, *args, equal_variance=equal_variance, tau=torch.ones_like(tau), **rnd)
    assert torch.equal(ones.num_accepted, exact.num_accepted) and torch.equal(ones.out, exact.out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("equal_variance", [True, False], ids=["eqvar", "learnedvar"])
def test_non_contiguous_inputs_and_output(backend, equal_variance):
    B, L, D = 3, 2, 45
    args, rnd = make_case(B, L, D, equal_variance=equal_variance, seed=11, nd=[2, 1, 2], dnorm=1.5)
    ref = reference(*args, equal_variance=equal_variance, **rnd)
    nc = []
    for i, t in enumerate(args[:5]):
        if i % 2 == 0:  # every other element of a wider buffer
            w = torch.full((*t.shape[:2], 2 * D), float("nan"), device=DEV, dtype=t.dtype)
            w[..., ::2] = t
            nc.append(w[..., ::2])
        else:  # (D, L, B) storage seen as (B, L, D)
            nc.append(t.permute(2, 1, 0).contiguous().permute(2, 1, 0))
    assert not any(t.is_contiguous() for t in nc)
    out = torch.full((D, B), float("nan"), device=DEV).t()
    res = run(backend, *nc, *args[5:], equal_variance=equal_variance, out=out, **rnd)
    assert res.out is out
    assert_matches(res, ref, args, equal_variance, K=rnd["residual_noise"].shape[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("equal_variance", [True, False], ids=["eqvar", "learnedvar"])
def test_nan_is_rejected_and_propagates(backend, equal_variance):
    """Documented kernel behaviour: a NaN read by a draft's log ratio rejects that draft and the
    whole residual row becomes NaN; samples without NaN are unaffected.

    (The public op refuses NaN inputs on CPU tensors; the kernels never check, so the
    backend is called directly.)  The oracle takes the same decisions; its rejection
    sampler also returns a NaN row, but its reflection turns e = d / |d| into 0 when
    |d| is NaN and so emits a finite row: the kernels deliberately keep the NaN.
    """
    B, L, D = 3, 2, 40
    args, rnd = make_case(B, L, D, equal_variance=equal_variance, seed=12, nd=[2, 2, 2], dnorm=0.0)
    args[2] = args[2].clone()
    args[2][0, 0, 7] = float("nan")   # sample 0, slot 0: rejected, residual of slot 0 is NaN
    args[2][1, 1, 3] = float("nan")   # sample 1, slot 1: slot 0 accepted, slot 1 rejected
    res = run_impl(backend, *args, equal_variance=equal_variance, **rnd)
    ref = reference(*args, equal_variance=equal_variance, **rnd)
    assert res.num_accepted.cpu().tolist() == [0, 1, 2] == ref.num_accepted.tolist()
    assert bool(torch.isnan(res.out[:2]).all())
    assert math.isnan(res.log_ratio[0, 0].item()) and math.isnan(res.log_ratio[1, 1].item())
    assert math.isfinite(res.log_ratio[1, 0].item())
    torch.testing.assert_close(res.out[2].cpu(), ref.out[2].cpu(), **close_tol(torch.float32))
    if not equal_variance:
        assert bool(torch.isnan(ref.out[:2]).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("equal_variance", [True, False], ids=["eqvar", "learnedvar"])
def test_poisoned_outputs_are_all_written(backend, equal_variance):
    B, L, D = 4, 3, 61
    args, rnd = make_case(B, L, D, equal_variance=equal_variance, seed=13, dnorm=1.5)
    bufs = dict(out=torch.full((B, D), float("nan"), device=DEV),
                num_accepted=torch.full((B,), -7, dtype=torch.int32, device=DEV),
                log_ratio=torch.full((B, L), 123.0, device=DEV),
                residual_candidates=torch.full((B,), -7, dtype=torch.int32, device=DEV),
                fallbacks=torch.ones(B, dtype=torch.bool, device=DEV))
    res = run(backend, *args, equal_variance=equal_variance, **bufs, **rnd)
    for k, v in bufs.items():
        assert getattr(res, k) is v
    assert bool(torch.isfinite(res.out).all())
    assert bool((res.num_accepted >= 0).all()) and bool((res.residual_candidates >= 0).all())
    assert not bool(res.fallbacks.any())
    nd = args[5]
    valid = torch.arange(L, device=DEV)[None] < nd[:, None]
    assert bool(torch.isfinite(res.log_ratio[valid]).all()) and bool(torch.isnan(res.log_ratio[~valid]).all())
    ref = reference(*args, equal_variance=equal_variance, **rnd)
    assert_matches(res, ref, args, equal_variance, K=rnd["residual_noise"].shape[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    """Loaded as fp16 / bf16, computed in fp32: same decisions as the float64 oracle on the same values."""
    B, L, D = 3, 3, 97
    for equal_variance in (True, False):
        args, rnd = make_case(B, L, D, equal_variance=equal_variance, seed=14, dtype=dtype, dnorm=1.5)
        ref = reference(*args, equal_variance=equal_variance, **rnd)
        res = run(backend, *args, equal_variance=equal_variance, **rnd)
        assert res.out.dtype == dtype
        assert_matches(res, ref, args, equal_variance, K=rnd["residual_noise"].shape[1], dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_fallback_after_max_candidates(backend):
    """Every given candidate refused (u ~ 1): after max_candidates the last drawn one is emitted, flagged."""
    B, L, D = 1, 1, 16
    args, rnd = make_case(B, L, D, equal_variance=False, seed=15, nd=[1], dnorm=30.0)  # draft rejected
    rnd["residual_uniforms"] = torch.full_like(rnd["residual_uniforms"], 1.0)  # u < 1 - q/p never holds
    res = run(backend, *args, equal_variance=False, max_candidates=3, **rnd)
    ref = reference(*args, equal_variance=False, max_candidates=3, **rnd)
    assert res.num_accepted.tolist() == [0] == ref.num_accepted.tolist()
    assert bool(res.fallbacks.all()) and bool(ref.fallbacks.all())
    n = int(res.residual_candidates[0])
    assert n >= 3 and n % 2 == 0  # whole batches of candidates
    expect = args[0][0, 0] + torch.exp(0.5 * args[1][0, 0]) * rnd["residual_noise"][0, n - 1]
    torch.testing.assert_close(res.out[0], expect, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- self-drawn randomness
def _philox_np(seed: int, c0, c1, c2, c3):
    """Independent numpy Philox4x32-10 (Random123): counter words c0..c3 (uint32 arrays), key = seed."""
    M0, M1, W0, W1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57), 0x9E3779B9, 0xBB67AE85
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    c = [np.asarray(x, dtype=np.uint64) for x in (c0, c1, c2, c3)]
    mask = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0, p1 = M0 * c[0], M1 * c[2]
        c = [((p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0)) & mask, p1 & mask,
             ((p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1)) & mask, p0 & mask]
        k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
    return [x.astype(np.uint32) for x in c]


def _normal_np(w0, w1):
    u1 = w0.astype(np.float32) * np.float32(2.0 ** -32) + np.float32(2.0 ** -33)
    th = np.float32(2 * math.pi) * (w1.astype(np.float32) * np.float32(2.0 ** -32))
    return np.sqrt(-2.0 * np.log(u1.astype(np.float64))) * np.cos(th.astype(np.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_streams_follow_documented_layout(backend):
    """Bonus noise of sample b, element i = normal(Philox(seed; offset + i, 0, (b << 2) | 1)); offset advances."""
    B, D = 3, 70
    seed, offset = 0x1234_5678_9ABC, (1 << 32) - 20  # the counter crosses into its high word
    mp = torch.zeros(B, 1, D, device=DEV)
    lv = torch.zeros(B, 1, D, device=DEV)
    e = torch.zeros(B, 0, D, device=DEV)
    rs = torch.tensor([seed, offset], dtype=torch.int64, device=DEV)
    res = run(backend, mp, lv, e, e, e, torch.zeros(B, dtype=torch.int64, device=DEV),
              torch.zeros(B, dtype=torch.bool, device=DEV), equal_variance=False, rng_state=rs)
    assert rs.tolist() == [seed, offset + D]
    off = np.arange(D, dtype=np.uint64) + np.uint64(offset)
    for b in range(B):
        w = _philox_np(seed, off & np.uint64(0xFFFFFFFF), off >> np.uint64(32), np.zeros(D, np.uint64),
                       np.full(D, (b << 2) | 1, np.uint64))
        np.testing.assert_allclose(res.out[b].cpu().numpy(), _normal_np(w[0], w[1]), **close_tol(torch.float32))
    if _env.extension() is not None:  # same stream as the C++ host mirror of philox.h
        C = _env.extension()
        w = C.philox_randint4x(seed, offset, D, ((2 << 2) | 1) << 32)
        np.testing.assert_allclose(res.out[2].cpu().numpy(), _normal_np(w[:, 0], w[:, 1]), **close_tol(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rng_state_replays_and_advances(backend):
    B, L, D = 2, 2, 33
    args, _ = make_case(B, L, D, equal_variance=False, seed=16, nd=[2, 2], dnorm=2.0)
    rs = torch.tensor([99, 5], dtype=torch.int64, device=DEV)
    a = run(backend, *args, equal_variance=False, rng_state=rs)
    assert rs.tolist() == [99, 5 + D]
    b = run(backend, *args, equal_variance=False, rng_state=rs)
    assert rs.tolist() == [99, 5 + 2 * D]
    assert not torch.equal(a.out, b.out)
    c = run(backend, *args, equal_variance=False, rng_state=torch.tensor([99, 5], dtype=torch.int64, device=DEV))
    assert torch.equal(a.out, c.out) and torch.equal(a.num_accepted, c.num_accepted)
    assert torch.equal(a.residual_candidates, c.residual_candidates)
    # without rng_state: seeded from the generator
    g1, g2 = (torch.Generator(device=DEV).manual_seed(3) for _ in range(2))
    assert torch.equal(run(backend, *args, equal_variance=False, generator=g1).out,
                       run(backend, *args, equal_variance=False, generator=g2).out)


def test_requested_backend_that_cannot_run_raises():
    args, _ = make_case(1, 1, 8, equal_variance=True, device=torch.device("cpu"))
    with pytest.raises(BackendUnavailable):
        op(*args, equal_variance=True, backend="cuda")


def test_reference_ignores_rng_state():
    args, rnd = make_case(2, 2, 9, equal_variance=True, device=torch.device("cpu"))
    rs = torch.tensor([1, 2])
    a = op(*args, equal_variance=True, rng_state=rs, backend="torch", **rnd)
    b = reference(*args, equal_variance=True, **rnd)
    assert rs.tolist() == [1, 2] and torch.equal(a.out, b.out)


# ----------------------------------------------------------------------------- distribution tests
# p_0 = N(MP, SP^2), q_0 = N(MQ, SQ^2) per coordinate (unequal variance), one draft.
MP0, SP0 = [0.5, -0.3], [0.7, 1.1]
MQ0, SQ0 = [-0.2, 0.4], [1.3, 0.8]


def _one_step_round(n, D, device, seed):
    mp = torch.tensor(MP0[:D], device=device)
    sp = torch.tensor(SP0[:D], device=device)
    mean_p = torch.zeros(n, 2, D, device=device)
    mean_p[:, 0] = mp
    mean_p[:, 1] = 3.0
    logvar_p = torch.zeros(n, 2, D, device=device)
    logvar_p[:, 0] = 2 * sp.log()
    mean_q = torch.tensor(MQ0[:D], device=device).expand(n, 1, D).contiguous()
    logvar_q = (2 * torch.tensor(SQ0[:D], device=device).log()).expand(n, 1, D).contiguous()
    xi = torch.randn(n, 1, D, generator=torch.Generator().manual_seed(seed)).to(device)
    nd = torch.ones(n, dtype=torch.int64, device=device)
    det = torch.zeros(n, dtype=torch.bool, device=device)
    return (mean_p, logvar_p, mean_q, logvar_q, xi, nd, det), mp, sp


def _emitted(res, args):
    """The state after the first draft: the draft if accepted, else the residual sample (= out)."""
    mean_q, logvar_q, xi = args[2], args[3], args[4]
    draft = mean_q[:, 0] + torch.exp(0.5 * logvar_q[:, 0]) * xi[:, 0]
    return torch.where((res.num_accepted >= 1)[:, None], draft, res.out), draft


def _ks_pvalue(x, mp, sp):
    x = x.double().cpu().numpy()
    return min(stats.kstest(x[:, k], "norm", args=(float(mp[k]), float(sp[k]))).pvalue for k in range(x.shape[1]))


def _check_emits_p(fn, n, D, seed, device):
    args, mp, sp = _one_step_round(n, D, device, seed)
    res = fn(args, equal_variance=False)
    x, draft = _emitted(res, args)
    p_exact = _ks_pvalue(x, mp, sp)
    # negative control 1: reflection coupling under unequal variance (not p-distributed)
    res_r = fn(args, equal_variance=True)
    p_reflect = _ks_pvalue(_emitted(res_r, args)[0], mp, sp)
    # negative control 2: keep the draft on rejection (distributed as q)
    p_skip = _ks_pvalue(draft, mp, sp)
    level = ALPHA / D
    assert p_exact > level, f"exact residual sampler: KS p = {p_exact:.3g} <= {level:g}"
    assert p_reflect < level, f"negative control (reflection, unequal variance) not detected: p = {p_reflect:.3g}"
    assert p_skip < level, f"negative control (skip residual) not detected: p = {p_skip:.3g}"
    return res


def test_reference_residual_sampler_emits_p():
    """The oracle itself: n = 20000, D = 2 (the rejection loop reduces over both coordinates)."""

    def fn(args, equal_variance):
        return reference(*args, equal_variance=equal_variance, generator=torch.Generator().manual_seed(21))

    _check_emits_p(fn, 20000, 2, seed=1, device=torch.device("cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_residual_sampler_emits_p(backend):
    """The kernel's own randomness end to end (uniforms, residual normals and uniforms from rng_state).

    n = 20000 on a GPU; 240 trials under the interpreter (~500x slower), where the
    two negative controls are still rejected far below ALPHA.
    """
    _skip_unless_runnable(backend)
    n, D = (20000, 2) if DEV.type == "cuda" else (240, 1)

    def fn(args, equal_variance):
        rs = torch.tensor([2024, 0], dtype=torch.int64, device=DEV)
        return run(backend, *args, equal_variance=equal_variance, rng_state=rs,
                   **({} if DEV.type == "cuda" else dict(config=_tiny_interpreter_config())))

    res = _check_emits_p(fn, n, D, seed=2, device=DEV)
    assert int(res.residual_candidates.max()) >= 2 and not bool(res.fallbacks.any())


def _tiny_interpreter_config():
    from free_kernels.triton.speculative_accept import interpreter_config

    return dict(interpreter_config(), BLOCK=2, BLOCK2=2, ITERS2=1, RBLOCK=2, CPI=2)


# ----------------------------------------------------------------------------- GPU-only
@pytest.mark.gpu
@pytest.mark.parametrize("equal_variance", [True, False], ids=["eqvar", "learnedvar"])
@pytest.mark.parametrize("D", [4096, 16384])
def test_gpu_backends_agree_at_latent_sizes(equal_variance, D):
    """B = 8, L = 6 at the real latent sizes: both kernels vs the oracle; with self-drawn randomness
    the two kernels share the streams, so they agree with each other as well."""
    B, L = 8, 6
    args, rnd = make_case(B, L, D, equal_variance=equal_variance, seed=D, K=16)
    ref = reference(*args, equal_variance=equal_variance, **rnd)
    outs = {}
    for backend in ("triton", "cuda"):
        _skip_unless_runnable(backend)
        assert_matches(run(backend, *args, equal_variance=equal_variance, **rnd), ref, args, equal_variance, K=16)
        rs = torch.tensor([7, 11], dtype=torch.int64, device=DEV)
        outs[backend] = run(backend, *args, equal_variance=equal_variance, rng_state=rs)
    a, b = outs["triton"], outs["cuda"]
    assert torch.equal(a.num_accepted, b.num_accepted)
    assert torch.equal(a.residual_candidates, b.residual_candidates)
    # self-drawn residual samples: each backend's own Box-Muller (log / sqrt / cos of the same Philox words),
    # so a few fp32 ulps of transcendental differences on top of the rounding in CLOSE
    torch.testing.assert_close(a.out, b.out, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_draws_fresh_numbers(backend):
    _skip_unless_runnable(backend)
    B, L, D = 4, 3, 4096
    args, _ = make_case(B, L, D, equal_variance=False, seed=30, nd=[3, 3, 3, 3], dnorm=1.0)
    rs = torch.tensor([5, 0], dtype=torch.int64, device=DEV)
    bufs = dict(out=torch.empty(B, D, device=DEV), num_accepted=torch.empty(B, dtype=torch.int32, device=DEV),
                log_ratio=torch.empty(B, L, device=DEV),
                residual_candidates=torch.empty(B, dtype=torch.int32, device=DEV),
                fallbacks=torch.empty(B, dtype=torch.bool, device=DEV))
    run(backend, *args, equal_variance=False, rng_state=rs, **bufs)  # warm-up / compile
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run(backend, *args, equal_variance=False, rng_state=rs, **bufs)
    start = rs[1].item()
    g.replay()
    first = bufs["out"].clone()
    g.replay()
    torch.cuda.synchronize()
    assert rs[1].item() == start + 2 * D
    assert not torch.equal(first, bufs["out"])
    eager = run(backend, *args, equal_variance=False,
                rng_state=torch.tensor([5, start + D], dtype=torch.int64, device=DEV))
    torch.testing.assert_close(eager.out, bufs["out"], atol=0, rtol=0)


# ----------------------------------------------------------------------------- CPU-only build checks
_COMPILE_SNIPPET = textwrap.dedent("""
    import json, os, re, subprocess, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import free_kernels.triton.speculative_accept as m
    cc = int(sys.argv[1])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

    def sig_of(fn, const):
        ptr = dict(nd_ptr="*i64", det_ptr="*i1", rng_ptr="*i64", snap_ptr="*i64", nacc_ptr="*i32",
                   cand_ptr="*i32", fb_ptr="*i1")
        return {n: "constexpr" if n in const else ptr.get(n, "*fp32") if n.endswith("_ptr")
                else "i64" if n.startswith("s_") else "i32" for n in fn.arg_names}

    out = []
    for eq in (True, False):
        variants = [(m._accept_reduce_kernel, dict(EQUAL_VAR=eq, BLOCK=1024, ITERS=2), 4),
                    (m._accept_finish_kernel, dict(EQUAL_VAR=eq, HAS_U=not eq, HAS_TAU=not eq, HAS_BN=not eq,
                                                   HAS_RN=not eq, LP=8, SP=8, BLOCK2=1024, ITERS2=2,
                                                   RBLOCK=512, CPI=4), 8)]
        for fn, const, warps in variants:
            k = triton.compile(ASTSource(fn, sig_of(fn, const), const), target=GPUTarget("cuda", cc, 32),
                               options=dict(num_warps=warps))
            info = ""
            if os.path.exists(ptxas):
                with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                    f.write(k.asm["ptx"])
                arch = "sm_90a" if cc == 90 else f"sm_{cc}"
                info = subprocess.run([ptxas, f"-arch={arch}", "-v", f.name, "-o", os.devnull],
                                      capture_output=True, text=True).stderr
            out.append(dict(kernel=fn.__name__, equal_variance=eq, ptxas=info))
    print(json.dumps(out))
""")


@pytest.mark.skipif(CUDA, reason="CPU-only check; on a GPU the kernels are launched by the gpu tests")
@pytest.mark.parametrize("cc", [80, 90])
def test_triton_kernels_compile_for_gpu_without_spills(cc, tmp_path):
    """Both launches, both variance modes, compiled for sm_80 / sm_90 on the CPU (no launch)."""
    import json

    if _env.triton_unavailable_reason():
        pytest.skip(_env.triton_unavailable_reason())
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _COMPILE_SNIPPET, str(cc)], capture_output=True, text=True,
                       env=env, timeout=600)
    if r.returncode != 0 and "ptxas" in r.stderr and "not found" in r.stderr.lower():
        pytest.skip("triton's ptxas is not available")
    assert r.returncode == 0, r.stderr[-3000:]
    for k in json.loads(r.stdout.strip().splitlines()[-1]):
        if k["ptxas"]:
            assert "0 bytes spill stores" in k["ptxas"], f"{k['kernel']} spills on sm_{cc}: {k['ptxas']}"


def test_accept_math_header_host_tests(tmp_path):
    """csrc/tests/test_accept_math.cpp under g++ (what ctest runs), from pytest."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path / "test_accept_math"
    cmd = [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc' / 'include'}",
           f"-I{ROOT / 'csrc' / 'tests'}", str(ROOT / "csrc" / "tests" / "test_accept_math.cpp"), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cuda_kernel_compiles_for_sm80_sm90(tmp_path):
    """csrc/kernels/speculative_accept.cu with nvcc for sm_80 and sm_90 (compile only), no spills."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_80,code=sm_80",
           "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v", f"-I{ROOT / 'csrc' / 'include'}", "-c",
           str(ROOT / "csrc" / "kernels" / "speculative_accept.cu"), "-o", str(tmp_path / "sa.o")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    spills = [ln for ln in r.stderr.splitlines() if "spill" in ln]
    assert spills and all("0 bytes spill stores, 0 bytes spill loads" in ln for ln in spills), "\n".join(spills)

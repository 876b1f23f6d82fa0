"""draft_epilogue: shared-memory opt-in, its own random stream, and the Triton grid limit (CPU).

* Shared memory: the CUDA kernel holds static shared memory (row coefficients; on the mma path a
  4 KiB split-K buffer) besides its dynamic A tile.  A device rejects an opt-in with static +
  dynamic above its per-block limit, so opting in to the whole limit failed for every call that
  needs an opt-in at all (float32 with H above ~750: every DiT-XL float32 case).  The host
  emulation (fk_cuda_emu.h) now enforces the device's rules; the DiT-XL float32 width runs.
* Random stream: with ``noise=None`` the draft noise comes from ``rng_state``; it must not share
  Philox numbers with speculative_accept's streams of the same ``rng_state`` (before, the draft
  noise of element j was a function of sample 0's acceptance uniform of slot j).
* The Triton launcher refuses more than 65,535 sample rows (grid axis 1) with a clear error.

The emulated CUDA build comes from tests/cuda_emulation/harness.py (one build per session), the cases
and the composition oracle from tests/test_draft_epilogue.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import test_draft_epilogue as tde  # noqa: E402  (same module object when pytest collected it already)
from cuda_emulation.harness import DEV, emu_impl, needs_triton  # noqa: E402

from free_kernels import _env  # noqa: E402
from free_kernels.reference.draft_epilogue import DRAFT_NOISE_SUBSEQUENCE, schedule_tables  # noqa: E402

CUDA = torch.cuda.is_available()
HERE_BACKENDS = ["cuda" if CUDA else "cuda-emu"]


# ---------------------------------------------------------------- shared memory
@pytest.mark.parametrize("backend", HERE_BACKENDS)
def test_float32_dit_xl_width_opts_in_to_what_it_needs(backend, monkeypatch):
    """H = 1152 float32 needs ~74 KiB of dynamic shared memory: above the default allowance, far below
    the opt-in limit.  Opting in to the whole limit (plus the static memory) fails on a device."""
    H = 1152
    tgt = tde.make_target(H=H)
    dif = tde.diffusion_for(True)
    h, c, x, noise, idx = tde.epilogue_case(R=1, cfg=True, H=H)
    kw = dict(cfg_scale=2.0, guidance_channels=3, clip_denoised=False)
    ref64 = tde.composition_oracle(tgt, dif, h, c, x, idx, noise, **kw)
    with torch.no_grad():
        same = tde.ref_composition(tgt, dif, h, c, x, idx, noise, **kw)
    res = tde.run_transition(backend, tgt, dif, h, c, x, idx, noise, monkeypatch, **kw)
    tde.check_transition(res, ref64, same, torch.float32, f"{backend} H={H} float32")


def test_too_wide_for_the_opt_in_limit_is_a_clear_error(monkeypatch):
    """static + dynamic above the opt-in limit: a ValueError with the sizes, not a launch failure."""
    if CUDA:
        pytest.skip("CPU-only check: the emulated limit")
    fn = emu_impl("draft_epilogue", monkeypatch)
    H, R, S, p = 3560, 1, 2, 2  # float32: ~226 KiB dynamic + 4 KiB static > 227 KiB
    g = torch.Generator().manual_seed(0)
    h = torch.randn(R, 1, H, generator=g)
    shift, scale = torch.zeros(R, H), torch.zeros(R, H)
    w, b = torch.randn(2 * p * p * 4, H, generator=g) * 0.01, torch.zeros(2 * p * p * 4)
    x = torch.randn(R, 4, S, S, generator=g)
    tables = schedule_tables(tde.diffusion_for(True))
    idx = torch.zeros(R, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"static \+ .* dynamic shared memory .* opt-in limit"):
        fn(h, shift, scale, w, b, x, tables, idx, torch.zeros_like(x), patch_size=p, learned_variance=True)


# ---------------------------------------------------------------- random stream
def _accept_uniforms(ext, seed, offset, n, sample=0):
    """speculative_accept's acceptance uniforms of ``sample`` (accept_math.h: tag 0, candidate field 0)."""
    w = np.asarray(ext.philox_randint4x(seed, offset, n, subsequence=(sample << 2) << 32))[:, 0].astype(np.float64)
    return (np.floor(w / 256) + 0.5) * 2.0 ** -24


def _spearman(a, b):
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton)] + HERE_BACKENDS)
def test_draft_noise_has_its_own_stream(backend, monkeypatch):
    ext = _env.extension()
    if ext is None:
        pytest.skip("needs the host Philox of free_kernels._C")
    tgt = tde.make_target()
    dif = tde.diffusion_for(True)
    h, c, x, _, idx = tde.epilogue_case(R=4, cfg=True)
    seed, offset = 987654321, 5
    rng = torch.tensor([seed, offset], dtype=torch.int64, device=DEV)
    z = torch.full(x.shape, float("nan"), device=DEV)
    tde.run_transition(backend, tgt, dif, h, c, x, idx, None, monkeypatch, rng_state=rng, noise_out=z,
                       cfg_scale=2.0, guidance_channels=3, clip_denoised=False)
    z = z.cpu().double().flatten().numpy()
    n = z.size
    # exactly the documented stream (same numbers as the torch backend's host mirror)
    own = np.asarray(ext.philox_normal(seed, offset, n, subsequence=DRAFT_NOISE_SUBSEQUENCE), dtype=np.float64)
    np.testing.assert_allclose(z, own, rtol=1e-5, atol=1e-5)
    # not subsequence 0, where acceptance uniforms of sample 0 live
    old = np.asarray(ext.philox_normal(seed, offset, n), dtype=np.float64)
    assert np.abs(z - old).max() > 1.0
    # and unrelated to the acceptance uniforms drawn from the same rng_state.  On subsequence 0 the draft
    # noise of element j was sqrt(-2 log u') cos(.) with u' = 2 min(u, 1 - u) folded from the same word as
    # sample 0's acceptance uniform u of slot j: |z| decreasing in min(u, 1 - u).  Rank correlations of |z|
    # with u and with the folded u, against a negative control that shows the statistic sees the coupling.
    bound = 5.0 / np.sqrt(n)  # ~5 standard deviations of a rank correlation under independence
    u = _accept_uniforms(ext, seed, offset, n)
    assert _spearman(np.abs(old), np.minimum(u, 1 - u)) < -0.3, "negative control: the old stream is coupled"
    for sample in (0, 1, 2, 3):
        us = _accept_uniforms(ext, seed, offset, n, sample)
        for v in (us, np.minimum(us, 1 - us)):
            rho = _spearman(np.abs(z), v)
            assert abs(rho) < bound, f"draft noise correlated with sample {sample}'s acceptance uniforms: {rho:.3f}"

def test_stream_constant_agrees_everywhere():
    from free_kernels.triton import draft_epilogue as tri

    src = (TESTS.parent / "csrc" / "include" / "free_kernels" / "epilogue_args.h").read_text()
    assert "kDraftNoiseSubsequence = 0xFFFFFFFFull;" in src  # the CUDA kernel and its host twin read it there
    assert tri.DRAFT_NOISE_SUBSEQUENCE == DRAFT_NOISE_SUBSEQUENCE == 0xFFFFFFFF


# ---------------------------------------------------------------- Triton grid
@needs_triton
def test_triton_launcher_refuses_more_than_65535_rows():
    from free_kernels.triton.draft_epilogue import draft_epilogue as tri_epilogue

    R, S, p, H, C = 65536, 2, 2, 8, 4
    h = torch.zeros(R, 1, H)
    shift = scale = torch.zeros(R, H)
    w, b = torch.zeros(2 * p * p * C, H), torch.zeros(2 * p * p * C)
    x = torch.zeros(R, C, S, S)
    tables = schedule_tables(tde.diffusion_for(True))
    idx = torch.zeros(R, dtype=torch.int64)
    with pytest.raises(ValueError, match="65536 sample rows .* 65535"):
        tri_epilogue(h, shift, scale, w, b, x, tables, idx, torch.zeros_like(x), patch_size=p, learned_variance=True)

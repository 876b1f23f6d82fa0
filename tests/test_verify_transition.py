"""``ops.verify_transition``: the target's own transition of the verified states.

On the CPU in float32 the op (torch backend), its reference
(reference/verify_transition.py) and the baseline's
``diffusion.p_mean_variance(model.forward_with_cfg, ...)`` (i.e.
``transition_from_output`` on the guided output) agree bit for bit: learned and
fixed (large / small) variance, epsilon and x0 prediction, with and without CFG
and x0 clipping.  The fused backends (the ``draft_epilogue`` kernels with a zero
noise buffer) are checked against a float64 oracle with the rule of the kernel
tests: max error <= 2 x PyTorch's own float32 error + 2e-6 x max(1, |oracle|).
Here that is ``triton`` under TRITON_INTERPRET=1 (tests/conftest.py); the
``cuda`` backend is the same code with the cuda ``draft_epilogue`` backend,
whose kernel the draft_epilogue tests check (on the CPU under the CUDA host
emulation).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from free_kernels import ops
from free_kernels.diffusion import create_diffusion
from free_kernels.models.dit import DiT
from free_kernels.ops import BackendUnavailable
from free_kernels.reference.verify_transition import verify_transition as ref_verify
from cuda_emulation.harness import CUDA, triton_missing

NULL = 5


def make_target(learn_sigma=True, S=8, H=32, seed=0, dtype=torch.float32):
    """A tiny DiT whose head output is far from zero (adaLN-Zero init would output zeros)."""
    torch.manual_seed(seed)
    m = DiT(input_size=S, patch_size=2, in_channels=4, hidden_size=H, depth=1, num_heads=2, num_classes=NULL,
            learn_sigma=learn_sigma)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "pos_embed":
                continue
            std = 0.3 / max(p.shape[-1], 1) ** 0.5 if p.dim() > 1 else 0.05
            p.copy_(torch.randn(p.shape, generator=g) * std)
        m.final_layer.linear.weight.mul_(3.0)
    return m.eval().to(dtype=dtype)


def case(target, diffusion, R=3, cfg=True, seed=0):
    """States x, respaced indices, labels; the verification forward's (h, c) as the sampler computes them."""
    g = torch.Generator().manual_seed(seed)
    S = target.input_size
    x = torch.randn(R, 4, S, S, generator=g)
    n = diffusion.num_timesteps
    idx = torch.tensor([(n - 1 - 3 * i) % n for i in range(R)], dtype=torch.int64)
    idx[-1] = 0  # the last step (posterior log-variance clipped there)
    y = torch.randint(0, NULL, (R,), generator=g)
    T = torch.as_tensor(np.asarray(diffusion.timestep_map)[idx.numpy()])
    if cfg:
        XX, TT, YY = torch.cat([x, x]), torch.cat([T, T]), torch.cat([y, torch.full_like(y, NULL)])
    else:
        XX, TT, YY = x, T, y
    with torch.no_grad():
        h, c = target.forward_features(XX.to(next(target.parameters()).dtype), TT, YY)
    return dict(h=h, c=c, x=x, idx=idx, y=y)


def baseline(target, diffusion, k, cfg_scale, gc, clip):
    """The baseline sampler's transition: p_mean_variance of forward_with_cfg (CFG) / forward (none)."""
    x, idx, y = k["x"], k["idx"], k["y"]
    R = x.shape[0]
    with torch.no_grad():
        if cfg_scale != 1.0:
            out = diffusion.p_mean_variance(target.forward_with_cfg, torch.cat([x, x]), torch.cat([idx, idx]),
                                            clip_denoised=clip,
                                            model_kwargs=dict(y=torch.cat([y, torch.full_like(y, NULL)]),
                                                              cfg_scale=cfg_scale, guidance_channels=gc))
            return out["mean"][:R], out["log_variance"][:R]
        out = diffusion.p_mean_variance(target, x, idx, clip_denoised=clip, model_kwargs=dict(y=y))
        return out["mean"], out["log_variance"]


CASES = [
    # learn_sigma, sigma_small, predict_xstart, cfg_scale, guidance_channels, clip
    pytest.param(True, False, False, 4.0, 3, False, id="learned-cfg3"),
    pytest.param(True, False, False, 4.0, 4, True, id="learned-cfg4-clip"),
    pytest.param(True, False, False, 1.0, 3, False, id="learned-nocfg"),
    pytest.param(False, False, False, 4.0, 3, True, id="fixedlarge-cfg3-clip"),
    pytest.param(False, True, False, 1.0, 3, False, id="fixedsmall-nocfg"),
    pytest.param(False, True, True, 2.5, 3, False, id="fixedsmall-xstart-cfg"),
    pytest.param(True, False, True, 4.0, 3, True, id="learned-xstart-clip"),
]


def _setup(learn, small, xstart, cfg_scale, steps="10"):
    tgt = make_target(learn_sigma=learn)
    dif = create_diffusion(steps, learn_sigma=learn, sigma_small=small, predict_xstart=xstart)
    return tgt, dif, case(tgt, dif, cfg=cfg_scale != 1.0)


@pytest.mark.parametrize("learn,small,xstart,cfg_scale,gc,clip", CASES)
def test_op_reference_and_baseline_agree_bit_for_bit(learn, small, xstart, cfg_scale, gc, clip):
    tgt, dif, k = _setup(learn, small, xstart, cfg_scale)
    kw = dict(cfg_scale=cfg_scale, guidance_channels=gc, clip_denoised=clip)
    with torch.no_grad():
        op = ops.verify_transition(tgt, dif, k["h"], k["c"], k["x"], k["idx"], **kw)
        ref = ref_verify(tgt, dif, k["h"], k["c"], k["x"], k["idx"], **kw)
    base = baseline(tgt, dif, k, cfg_scale, gc, clip)
    for name, a, b, c in zip(("mean", "logvar"), op, ref, base):
        assert a.dtype == torch.float32 and a.shape == k["x"].shape, name
        assert torch.equal(a, b), f"{name}: op != reference"
        assert torch.equal(b, c), f"{name}: reference != the baseline's transition_from_output"


def test_respaced_schedule_and_out_buffers():
    """A respaced 1000-step schedule; ``out`` = strided slices of the sampler's (rows, L + 1, D) buffers,
    poisoned: written in place, nothing outside them touched, same values as without ``out``."""
    tgt, dif, k = _setup(True, False, False, 4.0, steps="25")
    R, D = k["x"].shape[0], k["x"][0].numel()
    bufs = [torch.full((R, 3, D), float("nan")) for _ in range(2)]
    out = tuple(b[:, 1].view(R, 4, 8, 8) for b in bufs)
    with torch.no_grad():
        res = ops.verify_transition(tgt, dif, k["h"], k["c"], k["x"], k["idx"], cfg_scale=4.0, out=out)
        fresh = ops.verify_transition(tgt, dif, k["h"], k["c"], k["x"], k["idx"], cfg_scale=4.0)
    assert all(r.data_ptr() == o.data_ptr() for r, o in zip(res, out))
    for b, f in zip(bufs, fresh):
        assert torch.equal(b[:, 1].view(R, 4, 8, 8), f)
        assert torch.isnan(b[:, 0]).all() and torch.isnan(b[:, 2]).all()
    for a, b in zip(fresh, baseline(tgt, dif, k, 4.0, 3, False)):
        assert torch.equal(a, b)


def test_validation_names_the_argument():
    tgt, dif, k = _setup(True, False, False, 4.0)
    h, c, x, idx = k["h"], k["c"], k["x"], k["idx"]
    with pytest.raises(ValueError, match="h must have R or 2R rows"):
        ops.verify_transition(tgt, dif, h[:5], c[:5], x, idx, cfg_scale=4.0)
    with pytest.raises(ValueError, match="c must have shape"):
        ops.verify_transition(tgt, dif, h, c[:, :8], x, idx, cfg_scale=4.0)
    with pytest.raises(ValueError, match="index must have shape"):
        ops.verify_transition(tgt, dif, h, c, x, idx[:2], cfg_scale=4.0)
    with pytest.raises(TypeError, match="index must be an integer"):
        ops.verify_transition(tgt, dif, h, c, x, idx.float(), cfg_scale=4.0)
    with pytest.raises(TypeError, match=r"out\[1\] \(logvar\)"):
        ops.verify_transition(tgt, dif, h, c, x, idx, cfg_scale=4.0,
                              out=(torch.empty(x.shape), torch.empty(x.shape, dtype=torch.float64)))


def test_fused_backends_need_the_head_protocol():
    """A target without head_parameters / head_fusion_problem: torch by default, an explicit fused request
    raises and says why."""
    tgt, dif, k = _setup(True, False, False, 4.0)

    class Plain(torch.nn.Module):  # forward_head only: the required part of the target protocol
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.patch_size = inner.patch_size

        def forward_head(self, h, c):
            return self.inner.forward_head(h, c)

    plain = Plain(tgt)
    with torch.no_grad():
        res = ops.verify_transition(plain, dif, k["h"], k["c"], k["x"], k["idx"], cfg_scale=4.0)
        ref = ops.verify_transition(tgt, dif, k["h"], k["c"], k["x"], k["idx"], cfg_scale=4.0)
    assert all(torch.equal(a, b) for a, b in zip(res, ref))
    for backend in ("triton", "cuda"):
        with pytest.raises(BackendUnavailable, match="head_parameters"):
            ops.verify_transition(plain, dif, k["h"], k["c"], k["x"], k["idx"], cfg_scale=4.0, backend=backend)
    op = ops.get_op("verify_transition")
    ctx = dict(device=torch.device("cuda"), dtype=torch.float16, H=32, PE=16, M=64,
               target_reason="no head_parameters")
    assert op.reasons(ctx)["triton"] == "no head_parameters"
    assert op.resolve(ctx).name == "torch"


# ------------------------------------------------------------------ fused backends


def _fused_backends():
    out = [pytest.param("triton", id="triton", marks=pytest.mark.skipif(triton_missing() is not None,
                                                                         reason=str(triton_missing())))]
    if CUDA:
        out.append(pytest.param("cuda", id="cuda"))
    return out


def _oracle64(tgt, dif, k, kw):
    """The reference in float64 (the schedule tables stay the float32 constants every backend uses)."""
    t64 = copy.deepcopy(tgt).double()
    with torch.no_grad():
        return ref_verify(t64, dif, k["h"].double(), k["c"].double(), k["x"].double(), k["idx"], **kw)


def _assert_rule(out, ref64, same, what):
    out, ref64, same = out.double().cpu(), ref64.double().cpu(), same.double().cpu()
    assert torch.isfinite(out).all(), f"{what}: non-finite"
    err = (out - ref64).abs().max().item()
    err_pt = (same - ref64).abs().max().item()
    bound = 2 * err_pt + 2e-6 * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (torch's own: {err_pt:.3g})"


@pytest.mark.parametrize("backend", _fused_backends())
@pytest.mark.parametrize("learn,small,xstart,cfg_scale,gc,clip", CASES)
def test_fused_backends_match_the_reference(backend, learn, small, xstart, cfg_scale, gc, clip):
    tgt, dif, k = _setup(learn, small, xstart, cfg_scale)
    dev = torch.device("cuda" if CUDA else "cpu")
    tgt = tgt.to(dev)
    kd = {n: v.to(dev) for n, v in k.items()}
    kw = dict(cfg_scale=cfg_scale, guidance_channels=gc, clip_denoised=clip)
    with torch.no_grad():
        same = ref_verify(tgt, dif, kd["h"], kd["c"], kd["x"], kd["idx"], **kw)
        out = tuple(torch.full(kd["x"].shape, float("nan"), device=dev) for _ in range(2))
        res = ops.verify_transition(tgt, dif, kd["h"], kd["c"], kd["x"], kd["idx"], out=out, backend=backend, **kw)
    assert all(r.data_ptr() == o.data_ptr() for r, o in zip(res, out))
    for name, a, b, s in zip(("mean", "logvar"), res, _oracle64(tgt.cpu(), dif, k, kw), same):
        _assert_rule(a, b, s, f"{backend} {name}")


@pytest.mark.skipif(triton_missing() is not None, reason=str(triton_missing()))
def test_sampler_verifies_through_the_fused_backend(monkeypatch):
    """The sampler's verify phase with verify_transition (and the draft epilogue) forced to triton completes."""
    from free_kernels.models.drafter import FeatureDrafter
    from free_kernels.sampler import FreeSampler

    monkeypatch.setenv("FREE_KERNELS_BACKEND_VERIFY_TRANSITION", "triton")
    monkeypatch.setenv("FREE_KERNELS_BACKEND_DRAFT_TRANSITION", "triton")
    tgt = make_target(S=4)
    dif = create_diffusion("6", learn_sigma=True)
    drafter = FeatureDrafter.for_target(tgt, init="random", generator=torch.Generator().manual_seed(0))
    for layout in ("static", "compact"):
        smp = FreeSampler(tgt, drafter, dif, draft_length=2, clip_denoised=True, layout=layout)
        noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        x, st = smp.sample(noise, torch.tensor([1, 2]), cfg_scale=2.0, generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(x).all() and st.rounds > 0


@pytest.mark.parametrize("backend", _fused_backends())
def test_fused_backend_reuses_its_zero_noise_and_scratch(backend):
    """No per-call allocation of the zero noise / discarded x_next: one buffer pair per device, grown when a
    larger call comes; the zero buffer stays zero however often the kernel writes the scratch."""
    from free_kernels.ops.verify_transition import _SCRATCH, zero_and_scratch

    dev = torch.device("cuda" if CUDA else "cpu")
    z1, s1 = zero_and_scratch((3, 2, 4, 4), dev)
    z2, s2 = zero_and_scratch((2, 2, 4, 4), dev)  # smaller: the same storage
    assert z2.data_ptr() == z1.data_ptr() and s2.data_ptr() == s1.data_ptr()
    n_before = len(_SCRATCH[str(dev)])
    zero_and_scratch((64, 2, 4, 4), dev)           # larger: grown, the earlier pair kept
    assert len(_SCRATCH[str(dev)]) == n_before + 1
    tgt, dif, k = _setup(True, False, False, 2.0)
    tgt = tgt.to(dev)
    kd = {n: v.to(dev) for n, v in k.items()}
    kw = dict(cfg_scale=2.0, guidance_channels=3, clip_denoised=False)
    with torch.no_grad():
        a = ops.verify_transition(tgt, dif, kd["h"], kd["c"], kd["x"], kd["idx"], backend=backend, **kw)
        b = ops.verify_transition(tgt, dif, kd["h"], kd["c"], kd["x"], kd["idx"], backend=backend, **kw)
    for zeros, _ in _SCRATCH[str(dev)]:
        assert not zeros.any()
    assert all(torch.equal(u, v) for u, v in zip(a, b))

"""Exactness of FREE: the final samples have the baseline sampler's distribution.

Two-sample Kolmogorov-Smirnov tests on fixed projections of the final samples
(per-sample mean, three fixed random unit directions, two single coordinates),
Bonferroni-corrected to an overall false-alarm rate of ALPHA per comparison.
Seeds are fixed, so every outcome is deterministic (no reruns, no flakiness);
the false-alarm rate says how unlikely a pass/fail flip would be under a
different seed.  Negative controls (a rule that skips the residual, and a
strong relax) must be REJECTED by the same test at the same sample size.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import free_kernels as fk
from free_kernels import ops
from free_kernels.models import DiT, FeatureDrafter, FrozenFeatureDrafter
from free_kernels.relax import RelaxPolicy

scipy_stats = pytest.importorskip("scipy.stats")

ALPHA = 1e-3          # overall false-alarm rate of one distribution comparison
M = 1500              # samples per side
STEPS = "12"          # respacing used by the distribution tests
# x0 clipping keeps this random target's samples in [-1, 1]-ish (an untrained eps-model predicts
# eps ~ 0, and x0 = x / sqrt(abar) explodes without the clip); the rule is the same either way
CLIP = True


def make_target(learn_sigma=True, seed=0, S=4, num_classes=5):
    """A tiny DiT whose output is far from zero (adaLN-Zero init would output zeros)."""
    torch.manual_seed(seed)
    m = DiT(input_size=S, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
            num_classes=num_classes, learn_sigma=learn_sigma)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "pos_embed":
                continue
            std = 0.3 / max(p.shape[-1], 1) ** 0.5 if p.dim() > 1 else 0.05
            p.copy_(torch.randn(p.shape, generator=g) * std)
        # make the label matter so that CFG changes the transition
        m.y_embedder.embedding_table.weight.mul_(20.0)
        m.final_layer.linear.weight.mul_(3.0)
    return m.eval()


def projections(x: torch.Tensor) -> np.ndarray:
    x = x.reshape(x.shape[0], -1).double()
    g = torch.Generator().manual_seed(1234)
    dirs = torch.randn(x.shape[1], 3, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    cols = [x.mean(1), *(x @ dirs).T, x[:, 0], x[:, x.shape[1] // 2 + 1]]
    return torch.stack(cols, 1).numpy()


def min_pvalue(a: torch.Tensor, b: torch.Tensor) -> float:
    pa, pb = projections(a), projections(b)
    return min(scipy_stats.ks_2samp(pa[:, k], pb[:, k]).pvalue for k in range(pa.shape[1]))


def same_distribution(a, b) -> bool:
    return min_pvalue(a, b) > ALPHA / projections(a[:2]).shape[1]


def baseline(target, diffusion, noise, y, cfg_scale, guidance_channels=3, seed=7):
    torch.manual_seed(seed)
    if cfg_scale == 1.0:
        return diffusion.p_sample_loop(target.forward, noise.shape, noise, clip_denoised=CLIP,
                                       model_kwargs=dict(y=y))
    z = torch.cat([noise, noise])
    yy = torch.cat([y, torch.full_like(y, target.num_classes)])
    out = diffusion.p_sample_loop(target.forward_with_cfg, z.shape, z, clip_denoised=CLIP,
                                  model_kwargs=dict(y=yy, cfg_scale=cfg_scale, guidance_channels=guidance_channels))
    return out[: noise.shape[0]]


def inputs(target, n=M, seed=3):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, target.in_channels, target.input_size, target.input_size, generator=g)
    y = torch.randint(0, target.num_classes, (n,), generator=g)
    return noise, y


def free_samples(target, drafter, diffusion, noise, y, cfg_scale, L=3, relax=None, seed=11, gc=3):
    s = fk.FreeSampler(target, drafter, diffusion, draft_length=L, relax=relax, clip_denoised=CLIP)
    return s.sample(noise, y, cfg_scale=cfg_scale, guidance_channels=gc,
                    generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def targets():
    return {True: make_target(True), False: make_target(False)}


_BASE = {}


def base_samples(targets, learn, cfg):
    key = (learn, cfg)
    if key not in _BASE:
        t = targets[learn]
        d = fk.create_diffusion(STEPS, learn_sigma=learn)
        noise, y = inputs(t)
        _BASE[key] = baseline(t, d, noise, y, cfg)
    return _BASE[key]


@pytest.mark.parametrize("learn", [True, False], ids=["learned-var", "fixed-var"])
@pytest.mark.parametrize("cfg", [1.0, 4.0], ids=["nocfg", "cfg4"])
@pytest.mark.parametrize("drafter_kind", ["poor", "frozen"])
def test_free_matches_baseline_in_distribution(targets, learn, cfg, drafter_kind):
    t = targets[learn]
    d = fk.create_diffusion(STEPS, learn_sigma=learn)
    noise, y = inputs(t, seed=5)  # independent of the baseline's draws
    drafter = (FeatureDrafter.for_target(t, init="random", generator=torch.Generator().manual_seed(2))
               if drafter_kind == "poor" else FrozenFeatureDrafter(t))
    out, st = free_samples(t, drafter, d, noise, y, cfg)
    assert torch.isfinite(out).all()
    assert sum(st.steps_per_sample) == M * d.num_timesteps
    if drafter_kind == "poor":
        assert st.acceptance_rate < 0.5  # the rule is exercised through the residual sampler
        assert st.residual_rejections > 0
    else:
        assert st.acceptance_rate > 0.3
    if learn:
        assert st.residual_candidates > 0
    pval = min_pvalue(out, base_samples(targets, learn, cfg))
    assert pval > ALPHA / 6, f"FREE differs from the baseline (min KS p-value {pval:.2e})"


def test_two_baseline_runs_agree_and_projections_are_sensitive(targets):
    """Sanity of the test itself: two independent baseline runs pass; a shifted one fails."""
    t = targets[True]
    d = fk.create_diffusion(STEPS, learn_sigma=True)
    a = base_samples(targets, True, 1.0)
    noise, y = inputs(t, seed=9)
    b = baseline(t, d, noise, y, 1.0, seed=99)
    assert same_distribution(a, b)
    assert not same_distribution(a, b + 0.15 * b.std())


def _skip_residual_accept(*args, **kwargs):
    """Broken rule for the negative control: on rejection keep the draft instead of the residual."""
    res = ops.speculative_accept(*args, **kwargs)
    mean_q, logvar_q, noise_q, num_drafts = args[2], args[3], args[4], args[5]
    B = mean_q.shape[0]
    rej = res.num_accepted < num_drafts.to(torch.int32)
    j = res.num_accepted.long().clamp(max=max(mean_q.shape[1] - 1, 0))
    b = torch.arange(B)
    if mean_q.shape[1]:
        draft = mean_q[b, j] + torch.exp(0.5 * logvar_q[b, j]) * noise_q[b, j]
        res.out[rej] = draft[rej]
    return res


@pytest.mark.parametrize("learn", [True, False], ids=["learned-var", "fixed-var"])
def test_negative_control_skipping_residual_is_detected(targets, learn, monkeypatch):
    t = targets[learn]
    d = fk.create_diffusion(STEPS, learn_sigma=learn)
    noise, y = inputs(t, seed=5)
    drafter = FeatureDrafter.for_target(t, init="random", generator=torch.Generator().manual_seed(2))
    import free_kernels.sampler as smod

    class _Ops:
        def __getattr__(self, name):
            return _skip_residual_accept if name == "speculative_accept" else getattr(ops, name)

    monkeypatch.setattr(smod, "ops", _Ops())
    out, _ = free_samples(t, drafter, d, noise, y, 1.0)
    assert not same_distribution(out, base_samples(targets, learn, 1.0))


def test_negative_control_strong_relax_is_detected_and_relax_is_faster(targets):
    t = targets[True]
    d = fk.create_diffusion(STEPS, learn_sigma=True)
    noise, y = inputs(t, seed=5)
    drafter = FeatureDrafter.for_target(t, init="random", generator=torch.Generator().manual_seed(2))
    exact, st0 = free_samples(t, drafter, d, noise, y, 1.0)
    relaxed, st1 = free_samples(t, drafter, d, noise, y, 1.0, relax=RelaxPolicy(strength=1000.0, uncertainty="variance"))
    assert st1.mode == "relax" and "approximate" in st1.relax
    assert st1.steps_per_target_call > st0.steps_per_target_call
    assert not same_distribution(relaxed, base_samples(targets, True, 1.0))


def test_relax_zero_is_bit_exact(targets):
    t = targets[True]
    d = fk.create_diffusion("20", learn_sigma=True)
    noise, y = inputs(t, n=16)
    dr = FrozenFeatureDrafter(t)
    a, sa = free_samples(t, dr, d, noise, y, 4.0, relax=None)
    b, sb = free_samples(t, dr, d, noise, y, 4.0, relax=RelaxPolicy(strength=0.0))
    c, sc = free_samples(t, dr, d, noise, y, 4.0, relax=0.0)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert sa.accepted_by_index == sb.accepted_by_index


@pytest.mark.parametrize("strength", [0.5, 3.0])
def test_relax_raises_steps_per_target_call(targets, strength):
    t = targets[True]
    d = fk.create_diffusion("50", learn_sigma=True)
    noise, y = inputs(t, n=64)
    dr = FrozenFeatureDrafter(t)
    _, s0 = free_samples(t, dr, d, noise, y, 1.0, L=6)
    _, s1 = free_samples(t, dr, d, noise, y, 1.0, L=6, relax=strength)
    assert s1.steps_per_target_call > s0.steps_per_target_call


@pytest.mark.parametrize("steps,L", [("10", 1), ("10", 12), ("1000", 6), ("ddim25", 2)])
def test_respacings_and_draft_lengths_complete(targets, steps, L):
    t = targets[True]
    d = fk.create_diffusion(steps, learn_sigma=True)
    noise, y = inputs(t, n=3)
    out, st = free_samples(t, FrozenFeatureDrafter(t), d, noise, y, 4.0, L=L)
    assert torch.isfinite(out).all()
    assert st.steps_per_sample == [d.num_timesteps] * 3
    assert 1.0 <= st.steps_per_target_call <= L + 1
    assert st.target_calls == st.rounds
    import json

    json.dumps(st.as_dict())
    assert len(st.as_dict()["acceptance_by_index"]) == d.num_timesteps


def test_guidance_channels_4_matches_baseline_rule(targets):
    """With an always-accepting drafter setup the chain must follow the 4-channel rule's baseline."""
    t = targets[False]
    d = fk.create_diffusion(STEPS, learn_sigma=False)
    noise, y = inputs(t, seed=5)
    out, _ = free_samples(t, FrozenFeatureDrafter(t), d, noise, y, 4.0, gc=4)
    noise_b, y_b = inputs(t)
    base4 = baseline(t, d, noise_b, y_b, 4.0, guidance_channels=4)
    base3 = base_samples(targets, False, 4.0)
    assert same_distribution(out, base4)
    # the two rules give different distributions here, so this checks the rule is honoured
    assert not same_distribution(base3, base4)


def test_stats_explain_time_and_are_consistent(targets):
    t = targets[True]
    d = fk.create_diffusion("30", learn_sigma=True)
    noise, y = inputs(t, n=8)
    _, st = free_samples(t, FrozenFeatureDrafter(t), d, noise, y, 1.0, L=4)
    dd = st.as_dict()
    for k in ("target_calls", "drafter_calls", "rounds", "steps_per_sample", "steps_per_target_call",
              "acceptance_by_index", "residual_candidates", "time_draft_s", "time_verify_s", "time_accept_s"):
        assert k in dd
    assert dd["time_draft_s"] + dd["time_verify_s"] + dd["time_accept_s"] <= dd["time_total_s"] + 1e-6
    assert dd["time_verify_s"] > 0 and dd["time_draft_s"] > 0
    # every round serves at least one sample and at most all 8; a sample needs >= N / (L + 1) rounds
    assert st.rounds <= sum(st.sample_rounds) <= 8 * st.rounds
    assert min(st.sample_rounds) >= -(-d.num_timesteps // 5)
    acc = sum(st.accepted_by_index)
    # every round advances accepted + 1 steps per participating sample
    assert sum(st.steps_per_sample) == acc + sum(st.sample_rounds)
    assert st.drafter_calls <= 4 * st.rounds


# ------------------------------------------------------------------ bad input
def test_bad_inputs(targets):
    t = targets[True]
    d = fk.create_diffusion("10", learn_sigma=True)
    dr = FrozenFeatureDrafter(t)
    s = fk.FreeSampler(t, dr, d, draft_length=2)
    noise, y = inputs(t, n=2)
    with pytest.raises(ValueError, match="noise"):
        s.sample(noise[:, :3], y)
    with pytest.raises(TypeError, match="noise"):
        s.sample(noise.long(), y)
    with pytest.raises(TypeError, match="y"):
        s.sample(noise, y.float())
    with pytest.raises(ValueError, match="y"):
        s.sample(noise, y[:1])
    with pytest.raises(ValueError, match="y"):
        s.sample(noise, y + 100)
    with pytest.raises(ValueError, match="noise"):
        s.sample(noise.to("meta"), y.to("meta"))
    with pytest.raises(ValueError, match="y must be on"):
        s.sample(noise, y.to("meta"))
    bad = noise.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        s.sample(bad, y)
    with pytest.raises(ValueError, match="guidance_channels"):
        s.sample(noise, y, cfg_scale=2.0, guidance_channels=2)
    for L in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="draft_length"):
            fk.FreeSampler(t, dr, d, draft_length=L)
    other = make_target(True, S=8)
    with pytest.raises(ValueError, match="another target"):
        fk.FreeSampler(other, FeatureDrafter.for_target(t), d)
    with pytest.raises(ValueError, match="another target"):
        fk.FreeSampler(other, FrozenFeatureDrafter(t), d)
    with pytest.raises(TypeError, match="callable"):
        fk.FreeSampler(t, object(), d)
    with pytest.raises(TypeError, match="target protocol"):
        fk.FreeSampler(torch.nn.Linear(2, 2), dr, d)
    with pytest.raises(ValueError, match="learn_sigma"):
        fk.FreeSampler(targets[False], FrozenFeatureDrafter(targets[False]), d)


def test_custom_callable_drafter_protocol(targets):
    """Any callable drafter(h_prev, x, t, y) -> h works; a wrong return shape is a clear error."""
    t = targets[True]
    d = fk.create_diffusion("10", learn_sigma=True)
    seen = {}

    def drafter(h_prev, x, tt, y):
        seen["t"] = tt.clone()
        seen["y"] = y.clone()
        return h_prev * 1.0

    noise, y = inputs(t, n=2)
    fk.FreeSampler(t, drafter, d, draft_length=2).sample(noise, y, cfg_scale=2.0)
    assert int(seen["t"].max()) > d.num_timesteps  # original timesteps, not respaced indices
    assert (seen["y"][len(seen["y"]) // 2:] == t.num_classes).all()  # null class on the uncond rows
    with pytest.raises(ValueError, match="drafter returned"):
        fk.FreeSampler(t, lambda h, x, tt, y: h[:, :1], d, draft_length=2).sample(noise, y)


def test_drafter_save_load_roundtrip_and_mismatch(tmp_path, targets):
    t = targets[True]
    dr = FeatureDrafter.for_target(t, depth=2, init="random", generator=torch.Generator().manual_seed(0))
    dr.save(str(tmp_path / "drafter"))
    assert (tmp_path / "drafter.safetensors").exists() and (tmp_path / "drafter.json").exists()
    back = FeatureDrafter.load(str(tmp_path / "drafter.safetensors"), target=t)
    assert back.depth == 2
    for (k, v), (k2, v2) in zip(dr.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    # target weights are not part of the drafter's file
    assert not any(k.startswith(("x_embedder", "final_layer", "t_embedder")) for k in back.state_dict())
    h = torch.randn(2, 4, 32)
    x = torch.randn(2, 4, 4, 4)
    tt = torch.tensor([10, 500])
    yy = torch.tensor([1, 2])
    assert torch.equal(dr(h, x, tt, yy), back(h, x, tt, yy))
    with pytest.raises(ValueError, match="another target"):
        FeatureDrafter.load(str(tmp_path / "drafter"), target=make_target(True, S=8))
    with pytest.raises(FileNotFoundError):
        FeatureDrafter.load(str(tmp_path / "nope"), target=t)

"""The FREE round as a device program: host reads, layouts, reproducibility, continuous batching, graphs.

Distribution tests reuse the two-sample KS machinery of test_sampler.py (same
false-alarm rate, fixed seeds).
"""
from __future__ import annotations

import inspect
import math
import os

import pytest
import torch

import free_kernels as fk
from free_kernels.models import FeatureDrafter, FrozenFeatureDrafter

from test_sampler import CLIP, M, STEPS, base_samples, inputs, make_target, same_distribution, targets  # noqa: F401

SAMPLER_FILE = os.path.abspath(inspect.getsourcefile(fk.sampler))


def _drafter(t):
    return FeatureDrafter.for_target(t, init="random", generator=torch.Generator().manual_seed(2))


# ------------------------------------------------------------ host reads
class _HostReadCounter:
    """Counts tensor -> host conversions made from code in free_kernels/sampler.py."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(orig))

    def _wrap(self, orig):
        counter = self

        def f(self_, *a, **k):
            caller = inspect.currentframe().f_back
            if caller is not None and os.path.abspath(caller.f_code.co_filename) == SAMPLER_FILE \
                    and caller.f_code.co_name not in ("_read", "sample", "sample_stream", "insert", "_check_labels",
                                                      "_check_output", "stats", "take",
                                                      # per-sample streams: CPU only, no device to wait for
                                                      "_more_residuals"):
                counter.count += 1
            return orig(self_, *a, **k)

        return f


@pytest.mark.parametrize("layout,check_every", [("static", 1), ("static", 3), ("compact", 1)])
def test_at_most_one_host_read_per_round(targets, layout, check_every, monkeypatch):
    t = targets[True]
    d = fk.create_diffusion("20", learn_sigma=True)
    noise, y = inputs(t, n=4)
    s = fk.FreeSampler(t, _drafter(t), d, draft_length=3, layout=layout, check_every=check_every,
                       clip_denoised=CLIP)
    counter = _HostReadCounter(monkeypatch)
    _, st = s.sample(noise, y, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    # no hidden reads inside the round: every read is the one snapshot of the driver
    assert counter.count == 0
    if layout == "static":
        assert st.host_reads == math.ceil(st.rounds / check_every)
    else:
        # a round of plain steps (no slot drafted) needs no read after it: every slot advanced by one
        assert st.host_reads <= st.rounds + 1
    assert st.host_reads / st.rounds <= 1.0 + 1.0 / st.rounds
    assert st.layout == layout


@pytest.mark.parametrize("layout", ["static", "compact"])
def test_fixed_seed_reproduces_a_run(targets, layout):
    t = targets[True]
    d = fk.create_diffusion("20", learn_sigma=True)
    noise, y = inputs(t, n=5)
    s = fk.FreeSampler(t, _drafter(t), d, draft_length=3, layout=layout, clip_denoised=CLIP)
    a, sa = s.sample(noise, y, cfg_scale=3.0, generator=torch.Generator().manual_seed(4))
    b, sb = s.sample(noise, y, cfg_scale=3.0, generator=torch.Generator().manual_seed(4))
    c, _ = s.sample(noise, y, cfg_scale=3.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and sa.accepted_by_index == sb.accepted_by_index
    assert not torch.equal(a, c)


@pytest.mark.parametrize("learn,cfg", [(True, 4.0), (False, 1.0)], ids=["learned-cfg", "fixed"])
def test_static_layout_matches_baseline_in_distribution(targets, learn, cfg):
    """The CUDA layout (every slot and position computed, keyed Philox randomness) is exact too."""
    t = targets[learn]
    d = fk.create_diffusion(STEPS, learn_sigma=learn)
    noise, y = inputs(t)
    s = fk.FreeSampler(t, _drafter(t), d, draft_length=3, layout="static", clip_denoised=CLIP)
    out, st = s.sample(noise, y, cfg_scale=cfg, generator=torch.Generator().manual_seed(11))
    assert st.acceptance_rate is not None and 0.0 < st.acceptance_rate < 1.0  # the test exercises both branches
    assert same_distribution(out, base_samples(targets, learn, cfg))


# ------------------------------------------------------------ continuous batching
def _requests(n, num_classes=5, base=100):
    return [(base + 7 * i, i % num_classes) for i in range(n)]


@pytest.mark.parametrize("learn,candidates", [(True, 8), (True, 1), (False, 8)],
                         ids=["learned-var", "learned-var-1-candidate", "fixed-var"])
def test_stream_result_depends_only_on_its_seed(targets, learn, candidates):
    t = targets[learn]
    d = fk.create_diffusion("20", learn_sigma=learn)
    # one residual candidate per sample and round: nearly every rejection samples its residual past the
    # round's candidates, which must come from the sample's own stream too, never from one the batch shares
    s = fk.FreeSampler(t, _drafter(t), d, draft_length=3, clip_denoised=CLIP,
                       residual_candidates_per_iter=candidates)
    reqs = _requests(7)
    by_b = {}
    for bs, order in ((1, reqs), (3, reqs), (4, reqs[::-1])):
        res = list(s.sample_stream(order, batch_size=bs, cfg_scale=2.0))
        assert sorted(r.index for r in res) == list(range(len(order)))
        by_b[bs] = {(r.seed, r.label): r.sample for r in res}
        assert all(r.steps == d.num_timesteps for r in res)
        if learn:
            assert s.last_stats.residual_max_candidates > candidates  # the continuation ran
    # equal up to the rounding of a batched GEMM (a row's result may change in the last bits with
    # the batch size); every accept decision and every random number is the same
    for key, x in by_b[1].items():
        for bs in (3, 4):
            torch.testing.assert_close(by_b[bs][key], x, rtol=1e-4, atol=1e-4)


def test_stream_of_plain_steps_refills_without_reading_every_round(targets):
    """A plan that never drafts: slots finish and are refilled where the host expects (no read between),
    every request takes one round per step, and a result depends only on its seed."""
    from free_kernels.planner import CostModel, DraftPlanner

    t = targets[True]
    d = fk.create_diffusion("20", learn_sigma=True)
    rows = CostModel("test", verify_s=[float(k + 1) for k in range(4)], draft_s=0.05, accept_s=0.0)
    s = fk.FreeSampler(t, _drafter(t), d, planner=DraftPlanner(3, cost_model=rows), clip_denoised=CLIP)
    reqs = _requests(7)
    by_b = {}
    for bs in (1, 3):
        res = list(s.sample_stream(reqs, batch_size=bs, cfg_scale=2.0))
        st = s.last_stats
        assert sorted(r.index for r in res) == list(range(7))
        assert all(r.steps == r.rounds == d.num_timesteps and r.proposed == 0 for r in res)
        assert st.drafter_calls == 0 and st.rounds == math.ceil(7 / bs) * d.num_timesteps
        assert st.host_reads <= math.ceil(7 / bs) + 2  # one read per wave of finishing slots (+ start, end)
        by_b[bs] = {r.seed: r.sample for r in res}
    for seed, x in by_b[1].items():
        torch.testing.assert_close(by_b[3][seed], x, rtol=1e-4, atol=1e-4)


def test_stream_keeps_the_batch_full_and_reports_stats(targets):
    t = targets[True]
    d = fk.create_diffusion("20", learn_sigma=True)
    s = fk.FreeSampler(t, _drafter(t), d, draft_length=3, clip_denoised=CLIP)
    res = list(s.sample_stream(_requests(24), batch_size=6))
    st = s.last_stats
    assert len(res) == 24 and len(st.steps_per_sample) == 24
    # a fixed batch would idle its finished slots; the stream refills them at the next check
    occupancy = sum(st.sample_rounds) / (6 * st.rounds)
    assert occupancy > 0.85
    # results arrive as they finish (samples take different numbers of rounds), not in request order
    order = [r.index for r in res]
    assert sorted(order) == list(range(24)) and order != list(range(24))
    rounds = [r.rounds for r in res]
    assert len(set(rounds)) > 1 and all(r.steps == d.num_timesteps for r in res)


def test_stream_matches_baseline_in_distribution(targets):
    t = targets[True]
    d = fk.create_diffusion(STEPS, learn_sigma=True)
    s = fk.FreeSampler(t, _drafter(t), d, draft_length=3, clip_denoised=CLIP)
    labels = inputs(t)[1]
    reqs = [(10_000 + i, int(labels[i])) for i in range(M)]
    res = sorted(s.sample_stream(reqs, batch_size=64, cfg_scale=4.0), key=lambda r: r.index)
    out = torch.stack([r.sample for r in res])
    # the baseline's x_T come from the same per-request seeds
    xs = torch.stack([torch.randn(out.shape[1:], generator=torch.Generator().manual_seed(sd)) for sd, _ in reqs])
    z = torch.cat([xs, xs])
    yy = torch.cat([labels, torch.full_like(labels, t.num_classes)])
    torch.manual_seed(17)
    base = d.p_sample_loop(t.forward_with_cfg, z.shape, z, clip_denoised=CLIP,
                           model_kwargs=dict(y=yy, cfg_scale=4.0))[:M]
    assert same_distribution(out, base)


def test_stream_bad_requests(targets):
    t = targets[True]
    d = fk.create_diffusion("10", learn_sigma=True)
    s = fk.FreeSampler(t, FrozenFeatureDrafter(t), d, draft_length=2)
    with pytest.raises(ValueError, match="batch_size"):
        list(s.sample_stream(_requests(2), batch_size=0))
    with pytest.raises(ValueError, match="request 1"):
        list(s.sample_stream([(1, 0), (2, 99)], batch_size=2))
    with pytest.raises(TypeError, match="request 0"):
        list(s.sample_stream(["nope"], batch_size=2))
    assert list(s.sample_stream([], batch_size=2)) == []


# ------------------------------------------------------------ API edges
def test_api_edges(targets):
    t = targets[True]
    d = fk.create_diffusion("10", learn_sigma=True)
    dr = FrozenFeatureDrafter(t)
    s = fk.FreeSampler(t, dr, d, draft_length=2)
    noise, y = inputs(t, n=3)
    # empty batch: an empty result, no error
    out, st = s.sample(noise[:0], y[:0])
    assert out.shape == (0, *noise.shape[1:]) and st.rounds == 0
    # labels of any integer dtype
    a, _ = s.sample(noise, y.to(torch.uint8), generator=torch.Generator().manual_seed(0))
    b, _ = s.sample(noise, y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    for bad in (float("inf"), float("nan"), "2"):
        with pytest.raises(ValueError, match="cfg_scale"):
            s.sample(noise, y, cfg_scale=bad)
    for name in ("residual_candidates_per_iter", "residual_max_candidates"):
        for v in (0, -3):
            with pytest.raises(ValueError, match=name):
                fk.FreeSampler(t, dr, d, **{name: v})
    class _CudaGenerator(torch.Generator):  # a generator that says it lives on another device
        @property
        def device(self):
            return torch.device("cuda", 0)

    with pytest.raises(ValueError, match="generator is on cuda"):
        s.sample(noise, y, generator=_CudaGenerator())
    # train mode would drop labels at random: refused, as the drop-in does
    t.train()
    try:
        with pytest.raises(ValueError, match="train"):
            s.sample(noise, y)
    finally:
        t.eval()
    # L above the schedule length is capped (a 10-step run never drafts more than 9)
    assert fk.FreeSampler(t, dr, d, draft_length=10_000).draft_length == 9


def test_nan_weights_are_named(targets):
    t = make_target(True, seed=3)
    d = fk.create_diffusion("10", learn_sigma=True)
    with torch.no_grad():
        t.final_layer.linear.bias[0] = float("nan")
    s = fk.FreeSampler(t, FrozenFeatureDrafter(t), d, draft_length=2)
    noise, y = inputs(t, n=2)
    with pytest.raises(ValueError, match="final_layer.linear.bias"):
        s.sample(noise, y)


# ------------------------------------------------------------ CUDA graphs (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("learn", [True, False], ids=["learned-var", "fixed-var"])
def test_graph_replay_equals_eager_bit_for_bit(learn):
    dev = torch.device("cuda")
    t = make_target(learn).to(dev)
    d = fk.create_diffusion("20", learn_sigma=learn)
    dr = _drafter(make_target(learn)).to(dev)
    noise, y = inputs(make_target(learn), n=8)
    noise, y = noise.to(dev), y.to(dev)
    outs = {}
    for graphs in (False, True):
        s = fk.FreeSampler(t, dr, d, draft_length=3, layout="static", graphs=graphs, clip_denoised=CLIP)
        outs[graphs], st = s.sample(noise, y, cfg_scale=2.0, generator=torch.Generator(device=dev).manual_seed(3))
        assert st.graphs == ("replayed" if graphs else "off")
    assert torch.equal(outs[False], outs[True])


# ------------------------------------------------------------ the round needs no host
def test_one_static_round_compiles_fullgraph(targets):
    """torch.compile(fullgraph=True) of a whole round: the proxy that nothing in it needs the host."""
    from free_kernels.sampler import _Run

    t = targets[True]
    d = fk.create_diffusion("20", learn_sigma=True)
    s = fk.FreeSampler(t, _drafter(t), d, draft_length=3, layout="static", clip_denoised=CLIP)
    noise, y = inputs(t, n=3)
    run = _Run(s, 3, torch.device("cpu"), torch.float32, 2.0, 3, overflow_seed=1)
    run.insert([0, 1, 2], noise, y, torch.tensor([5, 6, 7]))
    run.timed = False
    with torch.no_grad():
        run._round_body(None, None, 0, None)      # first round: no features yet (eager)
        run._round_body(None, None, 3, None)      # warm the buffers of the drafting round
        state = [v.clone() for v in (run.x, run.idx, run.hp, run.draws, run.steps)]
        run._round_body(None, None, 3, None)
        eager = [v.clone() for v in (run.x, run.idx, run.hp, run.draws, run.steps)]
        for v, s0 in zip((run.x, run.idx, run.hp, run.draws, run.steps), state):
            v.copy_(s0)
        torch._dynamo.reset()
        compiled = torch.compile(lambda: run._round_body(None, None, 3, None), fullgraph=True, backend="eager")
        compiled()
    for a, b in zip(eager, (run.x, run.idx, run.hp, run.draws, run.steps)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

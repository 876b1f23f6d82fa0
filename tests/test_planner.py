"""draft_length="auto": the planner's arithmetic, its cost-model cache, and exactness under any plan."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import free_kernels as fk
from free_kernels.models import FeatureDrafter
from free_kernels.planner import AcceptanceProfile, CostModel, DraftPlanner, _RunPlan, expected_steps

from test_sampler import CLIP, STEPS, base_samples, inputs, same_distribution, targets  # noqa: F401


def test_expected_steps():
    rates = np.full(20, 0.5)
    assert expected_steps(rates, np.array([10]), 0)[0] == 1.0
    assert expected_steps(rates, np.array([10]), 3)[0] == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_steps(np.ones(20), np.array([10, 2, 1, 0]), 6).tolist() == [7.0, 3.0, 2.0, 1.0]
    assert expected_steps(np.zeros(20), np.array([10]), 6)[0] == 1.0


def _plan(cost: CostModel, rates, Lmax=8, min_gain=0.0):
    prof = AcceptanceProfile(len(rates), prior=rates, weight=1e9)
    return _RunPlan(DraftPlanner(Lmax, calibrate=False, min_gain=min_gain), cost, prof, Lmax)


def test_planner_drafts_only_where_it_pays():
    flat_verify = CostModel("k", verify_s=[1.0] * 9, draft_s=0.01, accept_s=0.0)   # a latency-bound device
    rows_verify = CostModel("k", verify_s=[float(k + 1) for k in range(9)], draft_s=0.3, accept_s=0.0)  # cost ~ rows
    cpu_b1 = CostModel("k", verify_s=[1.0 + 0.25 * k for k in range(9)], draft_s=0.3, accept_s=0.0)  # fixed + rows
    good, bad = np.full(100, 0.95), np.full(100, 0.05)
    assert _plan(flat_verify, good).choose(np.array([50])) == 8
    # 5% acceptance: one draft buys 0.05 steps; worth it only while a draft step costs under 5% of a round
    assert _plan(flat_verify, bad).choose(np.array([50])) == 1
    assert _plan(CostModel("k", verify_s=[1.0] * 9, draft_s=0.1, accept_s=0.0), bad).choose(np.array([50])) == 0
    assert _plan(rows_verify, bad).choose(np.array([50])) == 0
    # when a forward costs in proportion to its rows, verifying drafts never pays, however good they are
    assert _plan(rows_verify, good).choose(np.array([50])) == 0
    mid = _plan(cpu_b1, good).choose(np.array([50]))
    assert 0 < mid < 8
    # near the end of the schedule there is nothing to draft
    assert _plan(flat_verify, good).choose(np.array([0])) == 0


def test_drafting_must_beat_a_plain_step_by_min_gain():
    # L = 1 at acceptance 0.96 on a round costing 1.89 plain steps: 4% more steps per second, predicted
    cost = CostModel("k", verify_s=[1.0], draft_s=0.0, accept_s=0.0, rounds_s=[1.0, 1.89, 2.8])
    good = np.full(100, 0.96)
    assert _plan(cost, good, Lmax=2).choose(np.array([50] * 10)) == 1
    assert _plan(cost, good, Lmax=2, min_gain=0.1).choose(np.array([50] * 10)) == 0
    assert DraftPlanner().min_gain == pytest.approx(0.20)
    # a clear gain is taken whatever the margin
    assert _plan(CostModel("k", verify_s=[1.0] * 9, draft_s=0.01, accept_s=0.0), np.full(100, 0.95),
                 min_gain=0.1).choose(np.array([50])) == 8
    with pytest.raises(ValueError, match="min_gain"):
        DraftPlanner(min_gain=-1)


def test_profile_learns_from_counts():
    p = AcceptanceProfile(10, prior=None, weight=8.0)
    assert p.rates()[3] == pytest.approx(0.75)
    acc = np.zeros(10)
    pro = np.zeros(10)
    acc[3], pro[3] = 0, 1000
    p.update(acc, pro)
    # counts are pooled over neighbouring indices (here +-1), never further
    assert p.rates()[3] < 0.01 and p.rates()[4] < 0.01 and p.rates()[6] == pytest.approx(0.75)


def test_cost_model_is_calibrated_once_and_cached(targets, tmp_path, capsys):
    t = targets[True]
    d = fk.create_diffusion("20", learn_sigma=True)
    dr = FeatureDrafter.for_target(t, init="random", generator=torch.Generator().manual_seed(2))
    planner = DraftPlanner(4, cache_dir=str(tmp_path))
    s = fk.FreeSampler(t, dr, d, planner=planner)
    noise, y = inputs(t, n=2)
    _, st = s.sample(noise, y, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert "calibrating" in capsys.readouterr().err
    assert st.draft_length_mode == "auto" and st.plan["cost_source"] == "calibrated"
    assert len(st.rounds_by_draft_length) == 5 and sum(st.rounds_by_draft_length) == st.rounds
    assert [t3["third"] for t3 in st.plan["thirds"]] == ["early", "middle", "late"]
    _, st2 = s.sample(noise, y, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert "calibrating" not in capsys.readouterr().err  # kept by the planner
    fresh = fk.FreeSampler(t, dr, d, planner=DraftPlanner(4, cache_dir=str(tmp_path)))
    _, st2 = fresh.sample(noise, y, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert st2.plan["cost_source"].startswith("cached")  # read from the disk cache
    assert "calibrating" not in capsys.readouterr().err
    # another batch size is another key
    _, st3 = s.sample(torch.cat([noise, noise]), torch.cat([y, y]), cfg_scale=2.0)
    assert st3.plan["cost_source"] == "calibrated"


def test_calibration_can_be_skipped(targets, monkeypatch, tmp_path):
    monkeypatch.setenv("FREE_KERNELS_NO_CALIBRATION", "1")
    t = targets[True]
    d = fk.create_diffusion("20", learn_sigma=True)
    dr = FeatureDrafter.for_target(t, init="random", generator=torch.Generator().manual_seed(2))
    s = fk.FreeSampler(t, dr, d, planner=DraftPlanner(4, cache_dir=str(tmp_path)))
    noise, y = inputs(t, n=2)
    _, st = s.sample(noise, y)
    assert "not calibrated" in st.plan["cost_source"]


class _ErraticPlan(_RunPlan):
    """Any L in 0..Lmax at random: a plan that depends only on the past is still exact."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.rng = np.random.default_rng(123)
        self.drafts_ever = True  # the sampler keeps parent features only for a plan that may draft

    def choose(self, idx):
        return int(self.rng.integers(0, self.Lmax + 1))


class _ErraticPlanner(DraftPlanner):
    def start(self, sampler, B, G, dev):
        Lmax = min(self.max_draft_length, sampler.max_useful_draft_length)
        return _ErraticPlan(self, CostModel.proportional(Lmax), AcceptanceProfile(sampler.diffusion.num_timesteps),
                            Lmax)


@pytest.mark.parametrize("kind", ["auto", "erratic"])
def test_auto_matches_baseline_in_distribution(targets, kind, tmp_path):
    t = targets[True]
    d = fk.create_diffusion(STEPS, learn_sigma=True)
    noise, y = inputs(t)
    dr = FeatureDrafter.for_target(t, init="random", generator=torch.Generator().manual_seed(2))
    flat = CostModel("test", verify_s=[1.0] * 5, draft_s=0.05, accept_s=0.0)  # drafting pays: auto drafts
    planner = DraftPlanner(4, cost_model=flat) if kind == "auto" else _ErraticPlanner(4)
    s = fk.FreeSampler(t, dr, d, planner=planner, clip_denoised=CLIP)
    out, st = s.sample(noise, y, cfg_scale=4.0, generator=torch.Generator().manual_seed(11))
    used = [L for L, n in enumerate(st.rounds_by_draft_length) if n]
    assert len(used) >= (4 if kind == "erratic" else 2)  # the plan did vary
    assert st.plan["drafting_can_pay"] is True
    assert same_distribution(out, base_samples(targets, True, 4.0))


def test_a_plan_that_cannot_pay_runs_plain_steps_of_the_baseline_law(targets):
    """Where no L beats a plain step even at acceptance 1 (a forward of L + 1 rows per sample costing L + 1
    plain ones), the run takes plain steps only, reads the host about once, and keeps the baseline's law."""
    t = targets[True]
    d = fk.create_diffusion(STEPS, learn_sigma=True)
    noise, y = inputs(t)
    dr = FeatureDrafter.for_target(t, init="random", generator=torch.Generator().manual_seed(2))
    rows = CostModel("test", verify_s=[float(k + 1) for k in range(5)], draft_s=0.05, accept_s=0.0)
    s = fk.FreeSampler(t, dr, d, planner=DraftPlanner(4, cost_model=rows), clip_denoised=CLIP)
    out, st = s.sample(noise, y, cfg_scale=4.0, generator=torch.Generator().manual_seed(11))
    assert st.rounds_by_draft_length[0] == st.rounds == d.num_timesteps and st.drafter_calls == 0
    assert st.plan["drafting_can_pay"] is False  # decided from the costs alone, before any round
    assert st.host_reads <= 3  # every slot advances one step a round: the host knows where each stands
    assert same_distribution(out, base_samples(targets, True, 4.0))


def test_stored_profile_with_gaps_and_other_schedule_length():
    """A drafter's stored profile ({steps: [per index]}, None where nothing was judged) seeds the prior."""
    p = AcceptanceProfile(10, prior=[None, 0.5, None, 0.9, None])
    assert p.source == "drafter's stored profile"
    assert np.all(np.isfinite(p.prior)) and p.prior[0] == pytest.approx(0.5) and p.prior[-1] == pytest.approx(0.9)
    assert np.all(np.diff(p.prior) >= 0)


def test_cost_key_follows_cpu_threads_and_batch(targets):
    from free_kernels.planner import cost_key

    t = targets[True]
    s = fk.FreeSampler(t, fk.FrozenFeatureDrafter(t), fk.create_diffusion("20", learn_sigma=True), draft_length=2)
    dev = torch.device("cpu")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cost_key(s, 1, 2, dev)
        assert cost_key(s, 1, 2, dev) == one
        assert cost_key(s, 4, 2, dev) != one
        torch.set_num_threads(2)
        assert cost_key(s, 1, 2, dev) != one   # a cost measured at 1 thread is not reused at 2
    finally:
        torch.set_num_threads(n)


def test_cost_key_follows_the_cpu_model(targets, monkeypatch):
    """Costs measured on an AVX-512 machine are not reused on an AVX2 one of the same architecture name."""
    from free_kernels import planner

    t = targets[True]
    s = fk.FreeSampler(t, fk.FrozenFeatureDrafter(t), fk.create_diffusion("20", learn_sigma=True), draft_length=2)
    dev = torch.device("cpu")
    real = planner._cpu_model()
    assert real.endswith(")") and not real.startswith("(")  # "<model name> (<vector ISA>)"
    monkeypatch.setattr(planner, "_cpu_model", lambda: "AMD EPYC (AVX512)")
    a = planner.cost_key(s, 1, 2, dev)
    monkeypatch.setattr(planner, "_cpu_model", lambda: "AMD EPYC (AVX2)")
    assert planner.cost_key(s, 1, 2, dev) != a


def test_lower_envelope_takes_disturbed_costs_down():
    from free_kernels.planner import lower_envelope

    assert lower_envelope([5.0, 10.8, 9.6, 12.0]) == [5.0, 9.6, 9.6, 12.0]
    assert lower_envelope([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]


def _threaded_cost():
    # 1 thread: cheap plain steps; 2 threads: cheap long rounds (a forward of many rows shares out)
    one = [5.0 + 2.4 * L for L in range(9)]
    two = [5.5 + 1.6 * L for L in range(9)]
    return CostModel("k", verify_s=[1.0], draft_s=0.1, accept_s=0.0, rounds_s=[min(a, b) for a, b in zip(one, two)],
                     rounds_by_threads={"1": one, "2": two})


def test_plan_picks_the_thread_count_per_L():
    plan = _plan(_threaded_cost(), np.full(100, 0.95))
    assert plan.threads(0) == 1 and plan.threads(1) == 2 and plan.threads(8) == 2
    assert plan.round_cost[0] == pytest.approx(5.0) and plan.round_cost[6] == pytest.approx(5.5 + 1.6 * 6)
    assert plan.choose(np.array([50])) >= 4   # long rounds are cheap at 2 threads
    assert plan.record().threads_by_L == [1] + [2] * 8


def test_plan_without_thread_alternatives_leaves_threads_alone():
    plan = _plan(CostModel("k", verify_s=[1.0] * 9, draft_s=0.01, accept_s=0.0), np.full(100, 0.95))
    assert plan.threads(3) is None and plan.record().threads_by_L == []


def test_calibration_times_rounds_at_1_thread_and_the_cap(targets, tmp_path):
    t = targets[True]
    d = fk.create_diffusion("20", learn_sigma=True)
    dr = FeatureDrafter.for_target(t, init="random", generator=torch.Generator().manual_seed(2))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        s = fk.FreeSampler(t, dr, d, planner=DraftPlanner(3, cache_dir=str(tmp_path), progress=False))
        plan = s.planner.start(s, 1, 2, torch.device("cpu"))
        cm = plan.cost
        assert sorted(cm.rounds_by_threads) == ["1", "2"] and all(len(v) == 4 for v in cm.rounds_by_threads.values())
        for L in range(4):
            assert cm.rounds_s[L] == min(v[L] for v in cm.rounds_by_threads.values())
            assert cm.rounds_by_threads[str(plan.threads(L))][L] == cm.rounds_s[L]
        for v in cm.rounds_by_threads.values():
            assert all(a <= b for a, b in zip(v, v[1:]))  # lower envelope: non-decreasing in L
        assert torch.get_num_threads() == 2  # the calibration restores the setting
    finally:
        torch.set_num_threads(n)


def test_rounds_run_at_the_planned_thread_count_and_restore_it(targets, tmp_path):
    t = targets[True]
    d = fk.create_diffusion("20", learn_sigma=True)
    dr = FeatureDrafter.for_target(t, init="random", generator=torch.Generator().manual_seed(2))
    cm = CostModel("k", verify_s=[1.0], draft_s=0.1, accept_s=0.0, rounds_s=[1.0 + 0.1 * L for L in range(5)],
                   rounds_by_threads={"1": [1.0 + 0.1 * L for L in range(5)], "2": [9.0 + L for L in range(5)]})
    s = fk.FreeSampler(t, dr, d, planner=DraftPlanner(4, cost_model=cm))
    seen = []
    fwd = t.forward_features

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return fwd(*a, **k)

    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        t.forward_features = spy
        noise, y = inputs(t, n=1)
        _, st = s.sample(noise, y, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
        assert seen and set(seen) == {1}          # every round at the planned 1 thread
        assert torch.get_num_threads() == 2       # and the caller's setting back afterwards
        assert st.plan["threads_by_L"] == [1] * 5
    finally:
        del t.forward_features
        torch.set_num_threads(n)


class _PlainPlanner(DraftPlanner):
    def start(self, sampler, B, G, dev):
        plan = super().start(sampler, B, G, dev)
        plan.choose = lambda idx: 0
        return plan


def test_plain_steps_skip_the_accept_op_and_match_the_baseline(targets, monkeypatch):
    """L = 0 everywhere: plain ancestral steps (no accept op, no FREE bookkeeping), the baseline's law."""
    from free_kernels import sampler as sampler_mod

    t = targets[True]
    d = fk.create_diffusion(STEPS, learn_sigma=True)
    dr = FeatureDrafter.for_target(t, init="random", generator=torch.Generator().manual_seed(2))
    s = fk.FreeSampler(t, dr, d, planner=_PlainPlanner(4, cost_model=CostModel.proportional(4)), clip_denoised=CLIP)

    def no_accept(*a, **k):
        raise AssertionError("the accept op ran on a round without drafts")

    monkeypatch.setattr(sampler_mod.ops, "speculative_accept", no_accept)
    noise, y = inputs(t)
    out, st = s.sample(noise, y, cfg_scale=4.0, generator=torch.Generator().manual_seed(11))
    assert st.rounds_by_draft_length[0] == st.rounds and st.target_calls == st.rounds
    assert st.drafter_calls == 0 and st.residual_rejections == 0
    assert same_distribution(out, base_samples(targets, True, 4.0))

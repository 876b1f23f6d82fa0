"""draft_length="auto": the planner's arithmetic, its calibration, the costs it learns from the run's rounds,
and exactness under any plan (one that re-plans in the middle of a run included).  The cost cache's own
tests are in test_planner_cache.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import free_kernels as fk
from free_kernels.models import FeatureDrafter
from free_kernels.planner import AcceptanceProfile, CostModel, DraftPlanner, _RunPlan, expected_steps
from free_kernels.planner import _NULL_CLOCK, EXPLORE_FIRST
from free_kernels.planning.costs import WINDOW, RoundCosts

from test_sampler import CLIP, STEPS, _skip_residual_accept, base_samples, inputs, same_distribution  # noqa: F401
from test_sampler import targets  # noqa: F401


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
    _, st = s.sample(noise, y, cfg_scale=2.0, generator=torch.Generator().manual_seed(0), progress=True)
    err = capsys.readouterr().err
    assert "calibrating the draft planner" in err              # a progress line, with its seconds
    assert "FREE (auto)" in err and "L=" not in err.split("calibrating")[-1].split("FREE")[-1]
    assert st.draft_length_mode == "auto" and st.plan["cost_source"].startswith("calibrated now")
    assert st.plan["calibration_s"] > 0 and st.plan["mode"] == "adaptive"
    assert len(st.rounds_by_draft_length) == 5 and sum(st.rounds_by_draft_length) == st.rounds
    assert [t3["third"] for t3 in st.plan["thirds"]] == ["early", "middle", "late"]
    assert sum(st.plan["samples_by_index"]) == sum(t3["rounds"] for t3 in st.plan["thirds"]) * 2  # 2 samples
    assert len(st.plan["predicted_acceptance_by_index"]) == d.num_timesteps
    _, st2 = s.sample(noise, y, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert "calibrating" not in capsys.readouterr().err  # kept by the planner
    assert st2.plan["calibration_s"] == 0                # counted once, by the run that paid it
    fresh = fk.FreeSampler(t, dr, d, planner=DraftPlanner(4, cache_dir=str(tmp_path)))
    assert fresh.prepare(2, 2.0) == 0.0                  # read from the disk cache
    _, st2 = fresh.sample(noise, y, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert "cached calibration" in st2.plan["cost_source"] or "learned by earlier runs" in st2.plan["cost_source"]
    assert "calibrating" not in capsys.readouterr().err
    # another batch size is another key; prepare() returns what the calibration took
    assert s.prepare(4, 2.0) > 0
    assert fk.FreeSampler(t, dr, d, draft_length=3).prepare(4, 2.0) == 0.0


def test_calibration_times_only_plausible_lengths():
    from free_kernels.planner import calibration_lengths

    E = np.stack([expected_steps(np.full(250, 0.75), np.arange(250), L) for L in range(9)], 1).mean(0)
    assert calibration_lengths(E, 1) == [0, 1, 7]     # 90% of the way to L = 8's steps per round
    assert calibration_lengths(E, 2) == [0, 1, 4]     # capped at 8 // B
    assert calibration_lengths(E, 8) == [0, 1, 2]
    poor = np.stack([expected_steps(np.full(250, 0.2), np.arange(250), L) for L in range(9)], 1).mean(0)
    assert calibration_lengths(poor, 1) == [0, 1, 3]  # a poor drafter: past L = 3 a round buys nothing more
    assert calibration_lengths(E[:3], 1) == [0, 1, 2] and calibration_lengths(E[:2], 8) == [0, 1]


def test_complete_curve_interpolates_and_extrapolates():
    from free_kernels.planner import complete_curve

    assert complete_curve([0, 1, 3], [1.0, 2.0, 4.0], 5) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert complete_curve([0, 1], [1.0, 2.0], 3) == [1.0, 2.0, 3.0, 4.0]
    assert complete_curve([0, 1, 2], [1.0, 3.0, 2.0], 3) == [1.0, 2.0, 2.0, 2.0]  # never decreasing, never below


class _ErraticPlan(_RunPlan):
    """Any L in 0..Lmax at random: a plan that depends only on the past is still exact."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.rng = np.random.default_rng(123)
        self.drafts_ever = True  # the sampler keeps parent features only for a plan that may draft

    def choose(self, idx):
        return int(self.rng.integers(0, self.Lmax + 1))


class _FlippingPlan(_RunPlan):
    """A plan whose measured costs flip every other round (injected instead of the clock): drafting 4 at 2
    threads pays, then plain steps at 1 thread are all that pays, then drafting again...  It changes its mind
    in the middle of a run, on information from the past only."""

    LONG = {1: [1.0, 1.1, 1.2, 1.3, 1.4], 2: [1.2, 1.0, 1.0, 1.0, 1.0]}
    PLAIN = {1: [1.0, 5.0, 6.0, 7.0, 8.0], 2: [3.0, 9.0, 9.0, 9.0, 9.0]}

    def round_clock(self, L, threads, full=True):
        self.k = getattr(self, "k", 0) + 1
        table = self.PLAIN if (self.k // 2) % 2 else self.LONG
        for n, row in table.items():
            for LL, c in enumerate(row):
                for _ in range(WINDOW):
                    self.observe(LL, n, c)
        self.seen = getattr(self, "seen", []) + [(L, threads)]
        return _NULL_CLOCK


class _FlippingPlanner(DraftPlanner):
    def __init__(self):
        long = _FlippingPlan.LONG
        super().__init__(4, cost_model=CostModel("flip", verify_s=[1.0], draft_s=0.1, accept_s=0.0,
                                                  rounds_s=[min(a, b) for a, b in zip(long[1], long[2])],
                                                  rounds_by_threads={str(k): v for k, v in long.items()}))
        self.plans = []

    def start(self, sampler, B, G, dev):
        p = super().start(sampler, B, G, dev)
        p = _FlippingPlan(self, p.cost, p.profile, p.Lmax, state=p.state, dev=dev)
        self.plans.append(p)
        return p


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


def _flipping_run(targets):
    t = targets[True]
    d = fk.create_diffusion(STEPS, learn_sigma=True)
    noise, y = inputs(t)
    dr = FeatureDrafter.for_target(t, init="random", generator=torch.Generator().manual_seed(2))
    planner = _FlippingPlanner()
    s = fk.FreeSampler(t, dr, d, planner=planner, clip_denoised=CLIP)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out, st = s.sample(noise, y, cfg_scale=4.0, generator=torch.Generator().manual_seed(11))
    finally:
        torch.set_num_threads(n)
    seen = planner.plans[-1].seen
    return out, st, seen


def test_a_plan_that_changes_its_mind_mid_run_keeps_the_baseline_law(targets):
    out, st, seen = _flipping_run(targets)
    Ls = [L for L, _ in seen]
    assert {1, 2} <= {n for _, n in seen}                       # rounds at 1 and at 2 threads ...
    assert 0 in Ls and max(Ls) >= 3                              # ... plain and drafting ...
    assert sum(a != b for a, b in zip(Ls, Ls[1:])) >= 3          # ... switching back and forth in one run
    assert st.plan["replanned_rounds"] > 0 and st.plan["timed_rounds"] > 0
    assert same_distribution(out, base_samples(targets, True, 4.0))


def test_negative_control_under_a_plan_that_changes_its_mind(targets, monkeypatch):
    """The same test, the same flipping plan, a broken rule (the residual skipped): rejected."""
    from free_kernels import ops
    import free_kernels.sampler as smod

    class _Ops:
        def __getattr__(self, name):
            return _skip_residual_accept if name == "speculative_accept" else getattr(ops, name)

    monkeypatch.setattr(smod, "ops", _Ops())
    out, st, _ = _flipping_run(targets)
    assert st.residual_rejections > 0
    assert not same_distribution(out, base_samples(targets, True, 4.0))


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
    from free_kernels.planning import cache

    t = targets[True]
    s = fk.FreeSampler(t, fk.FrozenFeatureDrafter(t), fk.create_diffusion("20", learn_sigma=True), draft_length=2)
    dev = torch.device("cpu")
    real = cache._cpu_model()
    assert real.endswith(")") and not real.startswith("(")  # "<model name> (<vector ISA>)"
    monkeypatch.setattr(cache, "_cpu_model", lambda: "AMD EPYC (AVX512)")
    a = planner.cost_key(s, 1, 2, dev)
    monkeypatch.setattr(cache, "_cpu_model", lambda: "AMD EPYC (AVX2)")
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
        timed = []
        real = s.measure_rounds
        s.measure_rounds = lambda *a, **k: timed.append(k["lengths"]) or real(*a, **k)
        plan = s.planner.start(s, 1, 2, torch.device("cpu"))
        assert timed == [[0, 1, 3]] or timed == [[0, 1, 2]]  # a few plausible lengths, not all of 0..3
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
    s = fk.FreeSampler(t, dr, d, planner=DraftPlanner(4, cost_model=cm, plan="frozen"))
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


# ------------------------------------------------------------------ the costs the run measures
def test_round_costs_follow_the_timed_rounds():
    rc = RoundCosts({1: [1.0, 2.0, 3.0, 4.0], 2: [2.0, 2.0, 2.0, 2.0]}, 3)
    assert rc.best() == ([1.0, 2.0, 2.0, 2.0], [1, 1, 2, 2])
    for _ in range(3):
        rc.observe(3, 2, 8.0)                  # 2-thread rounds 4x their prior
    est = rc.estimates()
    assert est[2].tolist() == [8.0, 8.0, 8.0, 8.0] and est[1].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert rc.best()[1] == [1, 1, 1, 1]
    rc.observe(0, 1, 0.5)                      # ratio 0.5 at L = 0, interpolated towards L = 3's ...
    rc.observe(3, 1, 4.0)                      # ... ratio 1
    assert rc.estimates()[1].tolist() == pytest.approx([0.5, 2 * (0.5 + 0.5 / 3), 3 * (0.5 + 1 / 3), 4.0])
    before = rc.timed
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        rc.observe(1, 1, bad)
    rc.observe(9, 1, 1.0)
    rc.observe(1, 7, 1.0)                      # a thread count it does not plan for
    assert rc.timed == before
    # the median of the last WINDOW: one disturbed round does not move it, a sustained change does
    rc2 = RoundCosts({None: [1.0, 1.0]}, 1)
    for x in [1.0, 1.0, 9.0]:
        rc2.observe(1, 4, x)                   # no thread choice: any thread count counts
    assert rc2.estimates()[None][1] == 1.0
    for x in [9.0, 9.0]:
        rc2.observe(1, None, x)
    assert rc2.estimates()[None][1] == 9.0


def test_plan_moves_off_a_busy_core_within_a_few_rounds():
    """Calibrated quiet (drafting rounds at 2 threads); then every 2-thread round runs 3.5x slower."""
    plan = _plan(_threaded_cost(), np.full(100, 0.95))
    idx = np.array([50])
    L = plan.choose(idx)
    assert L >= 4 and plan.threads(L) == 2
    for k in range(3):
        plan.observe(L, plan.threads(L), 3.5 * (5.5 + 1.6 * L))
        L = plan.choose(idx)
        if plan.threads(L) == 1:
            break
    assert k <= 1 and plan.threads(L) == 1 and L >= 1   # still drafting, now at 1 thread
    assert plan.record().threads_by_L == [1] * 9 and plan.replanned >= 1


def test_exploration_tries_the_other_thread_count_now_and_then():
    plan = _plan(_threaded_cost(), np.full(100, 0.95))
    idx = np.array([50])
    runs = []
    for _ in range(120):
        L = plan.choose(idx)
        runs.append(plan.threads(L))
    explored = [i + 1 for i, n in enumerate(runs) if n == 1]
    assert explored == [EXPLORE_FIRST, 3 * EXPLORE_FIRST, 7 * EXPLORE_FIRST]   # gaps 16, 32, 64
    assert plan.record().explored_rounds == 3
    frozen = _RunPlan(DraftPlanner(8, calibrate=False, plan="frozen"), _threaded_cost(),
                      AcceptanceProfile(100, prior=np.full(100, 0.95), weight=1e9), 8)
    for _ in range(40):
        assert frozen.threads(frozen.choose(idx)) == 2
    assert frozen.round_clock(3, 2) is _NULL_CLOCK
    frozen.observe(3, 2, 100.0)
    assert frozen.record().timed_rounds == 0 and frozen.record().mode == "frozen"


def test_frozen_plan_reproduces_a_seeded_run_and_times_nothing(targets):
    t = targets[True]
    d = fk.create_diffusion("20", learn_sigma=True)
    dr = FeatureDrafter.for_target(t, init="random", generator=torch.Generator().manual_seed(2))
    flat = CostModel("test", verify_s=[1.0] * 5, draft_s=0.05, accept_s=0.0)
    s = fk.FreeSampler(t, dr, d, planner=DraftPlanner(4, cost_model=flat, plan="frozen"), clip_denoised=CLIP)
    noise, y = inputs(t, n=3)
    a, sa = s.sample(noise, y, cfg_scale=2.0, generator=torch.Generator().manual_seed(4))
    b, sb = s.sample(noise, y, cfg_scale=2.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and sa.rounds_by_draft_length == sb.rounds_by_draft_length
    assert sa.plan["mode"] == "frozen" and sa.plan["timed_rounds"] == 0 and sum(sa.rounds_by_draft_length[1:])
    assert fk.FreeSampler(t, dr, d, plan="frozen").planner.plan == "frozen"
    with pytest.raises(ValueError, match="plan must be 'adaptive' or 'frozen'"):
        fk.FreeSampler(t, dr, d, plan="fast")


def test_adaptive_runs_write_what_they_learned_back(targets, tmp_path):
    t = targets[True]
    d = fk.create_diffusion("20", learn_sigma=True)
    dr = FeatureDrafter.for_target(t, init="random", generator=torch.Generator().manual_seed(2))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        s = fk.FreeSampler(t, dr, d, planner=DraftPlanner(2, cache_dir=str(tmp_path), progress=False))
        plan = s.planner.start(s, 1, 1, torch.device("cpu"))       # calibrates
        prior = list(plan.prior_cost)
        for L in range(3):
            for _ in range(4):
                plan.observe(L, 1, 3.0 * prior[L])                 # the machine got 3x slower
        plan.finish()
        again = fk.FreeSampler(t, dr, d, planner=DraftPlanner(2, cache_dir=str(tmp_path), progress=False))
        p2 = again.planner.start(again, 1, 1, torch.device("cpu"))
        assert p2.state.source.startswith("learned by earlier runs") and p2.calibration_s == 0
        assert p2.prior_cost == pytest.approx([3.0 * c for c in prior])
        frozen = fk.FreeSampler(t, dr, d, planner=DraftPlanner(2, cache_dir=str(tmp_path), plan="frozen"))
        p3 = frozen.planner.start(frozen, 1, 1, torch.device("cpu"))
        assert p3.state.source.startswith("cached calibration") and p3.prior_cost == pytest.approx(prior)
    finally:
        torch.set_num_threads(n)


def test_merge_plans_adds_counts_and_keeps_the_latest_costs():
    from free_kernels.planner import PlanRecord, mean_L_by_index, merge_plans

    a = PlanRecord(cost_source="a", calibration_s=1.5, timed_rounds=3, L_sum_by_index=[0, 4, 2],
                   samples_by_index=[1, 1, 1], costs_ms={"round_L0_ms": 1.0},
                   thirds=[dict(third=k, rounds=1, mean_L=2.0, predicted_acceptance=0.5) for k in "ABC"]).as_dict()
    b = PlanRecord(cost_source="b", timed_rounds=2, L_sum_by_index=[0, 2, 0], samples_by_index=[1, 1, 0],
                   costs_ms={"round_L0_ms": 2.0},
                   thirds=[dict(third=k, rounds=3, mean_L=0.0, predicted_acceptance=0.9) for k in "ABC"]).as_dict()
    m = merge_plans([a, None, b])
    assert m["calibration_s"] == 1.5 and m["timed_rounds"] == 5 and m["costs_ms"] == {"round_L0_ms": 2.0}
    assert mean_L_by_index(m) == [0.0, 3.0, 2.0]
    assert m["thirds"][0]["rounds"] == 4 and m["thirds"][0]["mean_L"] == pytest.approx(0.5)
    assert merge_plans([None]) is None

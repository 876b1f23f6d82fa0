"""Draft-length planning: draft only where it pays (``draft_length="auto"``).

Per round the FREE sampler chooses how many steps to draft, L in 0..Lmax, to
maximise the expected denoising steps per second of the whole batch:

    E_b(L) = 1 + sum_{k=1..min(L, i_b)} prod_{j<k} a(i_b - j)     (steps sample b advances)
    cost(L) = seconds of one sampler round drafting L (L drafts, a target forward of G*B*(L+1) rows,
              acceptance, randomness, bookkeeping; L = 0: a forward of G*B rows)
    L* = argmax_L  sum_b E_b(L) / cost(L)

* ``a(i)``, the chance that a draft at respaced index i is accepted, comes from
  an :class:`AcceptanceProfile`: a prior (the profile stored with the drafter
  by ``free-train-drafter``, else a flat 0.75) smoothed with the run's own
  accept counts as they come in (pooled over neighbouring indices).
* ``cost(L)`` comes from :mod:`free_kernels.planning`: a prior (this setting's
  cached costs, else a short calibration before the first run, else an
  uncalibrated curve), kept per CPU intra-op thread count (1 or all: a plain
  step of one sample is too small for threads to share, a round verifying
  L + 1 states per sample is not), and corrected by what the run's own rounds
  cost (:class:`~free_kernels.planning.costs.RoundCosts`; timed where the
  sampler already times rounds: on the CPU with the clock, on CUDA with events
  read at a later round, without extra synchronisation).

Two plans (``DraftPlanner(plan=...)``, ``FreeSampler(plan=...)``, ``free-sample --reproducible``):

* ``"adaptive"`` (default): the costs follow the run's timed rounds, so a machine
  that got busier or quieter since the calibration is planned for as it is now
  (on the 2-core CPU with one core busy, 2-thread rounds run 3-4x slower and the
  plan moves them to 1 thread after one or two rounds).  Every 16 planned
  rounds at first, doubling to 256 (an alternative more than twice as
  expensive waits 256), one round runs at the other thread count, so that a
  thread count that became cheaper is noticed.  What the runs measured is
  written back to the cache as the next run's prior.  The plan then depends on
  the machine's timings: a seeded run keeps the baseline's law exactly, but
  not its pixels from one call to the next.
* ``"frozen"``: the cached calibration alone (calibrated once when missing),
  nothing timed during runs, and every run starts from the drafter's stored
  profile rather than from earlier runs' accept counts: a seeded run
  reproduces bit for bit while the cached calibration stays (only
  ``FREE_KERNELS_RECALIBRATE`` or a lost cache changes it; adaptive runs never
  do).  The cost: no protection from load (with one core busy a quiet
  calibration kept choosing 2-thread rounds, 0.41x the baseline).  A fixed
  ``draft_length`` reproduces on any machine.

Environment (yes / no words: 1, true, yes, on / 0, false, no, off):
``FREE_KERNELS_RECALIBRATE`` ignores cached costs and calibrates again (once
per planner and setting); ``FREE_KERNELS_NO_CALIBRATION`` never times rounds
before a run: cached costs when there are any (also another checkout's, as a
prior), else the uncalibrated prior (:meth:`CostModel.uncalibrated`: drafting at
batch 1, plain steps from batch 4 until measured), which an adaptive run
corrects from its own rounds.  The cache lives in ``$FREE_KERNELS_CACHE``
(default ``~/.cache/free_kernels``; :mod:`free_kernels.planning.cache`).

L = 0 is a plain ancestral step (one target row per sample, no drafting), so
a plan never costs more than the baseline beyond the calibration and what a
misjudged round costs before it is measured.  Where no L could beat a plain
step by the margin even if every draft were accepted (a sample advances at
most L + 1 steps in a round drafting L; the batched demo on the CPU, whose
forward costs in proportion to its rows), the run is plain steps only
(``_RunPlan.drafts_ever``, decided at the start of each run): the sampler then
keeps no parent features and reads nothing back between rounds.

Exactness: the plan of a round depends only on what is known before the round
(indices, past accept counts, past rounds' times, the cache), never on that
round's random numbers, so every emitted step keeps the target transition's
law (tests/test_planner.py checks the distribution under an erratic planner
and under one whose costs flip in the middle of a run).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ._env import env_flag
from .planning.cache import (  # noqa: F401  (re-exported: the names callers use)
    CostCache, costs_from_json, costs_to_json, default_cache_dir, device_name, exact_key, prior_key,
)
from .planning.calibration import (  # noqa: F401
    CALIBRATION_REPS, calibrate, calibration_lengths, complete_curve, intra_op_threads, lower_envelope,
    thread_candidates,
)
from .planning.costs import CostModel, RoundCosts  # noqa: F401

__all__ = ["AcceptanceProfile", "CostModel", "DraftPlanner", "PlanRecord", "RoundCosts", "check_draft_length",
           "check_plan", "merge_plans", "mean_L_by_index"]

cost_key = prior_key  # the key of a setting's costs (device, model shapes, batch, guidance, versions)

PLANS = ("adaptive", "frozen")


def check_draft_length(value, name: str = "draft_length"):
    """``"auto"`` or an int >= 1 (anything else: a ValueError naming ``name``)."""
    if isinstance(value, str) and value == "auto":
        return "auto"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise ValueError(f"{name} must be 'auto' or an int >= 1, got {value!r}")


def check_plan(value, name: str = "plan") -> str:
    """``"adaptive"`` or ``"frozen"`` (anything else: a ValueError naming ``name``)."""
    if isinstance(value, str) and value in PLANS:
        return value
    raise ValueError(f"{name} must be 'adaptive' or 'frozen', got {value!r}")


DEFAULT_PRIOR = 0.75
# a round drafts only where its predicted steps per second beat a plain step's by this much: the measured
# costs are medians on a noisy machine and the acceptance a smoothed estimate (the demo at batch 10 on the
# 2-core CPU: L = 1 predicted 4% ahead of L = 0 measured 0.91x the baseline, L = 3 predicted 12% ahead ran
# 0.88-0.91x against 0.96-0.98x for plain steps); where drafting pays, it pays by far more (1.4-1.9x
# predicted early and mid-schedule at batch 1, where 0.1 and 0.2 measured the same 1.51x)
MIN_GAIN = 0.20
PRIOR_WEIGHT = 8.0   # pseudo-counts of the prior against the run's own counts
EXPLORE_FIRST = 16   # adaptive: planned rounds before the first round at the other thread count
EXPLORE_MAX = 256    # ... the gap doubles up to this
EXPLORE_RATIO = 2.0  # an alternative estimated above this multiple of the chosen round waits EXPLORE_MAX rounds
WRITE_BACK_CHANGE = 0.15  # learned costs are written back when one moved this much from what the cache holds
WRITE_BACK_MIN_TIMED = 8  # ... and at least this many rounds were timed


class AcceptanceProfile:
    """Per-respaced-index draft acceptance: prior + the run's counts (Beta smoothing)."""

    def __init__(self, num_steps: int, prior: Optional[Sequence[float]] = None, weight: float = PRIOR_WEIGHT):
        self.N = int(num_steps)
        if prior is None:
            p = np.full(self.N, DEFAULT_PRIOR)
            self.source = f"flat prior {DEFAULT_PRIOR}"
        else:
            raw = np.array([np.nan if v is None else float(v) for v in prior], dtype=np.float64)
            known = np.isfinite(raw)
            if known.any():  # indices never judged when the profile was measured: the nearest measured ones
                raw = np.interp(np.arange(len(raw)), np.nonzero(known)[0], raw[known])
            else:
                raw = np.full(len(raw), DEFAULT_PRIOR)
            p = resample_profile(raw, self.N)
            self.source = "drafter's stored profile"
        self.prior = np.clip(p, 0.0, 1.0)
        self.weight = float(weight)
        self.accepted = np.zeros(self.N)
        self.proposed = np.zeros(self.N)
        self._base_acc = np.zeros(self.N)   # counts of earlier runs of the same sampler
        self._base_pro = np.zeros(self.N)
        self._rates: Optional[np.ndarray] = None  # rates() until the counts change

    def update(self, accepted: np.ndarray, proposed: np.ndarray) -> None:
        """This run's cumulative counts per index (as the sampler keeps them), added to earlier runs'."""
        accepted = self._base_acc + np.asarray(accepted, dtype=np.float64)
        proposed = self._base_pro + np.asarray(proposed, dtype=np.float64)
        if self._rates is not None and np.array_equal(proposed, self.proposed) \
                and np.array_equal(accepted, self.accepted):
            return  # nothing judged since the last update (plain rounds): the smoothed rates stand
        self.accepted, self.proposed = accepted, proposed
        self._rates = None

    def finish_run(self) -> None:
        """Keep this run's counts for the next run (a sampler called once per image learns across calls)."""
        self._base_acc, self._base_pro = self.accepted.copy(), self.proposed.copy()

    def rates(self) -> np.ndarray:
        """Acceptance per index: the run's counts pooled over a window of neighbouring indices (about 1/25
        of the schedule: acceptance changes slowly along it, and one image judges each index about once),
        shrunk towards the prior."""
        if self._rates is None:
            w = max(1, self.N // 50)
            acc, pro = _window_sum(self.accepted, w), _window_sum(self.proposed, w)
            self._rates = (acc + self.weight * self.prior) / (pro + self.weight)
        return self._rates


def _window_sum(x: np.ndarray, w: int) -> np.ndarray:
    """sum of x[i - w .. i + w] (clipped at the ends) for every i."""
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(len(x))
    return c[np.minimum(i + w + 1, len(x))] - c[np.maximum(i - w, 0)]


def resample_profile(p: np.ndarray, n: int) -> np.ndarray:
    """A profile over len(p) respaced indices -> n indices (by position in the schedule)."""
    if len(p) == n:
        return p
    if len(p) == 0:
        return np.full(n, DEFAULT_PRIOR)
    src = np.linspace(0.0, 1.0, len(p))
    dst = np.linspace(0.0, 1.0, n)
    return np.interp(dst, src, p)


def expected_steps(rates: np.ndarray, idx: np.ndarray, L: int) -> np.ndarray:
    """E[steps advanced] per sample at respaced indices ``idx`` with L drafts (vectorised)."""
    return expected_steps_upto(rates, idx, L)[:, L]


def expected_steps_upto(rates: np.ndarray, idx: np.ndarray, Lmax: int) -> np.ndarray:
    """(samples, Lmax + 1): E[steps advanced] of each sample at respaced index ``idx`` with L = 0..Lmax drafts:
    1 + sum_{k=1..L} prod_{j<k} a(idx - j), a draft needing a following step (index >= 1), in one pass."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    j = idx[:, None] - np.arange(Lmax)[None, :]                        # index of the k-th draft, k = 1..Lmax
    a = np.where(j >= 1, rates[np.clip(j, 0, len(rates) - 1)], 0.0)
    out = np.ones((idx.size, Lmax + 1), dtype=np.float64)
    out[:, 1:] += np.cumsum(np.cumprod(a, axis=1), axis=1)
    return out


def stored_profile(drafter, num_steps: int):
    """The acceptance profile stored with the drafter (``extra["acceptance_profile"]``: {steps: [per index]}
    or a list), the one measured closest to ``num_steps``; None without one."""
    extra = getattr(drafter, "extra", None)
    if not isinstance(extra, dict):
        return None
    prof = extra.get("acceptance_profile")
    if isinstance(prof, dict) and prof:
        return prof[min(prof, key=lambda s: abs(int(s) - num_steps))]
    if isinstance(prof, (list, tuple)) and prof:
        return prof
    return None


@dataclass
class PlanRecord:
    """What the planner chose and why (``FreeStats.plan``; :func:`merge_plans` joins several runs')."""

    cost_source: str = ""
    profile_source: str = ""
    # the round costs the plan used last (round_L{L}_ms) and, when measured, the calibration's parts
    costs_ms: Dict[str, float] = field(default_factory=dict)
    # CPU: the intra-op thread count the rounds of each L ran at (the plan's last choice)
    threads_by_L: List[Optional[int]] = field(default_factory=list)
    # per third (early / middle / late): rounds, mean L, mean predicted acceptance
    thirds: List[Dict[str, float]] = field(default_factory=list)
    # False: no L beats a plain step by the margin even at acceptance 1 (the run took plain steps only)
    drafting_can_pay: bool = True
    mode: str = "adaptive"
    calibration_s: float = 0.0        # seconds this run (or the prepare() before it) spent calibrating
    prior_round_ms: List[float] = field(default_factory=list)   # round costs per L the run started from
    timed_rounds: int = 0             # rounds whose measured cost the plan took in
    replanned_rounds: int = 0         # rounds whose (L, threads) differ from what the starting costs chose
    explored_rounds: int = 0          # rounds run at the other thread count to check it
    # per respaced index: the acceptance the plan predicted at the start, the sum of the L chosen for the
    # samples at that index and how many samples were there (mean_L_by_index)
    predicted_acceptance_by_index: List[float] = field(default_factory=list)
    L_sum_by_index: List[int] = field(default_factory=list)
    samples_by_index: List[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def mean_L_by_index(plan: dict) -> List[Optional[float]]:
    """The mean draft length the plan chose for samples at each respaced index (None where none was)."""
    return [s / n if n else None for s, n in zip(plan.get("L_sum_by_index") or [], plan.get("samples_by_index") or [])]


def merge_plans(plans: List[dict]) -> Optional[dict]:
    """Several runs' plan records (dicts) as one: counts and per-index sums add, thirds are re-averaged, the
    costs and thread choices are the last run's, what the plan started from the first's."""
    plans = [p for p in plans if p]
    if not plans:
        return None
    out = dict(plans[-1])
    for key in ("prior_round_ms", "predicted_acceptance_by_index", "profile_source"):
        if key in plans[0]:
            out[key] = plans[0][key]
    for key in ("calibration_s", "timed_rounds", "replanned_rounds", "explored_rounds"):
        out[key] = sum(p.get(key) or 0 for p in plans)
    out["drafting_can_pay"] = any(p.get("drafting_can_pay", True) for p in plans)
    for key in ("L_sum_by_index", "samples_by_index"):
        rows = [p.get(key) or [] for p in plans]
        if rows and all(len(r) == len(rows[0]) for r in rows):
            out[key] = [sum(col) for col in zip(*rows)]
    if all(len(p.get("thirds") or []) == 3 for p in plans):
        thirds = []
        for k in range(3):
            parts = [p["thirds"][k] for p in plans]
            rounds = sum(t["rounds"] for t in parts)

            def mean(name):
                return sum((t[name] or 0) * t["rounds"] for t in parts) / rounds if rounds else None

            thirds.append(dict(third=parts[0]["third"], rounds=rounds, mean_L=mean("mean_L"),
                               predicted_acceptance=mean("predicted_acceptance")))
        out["thirds"] = thirds
    return out


class DraftPlanner:
    """Chooses the draft length of each round (see the module docstring).

    ``calibrate=False`` (or ``FREE_KERNELS_NO_CALIBRATION``): never time rounds before a run; ``cost_model``:
    a fixed prior instead of the cache and calibration (tests, experiments); ``plan``: "adaptive" or "frozen".
    """

    def __init__(self, max_draft_length: int = 8, calibrate: bool = True, cache_dir: Optional[str] = None,
                 progress: bool = True, cost_model: Optional[CostModel] = None, min_gain: float = MIN_GAIN,
                 plan: str = "adaptive"):
        if isinstance(max_draft_length, bool) or not isinstance(max_draft_length, (int, np.integer)) \
                or max_draft_length < 0:
            raise ValueError(f"max_draft_length must be an int >= 0, got {max_draft_length!r}")
        self.max_draft_length = int(max_draft_length)
        if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 0 <= min_gain < 10:
            raise ValueError(f"min_gain must be a number in [0, 10), got {min_gain!r}")
        self.min_gain = float(min_gain)
        self.plan = check_plan(plan)
        self.calibrate = bool(calibrate) and not env_flag("FREE_KERNELS_NO_CALIBRATION")
        self.recalibrate = env_flag("FREE_KERNELS_RECALIBRATE")
        self.cache_dir = cache_dir
        self.progress = progress
        self.fixed_cost = cost_model
        self._states: Dict[object, "_KeyState"] = {}
        self._profiles: Dict[tuple, AcceptanceProfile] = {}

    @property
    def adaptive(self) -> bool:
        return self.plan == "adaptive"

    # ------------------------------------------------------------ per run
    def start(self, sampler, B: int, G: int, dev: torch.device) -> "_RunPlan":
        """The plan of one run of ``sampler`` (B samples, G = 2 with guidance) on ``dev``."""
        Lmax = min(self.max_draft_length, sampler.max_useful_draft_length)
        N = sampler.diffusion.num_timesteps
        prior = stored_profile(sampler.drafter, N)
        if self.adaptive:  # accept counts carry over from run to run of the same drafter and schedule
            profile = self._profiles.get((N, id(sampler.drafter)))
            if profile is None:
                profile = self._profiles[(N, id(sampler.drafter))] = AcceptanceProfile(N, prior)
        else:               # a frozen plan depends on nothing but the run's own seed and the calibration
            profile = AcceptanceProfile(N, prior)
        state = self._state(sampler, B, G, dev, Lmax, profile)
        return _RunPlan(self, state.prior, profile, Lmax, state=state, dev=dev)

    def _state(self, sampler, B, G, dev, Lmax, profile) -> "_KeyState":
        if self.fixed_cost is not None:
            key = ("given", B, G, dev.type)
        else:
            key = prior_key(sampler, B, G, dev)
        st = self._states.get(key)
        if st is None or not st.covers(Lmax):
            st = self._states[key] = self._new_state(sampler, B, G, dev, Lmax, profile, key)
        return st

    def _new_state(self, sampler, B, G, dev, Lmax, profile, key) -> "_KeyState":
        if self.fixed_cost is not None:
            return _KeyState(self.fixed_cost, Lmax, self.adaptive, source="given")
        cache = CostCache(self.cache_dir)
        exact = exact_key(key, sampler)
        entry, kind = (None, "") if self.recalibrate else cache.lookup(exact, key)
        if kind == "prior" and not self.adaptive and self.calibrate:
            entry = None  # a frozen plan stands on this checkout's and these weights' own calibration
        fields = ("learned", "calibrated") if self.adaptive else ("calibrated", "learned")
        for name in fields if entry is not None else ():
            costs = entry.get(name)
            if costs is None or any(len(v) < Lmax + 1 for v in costs.values()):
                continue
            if name == "learned" and not self.adaptive and self.calibrate:
                continue
            curves = {n: v[:Lmax + 1] for n, v in costs_from_json(costs).items()}
            what = ("another checkout's or model's costs, a prior" if kind == "prior" else
                    "cached calibration" if name == "calibrated" else "learned by earlier runs")
            cm = CostModel.from_rounds(key, curves, f"{what} ({cache.path})", entry.get("parts_ms"))
            return _KeyState(cm, Lmax, self.adaptive, cache, exact, key, device_name(dev))
        if not self.calibrate:
            return _KeyState(CostModel.uncalibrated(Lmax, B, key), Lmax, self.adaptive, cache, exact, key,
                             device_name(dev))
        N = profile.N
        expected = expected_steps_upto(profile.rates(), np.arange(N), Lmax).mean(axis=0)
        cm, seconds = calibrate(sampler, B, G, dev, Lmax, expected, key, progress=self.progress)
        alt = cm.alternatives(Lmax)
        cache.store(exact, dict(prior_key=key, device=device_name(dev), calibrated=costs_to_json(alt), learned=None,
                                parts_ms=dict(verify_1_row_ms=1e3 * cm.verify_s[0], draft_step_ms=1e3 * cm.draft_s,
                                              accept_ms=1e3 * cm.accept_s), calibration_s=seconds))
        return _KeyState(cm, Lmax, self.adaptive, cache, exact, key, device_name(dev), calibration_s=seconds)


class _KeyState:
    """What a planner keeps for one setting (prior key) across runs: the prior, the costs the runs measured
    (adaptive), the exploration schedule, what the cache holds."""

    def __init__(self, prior: CostModel, Lmax: int, adaptive: bool, cache: Optional[CostCache] = None,
                 exact: Optional[str] = None, prior_key: Optional[str] = None, device: str = "",
                 calibration_s: float = 0.0, source: Optional[str] = None):
        self.prior, self.Lmax = prior, Lmax
        self.source = source or prior.source
        alt = prior.alternatives(Lmax)
        threads = [min(alt, key=lambda n: alt[n][L]) for L in range(Lmax + 1)]
        self._frozen = ([float(alt[n][L]) for L, n in enumerate(threads)], threads)
        self.costs = RoundCosts(alt, Lmax) if adaptive else None
        self.cache, self.exact, self.prior_key, self.device = cache, exact, prior_key, device
        self.calibration_s = calibration_s   # reported by the next run's record, once
        self.written = {n: np.asarray(v, dtype=np.float64) for n, v in alt.items()}
        self.rounds = 0
        self.explore_gap = EXPLORE_FIRST
        self.explore_at = EXPLORE_FIRST
        self.postponed = False
        self.last_threads: Optional[List[Optional[int]]] = None

    def covers(self, Lmax: int) -> bool:
        return self.Lmax >= Lmax

    def best(self):
        """(per L the cost the plan uses now, the thread count it is at)."""
        return self.costs.best() if self.costs is not None else self._frozen

    def take_calibration_s(self) -> float:
        s, self.calibration_s = self.calibration_s, 0.0
        return s

    def explore(self, L: int, n: Optional[int], threads: List[Optional[int]]) -> Optional[int]:
        """The thread count this round runs at: ``n``, or now and then the cheapest other one (adaptive)."""
        self.rounds += 1
        opts = self.costs.options
        if len(opts) < 2:
            return n
        if self.last_threads is not None and threads != self.last_threads:  # measurements moved the plan
            self.explore_gap = EXPLORE_FIRST
            self.explore_at = min(self.explore_at, self.rounds + EXPLORE_FIRST)
        self.last_threads = list(threads)
        if self.rounds < self.explore_at:
            return n
        est = self.costs.estimates()
        alt = min((m for m in opts if m != n), key=lambda m: est[m][L])
        if est[alt][L] > EXPLORE_RATIO * est[n][L] and not self.postponed:
            self.postponed = True
            self.explore_at = self.rounds + EXPLORE_MAX
            return n
        self.postponed = False
        self.explore_gap = min(2 * self.explore_gap, EXPLORE_MAX)
        self.explore_at = self.rounds + self.explore_gap
        return alt

    def write_back(self) -> None:
        """Adaptive: store what the runs measured as the next run's prior, when it moved from what the cache
        holds (one small locked write; none while the costs stay where they were)."""
        if self.costs is None or self.cache is None or self.costs.timed < WRITE_BACK_MIN_TIMED:
            return
        est = self.costs.estimates()
        moved = any(np.max(np.abs(est[n] / self.written[n][:self.Lmax + 1] - 1.0)) > WRITE_BACK_CHANGE
                    for n in est)
        if moved and self.cache.store(self.exact, dict(prior_key=self.prior_key, device=self.device,
                                                       learned=costs_to_json({n: v.tolist() for n, v in est.items()}))):
            self.written = est


class _RoundClock:
    """Times one round for the plan: the clock on the CPU, two CUDA events read at a later round on CUDA."""

    __slots__ = ("plan", "L", "threads", "t0", "start")

    def __init__(self, plan: "_RunPlan", L: int, threads: Optional[int]):
        self.plan, self.L, self.threads = plan, L, threads

    def __enter__(self):
        if self.plan.dev.type == "cuda":
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            if self.threads is None and self.plan.dev.type == "cpu":
                self.threads = torch.get_num_threads()
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            return False
        if self.plan.dev.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.plan._pending.append((self.L, self.threads, self.start, end))
        else:
            self.plan.observe(self.L, self.threads, time.perf_counter() - self.t0)
        return False


class _NullClock:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return False


_NULL_CLOCK = _NullClock()


class _RunPlan:
    """The plan of one run: ``choose`` per round, ``threads`` of the round, ``round_clock`` to time it."""

    def __init__(self, planner: DraftPlanner, cost: CostModel, profile: AcceptanceProfile, Lmax: int,
                 state: Optional[_KeyState] = None, dev: Optional[torch.device] = None):
        self.planner, self.cost, self.profile, self.Lmax = planner, cost, profile, Lmax
        self.state = state if state is not None else _KeyState(cost, Lmax, planner.adaptive)
        self.adaptive = self.state.costs is not None
        self.dev = torch.device(dev) if dev is not None else torch.device("cpu")
        self.calibration_s = self.state.take_calibration_s()
        cost0, threads0 = self.state.best()
        self.prior_cost, self.prior_threads = list(cost0[:Lmax + 1]), list(threads0[:Lmax + 1])
        N = self._N = profile.N
        self._thirds = [dict(rounds=0, L_sum=0.0, acc_sum=0.0) for _ in range(3)]
        self._L_sum = np.zeros(N, dtype=np.int64)
        self._samples = np.zeros(N, dtype=np.int64)
        self._predicted = profile.rates().copy()
        self._pending: list = []          # CUDA: (L, threads, start event, end event) not yet read
        self._round_L: Optional[int] = None
        self._round_threads: Optional[int] = None
        self.timed = self.replanned = self.explored = 0
        # a sample advances at most L + 1 steps in a round drafting L: where no L beats a plain step by the
        # margin even at acceptance 1, the run never drafts (the batched demo on the CPU), and the sampler
        # runs plain steps without keeping the features a draft would start from
        c = self.prior_cost
        plain = (1.0 + planner.min_gain) / c[0]
        self.drafts_ever = any((1.0 + L) / c[L] > plain * (1.0 + 1e-9) for L in range(1, Lmax + 1))

    @property
    def round_cost(self) -> List[float]:
        """Seconds of a round per L as the plan sees them now (the cheapest thread count's)."""
        return list(self.state.best()[0][:self.Lmax + 1])

    def _argmax(self, steps: np.ndarray, cost: Sequence[float], count: int) -> int:
        best, best_rate = 0, count / cost[0] * (1.0 + self.planner.min_gain)  # drafting must beat plain by min_gain
        for L in range(1, self.Lmax + 1):
            rate = float(steps[L]) / cost[L]
            if rate > best_rate * (1.0 + 1e-9):
                best, best_rate = L, rate
        return best

    def choose(self, idx: np.ndarray) -> int:
        """Draft length for the next round of the live samples at respaced indices ``idx``."""
        if idx.size == 0:
            return 0
        self._collect()
        rates = self.profile.rates()
        cost, threads = self.state.best()
        L = L0 = 0
        if self.drafts_ever:
            steps = expected_steps_upto(rates, idx, self.Lmax).sum(axis=0)   # per L, summed over the samples
            L = self._argmax(steps, cost, idx.size)
            L0 = self._argmax(steps, self.prior_cost, idx.size) if self.adaptive else L
        n = threads[L]
        if self.adaptive:
            if (L, n) != (L0, self.prior_threads[L0]):
                self.replanned += 1
            m = self.state.explore(L, n, threads)
            self.explored += m != n
            n = m
        self._round_L, self._round_threads = L, n
        self._note(idx, rates, L)
        return L

    def _note(self, idx: np.ndarray, rates: np.ndarray, L: int) -> None:
        """Count the round in its third of the schedule and at its samples' indices (what free-sample reports)."""
        i = np.clip(idx, 0, self._N - 1)
        t = self._thirds[min(2, int(3 * (1.0 - float(np.mean(idx)) / max(self._N, 1))))]
        t["rounds"] += 1
        t["L_sum"] += L
        t["acc_sum"] += float(np.mean(rates[i]))
        np.add.at(self._L_sum, i, L)
        np.add.at(self._samples, i, 1)

    def threads(self, L: int) -> Optional[int]:
        """CPU intra-op threads to run a round drafting L at (None: leave the setting as it is)."""
        if L == self._round_L:
            return self._round_threads
        return self.state.best()[1][min(L, self.Lmax)]

    def round_clock(self, L: int, threads: Optional[int], full: bool = True):
        """A context manager the sampler wraps a round drafting L at ``threads`` in (``full``: every slot took
        part with every position; other rounds are not timed).  Frozen plans time nothing."""
        if not self.adaptive or not full:
            return _NULL_CLOCK
        return _RoundClock(self, L, threads)

    def observe(self, L: int, threads: Optional[int], seconds: float) -> None:
        """A round drafting L at ``threads`` intra-op threads (None: no thread choice) took ``seconds``."""
        if self.adaptive:
            self.state.costs.observe(int(L), threads, float(seconds))
            self.timed += 1

    def _collect(self) -> None:
        """CUDA: take in the rounds whose end event has completed (``query`` does not synchronise)."""
        while self._pending and self._pending[0][3].query():
            L, n, start, end = self._pending.pop(0)
            self.observe(L, n, start.elapsed_time(end) / 1e3)

    def finish(self) -> None:
        self._collect()
        self._pending.clear()
        if self.adaptive:
            self.profile.finish_run()
            self.state.write_back()

    def record(self) -> PlanRecord:
        cost, threads = self.state.best()
        p = self.state.prior
        costs = {}
        if p.parts_known():
            costs = {"verify_1_row_ms": 1e3 * p.verify_s[0], "draft_step_ms": 1e3 * p.draft_s,
                     "accept_ms": 1e3 * p.accept_s}
        costs.update({f"round_L{L}_ms": 1e3 * s for L, s in enumerate(cost[:self.Lmax + 1])})
        thirds = []
        for name, t in zip(("early", "middle", "late"), self._thirds):
            r = t["rounds"]
            thirds.append(dict(third=name, rounds=r, mean_L=t["L_sum"] / r if r else None,
                               predicted_acceptance=t["acc_sum"] / r if r else None))
        cpu = any(k is not None for k in threads)
        source = self.state.source + ("; following this run's round times" if self.adaptive else "; frozen")
        return PlanRecord(cost_source=source, profile_source=self.profile.source, costs_ms=costs, thirds=thirds,
                          threads_by_L=list(threads[:self.Lmax + 1]) if cpu else [], drafting_can_pay=self.drafts_ever,
                          mode="adaptive" if self.adaptive else "frozen", calibration_s=self.calibration_s,
                          prior_round_ms=[1e3 * s for s in self.prior_cost], timed_rounds=self.timed,
                          replanned_rounds=self.replanned, explored_rounds=self.explored,
                          predicted_acceptance_by_index=[round(float(a), 4) for a in self._predicted],
                          L_sum_by_index=self._L_sum.tolist(), samples_by_index=self._samples.tolist())

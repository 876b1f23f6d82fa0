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
* ``cost(L)`` comes from a :class:`CostModel`: whole sampler rounds timed for
  every L on this device, target, dtype, batch and guidance, cached
  on disk (``$FREE_KERNELS_CACHE`` or ``~/.cache/free_kernels``) under a key of
  those (``FREE_KERNELS_RECALIBRATE=1`` measures again, e.g. after a run on a
  busy machine), or a rows-proportional model when calibration is skipped
  (``calibrate=False`` or ``FREE_KERNELS_NO_CALIBRATION=1``).

On the CPU the calibration times every round at 1 intra-op thread and at the
thread count set (the cap; also half of it on machines with 4 or more), and
each L runs at the count that measured fastest: a plain step of one sample is
too small for threads to share, a round verifying L + 1 states per sample is
not (on the demo at 2 threads, about 1.6 ms per drafted step against 2.4 ms at
1 thread).  Each cost is the median of the timed passes (a shared machine adds
time, and now and then takes some away), made non-decreasing in L
(:func:`lower_envelope`).  The plan uses the calibrated costs alone
(two ways of following measured round times during a run misfired on the
noisy 2-core CPU, bench/RESULTS.md), so a seeded run reproduces (the thread
count of a round changes the last bits of its GEMMs); a machine that got busy
after the calibration needs ``FREE_KERNELS_RECALIBRATE=1``.

L = 0 is a plain ancestral step (one target row per sample, no drafting), so
a plan never costs more than the baseline beyond the one-off calibration.
Where no L could beat a plain step by the margin even if every draft were
accepted (a sample advances at most L + 1 steps in a round drafting L; the
batched demo on the CPU, whose forward costs in proportion to its rows), the
run is plain steps only (``_RunPlan.drafts_ever``): the sampler then keeps no
parent features and reads nothing back between rounds.

Exactness: the plan of a round depends only on what is known before the round
(indices, past accept counts, costs), never on that round's random numbers, so
every emitted step keeps the target transition's law (tests/test_planner.py
checks the distribution under an erratic planner too).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["AcceptanceProfile", "CostModel", "DraftPlanner", "PlanRecord", "check_draft_length"]


def check_draft_length(value, name: str = "draft_length"):
    """``"auto"`` or an int >= 1 (anything else: a ValueError naming ``name``)."""
    if isinstance(value, str) and value == "auto":
        return "auto"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise ValueError(f"{name} must be 'auto' or an int >= 1, got {value!r}")

DEFAULT_PRIOR = 0.75
# a round drafts only where its predicted steps per second beat a plain step's by this much: the measured
# costs are minima on a noisy machine and the acceptance a smoothed estimate (the demo at batch 10 on the
# 2-core CPU: L = 1 predicted 4% ahead of L = 0 measured 0.91x the baseline, L = 3 predicted 12% ahead ran
# 0.88-0.91x against 0.96-0.98x for plain steps); where drafting pays, it pays by far more (1.4-1.9x
# predicted early and mid-schedule at batch 1, where 0.1 and 0.2 measured the same 1.51x)
MIN_GAIN = 0.20
PRIOR_WEIGHT = 8.0   # pseudo-counts of the prior against the run's own counts


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


@dataclass
class CostModel:
    """Seconds of one round's parts on this device for one batch size and guidance setting."""

    key: str
    verify_s: List[float]            # verify_s[k]: target forward of G*B*(k+1) rows (calibration: k = 0 only)
    draft_s: float                   # one draft step of G*B rows (drafter + head + transition)
    accept_s: float                  # the accept op
    source: str = "calibrated"
    rounds_s: Optional[List[float]] = None  # measured whole rounds of the sampler, L = 0..Lmax (what is used)
    # CPU: every candidate intra-op thread count's rounds, L = 0..Lmax (keys str(n)); rounds_s is their minimum
    rounds_by_threads: Optional[Dict[str, List[float]]] = None

    def covers(self, Lmax: int) -> bool:
        """Does this model price every L in 0..Lmax?"""
        return len(self.rounds_s if self.rounds_s is not None else self.verify_s) >= Lmax + 1

    def round_s(self, L: int) -> float:
        if self.rounds_s is not None and L < len(self.rounds_s):
            return self.rounds_s[L]
        if L == 0:
            return self.verify_s[0] + self.accept_s
        return L * self.draft_s + self.verify_s[min(L, len(self.verify_s) - 1)] + self.accept_s

    def alternatives(self, Lmax: int) -> Dict[Optional[int], List[float]]:
        """{thread count (None: as set): seconds of a round for L = 0..Lmax} the plan may choose between."""
        if self.rounds_by_threads and all(len(v) > Lmax for v in self.rounds_by_threads.values()):
            return {int(k): [float(x) for x in v[:Lmax + 1]] for k, v in self.rounds_by_threads.items()}
        return {None: [self.round_s(L) for L in range(Lmax + 1)]}

    @classmethod
    def proportional(cls, Lmax: int, key: str = "rows-proportional") -> "CostModel":
        """Cost in proportion to rows, a draft step a third of a target row (used when calibration is skipped)."""
        return cls(key=key, verify_s=[float(k + 1) for k in range(Lmax + 1)], draft_s=1.0 / 3.0, accept_s=0.05,
                   source="rows-proportional (not calibrated)")


@dataclass
class PlanRecord:
    """What the planner chose, per third of the schedule, and why (``FreeStats.plan``)."""

    cost_source: str = ""
    profile_source: str = ""
    costs_ms: Dict[str, float] = field(default_factory=dict)
    # CPU: the intra-op thread count the rounds of each L ran at
    threads_by_L: List[Optional[int]] = field(default_factory=list)
    # per third (early / middle / late): rounds, mean L, mean predicted acceptance
    thirds: List[Dict[str, float]] = field(default_factory=list)
    # False: no L beats a plain step by the margin even at acceptance 1 (the run took plain steps only)
    drafting_can_pay: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


class DraftPlanner:
    """Chooses the draft length of each round (see the module docstring)."""

    def __init__(self, max_draft_length: int = 8, calibrate: bool = True, cache_dir: Optional[str] = None,
                 progress: bool = True, cost_model: Optional[CostModel] = None, min_gain: float = MIN_GAIN):
        if isinstance(max_draft_length, bool) or not isinstance(max_draft_length, (int, np.integer)) \
                or max_draft_length < 0:
            raise ValueError(f"max_draft_length must be an int >= 0, got {max_draft_length!r}")
        self.max_draft_length = int(max_draft_length)
        if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 0 <= min_gain < 10:
            raise ValueError(f"min_gain must be a number in [0, 10), got {min_gain!r}")
        self.min_gain = float(min_gain)
        self.calibrate = bool(calibrate) and os.environ.get("FREE_KERNELS_NO_CALIBRATION", "0") != "1"
        self.cache_dir = cache_dir
        self.progress = progress
        self.fixed_cost = cost_model
        self._memory: Dict[str, CostModel] = {}
        self._profiles: Dict[tuple, AcceptanceProfile] = {}
        if os.environ.get("FREE_KERNELS_RECALIBRATE", "0") == "1":
            self.recalibrate = True
        else:
            self.recalibrate = False

    # ------------------------------------------------------------ per run
    def start(self, sampler, B: int, G: int, dev: torch.device) -> "_RunPlan":
        Lmax = min(self.max_draft_length, sampler.max_useful_draft_length)
        cost = self.fixed_cost or self._cost_model(sampler, B, G, dev, Lmax)
        prior = None
        extra = getattr(sampler.drafter, "extra", None)
        if isinstance(extra, dict):
            prof = extra.get("acceptance_profile")
            if isinstance(prof, dict) and prof:
                # the profile measured closest to this schedule length
                n = sampler.diffusion.num_timesteps
                k = min(prof, key=lambda s: abs(int(s) - n))
                prior = prof[k]
            elif isinstance(prof, (list, tuple)) and prof:
                prior = prof
        N = sampler.diffusion.num_timesteps
        key = (N, id(sampler.drafter))
        profile = self._profiles.get(key)
        if profile is None:
            profile = self._profiles[key] = AcceptanceProfile(N, prior)
        return _RunPlan(self, cost, profile, Lmax)

    def _cost_model(self, sampler, B, G, dev, Lmax) -> CostModel:
        key = cost_key(sampler, B, G, dev)
        mem = self._memory.get(key)
        if mem is not None and mem.covers(Lmax):
            return mem
        cm = self._cost_model_uncached(sampler, B, G, dev, Lmax, key)
        self._memory[key] = cm
        return cm

    def _cost_model_uncached(self, sampler, B, G, dev, Lmax, key) -> CostModel:
        path = os.path.join(self.cache_dir or default_cache_dir(), "cost_models.json")
        cached = None if self.recalibrate else _read_cache(path).get(key)
        if cached is not None:
            cm = CostModel(**{**cached, "source": f"cached ({path})"})
            if cm.covers(Lmax):
                return cm
        if not self.calibrate:
            return CostModel.proportional(Lmax)
        cm = calibrate(sampler, B, G, dev, Lmax, key, progress=self.progress)
        _write_cache(path, key, asdict(cm))
        return cm


class _RunPlan:
    def __init__(self, planner: DraftPlanner, cost: CostModel, profile: AcceptanceProfile, Lmax: int):
        self.planner, self.cost, self.profile, self.Lmax = planner, cost, profile, Lmax
        # per L the cheapest thread count's calibrated seconds, and that count (None: as set)
        alt = cost.alternatives(Lmax)
        self._threads = [min(alt, key=lambda n: alt[n][L]) for L in range(Lmax + 1)]
        self.round_cost = [alt[k][L] for L, k in enumerate(self._threads)]
        N = profile.N
        self._thirds = [dict(rounds=0, L_sum=0.0, acc_sum=0.0) for _ in range(3)]
        self._N = N
        # a sample advances at most L + 1 steps in a round drafting L: where no L beats a plain step by the
        # margin even at acceptance 1, the run never drafts (the batched demo on the CPU), and the sampler
        # runs plain steps without keeping the features a draft would start from
        plain = (1.0 + planner.min_gain) / self.round_cost[0]
        self.drafts_ever = any((1.0 + L) / self.round_cost[L] > plain * (1.0 + 1e-9) for L in range(1, Lmax + 1))

    def choose(self, idx: np.ndarray) -> int:
        """Draft length for the next round of the live samples at respaced indices ``idx``."""
        if idx.size == 0:
            return 0
        rates = self.profile.rates()
        if not self.drafts_ever:
            self._note(idx, rates, 0)
            return 0
        steps = expected_steps_upto(rates, idx, self.Lmax).sum(axis=0)   # per L, summed over the samples
        plain = float(idx.size) / self.round_cost[0]
        best, best_rate = 0, plain * (1.0 + self.planner.min_gain)  # drafting must beat a plain step by min_gain
        for L in range(1, self.Lmax + 1):
            rate = float(steps[L]) / self.round_cost[L]
            if rate > best_rate * (1.0 + 1e-9):
                best, best_rate = L, rate
        self._note(idx, rates, best)
        return best

    def _note(self, idx: np.ndarray, rates: np.ndarray, L: int) -> None:
        """Count the round in its third of the schedule (what free-sample reports)."""
        t = self._thirds[min(2, int(3 * (1.0 - float(np.mean(idx)) / max(self._N, 1))))]
        t["rounds"] += 1
        t["L_sum"] += L
        t["acc_sum"] += float(np.mean(rates[np.clip(idx, 0, self._N - 1)]))

    def threads(self, L: int) -> Optional[int]:
        """CPU intra-op threads to run a round drafting L at (None: leave the setting as it is)."""
        return self._threads[min(L, self.Lmax)]

    def finish(self) -> None:
        self.profile.finish_run()

    def record(self) -> PlanRecord:
        c = self.cost
        costs = {"verify_1_row_ms": 1e3 * c.verify_s[0], "draft_step_ms": 1e3 * c.draft_s, "accept_ms": 1e3 * c.accept_s}
        costs.update({f"round_L{L}_ms": 1e3 * s for L, s in enumerate(self.round_cost)})
        thirds = []
        for name, t in zip(("early", "middle", "late"), self._thirds):
            r = t["rounds"]
            thirds.append(dict(third=name, rounds=r, mean_L=t["L_sum"] / r if r else None,
                               predicted_acceptance=t["acc_sum"] / r if r else None))
        cpu = any(k is not None for k in self._threads)
        return PlanRecord(cost_source=c.source, profile_source=self.profile.source, costs_ms=costs, thirds=thirds,
                          threads_by_L=list(self._threads) if cpu else [], drafting_can_pay=self.drafts_ever)


# ------------------------------------------------------------ calibration
def default_cache_dir() -> str:
    return os.environ.get("FREE_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "free_kernels")


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo) and the vector ISA torch's CPU kernels use: two machines
    that both call themselves x86_64 (an AVX2 and an AVX-512 one) differ about 2x in a GEMM."""
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cap = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "?")()
    return f"{name or platform.machine()} ({cap})"


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("free-kernels")
    except PackageNotFoundError:
        return "?"


def _host_epilogue() -> bool:
    """Whether a CPU draft step can take the draft epilogue's host kernel: it is built, and no backend
    override (``FREE_KERNELS_BACKEND[_DRAFT_TRANSITION]``) asks for another one."""
    from . import _env
    from .ops.draft_transition import OP

    return _env.host_entry_unavailable_reason("draft_epilogue_host") is None and OP.requested(None) in (None, "cpu")


def cost_key(sampler, B: int, G: int, dev: torch.device) -> str:
    """Device (on the CPU its model, vector ISA, thread count and whether the draft epilogue's host kernel
    is built), target (signature, size, dtype), drafter type, batch, guidance, layout, torch and free_kernels
    versions."""
    t = sampler.target
    params = [p for p in t.parameters()] if isinstance(t, torch.nn.Module) else []
    sig = dict(cls=type(t).__name__, n_params=sum(p.numel() for p in params),
               dtype=str(params[0].dtype) if params else "?",
               shape=[int(getattr(t, a, 0)) for a in ("in_channels", "input_size", "patch_size", "hidden_size")],
               drafter=type(sampler.drafter).__name__,
               drafter_params=sum(p.numel() for p in sampler.drafter.parameters())
               if isinstance(sampler.drafter, torch.nn.Module) else 0)
    raw = json.dumps(dict(format=COST_FORMAT, device=_device_name(dev), target=sig, B=B, G=G, layout=sampler.layout,
                          torch=torch.__version__, package=_package_version(),
                          # a CPU round's cost depends on the intra-op thread count as much as on the device
                          threads=torch.get_num_threads() if dev.type == "cpu" else None,
                          cpu=_cpu_model() if dev.type == "cpu" else None,
                          # a draft step on the CPU costs ~2x more without the draft epilogue's host kernel
                          host_epilogue=_host_epilogue() if dev.type == "cpu" else None), sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


@contextlib.contextmanager
def intra_op_threads(n: Optional[int]):
    """Run the block with ``n`` torch intra-op (CPU) threads, restoring the setting after (None: as set)."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


CALIBRATION_REPS = 5  # timed passes over every (L, threads); the median counts (noise has dips as well as spikes)
# 2, 3: CPU rounds timed at several intra-op thread counts (3: no derived per-L thread list); 4: medians of passes
COST_FORMAT = 4


def thread_candidates(dev: torch.device) -> List[Optional[int]]:
    """Intra-op thread counts a CPU round is timed at: 1 (small rounds: no synchronisation), the count set
    (torch.get_num_threads(), the cap) and half of it on larger machines; [None] on other devices."""
    if dev.type != "cpu":
        return [None]
    n = torch.get_num_threads()
    return sorted({1, n, max(n // 2, 1) if n >= 4 else 1})


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: str, key: str, value: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        d = _read_cache(path)
        d[key] = value
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(d, f)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only means calibrating again next time


def _timeit(fn, dev: torch.device, reps: int = 5) -> float:
    """Fastest of ``reps`` runs: the least disturbed by other work on the machine."""
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        ts.append(time.perf_counter() - t0)
    return float(min(ts))


@torch.no_grad()
def calibrate(sampler, B: int, G: int, dev: torch.device, Lmax: int, key: str, progress: bool = True) -> CostModel:
    """Time whole sampler rounds for L = 0..Lmax at every candidate CPU thread count (the plan uses these),
    and the parts (a target forward, a draft step, the accept op) for the printout."""
    t0 = time.perf_counter()
    if progress:
        print(f"free_kernels: calibrating the draft planner's cost model ({_device_name(dev)}, batch {B}"
              f"{', CFG' if G > 1 else ''}; cached afterwards) ...", end="", file=sys.stderr, flush=True)
    threads = thread_candidates(dev)
    grid = [lower_envelope(r) for r in measure_rounds(sampler, B, G, dev, Lmax, reps=CALIBRATION_REPS,
                                                      threads=threads)]
    pick = [min(range(len(threads)), key=lambda k: grid[k][L]) for L in range(Lmax + 1)]
    # the parts, for the explanation the planner prints (at the threads of a round drafting one step)
    with intra_op_threads(threads[pick[min(1, Lmax)]]):
        draft_s, verify, accept_s = _time_parts(sampler, B, G, dev, Lmax)
    if progress:
        print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return CostModel(key=key, verify_s=verify, draft_s=draft_s, accept_s=accept_s,
                     rounds_s=[grid[k][L] for L, k in enumerate(pick)],
                     rounds_by_threads={str(n): grid[k] for k, n in enumerate(threads)} if dev.type == "cpu" else None)


def lower_envelope(seconds: Sequence[float]) -> List[float]:
    """Round costs made non-decreasing in L from above: a round drafting more is never cheaper, so a cost above
    a longer round's is a disturbed measurement (a shared machine only ever adds time) and takes that value."""
    out = [float(x) for x in seconds]
    for L in range(len(out) - 2, -1, -1):
        out[L] = min(out[L], out[L + 1])
    return out


def _time_parts(sampler, B: int, G: int, dev: torch.device, Lmax: int):
    """(draft step, [target forward of G*B rows], accept op) seconds: what the planner's printout explains."""
    from . import ops

    t = sampler.target
    C, S = int(t.in_channels), int(t.input_size)
    mdt = next(t.parameters()).dtype if isinstance(t, torch.nn.Module) else torch.float32
    T = int(sampler.original_timesteps[-1])
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(G * B, C, S, S, generator=g).to(dev, mdt)
    tt = torch.full((G * B,), T, device=dev, dtype=torch.int64)
    yy = torch.zeros(G * B, device=dev, dtype=torch.int64)
    verify = [_timeit(lambda: t.forward_head(*t.forward_features(x, tt, yy)), dev)]
    h, _ = t.forward_features(x, tt, yy)
    idx = torch.full((B,), len(sampler.original_timesteps) - 1, device=dev, dtype=torch.int64)
    xs = torch.randn(B, C, S, S, generator=g).to(dev)
    noise = torch.randn(B, C, S, S, generator=g).to(dev)

    def draft():
        condition = getattr(sampler.drafter, "draft_condition", None)
        c = condition(tt, yy) if callable(condition) else t.embed_condition(tt, yy)
        hn = ops.drafter_forward(sampler.drafter, h, x, tt, yy, t_next=tt, c=c)
        ops.draft_transition(t, sampler.diffusion, hn, c, xs, idx, noise, cfg_scale=2.0 if G > 1 else 1.0)

    draft_s = _timeit(draft, dev)
    L = max(Lmax, 1)
    D = C * S * S
    mp = torch.randn(B, L + 1, D, generator=g).to(dev)
    lv = torch.full((B, L + 1, D), -3.0, device=dev)
    mq = torch.randn(B, L, D, generator=g).to(dev)
    nq = torch.randn(B, L, D, generator=g).to(dev)
    nd = torch.full((B,), L, device=dev, dtype=torch.int64)
    det = torch.zeros(B, dtype=torch.bool, device=dev)
    rs = torch.tensor([1, 0], dtype=torch.int64, device=dev)
    accept_s = _timeit(lambda: ops.speculative_accept(mp, lv, mq, lv[:, :L], nq, nd, det,
                                                      equal_variance=sampler.equal_variance, rng_state=rs), dev)
    return draft_s, verify, accept_s


def measure_rounds(sampler, B: int, G: int, dev: torch.device, Lmax: int, reps: int = 3,
                   threads: Sequence[Optional[int]] = (None,)) -> List[List[float]]:
    """Seconds of one whole sampler round with L = 0..Lmax drafts, median of ``reps`` each, per CPU thread
    count in ``threads``: timed by the sampler itself (``sampler.measure_rounds``; the planner knows nothing
    of how a round is run)."""
    return sampler.measure_rounds(B, G, dev, Lmax, reps=reps, threads=threads)

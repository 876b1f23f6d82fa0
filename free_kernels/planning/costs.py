"""Round costs the draft planner plans with: a prior (:class:`CostModel`) and what the run's rounds measure
(:class:`RoundCosts`).

A *round* drafting L steps costs the sampler L draft steps, one target forward of G*B*(L + 1) rows, the accept
op, randomness and bookkeeping; L = 0 is a plain ancestral step.  On the CPU the same round costs differently
at 1 intra-op thread and at all of them, so costs are kept per thread count (``None``: devices without a
thread choice).

:class:`RoundCosts` starts from the prior's curve per thread count and corrects it with the rounds timed
during runs: for every (thread count, L) it keeps the last :data:`WINDOW` timings and their median's ratio to
the prior; the estimate of a round is the prior times that ratio, linearly interpolated over L between the
draft lengths timed at that thread count (held constant beyond them; 1 where none was timed).  So a core that
got busy (every 2-thread round 3x slower) moves every 2-thread estimate after a few rounds, a prior whose shape
was wrong in L is corrected where the plan goes, and a thread count never tried keeps its prior until tried.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

WINDOW = 5   # timings kept per (thread count, L): the median of the last few follows a load change in ~3 rounds


@dataclass
class CostModel:
    """Seconds of a round on this device for one batch size and guidance setting (the plan's prior)."""

    key: str
    verify_s: List[float]            # verify_s[k]: target forward of G*B*(k+1) rows (calibration: k = 0 only)
    draft_s: float                   # one draft step of G*B rows (drafter + head + transition)
    accept_s: float                  # the accept op
    source: str = "calibrated"
    rounds_s: Optional[List[float]] = None  # whole rounds of the sampler, L = 0..Lmax (what is used)
    # CPU: every candidate intra-op thread count's rounds, L = 0..Lmax (keys str(n)); rounds_s is their minimum
    rounds_by_threads: Optional[Dict[str, List[float]]] = None

    def covers(self, Lmax: int) -> bool:
        """Does this model price every L in 0..Lmax?"""
        if self.rounds_by_threads:
            return all(len(v) >= Lmax + 1 for v in self.rounds_by_threads.values())
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

    def parts_known(self) -> bool:
        return all(math.isfinite(x) for x in (self.verify_s[0], self.draft_s, self.accept_s))

    @classmethod
    def from_rounds(cls, key: str, rounds: Dict[Optional[int], Sequence[float]], source: str,
                    parts_ms: Optional[dict] = None) -> "CostModel":
        """A model of whole-round costs per thread count (``None``: no thread choice) and, if known, the parts."""
        curves = {n: [float(x) for x in v] for n, v in rounds.items()}
        Lmax = min(len(v) for v in curves.values()) - 1
        best = [min(v[L] for v in curves.values()) for L in range(Lmax + 1)]
        p = parts_ms or {}
        nan = float("nan")
        return cls(key=key, verify_s=[p.get("verify_1_row_ms", nan) / 1e3], draft_s=p.get("draft_step_ms", nan) / 1e3,
                   accept_s=p.get("accept_ms", nan) / 1e3, source=source, rounds_s=best,
                   rounds_by_threads=None if None in curves else {str(n): v for n, v in curves.items()})

    @classmethod
    def proportional(cls, Lmax: int, key: str = "rows-proportional") -> "CostModel":
        """Cost in proportion to rows, a draft step a third of a target row (a model for tests)."""
        return cls(key=key, verify_s=[float(k + 1) for k in range(Lmax + 1)], draft_s=1.0 / 3.0, accept_s=0.05,
                   source="rows-proportional (not calibrated)")

    @classmethod
    def uncalibrated(cls, Lmax: int, B: int, key: str = "uncalibrated") -> "CostModel":
        """The prior when nothing was measured (``FREE_KERNELS_NO_CALIBRATION=1`` and no cached costs): a round
        drafting L costs 1 + L * B / 4 plain rounds.  At batch 1 drafting then pays where drafts are accepted
        about half the time or more, and the run's own round times correct the curve within a few rounds; at
        batch 4 and above no L can beat a plain step on this prior, so the run takes plain steps: never slower
        than the baseline, and never drafting where only a measurement could show that it pays."""
        rounds = [1.0 + L * B / 4.0 for L in range(Lmax + 1)]
        return cls(key=key, verify_s=[float("nan")], draft_s=float("nan"), accept_s=float("nan"),
                   source=f"uncalibrated prior (a round drafting L costs 1 + L*{B}/4 plain rounds)", rounds_s=rounds)


class RoundCosts:
    """Round costs per (thread count, L): a prior corrected by timed rounds (see the module docstring)."""

    def __init__(self, prior: Dict[Optional[int], Sequence[float]], Lmax: int):
        self.Lmax = int(Lmax)
        self.prior = {n: np.asarray(list(v)[:Lmax + 1], dtype=np.float64) for n, v in prior.items()}
        if any(len(v) != Lmax + 1 or not np.all(v > 0) for v in self.prior.values()):
            raise ValueError("a cost prior needs a positive cost for every L in 0..Lmax")
        self._times = {n: [deque(maxlen=WINDOW) for _ in range(Lmax + 1)] for n in self.prior}
        self._ratio = {n: np.full(Lmax + 1, np.nan) for n in self.prior}
        self._best: Optional[Tuple[List[float], List[Optional[int]]]] = None
        self.timed = 0   # timings taken in

    @property
    def options(self) -> List[Optional[int]]:
        return list(self.prior)

    def key_of(self, threads: Optional[int]) -> Optional[object]:
        """The option a round run at ``threads`` counts for (None if it counts for none)."""
        if threads in self.prior:
            return threads
        if None in self.prior:
            return None
        return _MISSING

    def observe(self, L: int, threads: Optional[int], seconds: float) -> None:
        """A round drafting L at ``threads`` took ``seconds`` (rounds at a thread count not planned for, or
        timings that are not a positive finite number, are ignored)."""
        n = self.key_of(threads)
        if n is _MISSING or not 0 <= L <= self.Lmax or not (isinstance(seconds, float) or isinstance(seconds, int)) \
                or not math.isfinite(seconds) or seconds <= 0:
            return
        d = self._times[n][L]
        d.append(float(seconds))
        self._ratio[n][L] = float(np.median(d)) / self.prior[n][L]
        self._best = None
        self.timed += 1

    def timings(self, threads: Optional[int], L: int) -> int:
        n = self.key_of(threads)
        return 0 if n is _MISSING else len(self._times[n][L])

    def estimates(self) -> Dict[Optional[int], np.ndarray]:
        """Seconds of a round per thread count and L, as the plan sees them now."""
        out = {}
        grid = np.arange(self.Lmax + 1)
        for n, prior in self.prior.items():
            r = self._ratio[n]
            known = np.nonzero(np.isfinite(r))[0]
            ratio = np.interp(grid, known, r[known]) if known.size else np.ones_like(prior)
            out[n] = prior * ratio
        return out

    def best(self) -> Tuple[List[float], List[Optional[int]]]:
        """(per L the cheapest estimate, the thread count it is at)."""
        if self._best is None:
            est = self.estimates()
            threads = [min(est, key=lambda n: est[n][L]) for L in range(self.Lmax + 1)]
            self._best = ([float(est[n][L]) for L, n in enumerate(threads)], threads)
        return self._best


class _Missing:
    def __repr__(self) -> str:
        return "<no option>"


_MISSING = _Missing()

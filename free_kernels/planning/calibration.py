"""The draft planner's calibration: a few whole sampler rounds timed before a setting's first run.

Only the draft lengths that matter are timed, at every candidate CPU thread count: L = 0 (a plain step),
L = 1 and one longer round, the shortest L that reaches 90% of the extra steps per round the acceptance
profile makes attainable (:func:`calibration_lengths`; at batch 3 and above at most L = 2, at batch 2 at most
L = 4: a long round of a large batch costs many plain ones).  The other lengths are interpolated linearly
between the timed ones and extrapolated past the last (:func:`complete_curve`); the run's own rounds then
correct the curve where the plan goes (:class:`~free_kernels.planning.costs.RoundCosts`).  Each length is
timed :data:`CALIBRATION_REPS` times after one warm-up pass (the median counts), plus the parts a printout
explains (a target forward, a draft step, the accept op).  A progress line on stderr shows it and its
seconds, which :func:`calibrate` returns so that a caller can count them.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .cache import device_name
from .costs import CostModel

CALIBRATION_REPS = 2   # timed passes per (L, threads) after one warm-up pass; the median (= mean of two) counts
PARTS_REPS = 2


def thread_candidates(dev: torch.device) -> List[Optional[int]]:
    """Intra-op thread counts a CPU round is timed at: 1 (small rounds: no synchronisation), the count set
    (torch.get_num_threads(), the cap) and half of it on larger machines; [None] on other devices."""
    if dev.type != "cpu":
        return [None]
    n = torch.get_num_threads()
    return sorted({1, n, max(n // 2, 1) if n >= 4 else 1})


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


def lower_envelope(seconds: Sequence[float]) -> List[float]:
    """Round costs made non-decreasing in L from above: a round drafting more is never cheaper, so a cost above
    a longer round's is a disturbed measurement (a shared machine only ever adds time) and takes that value."""
    out = [float(x) for x in seconds]
    for L in range(len(out) - 2, -1, -1):
        out[L] = min(out[L], out[L + 1])
    return out


def calibration_lengths(expected: np.ndarray, B: int) -> List[int]:
    """The draft lengths to time: 0, 1 and the shortest L whose expected steps per round (``expected[L]``,
    L = 0..Lmax, from the acceptance profile) reach 90% of the way from L = 1 to Lmax, capped at 8 // B (at
    least 2): past it a longer round buys little, and a long round of a large batch is expensive to time."""
    Lmax = len(expected) - 1
    if Lmax <= 2:
        return list(range(Lmax + 1))
    goal = expected[1] + 0.9 * (expected[Lmax] - expected[1])
    top = next((L for L in range(2, Lmax + 1) if expected[L] >= goal - 1e-12), Lmax)
    return [0, 1, int(min(top, max(2, 8 // max(int(B), 1))))]


def complete_curve(lengths: Sequence[int], seconds: Sequence[float], Lmax: int) -> List[float]:
    """Round costs for L = 0..Lmax from the timed ``lengths`` (sorted, starting 0, 1): linear between timed
    lengths >= 1, extrapolated past the last with the slope of the last two (never negative), then
    :func:`lower_envelope`."""
    Ls = [int(L) for L in lengths]
    ys = [float(s) for s in seconds]
    out = []
    for L in range(Lmax + 1):
        if L in Ls:
            out.append(ys[Ls.index(L)])
            continue
        hi = [k for k, x in enumerate(Ls) if x > L and x >= 1]
        lo = [k for k, x in enumerate(Ls) if x < L and x >= 1]
        if hi and lo:
            a, b = lo[-1], hi[0]
            out.append(ys[a] + (ys[b] - ys[a]) * (L - Ls[a]) / (Ls[b] - Ls[a]))
        else:  # past the last timed length
            a, b = (lo[-2], lo[-1]) if len(lo) >= 2 else (0, lo[-1])
            slope = max((ys[b] - ys[a]) / (Ls[b] - Ls[a]), 0.0)
            out.append(ys[b] + slope * (L - Ls[b]))
    return lower_envelope(out)


def _progress(total: int, desc: str, on: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="round", disable=not on, file=sys.stderr, leave=True)


@torch.no_grad()
def calibrate(sampler, B: int, G: int, dev: torch.device, Lmax: int, expected: np.ndarray, key: str,
              progress: bool = True) -> Tuple[CostModel, float]:
    """Time whole sampler rounds (:func:`calibration_lengths`) at every candidate CPU thread count and the parts
    for the printout; returns (the cost model for L = 0..Lmax, seconds it took)."""
    t0 = time.perf_counter()
    threads = thread_candidates(dev)
    lengths = calibration_lengths(np.asarray(expected, dtype=np.float64)[:Lmax + 1], B) if Lmax else [0]
    total = (CALIBRATION_REPS + 1) * len(lengths) * len(threads) + 3 * (PARTS_REPS + 1)
    bar = _progress(total, f"free_kernels: calibrating the draft planner ({device_name(dev)}, batch {B}"
                           f"{', CFG' if G > 1 else ''}; L {', '.join(map(str, lengths))})", progress)
    try:
        grid = sampler.measure_rounds(B, G, dev, Lmax, reps=CALIBRATION_REPS, threads=threads, lengths=lengths,
                                      tick=bar.update)
        curves = {n: complete_curve(lengths, grid[k], Lmax) for k, n in enumerate(threads)}
        # the parts, for the explanation the planner prints (at the threads of the cheapest round drafting one)
        pick = min(curves, key=lambda n: curves[n][min(1, Lmax)])
        with intra_op_threads(pick):
            draft_s, verify_s, accept_s = _time_parts(sampler, B, G, dev, Lmax, bar.update)
        seconds = time.perf_counter() - t0
        bar.set_postfix_str(f"{seconds:.1f} s, cached afterwards", refresh=True)
    finally:
        bar.close()
    parts = dict(verify_1_row_ms=1e3 * verify_s, draft_step_ms=1e3 * draft_s, accept_ms=1e3 * accept_s)
    return CostModel.from_rounds(key, curves, f"calibrated now ({seconds:.1f} s)", parts), seconds


def _timeit(fn, dev: torch.device, tick, reps: int = PARTS_REPS) -> float:
    """Median of ``reps`` runs after a warm-up."""
    ts = []
    for r in range(reps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if r:
            ts.append(time.perf_counter() - t0)
        tick()
    return max(float(np.median(ts)), 1e-9)


def _time_parts(sampler, B: int, G: int, dev: torch.device, Lmax: int, tick):
    """(draft step, target forward of G*B rows, accept op) seconds: what the planner's printout explains."""
    from .. import ops

    t = sampler.target
    C, S = int(t.in_channels), int(t.input_size)
    mdt = next(t.parameters()).dtype if isinstance(t, torch.nn.Module) else torch.float32
    T = int(sampler.original_timesteps[-1])
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(G * B, C, S, S, generator=g).to(dev, mdt)
    tt = torch.full((G * B,), T, device=dev, dtype=torch.int64)
    yy = torch.zeros(G * B, device=dev, dtype=torch.int64)
    verify = _timeit(lambda: t.forward_head(*t.forward_features(x, tt, yy)), dev, tick)
    h, _ = t.forward_features(x, tt, yy)
    idx = torch.full((B,), len(sampler.original_timesteps) - 1, device=dev, dtype=torch.int64)
    xs = torch.randn(B, C, S, S, generator=g).to(dev)
    noise = torch.randn(B, C, S, S, generator=g).to(dev)

    def draft():
        condition = getattr(sampler.drafter, "draft_condition", None)
        c = condition(tt, yy) if callable(condition) else t.embed_condition(tt, yy)
        hn = ops.drafter_forward(sampler.drafter, h, x, tt, yy, t_next=tt, c=c)
        ops.draft_transition(t, sampler.diffusion, hn, c, xs, idx, noise, cfg_scale=2.0 if G > 1 else 1.0)

    draft_s = _timeit(draft, dev, tick)
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
                                                      equal_variance=sampler.equal_variance, rng_state=rs), dev, tick)
    return draft_s, verify, accept_s

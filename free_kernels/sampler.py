"""The FREE sampler: draft, verify in one batched multi-timestep target call, accept exactly.

A thin composition of the op families (``free_kernels.ops``):
``drafter_forward`` / ``draft_transition`` (drafting), ``verify_attention``
(inside the target's forward) / ``verify_transition`` (the target's own
transition of the verified states) and ``speculative_accept`` (acceptance and
residual resampling).  See ``docs/method.md`` for the rule and
the README for the guarantees.

The round is a device program.  All run state lives in device tensors of a
fixed slot layout (B slots, L + 1 draft positions): each slot's respaced index,
its feature-valid flag, its parent features, its draw counter and the
statistics accumulators; round buffers (parents, drafted transitions, target
transitions, noise) are allocated once per shape and written through ``out=``.
Randomness is keyed per sample (see :mod:`free_kernels.reference.philox`), so
a sample's result depends only on its own seed, never on its slot or its
neighbours.  (On the CPU, per-sample generators: a residual that needs more
than the round's K candidates goes on drawing from its own sample's stream.
Keyed Philox, the CUDA default: the accept kernel draws candidates past the K
from the run's counter-based ``rng_state``, which the batch shares; such a
sample's result may depend on its slot.)  The host reads one small tensor per
check (every ``check_every`` rounds): which slots are still running; after a
compact round of plain steps (nothing drafted) it reads nothing, every slot
having advanced one step.

Two layouts of the same round:

* ``static`` (CUDA default): every slot and every draft position is computed
  each round (finished slots and positions past a slot's last step are masked),
  so shapes never change: the round is captured once per (batch, L) as a CUDA
  graph and replayed, and ``torch.compile(fullgraph=True)`` traces it whole.
* ``compact`` (CPU default): the check also tells the host which slots and
  positions are live, and only those rows reach the drafter and the target
  (a CPU forward costs in proportion to its rows).

``sample`` runs a fixed batch; ``sample_stream`` keeps the batch full from an
iterator of requests (continuous batching).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import ops
from ._checks import check_finite, check_tensor
from .diffusion.gaussian_diffusion import GaussianDiffusion, ModelMeanType, ModelVarType
from .models.drafter import FeatureDrafter
from .nvtx import nvtx_phase
from .planner import DraftPlanner, check_draft_length, check_plan, intra_op_threads, merge_plans
from .reference.philox import keyed_parts
from .relax import RelaxPolicy, as_policy

__all__ = ["FreeSampler", "FreeStats", "StreamResult"]

# Philox tags of the per-sample streams (reference/philox.py): one per kind of draw, so that a
# draw does not depend on how many numbers of the other kinds a round needed
_TAG_DRAFT, _TAG_BONUS, _TAG_RESID, _TAG_U_ACCEPT, _TAG_U_RESID = 1, 2, 3, 4, 5


@dataclass
class FreeStats:
    """What a FREE run did and where the time went.  ``as_dict()`` is JSON-serialisable."""

    mode: str = "exact"
    batch_size: int = 0
    num_steps: int = 0
    draft_length: int = 0
    target_calls: int = 0          # batched target forwards (one per round)
    drafter_calls: int = 0         # batched drafter forwards
    rounds: int = 0
    target_rows: int = 0           # rows evaluated by the target (CFG doubling excluded)
    drafter_rows: int = 0
    sample_rounds: List[int] = field(default_factory=list)   # rounds each sample took part in
    steps_per_sample: List[int] = field(default_factory=list)
    accepted_by_index: List[int] = field(default_factory=list)  # accepted drafts per respaced index
    proposed_by_index: List[int] = field(default_factory=list)  # judged drafts per respaced index
    residual_rejections: int = 0   # drafts rejected -> residual sample drawn
    residual_candidates: int = 0   # candidates drawn by the unequal-variance residual sampler
    residual_max_candidates: int = 0
    residual_fallbacks: int = 0    # residual sampler hit its cap (see README)
    time_draft_s: float = 0.0      # per-phase times: always on CPU, on CUDA only with profile=True
    time_verify_s: float = 0.0
    time_accept_s: float = 0.0
    time_total_s: float = 0.0
    host_reads: int = 0            # device -> host reads made by the sampler (checks)
    layout: str = ""               # "static" or "compact"
    graphs: str = "off"            # CUDA graphs: "off", "replayed", or why they were not used
    relax: Optional[str] = None
    draft_length_mode: str = "fixed"  # "fixed" or "auto" (planner)
    rounds_by_draft_length: List[int] = field(default_factory=list)  # rounds that drafted L = 0, 1, ...
    plan: Optional[dict] = None    # auto: costs, profile source, choices per third (planner.PlanRecord)

    @property
    def steps_per_target_call(self) -> float:
        """Denoising steps per target evaluation, per sample: sum of steps / sum of rounds taken part in."""
        r = sum(self.sample_rounds)
        return float(sum(self.steps_per_sample)) / r if r else 0.0

    @property
    def acceptance_by_index(self) -> List[Optional[float]]:
        return [a / p if p else None for a, p in zip(self.accepted_by_index, self.proposed_by_index)]

    @property
    def acceptance_rate(self) -> Optional[float]:
        p = sum(self.proposed_by_index)
        return sum(self.accepted_by_index) / p if p else None

    def acceptance_in_range(self, lo: float, hi: float) -> Optional[float]:
        """Acceptance over respaced indices in [lo, hi) as fractions of the schedule (1 = start, noisy)."""
        n = len(self.proposed_by_index)
        sel = [i for i in range(n) if lo <= i / max(n, 1) < hi]
        p = sum(self.proposed_by_index[i] for i in sel)
        return sum(self.accepted_by_index[i] for i in sel) / p if p else None

    @classmethod
    def merged(cls, parts: List["FreeStats"]) -> "FreeStats":
        """The stats of several runs of one sampler setting as one record (counts add, per-sample lists join)."""
        if not parts:
            return cls()
        out = FreeStats(**{**asdict(parts[0]), "plan": None})
        out.batch_size = max(p.batch_size for p in parts)
        for name in ("target_calls", "drafter_calls", "rounds", "target_rows", "drafter_rows", "residual_rejections",
                     "residual_candidates", "residual_fallbacks", "time_draft_s", "time_verify_s", "time_accept_s",
                     "time_total_s", "host_reads"):
            setattr(out, name, sum(getattr(p, name) for p in parts))
        out.residual_max_candidates = max(p.residual_max_candidates for p in parts)
        for name in ("sample_rounds", "steps_per_sample"):
            setattr(out, name, [v for p in parts for v in getattr(p, name)])
        for name in ("accepted_by_index", "proposed_by_index", "rounds_by_draft_length"):
            setattr(out, name, [sum(v) for v in zip(*(getattr(p, name) for p in parts))])
        out.plan = merge_plans([p.plan for p in parts])  # planner: counts add, costs are the last run's
        return out

    def as_dict(self) -> Dict:
        d = asdict(self)
        d["steps_per_target_call"] = self.steps_per_target_call
        d["acceptance_rate"] = self.acceptance_rate
        d["acceptance_by_index"] = self.acceptance_by_index
        d["acceptance_early_middle_late"] = [
            self.acceptance_in_range(2 / 3, 1.01), self.acceptance_in_range(1 / 3, 2 / 3),
            self.acceptance_in_range(0, 1 / 3),
        ]
        json.dumps(d)  # guarantee serialisable
        return d


@dataclass
class StreamResult:
    """One finished request of :meth:`FreeSampler.sample_stream`."""

    index: int            # position of the request in the input iterator
    seed: int
    label: int
    sample: torch.Tensor  # (C, S, S), on the sampler's device, in the noise dtype
    steps: int            # denoising steps (= the schedule length)
    rounds: int           # rounds the sample took part in
    accepted: int = 0     # drafts of this sample accepted
    proposed: int = 0     # drafts of this sample judged


class FreeSampler:
    """Lossless speculative DDPM sampling for DiT-like targets (FREE).

    Parameters
    ----------
    target: a module following the target protocol (``free_kernels.models.drafter``).
    drafter: a :class:`FeatureDrafter`, :class:`FrozenFeatureDrafter` or any
        callable ``drafter(h_prev, x, t, y) -> h``.
    diffusion: a :class:`GaussianDiffusion` / ``SpacedDiffusion`` from
        :func:`free_kernels.create_diffusion` (ancestral sampling, learned-range
        or fixed variance, epsilon or x0 prediction).
    draft_length: drafts per round: ``"auto"`` (default: a :class:`~free_kernels.planner.DraftPlanner`
        chooses L in 0..``max_draft_length`` per round where it pays, from this device's measured
        costs and the drafter's acceptance) or a fixed L >= 1 (capped at the number of steps - 1).
    relax: None (exact), a strength >= 0, or a :class:`RelaxPolicy` (approximate).
    clip_denoised: as the baseline sampler (the DiT scripts use False).
    residual_candidates_per_iter: residual-sampler candidates drawn from each
        sample's own stream per round (learned variance); a residual draw that
        needs more continues K at a time from the sample's own stream on the CPU
        (per-sample generators), from the batch's shared ``rng_state`` with keyed
        Philox (CUDA).
    residual_max_candidates: cap of the residual sampler (see the README).
    layout: "auto" (static on CUDA, compact elsewhere), "static" or "compact".
    graphs: capture the static round as a CUDA graph: "auto" (on CUDA), True, False.
    check_every: rounds between host checks (static layout; compact checks every round).
    profile: time the draft / verify / accept phases on CUDA (synchronises; off by default).
    plan: with ``draft_length="auto"``: ``"adaptive"`` (default: the planner follows what this run's rounds
        cost, so a busy machine is planned for as it is; a seeded run keeps the baseline's law exactly but not
        its pixels from call to call) or ``"frozen"`` (the cached calibration alone: a seeded run reproduces
        bit for bit while that calibration stays; no protection from load); see :mod:`free_kernels.planner`.
    """

    def __init__(self, target, drafter, diffusion: GaussianDiffusion, draft_length="auto", relax=None,
                 clip_denoised: bool = False, accept_backend: Optional[str] = None,
                 residual_candidates_per_iter: int = 8, residual_max_candidates: int = 100_000,
                 layout: str = "auto", graphs="auto", check_every: int = 1, profile: Optional[bool] = None,
                 max_draft_length: int = 8, planner: Optional[DraftPlanner] = None, plan: str = "adaptive"):
        auto = check_draft_length(draft_length) == "auto"
        check_plan(plan)
        if planner is not None and not auto:
            raise ValueError("planner= is used with draft_length='auto' only")
        if not isinstance(diffusion, GaussianDiffusion):
            raise TypeError(f"diffusion must come from free_kernels.create_diffusion, got {type(diffusion).__name__}")
        if diffusion.model_mean_type not in (ModelMeanType.EPSILON, ModelMeanType.START_X):
            raise ValueError(f"unsupported model_mean_type {diffusion.model_mean_type}")
        for attr in ("forward_features", "forward_head", "embed_condition", "in_channels", "num_classes"):
            if not hasattr(target, attr):
                raise TypeError(
                    f"target {type(target).__name__} lacks {attr!r}: it must follow the target protocol "
                    f"(forward_features / forward_head / embed_tokens / embed_condition, see free_kernels.models.drafter)"
                )
        if diffusion.learned_variance and not getattr(target, "learn_sigma", True):
            raise ValueError("a learned-variance diffusion needs a target built with learn_sigma=True")
        if not callable(drafter):
            raise TypeError(f"drafter must be callable as drafter(h_prev, x, t, y), got {type(drafter).__name__}")
        for name, v in (("residual_candidates_per_iter", residual_candidates_per_iter),
                        ("residual_max_candidates", residual_max_candidates)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if layout not in ("auto", "static", "compact"):
            raise ValueError(f"layout must be 'auto', 'static' or 'compact', got {layout!r}")
        if graphs not in ("auto", True, False):
            raise ValueError(f"graphs must be 'auto', True or False, got {graphs!r}")
        if not isinstance(check_every, (int, np.integer)) or isinstance(check_every, bool) or check_every < 1:
            raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
        if isinstance(drafter, FeatureDrafter):
            drafter.attach(target)  # raises if it was built for another target
        elif getattr(drafter, "signature", None):
            from .models.drafter import target_signature

            sig = target_signature(target)
            bad = {k: v for k, v in drafter.signature.items() if sig.get(k) != v}
            if bad:
                raise ValueError(f"drafter was built for another target (mismatch in {sorted(bad)})")
        self.target = target
        self.drafter = drafter
        self.diffusion = diffusion
        self.max_useful_draft_length = max(int(diffusion.num_timesteps) - 1, 1)  # a round never drafts past the end
        self.planner: Optional[DraftPlanner] = (planner or DraftPlanner(max_draft_length, plan=plan)) if auto else None
        if auto:
            self.draft_length = max(min(self.planner.max_draft_length, self.max_useful_draft_length), 1)
        else:
            self.draft_length = min(int(draft_length), self.max_useful_draft_length)
        self.relax: Optional[RelaxPolicy] = as_policy(relax)
        self.clip_denoised = clip_denoised
        self.accept_backend = accept_backend
        self.residual_candidates_per_iter = int(residual_candidates_per_iter)
        self.residual_max_candidates = int(residual_max_candidates)
        self.layout = layout
        self.graphs = graphs
        self.check_every = int(check_every)
        self.profile = (os.environ.get("FREE_KERNELS_PROFILE", "0") == "1") if profile is None else bool(profile)
        self.equal_variance = diffusion.model_var_type in (ModelVarType.FIXED_LARGE, ModelVarType.FIXED_SMALL)
        tm = getattr(diffusion, "timestep_map", None)
        # the original timestep of each respaced index (what the target and the drafter are called with)
        self.original_timesteps = np.asarray(tm if tm is not None else np.arange(diffusion.num_timesteps),
                                             dtype=np.int64)

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def sample(self, noise: torch.Tensor, y: torch.Tensor, cfg_scale: float = 1.0, guidance_channels: int = 3,
               generator: Optional[torch.Generator] = None, progress: bool = False):
        """Sample from x_T = ``noise`` (B, C, S, S) with labels ``y`` (B,).

        With ``cfg_scale != 1`` guidance is applied as the baseline applies it
        (``forward_with_cfg`` at that scale; at 1 guidance is the conditional output, so the
        unconditional rows are skipped); pass B samples, not a doubled batch.  The command-line
        tools refuse scales below 1, as the official ``sample_ddp.py`` does; the library does not.  Every
        sample's randomness comes from a key drawn from ``generator`` (so a
        fixed generator seed reproduces the run).  Returns ``(samples, stats)``.
        """
        target = self.target
        C, S = int(target.in_channels), int(target.input_size)
        check_tensor("noise", noise, dim=4, floating=True)
        if noise.shape[1:] != (C, S, S):
            raise ValueError(f"noise must have shape (B, {C}, {S}, {S}) for this target, got {tuple(noise.shape)}")
        dev = self._check_device(noise.device, "noise")
        check_tensor("y", y, shape=(noise.shape[0],), floating=False, device=noise.device)
        check_finite("noise", noise)
        y = self._check_labels(y)
        cfg_scale, guidance_channels = self._check_guidance(cfg_scale, guidance_channels)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError("generator must be a torch.Generator (one stream for the whole batch)")
        if generator is not None and generator.device.type != dev.type:
            raise ValueError(f"generator is on {generator.device} but noise is on {dev}: "
                             f"create it with torch.Generator(device={str(dev.type)!r})")
        B = noise.shape[0]
        keys = torch.randint(-2 ** 63, 2 ** 63 - 1, (B,), generator=generator, device=dev, dtype=torch.int64)
        overflow_seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=dev).item()) if B else 0
        run = _Run(self, B, dev, noise.dtype, cfg_scale, guidance_channels, overflow_seed)
        if B == 0:
            return noise.clone(), run.stats(0.0, [], [])
        run.insert(list(range(B)), noise, y, keys)
        out = torch.empty_like(noise)
        rounds_of, steps_of = [0] * B, [0] * B
        for slot, sample, steps, rounds in self._drive(run, progress, None):
            out[slot] = sample
            rounds_of[slot], steps_of[slot] = rounds, steps
        st = run.stats(run.elapsed, rounds_of, steps_of)
        self._check_output(out, "samples")
        return out, st

    @torch.no_grad()
    def sample_stream(self, requests: Iterable, batch_size: int, cfg_scale: float = 1.0,
                      guidance_channels: int = 3, device=None, dtype: torch.dtype = torch.float32,
                      progress: bool = False) -> Iterator[StreamResult]:
        """Continuous batching: yield a :class:`StreamResult` per request as soon as it finishes.

        ``requests``: an iterable of ``(seed, label)``.  x_T and every random
        number of a request come from its seed alone (x_T is
        ``torch.randn((C, S, S), generator=torch.Generator().manual_seed(seed))``),
        so a result does not depend on ``batch_size``, on the slot the request
        ran in or on its neighbours.  A finished slot takes the next request at
        the next check, so the batch stays full until the iterator is spent.
        Results come in finishing order (``index`` gives the request order).
        After the iterator is exhausted, ``self.last_stats`` holds the run's stats.
        """
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype (of x_T and the samples), got {dtype!r}")
        dev = self._check_device(torch.device(device) if device is not None else (_module_device(self.target)
                                                                                  or torch.device("cpu")), "device")
        cfg_scale, guidance_channels = self._check_guidance(cfg_scale, guidance_channels)
        C, S = int(self.target.in_channels), int(self.target.input_size)
        it = iter(requests)
        counter = [0]
        meta: Dict[int, Tuple[int, int, int]] = {}

        def take(n: int):
            """Up to n requests as (noise (n, C, S, S), labels, keys, their indices)."""
            xs, ys, ks, ids = [], [], [], []
            for _ in range(n):
                try:
                    req = next(it)
                except StopIteration:
                    break
                seed, label = _parse_request(req, counter[0], self.target.num_classes)
                g = torch.Generator().manual_seed(seed)
                xs.append(torch.randn((C, S, S), generator=g))
                ks.append(int(torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), generator=g, dtype=torch.int64)))
                ys.append(label)
                ids.append(counter[0])
                meta[counter[0]] = (seed, label)
                counter[0] += 1
            if not xs:
                return None
            return (torch.stack(xs).to(device=dev, dtype=dtype), torch.tensor(ys, device=dev),
                    torch.tensor(ks, dtype=torch.int64, device=dev), ids)

        run = _Run(self, int(batch_size), dev, dtype, cfg_scale, guidance_channels, overflow_seed=0)
        slot_req: Dict[int, int] = {}

        def refill(free_slots: List[int]) -> List[int]:
            got = take(len(free_slots))
            if got is None:
                return []
            x0, y0, k0, ids = got
            slots = free_slots[: len(ids)]
            run.insert(slots, x0, y0, k0)
            for s, i in zip(slots, ids):
                slot_req[s] = i
            return slots

        refill(list(range(int(batch_size))))
        rounds_all, steps_all = [], []
        for slot, sample, steps, rounds in self._drive(run, progress, refill):
            i = slot_req.pop(slot)
            seed, label = meta.pop(i)
            rounds_all.append(rounds)
            steps_all.append(steps)
            self._check_output(sample, f"sample of request {i}")
            acc, prop = run.slot_counts[slot]
            yield StreamResult(index=i, seed=seed, label=label, sample=sample, steps=steps, rounds=rounds,
                               accepted=acc, proposed=prop)
        self.last_stats = run.stats(run.elapsed, rounds_all, steps_all)

    def prepare(self, batch_size: int, cfg_scale: float = 1.0, device=None) -> float:
        """Do the one-off work of ``draft_length="auto"`` now (the planner's cost-model calibration for this
        batch size and guidance), so that it is not inside a timed run; returns the seconds it spent
        calibrating (0.0 when the costs were cached, and for a fixed draft length)."""
        if self.planner is None:
            return 0.0
        dev = torch.device(device) if device is not None else (_module_device(self.target) or torch.device("cpu"))
        return self.planner.start(self, int(batch_size), 2 if float(cfg_scale) != 1.0 else 1, dev).calibration_s

    @torch.no_grad()
    def measure_rounds(self, B: int, G: int, dev, Lmax: int, reps: int = 3,
                       threads: Sequence[Optional[int]] = (None,), lengths: Optional[Sequence[int]] = None,
                       tick=None) -> List[List[float]]:
        """Seconds of one whole round of this sampler with L = 0..Lmax drafts (everything a round does:
        drafting, verification, acceptance, randomness, bookkeeping), the median of ``reps`` timed passes
        each, for every CPU intra-op thread count in ``threads`` (None: as set); returns one list per thread
        count.  The median, not the fastest: a shared machine's noise also has lucky dips (a round timed 15%
        below its usual cost once made drafting look 34% ahead of plain steps at batch 10, where it lost).

        B samples from x_T (every timed round starts there, so repeated rounds do not drift), G = 2 with
        guidance; for the draft-length planner's cost model (``free_kernels.planner``).  ``lengths``: time only
        these L (each <= Lmax; the lists then follow their order); ``tick()`` is called after every round run.
        """
        dev = torch.device(dev)
        threads = list(threads)
        C, S = int(self.target.in_channels), int(self.target.input_size)
        g = torch.Generator().manual_seed(0)
        run = _Run(self, B, dev, torch.float32, 2.0 if G > 1 else 1.0, 3, overflow_seed=0, with_plan=False)
        run.insert(list(range(B)), torch.randn(B, C, S, S, generator=g).to(dev),
                   torch.zeros(B, dtype=torch.int64, device=dev), torch.arange(B, dtype=torch.int64, device=dev) + 1)
        run.timed = False
        x0 = run.x.clone()
        N = int(self.diffusion.num_timesteps)
        start = np.full(B, N - 1)
        lengths = list(range(Lmax + 1)) if lengths is None else [int(L) for L in lengths]
        times = [[[] for _ in lengths] for _ in threads]
        # pass 0 warms every (L, threads) up (first-call costs: buffers, plans, kernels, thread pools); the
        # timed passes then go through them in turn, so a slow moment of a shared machine does not land on one
        for r in range(reps + 1):
            for i, L in enumerate(lengths):
                for k, n in enumerate(threads):
                    run.idx.fill_(N - 1)
                    run.x.copy_(x0)
                    with intra_op_threads(n if dev.type == "cpu" else None):
                        if dev.type == "cuda":
                            torch.cuda.synchronize(dev)
                        t0 = time.perf_counter()
                        run.round_with(L, start)
                        if dev.type == "cuda":
                            torch.cuda.synchronize(dev)
                        dt = time.perf_counter() - t0
                    if r:
                        times[k][i].append(dt)
                    if tick is not None:
                        tick()
        return [[float(np.median(ts)) for ts in per_l] for per_l in times]

    # ------------------------------------------------------------ checks
    def _check_device(self, dev: torch.device, what: str) -> torch.device:
        tdev = _module_device(self.target)
        if tdev is not None and tdev != dev:
            raise ValueError(f"{what} is on {dev} but the target is on {tdev}")
        if _drops_labels(self.target):
            raise ValueError("the target is in train() mode and drops labels at random there (class dropout): call "
                             "target.eval() before sampling")
        return dev

    def _check_labels(self, y: torch.Tensor) -> torch.Tensor:
        nc = int(self.target.num_classes)
        if y.numel() and (bool((y < 0).any()) or bool((y >= nc + 1).any())):
            raise ValueError(f"y must hold labels in [0, {nc}], got {y.tolist()}")
        return y.to(torch.int64)

    @staticmethod
    def _check_guidance(cfg_scale, guidance_channels):
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float, np.floating, np.integer)) \
                or not math.isfinite(float(cfg_scale)):
            raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
        if guidance_channels not in (3, 4):
            raise ValueError(f"guidance_channels must be 3 (official DiT) or 4 (diffusers), got {guidance_channels}")
        return float(cfg_scale), int(guidance_channels)

    def _check_output(self, out: torch.Tensor, what: str) -> None:
        if os.environ.get("FREE_KERNELS_CHECK_NAN", "1") == "0" or bool(torch.isfinite(out).all()):
            return
        self._blame_parameters(f"{what} contain NaN or Inf")
        raise ValueError(f"{what} contain NaN or Inf although every target and drafter parameter is finite "
                         f"(the drafted or verified transitions overflowed)")

    def _blame_parameters(self, what: str) -> None:
        """Raise a ValueError naming the first non-finite target or drafter parameter, if there is one."""
        for owner, mod in (("target", self.target), ("drafter", self.drafter)):
            if isinstance(mod, torch.nn.Module):
                for name, p in mod.named_parameters():
                    if not bool(torch.isfinite(p).all()):
                        raise ValueError(f"{what}: {owner} parameter {name!r} is not finite")

    def _drive(self, run: "_Run", progress: bool, refill):
        """``run.drive`` with non-finite values traced back to the parameter that produced them."""
        try:
            yield from run.drive(progress, refill)
        except ValueError as e:
            if "NaN" in str(e):
                self._blame_parameters(f"sampling failed ({e})")
            raise


def _parse_request(req, i: int, num_classes: int) -> Tuple[int, int]:
    """(seed, label) of request ``i``: a pair (tuple, list, array) of two integers (Python or NumPy ints,
    never bools, floats or strings: nothing is truncated or split into digits)."""
    if isinstance(req, (str, bytes)) or not hasattr(req, "__len__") or len(req) != 2:
        raise TypeError(f"request {i} must be a (seed, label) pair of integers, got {req!r}")
    seed, label = req[0], req[1]
    for name, v in (("seed", seed), ("label", label)):
        if torch.is_tensor(v) and v.dim() == 0 and not v.is_floating_point() and not v.is_complex() \
                and v.dtype != torch.bool:
            continue  # an integer tensor scalar
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"request {i}: {name} must be an integer, got {v!r} ({type(v).__name__}) in {req!r}")
    seed, label = int(seed), int(label)
    if not 0 <= label <= num_classes:
        raise ValueError(f"request {i}: label must lie in [0, {num_classes}], got {label}")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"request {i}: seed must lie in [0, 2**63), got {seed}")
    return seed, label


class _Run:
    """One sampling run: the slot state on the device, round buffers, statistics accumulators."""

    def __init__(self, sampler: FreeSampler, B: int, dev: torch.device, out_dtype, cfg_scale: float, gc: int,
                 overflow_seed: int, with_plan: bool = True):
        s = sampler
        self.s, self.B, self.dev, self.out_dtype = s, B, dev, out_dtype
        self.cfg = cfg_scale != 1.0
        self.cfg_scale, self.gc = cfg_scale, gc
        self.G = 2 if self.cfg else 1
        t = s.target
        self.C, self.S = int(t.in_channels), int(t.input_size)
        self.D = self.C * self.S * self.S
        self.N = int(s.diffusion.num_timesteps)
        self.L = s.draft_length
        self.K = s.residual_candidates_per_iter if not s.equal_variance else 0
        self.mdt = _module_dtype(t) or torch.float32
        self.null = int(t.num_classes)
        cuda = dev.type == "cuda"
        self.layout = s.layout if s.layout != "auto" else ("static" if cuda else "compact")
        self.keyed_philox = cuda or self.layout == "static"  # CPU compact: per-sample torch generators
        self.timed = self.s.profile or not cuda
        self.tmap = torch.as_tensor(s.original_timesteps, device=dev)
        self.tables = ops.schedule_tables_on(s.diffusion, dev)  # for relax's uncertainty (the ops cache them)
        self.jr = torch.arange(self.L + 1, device=dev)
        # ---- slot state (device)
        self.x = torch.zeros(B, self.C, self.S, self.S, device=dev, dtype=torch.float32)
        self.idx = torch.full((B,), -1, device=dev, dtype=torch.int64)
        self.has_h = torch.zeros(B, device=dev, dtype=torch.bool)
        self.y = torch.zeros(B, device=dev, dtype=torch.int64)
        self.keys = torch.zeros(B, device=dev, dtype=torch.int64)
        self.draws = torch.zeros(B, device=dev, dtype=torch.int64)   # per-sample draw counter (Philox stream)
        self.rounds = torch.zeros(B, device=dev, dtype=torch.int64)
        self.steps = torch.zeros(B, device=dev, dtype=torch.int64)
        self.acc_slot = torch.zeros(B, device=dev, dtype=torch.int64)   # drafts accepted / judged per slot
        self.prop_slot = torch.zeros(B, device=dev, dtype=torch.int64)
        self.slot_counts: Dict[int, Tuple[int, int]] = {}
        self.hp: Optional[torch.Tensor] = None  # (G, B, Ntok, H) exact features of each state's parent
        self.gens: List[Optional[torch.Generator]] = [None] * B
        # ---- statistics accumulators (device)
        self.acc_by_index = torch.zeros(self.N, device=dev, dtype=torch.int64)
        self.prop_by_index = torch.zeros(self.N, device=dev, dtype=torch.int64)
        # rejections, candidates, max candidates, fallbacks
        self.counters = torch.zeros(4, device=dev, dtype=torch.int64)
        self.n_rounds = self.target_rows = self.drafter_calls = self.drafter_rows = 0
        self.t_draft = self.t_verify = self.t_accept = 0.0
        self.host_reads = 0
        self.graph_note = "off"
        self.elapsed = 0.0
        # the accept op's own draws (a residual draw past the per-sample candidates) come from rng_state
        # (no torch.Generator: the round must compile and capture)
        self.rng_state = torch.tensor([overflow_seed, 0], dtype=torch.int64, device=dev)
        # host mirrors (written by the host only at insertions and checks)
        self.plan = s.planner.start(s, B, self.G, dev) if with_plan and s.planner is not None and B > 0 else None
        # a plan that never drafts (no L can pay on this device and batch) needs no parent features
        self.keep_features = self.plan is None or self.plan.drafts_ever
        self.rounds_by_L = [0] * (self.L + 1)
        self.live = np.zeros(B, dtype=bool)
        self.has_host = np.zeros(B, dtype=bool)
        self.any_features = False
        self._warm: set = set()
        self._graphs: Dict[int, "_GraphedRound"] = {}
        self._bufs: Dict[tuple, dict] = {}

    # ------------------------------------------------------------ slots
    def insert(self, slot_list: List[int], x0: torch.Tensor, y0: torch.Tensor, keys: torch.Tensor) -> None:
        """Start new samples in ``slot_list`` (host-initiated, between rounds)."""
        slots = torch.as_tensor(slot_list, device=self.dev, dtype=torch.int64)
        self.x.index_copy_(0, slots, x0.float())
        self.idx.index_fill_(0, slots, self.N - 1)
        self.has_h.index_fill_(0, slots, False)
        self.y.index_copy_(0, slots, y0.to(torch.int64))
        self.keys.index_copy_(0, slots, keys)
        for buf in (self.draws, self.rounds, self.steps, self.acc_slot, self.prop_slot):
            buf.index_fill_(0, slots, 0)
        if not self.keyed_philox:
            for s, k in zip(slot_list, keys.tolist()):
                self.gens[s] = torch.Generator().manual_seed(k & (2 ** 63 - 1))
        self.live[slot_list] = True
        self.has_host[slot_list] = False

    # ------------------------------------------------------------ driver
    def drive(self, progress: bool, refill):
        """Run rounds until every slot is finished; yield (slot, sample, steps, rounds) as slots finish.

        One host read per check (``_snapshot``).  ``refill(free_slots) -> started_slots`` may start new
        samples in finished slots (continuous batching).
        """
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=int(self.live.sum()) * self.N if refill is None else None,
                       desc="FREE (auto)" if self.plan is not None else f"FREE (L={self.L})", unit="step")
        t_start = time.perf_counter()
        done_steps = 0
        static = self.layout == "static"
        idx_known = None  # respaced index of every slot as of the last check (host)
        plain = False     # the last round was a plain step of every live slot (compact layout)
        while self.live.any():
            if static:
                for _ in range(self.s.check_every):
                    Lr = self._choose(idx_known) if self.any_features else 0
                    with self.plan.round_clock(Lr, None) if self.plan is not None else contextlib.nullcontext():
                        self._round_static(Lr)
                    self.any_features = True
            elif plain:
                # every live slot advanced exactly one step and nothing was judged: the host knows the
                # indices without a read, unless a slot finished (its counts are read with the snapshot)
                idx_known = idx_known.copy()
                idx_known[self.live] -= 1
                if not (idx_known[self.live] < 0).any():
                    if bar is not None:
                        bar.update(int(self.live.sum()))
                    plain = self._round_compact(idx_known) == 0
                    continue
            snap = self._snapshot()
            finished = np.nonzero(self.live & (snap[0] < 0))[0]
            if bar is not None:
                bar.update(int(snap[2][self.live].sum()) + done_steps - bar.n)
            for slot in finished.tolist():
                self.live[slot] = False
                done_steps += int(snap[2][slot])
                self.slot_counts[slot] = (int(snap[3][slot]), int(snap[4][slot]))
                yield slot, self.x[slot].to(self.out_dtype).clone(), int(snap[2][slot]), int(snap[1][slot])
            if refill is not None and finished.size:
                for slot in refill(finished.tolist()):
                    snap[0][slot] = self.N - 1
            idx_known = snap[0]
            if not static and self.live.any():
                plain = self._round_compact(snap[0]) == 0
        self.elapsed = time.perf_counter() - t_start
        if self.plan is not None:
            if self.n_rounds:
                self._snapshot()  # the last round's accept counts, for the next run's plan
            self.plan.finish()
        if bar is not None:
            bar.close()

    def _snapshot(self) -> np.ndarray:
        """(5, B) [index, rounds, steps, accepted, judged] per slot; with the planner also its counts (one read)."""
        state = torch.stack([self.idx, self.rounds, self.steps, self.acc_slot, self.prop_slot])
        if self.plan is None:
            return self._read(state)
        flat = self._read(torch.cat([state.reshape(-1), self.acc_by_index, self.prop_by_index]))
        n = state.numel()
        self.plan.profile.update(flat[n:n + self.N], flat[n + self.N:])
        return flat[:n].reshape(5, self.B)

    def _choose(self, idx_host: Optional[np.ndarray]) -> int:
        """This round's draft length: fixed L, or the planner's choice for the live slots."""
        if self.plan is None or idx_host is None:
            return self.L
        live = np.nonzero(self.live)[0]
        return min(self.plan.choose(np.maximum(idx_host[live], 0)), self.L)

    def round_with(self, L: int, idx_host: np.ndarray) -> None:
        """One round drafting L steps for every live slot (slots at ``idx_host``), in this run's layout.
        For timing (the planner's calibration); features are assumed valid after the first round."""
        L = min(L, self.L)
        if self.layout == "static":
            self._round_static(L if self.any_features else 0)
            self.any_features = True
        else:
            self._round_compact(idx_host, L)
            self.has_host[:] = True

    def _read(self, t: torch.Tensor) -> np.ndarray:
        """The sampler's only device -> host read."""
        self.host_reads += 1
        return t.cpu().numpy()

    # ------------------------------------------------------------ randomness
    def _draw(self, rows: Optional[torch.Tensor], rows_host: Optional[List[int]], Lr: int,
              nd_host: Optional[np.ndarray] = None):
        """This round's randomness of the rows, each from its own stream.

        Returns (draft noise (R, Lr, D), bonus noise (R, D), residual candidates
        (R, K, D) or None, acceptance uniforms (R, Lr), residual uniforms (R, K) or None).
        Keyed Philox: one stream per kind, so what a round draws of one kind does
        not move another.  Per-sample generators (CPU compact layout): each row
        draws what its own drafts need (``nd_host``: drafts per row), in the same
        order whatever the rest of the batch drafts: the bonus noise, then with
        drafts their noise, K residual candidates, their acceptance uniforms and
        the candidates' uniforms.  Entries a row does not draw keep finite values
        (unused: positions past a row's drafts are never judged).
        """
        K, D = self.K, self.D
        Kr = K if Lr > 0 else 0
        if self.keyed_philox:
            keys = self.keys if rows is None else self.keys[rows]
            draws = self.draws if rows is None else self.draws[rows]
            zd, zb, zr = keyed_parts(keys, draws, [(_TAG_DRAFT, Lr * D), (_TAG_BONUS, D), (_TAG_RESID, Kr * D)],
                                     normal=True)
            ua, ur = keyed_parts(keys, draws, [(_TAG_U_ACCEPT, Lr), (_TAG_U_RESID, Kr)], normal=False)
            R = keys.shape[0]
            return (zd.view(R, Lr, D), zb, zr.view(R, Kr, D) if Kr else None, ua, ur if Kr else None)
        slots = list(range(self.B)) if rows_host is None else rows_host
        n_rows = len(slots)
        nd = [Lr] * n_rows if nd_host is None else np.minimum(nd_host, Lr).tolist()
        # z: [bonus | Lr drafts | Kr candidates] per row; u: [Lr acceptance | Kr candidates]
        buf = self._buf(("draw", n_rows, Lr), lambda: dict(z=torch.zeros(n_rows, 1 + Lr + Kr, D),
                                                           u=torch.zeros(n_rows, Lr + Kr)))
        z, u = buf["z"], buf["u"]
        if Lr:
            u.zero_()  # -> 1 below: entries no row drew stay valid uniforms
        for r, slot in enumerate(slots):
            g, m = self.gens[slot], nd[r]
            torch.randn((1 + m) * D, generator=g, out=z[r, :1 + m].view(-1))
            if m:
                torch.randn(K * D, generator=g, out=z[r, 1 + Lr:].view(-1))
                torch.rand(m, generator=g, out=u[r, :m])
                torch.rand(K, generator=g, out=u[r, Lr:])
        if Lr:
            u.neg_().add_(1.0)  # (0, 1]: never log(0)
        return (z[:, 1:1 + Lr], z[:, 0], z[:, 1 + Lr:] if Kr else None, u[:, :Lr], u[:, Lr:] if Kr else None)

    def _more_residuals(self, res, slots: List[int], used: int, args: tuple, kw: dict) -> None:
        """Per-sample streams: rows whose ``used`` candidates were all rejected (``res.fallbacks``) go on
        sampling the residual from their own samples' streams, K candidates at a time, up to
        ``residual_max_candidates`` in all, so that no draw comes from a stream the batch shares (a sample's
        result stays a function of its seed).  ``args`` / ``kw``: the round's accept call (the same uniforms:
        the same drafts are rejected).  Per-sample streams exist on the CPU only, where reading which rows
        need more is no device synchronisation."""
        K, D, cap = self.K, self.D, self.s.residual_max_candidates
        need = res.fallbacks.nonzero().flatten()
        while need.numel() and used < cap:
            k = min(K, cap - used)
            z, u = torch.empty(need.numel(), k, D), torch.empty(need.numel(), k)
            for i, r in enumerate(need.tolist()):
                g = self.gens[slots[r]]
                torch.randn(k * D, generator=g, out=z[i].view(-1))
                torch.rand(k, generator=g, out=u[i])
            u.neg_().add_(1.0)
            sub = ops.speculative_accept(*(a[need] for a in args),
                                         **{n: (v[need] if isinstance(v, torch.Tensor) and n != "rng_state" else v)
                                            for n, v in kw.items()},
                                         residual_noise=z, residual_uniforms=u, max_candidates=k)
            res.out[need] = sub.out
            res.residual_candidates[need] += sub.residual_candidates
            res.fallbacks[need] = sub.fallbacks
            used += k
            need = need[sub.fallbacks]

    def _buf(self, key, make):
        b = self._bufs.get(key)
        if b is None:
            b = self._bufs[key] = make()
        return b

    # ------------------------------------------------------------ rounds
    def _round_static(self, Lr: int) -> None:
        """One round of the static layout: replayed from a CUDA graph when captured, else eager."""
        g = self._graphs.get(Lr)
        if g is None and self._graphs_on() and Lr in self._warm:
            try:
                g = self._graphs[Lr] = _GraphedRound(lambda: self._round_body(None, None, Lr, None), self.dev)
                self.graph_note = "replayed"
            except Exception as e:  # noqa: BLE001 - fall back to eager, say why
                self.graph_note = f"eager (capture failed: {type(e).__name__}: {e})"[:300]
                self.s.graphs = False
                warnings.warn(f"FREE: CUDA-graph capture of the round failed, running eagerly: {e}")
        if g is not None:
            g.replay()
        else:
            self._round_body(None, None, Lr, None)
            self._warm.add(Lr)  # the first eager round of a shape warms up kernels and buffers
        self._count(self.B, Lr, self.B * (Lr + 1))

    def _graphs_on(self) -> bool:
        g = self.s.graphs
        return self.dev.type == "cuda" and (g is True or g == "auto") and not self.s.profile

    def _round_compact(self, idx_host: np.ndarray, L: Optional[int] = None) -> int:
        """One round of the compact layout on the live slots (at respaced indices ``idx_host``); returns the
        round's draft length (0: every live slot took one plain step)."""
        act_np = np.nonzero(self.live)[0]
        planned = L is None and self.plan is not None and idx_host is not None
        L = self._choose(idx_host) if L is None else L
        nd = np.where(self.has_host[act_np], np.minimum(idx_host[act_np], L), 0)
        Lr = int(nd.max()) if nd.size else 0
        valid = np.arange(Lr + 1)[None, :] <= nd[:, None]          # (Ba, Lr + 1) rows the target verifies
        vrows = np.nonzero(valid.reshape(-1))[0]
        full = vrows.size == valid.size
        act = None if act_np.size == self.B else torch.as_tensor(act_np, device=self.dev)
        # CPU: the round runs at the intra-op thread count the planner measured fastest for this L (on a GPU
        # threads do not apply)
        threads = self.plan.threads(Lr) if planned and self.dev.type == "cpu" else None
        # the planner learns what rounds cost from the ones every slot took part in with every position
        clock = self.plan.round_clock(Lr, threads, act is None and full) if planned else contextlib.nullcontext()
        with intra_op_threads(threads), clock:
            if Lr == 0:
                self._plain_round(act, None if act is None else act_np.tolist())
            else:
                self._round_body(act, None if full else torch.as_tensor(vrows, device=self.dev), Lr,
                                 None if full else torch.as_tensor(valid, device=self.dev),
                                 None if act is None else act_np.tolist(), nd)
        self.has_host[act_np] = self.keep_features
        self._count(act_np.size, Lr, int(vrows.size), drafter_rows=int(np.minimum(nd, Lr).sum()))
        return Lr

    def _count(self, rows_d: int, Lr: int, rows_v: int, drafter_rows: Optional[int] = None) -> None:
        self.n_rounds += 1
        self.rounds_by_L[Lr] += 1
        self.target_rows += rows_v
        if Lr > 0:
            self.drafter_calls += Lr
            self.drafter_rows += rows_d * Lr if drafter_rows is None else drafter_rows

    def _plain_round(self, act: Optional[torch.Tensor], act_host: Optional[List[int]]) -> None:
        """Compact layout, nothing drafted: every slot in ``act`` (None: all B; all live) takes one plain
        ancestral step, the baseline's: one target row per sample (two with guidance), its transition and
        the bonus noise of the round (the same numbers, from the same streams, as a round drafting 0 in
        ``_round_body``), no acceptance and no draft buffers."""
        s, G, timed = self.s, self.G, self.timed
        t0 = time.perf_counter() if timed else 0.0
        sel = (lambda t: t) if act is None else (lambda t: t[act])
        x, idx, y = sel(self.x), sel(self.idx), sel(self.y)
        noise = self._draw(act, act_host, 0)[1]
        if self.keyed_philox:
            self.draws[act if act is not None else slice(None)] += 1
        t1 = self._tick(timed)
        nvtx_phase("verify")
        T = self.tmap[idx]
        if self.cfg:
            XX, TT, YY = torch.cat([x, x]), torch.cat([T, T]), torch.cat([y, torch.full_like(y, self.null)])
        else:
            XX, TT, YY = x, T, y
        h_all, c_all = s.target.forward_features(XX.to(self.mdt), TT, YY)
        mean, logvar = ops.verify_transition(s.target, s.diffusion, h_all, c_all, x, idx, cfg_scale=self.cfg_scale,
                                             guidance_channels=self.gc, clip_denoised=s.clip_denoised)
        t2 = self._tick(timed)
        nvtx_phase("accept")
        Ba = x.shape[0]
        keep = (idx != 0).to(mean.dtype).view(Ba, 1, 1, 1)     # the baseline's rule: no noise at the last step
        mean, logvar = mean.to(torch.float32), logvar.to(torch.float32)
        x_new = mean + keep * torch.exp(0.5 * logvar) * noise.view_as(mean)
        if act is None:
            self.x.copy_(x_new)
            self.idx.sub_(1)
            self.rounds.add_(1)
            self.steps.add_(1)
        else:
            one = torch.ones_like(act)
            self.x.index_copy_(0, act, x_new)
            self.idx.index_add_(0, act, -one)
            self.rounds.index_add_(0, act, one)
            self.steps.index_add_(0, act, one)
        if self.keep_features:
            h = h_all.view(G, Ba, *h_all.shape[1:])
            if self.hp is None:
                self.hp = torch.zeros(G, self.B, *h_all.shape[1:], device=self.dev, dtype=h_all.dtype)
            if act is None:
                self.hp.copy_(h)
                self.has_h.fill_(True)
            else:
                self.hp.index_copy_(1, act, h)
                self.has_h.index_fill_(0, act, True)
        self._end_round(timed, t0, t1, t2)

    def _round_body(self, act: Optional[torch.Tensor], vrows: Optional[torch.Tensor], Lr: int,
                    valid: Optional[torch.Tensor], act_host: Optional[List[int]] = None,
                    nd_host: Optional[np.ndarray] = None) -> None:
        """One round on the slots ``act`` (None: all B), drafting ``Lr`` positions.

        ``vrows``: flat (slot, position) rows of the (Ba, Lr + 1) layout that the
        target verifies (None: all).  Writes the slot state in place.
        """
        s, dev, G, C, S, D = self.s, self.dev, self.G, self.C, self.S, self.D
        target, drafter, diffusion = s.target, s.drafter, s.diffusion
        timed = self.timed
        t0 = time.perf_counter() if timed else 0.0
        if timed and s.profile and dev.type == "cuda":
            torch.cuda.synchronize(dev)
        sel = (lambda t: t) if act is None else (lambda t: t[act])
        x, idx, y, has_h = sel(self.x), sel(self.idx), sel(self.y), sel(self.has_h)
        Ba = x.shape[0]
        active = idx >= 0
        nd = torch.where(has_h & active, torch.clamp(idx, max=Lr), torch.zeros_like(idx))
        I = (idx[:, None] - self.jr[None, : Lr + 1]).clamp(min=0)      # (Ba, Lr + 1) respaced index per slot
        T = self.tmap[I]
        noise_q, bonus, resid_z, uni, resid_u = self._draw(act, act_host, Lr, nd_host)
        self.draws[act if act is not None else slice(None)] += active.to(torch.int64)
        bufs = self._buf(("round", Ba, Lr), lambda: dict(
            # zeros: positions a round does not draft keep finite values (the CPU accept checks every input)
            P=torch.zeros(Ba, Lr + 1, C, S, S, device=dev), MQ=torch.zeros(Ba, Lr, D, device=dev),
            LVQ=torch.zeros(Ba, Lr, D, device=dev), MP=torch.zeros(Ba, Lr + 1, D, device=dev),
            LVP=torch.zeros(Ba, Lr + 1, D, device=dev), out=torch.empty(Ba, D, device=dev),
            n_acc=torch.empty(Ba, dtype=torch.int32, device=dev),
            log_ratio=torch.empty(Ba, Lr, dtype=torch.float32, device=dev),
            rc=torch.empty(Ba, dtype=torch.int32, device=dev), fb=torch.empty(Ba, dtype=torch.bool, device=dev)))
        P, MQ, LVQ, MP, LVP = bufs["P"], bufs["MQ"], bufs["LVQ"], bufs["MP"], bufs["LVP"]
        P[:, 0] = x

        # ------------------------------------------------ draft
        nvtx_phase("draft")
        if Lr > 0:
            hp = self.hp if act is None else self.hp[:, act]
            h = hp                                          # (G, rows drafting, Ntok, H)
            rows, rows_np = None, np.arange(Ba)             # rows None: every row of the round drafts
            condition = getattr(drafter, "draft_condition", None)
            if not callable(condition):
                condition = target.embed_condition
            for j in range(Lr):
                if nd_host is not None:                     # compact: only rows with more than j drafts
                    keep = np.nonzero(nd_host > j)[0]       # a subset of rows_np (nd > j implies nd > j - 1)
                    if keep.size < rows_np.size:
                        h = h[:, torch.as_tensor(np.searchsorted(rows_np, keep), device=dev)]
                        rows_np, rows = keep, torch.as_tensor(keep, device=dev)
                R = Ba if rows is None else rows.numel()
                pick = (lambda t: t) if rows is None else (lambda t: t[rows])
                xj, Tj, Tn, Ij, yj = pick(P[:, j]), pick(T[:, j]), pick(T[:, j + 1]), pick(I[:, j]), pick(y)
                yG = torch.cat([yj, torch.full_like(yj, self.null)]) if self.cfg else yj
                # [v; v] under CFG: torch.cat (~4 us on a CPU) rather than Tensor.repeat (~25-30 us)
                x_in = torch.cat([xj] * G) if G > 1 else xj
                t_in = torch.cat([Tj] * G) if G > 1 else Tj
                t_nx = torch.cat([Tn] * G) if G > 1 else Tn               # the step being drafted
                c = condition(t_in, yG)                                   # once: drafter and head share it
                h = ops.drafter_forward(drafter, h.reshape(G * R, *h.shape[2:]), x_in.to(self.mdt), t_in, yG,
                                        t_next=t_nx, c=c).view(G, R, *h.shape[2:])
                zj = pick(noise_q[:, j]).reshape(R, C, S, S)
                if rows is None:
                    ops.draft_transition(target, diffusion, h.reshape(G * R, *h.shape[2:]), c, xj, Ij, zj,
                                         cfg_scale=self.cfg_scale, guidance_channels=self.gc,
                                         clip_denoised=s.clip_denoised,
                                         out=(P[:, j + 1], MQ[:, j].view(Ba, C, S, S), LVQ[:, j].view(Ba, C, S, S)))
                else:
                    xn, mq, lvq = ops.draft_transition(target, diffusion, h.reshape(G * R, *h.shape[2:]), c, xj, Ij,
                                                       zj, cfg_scale=self.cfg_scale, guidance_channels=self.gc,
                                                       clip_denoised=s.clip_denoised)
                    P[:, j + 1].index_copy_(0, rows, xn)
                    MQ[:, j].index_copy_(0, rows, mq.reshape(R, D))
                    LVQ[:, j].index_copy_(0, rows, lvq.reshape(R, D))
        t1 = self._tick(timed)

        # ------------------------------------------------ verify (one batched target call)
        nvtx_phase("verify")
        X = P.view(Ba * (Lr + 1), C, S, S)
        If, Tf = I.reshape(-1), T.reshape(-1)
        Yf = y[:, None].expand(Ba, Lr + 1).reshape(-1)
        if vrows is not None:
            X, If, Tf, Yf = X[vrows], If[vrows], Tf[vrows], Yf[vrows]
        if self.cfg:
            XX, TT, YY = torch.cat([X, X]), torch.cat([Tf, Tf]), torch.cat([Yf, torch.full_like(Yf, self.null)])
        else:
            XX, TT, YY = X, Tf, Yf
        h_all, c_all = target.forward_features(XX.to(self.mdt), TT, YY)
        kw = dict(cfg_scale=self.cfg_scale, guidance_channels=self.gc, clip_denoised=s.clip_denoised)
        if vrows is None:
            ops.verify_transition(target, diffusion, h_all, c_all, X, If,
                                  out=(MP.view(-1, C, S, S), LVP.view(-1, C, S, S)), **kw)
        else:
            mean, logvar = ops.verify_transition(target, diffusion, h_all, c_all, X, If, **kw)
            MP.view(-1, D).index_copy_(0, vrows, mean.reshape(-1, D))
            LVP.view(-1, D).index_copy_(0, vrows, logvar.reshape(-1, D))
        t2 = self._tick(timed)

        # ------------------------------------------------ accept
        nvtx_phase("accept")
        det_last = (idx - nd) == 0
        tau = None
        if s.relax is not None and not s.relax.exact and Lr > 0:
            tau = s.relax.tau(diffusion, LVP[:, :Lr], I[:, :Lr], self.tables)
        if Lr > 0:
            # per-sample streams (CPU compact): the op takes only the K candidates drawn for the round and
            # _more_residuals continues a residual past them from the sample's own stream
            own = not self.keyed_philox and self.K > 0
            args = (MP, LVP, MQ, LVQ, noise_q, nd, det_last)
            kw = dict(equal_variance=s.equal_variance, uniforms=uni, bonus_noise=bonus, tau=tau,
                      rng_state=self.rng_state, backend=s.accept_backend,
                      candidates_per_iter=s.residual_candidates_per_iter)
            cap = min(self.K, s.residual_max_candidates) if own else s.residual_max_candidates
            res = ops.speculative_accept(
                *args, **kw, residual_noise=resid_z, residual_uniforms=resid_u, max_candidates=cap,
                out=bufs["out"], num_accepted=bufs["n_acc"], log_ratio=bufs["log_ratio"],
                residual_candidates=bufs["rc"], fallbacks=bufs["fb"])
            if own and cap < s.residual_max_candidates:
                self._more_residuals(res, list(range(self.B)) if act_host is None else act_host, cap, args, kw)
            n_acc = torch.where(active, res.num_accepted.long(), torch.zeros_like(idx))
            out = res.out
        else:
            # nothing drafted: a plain ancestral step from the verified p (the accept op's bonus step, the
            # baseline's rule: no noise at the last step), without the accept op's checks and buffers
            keep = (~det_last).to(MP.dtype)[:, None]
            out = MP[:, 0] + keep * torch.exp(0.5 * LVP[:, 0]) * bonus
            n_acc = torch.zeros_like(idx)
        adv = torch.where(active, n_acc + 1, torch.zeros_like(idx))
        x_new = torch.where(active[:, None, None, None], out.view(Ba, C, S, S).to(torch.float32), x)
        # exact features of each new state's parent: verification row (slot, n_acc)
        hp_new = None
        if self.keep_features:
            Ntok_H = h_all.shape[1:]
            if vrows is None:
                h_rows = h_all.view(G, Ba, Lr + 1, *Ntok_H)[:, torch.arange(Ba, device=dev), n_acc]
            else:
                pos = torch.cumsum(valid.reshape(-1).to(torch.int64), 0).view(Ba, Lr + 1) - 1
                rowpos = pos[torch.arange(Ba, device=dev), n_acc]
                h_rows = h_all.view(G, -1, *Ntok_H)[:, rowpos]
            if self.hp is None:
                self.hp = torch.zeros(G, self.B, *Ntok_H, device=dev, dtype=h_all.dtype)
            hp_old = self.hp if act is None else self.hp[:, act]
            hp_new = torch.where(active[None, :, None, None], h_rows, hp_old)

        # ------------------------------------------------ statistics (device accumulators)
        if Lr > 0:
            judged = torch.minimum(n_acc + 1, nd)
            jj = self.jr[None, :Lr]
            ind = (idx[:, None] - jj).clamp(min=0)
            prop = (jj < judged[:, None]).to(torch.int64)
            acc = (jj < n_acc[:, None]).to(torch.int64)
            self.prop_by_index.scatter_add_(0, ind.reshape(-1), prop.reshape(-1))
            self.acc_by_index.scatter_add_(0, ind.reshape(-1), acc.reshape(-1))
            slot_prop, slot_acc = prop.sum(1), acc.sum(1)
            if act is None:
                self.prop_slot.add_(slot_prop)
                self.acc_slot.add_(slot_acc)
            else:
                self.prop_slot.index_add_(0, act, slot_prop)
                self.acc_slot.index_add_(0, act, slot_acc)
            rc = torch.where(active, res.residual_candidates.long(), torch.zeros_like(idx))
            self.counters[0] += (active & (n_acc < nd)).sum()
            self.counters[1] += rc.sum()
            self.counters[2] = torch.maximum(self.counters[2], rc.max())
            self.counters[3] += (res.fallbacks & active).sum()

        # ------------------------------------------------ write the slot state back
        if act is None:
            self.x.copy_(x_new)
            self.idx.sub_(adv)
            if hp_new is not None:
                self.hp.copy_(hp_new)
                self.has_h.logical_or_(active)
            self.rounds.add_(active.to(torch.int64))
            self.steps.add_(adv)
        else:
            self.x.index_copy_(0, act, x_new)
            self.idx.index_copy_(0, act, idx - adv)
            if hp_new is not None:
                self.hp.index_copy_(1, act, hp_new)
                self.has_h.index_copy_(0, act, has_h | active)
            self.rounds.index_add_(0, act, active.to(torch.int64))
            self.steps.index_add_(0, act, adv)
        self._end_round(timed, t0, t1, t2)

    def _end_round(self, timed: bool, t0: float, t1: float, t2: float) -> None:
        """Close the round's phases: draft t0..t1, verify t1..t2, accept t2..now (when timed)."""
        t3 = self._tick(timed)
        nvtx_phase(None)
        if timed:
            self.t_draft += t1 - t0
            self.t_verify += t2 - t1
            self.t_accept += t3 - t2

    def _tick(self, timed: bool) -> float:
        if not timed:
            return 0.0
        if self.s.profile and self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        return time.perf_counter()

    # ------------------------------------------------------------ stats
    def stats(self, total_s: float, rounds_of: List[int], steps_of: List[int]) -> FreeStats:
        s = self.s
        ctr = self.counters.tolist()
        return FreeStats(
            mode="exact" if s.relax is None or s.relax.exact else "relax", batch_size=self.B, num_steps=self.N,
            draft_length=self.L, target_calls=self.n_rounds, drafter_calls=self.drafter_calls, rounds=self.n_rounds,
            target_rows=self.target_rows, drafter_rows=self.drafter_rows, sample_rounds=list(rounds_of),
            steps_per_sample=list(steps_of), accepted_by_index=self.acc_by_index.tolist(),
            proposed_by_index=self.prop_by_index.tolist(), residual_rejections=int(ctr[0]),
            residual_candidates=int(ctr[1]), residual_max_candidates=int(ctr[2]), residual_fallbacks=int(ctr[3]),
            time_draft_s=self.t_draft, time_verify_s=self.t_verify, time_accept_s=self.t_accept,
            time_total_s=total_s, host_reads=self.host_reads, layout=self.layout, graphs=self.graph_note,
            relax=None if s.relax is None else s.relax.describe(),
            draft_length_mode="fixed" if self.plan is None else "auto", rounds_by_draft_length=list(self.rounds_by_L),
            plan=None if self.plan is None else self.plan.record().as_dict())


class _GraphedRound:
    """A CUDA graph of one static round (all state in persistent device tensors)."""

    def __init__(self, body, dev: torch.device):
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            with torch.cuda.graph(self.graph, stream=stream):
                body()
        torch.cuda.current_stream(dev).wait_stream(stream)

    def replay(self) -> None:
        self.graph.replay()


def _drops_labels(m) -> bool:
    """Does ``m`` (in train() mode) replace labels by the null class at random?  (our DiT's and diffusers'
    label embedders both keep the rate in ``dropout_prob``)"""
    if not isinstance(m, torch.nn.Module):
        return False
    return any(sub.training and float(getattr(sub, "dropout_prob", 0) or 0) > 0 for sub in m.modules())


def _module_dtype(m):
    try:
        return next(m.parameters()).dtype
    except (AttributeError, StopIteration, TypeError):
        return None


def _module_device(m):
    try:
        return next(m.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return None

"""The FREE sampler: draft, verify in one batched multi-timestep target call, accept exactly.

A thin composition of the three op families (``free_kernels.ops``):
``drafter_forward`` / ``draft_transition`` (drafting), ``verify_attention``
(inside the target's forward) and ``speculative_accept`` (acceptance and
residual resampling).  See ``free-method.md`` in the docs for the rule and
the README for the guarantees.

Every sample keeps its own respaced index; one target call per round verifies
every active sample's parents, each row at its own timestep; finished samples
drop out.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from . import ops
from ._checks import check_finite, check_tensor
from .diffusion.gaussian_diffusion import GaussianDiffusion, ModelMeanType, ModelVarType
from .models.drafter import FeatureDrafter
from .nvtx import nvtx_phase
from .reference.draft_transition import guided_transition
from .relax import RelaxPolicy, as_policy

__all__ = ["FreeSampler", "FreeStats"]


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
    time_draft_s: float = 0.0
    time_verify_s: float = 0.0
    time_accept_s: float = 0.0
    time_total_s: float = 0.0
    relax: Optional[str] = None

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
    draft_length: drafts per round (L >= 1).
    relax: None (exact), a strength >= 0, or a :class:`RelaxPolicy` (approximate).
    clip_denoised: as the baseline sampler (the DiT scripts use False).
    """

    def __init__(self, target, drafter, diffusion: GaussianDiffusion, draft_length: int = 6, relax=None,
                 clip_denoised: bool = False, accept_backend: Optional[str] = None,
                 residual_candidates_per_iter: int = 8, residual_max_candidates: int = 100_000):
        if not isinstance(draft_length, (int, np.integer)) or isinstance(draft_length, bool) or draft_length < 1:
            raise ValueError(f"draft_length must be an int >= 1, got {draft_length!r}")
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
        self.draft_length = int(draft_length)
        self.relax: Optional[RelaxPolicy] = as_policy(relax)
        self.clip_denoised = clip_denoised
        self.accept_backend = accept_backend
        self.residual_candidates_per_iter = residual_candidates_per_iter
        self.residual_max_candidates = residual_max_candidates
        self.equal_variance = diffusion.model_var_type in (ModelVarType.FIXED_LARGE, ModelVarType.FIXED_SMALL)
        tm = getattr(diffusion, "timestep_map", None)
        self._tmap = np.asarray(tm if tm is not None else np.arange(diffusion.num_timesteps), dtype=np.int64)

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def sample(self, noise: torch.Tensor, y: torch.Tensor, cfg_scale: float = 1.0, guidance_channels: int = 3,
               generator: Optional[torch.Generator] = None, progress: bool = False):
        """Sample from x_T = ``noise`` (B, C, S, S) with labels ``y`` (B,).

        With ``cfg_scale > 1`` guidance is applied as the baseline applies it
        (``forward_with_cfg``); pass B samples, not a doubled batch.  Returns
        ``(samples, stats)``.
        """
        target, diffusion = self.target, self.diffusion
        C, S = int(target.in_channels), int(target.input_size)
        check_tensor("noise", noise, dim=4, floating=True)
        if noise.shape[1:] != (C, S, S):
            raise ValueError(f"noise must have shape (B, {C}, {S}, {S}) for this target, got {tuple(noise.shape)}")
        tdev = _module_device(target)
        if tdev is not None and tdev != noise.device:
            raise ValueError(f"noise is on {noise.device} but the target is on {tdev}")
        check_tensor("y", y, shape=(noise.shape[0],), floating=False, device=noise.device)
        check_finite("noise", noise)
        if bool((y < 0).any()) or bool((y >= target.num_classes + 1).any()):
            raise ValueError(f"y must hold labels in [0, {target.num_classes}], got {y.tolist()}")
        if not isinstance(cfg_scale, (int, float)) or cfg_scale != cfg_scale:
            raise ValueError(f"cfg_scale must be a number, got {cfg_scale!r}")
        if guidance_channels not in (3, 4):
            raise ValueError(f"guidance_channels must be 3 (official DiT) or 4 (diffusers), got {guidance_channels}")
        cfg = cfg_scale != 1.0
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError("generator must be a torch.Generator (one stream for the whole batch)")
        return self._run(noise, y, cfg, float(cfg_scale), guidance_channels, generator, progress)

    # ------------------------------------------------------------- internals
    def _t_orig(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self._tmap, device=idx.device)[idx]

    def _sync(self, dev):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def _run(self, noise, y, cfg, cfg_scale, gc, generator, progress):
        target, diffusion, drafter = self.target, self.diffusion, self.drafter
        dev = noise.device
        B, C, S, _ = noise.shape
        D = C * S * S
        N = diffusion.num_timesteps
        L = self.draft_length
        G = 2 if cfg else 1
        st = FreeStats(mode="exact" if self.relax is None or self.relax.exact else "relax", batch_size=B,
                       num_steps=N, draft_length=L, sample_rounds=[0] * B, steps_per_sample=[0] * B,
                       accepted_by_index=[0] * N, proposed_by_index=[0] * N,
                       relax=None if self.relax is None else self.relax.describe())
        # the chain's state and every transition parameter stay in fp32 whatever the model's dtype:
        # acceptance must judge exactly the numbers that are emitted (a half-precision state would be
        # rounded after its density was evaluated)
        mdt = _module_dtype(target) or torch.float32
        x = noise.float().clone()
        idx = np.full(B, N - 1, dtype=np.int64)
        hp: Optional[torch.Tensor] = None  # (G, B, Ntok, H) exact features of each state's parent
        has_h = np.zeros(B, dtype=bool)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=B * N, desc=f"FREE (L={L})", unit="step")
        t_start = time.perf_counter()

        while True:
            act = np.nonzero(idx >= 0)[0]
            if act.size == 0:
                break
            Ba = act.size
            a_t = torch.as_tensor(act, device=dev)
            i_a = idx[act]
            n_draft = np.where(has_h[act], np.minimum(L, i_a), 0)
            Lr = int(n_draft.max())
            ya = y[a_t]
            parents = [x[a_t]]  # parents[j]: (Ba, C, S, S); rows beyond n_draft unused

            # ------------------------------------------------ draft
            t0 = time.perf_counter()
            nvtx_phase("draft")  # NVTX phase range (free_kernels.nvtx; off unless FREE_KERNELS_NVTX=1)
            mean_q = torch.zeros(Ba, L, D, device=dev, dtype=torch.float32)
            logvar_q = torch.zeros_like(mean_q)
            noise_q = torch.zeros_like(mean_q)
            if Lr > 0:
                cur_h = hp[:, a_t]  # (G, Ba, Ntok, H)
                for j in range(Lr):
                    rows_np = np.nonzero(n_draft > j)[0]
                    rows = torch.as_tensor(rows_np, device=dev)
                    R = rows_np.size
                    xr = parents[j][rows]
                    ir = torch.as_tensor(i_a[rows_np] - j, device=dev)
                    tr = self._t_orig(ir)
                    yr = ya[rows]
                    h_in = cur_h[:, rows].reshape(G * R, *cur_h.shape[2:])
                    x_in = xr.repeat(G, 1, 1, 1)
                    t_in = tr.repeat(G)
                    y_in = torch.cat([yr, torch.full_like(yr, int(target.num_classes))]) if cfg else yr
                    h_new = ops.drafter_forward(drafter, h_in, x_in.to(mdt), t_in, y_in)
                    c_new = target.embed_condition(t_in, y_in)
                    xi = torch.randn(xr.shape, generator=generator, device=dev, dtype=xr.dtype)
                    x_next, mq, lvq = ops.draft_transition(target, diffusion, h_new, c_new, xr, ir, xi,
                                                           cfg_scale=cfg_scale, guidance_channels=gc,
                                                           clip_denoised=self.clip_denoised)
                    mean_q[rows, j] = mq.reshape(R, D)
                    logvar_q[rows, j] = lvq.reshape(R, D)
                    noise_q[rows, j] = xi.reshape(R, D)
                    nxt = parents[j].clone()
                    nxt[rows] = x_next
                    parents.append(nxt)
                    cur_h = cur_h.clone()
                    cur_h[:, rows] = h_new.reshape(G, R, *cur_h.shape[2:])
                    st.drafter_calls += 1
                    st.drafter_rows += R
            self._sync(dev)
            t1 = time.perf_counter()
            nvtx_phase("verify")

            # ------------------------------------------------ verify (one batched target call)
            k_of_row, j_of_row = [], []
            for k in range(Ba):
                for j in range(int(n_draft[k]) + 1):
                    k_of_row.append(k)
                    j_of_row.append(j)
            k_t = torch.as_tensor(k_of_row, device=dev)
            j_np = np.asarray(j_of_row)
            R = len(k_of_row)
            X = torch.stack([parents[j][k] for k, j in zip(k_of_row, j_of_row)])
            I_np = i_a[np.asarray(k_of_row)] - j_np
            I = torch.as_tensor(I_np, device=dev)
            T = self._t_orig(I)
            Y = ya[k_t]
            if cfg:
                XX, TT, YY = torch.cat([X, X]), torch.cat([T, T]), torch.cat([Y, torch.full_like(Y, int(target.num_classes))])
            else:
                XX, TT, YY = X, T, Y
            h_all, c_all = target.forward_features(XX.to(mdt), TT, YY)
            out = target.forward_head(h_all, c_all).float()
            tr = guided_transition(diffusion, out, X, I, cfg=cfg, cfg_scale=cfg_scale, guidance_channels=gc,
                                   in_channels=C, clip_denoised=self.clip_denoised)
            st.target_calls += 1
            st.target_rows += R
            mean_p = torch.zeros(Ba, L + 1, D, device=dev, dtype=torch.float32)
            logvar_p = torch.zeros_like(mean_p)
            jt = torch.as_tensor(j_np, device=dev)
            mean_p[k_t, jt] = tr["mean"].reshape(R, D)
            logvar_p[k_t, jt] = tr["log_variance"].reshape(R, D)
            self._sync(dev)
            t2 = time.perf_counter()
            nvtx_phase("accept")

            # ------------------------------------------------ accept
            nd_t = torch.as_tensor(n_draft, device=dev)
            det_last = torch.as_tensor(i_a - n_draft == 0, device=dev)
            tau = None
            if self.relax is not None and not self.relax.exact and L > 0:
                slot_idx = torch.as_tensor(i_a[:, None] - np.arange(L)[None, :], device=dev)
                tau = self.relax.tau(diffusion, logvar_p[:, :L], slot_idx)
            res = ops.speculative_accept(
                mean_p, logvar_p, mean_q, logvar_q, noise_q, nd_t, det_last,
                equal_variance=self.equal_variance, tau=tau, generator=generator, backend=self.accept_backend,
                candidates_per_iter=self.residual_candidates_per_iter,
                max_candidates=self.residual_max_candidates,
            )
            n_acc = res.num_accepted.cpu().numpy().astype(np.int64)
            x[a_t] = res.out.view(Ba, C, S, S).float()
            # exact features of each new state's parent: verification row (k, n_acc[k])
            row_start = np.concatenate([[0], np.cumsum(n_draft + 1)[:-1]])
            sel = torch.as_tensor(row_start + n_acc, device=dev)
            h_rows = h_all.view(G, R, *h_all.shape[1:])[:, sel]
            if hp is None:
                hp = torch.zeros(G, B, *h_all.shape[1:], device=dev, dtype=h_all.dtype)
            hp[:, a_t] = h_rows
            has_h[act] = True
            self._sync(dev)
            t3 = time.perf_counter()
            nvtx_phase(None)

            # ------------------------------------------------ bookkeeping
            adv = n_acc + 1
            idx[act] -= adv
            rc = res.residual_candidates.cpu().numpy()
            for k in range(Ba):
                b, i0 = act[k], i_a[k]
                st.sample_rounds[b] += 1
                st.steps_per_sample[b] += int(adv[k])
                judged = min(int(n_acc[k]) + 1, int(n_draft[k]))
                for j in range(judged):
                    st.proposed_by_index[i0 - j] += 1
                    if j < n_acc[k]:
                        st.accepted_by_index[i0 - j] += 1
                if n_acc[k] < n_draft[k]:
                    st.residual_rejections += 1
            st.residual_candidates += int(rc.sum())
            st.residual_max_candidates = max(st.residual_max_candidates, int(rc.max()) if rc.size else 0)
            st.residual_fallbacks += int(res.fallbacks.sum())
            st.rounds += 1
            st.time_draft_s += t1 - t0
            st.time_verify_s += t2 - t1
            st.time_accept_s += t3 - t2
            if bar is not None:
                bar.update(int(adv.sum()))
                bar.set_postfix(spc=f"{st.steps_per_target_call:.2f}")
        if bar is not None:
            bar.close()
        st.time_total_s = time.perf_counter() - t_start
        return x.to(noise.dtype), st


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

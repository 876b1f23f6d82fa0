"""Reference exact acceptance / residual resampling for one FREE round, whole batch at once.

Shapes (B samples, L draft slots, D = C*S*S elements):

* ``mean_q, logvar_q, noise_q``: (B, L, D) drafted transitions q_j and the
  standard-normal noise xi_j that produced the drafts x~_{j+1} = mean_q + exp(logvar_q / 2) * xi_j.
* ``mean_p, logvar_p``: (B, L + 1, D) target transitions p_0 .. p_L at the
  parents x~_0 .. x~_L.
* ``num_drafts``: (B,) int, drafts actually proposed for each sample (0 .. L);
  slots beyond it are ignored.
* ``deterministic_last``: (B,) bool, True when p_{num_drafts} is the last
  (index 0) transition, whose output is its mean (no noise).

Rule (docs/method.md, "The acceptance rule"): for j < num_drafts in order accept x~_{j+1} iff
log u_j < log p_j(x~_{j+1}) - log q_j(x~_{j+1})  (divided by tau_j under
relax).  At the first rejection j* the output is a sample of the residual
(p_j* - q_j*)_+ and ``num_accepted = j*``; if every draft is accepted the output
is the bonus step from p_{num_drafts} and ``num_accepted = num_drafts``.
The number of steps advanced is always ``num_accepted + 1``.

Residual samplers:

* ``equal_variance=True`` (logvar_q == logvar_p, the fixed-variance samplers):
  reflection maximal coupling, no extra randomness: with d = (mu_p - mu_q)/sigma,
  e = d/|d|, output mu_p + sigma * (xi - 2 <e, xi> e).
* otherwise: rejection sampling from (p - q)_+: propose z ~ p, keep it with
  probability 1 - q(z)/p(z), repeat.  Candidates are drawn in batches of
  ``candidates_per_iter``; ``residual_noise`` (B, K, D) / ``residual_uniforms``
  (B, K) may supply the first K candidates (for tests); afterwards the
  generator is used.  The loop stops after ``max_candidates`` per sample, in
  which case the last proposal from p is returned and the sample is counted in
  ``fallbacks`` (probability <= 1/(e * max_candidates) per rejected step, see
  the README).

Reductions are accumulated in float64.  NaN in any input makes the log ratio
NaN, which never compares as an accept; the output then carries the NaN
(documented propagation, never a silent accept).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class AcceptResult:
    out: torch.Tensor            # (B, D) next state
    num_accepted: torch.Tensor   # (B,) int32
    log_ratio: torch.Tensor      # (B, L) float32 log p/q of each draft (garbage beyond num_drafts)
    residual_candidates: torch.Tensor  # (B,) int32 candidates drawn by the unequal-variance residual sampler
    fallbacks: torch.Tensor      # (B,) bool: residual sampler hit max_candidates


def log_ratio_equal_var(mean_p, mean_q, logvar, noise_q):
    """<d, xi> - |d|^2 / 2 with d = (mu_p - mu_q) / sigma, per (b, j), in float64."""
    d = (mean_p.double() - mean_q.double()) * torch.exp(-0.5 * logvar.double())
    xi = noise_q.double()
    return (d * xi).sum(-1) - 0.5 * (d * d).sum(-1)


def log_ratio_general(mean_p, logvar_p, mean_q, logvar_q, noise_q):
    """log p(x) - log q(x) at x = mu_q + sigma_q * xi, per (b, j), in float64."""
    xi = noise_q.double()
    lvq = logvar_q.double()
    lvp = logvar_p.double()
    x = mean_q.double() + torch.exp(0.5 * lvq) * xi
    zp = (x - mean_p.double()) * torch.exp(-0.5 * lvp)
    return (-0.5 * zp * zp - 0.5 * lvp + 0.5 * xi * xi + 0.5 * lvq).sum(-1)


class _StateGenerator:
    """The generator of the reference's own draws, created on first use.

    ``generator`` when given; otherwise, when ``rng_state`` ([seed, offset]) is
    given, a generator seeded from it (and ``rng_state[1]`` advanced by one), so
    that a caller that owns only an ``rng_state`` (as in a compiled or captured
    round) still gets reproducible draws; otherwise the global generator.
    """

    def __init__(self, generator, rng_state, device):
        self.generator, self.rng_state, self.device, self.made = generator, rng_state, device, False

    def __call__(self):
        if self.generator is None and self.rng_state is not None and not self.made:
            seed, offset = (int(v) for v in self.rng_state.tolist())
            mixed = (seed * 0x9E3779B97F4A7C15 + offset * 0xBF58476D1CE4E5B9 + 1) % (2 ** 63)
            self.generator = torch.Generator(device=self.device).manual_seed(mixed)
            self.rng_state[1] += 1
        self.made = True
        return self.generator


def _rand(shape, generator, device, normal=False):
    if callable(generator) and not isinstance(generator, torch.Generator):
        generator = generator()
    if normal:
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)


def speculative_accept(
    mean_p: torch.Tensor,
    logvar_p: torch.Tensor,
    mean_q: torch.Tensor,
    logvar_q: torch.Tensor,
    noise_q: torch.Tensor,
    num_drafts: torch.Tensor,
    deterministic_last: torch.Tensor,
    *,
    equal_variance: bool,
    uniforms: Optional[torch.Tensor] = None,
    bonus_noise: Optional[torch.Tensor] = None,
    residual_noise: Optional[torch.Tensor] = None,
    residual_uniforms: Optional[torch.Tensor] = None,
    tau: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    out: Optional[torch.Tensor] = None,
    candidates_per_iter: int = 8,
    max_candidates: int = 100_000,
    rng_state: Optional[torch.Tensor] = None,
) -> AcceptResult:
    # rng_state ([seed, offset], the kernel backends' counter-based generator) seeds this
    # reference's draws only when no generator is given and something must be drawn
    # (see _StateGenerator); with every random input given it is left untouched.
    B, L1, D = mean_p.shape
    L = L1 - 1
    dev = mean_p.device
    generator = _StateGenerator(generator, rng_state, dev)
    if uniforms is None:
        uniforms = _rand((B, L), generator, dev)
    if bonus_noise is None:
        bonus_noise = _rand((B, D), generator, dev, normal=True)

    # ---- log ratios and the first rejection
    if L > 0:
        if equal_variance:
            lr = log_ratio_equal_var(mean_p[:, :L], mean_q, logvar_p[:, :L], noise_q)
        else:
            lr = log_ratio_general(mean_p[:, :L], logvar_p[:, :L], mean_q, logvar_q, noise_q)
        thr = lr if tau is None else lr / tau.double()
        accept = torch.log(uniforms.double()) < thr  # NaN -> False
        slot = torch.arange(L, device=dev)[None, :]
        valid = slot < num_drafts.long()[:, None]
        rejected = valid & ~accept
        # first rejected slot, or num_drafts when every valid draft was accepted
        first_rej = torch.where(rejected, slot.expand(B, L), torch.full_like(slot.expand(B, L), L)).amin(1)
        num_acc = torch.minimum(first_rej, num_drafts.long())
    else:
        lr = torch.zeros(B, 0, dtype=torch.float64, device=dev)
        num_acc = torch.zeros(B, dtype=torch.long, device=dev)
    any_reject = num_acc < num_drafts.long()

    if out is None:
        out = torch.empty(B, D, dtype=mean_p.dtype, device=dev)
    cand_count = torch.zeros(B, dtype=torch.int32, device=dev)
    fallbacks = torch.zeros(B, dtype=torch.bool, device=dev)
    bidx = torch.arange(B, device=dev)

    # ---- bonus step (all drafts accepted): one exact step from p_{num_drafts}
    jb = num_drafts.long().clamp(max=L)
    mp_b, lvp_b = mean_p[bidx, jb], logvar_p[bidx, jb]
    sig_b = torch.exp(0.5 * lvp_b)
    keep_noise = (~deterministic_last.bool()).to(mean_p.dtype)[:, None]
    bonus = mp_b + keep_noise * sig_b * bonus_noise
    result = bonus

    if L > 0 and bool(any_reject.any()):
        js = num_acc.clamp(max=L - 1)
        mp, lvp = mean_p[bidx, js], logvar_p[bidx, js]
        mq, lvq, xi = mean_q[bidx, js], logvar_q[bidx, js], noise_q[bidx, js]
        if equal_variance:
            sig = torch.exp(0.5 * lvp)
            d = (mp - mq) / sig
            dn = torch.linalg.vector_norm(d.double(), dim=-1, keepdim=True)
            # |d| = 0: p == q, nothing to reflect (e = 0); a NaN |d| propagates into the row
            e = torch.where(dn == 0, torch.zeros_like(d, dtype=torch.float64), d.double() / dn)
            proj = (e * xi.double()).sum(-1, keepdim=True)
            resid = (mp.double() + sig.double() * (xi.double() - 2.0 * proj * e)).to(mean_p.dtype)
        else:
            resid, cand_count, fallbacks = _residual_rejection(
                mp, lvp, mq, lvq, any_reject, residual_noise, residual_uniforms, generator,
                candidates_per_iter, max_candidates,
            )
        result = torch.where(any_reject[:, None], resid, bonus)
    out.copy_(result)
    return AcceptResult(out=out, num_accepted=num_acc.to(torch.int32), log_ratio=lr.float(),
                        residual_candidates=cand_count, fallbacks=fallbacks)


def residual_log_accept(z_std, mp, lvp, mq, lvq):
    """log(1 - q(z)/p(z)) ingredients: returns log q(z) - log p(z) for z = mp + sigma_p * z_std (float64)."""
    lvp64, lvq64 = lvp.double(), lvq.double()
    z = mp.double() + torch.exp(0.5 * lvp64) * z_std.double()
    zq = (z - mq.double()) * torch.exp(-0.5 * lvq64)
    lq_minus_lp = (-0.5 * zq * zq - 0.5 * lvq64 + 0.5 * z_std.double() ** 2 + 0.5 * lvp64).sum(-1)
    return z, lq_minus_lp


def _residual_rejection(mp, lvp, mq, lvq, need, residual_noise, residual_uniforms, generator,
                        per_iter, max_candidates):
    """Sample (p - q)_+ / TV by rejection from p for the rows where ``need`` is True."""
    B, D = mp.shape
    dev = mp.device
    out = mp.clone()
    count = torch.zeros(B, dtype=torch.int32, device=dev)
    fallbacks = torch.zeros(B, dtype=torch.bool, device=dev)
    todo = need.clone()
    given = 0 if residual_noise is None else residual_noise.shape[1]
    used = 0
    while bool(todo.any()):
        rows = todo.nonzero().squeeze(1)
        if used < given:
            k = given - used
            zs = residual_noise[rows, used:used + k]
            us = residual_uniforms[rows, used:used + k]
        else:
            k = per_iter
            zs = _rand((rows.numel(), k, D), generator, dev, normal=True)
            us = _rand((rows.numel(), k), generator, dev)
        z, lq_lp = residual_log_accept(zs, mp[rows, None], lvp[rows, None], mq[rows, None], lvq[rows, None])
        # keep with probability 1 - q/p  <=>  u < 1 - exp(lq - lp)  <=>  u < -expm1(lq - lp)
        keep = us.double() < -torch.expm1(torch.clamp(lq_lp, max=0.0))
        keep = keep & (lq_lp < 0)
        # a NaN row can never be accepted: emit NaN instead of looping to max_candidates
        nan_row = torch.isnan(lq_lp).all(1)
        if bool(nan_row.any()):
            out[rows[nan_row]] = float("nan")
            todo[rows[nan_row]] = False
            keep = keep & ~nan_row[:, None]
        has = keep.any(1)
        first = torch.where(keep, torch.arange(k, device=dev)[None], torch.full_like(keep, k, dtype=torch.long)).amin(1)
        taken = torch.where(has, first + 1, torch.full_like(first, k))
        count[rows] += taken.to(torch.int32)
        done_rows = rows[has]
        if done_rows.numel():
            out[done_rows] = z[has, first[has]].to(out.dtype)
        todo[done_rows] = False
        used += k
        over = todo & (count >= max_candidates)
        if bool(over.any()):
            r = over.nonzero().squeeze(1)
            sel = (rows[:, None] == r[None]).any(1)
            out[r] = z[sel, -1].to(out.dtype)
            fallbacks[r] = True
            todo[r] = False
    return out, count, fallbacks

"""Drafter distillation: a :class:`~free_kernels.models.FeatureDrafter` trained from a frozen target.

The library behind ``free-train-drafter`` (:mod:`free_kernels.cli.train_drafter`, which adds the
options, the trajectory cache, checkpoints and the report):

* :func:`generate_trajectories`: the target's own ancestral sampler, recording per step the state,
  the exact top-block features (both CFG branches) and the guided transition p;
* :func:`draft_window`: the drafter unrolled over consecutive steps of recorded trajectories from the
  exact parent features, feeding its own predictions forward, each drafted transition q compared with
  the recorded p (:func:`transition_losses`: KL(q || p) and the whitened mean discrepancy) and the
  drafted features with the exact ones;
* :func:`combine_loss`: one of :data:`LOSSES` from a window; ``steps`` is minus the expected drafts
  accepted, with per-step acceptance :func:`acceptance_from_kl`;
* :func:`train_step`: one optimisation step on a window, at the learning rate of
  :func:`learning_rate`;
* evaluation: :func:`evaluate_acceptance` (held-out KL per respaced index), :func:`measure_free`
  (exact FREE with the drafter), :func:`filled_profile` (the per-index acceptance the draft-length
  planner reads), :func:`expected_steps`;
* :func:`split_trajectories` (trajectories per respacing of a multi-respacing run) and
  :func:`narrowed_state` (a drafter's weights for a drafter with narrower MLPs).
"""
from __future__ import annotations

import math
from typing import Dict

import numpy as np
import torch

from .diffusion.gaussian_diffusion import GaussianDiffusion
from .diffusion.guidance import uses_cfg
from .models.drafter import FeatureDrafter
from .ops.drafter_forward import drafter_extras
from .reference.draft_transition import guided_transition
from .sampler import FreeSampler

__all__ = [
    "LOSSES", "generate_trajectories", "transition_losses", "acceptance_from_kl", "draft_window", "combine_loss",
    "learning_rate", "train_step", "evaluate_acceptance", "measure_free", "expected_steps", "filled_profile",
    "split_trajectories", "narrowed_state",
]

LOSSES = ("kl", "whitened", "feature", "kl+feature", "steps", "steps+feature")


# ------------------------------------------------------------------ trajectories
@torch.no_grad()
def generate_trajectories(target, diffusion: GaussianDiffusion, num: int, *, cfg_scale: float = 1.0,
                          guidance_channels: int = 3, batch_size: int = 64, seed: int = 0, device="cpu",
                          clip_denoised: bool = False, progress: bool = True, feature_dtype=torch.float16) -> Dict:
    """Run the target's ancestral sampler and record what drafter training needs.

    Returns tensors indexed [sample, k] with k = 0 .. N-1 the position in the
    loop (respaced index i = N-1-k): ``x`` (states entering step k), ``h``
    (exact top-block features of x, shape [num, N, G, tokens, H], G = 2 with
    CFG: cond, uncond), ``mean``/``logvar`` (guided transition p), and ``y``.
    """
    N = diffusion.num_timesteps
    C, S = int(target.in_channels), int(target.input_size)
    cfg = uses_cfg(cfg_scale)  # the baseline's rule: guidance above 1
    G = 2 if cfg else 1
    gen = torch.Generator(device="cpu").manual_seed(seed)
    xs, hs, ms, lvs, ys = [], [], [], [], []
    tmap = torch.as_tensor(np.asarray(getattr(diffusion, "timestep_map", range(N))), device=device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num * N, desc="trajectories", unit="step")
    for b0 in range(0, num, batch_size):
        B = min(batch_size, num - b0)
        x = torch.randn(B, C, S, S, generator=gen).to(device)
        y = torch.randint(0, int(target.num_classes), (B,), generator=gen).to(device)
        X = torch.empty(B, N, C, S, S)
        M = torch.empty(B, N, C * S * S)
        LV = torch.empty(B, N, C * S * S)
        Hf = None
        for k in range(N):
            i = N - 1 - k
            idx = torch.full((B,), i, device=device, dtype=torch.long)
            t = tmap[idx]
            if cfg:
                h, c = target.forward_features(torch.cat([x, x]), torch.cat([t, t]),
                                               torch.cat([y, torch.full_like(y, int(target.num_classes))]))
            else:
                h, c = target.forward_features(x, t, y)
            out = target.forward_head(h, c)
            tr = guided_transition(diffusion, out, x, idx, cfg=cfg, cfg_scale=cfg_scale,
                                   guidance_channels=guidance_channels, in_channels=C, clip_denoised=clip_denoised)
            if Hf is None:
                Hf = torch.empty(B, N, G, *h.shape[1:], dtype=feature_dtype)
            X[:, k] = x.cpu()
            Hf[:, k] = h.view(G, B, *h.shape[1:]).transpose(0, 1).to(feature_dtype).cpu()
            M[:, k] = tr["mean"].reshape(B, -1).cpu()
            LV[:, k] = tr["log_variance"].reshape(B, -1).cpu()
            noise = torch.randn(B, C, S, S, generator=gen).to(device)
            x = tr["mean"] + (i > 0) * torch.exp(0.5 * tr["log_variance"]) * noise
            if bar is not None:
                bar.update(B)
        xs.append(X)
        hs.append(Hf)
        ms.append(M)
        lvs.append(LV)
        ys.append(y.cpu())
    if bar is not None:
        bar.close()
    return dict(x=torch.cat(xs), h=torch.cat(hs), mean=torch.cat(ms), logvar=torch.cat(lvs), y=torch.cat(ys),
                cfg_scale=cfg_scale, guidance_channels=guidance_channels, num_steps=N)


# ------------------------------------------------------------------ losses
def transition_losses(mq, lvq, mp, lvp):
    """Per-row (KL(q||p), whitened mean discrepancy |d|^2) summed over elements, in fp32."""
    ivp = torch.exp(-lvp)
    d2 = ((mp - mq) ** 2 * ivp).sum(-1)
    r = lvq - lvp
    kl = 0.5 * (torch.exp(r) - 1 - r).sum(-1) + 0.5 * d2
    return kl, d2


def acceptance_from_kl(kl: torch.Tensor) -> torch.Tensor:
    """Acceptance 1 - TV(q, p) of two Gaussians with equal (diagonal) variances, through their KL:
    with whitened mean distance delta, KL = delta^2 / 2 and 1 - TV = 2 Phi(-delta / 2) = 1 - erf(sqrt(KL) / 2).
    Differentiable everywhere (a small floor under the square root); a surrogate where the variances differ."""
    return 1.0 - torch.erf(torch.sqrt(kl.clamp_min(0.0) + 1e-8) / 2.0)


def draft_window(drafter, target, diffusion, traj, b, k0, unroll, *, cfg_scale, guidance_channels, device,
                 clip_denoised=False):
    """Unroll the drafter over positions k0 .. k0+unroll-1 of trajectories ``b``.

    Returns per step (kl, whitened d^2) per sample (B,) and the feature mse (averaged).
    """
    N = traj["num_steps"]
    cfg = traj["h"].shape[2] == 2
    G = 2 if cfg else 1
    C = int(target.in_channels)
    B = b.numel()
    y = traj["y"][b].to(device)
    tmap = torch.as_tensor(np.asarray(getattr(diffusion, "timestep_map", range(N))), device=device)
    h_prev = traj["h"][b, k0 - 1].to(device).float().transpose(0, 1).reshape(G * B, *traj["h"].shape[3:])
    y_in = torch.cat([y, torch.full_like(y, int(target.num_classes))]) if cfg else y
    outs = []
    for u in range(unroll):
        k = k0 + u
        i = N - 1 - k
        x = traj["x"][b, k].to(device)
        idx = torch.full((B,), i, device=device, dtype=torch.long)
        t = tmap[idx]
        x_in = x.repeat(G, 1, 1, 1)
        t_in = t.repeat(G)
        t_nx = tmap[idx - 1].repeat(G)  # the step being drafted (i >= 1: index 0 is never drafted)
        c = target.embed_condition(t_in, y_in)  # shared by the drafter and the head, as in the sampler
        h = drafter(h_prev, x_in, t_in, y_in, **drafter_extras(drafter, t_nx, c))
        out = target.forward_head(h, c)
        tr = guided_transition(diffusion, out, x, idx, cfg=cfg, cfg_scale=cfg_scale,
                               guidance_channels=guidance_channels, in_channels=C, clip_denoised=clip_denoised)
        mp = traj["mean"][b, k].to(device)
        lvp = traj["logvar"][b, k].to(device)
        kl, d2 = transition_losses(tr["mean"].reshape(B, -1), tr["log_variance"].reshape(B, -1), mp, lvp)
        h_true = traj["h"][b, k].to(device).float().transpose(0, 1).reshape(G * B, *traj["h"].shape[3:])
        fmse = ((h - h_true) ** 2).mean() / h_true.var().clamp_min(1e-8)
        outs.append((kl, d2, fmse))
        h_prev = h
    return outs


def combine_loss(kind, terms, feature_weight):
    """The training loss of one window (``terms``: :func:`draft_window`'s steps), each term averaged over the
    window's steps:

    * ``kl``: KL(q || p) (bounds the rejection rate 1 - acceptance = TV(p, q));
    * ``whitened``: the whitened mean discrepancy |(mu_p - mu_q) / sigma|^2 / 2 only;
    * ``feature``: the feature regression (MSE to the exact features, normalised by their variance);
    * ``steps``: minus the expected drafts accepted per window, sum_k prod_{j<=k} a_j with
      a_j = :func:`acceptance_from_kl` (a draft after the first rejection counts nothing);
    * ``kl+feature`` / ``steps+feature``: plus ``feature_weight`` x the feature term.
    """
    kl = sum(t[0].mean() for t in terms) / len(terms)
    d2 = sum(t[1].mean() for t in terms) / len(terms)
    fm = sum(t[2] for t in terms) / len(terms)
    if kind in ("steps", "steps+feature"):
        # expected drafts accepted per sample, normalised by the window: the chain stops at the first rejection
        chain = torch.cumprod(torch.stack([acceptance_from_kl(t[0]) for t in terms], dim=1), dim=1)
        steps = -chain.sum(dim=1).mean() / len(terms)
        return steps if kind == "steps" else steps + feature_weight * fm
    if kind == "kl":
        return kl
    if kind == "whitened":
        return 0.5 * d2
    if kind == "feature":
        return fm
    if kind == "kl+feature":
        return kl + feature_weight * fm
    raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")


# ------------------------------------------------------------------ training
def learning_rate(lr: float, step: int, total: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``total``: linear warm-up over 100 steps, cosine decay."""
    return lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / total))


def train_step(drafter, opt, target, diffusion, traj, b, k0, *, unroll, loss, feature_weight, lr, cfg_scale,
               guidance_channels, device):
    """One optimisation step on the window of ``unroll`` steps from position ``k0`` of trajectories ``b``:
    returns the loss and the window's terms (:func:`draft_window`).  Gradients are clipped to norm 1."""
    for g in opt.param_groups:
        g["lr"] = lr
    terms = draft_window(drafter, target, diffusion, traj, b, k0, unroll, cfg_scale=cfg_scale,
                         guidance_channels=guidance_channels, device=device)
    value = combine_loss(loss, terms, feature_weight)
    opt.zero_grad(set_to_none=True)
    value.backward()
    torch.nn.utils.clip_grad_norm_([p for p in drafter.parameters() if p.requires_grad], 1.0)
    opt.step()
    return value, terms


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_acceptance(drafter, target, diffusion, traj, *, cfg_scale, guidance_channels, device, max_rows=4096):
    """Per respaced position on held-out trajectories (one draft from the exact parent features): the mean
    KL(q || p) and whitened |d|^2 over the rows (an acceptance estimate per row: :func:`acceptance_from_kl`)."""
    N = traj["num_steps"]
    n = traj["x"].shape[0]
    kls = torch.zeros(N)
    d2s = torch.zeros(N)
    b_all = torch.arange(n)
    for k in range(1, N - 1):
        terms = draft_window(drafter, target, diffusion, traj, b_all[: min(n, max_rows)], k, 1,
                             cfg_scale=cfg_scale, guidance_channels=guidance_channels, device=device)
        kls[k] += float(terms[0][0].mean())
        d2s[k] += float(terms[0][1].mean())
    return kls, d2s


@torch.no_grad()
def measure_free(target, drafter, diffusion, *, n, draft_length, cfg_scale, guidance_channels, seed, device):
    """Exact FREE with ``drafter`` at a fixed draft length on ``n`` samples drawn from ``seed``: the run's
    :class:`~free_kernels.sampler.FreeStats` (steps per target call, acceptance, per-index acceptance)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    C, S = int(target.in_channels), int(target.input_size)
    noise = torch.randn(n, C, S, S, generator=g).to(device)
    y = torch.randint(0, int(target.num_classes), (n,), generator=g).to(device)
    s = FreeSampler(target, drafter, diffusion, draft_length=draft_length)
    _, st = s.sample(noise, y, cfg_scale=cfg_scale, guidance_channels=guidance_channels,
                     generator=torch.Generator(device=device).manual_seed(seed + 1) if device != "cpu" else
                     torch.Generator().manual_seed(seed + 1))
    return st


def expected_steps(a: float, L: int) -> float:
    """Expected steps per round with per-step acceptance a and draft length L (bonus counted)."""
    if a >= 1:
        return float(L + 1)
    return (1 - a ** (L + 1)) / (1 - a)


def filled_profile(profile) -> list:
    """Per-index acceptance with the never-drafted indices (None) filled from their nearest measured neighbour."""
    vals = list(profile)
    known = [i for i, v in enumerate(vals) if v is not None]
    if not known:
        return []
    return [round(float(vals[min(known, key=lambda k: abs(k - i))]), 4) for i in range(len(vals))]


# ------------------------------------------------------------------ data and weights
def split_trajectories(total: int, lengths: list) -> list:
    """``total`` trajectories split between respacings of ``lengths`` steps in proportion to 1 / length (every
    respacing gets about the same number of recorded steps, i.e. the same data and generation time), at least 1."""
    w = [1.0 / n for n in lengths]
    exact = [total * v / sum(w) for v in w]
    out = [max(1, int(e)) for e in exact]
    for i in sorted(range(len(w)), key=lambda i: int(exact[i]) - exact[i])[: max(0, total - sum(out))]:
        out[i] += 1  # largest remainders first
    return out


def narrowed_state(start: FeatureDrafter, drafter: FeatureDrafter) -> dict:
    """``start``'s weights for ``drafter``, whose blocks' MLPs may be narrower: each block keeps the hidden units
    with the largest |fc1 row| * |fc2 column| (the units whose removal changes the MLP's output least, to first
    order), in their original order; every other tensor is copied as is."""
    state = dict(start.state_dict())
    for i, (a, b) in enumerate(zip(start.blocks, drafter.blocks)):
        keep = b.mlp.fc1.out_features
        w1, b1, w2 = a.mlp.fc1.weight, a.mlp.fc1.bias, a.mlp.fc2.weight
        if keep == w1.shape[0]:
            continue
        units = (w1.norm(dim=1) * w2.norm(dim=0)).argsort(descending=True)[:keep].sort().values
        state[f"blocks.{i}.mlp.fc1.weight"] = w1[units].detach().clone()
        state[f"blocks.{i}.mlp.fc1.bias"] = b1[units].detach().clone()
        state[f"blocks.{i}.mlp.fc2.weight"] = w2[:, units].detach().clone()
    return state

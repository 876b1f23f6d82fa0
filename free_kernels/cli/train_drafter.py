"""Drafter distillation: train a FeatureDrafter from a frozen target with its own sampler.

    free-train-drafter --out runs/drafter                 # the embedded demo DiT, 250 steps, cfg 1
    free-train-drafter --target ckpt.pt --model DiT-XL/2 --image-size 256 --steps 250 --cfg-scale 1.5 ...
    free-train-drafter --respacings 50,100,250,1000 ...     # one drafter for every respacing

1. Trajectories: the target's own ancestral sampler (the CFG setting the drafter
   will be used with) is run on ``--num-trajectories`` samples; every step
   records the state x_i, the exact top-block features (both CFG branches) and
   the guided transition p_i.  ``--cache FILE`` keeps them on disk (reused when
   the file exists).
   With ``--respacings 50,100,250,1000`` trajectories are made for every
   respacing (``--num-trajectories`` / ``--eval-trajectories`` split between
   them in proportion to 1 / steps: each respacing gets about the same number of
   recorded steps) and each training batch is a window of one respacing, drawn
   at random; the drafter is conditioned on the drafted stride (``t_next``), so
   the one drafter serves all of them.
2. Training: random windows of ``--unroll`` consecutive steps; the drafter
   starts from the exact parent features and feeds its own predictions forward
   (errors that compound over a draft are trained against).  Losses:

   * ``kl``: KL(q_j || p_j) of the drafted vs the target transition through the
     frozen head (whitened mean discrepancy |(mu_p - mu_q)/sigma|^2 / 2 plus the
     log-variance discrepancy: acceptance 1 - TV(p, q) is bounded by it);
   * ``whitened``: only the whitened mean discrepancy;
   * ``feature``: feature regression (MSE to the exact features, normalised);
   * ``kl+feature``: kl plus ``--feature-weight`` x feature;
   * ``steps``: minus the expected drafts accepted per window, sum_k prod_{j<=k} a_j
     over the unroll, with a_j = 1 - erf(sqrt(KL_j) / 2) per sample (the exact
     acceptance of equal-variance Gaussians, see :func:`acceptance_from_kl`):
     what a round gains.  KL grows without bound where the noise is small, so
     under ``kl`` the last steps of the schedule, where no draft is accepted
     anyway, dominate the gradient; under ``steps`` a draft already rejected, or
     a later one in its chain, contributes nothing, and those in between count
     most;
   * ``steps+feature``: steps plus ``--feature-weight`` x feature.
3. Checkpoints (``<out>/state.pt``, atomic) every ``--save-every`` steps; the same
   command resumes after an interruption.  Final drafter: ``<out>/drafter.safetensors``
   + ``.json``, and a report with the measured steps per target call of exact
   FREE (and of the frozen drafter, the reference to beat), per respacing with
   ``--respacings``; the measured acceptance per respaced index is stored with
   the drafter (``extra["acceptance_profile"]``, {num_steps: [per index]}) for
   the draft-length planner.

Resume and cache rules: ``state.pt`` and the cache record the run's identity
(the target's content hash and every setting that changes the result:
steps, variance, CFG, seed, trajectories, loss, depth, unroll, batch, lr, ...).
A resume or a cache with another identity is refused with the differences
named; only ``--train-steps`` (to extend a run), ``--save-every`` and the
evaluation / device options may change, and each change is recorded in
``settings_history``.  Every file is written atomically (temporary file in the
same directory, fsync, rename) and loaded with ``torch.load(weights_only=True)``:
a cache or run folder received from someone else cannot run code.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Dict

import numpy as np
import torch

from .._checks import (
    FileProblem, atomic_torch_save, atomic_write_json, check_writable_dir, file_sha256, remove_stale_tmp,
    safe_torch_load,
)
from ..diffusion import create_diffusion
from ..diffusion.gaussian_diffusion import GaussianDiffusion
from ..models.drafter import FeatureDrafter, FrozenFeatureDrafter
from ..ops.drafter_forward import drafter_extras
from ..reference.draft_transition import guided_transition
from . import common

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
    cfg = common.uses_cfg(cfg_scale)  # the baseline's rule (cli.common): guidance above 1
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
    """The training loss of one window (``terms``: :func:`draft_window`'s steps); see the module docstring."""
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


def expected_steps(a: float, L: int) -> float:
    """Expected steps per round with per-step acceptance a and draft length L (bonus counted)."""
    if a >= 1:
        return float(L + 1)
    return (1 - a ** (L + 1)) / (1 - a)


@torch.no_grad()
def measure_free(target, drafter, diffusion, *, n, draft_length, cfg_scale, guidance_channels, seed, device):
    from ..sampler import FreeSampler

    g = torch.Generator(device="cpu").manual_seed(seed)
    C, S = int(target.in_channels), int(target.input_size)
    noise = torch.randn(n, C, S, S, generator=g).to(device)
    y = torch.randint(0, int(target.num_classes), (n,), generator=g).to(device)
    s = FreeSampler(target, drafter, diffusion, draft_length=draft_length)
    _, st = s.sample(noise, y, cfg_scale=cfg_scale, guidance_channels=guidance_channels,
                     generator=torch.Generator(device=device).manual_seed(seed + 1) if device != "cpu" else
                     torch.Generator().manual_seed(seed + 1))
    return st


# ------------------------------------------------------------------ target loading
class TrainError(SystemExit):
    """A usage or input-file problem: one line, exit status 2 (raised before long work where possible)."""

    def __init__(self, msg: str):
        super().__init__(2)
        self.msg = msg

    def __str__(self):
        return self.msg


def load_target(args, device):
    """The frozen target (:func:`free_kernels.cli.common.load_target`: the demo, our format, or an official
    checkpoint built as ``--model`` and checked against ``--image-size`` / ``--num-classes`` / ``--in-channels``)."""
    try:
        target, _ = common.load_target(args.target, device, model=args.model, image_size=args.image_size,
                                       num_classes=args.num_classes, in_channels=args.in_channels)
    except common.UsageError as e:
        raise TrainError(str(e)) from None
    return target


def target_identity(args) -> dict:
    """Content identity of the target (hashes, not file names)."""
    path = common.target_file(args.target)
    ident = dict(sha256=file_sha256(path))
    if path.endswith(".safetensors") and os.path.isfile(common.json_beside(path)):
        ident["config_sha256"] = file_sha256(common.json_beside(path))
    else:
        ident.update(model=args.model, image_size=args.image_size, num_classes=args.num_classes,
                     in_channels=args.in_channels)
    return ident


# settings that change what is trained on or how: a resume / cache must match them
# (respacings: None for a one-respacing run, so runs and caches made before it existed keep their identity)
DEFAULT_MLP_RATIO = 4.0
MAX_MLP_RATIO = 16.0  # four times the DiT block's: a drafter meant to be cheaper than a target block
RUN_KEYS = ("steps", "respacings", "init_sha256", "variance", "cfg_scale", "guidance_channels", "num_trajectories",
            "eval_trajectories", "seed", "depth", "mlp_ratio", "loss", "feature_weight", "unroll", "batch_size", "lr")
CACHE_KEYS = ("steps", "respacings", "variance", "cfg_scale", "guidance_channels", "num_trajectories",
              "eval_trajectories", "seed")
# settings that may change on resume (recorded in settings_history)
FREE_KEYS = ("train_steps", "save_every", "draft_length", "eval_samples", "device", "threads", "no_progress",
             "cache", "out")
CACHE_FORMAT = "free_kernels.trajectories/2"
STATE_FORMAT = "free_kernels.train_state/2"


def run_identity(args, target_id: dict, keys) -> dict:
    ident = {k: getattr(args, k, None) for k in keys}
    if ident.get("mlp_ratio") == DEFAULT_MLP_RATIO:
        ident["mlp_ratio"] = None  # runs made before --mlp-ratio existed have no such key: None matches them
    return dict(target=target_id, **ident)


def _differences(old: dict, new: dict) -> list:
    out = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            out.append(f"{k} {old.get(k)!r} -> {new.get(k)!r}")
    return out


def _respacing_list(text: str):
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated respacings, e.g. 50,100,250,1000")
    if len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"repeated respacing in {text!r}")
    return parts


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="free-train-drafter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="demo",
                   help="'demo' (embedded), a DiT in this package's format (.safetensors + .json config beside it) "
                        "or an official-layout checkpoint (.pt/.safetensors) with --model")
    p.add_argument("--model", default="DiT-XL/2", help="DiT config name for official --target checkpoints")
    p.add_argument("--image-size", type=int, default=256,
                   help="image size of an official --target checkpoint (latent = /8; checked against its weights)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of an official --target checkpoint")
    p.add_argument("--in-channels", type=int, default=4, help="input channels of an official --target checkpoint")
    p.add_argument("--out", default="runs/drafter")
    p.add_argument("--steps", default=None, help="sampler respacing the drafter is trained for (with "
                   "--respacings: the one whose numbers head the report; must be one of them)")
    p.add_argument("--respacings", default=None, type=_respacing_list,
                   help="comma-separated respacings to train one drafter on, e.g. 50,100,250,1000 (trajectories "
                        "split in proportion to 1 / steps; each batch uses one)")
    p.add_argument("--variance", choices=("learned", "fixed"), default="learned")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-channels", type=int, default=3, choices=(3, 4))
    p.add_argument("--num-trajectories", type=int, default=256)
    p.add_argument("--eval-trajectories", type=int, default=32)
    p.add_argument("--cache", default=None, help="trajectory cache file (created if missing)")
    p.add_argument("--init", default=None, help="a drafter file (.safetensors) to start from instead of the frozen "
                   "drafter, e.g. a one-respacing drafter fine-tuned on --respacings (its content hash joins the run "
                   "identity; --depth must match it, a smaller --mlp-ratio keeps each block's most important MLP "
                   "units)")
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--mlp-ratio", type=float, default=DEFAULT_MLP_RATIO,
                   help=f"hidden width of the drafter block's MLP / the target's width (default {DEFAULT_MLP_RATIO:g}, "
                        "the DiT block's; at most 16; smaller: a cheaper draft step)")
    p.add_argument("--loss", choices=LOSSES, default="kl+feature")
    p.add_argument("--feature-weight", type=float, default=1.0)
    p.add_argument("--unroll", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draft-length", type=int, default=6, help="draft length used for the final report")
    p.add_argument("--eval-samples", type=int, default=16, help="samples for the final FREE measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.steps is None:  # 250, or with --respacings the first of them when 250 is not one
        args.steps = "250" if not args.respacings or "250" in args.respacings else args.respacings[0]
    return args


def validate_args(args) -> None:
    """Every option checked before anything is loaded (one line naming the option; checks of cli.common)."""
    try:
        _validate_args(args)
    except common.UsageError as e:
        raise TrainError(str(e)) from None


def _validate_args(args) -> None:
    for name in ("train_steps", "batch_size", "save_every", "num_trajectories", "eval_trajectories", "eval_samples",
                 "depth", "unroll"):
        common.check_positive(getattr(args, name), f"--{name.replace('_', '-')}")
    # the report measures exact FREE at one fixed draft length
    args.draft_length = common.check_draft_length(args.draft_length, allow_auto=False)
    common.check_threads(args.threads, "--threads")
    common.check_seed(args.seed, "--seed")
    common.check_backend_environment()
    common.check_finite(args.lr, "--lr", above=0)
    if not (common.check_finite(args.mlp_ratio, "--mlp-ratio", above=0) <= MAX_MLP_RATIO):
        raise common.UsageError(f"--mlp-ratio must be in (0, {MAX_MLP_RATIO:g}] (the MLP's hidden width / the "
                                f"target's; the DiT block's is 4), got {args.mlp_ratio}")
    common.check_finite(args.feature_weight, "--feature-weight", minimum=0)
    common.check_cfg_scale(args.cfg_scale)
    common.check_image_size(args.image_size)
    common.check_positive(args.num_classes, "--num-classes")
    common.check_positive(args.in_channels, "--in-channels")
    common.resolve_device(args.device)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise common.UsageError(f"--out {args.out!r} exists and is not a directory")
    if args.respacings is not None and args.steps not in args.respacings:
        raise common.UsageError(f"--steps {args.steps!r} must be one of --respacings {','.join(args.respacings)} "
                                f"(it names the respacing that heads the report)")
    if args.init is not None:
        path = common.drafter_file(args.init)
        if path is None:
            raise common.UsageError("--init frozen: training starts from the frozen drafter without --init; "
                                    "pass a drafter file")
        if not os.path.isfile(path):
            raise common.UsageError(f"--init {args.init!r} not found")
        args.init_sha256 = file_sha256(path)
    else:
        args.init_sha256 = None  # runs made before --init existed have no such key: None matches them
    if args.cache and os.path.isdir(args.cache):
        raise common.UsageError(f"--cache {args.cache!r} is a directory, expected a file path")


def load_cache(path: str, expect: dict, target, N: int) -> dict:
    """A trajectory cache made for exactly this run (``expect``), checked against the target's shapes."""
    try:
        traj = safe_torch_load(path, "--cache")
    except FileProblem as e:
        raise TrainError(f"{e}: delete it to regenerate, or pass another --cache") from None
    if not isinstance(traj, dict) or traj.get("format") != CACHE_FORMAT:
        raise TrainError(f"--cache {path!r} is not a trajectory cache of this version (made by an older version "
                         f"or another tool): delete it to regenerate, or pass another --cache")
    diff = _differences(traj.get("identity", {}), expect)
    if diff:
        raise TrainError(f"--cache {path!r} was made for other settings ({'; '.join(diff)}): use another --cache "
                         f"or the settings it was made with")
    G = 2 if common.uses_cfg(expect["cfg_scale"]) else 1
    if isinstance(N, dict):  # --respacings: {respacing: (num_steps, trajectories)}
        per = traj.get("per")
        if not isinstance(per, dict) or set(per) != set(N):
            raise TrainError(f"--cache {path!r}: respacings {sorted(per) if isinstance(per, dict) else per!r}, "
                             f"expected {sorted(N)} (damaged?)")
        for r, (n_r, count) in N.items():
            _check_traj_shapes(path, per[r], target, n_r, count, G)
        return per
    _check_traj_shapes(path, traj, target, N, expect["num_trajectories"] + expect["eval_trajectories"], G)
    return traj


def _check_traj_shapes(path, traj, target, N, n, G):
    C, S, H = int(target.in_channels), int(target.input_size), int(target.hidden_size)
    T = (S // int(target.patch_size)) ** 2
    want = dict(x=(n, N, C, S, S), h=(n, N, G, T, H), mean=(n, N, C * S * S), logvar=(n, N, C * S * S), y=(n,))
    for k, shape in want.items():
        v = traj.get(k) if isinstance(traj, dict) else None
        if not torch.is_tensor(v) or tuple(v.shape) != shape:
            got = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            raise TrainError(f"--cache {path!r}: {k!r} is {got}, expected {shape} for this target (damaged?)")


def _split(total: int, lengths: list) -> list:
    """``total`` trajectories split between respacings of ``lengths`` steps in proportion to 1 / length (every
    respacing gets about the same number of recorded steps, i.e. the same data and generation time), at least 1."""
    w = [1.0 / n for n in lengths]
    exact = [total * v / sum(w) for v in w]
    out = [max(1, int(e)) for e in exact]
    for i in sorted(range(len(w)), key=lambda i: int(exact[i]) - exact[i])[: max(0, total - sum(out))]:
        out[i] += 1  # largest remainders first
    return out


def _filled(profile) -> list:
    """Per-index acceptance with the never-drafted indices (None) filled from their nearest measured neighbour."""
    vals = list(profile)
    known = [i for i, v in enumerate(vals) if v is not None]
    if not known:
        return []
    return [round(float(vals[min(known, key=lambda k: abs(k - i))]), 4) for i in range(len(vals))]


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


def _load_init(args, target, device) -> FeatureDrafter:
    """The ``--init`` drafter, checked against the target, ``--depth`` / ``--mlp-ratio`` and for finite weights."""
    try:
        start, _, _ = common.load_drafter(args.init, target, device, option="--init")
    except common.UsageError as e:
        raise TrainError(str(e)) from None
    if start.depth != args.depth or start.mlp_ratio < args.mlp_ratio:
        raise TrainError(f"--init {args.init!r} has depth {start.depth}, mlp ratio {start.mlp_ratio:g}: "
                         f"pass --depth {start.depth} and an --mlp-ratio of at most {start.mlp_ratio:g}")
    bad = [k for k, v in start.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise TrainError(f"--init {args.init!r} has NaN or Inf weights ({bad[0]}"
                         f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): training from it cannot work")
    return start


def load_state(path: str, expect: dict, device) -> dict:
    try:
        st = safe_torch_load(path, "checkpoint", map_location=device)
    except FileProblem as e:
        raise TrainError(f"{e}: use another --out, or delete it to start again") from None
    if not isinstance(st, dict) or st.get("format") != STATE_FORMAT or not all(
            k in st for k in ("drafter", "opt", "step", "history", "time", "gen", "identity", "args")):
        raise TrainError(f"{path} is not a checkpoint of this trainer version (or is damaged): use another --out")
    diff = _differences(st["identity"], expect)
    if diff:
        raise TrainError(f"{path} belongs to a run with other settings ({'; '.join(diff)}): use another --out, or "
                         f"the original settings to resume")
    return st


def run(argv=None) -> dict:
    """Train, write the drafter and report; returns the report.  Problems raise :class:`TrainError`."""
    args = parse_args(argv)
    validate_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    progress = not args.no_progress
    respacings = list(args.respacings or [args.steps])
    diffusions, Ns = {}, {}
    for r in respacings:
        opt_name = "--steps" if args.respacings is None else "--respacings"
        try:
            diffusions[r] = create_diffusion(r, learn_sigma=args.variance == "learned")
        except (ValueError, TypeError) as e:
            raise TrainError(f"{opt_name} {r!r} is not a valid respacing: {e}") from None
        Ns[r] = diffusions[r].num_timesteps
        if Ns[r] < args.unroll + 2:
            raise TrainError(f"{opt_name} {r} gives {Ns[r]} steps: too few for --unroll {args.unroll}")
    N = Ns[args.steps]
    if common.cap_draft_length(args.draft_length, min(Ns.values())) != args.draft_length:
        print(f"note: --draft-length {args.draft_length} capped at the {min(Ns.values())} sampling steps")
        args.draft_length = common.cap_draft_length(args.draft_length, min(Ns.values()))
    try:
        check_writable_dir("--out", args.out)
        if args.cache:
            check_writable_dir("--cache", os.path.dirname(os.path.abspath(args.cache)))
    except FileProblem as e:
        raise TrainError(str(e)) from None
    remove_stale_tmp(args.out)
    if args.cache:
        remove_stale_tmp(os.path.dirname(os.path.abspath(args.cache)), [os.path.basename(args.cache)])
    target = load_target(args, device)
    if args.variance == "learned" and not getattr(target, "learn_sigma", True):
        raise TrainError("--variance learned needs a target that predicts its variance; use --variance fixed")
    target.requires_grad_(False)
    start = _load_init(args, target, device) if args.init is not None else None  # checked before long work
    target_id = target_identity(args)
    identity = run_identity(args, target_id, RUN_KEYS)
    cache_identity = run_identity(args, target_id, CACHE_KEYS)
    state_path = os.path.join(args.out, "state.pt")
    st = load_state(state_path, identity, device) if os.path.isfile(state_path) else None
    torch.manual_seed(args.seed)

    # ---------------------------------------------------------------- trajectories
    t0 = time.perf_counter()
    kw = dict(cfg_scale=args.cfg_scale, guidance_channels=args.guidance_channels, device=device, progress=progress)
    n_trains = dict(zip(respacings, _split(args.num_trajectories, [Ns[r] for r in respacings])))
    n_evals = dict(zip(respacings, _split(args.eval_trajectories, [Ns[r] for r in respacings])))
    if min(n_trains.values()) < 1 or min(n_evals.values()) < 1:
        raise TrainError(f"--num-trajectories {args.num_trajectories} / --eval-trajectories {args.eval_trajectories}: "
                         f"need at least one of each per respacing ({len(respacings)} respacings)")
    multi = args.respacings is not None
    if args.cache and os.path.isfile(args.cache):
        shapes = {r: (Ns[r], n_trains[r] + n_evals[r]) for r in respacings} if multi else N
        loaded = load_cache(args.cache, cache_identity, target, shapes)
        trajs = loaded if multi else {args.steps: loaded}
        print(f"loaded {sum(t['x'].shape[0] for t in trajs.values())} trajectories from {args.cache}")
    else:
        trajs = {}
        for ri, r in enumerate(respacings):  # seed + 7919 * position: the one-respacing run keeps its trajectories
            trajs[r] = generate_trajectories(target, diffusions[r], n_trains[r] + n_evals[r],
                                             seed=args.seed + 7919 * ri, **kw)
        if args.cache:
            body = dict(per=trajs) if multi else dict(trajs[args.steps])
            atomic_torch_save(dict(body, format=CACHE_FORMAT, identity=cache_identity), args.cache)
    t_traj = time.perf_counter() - t0
    helds = {r: {k: (v[n_trains[r]:] if torch.is_tensor(v) else v) for k, v in trajs[r].items()} for r in respacings}

    # ---------------------------------------------------------------- drafter + resume
    drafter = FeatureDrafter.for_target(target, depth=args.depth, init="identity", mlp_ratio=args.mlp_ratio)
    if start is not None:
        drafter.load_state_dict(narrowed_state(start, drafter))
    # the stride conditioning is trained only on a mix of respacings; a one-respacing drafter keeps it at zero
    # (it would only see one stride) and its optimizer state is the one of runs made before it existed
    drafter.stride_proj.requires_grad_(multi)
    opt = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    step, history, t_train = 0, [], 0.0
    settings = {k: getattr(args, k) for k in FREE_KEYS}
    settings_history = [dict(step=0, **settings)]
    gen = torch.Generator().manual_seed(args.seed + 17)
    if st is not None:
        try:
            sd = dict(st["drafter"])
            if not multi and "stride_proj.weight" not in sd:  # a checkpoint from before the stride conditioning
                sd["stride_proj.weight"] = torch.zeros_like(drafter.stride_proj.weight)
            drafter.load_state_dict(sd)
            opt.load_state_dict(st["opt"])
            gen.set_state(st["gen"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise TrainError(f"{state_path} does not fit this drafter (damaged?): "
                             f"{str(e).strip().splitlines()[0]}") from None
        step, history, t_train = int(st["step"]), list(st["history"]), float(st["time"])
        settings_history = list(st.get("settings_history") or [])
        last = {k: v for k, v in (settings_history[-1] if settings_history else {}).items() if k != "step"}
        if last != settings:
            changes = _differences(last, settings)
            print(f"resuming with changed options: {'; '.join(changes)}")
            settings_history.append(dict(step=step, **settings))
        print(f"resumed from {state_path} at step {step}")
    if step > args.train_steps:
        raise TrainError(f"{state_path} is at step {step}, beyond --train-steps {args.train_steps}")

    def save_state():
        atomic_torch_save(dict(format=STATE_FORMAT, identity=identity, drafter=drafter.state_dict(),
                               opt=opt.state_dict(), step=step, history=history, time=t_train, gen=gen.get_state(),
                               settings_history=settings_history, args=vars(args)), state_path)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.train_steps, initial=step, desc=f"train drafter ({args.loss}, unroll {args.unroll})",
                   unit="step")
    while step < args.train_steps:
        t1 = time.perf_counter()
        # one respacing per batch (drawn only with --respacings: a one-respacing run keeps its random stream)
        r = respacings[int(torch.randint(0, len(respacings), (1,), generator=gen))] if multi else args.steps
        kmax = Ns[r] - 1 - args.unroll  # last window start so that index 0 is never drafted
        b = torch.randint(0, n_trains[r], (args.batch_size,), generator=gen)
        k0 = int(torch.randint(1, kmax + 1, (1,), generator=gen))
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.train_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        terms = draft_window(drafter, target, diffusions[r], trajs[r], b, k0, args.unroll, cfg_scale=args.cfg_scale,
                             guidance_channels=args.guidance_channels, device=device)
        loss = combine_loss(args.loss, terms, args.feature_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in drafter.parameters() if p.requires_grad], 1.0)
        opt.step()
        step += 1
        t_train += time.perf_counter() - t1
        history.append([float(loss.detach()), *(float(v.detach().mean()) for v in terms[0])])
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                h = np.asarray(history[-50:])
                bar.set_postfix(loss=f"{h[:, 0].mean():.3g}", kl=f"{h[:, 1].mean():.3g}")
        if step % args.save_every == 0 or step == args.train_steps:
            save_state()
    if bar is not None:
        bar.close()

    # ---------------------------------------------------------------- report
    drafter.eval()
    frozen = FrozenFeatureDrafter(target)
    mcfg = dict(n=args.eval_samples, draft_length=args.draft_length, cfg_scale=args.cfg_scale,
                guidance_channels=args.guidance_channels, seed=args.seed + 1000, device=device)
    per, profile = {}, {}
    for r in respacings:
        ekw = dict(cfg_scale=args.cfg_scale, guidance_channels=args.guidance_channels, device=device)
        kl_l, d2_l = evaluate_acceptance(drafter, target, diffusions[r], helds[r], **ekw)
        kl_f, d2_f = evaluate_acceptance(frozen, target, diffusions[r], helds[r], **ekw)
        st_l = measure_free(target, drafter, diffusions[r], **mcfg)
        st_f = measure_free(target, frozen, diffusions[r], **mcfg)
        n_r = Ns[r]
        per[r] = dict(num_steps=n_r, heldout_mean_kl=float(kl_l[1:n_r - 1].mean()),
                      heldout_mean_kl_frozen=float(kl_f[1:n_r - 1].mean()),
                      heldout_mean_d2=float(d2_l[1:n_r - 1].mean()), heldout_mean_d2_frozen=float(d2_f[1:n_r - 1].mean()),
                      steps_per_target_call=st_l.steps_per_target_call, acceptance=st_l.acceptance_rate,
                      steps_per_target_call_frozen=st_f.steps_per_target_call, acceptance_frozen=st_f.acceptance_rate,
                      acceptance_early_middle_late=st_l.as_dict()["acceptance_early_middle_late"])
        profile[str(n_r)] = _filled(st_l.acceptance_by_index)
        if r == args.steps:
            kl_learned, kl_frozen, d2_learned, d2_frozen, main_l, main_f = kl_l, kl_f, d2_l, d2_f, st_l, st_f
        if multi:
            print(f"{r} steps: steps per target call {st_l.steps_per_target_call:.2f} (frozen drafter "
                  f"{st_f.steps_per_target_call:.2f}), acceptance early/middle/late "
                  f"{' / '.join(f'{a:.3f}' for a in per[r]['acceptance_early_middle_late'] if a is not None)}")
    st_l, st_f = main_l, main_f
    report = dict(
        target=args.target, target_sha256=target_id["sha256"], steps=args.steps, num_steps=N,
        respacings=args.respacings,
        variance=args.variance, cfg_scale=args.cfg_scale,
        guidance_channels=args.guidance_channels, depth=args.depth, mlp_ratio=args.mlp_ratio, loss=args.loss,
        feature_weight=args.feature_weight, unroll=args.unroll, train_steps=step, batch_size=args.batch_size,
        init=args.init, init_sha256=args.init_sha256,
        lr=args.lr, num_trajectories=args.num_trajectories, eval_trajectories=args.eval_trajectories, seed=args.seed,
        trajectory_time_s=round(t_traj, 1), train_time_s=round(t_train, 1), device=str(device),
        settings_history=settings_history,
        heldout_mean_kl=float(kl_learned[1:N - 1].mean()), heldout_mean_kl_frozen=float(kl_frozen[1:N - 1].mean()),
        heldout_mean_d2=float(d2_learned[1:N - 1].mean()), heldout_mean_d2_frozen=float(d2_frozen[1:N - 1].mean()),
        draft_length=args.draft_length, eval_samples=args.eval_samples,
        steps_per_target_call=st_l.steps_per_target_call, acceptance=st_l.acceptance_rate,
        steps_per_target_call_frozen=st_f.steps_per_target_call, acceptance_frozen=st_f.acceptance_rate,
        acceptance_early_middle_late=st_l.as_dict()["acceptance_early_middle_late"],
        loss_curve=[round(float(np.mean([h[0] for h in history[i:i + 100]])), 5) for i in range(0, len(history), 100)],
        acceptance_profile=profile,
    )
    if multi:
        report["per_respacing"] = per
    drafter.save(os.path.join(args.out, "drafter"), extra=report)
    atomic_write_json(os.path.join(args.out, "report.json"), report)
    print(f"drafter written to {os.path.join(args.out, 'drafter.safetensors')}")
    print(f"exact FREE, L={args.draft_length}, {args.eval_samples} samples: steps per target call "
          f"{st_l.steps_per_target_call:.2f} (acceptance {st_l.acceptance_rate:.3f}); frozen drafter "
          f"{st_f.steps_per_target_call:.2f} (acceptance {st_f.acceptance_rate:.3f})")
    print(f"held-out mean KL(q||p) per step: learned {report['heldout_mean_kl']:.3f}, "
          f"frozen {report['heldout_mean_kl_frozen']:.3f}")
    return report


def main(argv=None) -> int:
    """Console entry point (``free-train-drafter``): 0 on success, 2 with one line on stderr for a problem;
    SIGINT, SIGTERM or SIGHUP end the run with one line (how to resume, when a checkpoint or cache was
    written) and status 128 + the signal number."""
    import shlex
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)  # option errors exit here, as in run()
    out = args.out
    before = common.file_states([args.cache] + [os.path.join(out, f) for f in (
        "state.pt", "drafter.safetensors", "drafter.json", "report.json")])
    try:
        with common.interruptible():
            run(argv)
    except (TrainError, FileProblem) as e:
        print(f"free-train-drafter: error: {e}", file=sys.stderr)
        return 2
    except BaseException as e:
        signum = common.interrupt_signal(e)
        if signum is None:
            raise
        sys.stdout.flush()
        if common.changed_files(before):  # a checkpoint or the cache: the same command continues from it
            print(f"free-train-drafter: interrupted; resume with: free-train-drafter {shlex.join(argv)}",
                  file=sys.stderr, flush=True)
        else:
            print("free-train-drafter: interrupted; nothing written", file=sys.stderr, flush=True)
        return 128 + signum
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .._checks import (
    FileProblem, atomic_torch_save, atomic_write_json, check_writable_dir, file_sha256, remove_stale_tmp,
    safe_torch_load,
)
from ..diffusion import create_diffusion
from ..distill import (
    LOSSES, evaluate_acceptance, filled_profile, generate_trajectories, learning_rate, measure_free, narrowed_state,
    split_trajectories, train_step,
)
from ..models.drafter import FeatureDrafter, FrozenFeatureDrafter
from . import common

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


# ------------------------------------------------------------------ a run: prepare -> trajectories -> train
@dataclass
class _Setup:
    """What a run is about, settled before any long work: options, respacings, target, identities."""
    args: argparse.Namespace
    device: str
    progress: bool
    respacings: list           # respacing strings; [--steps] for a one-respacing run
    multi: bool                # --respacings given
    diffusions: dict           # respacing -> diffusion
    num_steps: dict            # respacing -> number of sampling steps
    target: torch.nn.Module
    target_id: dict
    identity: dict             # what a checkpoint must match
    cache_identity: dict       # what a trajectory cache must match
    state_path: str
    state: Optional[dict]      # the checkpoint to resume from
    init_drafter: Optional[FeatureDrafter] = None  # --init, loaded and checked before the trajectories


@dataclass
class _Data:
    """Trajectories per respacing: the first ``n_train[r]`` for training, the rest held out."""
    trajs: dict
    held: dict
    n_train: dict
    seconds: float


@dataclass
class _Training:
    """The drafter being trained and everything a checkpoint records about it."""
    drafter: FeatureDrafter
    opt: torch.optim.Optimizer
    gen: torch.Generator       # draws the windows
    step: int = 0
    history: list = field(default_factory=list)
    seconds: float = 0.0
    settings_history: list = field(default_factory=list)


def _diffusions(args):
    """(respacings, {respacing: diffusion}, {respacing: steps}); a bad respacing is a TrainError."""
    respacings = list(args.respacings or [args.steps])
    opt_name = "--steps" if args.respacings is None else "--respacings"
    diffusions, num_steps = {}, {}
    for r in respacings:
        try:
            diffusions[r] = create_diffusion(r, learn_sigma=args.variance == "learned")
        except (ValueError, TypeError) as e:
            raise TrainError(f"{opt_name} {r!r} is not a valid respacing: {e}") from None
        num_steps[r] = diffusions[r].num_timesteps
        if num_steps[r] < args.unroll + 2:
            raise TrainError(f"{opt_name} {r} gives {num_steps[r]} steps: too few for --unroll {args.unroll}")
    return respacings, diffusions, num_steps


def _check_outputs(args) -> None:
    """--out and --cache are writable; temporary files a killed run left there are removed."""
    try:
        check_writable_dir("--out", args.out)
        if args.cache:
            check_writable_dir("--cache", os.path.dirname(os.path.abspath(args.cache)))
    except FileProblem as e:
        raise TrainError(str(e)) from None
    remove_stale_tmp(args.out)
    if args.cache:
        remove_stale_tmp(os.path.dirname(os.path.abspath(args.cache)), [os.path.basename(args.cache)])


def _prepare(args) -> _Setup:
    """Everything checked and loaded before the trajectories: respacings, outputs, target, checkpoint."""
    if args.threads:
        torch.set_num_threads(args.threads)
    respacings, diffusions, num_steps = _diffusions(args)
    shortest = min(num_steps.values())
    if common.cap_draft_length(args.draft_length, shortest) != args.draft_length:
        print(f"note: --draft-length {args.draft_length} capped at the {shortest} sampling steps")
        args.draft_length = common.cap_draft_length(args.draft_length, shortest)
    _check_outputs(args)
    device = args.device
    target = load_target(args, device)
    if args.variance == "learned" and not getattr(target, "learn_sigma", True):
        raise TrainError("--variance learned needs a target that predicts its variance; use --variance fixed")
    target.requires_grad_(False)
    start = _load_init(args, target, device) if args.init is not None else None  # checked before long work
    target_id = target_identity(args)
    identity = run_identity(args, target_id, RUN_KEYS)
    state_path = os.path.join(args.out, "state.pt")
    state = load_state(state_path, identity, device) if os.path.isfile(state_path) else None
    torch.manual_seed(args.seed)
    return _Setup(args=args, device=device, progress=not args.no_progress, respacings=respacings,
                  multi=args.respacings is not None, diffusions=diffusions, num_steps=num_steps, target=target,
                  target_id=target_id, identity=identity, cache_identity=run_identity(args, target_id, CACHE_KEYS),
                  state_path=state_path, state=state, init_drafter=start)


def _trajectories(setup: _Setup) -> _Data:
    """The trajectories of every respacing: from --cache when it exists, else generated (and cached)."""
    args, respacings, num_steps = setup.args, setup.respacings, setup.num_steps
    t0 = time.perf_counter()
    n_train = dict(zip(respacings, split_trajectories(args.num_trajectories, [num_steps[r] for r in respacings])))
    n_eval = dict(zip(respacings, split_trajectories(args.eval_trajectories, [num_steps[r] for r in respacings])))
    if min(n_train.values()) < 1 or min(n_eval.values()) < 1:
        raise TrainError(f"--num-trajectories {args.num_trajectories} / --eval-trajectories {args.eval_trajectories}: "
                         f"need at least one of each per respacing ({len(respacings)} respacings)")
    if args.cache and os.path.isfile(args.cache):
        shapes = ({r: (num_steps[r], n_train[r] + n_eval[r]) for r in respacings} if setup.multi
                  else num_steps[args.steps])
        loaded = load_cache(args.cache, setup.cache_identity, setup.target, shapes)
        trajs = loaded if setup.multi else {args.steps: loaded}
        print(f"loaded {sum(t['x'].shape[0] for t in trajs.values())} trajectories from {args.cache}")
    else:
        kw = dict(cfg_scale=args.cfg_scale, guidance_channels=args.guidance_channels, device=setup.device,
                  progress=setup.progress)
        trajs = {}
        for ri, r in enumerate(respacings):  # seed + 7919 * position: the one-respacing run keeps its trajectories
            trajs[r] = generate_trajectories(setup.target, setup.diffusions[r], n_train[r] + n_eval[r],
                                             seed=args.seed + 7919 * ri, **kw)
        if args.cache:
            body = dict(per=trajs) if setup.multi else dict(trajs[args.steps])
            atomic_torch_save(dict(body, format=CACHE_FORMAT, identity=setup.cache_identity), args.cache)
    seconds = time.perf_counter() - t0
    held = {r: {k: (v[n_train[r]:] if torch.is_tensor(v) else v) for k, v in trajs[r].items()} for r in respacings}
    return _Data(trajs=trajs, held=held, n_train=n_train, seconds=seconds)

def _new_drafter(setup: _Setup) -> FeatureDrafter:
    """The drafter training starts from: the frozen drafter's identity blocks, or --init narrowed to --mlp-ratio."""
    args = setup.args
    drafter = FeatureDrafter.for_target(setup.target, depth=args.depth, init="identity", mlp_ratio=args.mlp_ratio)
    start = setup.init_drafter
    if start is not None:
        drafter.load_state_dict(narrowed_state(start, drafter))
    # the stride conditioning is trained only on a mix of respacings; a one-respacing drafter keeps it at zero
    # (it would only see one stride) and its optimizer state is the one of runs made before it existed
    drafter.stride_proj.requires_grad_(setup.multi)
    return drafter


def _settings(args) -> dict:
    """The options that may change when a run resumes (recorded in settings_history)."""
    return {k: getattr(args, k) for k in FREE_KEYS}


def _resume(setup: _Setup, tr: _Training) -> None:
    """Load the checkpoint into ``tr``; changed free options are printed and recorded in settings_history."""
    st = setup.state
    try:
        sd = dict(st["drafter"])
        if not setup.multi and "stride_proj.weight" not in sd:  # a checkpoint from before the stride conditioning
            sd["stride_proj.weight"] = torch.zeros_like(tr.drafter.stride_proj.weight)
        tr.drafter.load_state_dict(sd)
        tr.opt.load_state_dict(st["opt"])
        tr.gen.set_state(st["gen"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise TrainError(f"{setup.state_path} does not fit this drafter (damaged?): "
                         f"{str(e).strip().splitlines()[0]}") from None
    tr.step, tr.history, tr.seconds = int(st["step"]), list(st["history"]), float(st["time"])
    tr.settings_history = list(st.get("settings_history") or [])
    last = {k: v for k, v in (tr.settings_history[-1] if tr.settings_history else {}).items() if k != "step"}
    settings = _settings(setup.args)
    if last != settings:
        print(f"resuming with changed options: {'; '.join(_differences(last, settings))}")
        tr.settings_history.append(dict(step=tr.step, **settings))
    print(f"resumed from {setup.state_path} at step {tr.step}")


def _start_training(setup: _Setup) -> _Training:
    """A new drafter and optimizer, or the checkpoint's state when the run resumes."""
    args = setup.args
    drafter = _new_drafter(setup)
    opt = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    tr = _Training(drafter=drafter, opt=opt, gen=torch.Generator().manual_seed(args.seed + 17),
                   settings_history=[dict(step=0, **_settings(args))])
    if setup.state is not None:
        _resume(setup, tr)
    if tr.step > args.train_steps:
        raise TrainError(f"{setup.state_path} is at step {tr.step}, beyond --train-steps {args.train_steps}")
    return tr


def _save_state(setup: _Setup, tr: _Training) -> None:
    atomic_torch_save(dict(format=STATE_FORMAT, identity=setup.identity, drafter=tr.drafter.state_dict(),
                           opt=tr.opt.state_dict(), step=tr.step, history=tr.history, time=tr.seconds,
                           gen=tr.gen.get_state(), settings_history=tr.settings_history, args=vars(setup.args)),
               setup.state_path)


def _train(setup: _Setup, data: _Data) -> _Training:
    """Train to --train-steps, a checkpoint every --save-every steps and at the end."""
    args = setup.args
    tr = _start_training(setup)
    bar = None
    if setup.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.train_steps, initial=tr.step, desc=f"train drafter ({args.loss}, unroll {args.unroll})",
                   unit="step")
    while tr.step < args.train_steps:
        t1 = time.perf_counter()
        # one respacing per batch (drawn only with --respacings: a one-respacing run keeps its random stream)
        r = setup.respacings[int(torch.randint(0, len(setup.respacings), (1,), generator=tr.gen))] if setup.multi \
            else args.steps
        kmax = setup.num_steps[r] - 1 - args.unroll  # last window start so that index 0 is never drafted
        b = torch.randint(0, data.n_train[r], (args.batch_size,), generator=tr.gen)
        k0 = int(torch.randint(1, kmax + 1, (1,), generator=tr.gen))
        loss, terms = train_step(tr.drafter, tr.opt, setup.target, setup.diffusions[r], data.trajs[r], b, k0,
                                 unroll=args.unroll, loss=args.loss, feature_weight=args.feature_weight,
                                 lr=learning_rate(args.lr, tr.step, args.train_steps), cfg_scale=args.cfg_scale,
                                 guidance_channels=args.guidance_channels, device=setup.device)
        tr.step += 1
        tr.seconds += time.perf_counter() - t1
        tr.history.append([float(loss.detach()), *(float(v.detach().mean()) for v in terms[0])])
        if bar is not None:
            bar.update(1)
            if tr.step % 10 == 0:
                h = np.asarray(tr.history[-50:])
                bar.set_postfix(loss=f"{h[:, 0].mean():.3g}", kl=f"{h[:, 1].mean():.3g}")
        if tr.step % args.save_every == 0 or tr.step == args.train_steps:
            _save_state(setup, tr)
    if bar is not None:
        bar.close()
    return tr


# ------------------------------------------------------------------ report
def _evaluate(setup: _Setup, data: _Data, drafter) -> dict:
    """Per respacing: held-out KL / d^2 and exact FREE of the trained and of the frozen drafter."""
    args = setup.args
    drafter.eval()
    frozen = FrozenFeatureDrafter(setup.target)
    mcfg = dict(n=args.eval_samples, draft_length=args.draft_length, cfg_scale=args.cfg_scale,
                guidance_channels=args.guidance_channels, seed=args.seed + 1000, device=setup.device)
    ekw = dict(cfg_scale=args.cfg_scale, guidance_channels=args.guidance_channels, device=setup.device)
    out = {}
    for r in setup.respacings:
        kl_l, d2_l = evaluate_acceptance(drafter, setup.target, setup.diffusions[r], data.held[r], **ekw)
        kl_f, d2_f = evaluate_acceptance(frozen, setup.target, setup.diffusions[r], data.held[r], **ekw)
        st_l = measure_free(setup.target, drafter, setup.diffusions[r], **mcfg)
        st_f = measure_free(setup.target, frozen, setup.diffusions[r], **mcfg)
        out[r] = dict(kl=kl_l, kl_frozen=kl_f, d2=d2_l, d2_frozen=d2_f, free=st_l, free_frozen=st_f)
        if setup.multi:
            e = _respacing_entry(setup.num_steps[r], out[r])
            print(f"{r} steps: steps per target call {st_l.steps_per_target_call:.2f} (frozen drafter "
                  f"{st_f.steps_per_target_call:.2f}), acceptance early/middle/late "
                  f"{' / '.join(f'{a:.3f}' for a in e['acceptance_early_middle_late'] if a is not None)}")
    return out


def _heldout(ev: dict, n: int) -> dict:
    """Mean held-out KL and d^2 of the learned and the frozen drafter over the drafted positions 1 .. n-2."""
    mean = {k: float(ev[k][1:n - 1].mean()) for k in ("kl", "kl_frozen", "d2", "d2_frozen")}
    return dict(heldout_mean_kl=mean["kl"], heldout_mean_kl_frozen=mean["kl_frozen"],
                heldout_mean_d2=mean["d2"], heldout_mean_d2_frozen=mean["d2_frozen"])


def _free_numbers(ev: dict) -> dict:
    st_l, st_f = ev["free"], ev["free_frozen"]
    return dict(steps_per_target_call=st_l.steps_per_target_call, acceptance=st_l.acceptance_rate,
                steps_per_target_call_frozen=st_f.steps_per_target_call, acceptance_frozen=st_f.acceptance_rate,
                acceptance_early_middle_late=st_l.as_dict()["acceptance_early_middle_late"])


def _respacing_entry(n: int, ev: dict) -> dict:
    return dict(num_steps=n, **_heldout(ev, n), **_free_numbers(ev))


def _report(setup: _Setup, data: _Data, tr: _Training, evals: dict) -> dict:
    """The report (report.json, and the drafter's ``extra``); its keys and their order are the file format."""
    args = setup.args
    N = setup.num_steps[args.steps]
    head = evals[args.steps]  # the respacing that heads the report
    report = dict(
        target=args.target, target_sha256=setup.target_id["sha256"], steps=args.steps, num_steps=N,
        respacings=args.respacings,
        variance=args.variance, cfg_scale=args.cfg_scale,
        guidance_channels=args.guidance_channels, depth=args.depth, mlp_ratio=args.mlp_ratio, loss=args.loss,
        feature_weight=args.feature_weight, unroll=args.unroll, train_steps=tr.step, batch_size=args.batch_size,
        init=args.init, init_sha256=args.init_sha256,
        lr=args.lr, num_trajectories=args.num_trajectories, eval_trajectories=args.eval_trajectories, seed=args.seed,
        trajectory_time_s=round(data.seconds, 1), train_time_s=round(tr.seconds, 1), device=str(setup.device),
        settings_history=tr.settings_history,
        **_heldout(head, N),
        draft_length=args.draft_length, eval_samples=args.eval_samples,
        **_free_numbers(head),
        loss_curve=[round(float(np.mean([h[0] for h in tr.history[i:i + 100]])), 5)
                    for i in range(0, len(tr.history), 100)],
        acceptance_profile={str(setup.num_steps[r]): filled_profile(evals[r]["free"].acceptance_by_index)
                            for r in setup.respacings},
    )
    if setup.multi:
        report["per_respacing"] = {r: _respacing_entry(setup.num_steps[r], evals[r]) for r in setup.respacings}
    return report


def _write(args, drafter, report: dict) -> None:
    """The drafter (with the report as its ``extra``), report.json, and the summary lines."""
    drafter.save(os.path.join(args.out, "drafter"), extra=report)
    atomic_write_json(os.path.join(args.out, "report.json"), report)
    print(f"drafter written to {os.path.join(args.out, 'drafter.safetensors')}")
    print(f"exact FREE, L={args.draft_length}, {args.eval_samples} samples: steps per target call "
          f"{report['steps_per_target_call']:.2f} (acceptance {report['acceptance']:.3f}); frozen drafter "
          f"{report['steps_per_target_call_frozen']:.2f} (acceptance {report['acceptance_frozen']:.3f})")
    print(f"held-out mean KL(q||p) per step: learned {report['heldout_mean_kl']:.3f}, "
          f"frozen {report['heldout_mean_kl_frozen']:.3f}")


def run(argv=None) -> dict:
    """Train, write the drafter and report; returns the report.  Problems raise :class:`TrainError`."""
    args = parse_args(argv)
    validate_args(args)
    setup = _prepare(args)
    data = _trajectories(setup)
    training = _train(setup, data)
    report = _report(setup, data, training, _evaluate(setup, data, training.drafter))
    _write(args, training.drafter, report)
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

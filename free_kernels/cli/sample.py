"""free-sample: sample a grid with the baseline ancestral sampler and with exact FREE, and compare.

    free-sample                                     # embedded demo DiT + its drafter, labels 0..3, batch 1
    free-sample --demo mosaic                       # the D = 4096 demo (4x32x32, 64x64 canvases of four digits)
    free-sample --num-samples 10 --batch-size 10    # the batched case
    free-sample --labels 3,1,4 --steps 100 --relax 0.5 --json run.json
    free-sample --target DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 \\
                --drafter runs/drafter/drafter.safetensors --cfg-scale 1.5 --device cuda

Both methods start from the SAME x_T (one seeded stream per sample) with the
SAME labels, the same diffusion (respacing ``--steps``, clip_denoised=False)
and the same guidance, in calls of ``--batch-size`` samples (default 1: per-image
latency, where a GPU is latency-bound and FREE pays).  The baseline is the target's own ancestral sampler
exactly as the official DiT scripts run it (``p_sample_loop`` over
``forward_with_cfg`` on the doubled batch [x; x] with labels [y; null] when
``--cfg-scale`` > 1, the official rule; scales below 1 are refused), with one
random stream per sample so its result does not depend on which other samples
share the batch.  FREE drafts
``--draft-length`` steps per round and verifies them in one batched target
call; its samples have exactly the baseline's distribution (not the same
pixels: the two samplers draw different random numbers).  With
``--draft-length auto`` (the default) a planner chooses per round how many
steps to draft, from this device's round costs (a short calibration, cached
on disk, then what the run's own rounds cost: a machine that got busy is
planned for as it is now) and the drafter's acceptance; it prints what it
chose in each third of the schedule and why.  Seeded runs of auto keep the
baseline's distribution exactly but not the same pixels from run to run;
``--reproducible`` plans from the cached calibration alone (bit for bit the
same images for the same seed while that calibration stays; no protection
from load), as does any fixed ``--draft-length``.  ``--compare-length L`` (default 6) adds exact FREE
with that fixed L for comparison; ``--relax S`` > 0 adds FREE (relax), which
is APPROXIMATE.

Each method's wall time is measured around its sampling loop only, after one
warm-up forward of the target and the drafter (device synchronised before
and after).  Progress bars go to stderr (``--no-progress`` hides them).

CPU threads.  ``--threads N`` runs every method at N torch intra-op threads
(FREE's planner may still run a round at 1 thread where that measured faster).
``--threads 0`` (the default) gives each method its best setting: the baseline
runs small targets (the demo) on one thread, where a forward of one sample is
too small for intra-op threads to pay; FREE gets all of torch's threads and its
planner measures, for every draft length, whether a round is faster at 1 thread
or at all of them (a round verifies L + 1 states per sample in one forward: work
that threads can share), and keeps measuring during the run (a busy core makes
2-thread rounds several times slower: they move to 1 thread).  The baseline is then
also run at all threads (``baseline (ancestral, N threads)``), and speed-ups
are against the faster of the two baseline rows.

Printed table (one row per method; illustrative numbers)::

    method                wall s  calib s  s/image  target calls  target rows  steps/call  acc early  acc mid  acc late  speed-up
    baseline (ancestral)     9.80        -    2.450          1000         1000        1.00          -        -         -     1.00x
    FREE (exact, auto L)     6.90     0.40    1.725           330         1240        3.03       0.90     0.92      0.70     1.42x
    FREE (exact, L = 6)     12.10        -    3.025           276         1770        3.62       0.90     0.92      0.66     0.81x

* ``calib s``: the planner's calibration before the run (auto only; 0 when its costs were cached; not in
  ``wall s``);
* ``s/image``: wall time per image (wall / samples);
* ``target calls``: batched target forwards (CFG doubling counts as one call);
* ``target rows``: sample-states the target evaluated (CFG doubling excluded);
* ``steps/call``: denoising steps per target forward, per sample (1 for the baseline);
* ``acc early/mid/late``: share of judged drafts accepted in the first / middle /
  last third of the schedule (early = noisy);
* ``speed-up``: baseline wall time / this method's wall time;
* ``digit acc`` (with ``--quality``): the demo digit classifier's accuracy on
  the samples against their labels.

The PNG (``--out``) is a sheet of the samples, upscaled to at least 96 pixels each, one block per
method (the baseline's first, then FREE's, FREE (relax)'s last) under a caption with its name, wall
time and speed-up; ``grid_columns`` pictures per row.  Beside it, ``<out>_acceptance.png``: the
accepted fraction of drafts along the schedule for each FREE method, the planner's predicted
acceptance and the draft length it chose (``free_kernels.figures``; needs matplotlib, the ``plot``
extra: without it a plain grid is written and a warning says so).  Targets with more than 3
channels (latent DiTs) are shown as their first 3 latent channels, min-max scaled (no VAE decoding
here).

JSON output (``--json PATH``, or ``--json -`` / ``--json`` for stdout, the
table then going to stderr).  Fields:

* ``format``: "free-sample/1".
* ``command``: the argument list.
* ``target``: target checkpoint path.  ``drafter``: drafter path or "frozen".
* ``device``, ``torch`` (version), ``threads`` (torch intra-op threads FREE ran at, the cap of its planner).
* ``num_samples``; ``labels``: the class label of each sample.
* ``steps``: the respacing string; ``num_steps``: denoising steps it gives.
* ``variance``: "learned" or "fixed" (the diffusion's variance).
* ``cfg_scale``; ``guidance_channels``: channels guided when cfg_scale > 1
  (3 official, 4 diffusers).
* ``drafter_cfg_scale``: the CFG scale the drafter was trained for (null if unknown).
* ``draft_length`` ("auto" or L), ``compare_length`` (0 = off), ``batch_size``,
  ``relax`` (strength; 0 = off), ``seed``.
* ``png``: path of the sheet; ``grid_columns``: pictures per row;
  ``grid_rows``: {method: [picture row indices, 0-based]}.
* ``acceptance_png``: path of the acceptance plot (null when not written).
* ``methods``: {"baseline" | "baseline_threads" | "free" | "free_fixed" | "relax": entry}, in run order
  ("baseline_threads": the baseline again at FREE's thread count, when ``--threads 0`` gave the baseline
  fewer; "free_fixed": exact FREE with ``--compare-length``); an entry has
  ``label`` (printed name; the relax one says "approximate"), ``threads`` (intra-op threads it ran at), ``exact``
  (true for baseline and FREE, false for relax), ``calibration_s`` (the planner's calibration before the
  run, not in ``wall_s``; 0 when cached or not auto), ``exact``
  (true for baseline and FREE, false for relax), ``wall_s``, ``latency_s``
  (wall per image), ``target_calls``,
  ``target_rows``, ``steps_per_target_call``, ``acceptance`` (overall; null for the
  baseline), ``acceptance_early_middle_late`` (3 values or nulls),
  ``speedup`` (wall of the faster baseline row / wall; null with ``--no-baseline``),
  ``quality`` (digit classifier accuracy, null without ``--quality``),
  ``quality_detail`` (what the metric returned, or null), ``stats`` (FreeStats
  as_dict() for FREE runs: draft/verify/accept times, residual sampler counts,
  per-index acceptance, rounds per draft length and, for auto, the ``plan``:
  round costs, acceptance prior, the mean L chosen per third and per index,
  how many rounds were re-planned from the run's own round times; null for
  the baseline).
* ``speedup``: FREE (exact) speed-up over the baseline (null with --no-baseline).
* ``speedup_relax``: FREE (relax) speed-up (null when not run or no baseline).
* ``quality_note``: why quality is missing (null when measured or not asked for).
* ``warnings``: notes printed on stderr (e.g. a CFG scale the drafter was not trained for).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .common import (
    FREE_STREAM, UsageError, baseline_generators, check_backend_environment, check_cfg_scale, check_draft_length,
    check_finite, check_labels, check_nonnegative, check_positive, check_seed, check_threads, derive_seed,
    drafter_file, initial_noise, is_demo, json_beside, parse_labels, resolve_device, sample_baseline, target_file,
    uses_cfg,
)
from ..demo import DEMOS, demo_assets
from ..figures import default_canvas
from .common import load_drafter as common_load_drafter
from .common import load_target as common_load_target

JSON_FORMAT = "free-sample/1"
_DOC_EPILOG = __doc__[__doc__.index("Printed table"):]


_SMALL_TARGET_PARAMS = 20_000_000


# ------------------------------------------------------------------ parsing
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="free-sample",
        description="Sample a grid with the baseline ancestral sampler and with exact FREE (same labels, same "
                    "x_T), print wall time, target calls, steps per call, acceptance and speed-up, write a PNG.",
        epilog=_DOC_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=None,
                   help="number of samples (default 4, or the number of --labels); labels cycle 0, 1, ...")
    p.add_argument("--labels", default=None, help='comma-separated class labels, e.g. "3,1,4"')
    p.add_argument("--steps", default="250", help='timestep respacing, e.g. "250", "100" (default 250)')
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale, 1 .. 1000; guidance is on above 1, as in the official scripts "
                        "(default: the drafter's training setting, else 1.0)")
    p.add_argument("--guidance-channels", type=int, choices=(3, 4), default=None,
                   help="channels CFG guides: 3 (official DiT) or 4 (diffusers); default: the drafter's setting, "
                        "else 3")
    p.add_argument("--variance", choices=("learned", "fixed"), default=None,
                   help="sampler variance (default: the drafter's training setting, else learned when the target "
                        "predicts it)")
    p.add_argument("--draft-length", default="auto",
                   help="drafted steps per FREE round: 'auto' (default: the planner drafts where it pays on this "
                        "device, from measured costs and the drafter's acceptance) or a fixed L >= 1")
    p.add_argument("--compare-length", type=int, default=6, metavar="L",
                   help="also run exact FREE with this fixed draft length, to compare with 'auto' (default 6; "
                        "0 = off)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="samples per sampler call (default 1: per-image latency, the case FREE is for; "
                        "e.g. --batch-size 10 for the batched case)")
    p.add_argument("--relax", type=float, default=0.0, metavar="STRENGTH",
                   help="also run FREE (relax, APPROXIMATE) with this strength; 0 = off (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of x_T and of both samplers' noise, 0 .. 4294967295 (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--target", default=None,
                   help="target DiT: our .safetensors (+ .json config beside it) or an official .pt/.safetensors "
                        "with --model and --image-size (default, or 'demo': the embedded demo DiT)")
    p.add_argument("--demo", default="digits", choices=sorted(DEMOS),
                   help="the embedded demo used without --target: digits (16x16, D = 256; default) or mosaic "
                        "(64x64 canvases of four instances of one digit, fed as 4x32x32: D = 4096)")
    p.add_argument("--model", default=None, help="DiT config name for official checkpoints, e.g. DiT-XL/2")
    p.add_argument("--image-size", type=int, default=256,
                   help="image size of an official checkpoint (latent = size / 8; default 256)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of an official checkpoint (default 1000)")
    p.add_argument("--drafter", default=None,
                   help='FeatureDrafter .safetensors (+ .json), or "frozen" (training-free h = h_prev); default: '
                        "the demo drafter with the demo target, else frozen")
    p.add_argument("--out", default="free_sample.png", help="PNG grid path (default free_sample.png)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the results as JSON to PATH ('-' or no value: stdout)")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline (no speed-up then)")
    p.add_argument("--quality", action="store_true",
                   help="add the demo digit classifier's accuracy per method (needs free_kernels.demo.metrics)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads of every method, at most the CPU cores available; 0 (default) = each method "
                        "at its best: the baseline at "
                        f"1 thread for small targets (< {_SMALL_TARGET_PARAMS // 10**6}M parameters) and again at "
                        "torch's default for comparison, FREE at torch's default with its planner choosing 1 thread "
                        "or all per round from measured round times")
    p.add_argument("--reproducible", action="store_true",
                   help="auto plans from the cached calibration alone: the same seed gives the same images bit for "
                        "bit while that calibration stays, at the cost of not following load on the machine")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def target_path(args) -> str:
    """The target's file (the ``--demo`` DiT's without --target)."""
    return demo_assets(args.demo)[1] if is_demo(args.target) else target_file(args.target)


def drafter_path(args):
    """The drafter's .safetensors path, or None for the frozen drafter (default: the demo's drafter with its target)."""
    if args.drafter is None and is_demo(args.target):
        return demo_assets(args.demo)[2]
    return drafter_file(args.drafter, demo_target=is_demo(args.target))


def demo_dataset(args) -> Optional[str]:
    """The digit family of the samples (their display and the classifier's view), or None for other targets."""
    return demo_assets(args.demo)[0] if is_demo(args.target) else None


def load_target(args, device):
    """(target, its file): :func:`free_kernels.cli.common.load_target` with this tool's options."""
    return common_load_target(target_path(args), device, model=args.model, image_size=args.image_size,
                              num_classes=args.num_classes)


def load_drafter(args, target, device, default_demo: bool):
    """(drafter, its path or 'frozen', the 'extra' training record saved with it or {})."""
    return common_load_drafter(drafter_path(args) or "frozen", target, device, demo_target=default_demo)


def _sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ------------------------------------------------------------------ samplers
@torch.no_grad()
def run_baseline(target, diffusion, noise, y, *, cfg_scale, guidance_channels, seed, progress, first=0):
    """The official DiT sampling loop on samples first .. first+B-1; returns (samples, wall seconds, target calls).

    :func:`free_kernels.cli.common.sample_baseline` with this tool's per-sample streams (row k: (seed, 1, k);
    the unconditional half of a doubled batch: (seed, 2, k)).
    """
    dev = noise.device
    calls = [0]

    def counted(fwd):
        def model(x, t, **kw):
            calls[0] += 1
            return fwd(x, t, **kw)
        return model

    cond, uncond = baseline_generators(seed, noise.shape[0], first=first, device=dev, cfg_scale=cfg_scale)
    _sync(dev)
    t0 = time.perf_counter()
    out = sample_baseline(target, diffusion, noise, y, cfg_scale=cfg_scale, guidance_channels=guidance_channels,
                          generator=cond, uncond_generator=uncond, progress=progress, wrap=counted)
    _sync(dev)
    return out, time.perf_counter() - t0, calls[0]


@torch.no_grad()
def run_free(sampler, noise, y, *, cfg_scale, guidance_channels, seed, progress, first=0):
    """One FREE call on samples first .. first+B-1; returns (samples, wall seconds, FreeStats)."""
    dev = noise.device
    gen = torch.Generator(device=dev).manual_seed(derive_seed(seed, FREE_STREAM, first))
    _sync(dev)
    t0 = time.perf_counter()
    out, st = sampler.sample(noise, y, cfg_scale=cfg_scale, guidance_channels=guidance_channels, generator=gen,
                             progress=progress)
    _sync(dev)
    return out, time.perf_counter() - t0, st


@torch.no_grad()
def warm_up(target, drafter, diffusion, noise, y, *, cfg_scale, guidance_channels, variance):
    """Untimed: one target forward (the baseline's batch shape) and one drafter call.

    On a GPU also a short FREE run (12 steps, 2 samples) so that kernels compiled
    on first use (Triton) are not compiled inside the timed runs.
    """
    t = torch.full((noise.shape[0],), int(np.asarray(getattr(diffusion, "timestep_map", [0]))[-1]),
                   device=noise.device, dtype=torch.long)
    x, yy = noise, y
    if uses_cfg(cfg_scale):
        x, yy, t = torch.cat([x, x]), torch.cat([y, torch.full_like(y, int(target.num_classes))]), torch.cat([t, t])
    h, c = target.forward_features(x, t, yy)
    target.forward_head(h, c)
    drafter(h, x, t, yy)
    if noise.device.type == "cuda":
        from ..diffusion import create_diffusion
        from ..sampler import FreeSampler

        short = create_diffusion("12", learn_sigma=variance == "learned")
        FreeSampler(target, drafter, short, draft_length=2).sample(
            noise[:2], y[:2], cfg_scale=cfg_scale, guidance_channels=guidance_channels,
            generator=torch.Generator(device=noise.device).manual_seed(0))
    _sync(noise.device)


# ------------------------------------------------------------------ quality
def quality_metric(dataset: str = "digits16"):
    """(callable samples, labels -> (accuracy, detail), None) or (None, why it is unavailable).

    The classifier reads 16x16 digits: every digit of a sample of ``dataset`` is classified
    (:func:`free_kernels.demo.data.digit_tiles`; a mosaic shows four, each with its sample's label)."""
    try:
        from ..demo import metrics
    except ImportError as e:
        return None, f"free_kernels.demo.metrics is not available ({type(e).__name__}: {e})"
    dq = getattr(metrics, "digit_quality", None)
    load = getattr(metrics, "load_classifier", None)
    if load is None:
        try:
            from ..demo.classifier import load_classifier as load
        except ImportError:
            load = None
    if dq is None or load is None:
        return None, "free_kernels.demo.metrics lacks digit_quality / load_classifier"
    try:
        clf = load()
    except Exception as e:  # optional add-on: any failure only skips the column
        return None, f"digit classifier unavailable: {e}"

    from ..demo.data import digit_tiles

    def measure(samples, labels):
        tiles = digit_tiles(samples.detach().float().cpu(), dataset)
        res = dq(tiles, labels.detach().cpu().repeat_interleave(tiles.shape[0] // max(samples.shape[0], 1)), clf)
        if isinstance(res, dict):
            acc = res.get("accuracy", res.get("acc"))
            detail = _jsonable(res)
        else:
            acc, detail = res, None
        return (None if acc is None else float(acc)), detail

    return measure, None


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


# ------------------------------------------------------------------ output
def write_grid(blocks: Dict[str, torch.Tensor], path: str, columns: int) -> Dict[str, List[int]]:
    """One block of rows per method (padded with white tiles), written atomically; returns {method: grid rows}."""
    import io

    from PIL import Image

    from .._checks import atomic_write
    from ..demo.data import to_uint8

    tiles, rows, r = [], {}, 0
    for name, x in blocks.items():
        x = default_canvas(x)
        n = x.shape[0]
        nr = (n + columns - 1) // columns
        pad = nr * columns - n
        if pad:
            x = torch.cat([x, torch.ones(pad, *x.shape[1:])])
        tiles.append(x)
        rows[name] = list(range(r, r + nr))
        r += nr
    # the layout of free_kernels.demo.data.save_grid (2 px white padding), encoded in memory
    x = to_uint8(torch.cat(tiles))
    n, c, h, w = x.shape
    ncol, nr, gap = min(columns, n), (n + min(columns, n) - 1) // min(columns, n), 2
    grid = torch.full((c, nr * (h + gap) + gap, ncol * (w + gap) + gap), 255, dtype=torch.uint8)
    for i in range(n):
        rr, k = divmod(i, ncol)
        grid[:, gap + rr * (h + gap): gap + rr * (h + gap) + h, gap + k * (w + gap): gap + k * (w + gap) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB").save(buf, format="PNG")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return rows


def acceptance_path(out: str) -> str:
    """Where the acceptance plot goes: beside ``--out``, ``<name>_acceptance.png``."""
    root, _ = os.path.splitext(out)
    return root + "_acceptance.png"


def write_pictures(out: str, samples: Dict[str, torch.Tensor], methods: Dict[str, dict], columns: int,
                   num_steps: int, warn) -> tuple:
    """The labelled sample sheet at ``out`` and the acceptance plot beside it (:mod:`free_kernels.figures`);
    without matplotlib the plain grid and a warning.  Returns ({method: grid rows}, the plot's path or None)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warn("matplotlib is not installed (pip install 'free-kernels[plot]'): wrote an unlabelled grid and no "
             "acceptance plot")
        return write_grid(samples, out, columns), None
    from .. import figures
    from .._checks import remove_stale_tmp
    from ..planner import mean_L_by_index

    rows = [figures.SheetRow(methods[k]["label"], samples[k], methods[k]["wall_s"], methods[k]["speedup"],
                             f"+{methods[k]['calibration_s']:.1f} s calibration"
                             if methods[k].get("calibration_s") else None) for k in samples]
    sheet = figures.sample_sheet(out, rows, columns)
    grid_rows = {k: sheet["grid_rows"][methods[k]["label"]] for k in samples}
    free = {k: m for k, m in methods.items() if m.get("stats")}
    if not free:
        return grid_rows, None
    plan = next((m["stats"]["plan"] for m in free.values() if m["stats"].get("plan")), None)
    path = acceptance_path(out)
    remove_stale_tmp(os.path.dirname(os.path.abspath(path)), [os.path.basename(path)])
    figures.acceptance_plot(
        path, num_steps, {m["label"]: (m["stats"]["accepted_by_index"], m["stats"]["proposed_by_index"])
                          for m in free.values()},
        predicted=plan["predicted_acceptance_by_index"] if plan else None,
        chosen_L=mean_L_by_index(plan) if plan else None)
    return grid_rows, path


def _fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def format_table(methods: Dict[str, dict], with_quality: bool) -> str:
    head = ["method", "wall s", "calib s", "s/image", "target calls", "target rows", "steps/call", "acc early",
            "acc mid", "acc late", "speed-up"] + (["digit acc"] if with_quality else [])
    lines = []
    for m in methods.values():
        e, mi, la = m["acceptance_early_middle_late"]
        auto = m["stats"] and m["stats"].get("plan")
        row = [m["label"], _fmt(m["wall_s"]), _fmt(m["calibration_s"] if auto else None),
               _fmt(m["latency_s"], ".3f"), str(m["target_calls"]), str(m["target_rows"]),
               _fmt(m["steps_per_target_call"]), _fmt(e), _fmt(mi), _fmt(la),
               "-" if m["speedup"] is None else f"{m['speedup']:.2f}x"]
        if with_quality:
            row.append(_fmt(m["quality"], ".3f"))
        lines.append(row)
    w0 = max(len(head[0]), *(len(r[0]) for r in lines))
    widths = [w0] + [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head) if i]
    out = ["  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(head))]
    for r in lines:
        out.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
    return "\n".join(out)


def format_plan(m: dict) -> str:
    """What the planner of an auto run chose in each third of the schedule, and why."""
    plan = (m.get("stats") or {}).get("plan")
    if not plan:
        return ""
    c = plan["costs_ms"]
    thr = plan.get("threads_by_L") or []
    rounds = [f"L={L}: {c[f'round_L{L}_ms']:.1f} ms" + (f" ({thr[L]} thr)" if L < len(thr) else "")
              for L in range(len(m["stats"]["rounds_by_draft_length"])) if f"round_L{L}_ms" in c]
    thirds = ", ".join(f"{t['third']} L {_fmt(t['mean_L'], '.1f')} (predicted acceptance "
                       f"{_fmt(t['predicted_acceptance'])})" for t in plan["thirds"])
    parts = ""
    if "verify_1_row_ms" in c:
        v1 = c["verify_1_row_ms"]
        parts = (f"target forward {v1:.2f} ms, draft step {c['draft_step_ms']:.2f} ms "
                 f"({c['draft_step_ms'] / max(v1, 1e-9):.2f} of a forward), accept {c['accept_ms']:.2f} ms; ")
    rounds_all = sum(t["rounds"] for t in plan["thirds"])
    follow = (f"\n  {plan.get('timed_rounds', 0)} rounds timed during the run; {plan.get('replanned_rounds', 0)} of "
              f"{rounds_all} planned otherwise than the starting costs would have, "
              f"{plan.get('explored_rounds', 0)} run at the other thread count to check it"
              if plan.get("mode", "adaptive") == "adaptive" else "\n  frozen plan (--reproducible): nothing timed")
    return (f"planner ({m['label']}): chose {thirds}\n"
            f"  costs ({plan['cost_source']}): {parts}round "
            + ", ".join(rounds) + (" (thr: intra-op threads)" if thr else "") + follow
            + f"\n  acceptance prior: {plan['profile_source']}, updated from the run's own "
            f"accept counts; L = 0 is a plain ancestral step"
            + ("" if plan.get("drafting_can_pay", True) else
               "\n  no L beats a plain step here even if every draft were accepted: plain steps only"))


# ------------------------------------------------------------------ main
def _resolve(args):
    """Validate the simple options (before anything is loaded; the checks of :mod:`free_kernels.cli.common`)."""
    if args.num_samples is not None:
        check_positive(args.num_samples, "--num-samples")
    labels = parse_labels(args.labels) if args.labels is not None else None
    if labels is not None and args.num_samples is not None and args.num_samples != len(labels):
        raise UsageError(f"--num-samples {args.num_samples} does not match the {len(labels)} --labels given")
    args.draft_length = check_draft_length(args.draft_length, "--draft-length")
    check_nonnegative(args.compare_length, "--compare-length")
    check_positive(args.batch_size, "--batch-size")
    check_finite(args.relax, "--relax", minimum=0)
    check_threads(args.threads, "--threads")
    check_seed(args.seed, "--seed")
    check_backend_environment()
    if args.cfg_scale is not None:
        check_cfg_scale(args.cfg_scale)
    check_outputs(args)
    return labels


def check_outputs(args) -> None:
    """Output paths checked before anything is loaded: extension, not a model file, writable directory."""
    from .._checks import FileProblem, check_output_path, remove_stale_tmp

    if is_demo(args.target):
        if not os.path.isfile(target_path(args)):
            raise UsageError(f"--demo {args.demo}: {target_path(args)!r} not found (the package was installed "
                             f"without it)")
    inputs = [target_path(args), json_beside(target_path(args))]
    dp = drafter_path(args)
    if dp:
        inputs += [dp, json_beside(dp)]
    outs = [("--out", args.out, (".png",))]
    if args.json not in (None, "-"):
        outs.append(("--json", args.json, (".json",)))
    try:
        for opt, path, suffixes in outs:
            check_output_path(opt, path, suffixes=suffixes, protected=inputs)
            remove_stale_tmp(os.path.dirname(os.path.abspath(path)), [os.path.basename(path)])
    except FileProblem as e:
        raise UsageError(str(e)) from None
    if len(outs) == 2 and os.path.abspath(args.out) == os.path.abspath(args.json):
        raise UsageError("--out and --json name the same file")


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse, sample, print, write; returns the JSON record.  Option errors exit with status 2."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return _run(args, argv)
    except UsageError as e:
        parser.error(str(e))
    finally:
        torch.set_num_threads(threads)  # run() may be called in-process (tests, notebooks)


def _run(args, argv) -> dict:
    from ..diffusion import create_diffusion

    labels = _resolve(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    free_threads = torch.get_num_threads()  # FREE's cap: its planner picks 1 or this per round
    device = resolve_device(args.device)
    info = sys.stderr if args.json == "-" else sys.stdout
    warnings: List[str] = []

    def warn(msg):
        warnings.append(msg)
        sys.stdout.flush()
        print(f"free-sample: warning: {msg}", file=sys.stderr)

    target, target_path = load_target(args, device)
    target.requires_grad_(False)
    base_threads = free_threads
    if not args.threads and device.type == "cpu" and sum(p.numel() for p in target.parameters()) < _SMALL_TARGET_PARAMS:
        base_threads = 1
    if device.type != "cpu":
        base_threads = free_threads = torch.get_num_threads()
    default_demo = is_demo(args.target)
    drafter, drafter_path, extra = load_drafter(args, target, device, default_demo)
    if isinstance(drafter, torch.nn.Module):
        drafter.requires_grad_(False)

    C, S, K = int(target.in_channels), int(target.input_size), int(target.num_classes)
    n = len(labels) if labels is not None else (args.num_samples if args.num_samples is not None else 4)
    if labels is None:
        labels = [k % K for k in range(n)]
    check_labels(labels, K)

    # the drafter is trained for one sampler setting: default to it, warn when the user leaves it
    d_cfg = extra.get("cfg_scale")
    cfg_scale = float(args.cfg_scale if args.cfg_scale is not None else (d_cfg if d_cfg is not None else 1.0))
    if d_cfg is not None and float(d_cfg) != cfg_scale:
        warn(f"the drafter was trained for --cfg-scale {d_cfg}, sampling with {cfg_scale}: FREE stays exact "
             f"but accepts fewer drafts")
    d_gc = extra.get("guidance_channels")
    gc = args.guidance_channels or int(d_gc or 3)
    if d_gc and uses_cfg(cfg_scale) and int(d_gc) != gc:
        warn(f"the drafter was trained with --guidance-channels {d_gc}, sampling with {gc}")
    variance = args.variance or extra.get("variance")
    if variance not in ("learned", "fixed"):
        variance = "learned" if getattr(target, "learn_sigma", True) else "fixed"
    if variance == "learned" and not getattr(target, "learn_sigma", True):
        raise UsageError("--variance learned needs a target that predicts its variance (learn_sigma=True)")
    try:
        diffusion = create_diffusion(args.steps, learn_sigma=variance == "learned")
    except (ValueError, TypeError, AssertionError) as e:
        raise UsageError(f"--steps {args.steps!r} is not a valid respacing: {e}") from None
    N = diffusion.num_timesteps
    if args.draft_length != "auto" and args.draft_length > N:  # a round never drafts past the last step
        print(f"free-sample: --draft-length {args.draft_length} capped at the {N} sampling steps", file=info)
        args.draft_length = N
    args.compare_length = min(args.compare_length, N)
    if extra.get("num_steps") is not None and int(extra["num_steps"]) != N:
        warn(f"the drafter was trained for {extra['num_steps']} sampling steps, sampling with {N}: "
             f"FREE stays exact but accepts fewer drafts")
    if extra.get("variance") and extra["variance"] != variance:
        warn(f"the drafter was trained for {extra['variance']} variance, sampling with {variance}")

    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    noise = initial_noise(args.seed, n, (C, S, S)).to(device)
    progress = not args.no_progress
    thr = (f"{free_threads} thread(s)" if base_threads == free_threads else
           f"baseline {base_threads} thread(s) (and {free_threads} for comparison), FREE up to {free_threads}")
    print(f"free-sample: target {target_path} ({C}x{S}x{S}, {K} classes), drafter {drafter_path}, device {device}, "
          f"{thr}", file=info)
    print(f"free-sample: {n} samples, labels {labels}, {N} steps ({variance} variance), cfg {cfg_scale}"
          f"{f' (guidance channels {gc})' if uses_cfg(cfg_scale) else ''}, draft length {args.draft_length}, "
          f"batch size {args.batch_size}, seed {args.seed}", file=info)

    measure_quality, quality_note = (None, None)
    if args.quality:
        measure_quality, quality_note = quality_metric(demo_dataset(args) or "digits16")
        if measure_quality is None:
            warn(f"--quality skipped: {quality_note}")

    torch.set_num_threads(base_threads)
    warm_up(target, drafter, diffusion, noise, y, cfg_scale=cfg_scale, guidance_channels=gc, variance=variance)
    common = dict(cfg_scale=cfg_scale, guidance_channels=gc, seed=args.seed, progress=progress)
    methods: Dict[str, dict] = {}
    samples: Dict[str, torch.Tensor] = {}
    bs = min(args.batch_size, n)
    chunks = [(a, min(a + bs, n)) for a in range(0, n, bs)]

    def entry(label, exact, wall, calls, rows, spc, acc, emf, stats):
        return dict(label=label, threads=torch.get_num_threads() if device.type == "cpu" else None, exact=exact,
                    wall_s=wall, latency_s=wall / n, target_calls=int(calls),
                    target_rows=int(rows), steps_per_target_call=float(spc), acceptance=acc,
                    acceptance_early_middle_late=emf, speedup=None, quality=None, quality_detail=None, stats=stats,
                    calibration_s=0.0)

    def announce(label):
        if progress:
            sys.stdout.flush()
            print(f"free-sample: running {label}", file=sys.stderr, flush=True)

    baselines = [] if args.no_baseline else [("baseline", base_threads)]
    if baselines and base_threads != free_threads:
        baselines.append(("baseline_threads", free_threads))
    for name, threads in baselines:
        torch.set_num_threads(threads)
        label = "baseline (ancestral)" if len(baselines) == 1 else \
            f"baseline (ancestral, {threads} thread{'s' if threads > 1 else ''})"
        announce(label)
        outs, wall, calls = [], 0.0, 0
        for a, b in chunks:
            x, w, c = run_baseline(target, diffusion, noise[a:b], y[a:b], first=a, **common)
            outs.append(x)
            wall += w
            calls += c
        if name == "baseline":  # the other row draws the same numbers: one grid row
            samples[name] = torch.cat(outs)
        methods[name] = entry(label, True, wall, calls, n * N, 1.0, None, [None, None, None], None)
    torch.set_num_threads(free_threads)
    L = args.draft_length
    runs = [("free", f"FREE (exact, {'auto L' if L == 'auto' else f'L = {L}'})", 0.0, L)]
    if args.compare_length and args.compare_length != L:
        runs.append(("free_fixed", f"FREE (exact, L = {args.compare_length})", 0.0, args.compare_length))
    if args.relax > 0:
        runs.append(("relax", f"FREE (relax {args.relax:g}, approximate)", args.relax, L))
    from ..sampler import FreeSampler, FreeStats

    for name, label, strength, length in runs:
        sampler = FreeSampler(target, drafter, diffusion, draft_length=length, relax=strength or None,
                              clip_denoised=False, plan="frozen" if args.reproducible else "adaptive")
        # the planner's calibration for every batch size the calls use: reported, not inside the timed runs
        calibration_s = sum(sampler.prepare(size, cfg_scale, device) for size in sorted({b - a for a, b in chunks}))
        announce(label)
        outs, wall, parts = [], 0.0, []
        for a, b in chunks:
            x, w, st = run_free(sampler, noise[a:b], y[a:b], first=a, **common)
            outs.append(x)
            wall += w
            parts.append(st)
        samples[name] = torch.cat(outs)
        st = FreeStats.merged(parts)
        d = st.as_dict()
        methods[name] = entry(label, strength == 0, wall, st.target_calls, st.target_rows, st.steps_per_target_call,
                              d["acceptance_rate"], d["acceptance_early_middle_late"], d)
        methods[name]["calibration_s"] = calibration_s
    if "baseline" in methods:
        fastest = min(methods[k]["wall_s"] for k in ("baseline", "baseline_threads") if k in methods)
        for m in methods.values():
            m["speedup"] = fastest / max(m["wall_s"], 1e-12)
    if measure_quality is not None:
        for name, m in methods.items():
            if name not in samples:
                continue
            try:
                m["quality"], m["quality_detail"] = measure_quality(samples[name], y)
            except Exception as e:  # optional column: report why and go on
                quality_note = f"digit_quality failed: {e}"
                warn(f"--quality skipped: {quality_note}")
                for mm in methods.values():
                    mm["quality"] = mm["quality_detail"] = None
                break

    columns = min(n, 10)
    dataset = demo_dataset(args)
    if dataset is not None:  # the demo's pictures (a mosaic: 4x32x32 -> its 64x64 canvas)
        from ..demo.data import to_canvas

        samples = {k: to_canvas(v, dataset) for k, v in samples.items()}
        C = 1
    try:
        grid_rows, acceptance_png = write_pictures(args.out, samples, methods, columns, N, warn)
    except OSError as e:
        raise UsageError(f"cannot write --out {args.out!r}: {e.strerror or e}") from None
    if C not in (1, 3):
        warn(f"the PNG shows the first {min(C, 3)} latent channel(s), min-max scaled (no VAE decoding)")

    print("", file=info)
    print(format_table(methods, measure_quality is not None), file=info)
    print(f"s/image: wall time per image at batch size {bs}; "
          "steps/call: denoising steps per target forward, per sample; speed-up: "
          f"{'faster ' if 'baseline_threads' in methods else ''}baseline wall / wall; "
          "calib s: the auto planner's calibration before its run (not in wall s; cached for later runs); "
          "FREE's samples follow the baseline's distribution exactly (not pixel for pixel)"
          + ("; FREE (relax) is APPROXIMATE" if "relax" in methods else ""), file=info)
    for m in methods.values():
        plan = format_plan(m)
        if plan:
            print(plan, file=info)
    where = ", ".join(f"{methods[k]['label']}: row{'s' if len(v) > 1 else ''} "
                      f"{v[0] + 1}{'-' + str(v[-1] + 1) if len(v) > 1 else ''}" for k, v in grid_rows.items())
    print(f"wrote {args.out} ({columns} per row; {where})" +
          (f" and {acceptance_png} (acceptance along the schedule)" if acceptance_png else ""), file=info)

    record = dict(
        format=JSON_FORMAT, command=argv, target=target_path, drafter=drafter_path, device=str(device),
        torch=torch.__version__, threads=free_threads, num_samples=n, labels=labels, steps=args.steps,
        num_steps=N, variance=variance, cfg_scale=cfg_scale, guidance_channels=gc,
        drafter_cfg_scale=None if d_cfg is None else float(d_cfg), draft_length=args.draft_length,
        compare_length=args.compare_length, batch_size=bs,
        relax=args.relax, seed=args.seed, png=args.out, grid_columns=columns, grid_rows=grid_rows,
        acceptance_png=acceptance_png, methods=methods,
        speedup=methods["free"]["speedup"], speedup_relax=methods["relax"]["speedup"] if "relax" in methods else None,
        quality_note=quality_note, warnings=warnings,
    )
    text = json.dumps(record, indent=2)
    if args.json == "-":
        print(text)
    elif args.json is not None:
        from .._checks import atomic_write_text

        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        try:
            atomic_write_text(args.json, text + "\n")
        except OSError as e:
            raise UsageError(f"cannot write --json {args.json!r}: {e.strerror or e}") from None
        print(f"wrote {args.json}", file=info)
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (``free-sample``): 0 on success; option errors exit with status 2; SIGINT, SIGTERM
    or SIGHUP end the run with one line (what was written, if anything) and status 128 + the signal number."""
    from .common import changed_files, file_states, interrupt_signal, interruptible

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)  # option errors exit here, as in run()
    before = file_states([args.out, None if args.json in (None, "-") else args.json])
    try:
        with interruptible():
            run(argv)
    except BaseException as e:
        signum = interrupt_signal(e)
        if signum is None:
            raise
        written = changed_files(before)
        sys.stdout.flush()
        print(f"free-sample: interrupted; {'wrote only ' + ', '.join(written) if written else 'nothing written'}",
              file=sys.stderr, flush=True)
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())

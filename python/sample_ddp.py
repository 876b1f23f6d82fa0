"""Data-parallel sampling for FID, like the official ``sample_ddp.py``, with FREE and resume.

Run with torchrun (NCCL on GPUs, gloo on CPU)::

    torchrun --nproc_per_node=8 python/sample_ddp.py --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt \\
        --vae /models/sd-vae-ft-ema --num-fid-samples 50000 --per-proc-batch-size 32 --cfg-scale 1.5 \\
        --drafter drafter.safetensors --draft-length 6
    torchrun --nproc_per_node=2 python/sample_ddp.py --target free_kernels/demo/assets/demo_dit.safetensors \\
        --no-vae --num-fid-samples 1000 --per-proc-batch-size 50 --steps 50 --drafter frozen

Official flags, same meaning and defaults: ``--model --vae --sample-dir
--per-proc-batch-size --num-fid-samples --image-size --num-classes --cfg-scale
--num-sampling-steps --global-seed --tf32 --ckpt``; FREE and CPU-world flags
as in ``sample.py`` (``--drafter --draft-length --relax --target --no-vae``).

Output, as the official script: ``{sample_dir}/{folder}/{index:06d}.png`` for
every sample (the total rounded up to a multiple of the global batch) and
``{sample_dir}/{folder}.npz`` with ``arr_0`` = the first ``--num-fid-samples``
images, uint8, NHWC (C = 3, or 1 for a grayscale pixel-space model).  Rank r's
i-th sample of iteration k has index ``k * world * batch + i * world + r``, and
rank r's seed is ``global_seed * world_size + rank``, as in the official script.
Added: ``{sample_dir}/{folder}.free_stats.json``, each rank's FREE statistics
(target calls, steps per target call, acceptance by timestep, time per phase)
gathered to rank 0, plus their totals.  Per-sample figures (steps, rounds,
accepted and judged drafts) are stored per iteration and always complete;
batch-level figures (target calls, acceptance by timestep, phase times) are
stored once per sampling run of a rank, so a killed run's share of them is
missing (``runs_recorded`` says how many runs they cover).

Seeds and continuous batching (differ from the official script)
    Every sample has its own seed, ``SeedSequence([rank seed, k, i])`` for the
    i-th sample of rank r's iteration k: its x_T, its label and all of its
    sampler randomness come from that seed alone, so a sample does not depend
    on its batch.  With a drafter the rank feeds all of its pending samples
    through ``FreeSampler.sample_stream`` with ``--per-proc-batch-size`` slots:
    a sample that finishes early (FREE samples take different numbers of
    rounds) frees its slot for the next one, so the batch stays full; an
    iteration's files are written as soon as its last sample is done.  The
    baseline (no drafter) samples an iteration as one batch, with per-sample
    generators.

Resume (differs from the official script, which cannot resume)
    An iteration can be run on its own (its samples' seeds say everything).  A rerun with the same arguments skips
    every complete iteration (all its PNGs readable and its statistics file
    present), re-samples an iteration with missing or damaged files (the same
    samples on the same hardware and software) and writes only those files.
    Every file is written to a temporary name in the same directory, fsynced
    and renamed, so an interruption leaves no truncated file; temporary files
    of an interrupted run are deleted when the next one starts.  The
    statistics file of an iteration is written after its PNGs, so an iteration
    interrupted in between is re-sampled for its statistics (totals never
    undercount).  That file also records the SHA-256 of each of the
    iteration's PNGs: a PNG whose content differs (another sample copied over
    it, an edited image) is re-created with a warning naming it, so the
    ``.npz`` holds only this run's samples.  A damaged batch-level statistics
    file (``.free_stats/rank*-run*.json``) is left out of the totals with a
    warning.

Provenance
    ``{folder}/.free_run.json`` records what the samples are made of: the
    target (SHA-256 of its weights and config files), the drafter (or
    "frozen"), the VAE, variance, CFG scale and rule, steps, clipping, draft
    length, relax, seed policy, world size and batch, and the software
    versions.  A rerun into an existing folder whose record differs in
    anything but the versions is refused before sampling (the folder name
    holds only file names, so two models could otherwise mix in one FID
    set); a version change is reported as a warning.  The record is also
    copied into ``{folder}.free_stats.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sample import (  # noqa: E402  (shared helpers of the single-process script)
    add_model_args, check_args, checked, decode, fail, load_model, load_vae, make_diffusion, run_identity, stats_dict,
    to_pil, to_uint8, vae_name,
)

from free_kernels.cli import common  # noqa: E402
from free_kernels.cli.common import (  # noqa: E402
    FileProblem, atomic_write, atomic_write_json, check_writable_dir, file_sha256, read_json_file, remove_stale_tmp,
)

RUN_FORMAT = "free_kernels.sample_ddp.run/2"
SEED_POLICY = ("rank seed = global_seed * world + rank; sample i of iteration k: seed SeedSequence([rank seed, k, i]), "
               "x_T = randn of torch.Generator(seed), label and step noise from SeedSequence([rank seed, k, i, 1|2]) "
               "(v2)")


def atomic_json(path: str, obj) -> None:
    atomic_write_json(path, obj)


def atomic_png(path: str, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: to_pil(arr).save(f, format="PNG"))


def png_ok(path: str, size, channels: int) -> bool:
    """True if ``path`` is a complete PNG of this run's kind (a damaged or foreign file counts as missing).

    ``size``: the image side, or None when it is only known after decoding (latent models: any square).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            w, h = im.size
            return w == h and (size is None or w == size) and im.mode == ("L" if channels == 1 else "RGB")
    except Exception:
        return False


def read_png(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            a = np.asarray(im).astype(np.uint8)
    except Exception as e:
        fail(f"{path} is damaged ({type(e).__name__}: {e}); rerun the same command to re-create it")
    return a[..., None] if a.ndim == 2 else a


def _seed_of(*words: int) -> int:
    """The seed of ``SEED_POLICY`` (v2) for a tuple of integers; kept as it is so that a resumed run
    re-creates the same samples (``free-sample`` derives its seeds with ``cli.common.derive_seed``)."""
    lo, hi = np.random.SeedSequence(list(words)).generate_state(2, dtype=np.uint32).tolist()
    return (hi << 32 | lo) & ((1 << 63) - 1)


def iteration_requests(rank_seed: int, iteration: int, n: int, num_classes: int):
    """The (seed, label) of each of the n samples of one (rank, iteration): independent and reproducible."""
    out = []
    for i in range(n):
        seed = _seed_of(rank_seed, iteration, i)
        label = int(np.random.default_rng(_seed_of(rank_seed, iteration, i, 1)).integers(num_classes))
        out.append((seed, label))
    return out


def aggregate(stats: list, runs: list = ()) -> dict:
    """Sum per-iteration statistics and per-run (batch-level) records into one record.

    Baseline iterations carry everything; FREE iterations carry the per-sample
    figures and ``runs`` (one record per sampling run of the rank) the
    batch-level ones.
    """
    out = dict(iterations=len(stats), runs_recorded=len(runs), samples=0, target_calls=0, drafter_calls=0, rounds=0,
               target_rows=0, drafter_rows=0, residual_rejections=0, residual_candidates=0, residual_fallbacks=0,
               time_draft_s=0.0, time_verify_s=0.0, time_accept_s=0.0, time_total_s=0.0,
               steps=0, sample_rounds=0, accepted=0, proposed=0, accepted_by_index=None, proposed_by_index=None)
    for s in stats:
        out["samples"] += len(s.get("steps_per_sample", []))
        out["steps"] += sum(s.get("steps_per_sample", []))
        out["sample_rounds"] += sum(s.get("sample_rounds", []))
        out["accepted"] += sum(s.get("accepted_per_sample", []))
        out["proposed"] += sum(s.get("proposed_per_sample", []))
    for s in list(stats) + list(runs):
        for k in ("target_calls", "drafter_calls", "rounds", "target_rows", "drafter_rows", "residual_rejections",
                  "residual_candidates", "residual_fallbacks", "time_draft_s", "time_verify_s", "time_accept_s",
                  "time_total_s"):
            out[k] += s.get(k, 0) or 0
        for k in ("accepted_by_index", "proposed_by_index"):
            if s.get(k) is not None:
                out[k] = list(s[k]) if out[k] is None else [a + b for a, b in zip(out[k], s[k])]
    out["steps_per_target_call"] = out["steps"] / out["sample_rounds"] if out["sample_rounds"] else None
    out["acceptance_rate"] = out["accepted"] / out["proposed"] if out["proposed"] else None
    if out["proposed_by_index"]:
        p, a = out["proposed_by_index"], out["accepted_by_index"]
        if out["acceptance_rate"] is None:
            out["acceptance_rate"] = sum(a) / sum(p) if sum(p) else None
        out["acceptance_by_index"] = [x / y if y else None for x, y in zip(a, p)]
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, cfg_default=1.5, vae_default="ema")
    p.add_argument("--sample-dir", type=str, default="samples")
    p.add_argument("--per-proc-batch-size", type=int, default=32)
    p.add_argument("--num-fid-samples", type=int, default=50_000)
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on Ampere+ GPUs (fast, slightly different numerics)")
    args = p.parse_args(argv)
    check_args(args)  # --cfg-scale >= 1 (the official assert), steps, draft length, relax
    for opt in ("per_proc_batch_size", "num_fid_samples"):
        checked(common.check_positive, getattr(args, opt), f"--{opt.replace('_', '-')}")
    checked(common.check_seed, args.global_seed, "--global-seed")  # SeedSequence takes no negative seed
    return args


def folder_name(args, image_size: int) -> str:
    """The official folder name (file names only: the run record holds the identities)."""
    model_string = os.path.basename(args.target).replace(".safetensors", "") if args.target else \
        args.model.replace("/", "-")
    ckpt_string = os.path.basename(args.ckpt).replace(".pt", "") if args.ckpt else ("target" if args.target
                                                                                       else "pretrained")
    folder = (f"{model_string}-{ckpt_string}-size-{image_size}-vae-{vae_name(args)}-cfg-{args.cfg_scale}-"
              f"seed-{args.global_seed}")
    if args.drafter is not None:
        dname = "frozen" if args.drafter == "frozen" else os.path.basename(args.drafter).replace(".safetensors", "")
        folder += f"-free-{dname}-L{args.draft_length}" + (f"-relax-{args.relax}" if args.relax else "")
    return folder


def run_record(args, identity: dict, world: int) -> dict:
    """What the samples in a folder are made of; a resume must match it (except ``versions``)."""
    import PIL

    import free_kernels

    rec = dict(identity)
    rec.update(format=RUN_FORMAT, seed_policy=SEED_POLICY, world_size=world,
               per_proc_batch_size=args.per_proc_batch_size, global_seed=args.global_seed,
               versions=dict(free_kernels=free_kernels.__version__, torch=torch.__version__,
                             numpy=np.__version__, pillow=PIL.__version__))
    return rec


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def record_mismatch(path: str, old: dict, new: dict):
    """None if a resume with ``new`` may continue the folder recorded in ``old``, else the reason (one line)."""
    if not isinstance(old, dict) or old.get("format") != RUN_FORMAT:
        return (f"{path} was written by an older sample_ddp.py or is not a run record, so the samples' model and "
                f"settings cannot be verified: resuming could mix two models; use another --sample-dir")
    a, b = _flatten(old), _flatten(new)
    diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith("versions.") and k.split(".")[-1] != "path"]
    if diff:
        return (f"{os.path.dirname(path)} holds samples of a different run ({'; '.join(diff[:6])}"
                f"{' ...' if len(diff) > 6 else ''}): resuming would mix them into one .npz; use another "
                f"--sample-dir or the original arguments and files")
    return None


def layout_of(record: dict) -> dict:
    """The flat summary of a run record written into ``{folder}.free_stats.json``."""
    sm = record["sampler"]
    return dict(world_size=record["world_size"], per_proc_batch_size=record["per_proc_batch_size"],
                global_seed=record["global_seed"], num_sampling_steps=sm["num_sampling_steps"],
                variance=sm["variance"], cfg_scale=sm["cfg_scale"], guidance_channels=sm["guidance_channels"],
                clip_denoised=sm["clip_denoised"], drafter=sm["drafter"]["name"], draft_length=sm["draft_length"],
                relax=sm["relax"])


def stats_path(stats_dir: str, rank: int, it: int) -> str:
    return os.path.join(stats_dir, f"rank{rank:05d}-it{it:06d}.json")


def iteration_stats(path: str, indices):
    """The statistics file of an iteration with these sample ``indices``, or None (missing, damaged, another one)."""
    try:
        with open(path) as f:
            st = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return st if isinstance(st, dict) and st.get("indices") == list(indices) else None


def replaced_pngs(st, paths, candidates) -> list:
    """Positions among ``candidates`` whose PNG is not the one this run wrote: its SHA-256 differs from the one
    the iteration's statistics recorded when it was written (a file copied over a sample, an edited image)."""
    hashes = st.get("png_sha256") if isinstance(st, dict) else None
    if not isinstance(hashes, list) or len(hashes) != len(paths):  # written before the hashes were recorded
        return []
    return [i for i in candidates if file_sha256(paths[i]) != hashes[i]]


def run_stats_path(stats_dir: str, rank: int) -> str:
    """A new file for the batch-level statistics of this sampling run of ``rank``."""
    k = 0
    while os.path.exists(os.path.join(stats_dir, f"rank{rank:05d}-run{k:04d}.json")):
        k += 1
    return os.path.join(stats_dir, f"rank{rank:05d}-run{k:04d}.json")


def sample_iteration(model, diffusion, vae, args, device, rank_seed: int, it: int, n: int):
    """Baseline: rank's iteration ``it`` as one batch: (uint8 NHWC images, statistics dict)."""
    reqs = iteration_requests(rank_seed, it, n, model.num_classes)
    shape = (model.in_channels, model.input_size, model.input_size)
    z = common.noise_from_seeds([seed for seed, _ in reqs], shape).to(device)
    y = torch.tensor([label for _, label in reqs], device=device)
    # step noise of sample i from its own generator; with guidance the unconditional row draws from it too
    gens = common.per_sample_generators([_seed_of(rank_seed, it, i, 2) for i in range(n)], device=device)
    t0 = time.perf_counter()
    samples = common.sample_baseline(model, diffusion, z, y, cfg_scale=args.cfg_scale,
                                     guidance_channels=args.guidance_channels, clip_denoised=args.clip_denoised,
                                     generator=gens)
    seconds = time.perf_counter() - t0
    images = to_uint8(decode(vae, samples))
    return images, stats_dict(diffusion, n, seconds)


def stream_iterations(model, diffusion, vae, args, device, rank_seed: int, its, n: int, run_stats: dict):
    """FREE with continuous batching over the iterations ``its``: yield (it, images, stats) as each completes.

    All pending samples of the rank go through one ``sample_stream`` with n
    slots; ``run_stats`` receives the run's batch-level statistics
    when the generator is exhausted.
    """
    sampler = diffusion.free_sampler(model, device)
    requests = [req for it in its for req in iteration_requests(rank_seed, it, n, model.num_classes)]
    cfg = args.cfg_scale if common.uses_cfg(args.cfg_scale) else 1.0  # the official scripts guide only above 1
    done = {}
    t0 = time.perf_counter()
    for r in sampler.sample_stream(requests, batch_size=n, cfg_scale=cfg, guidance_channels=args.guidance_channels,
                                   device=device):
        pos, i = divmod(r.index, n)
        got = done.setdefault(pos, {})
        got[i] = r
        if len(got) == n:
            res = [got[k] for k in range(n)]
            images = to_uint8(decode(vae, torch.stack([x.sample for x in res])))
            st = dict(mode="exact" if sampler.relax is None or sampler.relax.exact else "relax", batch_size=n, num_steps=diffusion.num_timesteps,
                      steps_per_sample=[x.steps for x in res], sample_rounds=[x.rounds for x in res],
                      accepted_per_sample=[x.accepted for x in res], proposed_per_sample=[x.proposed for x in res],
                      seeds=[x.seed for x in res], labels=[x.label for x in res])
            del done[pos]
            yield its[pos], images, st
    run = sampler.last_stats.as_dict()
    for k in ("steps_per_sample", "sample_rounds"):
        run.pop(k, None)
    run["time_total_s"] = time.perf_counter() - t0
    run_stats.update(run)


def write_iteration(run, sample_folder, it, rank, indices, paths, present, redo, st_path, images, st):
    """An iteration's damaged or missing PNGs, then its statistics file (last: marks it complete)."""
    st.update(rank=rank, iteration=it, indices=indices)
    try:
        for i in redo:  # damaged files are replaced, complete ones never rewritten
            atomic_png(paths[i], images[i])
        st["png_sha256"] = [file_sha256(p) for p in paths]  # what a resume checks the PNGs against
        atomic_json(st_path, st)
    except OSError as e:  # a full device, a vanished mount: one line; a rerun resumes here
        fail(f"cannot write in {sample_folder} ({e.strerror or e}); free space and rerun the same command "
             f"to resume")
    run["iterations_sampled"] += 1
    run["pngs_written"] += len(redo)
    run["pngs_replaced"] += sum(present[i] for i in redo)


def _agree(problem, rank):
    """Broadcast rank 0's verdict; every rank exits with status 2 if there is a problem."""
    box = [problem]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        if rank == 0:
            print(f"error: {box[0]}", file=sys.stderr, flush=True)
        raise SystemExit(2)


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def main(argv=None):
    args = parse_args(argv)
    missing = [k for k in TORCHRUN_VARIABLES if not os.environ.get(k)]
    if missing:
        fail(f"sample_ddp.py runs under torchrun ({', '.join(missing)} not set): torchrun --nproc_per_node=N "
             f"python/sample_ddp.py ... (N = 1 for one process)")
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        with torch.no_grad():
            _main(args, use_cuda)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _main(args, use_cuda):
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    seed = args.global_seed * world + rank
    torch.manual_seed(seed)
    print(f"Starting rank={rank}, seed={seed}, world_size={world}, device={device}.", flush=True)

    problem = None
    if rank == 0:  # before any model loads
        try:
            check_writable_dir("--sample-dir", args.sample_dir)
        except FileProblem as e:
            problem = str(e)
    _agree(problem, rank)
    model, image_size, _ = load_model(args, device)
    diffusion = make_diffusion(args, model)
    vae = load_vae(args, device)

    # ---------------------------------------------------------------- folder, provenance, stale files
    folder = folder_name(args, image_size)
    sample_folder = os.path.join(args.sample_dir, folder)
    stats_dir = os.path.join(sample_folder, ".free_stats")
    problem = None
    record = None
    if rank == 0:
        record = run_record(args, run_identity(args, model, diffusion, image_size), world)
        record_path = os.path.join(sample_folder, ".free_run.json")
        try:
            os.makedirs(stats_dir, exist_ok=True)
            stale = (remove_stale_tmp(sample_folder) + remove_stale_tmp(stats_dir)
                     + remove_stale_tmp(args.sample_dir, [f"{folder}.npz", f"{folder}.free_stats.json"]))
            if stale:
                print(f"removed {len(stale)} temporary file(s) left by an interrupted run", flush=True)
            has_samples = any(f.endswith(".png") for f in os.listdir(sample_folder)) or any(
                f.endswith(".json") for f in os.listdir(stats_dir))
            if os.path.exists(record_path) and has_samples:
                old = read_json_file(record_path, "run record")
                problem = record_mismatch(record_path, old, record)
                if problem is None and old.get("versions") != record["versions"]:
                    print(f"warning: {sample_folder} was started with {old.get('versions')}, resuming with "
                          f"{record['versions']}: re-sampled files may differ in pixels (same distribution)",
                          file=sys.stderr, flush=True)
            elif has_samples:
                problem = (f"{sample_folder} holds samples but no run record ({record_path}), so their model and "
                           f"settings cannot be verified: resuming could mix two models; use another --sample-dir")
            else:  # a new folder, or one whose earlier run wrote nothing yet
                atomic_json(record_path, record)
        except (FileProblem, OSError) as e:
            problem = f"{e}; use another --sample-dir" if isinstance(e, FileProblem) else \
                f"cannot prepare {sample_folder}: {e}"
    _agree(problem, rank)
    if rank == 0:
        print(f"Saving .png samples at {sample_folder}", flush=True)
    dist.barrier()

    # ---------------------------------------------------------------- sampling
    n = args.per_proc_batch_size
    global_batch = n * world
    total_samples = int(math.ceil(args.num_fid_samples / global_batch) * global_batch)
    iterations = total_samples // global_batch
    channels = 1 if (vae is None and model.in_channels == 1) else 3
    if rank == 0:
        print(f"Total number of images that will be sampled: {total_samples}", flush=True)
    bar = range(iterations)
    if rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(bar)
    run = dict(iterations_sampled=0, iterations_skipped=0, pngs_written=0, pngs_replaced=0)
    pending = {}
    for it in bar:
        indices = [it * global_batch + i * world + rank for i in range(n)]
        paths = [os.path.join(sample_folder, f"{idx:06d}.png") for idx in indices]
        present = [os.path.exists(path) for path in paths]
        redo = [i for i, path in enumerate(paths)
                if not (present[i] and png_ok(path, image_size if vae is None else None, channels))]
        st_path = stats_path(stats_dir, rank, it)
        st_old = iteration_stats(st_path, indices)
        changed = replaced_pngs(st_old, paths, [i for i in range(n) if i not in redo])
        for i in changed:
            print(f"warning: {paths[i]} is not the sample this run wrote there (its SHA-256 differs from the one "
                  f"recorded in {st_path}): re-created", file=sys.stderr, flush=True)
        redo = sorted(redo + changed)
        if not redo and st_old is not None:
            run["iterations_skipped"] += 1
            continue
        if diffusion.drafter is not None:
            pending[it] = (indices, paths, present, redo, st_path)  # sampled below, continuously batched
            continue
        images, st = sample_iteration(model, diffusion, vae, args, device, seed, it, n)
        write_iteration(run, sample_folder, it, rank, indices, paths, present, redo, st_path, images, st)
    if pending:
        its = sorted(pending)
        run_stats: dict = {}
        for it, images, st in stream_iterations(model, diffusion, vae, args, device, seed, its, n, run_stats):
            write_iteration(run, sample_folder, it, rank, *pending[it], images, st)
        try:
            atomic_json(run_stats_path(stats_dir, rank), dict(run_stats, rank=rank,
                                                              iterations=its))
        except OSError as e:
            fail(f"cannot write in {stats_dir} ({e.strerror or e}); free space and rerun the same command")

    # ---------------------------------------------------------------- stats and .npz
    dist.barrier()
    mine = []
    for it in range(iterations):
        with open(stats_path(stats_dir, rank, it)) as f:  # written by this loop or a complete earlier one
            mine.append(json.load(f))
    runs = []
    for name in sorted(os.listdir(stats_dir)):
        if name.startswith(f"rank{rank:05d}-run") and name.endswith(".json"):
            try:
                doc = read_json_file(os.path.join(stats_dir, name), "run statistics")
                if not isinstance(doc, dict):
                    raise FileProblem(f"run statistics {os.path.join(stats_dir, name)!r} is damaged (not an object)")
            except FileProblem as e:  # batch-level figures of one past run: lost, not a reason to stop
                print(f"warning: {e}; its batch-level statistics are left out (runs_recorded counts the others)",
                      file=sys.stderr, flush=True)
                continue
            runs.append(doc)
    summary = dict(rank=rank, this_run=run, **aggregate(mine, runs))
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(summary, gathered, dst=0)
    if rank == 0:
        missing = [i for i in range(args.num_fid_samples)
                   if not os.path.exists(os.path.join(sample_folder, f"{i:06d}.png"))]
        if missing:
            fail(f"{len(missing)} PNGs missing after sampling (e.g. {missing[:5]})")
        arr = np.stack([read_png(os.path.join(sample_folder, f"{i:06d}.png")) for i in range(args.num_fid_samples)])
        npz_path = f"{sample_folder}.npz"
        try:
            atomic_write(npz_path, lambda f: np.savez(f, arr_0=arr))
        except OSError as e:
            fail(f"cannot write {npz_path} ({e.strerror or e}); free space and rerun the same command (the PNGs "
                 f"are complete, only the .npz and statistics are written again)")
        print(f"Saved .npz file to {npz_path} [shape={arr.shape}].", flush=True)
        merged = [dict(g) for g in gathered]
        total = dict(ranks=len(merged), **aggregate_ranks(merged))
        atomic_json(f"{sample_folder}.free_stats.json",
                    dict(run=record, layout=layout_of(record), model=record["target"]["name"], image_size=image_size,
                         total=total, per_rank=merged))
        print(f"Saved FREE statistics to {sample_folder}.free_stats.json "
              f"(steps per target call {total['steps_per_target_call']}).", flush=True)
    dist.barrier()


def aggregate_ranks(per_rank: list) -> dict:
    """Totals over ranks' aggregated records."""
    keys_sum = ("iterations", "runs_recorded", "samples", "accepted", "proposed", "target_calls", "drafter_calls",
                "rounds", "target_rows", "drafter_rows",
                "residual_rejections", "residual_candidates", "residual_fallbacks", "time_draft_s",
                "time_verify_s", "time_accept_s", "time_total_s", "steps", "sample_rounds")
    out = {k: sum(r.get(k, 0) or 0 for r in per_rank) for k in keys_sum}
    out["steps_per_target_call"] = out["steps"] / out["sample_rounds"] if out["sample_rounds"] else None
    acc = [r["accepted_by_index"] for r in per_rank if r.get("accepted_by_index")]
    pro = [r["proposed_by_index"] for r in per_rank if r.get("proposed_by_index")]
    if pro:
        a = [sum(v) for v in zip(*acc)]
        p = [sum(v) for v in zip(*pro)]
        out["acceptance_rate"] = sum(a) / sum(p) if sum(p) else None
        out["acceptance_by_index"] = [x / y if y else None for x, y in zip(a, p)]
    if out["proposed"]:  # per-sample counts are complete even when a killed run's batch-level record is missing
        out["acceptance_rate"] = out["accepted"] / out["proposed"]
    out["this_run"] = {k: sum(r["this_run"][k] for r in per_rank) for k in per_rank[0]["this_run"]}
    return out


if __name__ == "__main__":
    main()

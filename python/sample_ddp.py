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
gathered to rank 0, plus their totals.

Resume (differs from the official script, which cannot resume)
    The noise, labels and sampler randomness of rank r's iteration k come from
    a generator seeded by (rank seed, k), not from one stream per rank, so an
    iteration can be run on its own.  A rerun with the same arguments skips
    every iteration whose PNGs all exist, re-samples an iteration with missing
    files (the same samples on the same hardware and software) and writes only
    the missing files; existing files are never rewritten.  PNGs and JSON files
    are written to a temporary name and renamed, so an interruption leaves no
    truncated file.  ``{folder}/.free_run.json`` records the layout (world size,
    batch, seed, steps, ...); a rerun with a different layout is refused
    (it would assign different samples to the indices).  Per-iteration
    statistics live in ``{folder}/.free_stats/`` so the totals cover resumed runs.
"""
from __future__ import annotations

import argparse
import glob
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
    add_model_args, decode, fail, load_model, load_vae, make_diffusion, sample_batch, stats_dict, to_pil,
    to_uint8, vae_name,
)


def _atomic_write_bytes(path: str, write) -> None:
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_json(path: str, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    _atomic_write_bytes(path, w)


def atomic_png(path: str, arr: np.ndarray) -> None:
    _atomic_write_bytes(path, lambda tmp: to_pil(arr).save(tmp, format="PNG"))


def iteration_seed(rank_seed: int, iteration: int) -> int:
    """Independent, reproducible seed for one (rank, iteration)."""
    lo, hi = np.random.SeedSequence([rank_seed, iteration]).generate_state(2, dtype=np.uint32).tolist()
    return (hi << 32 | lo) & ((1 << 63) - 1)


def aggregate(stats: list) -> dict:
    """Sum per-iteration statistics (FreeStats.as_dict() or the baseline's) into one record."""
    out = dict(iterations=len(stats), samples=0, target_calls=0, drafter_calls=0, rounds=0, target_rows=0,
               drafter_rows=0, residual_rejections=0, residual_candidates=0, residual_fallbacks=0,
               time_draft_s=0.0, time_verify_s=0.0, time_accept_s=0.0, time_total_s=0.0,
               steps=0, sample_rounds=0, accepted_by_index=None, proposed_by_index=None)
    for s in stats:
        out["samples"] += len(s.get("steps_per_sample", []))
        out["steps"] += sum(s.get("steps_per_sample", []))
        out["sample_rounds"] += sum(s.get("sample_rounds", []))
        for k in ("target_calls", "drafter_calls", "rounds", "target_rows", "drafter_rows", "residual_rejections",
                  "residual_candidates", "residual_fallbacks", "time_draft_s", "time_verify_s", "time_accept_s",
                  "time_total_s"):
            out[k] += s.get(k, 0) or 0
        for k in ("accepted_by_index", "proposed_by_index"):
            if s.get(k) is not None:
                out[k] = list(s[k]) if out[k] is None else [a + b for a, b in zip(out[k], s[k])]
    out["steps_per_target_call"] = out["steps"] / out["sample_rounds"] if out["sample_rounds"] else None
    if out["proposed_by_index"]:
        p, a = out["proposed_by_index"], out["accepted_by_index"]
        out["acceptance_rate"] = sum(a) / sum(p) if sum(p) else None
        out["acceptance_by_index"] = [x / y if y else None for x, y in zip(a, p)]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, cfg_default=1.5, vae_default="ema")
    p.add_argument("--sample-dir", type=str, default="samples")
    p.add_argument("--per-proc-batch-size", type=int, default=32)
    p.add_argument("--num-fid-samples", type=int, default=50_000)
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on Ampere+ GPUs (fast, slightly different numerics)")
    args = p.parse_args(argv)
    if args.cfg_scale < 1.0:
        fail("--cfg-scale must be >= 1.0")
    if args.per_proc_batch_size < 1 or args.num_fid_samples < 1:
        fail("--per-proc-batch-size and --num-fid-samples must be >= 1")

    torch.set_grad_enabled(False)
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
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

    model, image_size, _ = load_model(args, device)
    vae = load_vae(args, device)
    diffusion = make_diffusion(args)

    # ---------------------------------------------------------------- folder and layout
    model_string = os.path.basename(args.target).replace(".safetensors", "") if args.target else \
        args.model.replace("/", "-")
    ckpt_string = os.path.basename(args.ckpt).replace(".pt", "") if args.ckpt else ("target" if args.target
                                                                                       else "pretrained")
    folder = (f"{model_string}-{ckpt_string}-size-{image_size}-vae-{vae_name(args)}-cfg-{args.cfg_scale}-"
              f"seed-{args.global_seed}")
    if args.drafter is not None:
        dname = "frozen" if args.drafter == "frozen" else os.path.basename(args.drafter).replace(".safetensors", "")
        folder += f"-free-{dname}-L{args.draft_length}" + (f"-relax-{args.relax}" if args.relax else "")
    sample_folder = os.path.join(args.sample_dir, folder)
    stats_dir = os.path.join(sample_folder, ".free_stats")
    layout = dict(world_size=world, per_proc_batch_size=args.per_proc_batch_size, global_seed=args.global_seed,
                  num_sampling_steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
                  guidance_channels=args.guidance_channels, clip_denoised=args.clip_denoised,
                  drafter=args.drafter, draft_length=args.draft_length, relax=args.relax)
    problem = [None]
    if rank == 0:
        os.makedirs(stats_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(sample_folder, ".*.tmp")) + glob.glob(os.path.join(stats_dir, ".*.tmp")):
            os.remove(stale)  # left by an interrupted write
        layout_path = os.path.join(sample_folder, ".free_run.json")
        if os.path.exists(layout_path):
            with open(layout_path) as f:
                old = json.load(f)
            diff = {k: (old.get(k), v) for k, v in layout.items() if old.get(k) != v}
            if diff:
                problem[0] = (f"{sample_folder} was written with a different layout {diff} (old, new): "
                              f"resuming would mix different samples; use another --sample-dir")
        else:
            atomic_json(layout_path, layout)
        print(f"Saving .png samples at {sample_folder}", flush=True)
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        if rank == 0:
            print(f"error: {problem[0]}", file=sys.stderr)
        dist.destroy_process_group()
        raise SystemExit(2)
    dist.barrier()

    # ---------------------------------------------------------------- sampling
    n = args.per_proc_batch_size
    global_batch = n * world
    total_samples = int(math.ceil(args.num_fid_samples / global_batch) * global_batch)
    iterations = total_samples // global_batch
    if rank == 0:
        print(f"Total number of images that will be sampled: {total_samples}", flush=True)
    bar = range(iterations)
    if rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(bar)
    run = dict(iterations_sampled=0, iterations_skipped=0, pngs_written=0)
    for it in bar:
        indices = [it * global_batch + i * world + rank for i in range(n)]
        paths = [os.path.join(sample_folder, f"{idx:06d}.png") for idx in indices]
        missing = [i for i, path in enumerate(paths) if not os.path.exists(path)]
        if not missing:
            run["iterations_skipped"] += 1
            continue
        g = torch.Generator(device=device).manual_seed(iteration_seed(seed, it))
        z = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=g, device=device)
        y = torch.randint(0, model.num_classes, (n,), generator=g, device=device)
        t0 = time.perf_counter()
        samples = sample_batch(model, diffusion, z, y, args.cfg_scale, guidance_channels=args.guidance_channels,
                               clip_denoised=args.clip_denoised, generator=g)
        seconds = time.perf_counter() - t0
        images = to_uint8(decode(vae, samples))
        for i in missing:
            atomic_png(paths[i], images[i])
        st = stats_dict(diffusion, n, seconds)
        st.update(rank=rank, iteration=it, indices=indices)
        atomic_json(os.path.join(stats_dir, f"rank{rank:05d}-it{it:06d}.json"), st)
        run["iterations_sampled"] += 1
        run["pngs_written"] += len(missing)

    # ---------------------------------------------------------------- stats and .npz
    dist.barrier()
    mine = []
    for it in range(iterations):
        path = os.path.join(stats_dir, f"rank{rank:05d}-it{it:06d}.json")
        if os.path.exists(path):  # absent only for files written by a run predating the stats
            with open(path) as f:
                mine.append(json.load(f))
    summary = dict(rank=rank, this_run=run, **aggregate(mine))
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(summary, gathered, dst=0)
    if rank == 0:
        missing = [i for i in range(args.num_fid_samples)
                   if not os.path.exists(os.path.join(sample_folder, f"{i:06d}.png"))]
        if missing:
            fail(f"{len(missing)} PNGs missing after sampling (e.g. {missing[:5]})")
        from PIL import Image

        arrs = []
        for i in range(args.num_fid_samples):
            a = np.asarray(Image.open(os.path.join(sample_folder, f"{i:06d}.png"))).astype(np.uint8)
            arrs.append(a[..., None] if a.ndim == 2 else a)
        arr = np.stack(arrs)
        npz_path = f"{sample_folder}.npz"

        def w(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=arr)

        _atomic_write_bytes(npz_path, w)
        print(f"Saved .npz file to {npz_path} [shape={arr.shape}].", flush=True)
        merged = [dict(g) for g in gathered]
        total = dict(ranks=len(merged), **aggregate_ranks(merged))
        atomic_json(f"{sample_folder}.free_stats.json",
                    dict(layout=layout, model=model_string, image_size=image_size, total=total, per_rank=merged))
        print(f"Saved FREE statistics to {sample_folder}.free_stats.json "
              f"(steps per target call {total['steps_per_target_call']}).", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def aggregate_ranks(per_rank: list) -> dict:
    """Totals over ranks' aggregated records."""
    keys_sum = ("iterations", "samples", "target_calls", "drafter_calls", "rounds", "target_rows", "drafter_rows",
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
    out["this_run"] = {k: sum(r["this_run"][k] for r in per_rank) for k in per_rank[0]["this_run"]}
    return out


if __name__ == "__main__":
    main()

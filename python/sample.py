"""Sample a grid of images from a DiT, like the official ``sample.py``, with FREE behind a flag.

Official flags, same meaning: ``--model --vae --image-size --num-classes
--cfg-scale --num-sampling-steps --seed --ckpt``.  Added:

* ``--drafter frozen|PATH`` (FREE; omit for the baseline sampler),
  ``--draft-length L`` and ``--relax STRENGTH`` (approximate; omit for exact);
* ``--target PATH``: a DiT in this package's format (``.safetensors`` weights +
  ``.json`` with ``{"config": {...}}``, e.g. the demo model
  ``free_kernels/demo/assets/demo_dit.safetensors``) instead of ``--ckpt``;
* ``--no-vae``: pixel-space model, the samples are the images (1 or 3
  channels in [-1, 1]); otherwise ``--vae ema|mse|PATH`` decodes latents with
  a diffusers ``AutoencoderKL`` from a local folder or the local Hugging Face
  cache (nothing is downloaded);
* ``--class-labels``, ``--out``, ``--stats``, ``--clip-denoised``, ``--guidance-channels``.

Examples::

    python python/sample.py --target free_kernels/demo/assets/demo_dit.safetensors --no-vae \\
        --num-sampling-steps 50 --drafter frozen --draft-length 6 --out demo.png
    python python/sample.py --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --vae /models/sd-vae-ft-mse \\
        --drafter drafter.safetensors

The helpers here are shared with ``sample_ddp.py``; loading, argument checks and
the baseline sampling call are those of every command-line tool of the package
(:mod:`free_kernels.cli.common`).  The seed policy is the official script's:
``torch.manual_seed(--seed)``, x_T and the sampler's noise from torch's global
generator.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from free_kernels.cli import common

OFFICIAL_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]
LATENT_SCALE = 0.18215  # the sd-vae-ft-* latent scaling the official scripts divide by (fallback)


# --------------------------------------------------------------------------- arguments
def add_model_args(p: argparse.ArgumentParser, *, cfg_default: float, vae_default: str) -> None:
    from free_kernels.dit import DiT_models

    p.add_argument("--model", type=str, choices=list(DiT_models.keys()), default="DiT-XL/2")
    p.add_argument("--vae", type=str, default=vae_default,
                   help="ema | mse (stabilityai/sd-vae-ft-*, from the local HF cache only) | PATH to a local "
                        "diffusers AutoencoderKL folder")
    p.add_argument("--no-vae", action="store_true", help="pixel-space model: the samples are the images")
    p.add_argument("--image-size", type=int, default=256, help="ignored with --target (read from its config)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--cfg-scale", type=float, default=cfg_default)
    p.add_argument("--num-sampling-steps", "--steps", dest="num_sampling_steps", type=int, default=250)
    p.add_argument("--ckpt", type=str, default=None, help="official-layout DiT checkpoint (.pt or .safetensors)")
    p.add_argument("--target", type=str, default=None,
                   help="DiT in this package's format (.safetensors + .json config), e.g. the demo model")
    p.add_argument("--drafter", type=str, default=None, help="'frozen' or a saved FeatureDrafter path (FREE)")
    p.add_argument("--draft-length", type=int, default=6)
    p.add_argument("--relax", type=float, default=None, help="relax strength (APPROXIMATE); omit for exact FREE")
    p.add_argument("--guidance-channels", type=int, choices=[3, 4], default=3,
                   help="3: official DiT guidance rule (default); 4: diffusers rule")
    p.add_argument("--clip-denoised", action=argparse.BooleanOptionalAction, default=False,
                   help="clip x0 predictions to [-1, 1] (the official scripts do not)")


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def checked(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; a :class:`free_kernels.cli.common.UsageError` exits through :func:`fail`."""
    try:
        return fn(*args, **kwargs)
    except common.UsageError as e:
        fail(str(e))


def check_args(args) -> None:
    """The options both scripts share, checked before anything is loaded (one line naming the option)."""
    checked(_check_args, args)


def _check_args(args) -> None:
    common.check_cfg_scale(args.cfg_scale)  # the baseline guides above 1 (the official sample_ddp.py rule)
    common.check_backend_environment()
    common.check_positive(args.num_sampling_steps, "--num-sampling-steps")
    args.draft_length = common.check_draft_length(args.draft_length, allow_auto=False)
    if args.relax is not None:
        common.check_finite(args.relax, "--relax", minimum=0)


# --------------------------------------------------------------------------- model, VAE, diffusion
def load_model(args, device):
    """(model in eval mode, image size in pixels, latent: bool).

    ``--target``: this package's format; ``--ckpt``: an official-layout checkpoint built as
    ``--model`` with the geometry read from the weights and ``--num-classes`` checked
    (both: :mod:`free_kernels.cli.common`).
    """
    if args.target and args.ckpt:
        fail("pass --target or --ckpt, not both")
    if args.target:
        model = checked(common.load_target_file, args.target, device, option="--target")
    elif args.ckpt:
        model = checked(common.load_official_checkpoint, args.ckpt, device, model=args.model,
                        num_classes=args.num_classes, option="--ckpt")
    else:
        fail("no model: pass --ckpt PATH (official weights cannot be downloaded from here) or --target PATH")
    latent = not args.no_vae
    if not latent and model.in_channels not in (1, 3):
        fail(f"--no-vae needs a pixel-space model with 1 or 3 channels, this one has {model.in_channels}")
    image_size = model.input_size * (8 if latent else 1)
    return model, image_size, latent


def load_vae(args, device):
    if args.no_vae:
        return None
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        fail("decoding latents needs diffusers (pip install diffusers), or pass --no-vae for a pixel-space model")
    if os.path.isdir(args.vae):
        return AutoencoderKL.from_pretrained(args.vae).to(device).eval()
    if args.vae in ("ema", "mse"):
        try:
            return AutoencoderKL.from_pretrained(f"stabilityai/sd-vae-ft-{args.vae}", local_files_only=True
                                                 ).to(device).eval()
        except Exception:
            fail(f"stabilityai/sd-vae-ft-{args.vae} is not in the local Hugging Face cache and nothing is "
                 f"downloaded here: pass --vae /path/to/a/local/AutoencoderKL folder, or --no-vae for a "
                 f"pixel-space model")
    fail(f"--vae {args.vae!r}: not ema/mse and not a local folder")


def vae_name(args) -> str:
    if args.no_vae:
        return "none"
    return args.vae if args.vae in ("ema", "mse") else os.path.basename(os.path.normpath(args.vae))


def make_diffusion(args, model=None):
    """The drop-in diffusion (FREE with --drafter); with ``model``, a saved drafter is checked against it."""
    from free_kernels.dit import create_diffusion

    check_args(args)
    # a round never drafts past the last step: longer drafts only cost memory and time
    args.draft_length = common.cap_draft_length(args.draft_length, args.num_sampling_steps)
    if args.drafter is not None:
        path = common.drafter_file(args.drafter)
        if path is not None and not os.path.isfile(path):
            fail(f"--drafter {args.drafter!r}: {path!r} not found")
    try:
        diffusion = create_diffusion(str(args.num_sampling_steps), drafter=args.drafter,
                                     draft_length=args.draft_length, relax=args.relax)
        if model is not None and hasattr(diffusion.drafter, "attach"):
            diffusion.drafter.attach(model)
    except (ValueError, TypeError, OSError) as e:
        fail(f"--drafter {args.drafter!r}: {e}" if args.drafter else str(e))
    return diffusion


# --------------------------------------------------------------------------- provenance
def _file_identity(path: str, *, also_json: bool = False) -> dict:
    from free_kernels.cli.common import file_sha256

    out = dict(path=os.path.abspath(path), sha256=file_sha256(path))
    if also_json:
        cfg = common.json_beside(path)
        out["config_sha256"] = file_sha256(cfg) if os.path.isfile(cfg) else None
    return out


def _dir_identity(path: str) -> dict:
    import hashlib

    from free_kernels.cli.common import file_sha256

    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            if f.endswith((".safetensors", ".bin", ".json", ".pt", ".ckpt")):
                full = os.path.join(root, f)
                h.update(os.path.relpath(full, path).encode() + b"\0" + file_sha256(full).encode())
    return dict(path=os.path.abspath(path), sha256=h.hexdigest())


def run_identity(args, model, diffusion, image_size: int) -> dict:
    """What samples depend on: target, drafter and VAE (content hashes, not file names) and sampler settings."""
    if args.target:
        target = dict(kind="target", name=os.path.basename(args.target).replace(".safetensors", ""),
                      **_file_identity(args.target, also_json=True))
    else:
        target = dict(kind="ckpt", name=args.model.replace("/", "-"), model=args.model,
                      **_file_identity(args.ckpt))
    target.update(image_size=image_size, in_channels=int(model.in_channels), num_classes=int(model.num_classes),
                  learn_sigma=bool(getattr(model, "learn_sigma", True)))
    if args.drafter is None:
        drafter = dict(name=None)
    elif args.drafter == "frozen":
        drafter = dict(name="frozen")
    else:
        path = common.drafter_file(args.drafter)
        drafter = dict(name=os.path.basename(path)[: -len(".safetensors")], **_file_identity(path, also_json=True))
    if args.no_vae:
        vae = dict(name="none")
    elif os.path.isdir(args.vae):
        vae = dict(name=vae_name(args), **_dir_identity(args.vae))
    else:
        vae = dict(name=f"stabilityai/sd-vae-ft-{args.vae}")
    var = getattr(getattr(diffusion, "model_var_type", None), "name", None)
    sampler = dict(num_sampling_steps=int(args.num_sampling_steps), timesteps=int(diffusion.num_timesteps),
                   variance="learned" if var in ("LEARNED", "LEARNED_RANGE") else "fixed", model_var_type=var,
                   cfg_scale=float(args.cfg_scale), guidance_channels=int(args.guidance_channels),
                   clip_denoised=bool(args.clip_denoised), drafter=drafter,
                   draft_length=int(args.draft_length) if args.drafter is not None else None,
                   relax=args.relax if args.drafter is not None else None)
    return dict(target=target, vae=vae, sampler=sampler)


# --------------------------------------------------------------------------- sampling, decoding
def sample_batch(model, diffusion, z, y, cfg_scale, *, guidance_channels=3, clip_denoised=False, generator=None,
                 progress=False):
    """The official sampling call on B latents; returns the B samples (FREE when the diffusion has a drafter).

    :func:`free_kernels.cli.common.sample_baseline`: guidance above scale 1 on the doubled batch;
    ``generator`` None (the global generator), one generator, or B per-sample generators (with
    guidance the unconditional rows draw from the same ones after the conditional rows).
    """
    return common.sample_baseline(model, diffusion, z, y, cfg_scale=cfg_scale, guidance_channels=guidance_channels,
                                  clip_denoised=clip_denoised, generator=generator, progress=progress)


def decode(vae, samples):
    """Latents -> images in [-1, 1] (identity for pixel-space models); an NVTX 'decode' range."""
    from free_kernels.nvtx import nvtx_range

    if vae is None:
        return samples
    with nvtx_range("decode"):
        scale = getattr(vae.config, "scaling_factor", None) or LATENT_SCALE  # 0.18215 for sd-vae-ft-*
        return vae.decode(samples / scale).sample


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C), with the official rounding (127.5 x + 128, clamped)."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def to_pil(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)  # 2-D uint8 -> mode L


def save_grid(images: torch.Tensor, path: str, nrow: int = 4, padding: int = 2) -> None:
    """Grid of [-1, 1] images (like torchvision's save_image(normalize=True, value_range=(-1, 1)))."""
    x = ((images.clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).cpu()
    B, C, H, W = x.shape
    ncol = min(nrow, B)
    nrows = (B + ncol - 1) // ncol
    grid = torch.zeros(C, nrows * (H + padding) + padding, ncol * (W + padding) + padding, dtype=torch.uint8)
    for k in range(B):
        r, c = divmod(k, ncol)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[:, top:top + H, left:left + W] = x[k]
    from free_kernels.cli.common import atomic_write

    fmt = "JPEG" if path.lower().endswith((".jpg", ".jpeg")) else "PNG"
    atomic_write(path, lambda f: to_pil(grid.permute(1, 2, 0).numpy()).save(f, format=fmt))


def stats_dict(diffusion, batch_size: int, seconds: float) -> dict:
    st = getattr(diffusion, "last_stats", None)
    if diffusion.drafter is None or st is None:
        return dict(mode="baseline", batch_size=batch_size, num_steps=diffusion.num_timesteps,
                    target_calls=diffusion.num_timesteps, rounds=diffusion.num_timesteps,
                    steps_per_sample=[diffusion.num_timesteps] * batch_size,
                    sample_rounds=[diffusion.num_timesteps] * batch_size, time_total_s=seconds)
    return st.as_dict()


def check_outputs(args) -> None:
    """--out / --stats checked before any model loads: extension, not an input file, writable directory."""
    from free_kernels.cli.common import FileProblem, check_output_path, remove_stale_tmp

    inputs = [x for x in (args.target, args.ckpt) if x]
    inputs += [common.json_beside(x) for x in inputs if x.endswith(".safetensors")]
    dp = common.drafter_file(args.drafter) if args.drafter is not None else None
    if dp:
        inputs += [dp, common.json_beside(dp)]
    try:
        for opt, path, suffixes in (("--out", args.out, (".png", ".jpg", ".jpeg")), ("--stats", args.stats, (".json",))):
            if path:
                check_output_path(opt, path, suffixes=suffixes, protected=inputs)
                remove_stale_tmp(os.path.dirname(os.path.abspath(path)), [os.path.basename(path)])
    except FileProblem as e:
        fail(str(e))


# --------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, cfg_default=4.0, vae_default="mse")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-labels", type=int, nargs="+", default=None,
                   help="labels to sample (default: the official eight for 1000 classes, else 0..7 mod classes)")
    p.add_argument("--out", type=str, default="sample.png")
    p.add_argument("--stats", type=str, default=None, help="write the FREE statistics as JSON here")
    args = p.parse_args(argv)
    check_args(args)
    check_outputs(args)

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    torch.set_grad_enabled(False)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    model, image_size, _ = load_model(args, device)
    diffusion = make_diffusion(args, model)
    vae = load_vae(args, device)
    labels = args.class_labels
    if labels is None:
        labels = OFFICIAL_LABELS if model.num_classes == 1000 else [i % model.num_classes for i in range(8)]
    checked(common.check_labels, labels, model.num_classes, "--class-labels")
    n = len(labels)
    z = torch.randn(n, model.in_channels, model.input_size, model.input_size, device=device)
    y = torch.tensor(labels, device=device)

    t0 = time.perf_counter()
    samples = sample_batch(model, diffusion, z, y, args.cfg_scale, guidance_channels=args.guidance_channels,
                           clip_denoised=args.clip_denoised, progress=True)
    seconds = time.perf_counter() - t0
    images = decode(vae, samples)
    save_grid(images, args.out, nrow=4)
    st = stats_dict(diffusion, n, seconds)
    print(f"saved {args.out} ({n} samples, {image_size}px, {args.num_sampling_steps} steps, {seconds:.1f} s, "
          f"{st['target_calls']} target calls" + (f", {st.get('steps_per_target_call', 1.0):.2f} steps per "
                                                   f"target call" if st["mode"] != "baseline" else "") + ")")
    if args.stats:
        from free_kernels.cli.common import atomic_write_json

        atomic_write_json(args.stats, st)


if __name__ == "__main__":
    main()

"""Train the demo DiT on MNIST digits (the script that made ``assets/demo_dit.safetensors``).

    python -m free_kernels.demo.train_target --out runs/demo_dit --steps 4000
    python -m free_kernels.demo.train_target --dataset mosaic --out runs/mosaic_dit --steps 12000

``--dataset`` picks the rung of the digit family (``free_kernels.demo.data.DATASETS``):
digits16 (D = 256, the embedded demo), digits32 (D = 1024), mosaic (D = 4096, 4 x 32 x 32), each at 16 tokens.

Resumable: ``--out`` holds ``state.pt`` (model, EMA, optimiser, step, RNG);
running the same command again continues where it stopped.  The final EMA
weights are written as ``<out>/demo_dit.safetensors`` + ``.json`` (config and
training record).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from .._checks import FileProblem, atomic_torch_save, atomic_write_json, remove_stale_tmp, safe_torch_load
from ..diffusion import create_diffusion
from ..models.dit import DiT
from . import DEMO_CONFIG
from .data import DATASETS, MODEL_KEYS, DigitFamily, dataset_spec


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo_dit", help="run directory (checkpoints, final weights)")
    p.add_argument("--data", default=None, help="MNIST directory (IDX .gz files)")
    p.add_argument("--dataset", default="digits16", choices=sorted(DATASETS),
                   help="rung of the digit family: digits16 (D=256), digits32 (D=1024), mosaic (D=4096)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default=None, help="JSON dict overriding the demo DiT config")
    return p.parse_args(argv)


def _save_state(path, **state):
    # atomic (temp file in the same directory, fsync, rename): an interruption never leaves a broken checkpoint
    atomic_torch_save(dict(state, format=STATE_FORMAT), path)


STATE_FORMAT = "free_kernels.demo.train_target/2"


def _load_state(path, dev):
    """state.pt, loaded safely (weights_only: a run folder from someone else cannot run code)."""
    try:
        st = safe_torch_load(path, "checkpoint", map_location=dev)
    except FileProblem as e:
        raise SystemExit(f"error: {e}; use another --out") from None
    need = ("model", "ema", "opt", "step", "losses", "time", "gen", "torch_rng")
    if not isinstance(st, dict) or not all(k in st for k in need):
        raise SystemExit(f"error: {path} is not a checkpoint of this script; use another --out")
    return st


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    remove_stale_tmp(args.out)
    spec = dataset_spec(args.dataset)
    cfg = dict(DEMO_CONFIG, **{k: spec[k] for k in MODEL_KEYS if k in spec})
    if args.config:
        cfg.update(json.loads(args.config))
    if (cfg["input_size"], cfg["in_channels"]) != (spec["input_size"], spec["in_channels"]):
        raise SystemExit(f"error: --config input_size / in_channels {cfg['input_size']} / {cfg['in_channels']} "
                         f"do not match --dataset {args.dataset} ({spec['input_size']} / {spec['in_channels']})")
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    family = DigitFamily(args.dataset, args.data)
    model = DiT(**cfg).to(dev)
    ema = DiT(**cfg).to(dev)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    diffusion = create_diffusion(timestep_respacing="")  # 1000 training steps, learned sigma
    step, losses, t_train = 0, [], 0.0
    state_path = os.path.join(args.out, "state.pt")
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    if os.path.isfile(state_path):
        st = _load_state(state_path, dev)
        if st.get("dataset", "digits16") != args.dataset:
            raise SystemExit(f"error: {state_path} trains --dataset {st.get('dataset', 'digits16')}, not "
                             f"{args.dataset}; use another --out")
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        step, losses, t_train = st["step"], st["losses"], st["time"]
        gen.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        print(f"resumed from {state_path} at step {step}")

    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=step, desc="train demo DiT", unit="step")
    model.train()
    while step < args.steps:
        t0 = time.perf_counter()
        x, y = family.batch(args.batch_size, gen)
        x, y = x.to(dev), y.to(dev)
        # label dropout for classifier-free guidance happens inside the model in train() mode, as in
        # the official DiT (class_dropout_prob, global RNG: saved with the checkpoint for resume)
        t = torch.randint(0, diffusion.num_timesteps, (args.batch_size,), generator=gen).to(dev)
        noise = torch.randn(x.shape, generator=gen).to(dev)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = diffusion.training_losses(model, x, t, model_kwargs=dict(y=y), noise=noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
        step += 1
        t_train += time.perf_counter() - t0
        losses.append(float(loss))
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}", lr=f"{lr:.1e}")
        if step % args.save_every == 0 or step == args.steps:
            _save_state(state_path, model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                        step=step, losses=losses, time=t_train, gen=gen.get_state(), dataset=args.dataset,
                        torch_rng=torch.get_rng_state())
    bar.close()

    from .._checks import atomic_save_safetensors

    final = os.path.join(args.out, "demo_dit.safetensors")
    atomic_save_safetensors({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, final)
    record = dict(
        config=cfg, steps=step, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, ema=args.ema,
        seed=args.seed, train_time_s=round(t_train, 1), device=str(dev), torch=torch.__version__,
        loss_first_100=sum(losses[:100]) / max(len(losses[:100]), 1),
        loss_last_500=sum(losses[-500:]) / max(len(losses[-500:]), 1),
        loss_curve=[round(sum(losses[i:i + 250]) / len(losses[i:i + 250]), 5) for i in range(0, len(losses), 250)],
        dataset=args.dataset,
        data=dict(digits16="MNIST t10k split (10,000 digits), 2x2-averaged to 14x14, padded to 16x16, "
                           "scaled to [-1, 1]",
                  digits32="MNIST t10k split (10,000 digits), 28x28 padded to 32x32, scaled to [-1, 1]",
                  mosaic="MNIST t10k split: 64x64 canvases of a 2x2 grid of four different instances of "
                         "one digit (each 28x28 padded to 32x32), scaled to [-1, 1], fed as 4x32x32 by "
                         "pixel_unshuffle(2)")[args.dataset],
    )
    atomic_write_json(final[: -len(".safetensors")] + ".json", record)
    print(f"wrote {final} ({step} steps, {t_train / 60:.1f} min, final loss {record['loss_last_500']:.4f})")


if __name__ == "__main__":
    main()

"""Train the demo's digit classifier (the script that made ``assets/digit_classifier.safetensors``).

    python -m free_kernels.demo.train_classifier --out runs/digit_classifier

Data: the MNIST t10k digits at 16x16 in [-1, 1] (``load_mnist(size=16)``),
split by a seeded permutation into ``--train`` training digits and the rest
held out.  Augmentation: random shifts of up to ``--shift`` pixels (the
vacated border is background, -1).  Writes ``<out>/digit_classifier.safetensors``
and ``<out>/digit_classifier.json`` (config + training record with the
held-out accuracy).  A few minutes at most on one CPU thread.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from torch.nn import functional as F

from .classifier import DigitClassifier
from .data import find_mnist, load_mnist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/digit_classifier", help="output directory")
    p.add_argument("--data", default=None, help="MNIST directory (IDX .gz files)")
    p.add_argument("--train", type=int, default=9000, help="training digits (the rest of the 10,000 is held out)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--shift", type=int, default=2, help="max random shift in pixels (0: no augmentation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave as is)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by an independent integer offset in [-max_shift, max_shift]^2, filling with -1."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    xp = F.pad(x, (max_shift,) * 4, value=-1.0)
    off = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen).to(x.device)
    rows = off[0][:, None] + torch.arange(h, device=x.device)[None]  # (n, h)
    cols = off[1][:, None] + torch.arange(w, device=x.device)[None]  # (n, w)
    b = torch.arange(n, device=x.device)[:, None, None]
    return xp[b, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


@torch.no_grad()
def accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000):
    model.eval()
    pred = torch.cat([model(x[i: i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])
    correct = pred == y
    per_class = [float(correct[y == c].float().mean()) if bool((y == c).any()) else None
                 for c in range(model.num_classes)]
    return float(correct.float().mean()), per_class


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    os.makedirs(args.out, exist_ok=True)
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_all, y_all = load_mnist(args.data, size=16)
    n_all = x_all.shape[0]
    if not 0 < args.train < n_all:
        raise ValueError(f"--train must be in (0, {n_all}), got {args.train}")
    perm = torch.randperm(n_all, generator=gen)
    tr, ho = perm[: args.train], perm[args.train:]
    x_tr, y_tr = x_all[tr].to(dev), y_all[tr].to(dev)
    x_ho, y_ho = x_all[ho].to(dev), y_all[ho].to(dev)

    model = DigitClassifier().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(args.train / args.batch_size)
    total = args.epochs * steps_per_epoch
    history = []
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="train digit classifier", unit="step", mininterval=1.0)
    step = 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(args.train, generator=gen).to(dev)
        run_loss, run_n = 0.0, 0
        for i in range(0, args.train, args.batch_size):
            idx = order[i: i + args.batch_size]
            xb = random_shift(x_tr[idx], args.shift, gen)
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / total))  # cosine decay to 0
            for g in opt.param_groups:
                g["lr"] = lr
            loss = F.cross_entropy(model(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run_loss += loss.item() * idx.numel()
            run_n += idx.numel()
            step += 1
            bar.update(1)
        acc, _ = accuracy(model, x_ho, y_ho)
        history.append(dict(epoch=epoch + 1, train_loss=round(run_loss / run_n, 5), heldout_acc=round(acc, 4)))
        bar.set_postfix(loss=f"{run_loss / run_n:.4f}", heldout=f"{acc:.4f}")
    bar.close()
    train_time = time.perf_counter() - t0

    acc, per_class = accuracy(model, x_ho, y_ho)
    train_acc, _ = accuracy(model, x_tr, y_tr)
    model = model.cpu()
    final = os.path.join(args.out, "digit_classifier.safetensors")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, final)
    record = dict(
        config=model.config(),
        heldout_accuracy=round(acc, 4),
        heldout_per_class_accuracy=[None if a is None else round(a, 4) for a in per_class],
        train_accuracy=round(train_acc, 4),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        augmentation=f"random integer shifts in [-{args.shift}, {args.shift}] pixels, background fill",
        seed=args.seed, train_time_s=round(train_time, 1), threads=torch.get_num_threads(),
        device=str(dev), torch=torch.__version__,
        data=(f"MNIST t10k split ({n_all} digits) from {os.path.basename(find_mnist(args.data))}/, "
              f"2x2-averaged to 14x14, padded to 16x16, scaled to [-1, 1]; seeded permutation (seed {args.seed}): "
              f"{args.train} training, {n_all - args.train} held out"),
        heldout_indices_note="held-out = torch.randperm(10000, generator=torch.Generator().manual_seed(seed))[train:]",
        history=history,
    )
    with open(final[: -len(".safetensors")] + ".json", "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {final}: held-out accuracy {acc:.4f} ({n_all - args.train} digits), "
          f"train accuracy {train_acc:.4f}, {train_time:.0f} s")


if __name__ == "__main__":
    main()

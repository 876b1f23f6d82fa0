"""Drafter distillation: train a FeatureDrafter from a frozen target with its own sampler.

    free-train-drafter --out runs/drafter                 # the embedded demo DiT, 250 steps, cfg 1
    free-train-drafter --target ckpt.pt --model DiT-XL/2 --image-size 256 --steps 250 --cfg-scale 1.5 ...

1. Trajectories: the target's own ancestral sampler (the CFG setting the drafter
   will be used with) is run on ``--num-trajectories`` samples; every step
   records the state x_i, the exact top-block features (both CFG branches) and
   the guided transition p_i.  ``--cache FILE`` keeps them on disk (reused when
   the file exists).
2. Training: random windows of ``--unroll`` consecutive steps; the drafter
   starts from the exact parent features and feeds its own predictions forward
   (errors that compound over a draft are trained against).  Losses:

   * ``kl``: KL(q_j || p_j) of the drafted vs the target transition through the
     frozen head (whitened mean discrepancy |(mu_p - mu_q)/sigma|^2 / 2 plus the
     log-variance discrepancy: acceptance 1 - TV(p, q) is bounded by it);
   * ``whitened``: only the whitened mean discrepancy;
   * ``feature``: feature regression (MSE to the exact features, normalised);
   * ``kl+feature``: kl plus ``--feature-weight`` x feature.
3. Checkpoints (``<out>/state.pt``, atomic) every ``--save-every`` steps; the same
   command resumes after an interruption.  Final drafter: ``<out>/drafter.safetensors``
   + ``.json``, and a report with the measured steps per target call of exact
   FREE (and of the frozen drafter, the reference to beat).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Dict, Optional

import numpy as np
import torch

from .diffusion import create_diffusion
from .diffusion.gaussian_diffusion import GaussianDiffusion
from .models.dit import guide_output
from .models.drafter import FeatureDrafter, FrozenFeatureDrafter
from .reference.draft_transition import guided_transition

LOSSES = ("kl", "whitened", "feature", "kl+feature")


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
    cfg = cfg_scale != 1.0
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


def draft_window(drafter, target, diffusion, traj, b, k0, unroll, *, cfg_scale, guidance_channels, device,
                 clip_denoised=False):
    """Unroll the drafter over positions k0 .. k0+unroll-1 of trajectories ``b``.

    Yields per step (kl, whitened d^2, feature mse) averaged over the batch.
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
        h = drafter(h_prev, x_in, t_in, y_in)
        c = target.embed_condition(t_in, y_in)
        out = target.forward_head(h, c)
        tr = guided_transition(diffusion, out, x, idx, cfg=cfg, cfg_scale=cfg_scale,
                               guidance_channels=guidance_channels, in_channels=C, clip_denoised=clip_denoised)
        mp = traj["mean"][b, k].to(device)
        lvp = traj["logvar"][b, k].to(device)
        kl, d2 = transition_losses(tr["mean"].reshape(B, -1), tr["log_variance"].reshape(B, -1), mp, lvp)
        h_true = traj["h"][b, k].to(device).float().transpose(0, 1).reshape(G * B, *traj["h"].shape[3:])
        fmse = ((h - h_true) ** 2).mean() / h_true.var().clamp_min(1e-8)
        outs.append((kl.mean(), d2.mean(), fmse))
        h_prev = h
    return outs


def combine_loss(kind, terms, feature_weight):
    kl = sum(t[0] for t in terms) / len(terms)
    d2 = sum(t[1] for t in terms) / len(terms)
    fm = sum(t[2] for t in terms) / len(terms)
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
    """Analytic per-position acceptance proxy on held-out trajectories: mean exp(-KL) and equal-var 2 Phi(-|d|/2)."""
    N = traj["num_steps"]
    n = traj["x"].shape[0]
    kls = torch.zeros(N)
    d2s = torch.zeros(N)
    b_all = torch.arange(n)
    for k in range(1, N - 1):
        terms = draft_window(drafter, target, diffusion, traj, b_all[: min(n, max_rows)], k, 1,
                             cfg_scale=cfg_scale, guidance_channels=guidance_channels, device=device)
        kls[k] += float(terms[0][0])
        d2s[k] += float(terms[0][1])
    return kls, d2s


def expected_steps(a: float, L: int) -> float:
    """Expected steps per round with per-step acceptance a and draft length L (bonus counted)."""
    if a >= 1:
        return float(L + 1)
    return (1 - a ** (L + 1)) / (1 - a)


@torch.no_grad()
def measure_free(target, drafter, diffusion, *, n, draft_length, cfg_scale, guidance_channels, seed, device):
    from .sampler import FreeSampler

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
def load_target(args, device):
    from .demo import load_target as load_json_target

    if args.target in (None, "", "demo"):
        return load_json_target(device=device)
    base = args.target[: -len(".safetensors")] if args.target.endswith(".safetensors") else args.target
    if args.target.endswith(".safetensors") and os.path.isfile(base + ".json"):
        return load_json_target(args.target, device=device)  # our format: weights + JSON config
    from .models.dit import DiT_models, find_model, load_state_dict_strict

    sd = find_model(args.target)
    if args.model not in DiT_models:
        raise SystemExit(f"--model must be one of {sorted(DiT_models)} for --target {args.target!r}")
    model = DiT_models[args.model](input_size=args.image_size // 8 if args.image_size else 32,
                                   num_classes=args.num_classes, in_channels=args.in_channels)
    load_state_dict_strict(model, sd)
    return model.to(device).eval()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="free-train-drafter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="demo", help="'demo' (embedded) or a DiT checkpoint (.pt/.safetensors)")
    p.add_argument("--model", default="DiT-XL/2", help="DiT config name for --target checkpoints")
    p.add_argument("--image-size", type=int, default=256, help="image size for --target checkpoints (latent = /8)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--out", default="runs/drafter")
    p.add_argument("--steps", default="250", help="sampler respacing the drafter is trained for")
    p.add_argument("--variance", choices=("learned", "fixed"), default="learned")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-channels", type=int, default=3, choices=(3, 4))
    p.add_argument("--num-trajectories", type=int, default=256)
    p.add_argument("--eval-trajectories", type=int, default=32)
    p.add_argument("--cache", default=None, help="trajectory cache file (created if missing)")
    p.add_argument("--depth", type=int, default=1)
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
    return p.parse_args(argv)


def _atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.unroll < 1:
        raise SystemExit("--unroll must be >= 1")
    device = args.device
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    target = load_target(args, device)
    target.requires_grad_(False)
    diffusion = create_diffusion(args.steps, learn_sigma=args.variance == "learned")
    N = diffusion.num_timesteps
    if N < args.unroll + 2:
        raise SystemExit(f"--steps {args.steps} gives {N} steps: too few for --unroll {args.unroll}")
    torch.manual_seed(args.seed)

    # ---------------------------------------------------------------- trajectories
    t0 = time.perf_counter()
    kw = dict(cfg_scale=args.cfg_scale, guidance_channels=args.guidance_channels, device=device, progress=progress)
    if args.cache and os.path.isfile(args.cache):
        traj = torch.load(args.cache, weights_only=False)
        if traj.get("num_steps") != N or traj.get("cfg_scale") != args.cfg_scale:
            raise SystemExit(f"--cache {args.cache!r} was made for other settings "
                             f"(steps {traj.get('num_steps')}, cfg {traj.get('cfg_scale')})")
        print(f"loaded {traj['x'].shape[0]} trajectories from {args.cache}")
    else:
        traj = generate_trajectories(target, diffusion, args.num_trajectories + args.eval_trajectories,
                                     seed=args.seed, **kw)
        if args.cache:
            _atomic_save(traj, args.cache)
    t_traj = time.perf_counter() - t0
    n_train = traj["x"].shape[0] - args.eval_trajectories
    if n_train < 1:
        raise SystemExit("not enough trajectories for training after holding out --eval-trajectories")
    held = {k: (v[n_train:] if torch.is_tensor(v) else v) for k, v in traj.items()}

    # ---------------------------------------------------------------- drafter + resume
    drafter = FeatureDrafter.for_target(target, depth=args.depth, init="identity")
    opt = torch.optim.AdamW(drafter.parameters(), lr=args.lr, weight_decay=0.0)
    state_path = os.path.join(args.out, "state.pt")
    step, history, t_train = 0, [], 0.0
    gen = torch.Generator().manual_seed(args.seed + 17)
    if os.path.isfile(state_path):
        st = torch.load(state_path, map_location=device, weights_only=False)
        if st["args"]["loss"] != args.loss or st["args"]["depth"] != args.depth:
            raise SystemExit(f"{state_path} belongs to a run with other settings; use another --out")
        drafter.load_state_dict(st["drafter"])
        opt.load_state_dict(st["opt"])
        step, history, t_train = st["step"], st["history"], st["time"]
        gen.set_state(st["gen"])
        print(f"resumed from {state_path} at step {step}")

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.train_steps, initial=step, desc=f"train drafter ({args.loss}, unroll {args.unroll})",
                   unit="step")
    kmax = N - 1 - args.unroll  # last window start so that index 0 is never drafted
    while step < args.train_steps:
        t1 = time.perf_counter()
        b = torch.randint(0, n_train, (args.batch_size,), generator=gen)
        k0 = int(torch.randint(1, kmax + 1, (1,), generator=gen))
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.train_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        terms = draft_window(drafter, target, diffusion, traj, b, k0, args.unroll, cfg_scale=args.cfg_scale,
                             guidance_channels=args.guidance_channels, device=device)
        loss = combine_loss(args.loss, terms, args.feature_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        step += 1
        t_train += time.perf_counter() - t1
        history.append([float(loss.detach()), *(float(v.detach()) for v in terms[0])])
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                h = np.asarray(history[-50:])
                bar.set_postfix(loss=f"{h[:, 0].mean():.3g}", kl=f"{h[:, 1].mean():.3g}")
        if step % args.save_every == 0 or step == args.train_steps:
            _atomic_save(dict(drafter=drafter.state_dict(), opt=opt.state_dict(), step=step, history=history,
                              time=t_train, gen=gen.get_state(), args=vars(args)), state_path)
    if bar is not None:
        bar.close()

    # ---------------------------------------------------------------- report
    drafter.eval()
    kl_learned, d2_learned = evaluate_acceptance(drafter, target, diffusion, held, cfg_scale=args.cfg_scale,
                                                 guidance_channels=args.guidance_channels, device=device)
    frozen = FrozenFeatureDrafter(target)
    kl_frozen, d2_frozen = evaluate_acceptance(frozen, target, diffusion, held, cfg_scale=args.cfg_scale,
                                               guidance_channels=args.guidance_channels, device=device)
    mcfg = dict(n=args.eval_samples, draft_length=args.draft_length, cfg_scale=args.cfg_scale,
                guidance_channels=args.guidance_channels, seed=args.seed + 1000, device=device)
    st_l = measure_free(target, drafter, diffusion, **mcfg)
    st_f = measure_free(target, frozen, diffusion, **mcfg)
    report = dict(
        target=args.target, steps=args.steps, num_steps=N, variance=args.variance, cfg_scale=args.cfg_scale,
        guidance_channels=args.guidance_channels, depth=args.depth, loss=args.loss,
        feature_weight=args.feature_weight, unroll=args.unroll, train_steps=step, batch_size=args.batch_size,
        lr=args.lr, num_trajectories=n_train, eval_trajectories=args.eval_trajectories, seed=args.seed,
        trajectory_time_s=round(t_traj, 1), train_time_s=round(t_train, 1), device=str(device),
        heldout_mean_kl=float(kl_learned[1:N - 1].mean()), heldout_mean_kl_frozen=float(kl_frozen[1:N - 1].mean()),
        heldout_mean_d2=float(d2_learned[1:N - 1].mean()), heldout_mean_d2_frozen=float(d2_frozen[1:N - 1].mean()),
        draft_length=args.draft_length, eval_samples=args.eval_samples,
        steps_per_target_call=st_l.steps_per_target_call, acceptance=st_l.acceptance_rate,
        steps_per_target_call_frozen=st_f.steps_per_target_call, acceptance_frozen=st_f.acceptance_rate,
        acceptance_early_middle_late=st_l.as_dict()["acceptance_early_middle_late"],
        loss_curve=[round(float(np.mean([h[0] for h in history[i:i + 100]])), 5) for i in range(0, len(history), 100)],
    )
    drafter.save(os.path.join(args.out, "drafter"), extra=report)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"drafter written to {os.path.join(args.out, 'drafter.safetensors')}")
    print(f"exact FREE, L={args.draft_length}, {args.eval_samples} samples: steps per target call "
          f"{st_l.steps_per_target_call:.2f} (acceptance {st_l.acceptance_rate:.3f}); frozen drafter "
          f"{st_f.steps_per_target_call:.2f} (acceptance {st_f.acceptance_rate:.3f})")
    print(f"held-out mean KL(q||p) per step: learned {report['heldout_mean_kl']:.3f}, "
          f"frozen {report['heldout_mean_kl_frozen']:.3f}")
    return report


if __name__ == "__main__":
    main()

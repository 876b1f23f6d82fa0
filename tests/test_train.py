"""Drafter distillation (the library, free_kernels.distill, and its command, free-train-drafter in
free_kernels.cli.train_drafter): losses, runs end to end, resumes after interruption, and learns (beats its
start)."""
from __future__ import annotations

import json
import os

import pytest
import torch

import free_kernels as fk
from free_kernels import distill
from free_kernels.cli import train_drafter as train
from free_kernels.models import DiT, FeatureDrafter


def _tiny_target(path):
    torch.manual_seed(0)
    cfg = dict(input_size=4, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3,
               learn_sigma=True, class_dropout_prob=0.1)
    m = DiT(**cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.05))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path + ".safetensors")
    with open(path + ".json", "w") as f:
        json.dump({"config": cfg}, f)
    return m.eval()


def _args(tmp_path, target, extra=()):
    return ["--target", target + ".safetensors", "--out", str(tmp_path / "run"), "--steps", "12",
            "--num-trajectories", "16", "--eval-trajectories", "4", "--batch-size", "8", "--unroll", "2",
            "--eval-samples", "2", "--draft-length", "3", "--no-progress", "--lr", "3e-3", *extra]


def test_train_drafter_end_to_end_and_resume(tmp_path):
    target = str(tmp_path / "dit")
    _tiny_target(target)
    cache = str(tmp_path / "traj.pt")
    rep1 = train.run(_args(tmp_path, target, ["--train-steps", "4", "--save-every", "2", "--cache", cache]))
    assert os.path.isfile(cache)
    assert rep1["train_steps"] == 4
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["step"] == 4
    # "interrupted" run continues from its checkpoint, reusing the trajectory cache
    rep2 = train.run(_args(tmp_path, target, ["--train-steps", "40", "--save-every", "20", "--cache", cache]))
    assert rep2["train_steps"] == 40
    assert len(torch.load(tmp_path / "run" / "state.pt", weights_only=True)["history"]) == 40
    for k in ("steps_per_target_call", "steps_per_target_call_frozen", "heldout_mean_kl", "heldout_mean_kl_frozen",
              "acceptance_early_middle_late", "loss", "unroll"):
        assert k in rep2
    # the drafter learned: its held-out KL is below the frozen drafter's (its starting point)
    assert rep2["heldout_mean_kl"] < rep2["heldout_mean_kl_frozen"]
    m = fk.DiT(**json.load(open(target + ".json"))["config"])
    d = FeatureDrafter.load(str(tmp_path / "run" / "drafter"), target=m)
    assert d.depth == 1


def test_train_rejects_mismatched_resume_and_bad_options(tmp_path):
    target = str(tmp_path / "dit")
    _tiny_target(target)
    train.run(_args(tmp_path, target, ["--train-steps", "2", "--save-every", "1"]))
    with pytest.raises(SystemExit, match="other settings"):
        train.run(_args(tmp_path, target, ["--train-steps", "3", "--loss", "feature"]))
    with pytest.raises(SystemExit):
        train.run(_args(tmp_path, target, ["--unroll", "0"]))


def test_losses_are_zero_at_equality_and_positive_otherwise():
    mp = torch.randn(3, 10)
    lvp = torch.randn(3, 10) * 0.1 - 2
    kl, d2 = distill.transition_losses(mp, lvp, mp, lvp)
    assert torch.allclose(kl, torch.zeros(3), atol=1e-6) and torch.allclose(d2, torch.zeros(3))
    kl2, d22 = distill.transition_losses(mp + 0.1, lvp + 0.05, mp, lvp)
    assert (kl2 > 0).all() and (d22 > 0).all()
    # KL of equal-variance Gaussians is |d|^2 / 2
    kl3, d23 = distill.transition_losses(mp + 0.1, lvp, mp, lvp)
    assert torch.allclose(kl3, 0.5 * d23, rtol=1e-5)
    assert abs(distill.expected_steps(0.0, 6) - 1.0) < 1e-9 and abs(distill.expected_steps(1.0, 6) - 7.0) < 1e-9


def test_acceptance_from_kl_is_the_equal_variance_acceptance():
    """1 - TV of two equal-variance Gaussians is 2 Phi(-delta / 2) (delta: whitened mean distance): checked in
    closed form and by sampling the accept rule min(1, p / q) itself."""
    lv = torch.full((1, 4), -1.0)
    for delta in (0.0, 0.3, 1.0, 2.5):
        d = torch.zeros(1, 4)
        d[0, 0] = delta * torch.exp(0.5 * lv[0, 0])
        kl, _ = distill.transition_losses(d, lv, torch.zeros(1, 4), lv)
        a = float(distill.acceptance_from_kl(kl))
        assert abs(a - float(2 * torch.special.ndtr(torch.tensor(-delta / 2)))) < 1e-4
        g = torch.Generator().manual_seed(0)
        z = torch.randn(200_000, generator=g)  # x ~ q along the separating axis, in units of sigma
        log_ratio = -0.5 * (z + delta) ** 2 + 0.5 * z ** 2  # log p(x) / q(x), p centred delta away
        mc = float(torch.exp(log_ratio.clamp(max=0)).mean())
        assert abs(a - mc) < 5e-3, (delta, a, mc)


def test_steps_loss_counts_drafts_until_the_first_rejection():
    """`--loss steps`: minus the expected accepted drafts per window; a draft after a certain rejection neither
    counts nor receives a gradient, one before it does."""
    zero, huge = torch.zeros(3), torch.full((3,), 1e4)
    perfect = [(zero, zero, torch.tensor(0.0))] * 4
    assert abs(float(distill.combine_loss("steps", perfect, 1.0)) + 1.0) < 1e-3  # every draft accepted
    first = zero.clone().requires_grad_(True)
    later = torch.full((3,), 0.5, requires_grad=True)
    loss = distill.combine_loss("steps", [(first, zero, torch.tensor(0.0)), (huge, huge, torch.tensor(0.0)),
                                        (later, later, torch.tensor(0.0))], 1.0)
    only_first = float(distill.acceptance_from_kl(torch.zeros(1))) / 3  # only the first draft counts
    assert abs(float(loss.detach()) + only_first) < 1e-4
    loss.backward()
    assert float(later.grad.abs().max()) == 0.0 and float(first.grad.abs().max()) > 0.0
    fm = torch.tensor(0.25)
    both = distill.combine_loss("steps+feature", [(zero, zero, fm)] * 2, 2.0)
    assert abs(float(both) - (float(distill.combine_loss("steps", [(zero, zero, fm)] * 2, 2.0)) + 0.5)) < 1e-6


def test_train_with_the_steps_loss(tmp_path):
    target = str(tmp_path / "dit")
    _tiny_target(target)
    rep = train.run(_args(tmp_path, target, ["--train-steps", "30", "--save-every", "30", "--loss", "steps"]))
    assert rep["loss"] == "steps" and rep["steps_per_target_call"] >= 1
    assert rep["heldout_mean_kl"] < rep["heldout_mean_kl_frozen"]


def test_train_on_a_mix_of_respacings(tmp_path):
    """--respacings: one stride-conditioned drafter, a report per respacing, the respacings in the run identity."""
    target = str(tmp_path / "dit")
    _tiny_target(target)
    cache = str(tmp_path / "traj.pt")
    args = _args(tmp_path, target, ["--train-steps", "6", "--save-every", "3", "--respacings", "12,20", "--cache", cache])
    rep = train.run(args)
    assert rep["respacings"] == ["12", "20"] and rep["steps"] == "12"  # --steps 12 heads the report
    assert set(rep["per_respacing"]) == {"12", "20"}
    for r, n in (("12", 12), ("20", 20)):
        per = rep["per_respacing"][r]
        assert per["num_steps"] == n and per["steps_per_target_call"] >= 1
        assert len(rep["acceptance_profile"][str(n)]) == n
        assert all(0 <= a <= 1 for a in rep["acceptance_profile"][str(n)])
    st = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert st["identity"]["respacings"] == ["12", "20"]
    d = FeatureDrafter.load(str(tmp_path / "run" / "drafter"))
    assert d.stride_proj.weight.abs().sum() > 0  # the stride conditioning was trained
    assert d.extra["per_respacing"]["20"]["num_steps"] == 20
    # the cache holds both respacings and is reused; the respacings are part of the run identity
    rep2 = train.run(args)
    assert rep2["train_steps"] == 6
    with pytest.raises(SystemExit, match="other settings"):
        train.run(_args(tmp_path, target, ["--train-steps", "6", "--respacings", "12,16", "--cache", cache]))
    with pytest.raises(SystemExit, match="must be one of"):
        train.run(_args(tmp_path, target, ["--respacings", "16,20"]))


def test_one_respacing_run_keeps_the_stride_conditioning_at_zero_and_init_from_a_drafter(tmp_path):
    target = str(tmp_path / "dit")
    _tiny_target(target)
    train.run(_args(tmp_path, target, ["--train-steps", "3"]))
    first = FeatureDrafter.load(str(tmp_path / "run" / "drafter"))
    assert first.stride_proj.weight.abs().sum() == 0 and "per_respacing" not in first.extra
    # --init: start a mixed run from that drafter (its hash joins the identity)
    args = _args(tmp_path, target, ["--train-steps", "2", "--respacings", "12,20",
                                    "--init", str(tmp_path / "run" / "drafter.safetensors")])
    args[args.index("--out") + 1] = str(tmp_path / "run2")
    rep = train.run(args)
    assert rep["init_sha256"] and rep["train_steps"] == 2


def test_mlp_ratio_makes_a_narrower_drafter_and_is_part_of_the_run(tmp_path):
    target = str(tmp_path / "dit")
    _tiny_target(target)
    rep = train.run(_args(tmp_path, target, ["--train-steps", "2", "--mlp-ratio", "2"]))
    assert rep["mlp_ratio"] == 2.0
    m = fk.DiT(**json.load(open(target + ".json"))["config"])
    d = FeatureDrafter.load(str(tmp_path / "run" / "drafter"), target=m)
    assert d.mlp_ratio == 2.0 and d.blocks[0].mlp.fc1.out_features == 64
    # resuming with another ratio is another run
    with pytest.raises(train.TrainError, match="mlp_ratio"):
        train.run(_args(tmp_path, target, ["--train-steps", "4", "--mlp-ratio", "3"]))
    # a run made without the option (the default ratio) has no such key in its identity
    assert train.run_identity(train.parse_args(_args(tmp_path, target)), {}, train.RUN_KEYS)["mlp_ratio"] is None
    # --init cannot be widened; narrowed, each block keeps its most important MLP units
    init = str(tmp_path / "run" / "drafter.safetensors")
    with pytest.raises(train.TrainError, match="--mlp-ratio of at most 2"):
        train.run(_args(tmp_path / "other", target, ["--train-steps", "2", "--init", init]))
    narrow = FeatureDrafter.for_target(m, mlp_ratio=1.0)
    sd = distill.narrowed_state(d, narrow)
    narrow.load_state_dict(sd)
    w1, w2 = d.blocks[0].mlp.fc1.weight, d.blocks[0].mlp.fc2.weight
    units = (w1.norm(dim=1) * w2.norm(dim=0)).argsort(descending=True)[:32].sort().values
    assert torch.equal(narrow.blocks[0].mlp.fc1.weight, w1[units])
    assert torch.equal(narrow.blocks[0].mlp.fc2.weight, w2[:, units])
    assert torch.equal(narrow.fuse.weight, d.fuse.weight)
    rep = train.run(_args(tmp_path / "other", target, ["--train-steps", "2", "--init", init, "--mlp-ratio", "1"]))
    assert rep["mlp_ratio"] == 1.0
    with pytest.raises(train.TrainError, match="--mlp-ratio"):
        train.run(_args(tmp_path, target, ["--mlp-ratio", "0"]))

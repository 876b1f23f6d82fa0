"""free-sample (free_kernels.cli.sample): baseline vs FREE on a tiny saved target + drafter, PNG, JSON, errors."""
from __future__ import annotations

import json
import os
import re
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from free_kernels import demo, figures
from free_kernels.cli import sample as cli
from free_kernels.models import DiT, FeatureDrafter

TILE = 8  # tiny target: 8x8 images, patch 4 -> 4 tokens


def _save_tiny(tmp_path, name="dit", in_channels=1, drafter_extra=None):
    """A random tiny DiT (our .safetensors + .json format) and an identity-initialised drafter beside it."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = dict(input_size=TILE, patch_size=4, in_channels=in_channels, hidden_size=32, depth=2, num_heads=2,
               num_classes=10, learn_sigma=True, class_dropout_prob=0.1)
    m = DiT(**cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.05))
    target = str(tmp_path / f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, target)
    with open(str(tmp_path / f"{name}.json"), "w") as f:
        json.dump({"config": cfg}, f)
    drafter = str(tmp_path / f"{name}_drafter.safetensors")
    FeatureDrafter.for_target(m.eval(), depth=1, init="identity").save(
        drafter, extra=drafter_extra or dict(cfg_scale=1.0, num_steps=10, steps="10", variance="learned"))
    return target, drafter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny"))


def _common(tmp_path, target, drafter, *extra):
    return ["--target", target, "--drafter", drafter, "--steps", "10", "--num-samples", "3", "--threads", "1",
            "--no-progress", "--out", str(tmp_path / "grid.png"), *extra]


def _documented_names():
    return set(re.findall(r"``(\w+)``", cli.__doc__))


def _sheet(png, methods, columns, tile=TILE):
    """The labelled sheet: ``methods`` blocks of pictures upscaled from ``tile`` px to at least 96, in order."""
    tiles = figures.read_tiles(png)
    up = figures.tile_px(tile, tile)
    assert up[0] >= 96 and tiles.shape[1:3] == up
    with Image.open(png) as im:
        assert im.mode == "RGB" and im.size[0] >= columns * up[1] and im.size[1] >= methods * up[0]
    return tiles


def test_baseline_free_relax_png_and_json(tmp_path, tiny):
    target, drafter = tiny
    jpath = tmp_path / "out" / "run.json"
    assert cli.main(_common(tmp_path, target, drafter, "--relax", "0.5", "--json", str(jpath))) == 0
    png = tmp_path / "grid.png"
    assert png.is_file()
    # 3 per row; blocks: baseline, FREE (auto), FREE (L = 6), FREE (relax), each under its caption
    assert len(_sheet(png, 4, 3)) == 12
    rec = json.loads(jpath.read_text())
    assert rec["acceptance_png"] == str(tmp_path / "grid_acceptance.png")
    with Image.open(rec["acceptance_png"]) as im:
        assert im.size == figures.PLOT_SIZE

    documented = _documented_names()
    assert set(rec) <= documented, f"undocumented fields {set(rec) - documented}"
    for m in rec["methods"].values():
        assert set(m) <= documented, f"undocumented method fields {set(m) - documented}"
    assert rec["format"] == cli.JSON_FORMAT
    assert rec["num_samples"] == 3 and rec["labels"] == [0, 1, 2] and rec["num_steps"] == 10
    assert rec["cfg_scale"] == 1.0 and rec["drafter_cfg_scale"] == 1.0 and rec["draft_length"] == "auto"
    assert rec["compare_length"] == 6 and rec["batch_size"] == 1
    assert list(rec["methods"]) == ["baseline", "free", "free_fixed", "relax"]
    assert rec["grid_rows"] == {"baseline": [0], "free": [1], "free_fixed": [2], "relax": [3]}
    assert rec["grid_columns"] == 3

    base, free, fixed, relax = (rec["methods"][k] for k in ("baseline", "free", "free_fixed", "relax"))
    # batch 1: one call per sample and step
    assert base["target_calls"] == 30 and base["target_rows"] == 30 and base["steps_per_target_call"] == 1.0
    assert base["latency_s"] == pytest.approx(base["wall_s"] / 3)
    assert free["stats"]["draft_length_mode"] == "auto" and free["stats"]["plan"]["thirds"]
    assert fixed["stats"]["draft_length_mode"] == "fixed" and fixed["stats"]["draft_length"] == 6
    assert "auto" in free["label"] and "L = 6" in fixed["label"]
    assert base["speedup"] == pytest.approx(1.0) and base["exact"] and base["stats"] is None
    for m in (free, fixed, relax):
        assert m["steps_per_target_call"] >= 1.0
        assert 1 <= m["target_calls"] <= base["target_calls"]
        assert m["wall_s"] > 0 and m["speedup"] > 0
        drafted = sum(m["stats"]["rounds_by_draft_length"][1:]) > 0  # auto may find drafting never pays here
        assert (0.0 <= m["acceptance"] <= 1.0) if drafted else m["acceptance"] is None
        assert len(m["acceptance_early_middle_late"]) == 3
        assert sum(m["stats"]["steps_per_sample"]) == 3 * 10
    assert free["exact"] and "approximate" not in free["label"] and free["stats"]["mode"] == "exact"
    assert not relax["exact"] and "approximate" in relax["label"] and relax["stats"]["mode"] == "relax"
    assert rec["speedup"] == free["speedup"] and rec["speedup_relax"] == relax["speedup"]
    assert rec["quality_note"] is None and rec["warnings"] == []
    assert free["calibration_s"] >= 0 and base["calibration_s"] == 0 and fixed["calibration_s"] == 0
    assert free["stats"]["plan"]["mode"] == "adaptive"
    assert torch.get_num_threads() >= 1  # --threads is undone after an in-process run


def test_json_to_stdout_without_baseline(tmp_path, tiny, capsys):
    target, drafter = tiny
    assert cli.main(_common(tmp_path, target, "frozen", "--no-baseline", "--json")) == 0
    out = capsys.readouterr()
    rec = json.loads(out.out)  # stdout holds only the JSON; the table went to stderr
    assert "FREE (exact, auto L)" in out.err and "planner" in out.err
    assert list(rec["methods"]) == ["free", "free_fixed"] and rec["drafter"] == "frozen"
    assert rec["speedup"] is None and rec["methods"]["free"]["speedup"] is None and rec["speedup_relax"] is None
    assert len(_sheet(tmp_path / "grid.png", 2, 3)) == 6


def test_same_noise_and_batch_independent_baseline(tmp_path, tiny):
    target, drafter = tiny
    a = cli.initial_noise(7, 3, (1, TILE, TILE))
    assert torch.equal(a[:1], cli.initial_noise(7, 1, (1, TILE, TILE)))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a, cli.initial_noise(8, 3, (1, TILE, TILE)))
    tiles = []
    for labels in ("0,1,2", "0"):
        out = tmp_path / f"{labels}.png"
        cli.main(["--target", target, "--drafter", drafter, "--steps", "10", "--labels", labels, "--seed", "7",
                  "--threads", "1", "--no-progress", "--out", str(out)])
        tiles.append(torch.from_numpy(figures.read_tiles(out)[0].astype(np.int16)))
    first = tiles  # baseline, sample 0
    assert (first[0] - first[1]).abs().max() <= 1


def test_cfg_default_and_warning_on_a_three_channel_target(tmp_path):
    target, drafter = _save_tiny(tmp_path, "rgb", in_channels=3,
                                 drafter_extra=dict(cfg_scale=1.5, guidance_channels=3, num_steps=10))
    jpath = tmp_path / "cfg.json"
    cli.main(_common(tmp_path, target, drafter, "--json", str(jpath)))
    rec = json.loads(jpath.read_text())
    assert rec["cfg_scale"] == 1.5 and rec["warnings"] == []  # the drafter's setting is the default
    assert rec["methods"]["baseline"]["target_calls"] == 3 * 10  # one doubled-batch forward per step and sample
    assert len(_sheet(tmp_path / "grid.png", 3, 3)) == 9
    cli.main(_common(tmp_path, target, drafter, "--cfg-scale", "3", "--json", str(jpath)))
    rec = json.loads(jpath.read_text())
    assert rec["cfg_scale"] == 3.0 and any("cfg-scale 1.5" in w for w in rec["warnings"])


def test_quality_column_when_metrics_exist_and_skip_otherwise(tmp_path, tiny, monkeypatch, capsys):
    target, drafter = tiny
    fake = types.ModuleType("free_kernels.demo.metrics")
    fake.load_classifier = lambda: "clf"
    fake.digit_quality = lambda samples, labels, clf: dict(accuracy=0.5, n=int(labels.numel()))
    monkeypatch.setitem(sys.modules, "free_kernels.demo.metrics", fake)
    monkeypatch.setattr(demo, "metrics", fake, raising=False)
    jpath = tmp_path / "q.json"
    cli.main(_common(tmp_path, target, drafter, "--quality", "--json", str(jpath)))
    rec = json.loads(jpath.read_text())
    assert all(m["quality"] == 0.5 and m["quality_detail"]["n"] == 3 for m in rec["methods"].values())
    assert "digit acc" in capsys.readouterr().out

    def broken():
        raise FileNotFoundError("no classifier weights here")

    fake.load_classifier = broken
    cli.main(_common(tmp_path, target, drafter, "--quality", "--json", str(jpath)))
    rec = json.loads(jpath.read_text())
    assert all(m["quality"] is None for m in rec["methods"].values())
    assert "no classifier weights here" in rec["quality_note"]


@pytest.mark.parametrize("extra, message", [
    (["--labels", "3,10"], "out of range"),
    (["--labels", "3,x"], "comma-separated integers"),
    (["--labels", "-1"], "out of range"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--labels", "1,2", "--num-samples", "3"], "does not match"),
    (["--device", "quantum"], "unknown device"),
    (["--draft-length", "0"], "--draft-length"),
    (["--relax", "-0.5"], "--relax"),
    (["--steps", "oops"], "--steps"),
])
def test_bad_options_exit_with_a_clear_message(tmp_path, tiny, capsys, extra, message):
    target, drafter = tiny
    args = ["--target", target, "--drafter", drafter, "--steps", "10", "--no-progress",
            "--out", str(tmp_path / "g.png"), *extra]
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_missing_files_are_named(tmp_path, tiny, capsys):
    target, _ = tiny
    for args, path in ((["--target", str(tmp_path / "nope.safetensors")], str(tmp_path / "nope.safetensors")),
                       (["--target", target, "--drafter", str(tmp_path / "d.safetensors")],
                        str(tmp_path / "d.safetensors"))):
        with pytest.raises(SystemExit) as e:
            cli.main([*args, "--steps", "10", "--no-progress", "--out", str(tmp_path / "g.png")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert path in err and "not found" in err
    with pytest.raises(SystemExit):  # checked before anything is sampled
        cli.main(["--target", target, "--drafter", "frozen", "--steps", "10", "--no-progress", "--out", str(tmp_path)])
    assert "is a directory" in capsys.readouterr().err


def test_defaults_use_the_demo_asset_paths(tmp_path, tiny, monkeypatch, capsys):
    target, drafter = tiny
    monkeypatch.setattr(demo, "TARGET_FILE", target)
    monkeypatch.setattr(demo, "DRAFTER_FILE", drafter)
    jpath = tmp_path / "d.json"
    cli.main(["--steps", "10", "--num-samples", "2", "--threads", "1", "--no-progress",
              "--out", str(tmp_path / "d.png"), "--json", str(jpath)])
    rec = json.loads(jpath.read_text())
    assert rec["target"] == target and rec["drafter"] == drafter and rec["labels"] == [0, 1]
    missing = str(tmp_path / "absent_drafter.safetensors")
    monkeypatch.setattr(demo, "DRAFTER_FILE", missing)
    with pytest.raises(SystemExit):
        cli.main(["--steps", "10", "--no-progress", "--out", str(tmp_path / "d.png")])
    err = capsys.readouterr().err
    assert missing in err and "--drafter" in err


@pytest.mark.skipif(not (os.path.isfile(demo.TARGET_FILE) and os.path.isfile(demo.DRAFTER_FILE)),
                    reason="embedded demo assets (demo_dit / demo_drafter .safetensors) are not present yet")
def test_default_demo_run(tmp_path):
    jpath = tmp_path / "demo.json"
    out = tmp_path / "free_sample.png"
    assert cli.main(["--steps", "20", "--threads", "1", "--no-progress", "--out", str(out),
                     "--json", str(jpath)]) == 0
    rec = json.loads(jpath.read_text())
    assert rec["num_samples"] == 4 and rec["labels"] == list(range(4)) and rec["batch_size"] == 1
    assert rec["target"] == demo.TARGET_FILE and rec["drafter"] == demo.DRAFTER_FILE
    assert rec["methods"]["free"]["steps_per_target_call"] >= 1.0
    assert rec["methods"]["free"]["target_calls"] <= rec["methods"]["baseline"]["target_calls"] == 4 * 20
    assert rec["speedup"] > 0
    assert len(_sheet(out, 3, 4, tile=16)) == 12


def test_default_threads_give_each_method_its_best_and_compare_fairly(tmp_path, tiny):
    """--threads 0 on a small target: the baseline at 1 thread and again at FREE's cap; speed-ups against the
    faster baseline row; the second baseline row draws the same samples, so it adds no grid row."""
    target, drafter = tiny
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        argv = [a for a in _common(tmp_path, target, drafter, "--compare-length", "0", "--json",
                                   str(tmp_path / "r.json")) if a not in ("--threads", "1")]
        assert cli.main(argv) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)
    rec = json.loads((tmp_path / "r.json").read_text())
    assert list(rec["methods"]) == ["baseline", "baseline_threads", "free"] and rec["threads"] == 2
    base, both, free = (rec["methods"][k] for k in ("baseline", "baseline_threads", "free"))
    assert base["threads"] == 1 and both["threads"] == 2 and free["threads"] == 2
    assert "1 thread" in base["label"] and "2 threads" in both["label"]
    fastest = min(base["wall_s"], both["wall_s"])
    assert free["speedup"] == pytest.approx(fastest / free["wall_s"])
    assert max(base["speedup"], both["speedup"]) == pytest.approx(1.0)
    assert rec["grid_rows"] == {"baseline": [0], "free": [1]}
    assert set(free["stats"]["plan"]["threads_by_L"]) <= {1, 2}


def test_reproducible_auto_gives_the_same_images_for_the_same_seed(tmp_path, tiny):
    target, drafter = tiny
    runs = []
    for k in range(2):
        jpath = tmp_path / f"r{k}.json"
        cli.main(_common(tmp_path, target, drafter, "--reproducible", "--compare-length", "0", "--no-baseline",
                         "--out", str(tmp_path / f"r{k}.png"), "--json", str(jpath)))
        runs.append(figures.read_tiles(tmp_path / f"r{k}.png"))
        plan = json.loads(jpath.read_text())["methods"]["free"]["stats"]["plan"]
        assert plan["mode"] == "frozen" and plan["timed_rounds"] == 0
    assert np.array_equal(runs[0], runs[1])

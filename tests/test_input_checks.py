"""Bad input as a new user gives it: seeds, sampler requests, recorded drafter settings, nested JSON, huge sizes,
sample_ddp's environment and files.  Each is refused in one line naming the option, request or file (before any
long work), or handled without a silent wrong result."""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from _reliability_utils import (  # noqa: F401  (one_thread: autouse fixture)
    one_thread,
    SAMPLE_CFG, TRAIN_CFG, ddp_argv, run_sample_ddp, sample_ddp_module, save_tiny_target, train_argv,
)

from free_kernels.cli import common
from free_kernels.cli import sample as cli
from free_kernels.cli import train_drafter as train
from free_kernels.models import FeatureDrafter

DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON that Python's parser cannot nest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("input_checks")
    base = str(d / "tiny")
    m = save_tiny_target(base, SAMPLE_CFG)
    FeatureDrafter.for_target(m, depth=1, init="identity").save(str(d / "drafter"), extra=dict(cfg_scale=1.0))
    return dict(dir=d, model=m, target=base + ".safetensors", drafter=str(d / "drafter.safetensors"))


def _sample_error(tmp_path, tiny, capsys, *extra):
    argv = ["--target", tiny["target"], "--drafter", tiny["drafter"], "--steps", "6", "--no-progress",
            "--out", str(tmp_path / "g.png"), *extra]
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert time.monotonic() - t0 < 60  # refused before any sampling
    assert not (tmp_path / "g.png").exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("free-sample: error:")]  # after the usage
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ seeds, threads, CFG scale of free-sample
@pytest.mark.parametrize("seed", ["4294967296", "-1", "18446744073709551616"])
def test_free_sample_refuses_a_seed_it_would_mask(tmp_path, tiny, capsys, seed):
    msg = _sample_error(tmp_path, tiny, capsys, "--seed", seed)
    assert "--seed" in msg and "0 .. 4294967295" in msg and seed in msg


def test_the_seed_range_is_every_32_bit_value():
    assert common.check_seed(0) == 0 and common.check_seed(2 ** 32 - 1) == 2 ** 32 - 1
    for bad in (2 ** 32, -1, 1.5, True, "3"):
        with pytest.raises(common.UsageError, match="--seed"):
            common.check_seed(bad)


def test_free_sample_threads_beyond_the_cores_are_refused(tmp_path, tiny, capsys):
    msg = _sample_error(tmp_path, tiny, capsys, "--threads", "1000")
    assert "--threads 1000" in msg and "CPU core" in msg


def test_free_sample_cfg_scale_names_the_range_that_works(tmp_path, tiny, capsys):
    msg = _sample_error(tmp_path, tiny, capsys, "--cfg-scale", "1e30")
    assert "--cfg-scale" in msg and f"1 .. {common.MAX_CFG_SCALE:g}" in msg


# ------------------------------------------------------------------ a drafter's recorded training settings
@pytest.mark.parametrize("field, value", [
    ("cfg_scale", 0.5), ("cfg_scale", "1.5"), ("cfg_scale", 1e30), ("num_steps", 0), ("num_steps", "ten"),
    ("guidance_channels", 7), ("acceptance_profile", {"ten": [0.5]}), ("acceptance_profile", {"10": [1.5]}),
    ("acceptance_profile", "0.5"), ("respacings", ["250", ""]), ("respacings", "250"), ("variance", "small"),
])
def test_recorded_training_settings_are_validated_on_load(tmp_path, tiny, field, value):
    path = str(tmp_path / "drafter.safetensors")
    FeatureDrafter.for_target(tiny["model"], depth=1, init="identity").save(path, extra={field: value})
    with pytest.raises(common.UsageError) as e:
        common.load_drafter(path, tiny["model"])
    msg = str(e.value)
    assert path in msg and field in msg and "\n" not in msg


def test_valid_recorded_settings_load(tmp_path, tiny):
    path = str(tmp_path / "drafter.safetensors")
    extra = dict(cfg_scale=1.5, num_steps=10, guidance_channels=4, acceptance_profile={"10": [0.5] * 9 + [None]},
                 respacings=["10", "ddim5"], variance="fixed", steps="10")
    FeatureDrafter.for_target(tiny["model"], depth=1, init="identity").save(path, extra=extra)
    _, _, got = common.load_drafter(path, tiny["model"])
    assert got == extra


# ------------------------------------------------------------------ FreeSampler.sample_stream requests
@pytest.mark.parametrize("req, error", [
    ("12", TypeError), ((5, 3.7), TypeError), ((1.9, 3), TypeError), ((True, 1), TypeError),
    ((1, 2, 3), TypeError), ((-1, 2), ValueError), ((1, 11), ValueError), ((2 ** 64, 1), ValueError),
])
def test_sample_stream_refuses_malformed_requests(tiny, req, error):
    from free_kernels.diffusion import create_diffusion
    from free_kernels.sampler import FreeSampler

    s = FreeSampler(tiny["model"], FeatureDrafter.for_target(tiny["model"], depth=1, init="identity"),
                    create_diffusion("4"), draft_length=2)
    with pytest.raises(error, match="request 0"):
        next(s.sample_stream([req], batch_size=1))


def test_sample_stream_takes_numpy_integers_and_refuses_an_integer_dtype(tiny):
    from free_kernels.diffusion import create_diffusion
    from free_kernels.sampler import FreeSampler

    s = FreeSampler(tiny["model"], FeatureDrafter.for_target(tiny["model"], depth=1, init="identity"),
                    create_diffusion("4"), draft_length=2)
    got = list(s.sample_stream([(np.int64(5), np.int32(3))], batch_size=1))
    assert got[0].seed == 5 and got[0].label == 3
    with pytest.raises(TypeError, match="dtype"):
        next(s.sample_stream([(5, 3)], batch_size=1, dtype=torch.int64))


# ------------------------------------------------------------------ JSON nested too deeply
def test_deeply_nested_target_config_is_a_damaged_file(tmp_path):
    base = str(tmp_path / "t")
    save_tiny_target(base, SAMPLE_CFG)
    with open(base + ".json", "w") as f:
        f.write(DEEP)
    with pytest.raises(common.UsageError) as e:
        common.load_target_file(base + ".safetensors")
    assert base + ".json" in str(e.value) and "damaged" in str(e.value)


def test_deeply_nested_drafter_config_is_a_damaged_file(tmp_path, tiny):
    from safetensors.torch import save_file

    d = FeatureDrafter.for_target(tiny["model"], depth=1, init="identity")
    state = {k: v.contiguous() for k, v in d.state_dict().items()}
    inside = str(tmp_path / "inside.safetensors")  # the config in the weights file's metadata
    save_file(state, inside, metadata={"free_kernels.drafter_config": DEEP})
    beside = str(tmp_path / "beside.safetensors")  # no config inside: the .json beside it
    save_file(state, beside)
    with open(str(tmp_path / "beside.json"), "w") as f:
        f.write(DEEP)
    for path, named in ((inside, inside), (beside, str(tmp_path / "beside.json"))):
        with pytest.raises(common.UsageError) as e:
            common.load_drafter(path, tiny["model"])
        assert named in str(e.value) and "damaged" in str(e.value)


# ------------------------------------------------------------------ sizes checked against the weights first
def test_a_drafter_config_claiming_a_huge_depth_is_refused_before_building(tmp_path, tiny):
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "drafter.safetensors")
    FeatureDrafter.for_target(tiny["model"], depth=1, init="identity").save(path)
    cfg = FeatureDrafter.read_config(path)
    cfg["depth"] = 100_000_000
    save_file(load_file(path), path, metadata={"free_kernels.drafter_config": json.dumps(cfg)})
    t0 = time.monotonic()
    with pytest.raises(common.UsageError, match="depth"):
        common.load_drafter(path, tiny["model"])
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("key, value", [("depth", 100_000_000), ("hidden_size", 1_000_000)])
def test_a_target_config_claiming_huge_sizes_is_refused_before_building(tmp_path, key, value):
    base = str(tmp_path / "t")
    save_tiny_target(base, SAMPLE_CFG)
    with open(base + ".json", "w") as f:
        json.dump({"config": dict(SAMPLE_CFG, **{key: value})}, f)
    t0 = time.monotonic()
    with pytest.raises(common.UsageError, match=key):
        common.load_target_file(base + ".safetensors")
    assert time.monotonic() - t0 < 10


# ------------------------------------------------------------------ trainer
@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("input_checks_train") / "dit")
    save_tiny_target(base, TRAIN_CFG)
    return base


@pytest.mark.parametrize("opt, value, message", [
    ("--mlp-ratio", "1e6", "--mlp-ratio"),
    ("--threads", "1000", "--threads 1000"),
    ("--seed", "-1", "--seed"),
])
def test_trainer_sizes_and_threads_are_checked_before_loading(tmp_path, opt, value, message):
    with pytest.raises(SystemExit, match=message) as e:
        train.run(["--target", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o"), opt, value])
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "o")


def test_trainer_refuses_an_init_drafter_with_nan_weights(tmp_path, tiny_train):
    from free_kernels.models import DiT

    m = DiT(**TRAIN_CFG)
    d = FeatureDrafter.for_target(m, depth=1, init="identity")
    with torch.no_grad():
        d.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    init = str(tmp_path / "init.safetensors")
    d.save(init)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="--init") as e:
        train.run(train_argv(tiny_train, str(out), "--init", init))
    assert init in str(e.value) and "NaN" in str(e.value)
    assert not (out / "state.pt").exists()


# ------------------------------------------------------------------ sample_ddp
def test_sample_ddp_without_torchrun_is_one_line(tmp_path, tiny, monkeypatch, capsys):
    mod = sample_ddp_module()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit) as e:
        mod.main(ddp_argv(tiny["target"], str(tmp_path / "samples")))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun" in err[0]
    assert not os.path.exists(tmp_path / "samples")


def test_sample_ddp_refuses_a_negative_global_seed_before_writing(tmp_path, tiny, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        run_sample_ddp(monkeypatch, ddp_argv(tiny["target"], str(tmp_path / "samples"), "--global-seed=-1"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--global-seed" in err[0]
    assert not os.path.exists(tmp_path / "samples")


def _folder(samples):
    (folder,) = [os.path.join(samples, f) for f in os.listdir(samples) if os.path.isdir(os.path.join(samples, f))]
    return folder


def test_sample_ddp_damaged_run_statistics_do_not_fail_every_resume(tmp_path, tiny, monkeypatch, capsys):
    samples = str(tmp_path / "samples")
    argv = ddp_argv(tiny["target"], samples)
    run_sample_ddp(monkeypatch, argv)
    stats = os.path.join(_folder(samples), ".free_stats", "rank00000-run0000.json")
    with open(stats, "w") as f:
        f.write('{"target_calls": 1')
    capsys.readouterr()
    for _ in range(2):
        run_sample_ddp(monkeypatch, argv)
        err = capsys.readouterr().err
        assert "rank00000-run0000.json" in err and "damaged" in err and "Traceback" not in err
    assert os.path.isfile(_folder(samples) + ".npz")


def test_sample_ddp_does_not_pack_a_png_copied_over_another_sample(tmp_path, tiny, monkeypatch, capsys):
    samples = str(tmp_path / "samples")
    argv = ddp_argv(tiny["target"], samples)
    run_sample_ddp(monkeypatch, argv)
    folder = _folder(samples)
    npz = np.load(folder + ".npz")["arr_0"]
    assert not np.array_equal(npz[0], npz[1])
    shutil.copy(os.path.join(folder, "000001.png"), os.path.join(folder, "000000.png"))
    capsys.readouterr()
    run_sample_ddp(monkeypatch, argv)
    out = capsys.readouterr()
    assert "000000.png" in out.out + out.err
    assert np.array_equal(np.load(folder + ".npz")["arr_0"], npz)


def test_sample_ddp_deeply_nested_run_record_is_a_damaged_file(tmp_path, tiny, monkeypatch, capsys):
    samples = str(tmp_path / "samples")
    argv = ddp_argv(tiny["target"], samples)
    run_sample_ddp(monkeypatch, argv)
    with open(os.path.join(_folder(samples), ".free_run.json"), "w") as f:
        f.write(DEEP)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_sample_ddp(monkeypatch, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".free_run.json" in err[0] and "damaged" in err[0]

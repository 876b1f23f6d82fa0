"""Interrupting the command-line tools: one line, the conventional exit status, no partial output, no traceback.

free-sample and free-train-drafter run in a subprocess; the signal is sent once the tool has visibly
started (its first console line, or its first checkpoint).  A SIGINT (Ctrl-C) exits with 130, SIGTERM
with 143, SIGHUP with 129.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _reliability_utils import (  # noqa: F401  (one_thread: autouse fixture)
    one_thread,
    SAMPLE_CFG, TRAIN_CFG, save_tiny_target, tmp_files, train_argv,
)

from free_kernels.cli import train_drafter as train
from free_kernels.models import FeatureDrafter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(tmp_path):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               FREE_KERNELS_CACHE=str(tmp_path / "cache"), PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _interrupt(cmd, tmp_path, started, sig=signal.SIGINT, timeout=240):
    """Run ``cmd``, wait until ``started(stdout so far)`` holds, send ``sig``; returns (rc, stdout, stderr)."""
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env=_env(tmp_path))
        deadline = time.monotonic() + timeout
        while p.poll() is None and time.monotonic() < deadline and not started(out_path.read_text()):
            time.sleep(0.1)
        assert p.poll() is None, f"finished before the signal: {err_path.read_text()[-2000:]}"
        p.send_signal(sig)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    return p.returncode, out_path.read_text(), err_path.read_text()


@pytest.fixture(scope="module")
def tiny_sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("signals_sample")
    base = str(d / "tiny")
    m = save_tiny_target(base, SAMPLE_CFG)
    FeatureDrafter.for_target(m, depth=1, init="identity").save(str(d / "drafter"), extra=dict(cfg_scale=1.0))
    return dict(target=base + ".safetensors", drafter=str(d / "drafter.safetensors"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_free_sample_interrupted_prints_one_line_and_writes_nothing(tmp_path, tiny_sample, sig):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "free_kernels.cli.sample", "--target", tiny_sample["target"], "--drafter",
           tiny_sample["drafter"], "--steps", "1000", "--num-samples", "8", "--threads", "1", "--no-progress",
           "--out", str(out / "grid.png"), "--json", str(out / "run.json")]
    rc, stdout, stderr = _interrupt(cmd, tmp_path, lambda s: "free-sample: target" in s, sig)
    assert rc == 128 + int(sig), stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines() == ["free-sample: interrupted; nothing written"]
    assert not (out / "grid.png").exists() and not (out / "run.json").exists()
    assert not out.exists() or tmp_files(str(out)) == []


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    d = tmp_path_factory.mktemp("signals_train")
    base = str(d / "dit")
    save_tiny_target(base, TRAIN_CFG)
    return base


def test_free_train_drafter_interrupted_while_training_says_how_to_resume(tmp_path, tiny_train):
    run = tmp_path / "run"
    argv = [*train_argv(tiny_train, str(run)), "--train-steps", "100000", "--save-every", "1"]
    code = "import sys; from free_kernels.cli.train_drafter import main; sys.exit(main())"  # the console script
    rc, stdout, stderr = _interrupt([sys.executable, "-c", code, *argv], tmp_path,
                                    lambda s: (run / "state.pt").is_file())
    assert rc == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("free-train-drafter: interrupted; resume with: free-train-drafter "), lines
    assert "--train-steps 100000" in lines[0]
    assert tmp_files(str(run)) == []
    st = torch.load(run / "state.pt", weights_only=True)  # the last checkpoint is complete
    assert st["step"] >= 1


def test_free_train_drafter_interrupted_while_saving_its_cache(tmp_path, tiny_train, monkeypatch, capsys):
    """Ctrl-C inside torch.save: the zip writer turns the KeyboardInterrupt into its own RuntimeError."""
    real_save = torch.save

    def interrupted_save(obj, f, *a, **k):
        f.write(b"PK partial")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    cache = tmp_path / "traj.pt"
    monkeypatch.setattr(torch, "save", interrupted_save)
    rc = train.main(train_argv(tiny_train, str(tmp_path / "run"), "--cache", str(cache)))
    monkeypatch.setattr(torch, "save", real_save)
    err = capsys.readouterr().err
    assert rc == 130
    assert err.strip().splitlines() == ["free-train-drafter: interrupted; nothing written"], err
    assert not cache.exists() and tmp_files(str(tmp_path)) == []

"""Shared helpers of tests/test_reliability.py and tests/test_faults.py: tiny saved models, in-process runs."""
from __future__ import annotations

import importlib
import json
import os
import socket
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYDIR = os.path.join(ROOT, "python")

TRAIN_CFG = dict(input_size=4, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3,
                 learn_sigma=True, class_dropout_prob=0.1)
SAMPLE_CFG = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                  learn_sigma=True, class_dropout_prob=0.1)


class KillSignal(BaseException):
    """A simulated kill: not an Exception, so no ``except Exception`` cleanup runs (as with SIGKILL)."""


def save_tiny_target(base: str, cfg=None, seed: int = 0):
    """A random tiny DiT in this package's format: ``base.safetensors`` + ``base.json``; returns the module."""
    from safetensors.torch import save_file

    from free_kernels.models import DiT

    cfg = dict(cfg or SAMPLE_CFG)
    torch.manual_seed(seed)
    m = DiT(**cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # re-initialise: adaLN-Zero would output zeros
        for n, p in m.named_parameters():
            if n != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.05))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, base + ".safetensors")
    with open(base + ".json", "w") as f:
        json.dump({"config": cfg}, f)
    return m.eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_ddp_module():
    """python/sample_ddp.py imported in this process."""
    if PYDIR not in sys.path:
        sys.path.insert(0, PYDIR)
    return importlib.import_module("sample_ddp")


def run_sample_ddp(monkeypatch, argv):
    """sample_ddp.main in this process as a world of one gloo process."""
    mod = sample_ddp_module()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        monkeypatch.setenv(k, v)
    mod.main(list(argv))


def ddp_argv(target: str, sample_dir: str, *extra, n: int = 4, batch: int = 2, steps: int = 6):
    return ["--target", target, "--no-vae", "--num-fid-samples", str(n), "--per-proc-batch-size", str(batch),
            "--steps", str(steps), "--cfg-scale", "1.0", "--drafter", "frozen", "--draft-length", "3",
            "--sample-dir", sample_dir, *extra]


def train_argv(target: str, out: str, *extra):
    return ["--target", target + ".safetensors", "--out", out, "--steps", "8", "--num-trajectories", "8",
            "--eval-trajectories", "2", "--batch-size", "4", "--unroll", "2", "--eval-samples", "2",
            "--draft-length", "3", "--no-progress", "--lr", "3e-3", "--train-steps", "4", "--save-every", "2",
            "--threads", "1", *extra]


def tmp_files(root: str) -> list:
    out = []
    for d, _, files in os.walk(root):
        out += [os.path.join(d, f) for f in files if f.endswith(".tmp")]
    return out


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: intra-op threads only wait on each other (and on other work) on a 2-core machine.

    Autouse in every test module that imports it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""python/sample.py and python/sample_ddp.py on CPU: torchrun with 2 gloo processes, outputs, resume.

A tiny random DiT (8x8 pixels, 1 channel, 10 classes) is saved in this
package's target format (.safetensors + .json {"config": ...}), the format of
the demo model, and sampled pixel-space (--no-vae).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "python", "sample.py")
SAMPLE_DDP = os.path.join(ROOT, "python", "sample_ddp.py")
N = 8


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    env.pop("FREE_KERNELS_NVTX", None)
    return env


def _save_tiny_target(path, in_channels=1, seed=0):
    from safetensors.torch import save_file

    from free_kernels.models import DiT

    torch.manual_seed(seed)
    m = DiT(input_size=8, patch_size=4, in_channels=in_channels, hidden_size=32, depth=2, num_heads=2,
            num_classes=10, learn_sigma=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # re-initialise: adaLN-Zero would output zeros
        for name, p in m.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.05))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path)
    with open(path[: -len(".safetensors")] + ".json", "w") as f:
        json.dump({"config": m.config}, f)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample_ddp")
    return dict(dir=str(d), target=_save_tiny_target(str(d / "tiny.safetensors")),
                latent=_save_tiny_target(str(d / "tiny4.safetensors"), in_channels=4))


def _torchrun(work, *extra, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SAMPLE_DDP,
           "--target", work["target"], "--no-vae", "--num-fid-samples", str(N), "--per-proc-batch-size", "2",
           "--steps", "10", "--cfg-scale", "4.0", "--drafter", "frozen", "--draft-length", "3",
           "--sample-dir", os.path.join(work["dir"], "samples"), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=work["dir"], timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def first_run(work):
    r = _torchrun(work)
    root = os.path.join(work["dir"], "samples")
    (folder,) = [f for f in os.listdir(root) if os.path.isdir(os.path.join(root, f))]
    return dict(folder=os.path.join(root, folder), stdout=r.stdout)


def _snapshot(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".png"):
            p = os.path.join(folder, f)
            with open(p, "rb") as fh:
                out[f] = (os.stat(p).st_mtime_ns, fh.read())
    return out


def test_ddp_writes_pngs_npz_and_stats(first_run):
    folder = first_run["folder"]
    pngs = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
    assert pngs == [f"{i:06d}.png" for i in range(N)]
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]
    arr = np.load(folder + ".npz")["arr_0"]
    assert arr.shape == (N, 8, 8, 1) and arr.dtype == np.uint8
    from PIL import Image

    assert np.array_equal(arr[5, ..., 0], np.asarray(Image.open(os.path.join(folder, "000005.png"))))
    with open(folder + ".free_stats.json") as f:
        st = json.load(f)
    tot = st["total"]
    assert tot["ranks"] == 2 and len(st["per_rank"]) == 2
    assert tot["samples"] == N and tot["steps"] == N * 10 and tot["iterations"] == 4
    assert tot["steps_per_target_call"] >= 1.0 and 0.0 <= tot["acceptance_rate"] <= 1.0
    assert sum(r["this_run"]["pngs_written"] for r in st["per_rank"]) == N
    assert {r["rank"] for r in st["per_rank"]} == {0, 1}
    assert st["layout"]["world_size"] == 2 and st["layout"]["drafter"] == "frozen"


def test_ddp_resume_fills_only_missing_files(work, first_run):
    folder = first_run["folder"]
    before = _snapshot(folder)
    npz_before = np.load(folder + ".npz")["arr_0"]
    # interruption: npz and stats never written, three PNGs lost.  index = it * 4 + i * 2 + rank, so
    # 000001 is half of rank 1's iteration 0 (000003 stays) and 000004 + 000006 are all of rank 0's iteration 1
    lost = ["000001.png", "000004.png", "000006.png"]
    for f in lost:
        os.remove(os.path.join(folder, f))
    os.remove(folder + ".npz")
    os.remove(folder + ".free_stats.json")
    stale = os.path.join(folder, ".000002.png.99999.tmp")  # a write cut off mid-way
    with open(stale, "wb") as fh:
        fh.write(b"\x89PNG truncated")
    _torchrun(work)
    assert not os.path.exists(stale)
    after = _snapshot(folder)
    assert sorted(after) == sorted(before)
    for f in before:
        if f in lost:
            assert after[f][1] == before[f][1], f"{f}: a resumed run must rewrite the same sample"
        else:
            assert after[f][0] == before[f][0], f"{f} was rewritten"
    assert np.array_equal(np.load(folder + ".npz")["arr_0"], npz_before)
    with open(folder + ".free_stats.json") as f:
        st = json.load(f)
    run = st["total"]["this_run"]
    assert run == dict(iterations_sampled=2, iterations_skipped=2, pngs_written=3, pngs_replaced=0)
    assert st["total"]["samples"] == N  # totals still cover every iteration (per-iteration stats files)


def test_ddp_refuses_a_different_layout(work, first_run):
    r = _torchrun(work, "--per-proc-batch-size", "4", check=False)
    assert r.returncode != 0
    assert "holds samples of a different run (per_proc_batch_size: 2 -> 4)" in r.stdout + r.stderr


def test_sample_py_grid_and_stats(work):
    out = os.path.join(work["dir"], "grid.png")
    stats = os.path.join(work["dir"], "grid.json")
    r = subprocess.run([sys.executable, SAMPLE, "--target", work["target"], "--no-vae", "--steps", "6",
                        "--drafter", "frozen", "--draft-length", "2", "--class-labels", "1", "2", "3",
                        "--out", out, "--stats", stats], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from PIL import Image

    im = Image.open(out)
    assert im.mode == "L" and im.size == (3 * 8 + 4 * 2, 8 + 2 * 2)  # 3 images in one row, 2 px padding
    with open(stats) as f:
        st = json.load(f)
    assert st["steps_per_sample"] == [6, 6, 6] and st["draft_length"] == 2


@pytest.mark.parametrize("case", ["no-model", "latent-without-local-vae", "pixel-model-with-4-channels"])
def test_sample_py_clear_errors(work, case):
    args = {"no-model": ["--no-vae"],
            "latent-without-local-vae": ["--target", work["latent"], "--vae", "ema"],
            "pixel-model-with-4-channels": ["--target", work["latent"], "--no-vae"]}[case]
    env = _env()
    env["HF_HUB_OFFLINE"] = "1"
    r = subprocess.run([sys.executable, SAMPLE, "--steps", "2", *args], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2
    expected = {"no-model": "--ckpt PATH", "latent-without-local-vae": "--vae /path/to/a/local",
                "pixel-model-with-4-channels": "1 or 3 channels"}[case]
    assert expected in r.stderr, r.stderr[-2000:]


def test_sample_py_latent_model_with_local_vae(work):
    """Latent path: a local diffusers AutoencoderKL folder (--vae PATH) decodes, RGB grid out."""
    diffusers = pytest.importorskip("diffusers")
    vae_dir = os.path.join(work["dir"], "tiny_vae")
    if not os.path.isdir(vae_dir):
        torch.manual_seed(0)
        diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                                block_out_channels=(8, 8), norm_num_groups=4, sample_size=16).save_pretrained(vae_dir)
    out = os.path.join(work["dir"], "latent.png")
    r = subprocess.run([sys.executable, SAMPLE, "--target", work["latent"], "--vae", vae_dir, "--steps", "4",
                        "--drafter", "frozen", "--class-labels", "0", "5", "--out", out],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from PIL import Image

    im = Image.open(out)
    assert im.mode == "RGB" and im.size == (2 * 16 + 3 * 2, 16 + 2 * 2)  # this tiny VAE upsamples 8 -> 16

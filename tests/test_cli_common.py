"""free_kernels.cli.common: the one loader, argument checks, seeding and baseline call of every command-line tool.

Also the layout of the CLI wing: the console scripts point into ``free_kernels.cli``, the scripts in ``python/``
import no private module, and every tool refuses a bad draft length with the one check's message.
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from free_kernels import demo
from free_kernels.cli import common
from free_kernels.cli.common import UsageError
from free_kernels.diffusion import create_diffusion, per_sample_generators
from free_kernels.models import DiT, FeatureDrafter
from free_kernels.models import dit as dit_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            learn_sigma=True, class_dropout_prob=0.1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(seed=0, **over):
    torch.manual_seed(seed)
    m = DiT(**dict(TINY, **over))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # re-initialise: adaLN-Zero would output zeros
        for n, p in m.named_parameters():
            if n != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.05))
    return m.eval()


def _save_ours(base, m):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, base + ".safetensors")
    with open(base + ".json", "w") as f:
        json.dump({"config": m.config}, f)
    return base + ".safetensors"


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------ layout of the CLI wing
def test_console_scripts_point_into_the_cli_package():
    import importlib

    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts == {"free-sample": "free_kernels.cli.sample:main",
                       "free-train-drafter": "free_kernels.cli.train_drafter:main"}
    for target in scripts.values():
        mod, fn = target.split(":")
        assert callable(getattr(importlib.import_module(mod), fn))


def _free_kernels_names(path):
    """What a script takes from the package: every dotted name it imports from ``free_kernels`` (modules and
    imported attributes, from its import statements, nested ones included), and ``?.attr`` for every
    attribute it reads."""
    import ast

    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] == "free_kernels"]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "free_kernels":
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute):
            names.append(f"?.{node.attr}")  # an attribute used anywhere (e.g. ``dit.find_model``)
    return names


def test_python_scripts_import_no_private_module():
    import glob

    scripts = sorted(glob.glob(os.path.join(ROOT, "python", "*.py")))
    assert scripts
    for path in scripts:
        names = _free_kernels_names(path)
        assert any(n.startswith("free_kernels") for n in names), path  # each script is built on the package
        for name in names:
            if name.startswith("free_kernels"):
                assert not any(part.startswith("_") for part in name.split(".")), f"{path}: imports {name}"
            # the one loader is common's: no script loads checkpoints by itself
            assert name.split(".")[-1] not in ("load_state_dict_strict", "find_model"), f"{path}: uses {name}"


def _tool_exit(tool, argv, tmp_path, monkeypatch):
    """Run one command-line tool in this process on ``argv``: (exit status, stderr's last line)."""
    import contextlib
    import io

    def call():
        if tool == "free-sample":
            from free_kernels.cli import sample

            return sample.main(argv + ["--no-progress", "--out", str(tmp_path / "g.png")])
        if tool == "free-train-drafter":
            from free_kernels.cli import train_drafter

            return train_drafter.main(argv + ["--no-progress", "--out", str(tmp_path / "run")])
        monkeypatch.syspath_prepend(os.path.join(ROOT, "python"))
        import importlib

        if tool == "python/sample.py":
            return importlib.import_module("sample").main(argv + ["--no-vae", "--out", str(tmp_path / "g.png")])
        return importlib.import_module("sample_ddp").parse_args(argv + ["--no-vae",
                                                                       "--sample-dir", str(tmp_path / "s")])

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = call()
        except SystemExit as e:
            code = e.code
    lines = err.getvalue().strip().splitlines()
    return code, lines[-1] if lines else ""


@pytest.mark.parametrize("tool, allow_auto", [("free-sample", True), ("free-train-drafter", False),
                                              ("python/sample.py", False), ("python/sample_ddp.py", False)])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_every_tool_refuses_a_bad_draft_length_with_the_one_message(tool, allow_auto, value, tmp_path, monkeypatch):
    """Each tool exits with status 2 and the message of :func:`common.check_draft_length` before loading
    anything (the target named does not exist: reaching the loader would give another message)."""
    with pytest.raises(UsageError) as want:
        common.check_draft_length(int(value), allow_auto=allow_auto)
    code, line = _tool_exit(tool, ["--target", str(tmp_path / "missing.safetensors"), "--draft-length", value],
                            tmp_path, monkeypatch)
    assert code == 2
    assert line.endswith(str(want.value)), line
    assert os.listdir(tmp_path) == []  # nothing written


# ------------------------------------------------------------------ argument checks
@pytest.mark.parametrize("name, message", [
    ("quantum", "--device 'quantum': unknown device"),
    ("meta", "--device 'meta': unsupported device"),
    ("cuda:7" if not torch.cuda.is_available() else "cuda:99", "--device cuda"),
])
def test_resolve_device_names_the_option(name, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        common.resolve_device(name)


def test_resolve_device_defaults():
    assert common.resolve_device("cpu") == torch.device("cpu")
    assert common.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_simple_checks():
    assert common.check_positive(3, "--n") == 3
    for bad in (0, -1, True, 1.5):
        with pytest.raises(UsageError, match="--n must be >= 1"):
            common.check_positive(bad, "--n")
    with pytest.raises(UsageError, match="--threads must be >= 0, got -1"):
        common.check_nonnegative(-1, "--threads")
    assert common.check_finite(0.0, "--relax", minimum=0) == 0.0
    for bad in (-0.5, float("inf"), float("nan")):
        with pytest.raises(UsageError, match="--relax must be a finite number >= 0"):
            common.check_finite(bad, "--relax", minimum=0)
    with pytest.raises(UsageError, match="--lr must be a finite number > 0"):
        common.check_finite(0.0, "--lr", above=0)
    assert common.check_image_size(256) == 256
    with pytest.raises(UsageError, match="positive multiple of 8"):
        common.check_image_size(100)
    assert common.parse_labels(" 3, 1,4") == [3, 1, 4]
    for bad in ("", "3,,1", "3,x"):
        with pytest.raises(UsageError, match="comma-separated integers"):
            common.parse_labels(bad)
    with pytest.raises(UsageError, match=r"--class-labels \[10, -1\] are out of range: this target has 10"):
        common.check_labels([3, 10, -1], 10, "--class-labels")


def test_cfg_scale_rule_is_the_official_one():
    assert not common.uses_cfg(1.0) and common.uses_cfg(1.5) and common.uses_cfg(4)
    assert common.check_cfg_scale(1) == 1.0 and common.check_cfg_scale(4.0) == 4.0
    assert common.check_cfg_scale(common.MAX_CFG_SCALE) == common.MAX_CFG_SCALE
    for bad in (0.5, 0.0, -1.0, float("nan"), float("inf"), 1e30, common.MAX_CFG_SCALE * 1.01):
        with pytest.raises(UsageError, match=r"--cfg-scale must be a finite number in 1 \.\. 1000"):
            common.check_cfg_scale(bad)


def test_draft_length_goes_through_the_planner(monkeypatch):
    import free_kernels.planner as planner

    seen = []
    real = planner.check_draft_length
    monkeypatch.setattr(planner, "check_draft_length", lambda v, name="draft_length": seen.append(v) or real(v, name))
    assert common.check_draft_length("auto") == "auto" and common.check_draft_length("3") == 3
    assert common.check_draft_length(5, allow_auto=False) == 5
    assert seen == ["auto", 3, 5]
    for text, value in (("0", 0), ("x", "x")):  # the planner's own message, naming the option
        with pytest.raises(ValueError) as ref:
            real(value, "--draft-length")
        with pytest.raises(UsageError, match=re.escape(str(ref.value))):
            common.check_draft_length(text)
    for bad in ("auto", 0):
        with pytest.raises(UsageError, match="keeps a fixed draft length"):
            common.check_draft_length(bad, allow_auto=False)
    assert common.cap_draft_length(100, 8) == 8 and common.cap_draft_length(3, 8) == 3
    assert common.cap_draft_length("auto", 8) == "auto"


# ------------------------------------------------------------------ targets
def test_our_format_and_the_demo_default(tmp_path, monkeypatch):
    m = _tiny()
    path = _save_ours(str(tmp_path / "dit"), m)
    got, p = common.load_target(path)
    assert p == path and _same_weights(got, m) and not got.training
    monkeypatch.setattr(demo, "TARGET_FILE", path)
    for spec in (None, "", "demo"):
        assert common.load_target(spec)[1] == path and common.target_file(spec) == path
    os.remove(path[: -len(".safetensors")] + ".json")  # no config: the demo config's keys
    with pytest.raises(UsageError, match="does not match its config"):
        common.load_target(path)


def test_target_problems_are_one_line_naming_the_file(tmp_path, monkeypatch):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(UsageError, match=re.escape(f"--target {missing!r} not found")):
        common.load_target(missing)
    with pytest.raises(UsageError, match=re.escape(f"--ckpt {missing!r} not found")):
        common.load_target_file(missing, option="--ckpt")
    monkeypatch.setattr(demo, "TARGET_FILE", missing)
    with pytest.raises(UsageError, match="embedded demo assets are missing"):
        common.load_target(None)
    path = _save_ours(str(tmp_path / "dit"), _tiny())
    with open(path, "wb") as f:
        f.write(b"not a model " * 20)
    with pytest.raises(UsageError) as e:
        common.load_target(path)
    assert path in str(e.value) and "damaged" in str(e.value) and "\n" not in str(e.value)
    path = _save_ours(str(tmp_path / "dit"), _tiny())  # good weights, damaged config
    with open(str(tmp_path / "dit.json"), "w") as f:
        f.write("{broken")
    with pytest.raises(UsageError, match="config .* is damaged"):
        common.load_target(path)


@pytest.fixture
def tiny_config(monkeypatch):
    """Two official-style config names of tiny size (patch 4 and patch 2)."""
    for name, patch in (("DiT-T/4", 4), ("DiT-T/2", 2)):
        monkeypatch.setitem(dit_module.DiT_models, name,
                            lambda patch=patch, **kw: DiT(depth=2, hidden_size=32, patch_size=patch, num_heads=2,
                                                          **kw))
    return "DiT-T/4"


def test_official_checkpoints(tmp_path, tiny_config):
    m = _tiny(in_channels=4, learn_sigma=True)
    ckpt = str(tmp_path / "0001000.pt")
    torch.save({"model": {k: v * 0 for k, v in m.state_dict().items()}, "ema": m.state_dict()}, ckpt)
    got, p = common.load_target(ckpt, model=tiny_config, image_size=64, num_classes=10, in_channels=4)
    assert p == ckpt and _same_weights(got, m) and got.input_size == 8 and got.learn_sigma
    got = common.load_official_checkpoint(ckpt, model=tiny_config)  # geometry from the weights
    assert got.in_channels == 4 and got.num_classes == 10
    for kw, message in ((dict(image_size=128), "--image-size 128 does not fit"),
                        (dict(num_classes=1000), "--num-classes 1000 but"),
                        (dict(in_channels=3), "--in-channels 3 but"),
                        (dict(model="DiT-T/2"), "does not fit --model DiT-T/2"),
                        (dict(model="DiT-Q/9"), "--model must be one of"),
                        (dict(model=None), "not in our .safetensors \\+ .json format: pass --model")):
        with pytest.raises(UsageError, match=message):
            common.load_target(ckpt, **dict(dict(model=tiny_config), **kw))
    fixed = _tiny(in_channels=3, learn_sigma=False)
    torch.save(fixed.state_dict(), str(tmp_path / "fixed.pt"))
    got = common.load_official_checkpoint(str(tmp_path / "fixed.pt"), model=tiny_config)
    assert not got.learn_sigma and got.in_channels == 3 and _same_weights(got, fixed)
    torch.save({"weights": torch.ones(3)}, str(tmp_path / "foreign.pt"))
    with pytest.raises(UsageError, match="is not an official-layout DiT checkpoint"):
        common.load_official_checkpoint(str(tmp_path / "foreign.pt"), model=tiny_config)
    # official-layout .safetensors without a .json beside it: built as --model
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "off.safetensors"))
    got, _ = common.load_target(str(tmp_path / "off.safetensors"), model=tiny_config)
    assert _same_weights(got, m)


# ------------------------------------------------------------------ drafters
def test_drafters(tmp_path, monkeypatch):
    m = _tiny()
    d, name, extra = common.load_drafter("frozen", m)
    assert name == "frozen" and extra == {} and type(d).__name__ == "FrozenFeatureDrafter"
    assert common.load_drafter(None, m)[1] == "frozen"  # no demo target: frozen by default
    FeatureDrafter.for_target(m, depth=1, init="identity").save(str(tmp_path / "dr"), extra=dict(cfg_scale=1.5))
    for spec in (str(tmp_path / "dr"), str(tmp_path / "dr.safetensors")):
        d, name, extra = common.load_drafter(spec, m)
        assert name == str(tmp_path / "dr.safetensors") and extra["cfg_scale"] == 1.5 and not d.training
    monkeypatch.setattr(demo, "DRAFTER_FILE", str(tmp_path / "dr.safetensors"))
    assert common.load_drafter(None, m, demo_target=True)[1] == str(tmp_path / "dr.safetensors")
    missing = str(tmp_path / "absent.safetensors")
    monkeypatch.setattr(demo, "DRAFTER_FILE", missing)
    with pytest.raises(UsageError, match=re.escape(f"--drafter {missing!r} not found (the embedded demo drafter")):
        common.load_drafter(None, m, demo_target=True)
    with pytest.raises(UsageError, match=re.escape(f"--init {missing!r} not found")):
        common.load_drafter(missing, m, option="--init")
    other = _tiny(hidden_size=64)
    with pytest.raises(UsageError) as e:
        common.load_drafter(str(tmp_path / "dr"), other)
    assert "dr" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ seeding and the baseline
def test_free_sample_seeds_are_pinned():
    """free-sample's (seed, stream, index) derivation: a change here changes every free-sample output."""
    assert common.derive_seed(0, 0, 0) == 6375474604893067239
    assert common.derive_seed(7, 1, 2) == 3725288599296678794
    assert common.derive_seed(-1, 3, 5) == 2061162057424025814


def test_initial_noise_is_per_sample():
    a = common.initial_noise(7, 3, (1, 4, 4))
    assert torch.equal(a[1:], common.initial_noise(7, 2, (1, 4, 4), first=1))
    assert torch.equal(a[2], torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(
        common.derive_seed(7, common.NOISE_STREAM, 2))))
    assert torch.equal(common.noise_from_seeds([5, 6], (2, 3))[1],
                       torch.randn(2, 3, generator=torch.Generator().manual_seed(6)))


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_sample_baseline_is_the_official_call(cfg):
    m = _tiny()
    d = create_diffusion("4")
    noise = common.initial_noise(0, 3, (1, 8, 8))
    y = torch.tensor([1, 2, 3])

    def gens(base):
        return per_sample_generators([base + k for k in range(3)])

    got = common.sample_baseline(m, d, noise, y, cfg_scale=cfg, generator=gens(10))
    if cfg > 1:  # doubled batch, null labels, the same per-sample generators drawing for the unconditional rows
        g = gens(10)
        ref = d.p_sample_loop(m.forward_with_cfg, (6, 1, 8, 8), torch.cat([noise, noise]), clip_denoised=False,
                              model_kwargs=dict(y=torch.cat([y, torch.full_like(y, 10)]), cfg_scale=cfg,
                                                guidance_channels=3), generator=g + g)[:3]
        two = common.sample_baseline(m, d, noise, y, cfg_scale=cfg, generator=gens(10), uncond_generator=gens(20))
        ref2 = d.p_sample_loop(m.forward_with_cfg, (6, 1, 8, 8), torch.cat([noise, noise]), clip_denoised=False,
                               model_kwargs=dict(y=torch.cat([y, torch.full_like(y, 10)]), cfg_scale=cfg,
                                                 guidance_channels=3), generator=gens(10) + gens(20))[:3]
        assert torch.equal(two, ref2)
    else:
        ref = d.p_sample_loop(m.forward, noise.shape, noise, clip_denoised=False, model_kwargs=dict(y=y),
                              generator=gens(10))
    assert got.shape == noise.shape and torch.equal(got, ref)
    calls = []
    common.sample_baseline(m, d, noise, y, cfg_scale=cfg, generator=gens(10),
                           wrap=lambda f: (lambda *a, **k: calls.append(1) or f(*a, **k)))
    assert len(calls) == d.num_timesteps  # one (doubled) forward per step


def test_free_sample_baseline_streams():
    """free-sample's baseline: row k from stream (seed, 1, k), its unconditional row from (seed, 2, k)."""
    from free_kernels.cli import sample as cli

    m = _tiny()
    d = create_diffusion("4")
    noise = cli.initial_noise(3, 2, (1, 8, 8))
    y = torch.tensor([4, 5])
    out, _, calls = cli.run_baseline(m, d, noise, y, cfg_scale=1.5, guidance_channels=3, seed=3, progress=False,
                                     first=0)
    seeds = [common.derive_seed(3, s, k) for s in (1, 2) for k in range(2)]
    ref = d.p_sample_loop(m.forward_with_cfg, (4, 1, 8, 8), torch.cat([noise, noise]), clip_denoised=False,
                          model_kwargs=dict(y=torch.cat([y, torch.full_like(y, 10)]), cfg_scale=1.5,
                                            guidance_channels=3), generator=per_sample_generators(seeds))[:2]
    assert calls == 4 and torch.equal(out, ref)
    # the second sample alone (first=1) is the same sample
    one, _, _ = cli.run_baseline(m, d, noise[1:], y[1:], cfg_scale=1.5, guidance_channels=3, seed=3,
                                 progress=False, first=1)
    assert torch.allclose(one[0], out[1], atol=1e-5)  # equal up to the rounding of another batch size

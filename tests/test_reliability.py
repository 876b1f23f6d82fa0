"""Nothing a user made is lost or silently mixed (issue 15): one test per reported failure.

Exits and reports of the trainer, provenance of sample_ddp.py folders, output checks and
atomic writes of free-sample, full-identity checks of trainer resumes and caches, one-line
errors for damaged inputs, trainer option checks, stale temporary files, official training
checkpoints, official-layout modules, and safe loading of every user-provided pickle.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _reliability_utils import (  # noqa: F401  (one_thread: autouse fixture)
    one_thread,
    ROOT, SAMPLE_CFG, TRAIN_CFG, KillSignal, ddp_argv, run_sample_ddp, save_tiny_target, tmp_files, train_argv,
)

import free_kernels as fk
from free_kernels.cli import train_drafter as train
from free_kernels._checks import FileProblem, safe_torch_load
from free_kernels.cli import sample as cli
from free_kernels.models import FeatureDrafter


class _Payload:
    """A pickle that would create a file when unpickled (the code-execution attack, harmless here)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload_file(path, marker, **extra):
    torch.save(dict(extra, payload=_Payload(marker)), path)


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    return env


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_target")
    base = str(d / "dit")
    save_tiny_target(base, TRAIN_CFG)
    return base


@pytest.fixture(scope="module")
def tiny_sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample_target")
    base = str(d / "tiny")
    m = save_tiny_target(base, SAMPLE_CFG)
    FeatureDrafter.for_target(m, depth=1, init="identity").save(str(d / "drafter"),
                                                               extra=dict(cfg_scale=1.0, num_steps=6))
    return dict(dir=str(d), target=base + ".safetensors", target_json=base + ".json",
                drafter=str(d / "drafter.safetensors"), drafter_json=str(d / "drafter.json"))




# ------------------------------------------------------------------ 1. trainer exit status
def test_1_train_console_entry_exits_0_without_printing_the_report(tmp_path, tiny_train):
    code = ("import sys; from free_kernels.cli.train_drafter import main; sys.exit(main())")  # the console script
    r = subprocess.run([sys.executable, "-c", code, *train_argv(tiny_train, str(tmp_path / "run"))],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "heldout_mean_kl" not in r.stderr  # the report dict is not dumped to stderr
    assert "drafter written to" in r.stdout
    r = subprocess.run([sys.executable, "-c", code, "--save-every", "0"], capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "free-train-drafter: error: --save-every must be >= 1, got 0"]


# ------------------------------------------------------------------ 2. sample_ddp provenance
def test_2_sample_ddp_refuses_to_mix_another_target_with_the_same_file_name(tmp_path, monkeypatch, capsys):
    base = str(tmp_path / "model")
    save_tiny_target(base, SAMPLE_CFG, seed=0)
    samples = str(tmp_path / "samples")
    run_sample_ddp(monkeypatch, ddp_argv(base + ".safetensors", samples))
    (folder,) = [f for f in os.listdir(samples) if os.path.isdir(os.path.join(samples, f))]
    record = json.load(open(os.path.join(samples, folder, ".free_run.json")))
    assert len(record["target"]["sha256"]) == 64 and record["sampler"]["variance"] == "learned"
    assert record["sampler"]["drafter"] == {"name": "frozen"} and record["versions"]["torch"] == torch.__version__
    stats = json.load(open(os.path.join(samples, folder + ".free_stats.json")))
    assert stats["run"]["target"]["sha256"] == record["target"]["sha256"]
    before = {f: open(os.path.join(samples, folder, f), "rb").read()
              for f in os.listdir(os.path.join(samples, folder)) if f.endswith(".png")}
    # another model saved under the same file name, more samples asked: must be refused, nothing written
    save_tiny_target(base, SAMPLE_CFG, seed=5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_sample_ddp(monkeypatch, ddp_argv(base + ".safetensors", samples, n=8))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "holds samples of a different run" in err and "target.sha256" in err and "--sample-dir" in err
    after = {f for f in os.listdir(os.path.join(samples, folder)) if f.endswith(".png")}
    assert after == set(before)
    # a different sampler setting under the same folder name (the clip flag is not in the name)
    save_tiny_target(base, SAMPLE_CFG, seed=0)
    with pytest.raises(SystemExit):
        run_sample_ddp(monkeypatch, ddp_argv(base + ".safetensors", samples, "--clip-denoised"))
    assert "sampler.clip_denoised: False -> True" in capsys.readouterr().err
    # the original model again, even moved elsewhere: resumes (nothing to do)
    import shutil

    os.makedirs(tmp_path / "moved")
    for ext in (".safetensors", ".json"):
        shutil.copy(base + ext, str(tmp_path / "moved" / "model") + ext)
    run_sample_ddp(monkeypatch, ddp_argv(str(tmp_path / "moved" / "model.safetensors"), samples))
    assert json.load(open(os.path.join(samples, folder + ".free_stats.json")))["total"]["this_run"][
        "iterations_sampled"] == 0


def test_2_sample_ddp_refuses_an_old_run_record(tmp_path, monkeypatch, capsys, tiny_sample):
    samples = str(tmp_path / "samples")
    run_sample_ddp(monkeypatch, ddp_argv(tiny_sample["target"], samples))
    (folder,) = [f for f in os.listdir(samples) if os.path.isdir(os.path.join(samples, f))]
    with open(os.path.join(samples, folder, ".free_run.json"), "w") as f:  # the record of the previous version
        json.dump(dict(world_size=1, per_proc_batch_size=2, global_seed=0, num_sampling_steps=6), f)
    with pytest.raises(SystemExit):
        run_sample_ddp(monkeypatch, ddp_argv(tiny_sample["target"], samples))
    assert "cannot be verified" in capsys.readouterr().err


def test_2_sample_ddp_folder_without_record_and_record_without_samples(tmp_path, monkeypatch, capsys, tiny_sample):
    samples = str(tmp_path / "samples")
    run_sample_ddp(monkeypatch, ddp_argv(tiny_sample["target"], samples))
    (folder,) = [os.path.join(samples, f) for f in os.listdir(samples) if os.path.isdir(os.path.join(samples, f))]
    os.remove(os.path.join(folder, ".free_run.json"))  # PNGs of unknown origin: refused
    with pytest.raises(SystemExit):
        run_sample_ddp(monkeypatch, ddp_argv(tiny_sample["target"], samples))
    assert "holds samples but no run record" in capsys.readouterr().err
    # a first run that wrote its record and nothing else does not lock the folder to its settings
    import shutil

    shutil.rmtree(folder)
    os.makedirs(os.path.join(folder, ".free_stats"))
    with open(os.path.join(folder, ".free_run.json"), "w") as f:
        json.dump({"format": "free_kernels.sample_ddp.run/2", "world_size": 64}, f)
    run_sample_ddp(monkeypatch, ddp_argv(tiny_sample["target"], samples))
    assert json.load(open(os.path.join(folder, ".free_run.json")))["world_size"] == 1


# ------------------------------------------------------------------ 3. free-sample outputs
def _fs(tiny, tmp_path, *extra):
    return ["--target", tiny["target"], "--drafter", tiny["drafter"], "--steps", "6", "--num-samples", "2",
            "--threads", "1", "--no-progress", "--no-baseline", *extra]


@pytest.mark.parametrize("which", ["target_json", "drafter_json", "drafter", "target"])
def test_3_free_sample_refuses_to_overwrite_model_files(tmp_path, tiny_sample, capsys, monkeypatch, which):
    path = tiny_sample[which]
    before = open(path, "rb").read()
    opt = ["--json", path] if path.endswith(".json") else ["--out", path]
    monkeypatch.setattr(cli, "run_free", lambda *a, **k: pytest.fail("sampled before checking the outputs"))
    with pytest.raises(SystemExit) as e:
        cli.main(_fs(tiny_sample, tmp_path, *(["--out", str(tmp_path / "g.png")] if opt[0] == "--json" else []), *opt))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert path in err and ("refusing to overwrite" in err or "must end with" in err)
    assert open(path, "rb").read() == before


@pytest.mark.parametrize("opt,value,message", [
    ("--json", "x.png", "must end with .json"),
    ("--out", "result", "must end with .png"),
    ("--out", "/proc/free_sample_test/x.png", "cannot write in '/proc'"),
])
def test_3_free_sample_checks_output_paths_before_sampling(tmp_path, tiny_sample, capsys, monkeypatch, opt, value,
                                                           message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "run_free", lambda *a, **k: pytest.fail("sampled before checking the outputs"))
    with pytest.raises(SystemExit) as e:
        cli.main(_fs(tiny_sample, tmp_path, opt, value))
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_3_free_sample_read_only_directory_is_refused_before_sampling(tmp_path, tiny_sample, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = open

    def deny(path, *a, **k):  # a read-only mount (root ignores permission bits, so simulate the EROFS)
        if str(path).startswith(str(ro)) and a and "w" in a[0]:
            raise OSError(30, "Read-only file system")
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", deny)
    monkeypatch.setattr(cli, "run_free", lambda *a, **k: pytest.fail("sampled before checking the outputs"))
    with pytest.raises(SystemExit):
        cli.main(_fs(tiny_sample, tmp_path, "--out", str(ro / "g.png")))
    assert "Read-only file system" in capsys.readouterr().err


def test_3_free_sample_png_and_json_writes_are_atomic(tmp_path, tiny_sample, monkeypatch):
    out, js = tmp_path / "g.png", tmp_path / "r.json"
    out.write_bytes(b"old png")
    js.write_text("old json")
    real = os.replace

    def kill(src, dst):  # the first rename into the output folder (not the planner's cost cache)
        if os.path.dirname(os.path.abspath(dst)) == str(tmp_path):
            raise KillSignal(dst)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", kill)
    with pytest.raises(KillSignal):
        cli.main(_fs(tiny_sample, tmp_path, "--out", str(out), "--json", str(js)))
    assert out.read_bytes() == b"old png" and js.read_text() == "old json"  # old files intact, never half-written
    assert len(tmp_files(str(tmp_path))) == 1  # the killed write's temp file ...
    monkeypatch.setattr(os, "replace", real)
    cli.main(_fs(tiny_sample, tmp_path, "--out", str(out), "--json", str(js)))
    assert tmp_files(str(tmp_path)) == []  # ... is removed by the next run
    assert json.loads(js.read_text())["format"] == "free-sample/1" and out.read_bytes()[:4] == b"\x89PNG"


def test_3_sample_py_checks_outputs_before_loading(tmp_path, tiny_sample, capsys):
    from _reliability_utils import sample_ddp_module

    sample_ddp_module()  # puts python/ on sys.path
    import sample as sample_py

    for extra, message in ((["--out", "result"], "must end with .png"),
                           (["--stats", tiny_sample["target_json"]], "refusing to overwrite")):
        with pytest.raises(SystemExit) as e:
            sample_py.main(["--target", tiny_sample["target"], "--no-vae", "--steps", "2", *extra])
        assert e.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------ 4. trainer resume and cache identity
@pytest.mark.parametrize("change,expected", [
    (["--lr", "1e-3"], "lr 0.003 -> 0.001"),
    (["--steps", "9"], "steps '8' -> '9'"),
    (["--variance", "fixed"], "variance 'learned' -> 'fixed'"),
    (["--target", "OTHER"], "target"),
])
def test_4_trainer_resume_refuses_other_settings(tmp_path, tiny_train, change, expected):
    out = str(tmp_path / "run")
    train.run(train_argv(tiny_train, out, "--train-steps", "2", "--save-every", "1"))
    if change[0] == "--target":
        save_tiny_target(str(tmp_path / "other"), TRAIN_CFG, seed=3)
        change = ["--target", str(tmp_path / "other.safetensors")]
    before = open(os.path.join(out, "state.pt"), "rb").read()
    with pytest.raises(SystemExit, match="belongs to a run with other settings") as e:
        train.run(train_argv(tiny_train, out, "--train-steps", "3", *change))
    assert expected in str(e.value)
    assert open(os.path.join(out, "state.pt"), "rb").read() == before


def test_4_trainer_resume_may_extend_and_records_the_change(tmp_path, tiny_train):
    out = str(tmp_path / "run")
    train.run(train_argv(tiny_train, out, "--train-steps", "2", "--save-every", "1"))
    rep = train.run(train_argv(tiny_train, out, "--train-steps", "3", "--save-every", "1"))
    assert [h["train_steps"] for h in rep["settings_history"]] == [2, 3]
    assert rep["settings_history"][1]["step"] == 2


@pytest.mark.parametrize("change,expected", [
    (["--variance", "fixed"], "variance 'learned' -> 'fixed'"),
    (["--target", "OTHER"], "target"),
    (["--target", "WIDER"], "target"),
])
def test_4_cache_from_other_settings_is_refused(tmp_path, tiny_train, change, expected):
    cache = str(tmp_path / "traj.pt")
    train.run(train_argv(tiny_train, str(tmp_path / "a"), "--train-steps", "1", "--cache", cache))
    if change[1] in ("OTHER", "WIDER"):
        cfg = dict(TRAIN_CFG, hidden_size=48) if change[1] == "WIDER" else TRAIN_CFG
        save_tiny_target(str(tmp_path / "other"), cfg, seed=3)
        change = ["--target", str(tmp_path / "other.safetensors")]
    with pytest.raises(SystemExit, match="was made for other settings") as e:
        train.run(train_argv(tiny_train, str(tmp_path / "b"), "--train-steps", "1", "--cache", cache, *change))
    assert expected in str(e.value) and cache in str(e.value)


def test_4_drafter_weights_and_config_are_one_atomic_unit(tmp_path, monkeypatch):
    t = save_tiny_target(str(tmp_path / "t"), SAMPLE_CFG)
    d = FeatureDrafter.for_target(t, depth=1, init="random", generator=torch.Generator().manual_seed(0))
    d.save(str(tmp_path / "drafter"), extra=dict(train_steps=400))
    w400 = {k: v.clone() for k, v in d.state_dict().items()}
    with torch.no_grad():
        for p in d.parameters():
            p.add_(1.0)
    import free_kernels._checks as checks

    def kill(path, obj):  # killed after the weights were renamed, before the JSON
        raise KillSignal(path)

    monkeypatch.setattr(checks, "atomic_write_json", kill)
    with pytest.raises(KillSignal):
        d.save(str(tmp_path / "drafter"), extra=dict(train_steps=600))
    monkeypatch.undo()
    assert json.load(open(tmp_path / "drafter.json"))["extra"]["train_steps"] == 400  # the stale copy
    back = FeatureDrafter.load(str(tmp_path / "drafter"), target=t)
    assert back.extra["train_steps"] == 600  # config read from the weights file: always its own
    assert all(torch.equal(v, d.state_dict()[k]) for k, v in back.state_dict().items())
    assert not all(torch.equal(v, w400[k]) for k, v in back.state_dict().items())


# ------------------------------------------------------------------ 5. damaged inputs
def _damage(path, how):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"not a model " * 40}[how])


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
@pytest.mark.parametrize("which", ["target", "drafter"])
def test_5_free_sample_names_a_damaged_model_file(tmp_path, tiny_sample, capsys, how, which):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_sample["dir"], d)
    files = dict(target=str(d / "tiny.safetensors"), drafter=str(d / "drafter.safetensors"))
    _damage(files[which], how)
    with pytest.raises(SystemExit) as e:
        cli.main(["--target", files["target"], "--drafter", files["drafter"], "--steps", "6", "--num-samples", "2",
                  "--no-progress", "--out", str(tmp_path / "g.png")])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert files[which] in last and ("damaged" in last or "empty" in last), last


@pytest.mark.parametrize("what", ["state-truncated", "state-foreign", "cache-truncated", "cache-foreign"])
def test_5_trainer_names_a_damaged_state_or_cache(tmp_path, tiny_train, what):
    out, cache = str(tmp_path / "run"), str(tmp_path / "traj.pt")
    train.run(train_argv(tiny_train, out, "--train-steps", "1", "--cache", cache))
    path = os.path.join(out, "state.pt") if what.startswith("state") else cache
    if what.endswith("truncated"):
        _damage(path, "truncated")
    else:
        torch.save({"weights": torch.ones(3)}, path)
    with pytest.raises(SystemExit) as e:
        train.run(train_argv(tiny_train, out, "--train-steps", "2", "--cache", cache))
    assert path in str(e.value) and "\n" not in str(e.value)


def test_5_sample_ddp_damaged_run_record_and_pngs(tmp_path, monkeypatch, capsys, tiny_sample):
    samples = str(tmp_path / "samples")
    argv = ddp_argv(tiny_sample["target"], samples)
    run_sample_ddp(monkeypatch, argv)
    (folder,) = [os.path.join(samples, f) for f in os.listdir(samples) if os.path.isdir(os.path.join(samples, f))]
    good = {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder) if f.endswith(".png")}
    npz = np.load(folder + ".npz")["arr_0"]
    # PNGs damaged on disk: re-created by the resume, the .npz is the same as before
    _damage(os.path.join(folder, "000001.png"), "truncated")
    _damage(os.path.join(folder, "000002.png"), "garbage")
    run_sample_ddp(monkeypatch, argv)
    assert {f: open(os.path.join(folder, f), "rb").read() for f in good} == good
    assert np.array_equal(np.load(folder + ".npz")["arr_0"], npz)
    st = json.load(open(folder + ".free_stats.json"))
    assert st["total"]["this_run"]["pngs_replaced"] == 2
    # a damaged run record: one line naming it, nothing sampled
    with open(os.path.join(folder, ".free_run.json"), "w") as f:
        f.write('{"format": "free_kernels.sample')
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_sample_ddp(monkeypatch, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".free_run.json" in err[0] and "damaged" in err[0]


# ------------------------------------------------------------------ 6. trainer options
@pytest.mark.parametrize("opt,value,message", [
    ("--save-every", "0", "--save-every must be >= 1"),
    ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--eval-trajectories", "0", "--eval-trajectories must be >= 1"),
    ("--num-trajectories", "0", "--num-trajectories must be >= 1"),
    ("--lr", "nan", "--lr must be a finite number > 0"),
    ("--device", "cuda:7" if not torch.cuda.is_available() else "cuda:99", "--device cuda"),
    ("--device", "tpu", "--device 'tpu'"),
])
def test_6_trainer_options_are_checked_before_loading(tmp_path, opt, value, message):
    # the target does not exist: the option error must come first (before any loading or work)
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        train.run(["--target", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o"), opt, value])
    assert not os.path.exists(tmp_path / "o")


def test_6_unwritable_output_directories_are_named_before_loading(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="--out '/proc/free_kernels_test': cannot write there"):
        train.run(["--target", str(tmp_path / "missing.safetensors"), "--out", "/proc/free_kernels_test"])
    with pytest.raises(SystemExit):
        run_sample_ddp(monkeypatch, ddp_argv(str(tmp_path / "missing.safetensors"), "/proc/free_kernels_test"))
    assert "--sample-dir '/proc/free_kernels_test': cannot write there" in capsys.readouterr().err


def test_6_draft_length_is_capped_at_the_number_of_steps(tmp_path, tiny_train, tiny_sample, capsys):
    rep = train.run(train_argv(tiny_train, str(tmp_path / "run"), "--train-steps", "1", "--draft-length", "100000"))
    assert rep["draft_length"] == rep["num_steps"] == 8
    js = tmp_path / "r.json"
    cli.main(["--target", tiny_sample["target"], "--drafter", "frozen", "--steps", "5", "--num-samples", "2",
              "--draft-length", "100000", "--no-progress", "--no-baseline", "--out", str(tmp_path / "g.png"),
              "--json", str(js)])
    assert json.loads(js.read_text())["draft_length"] == 5


# ------------------------------------------------------------------ 7. stale temp files, stats after a kill
def test_7_stale_npz_temp_is_removed_and_stats_do_not_undercount(tmp_path, monkeypatch, tiny_sample):
    samples = str(tmp_path / "samples")
    argv = ddp_argv(tiny_sample["target"], samples)
    mod = __import__("sample_ddp")
    real = mod.atomic_json
    calls = []

    def kill_before_second_stats(path, obj):  # killed between iteration 1's PNGs and its stats file
        if "it000001" in path:
            raise KillSignal(path)
        calls.append(path)
        return real(path, obj)

    monkeypatch.setattr(mod, "atomic_json", kill_before_second_stats)
    with pytest.raises(KillSignal):
        run_sample_ddp(monkeypatch, argv)
    monkeypatch.setattr(mod, "atomic_json", real)
    (folder,) = [os.path.join(samples, f) for f in os.listdir(samples) if os.path.isdir(os.path.join(samples, f))]
    stale = os.path.join(samples, "." + os.path.basename(folder) + ".npz.12345.tmp")  # a killed .npz write
    with open(stale, "wb") as f:
        f.write(b"\0" * 1000)
    run_sample_ddp(monkeypatch, argv)
    assert not os.path.exists(stale) and tmp_files(samples) == []
    st = json.load(open(folder + ".free_stats.json"))
    assert st["total"]["samples"] == 4 and st["total"]["iterations"] == 2  # all iterations counted
    assert st["total"]["this_run"] == dict(iterations_sampled=1, iterations_skipped=1, pngs_written=0,
                                           pngs_replaced=0)


# ------------------------------------------------------------------ 8. create_diffusion(5)
def test_8_create_diffusion_int_and_bad_types():
    assert fk.create_diffusion(5).num_timesteps == 5
    assert np.array_equal(fk.create_diffusion(5).timestep_map, fk.create_diffusion("5").timestep_map)
    assert fk.create_diffusion(np.int64(7)).num_timesteps == 7
    for bad in (5.0, True, [5.0], {"n": 5}):
        with pytest.raises(TypeError, match="timestep_respacing"):
            fk.create_diffusion(bad)
    with pytest.raises(ValueError, match="diffusion_steps"):
        fk.create_diffusion("5", diffusion_steps=0)


# ------------------------------------------------------------------ 9. official checkpoints and modules
def test_9_find_model_reads_an_official_training_checkpoint(tmp_path):
    t = save_tiny_target(str(tmp_path / "t"), SAMPLE_CFG)
    sd = t.state_dict()
    opt = torch.optim.AdamW(t.parameters(), lr=1e-4)
    # what the official train.py writes: model, ema, opt and args (an argparse.Namespace)
    torch.save({"model": {k: v * 0 for k, v in sd.items()}, "ema": sd, "opt": opt.state_dict(),
                "args": argparse.Namespace(model="DiT-XL/2", image_size=256, global_seed=0)}, tmp_path / "0400000.pt")
    got = fk.find_model(str(tmp_path / "0400000.pt"))
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    # anything beyond exactly argparse.Namespace is still refused
    _payload_file(tmp_path / "evil.pt", str(tmp_path / "pwned"), ema=sd)
    with pytest.raises(ValueError, match="refused: loading it could run code"):
        fk.find_model(str(tmp_path / "evil.pt"))
    assert not os.path.exists(tmp_path / "pwned")


def test_9_feature_drafter_for_an_official_layout_module(tmp_path):
    from free_kernels.models.dit import DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder

    class Official(torch.nn.Module):  # the official DiT's attributes only (no forward_features, no hidden_size)
        def __init__(self):
            super().__init__()
            self.in_channels, self.out_channels, self.patch_size, self.num_heads = 1, 2, 4, 2
            self.learn_sigma = True
            self.x_embedder = PatchEmbed(8, 4, 1, 32)
            self.t_embedder = TimestepEmbedder(32)
            self.y_embedder = LabelEmbedder(10, 32, 0.1)
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 32), requires_grad=False)
            self.blocks = torch.nn.ModuleList([DiTBlock(32, 2) for _ in range(2)])
            self.final_layer = FinalLayer(32, 4, 2)

    m = Official().eval()
    d = FeatureDrafter.for_target(m, depth=1)
    frozen = fk.FrozenFeatureDrafter(m)
    assert d.signature["hidden_size"] == 32 and frozen.signature["num_classes"] == 10
    h = torch.randn(2, 4, 32)
    out = d(h, torch.randn(2, 1, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2]))
    assert out.shape == h.shape
    d.save(str(tmp_path / "dr"))
    assert FeatureDrafter.load(str(tmp_path / "dr"), target=m).signature == d.signature


# ------------------------------------------------------------------ 10. no code execution from user files
@pytest.mark.parametrize("what", ["cache", "state"])
def test_10_trainer_refuses_a_pickle_payload(tmp_path, tiny_train, what):
    out, cache = str(tmp_path / "run"), str(tmp_path / "traj.pt")
    os.makedirs(out)
    marker = str(tmp_path / "pwned")
    _payload_file(cache if what == "cache" else os.path.join(out, "state.pt"), marker)
    with pytest.raises(SystemExit, match="refused: loading it could run code"):
        train.run(train_argv(tiny_train, out, "--cache", cache))
    assert not os.path.exists(marker)


def test_10_demo_target_trainer_refuses_a_pickle_payload(tmp_path):
    from free_kernels.demo import train_target

    os.makedirs(tmp_path / "run")
    marker = str(tmp_path / "pwned")
    _payload_file(tmp_path / "run" / "state.pt", marker)
    with pytest.raises(FileProblem, match="refused: loading it could run code"):
        safe_torch_load(str(tmp_path / "run" / "state.pt"), "checkpoint")
    with pytest.raises(SystemExit, match="refused: loading it could run code"):
        train_target._load_state(str(tmp_path / "run" / "state.pt"), "cpu")
    assert not os.path.exists(marker)
    from free_kernels import distill

    src = open(train_target.__file__).read() + open(train.__file__).read() + open(distill.__file__).read()
    assert "weights_only=False" not in src

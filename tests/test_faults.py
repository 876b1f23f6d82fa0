"""Fault injection: a simulated kill at every write boundary of sample_ddp.py, the trainer and free-sample.

Every file these tools write goes through one atomic rename (``os.replace`` of a temp file
beside it).  For each tool, an uninterrupted reference run counts those renames (K write
boundaries).  Then, for every boundary n = 1..K and two kill points, a fresh run is killed:

* ``before``: at the n-th rename, before it happens (the temp file is complete, the final file
  is not there: also the state left by a kill in the middle of writing the temp file);
* ``after``: right after the n-th rename (the state between two writes).

The kill is :class:`KillSignal`, a ``BaseException``: no ``except Exception`` clean-up runs, as
with SIGKILL.  The same command is then run again, and the outcome is compared with the
reference run:

* resumed correctly: the rerun finishes, every output equals the reference (PNG bytes, the
  ``.npz``, drafter weights, states, reports and statistics without their timings), and no
  temporary file is left;
* data lost: a file under its final name was torn at the kill (unreadable), or a complete file
  that existed at the kill was changed or deleted by the rerun (sample_ddp PNGs), or the trainer
  restarted from an earlier step than its last checkpoint, or an output differs in the end.

``test_fault_table`` prints the table of the README's Reliability section from these counts
(``pytest -s tests/test_faults.py``); with ``FREE_KERNELS_FAULT_TABLE=PATH`` it also writes it
there as JSON.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _reliability_utils import (  # noqa: F401  (one_thread: autouse fixture)
    one_thread,
    SAMPLE_CFG, TRAIN_CFG, KillSignal, ddp_argv, run_sample_ddp, save_tiny_target, tmp_files, train_argv,
)

import free_kernels._checks as checks
from free_kernels.cli import train_drafter as train
from free_kernels.cli import sample as cli

RESULTS = {}
TIME_KEYS = ("wall_s", "latency_s", "speedup", "speedup_relax", "trajectory_time_s", "train_time_s", "this_run", "threads")


from free_kernels.planner import default_cache_dir  # noqa: E402


class _Renames:
    """Counts the tools' atomic renames (``os.replace`` of a ``*.tmp`` file); kills at the n-th one."""

    def __init__(self, kill_at=None, mode="before"):
        self.real = os.replace
        self.count, self.kill_at, self.mode = 0, kill_at, mode

    def __call__(self, src, dst, *a, **k):
        # the draft planner's cost-model cache is not the user's data (a lost write only means
        # calibrating again), and it is written only by the first run of a session
        if not str(src).endswith(".tmp") or os.path.abspath(str(dst)).startswith(default_cache_dir()):
            return self.real(src, dst, *a, **k)
        self.count += 1
        if self.count == self.kill_at and self.mode == "before":
            raise KillSignal(dst)
        out = self.real(src, dst, *a, **k)
        if self.count == self.kill_at:
            raise KillSignal(dst)
        return out


def _normal(obj, root):
    """JSON-like data without timings, with the run directory replaced by a placeholder."""
    if isinstance(obj, dict):
        return {k: _normal(v, root) for k, v in obj.items() if k not in TIME_KEYS and not k.startswith("time_")}
    if isinstance(obj, list):
        return [_normal(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(root, "<RUN>")
    return obj


def _readable(path) -> bool:
    """Is a file under its final name complete? (PNG decodes, JSON parses, tensors load.)"""
    try:
        if path.endswith(".png"):
            from PIL import Image

            with Image.open(path) as im:
                im.load()
        elif path.endswith(".json"):
            json.load(open(path))
        elif path.endswith(".npz"):
            np.load(path)["arr_0"]
        elif path.endswith(".safetensors"):
            from safetensors.torch import load_file

            load_file(path)
        elif path.endswith(".pt"):
            torch.load(path, weights_only=True)
        return True
    except Exception:
        return False


def _files(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".tmp"):
                p = os.path.join(d, f)
                out[os.path.relpath(p, root)] = p
    return out


def _campaign(tool, make_run, snapshot, monkeypatch, tmp_path, precious=lambda root: {}, check_resume=None):
    """Reference run, then a kill at every boundary (both kill points) and a rerun; fills RESULTS[tool]."""
    ref_root = str(tmp_path / "ref")
    counter = _Renames()
    with monkeypatch.context() as m:
        m.setattr(os, "replace", counter)
        make_run(ref_root)()
    boundaries = counter.count
    reference = snapshot(ref_root)
    tried = resumed = lost = 0
    failures = []
    for mode in ("before", "after"):
        for n in range(1, boundaries + 1):
            root = str(tmp_path / f"{mode}{n}")
            run = make_run(root)
            tried += 1
            with monkeypatch.context() as m:
                m.setattr(os, "replace", _Renames(n, mode))
                m.setattr(checks, "_pid", lambda: 4_000_000 + n)  # the killed run was another process
                with pytest.raises(KillSignal):
                    run()
            torn = [p for p in _files(root).values() if not _readable(p)]
            kept = precious(root)  # complete files at the kill that must survive the rerun unchanged
            info = check_resume(root) if check_resume else None
            try:
                run()
                ok_run = True
            except Exception as e:  # a rerun that fails is not a correct resume
                ok_run = False
                failures.append(f"{mode} {n}: rerun failed: {type(e).__name__}: {e}")
            got = snapshot(root) if ok_run else None
            same = ok_run and got == reference
            clean = not tmp_files(root)
            changed = [k for k, v in kept.items() if not os.path.exists(v[0]) or open(v[0], "rb").read() != v[1]]
            restart_loss = info(root) if info else False
            if same and clean:
                resumed += 1
            else:
                failures.append(f"{mode} {n}: same outputs {same}, temp files left {tmp_files(root)}")
            if torn or changed or restart_loss or not same:
                lost += 1
                failures.append(f"{mode} {n}: torn {torn}, changed {changed}, restarted early {restart_loss}")
    RESULTS[tool] = dict(boundaries=boundaries, tried=tried, resumed=resumed, lost=lost)
    assert not failures, "\n".join(failures)
    assert resumed == tried and lost == 0




# ------------------------------------------------------------------ sample_ddp.py
@pytest.fixture(scope="module")
def sample_target(tmp_path_factory):
    d = tmp_path_factory.mktemp("fault_models")
    save_tiny_target(str(d / "tiny"), SAMPLE_CFG)
    return str(d / "tiny.safetensors")


# Under continuous batching a sampling run's batch-level work (target calls, rounds, rows, acceptance
# by timestep) belongs to the run, not to a sample: a resumed run batches the remaining samples
# differently, and a killed run's share is not recorded (``runs_recorded`` counts the runs that
# were). What must survive a kill unchanged is every sample and its own statistics.
_BATCH_LEVEL = ("target_calls", "drafter_calls", "rounds", "target_rows", "drafter_rows", "residual_rejections",
                "residual_candidates", "residual_fallbacks", "residual_max_candidates", "accepted_by_index",
                "proposed_by_index", "acceptance_by_index", "runs_recorded", "this_run")


def _per_sample(stats):
    if isinstance(stats, dict):
        return {k: _per_sample(v) for k, v in stats.items() if k not in _BATCH_LEVEL}
    if isinstance(stats, list):
        return [_per_sample(v) for v in stats]
    return stats


def test_faults_sample_ddp(tmp_path, monkeypatch, sample_target, capsys):
    def make_run(root):
        return lambda: run_sample_ddp(monkeypatch, ddp_argv(sample_target, root))

    def folder(root):
        return [os.path.join(root, f) for f in os.listdir(root) if os.path.isdir(os.path.join(root, f))][0]

    def snapshot(root):
        f = folder(root)
        pngs = {p: open(os.path.join(f, p), "rb").read() for p in sorted(os.listdir(f)) if p.endswith(".png")}
        stats = _per_sample(json.load(open(f + ".free_stats.json")))
        return dict(pngs=pngs, npz=np.load(f + ".npz")["arr_0"].tobytes(), stats=_normal(stats, root),
                    record=json.load(open(os.path.join(f, ".free_run.json"))))

    def precious(root):
        if not os.path.isdir(root) or not os.listdir(root):
            return {}
        f = folder(root)
        return {p: (os.path.join(f, p), open(os.path.join(f, p), "rb").read())
                for p in os.listdir(f) if p.endswith(".png")}

    _campaign("sample_ddp.py", make_run, snapshot, monkeypatch, tmp_path, precious=precious)
    capsys.readouterr()


# ------------------------------------------------------------------ free-train-drafter
@pytest.fixture(scope="module")
def train_target(tmp_path_factory):
    d = tmp_path_factory.mktemp("fault_train")
    save_tiny_target(str(d / "dit"), TRAIN_CFG)
    return str(d / "dit")


def test_faults_trainer(tmp_path, monkeypatch, train_target, capsys):
    def make_run(root):
        return lambda: train.run(train_argv(train_target, os.path.join(root, "run"), "--cache",
                                            os.path.join(root, "traj.pt")))

    def snapshot(root):
        from safetensors.torch import load_file

        run = os.path.join(root, "run")
        st = torch.load(os.path.join(run, "state.pt"), weights_only=True)
        cache = torch.load(os.path.join(root, "traj.pt"), weights_only=True)
        return dict(
            drafter={k: v.tolist() for k, v in load_file(os.path.join(run, "drafter.safetensors")).items()},
            drafter_json=_normal(json.load(open(os.path.join(run, "drafter.json"))), root),
            report=_normal(json.load(open(os.path.join(run, "report.json"))), root),
            state=dict(step=st["step"], history=st["history"], drafter={k: v.tolist() for k, v in st["drafter"].items()},
                       gen=st["gen"].tolist()),
            cache={k: v.tolist() if torch.is_tensor(v) else _normal(v, root) for k, v in cache.items()})

    def check_resume(root):
        """Step of the checkpoint at the kill; after the rerun: did it restart from an earlier step?"""
        p = os.path.join(root, "run", "state.pt")
        saved = torch.load(p, weights_only=True)["step"] if os.path.exists(p) else 0
        capsys.readouterr()

        def restarted_early(_root):
            out = capsys.readouterr().out
            if saved == 0:
                return "resumed from" in out
            return f"at step {saved}" not in out

        return restarted_early

    _campaign("free-train-drafter", make_run, snapshot, monkeypatch, tmp_path, check_resume=check_resume)


# ------------------------------------------------------------------ free-sample
def test_faults_free_sample(tmp_path, monkeypatch, sample_target, capsys):
    def make_run(root):
        os.makedirs(root, exist_ok=True)
        # a fixed draft length: with "auto" the plan follows timings, so outputs are not bit-reproducible
        return lambda: cli.main(["--target", sample_target, "--drafter", "frozen", "--steps", "6", "--num-samples",
                                 "3", "--threads", "1", "--no-progress", "--out", os.path.join(root, "grid.png"),
                                 "--draft-length", "3", "--json", os.path.join(root, "run.json")])

    def snapshot(root):
        rec = json.load(open(os.path.join(root, "run.json")))
        rec.pop("command")
        from free_kernels.figures import read_tiles

        # the sheet's captions carry wall times: its pictures must match, and the acceptance plot byte for byte
        return dict(tiles=read_tiles(os.path.join(root, "grid.png")).tobytes(), json=_normal(rec, root),
                    plot=open(os.path.join(root, "grid_acceptance.png"), "rb").read())

    _campaign("free-sample", make_run, snapshot, monkeypatch, tmp_path)
    capsys.readouterr()


def test_fault_suite_detects_a_missing_cleanup(tmp_path, monkeypatch, sample_target, capsys):
    """Negative control: with free-sample's stale-temp clean-up switched off, the suite reports failures."""
    monkeypatch.setattr(checks, "remove_stale_tmp", lambda *a, **k: [])

    def make_run(root):
        os.makedirs(root, exist_ok=True)
        return lambda: cli.main(["--target", sample_target, "--drafter", "frozen", "--steps", "4", "--num-samples",
                                 "2", "--threads", "1", "--no-progress", "--draft-length", "2",
                                 "--out", os.path.join(root, "grid.png")])

    from free_kernels.figures import read_tiles

    with pytest.raises(AssertionError, match="temp files left"):
        _campaign("negative control", make_run, lambda root: read_tiles(os.path.join(root, "grid.png")).tobytes(),
                  monkeypatch, tmp_path)
    r = RESULTS.pop("negative control")
    # two renames (the sheet, the acceptance plot): each kill before one leaves a temp file behind
    assert r["tried"] == 4 and r["resumed"] == 2
    capsys.readouterr()


def test_fault_table(capsys):
    """The README table, from the counts measured above (run the whole file)."""
    if not {"sample_ddp.py", "free-train-drafter", "free-sample"} <= set(RESULTS):
        pytest.skip("run the whole file to get the table")
    rows = ["| tool | write boundaries | faults tried | resumed correctly | data lost |", "|---|---|---|---|---|"]
    tot = dict(boundaries=0, tried=0, resumed=0, lost=0)
    for tool, r in RESULTS.items():
        rows.append(f"| {tool} | {r['boundaries']} | {r['tried']} | {r['resumed']} | {r['lost']} |")
        for k in tot:
            tot[k] += r[k]
    rows.append(f"| **total** | {tot['boundaries']} | {tot['tried']} | {tot['resumed']} | {tot['lost']} |")
    table = "\n".join(rows)
    with capsys.disabled():
        print("\n" + table)
    if os.environ.get("FREE_KERNELS_FAULT_TABLE"):
        with open(os.environ["FREE_KERNELS_FAULT_TABLE"], "w") as f:
            json.dump(dict(RESULTS, total=tot), f, indent=2)
    assert tot["lost"] == 0 and tot["resumed"] == tot["tried"]

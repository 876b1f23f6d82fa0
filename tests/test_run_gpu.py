"""bench/run_gpu.py, the budgeted GPU instrument, checked on a CPU machine with ``--dry-run``.

The dry run drives the real orchestration with stand-in steps: one that succeeds, one that fails,
one that floods its output (including a 300 kB line without a newline), one that hangs with a
child process and ignores SIGTERM, one skipped up front, one that eats the rest of the budget,
one left without budget.  What must hold is what the GPU machine's limits demand: the budget,
a complete summary, at most 8 files within size limits, and a console whose tail ends with the
summary table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 7.0
SLACK = 2.5  # interpreter start-up, the SIGKILL grace, a loaded CI machine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    # a zombie is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run_gpu_dry")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "run_gpu.py"), "--out", str(out), "--dry-run",
                        "--budget", str(BUDGET), "--log-head", "65536", "--log-tail", "32768"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    wall = time.monotonic() - t0
    return dict(out=out, proc=p, wall=wall, summary=json.loads((out / "summary.json").read_text()))


def test_budget_is_respected(dry_run):
    assert dry_run["wall"] <= BUDGET + SLACK, f"dry run took {dry_run['wall']:.1f} s for a {BUDGET} s budget"


def test_every_step_has_a_status(dry_run):
    s = dry_run["summary"]
    assert s["final"] is True and s["dry_run"] is True
    status = {r["step"]: r["status"] for r in s["steps"]}
    assert status == {"preflight": "ok", "ok": "ok", "fails": "failed", "flood": "ok", "hang": "killed",
                      "priority": "skipped", "budget-hog": "killed", "late": "skipped"}, status
    for r in s["steps"]:
        assert isinstance(r["seconds"], (int, float)) and r["seconds"] >= 0
    by = {r["step"]: r for r in s["steps"]}
    assert by["ok"]["figures"] == {"answer": 42}
    assert by["fails"]["rc"] == 3
    assert "budget" in by["late"]["reason"]
    assert "gpu" in by["preflight"]["figures"]   # preflight does not fail without a GPU
    assert dry_run["proc"].returncode == 1       # some steps did not pass


def test_hung_step_and_its_child_are_killed(dry_run):
    log = (dry_run["out"] / "steps.log").read_text(errors="replace")
    pids = [int(line.split()[-1]) for line in log.splitlines() if line.startswith("hang: ")]
    assert len(pids) == 2, "the hang stand-in prints its own and its child's pid"
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a process of the hung step survived"
    assert "SIGKILL to process group" in log  # it ignored SIGTERM


def test_files_within_limits(dry_run):
    files = [p for p in dry_run["out"].rglob("*")]
    assert all(p.is_file() for p in files), "no sub-folders"
    assert 1 <= len(files) <= 8, [p.name for p in files]
    for p in files:
        assert p.stat().st_size <= 16 * 1024 * 1024
    log = (dry_run["out"] / "steps.log").read_text(errors="replace")
    assert "bytes of flood omitted" in log and "flood: done" in log  # head + tail kept, the middle cut
    assert (dry_run["out"] / "steps.log").stat().st_size < 400_000
    assert json.loads((dry_run["out"] / "bench.json").read_text()) == {"ok": {"rows": [1, 2, 3]}}


def test_console_is_compact_and_ends_with_the_summary_table(dry_run):
    con = dry_run["proc"].stdout
    assert len(con) < 12_000, f"console {len(con)} characters"
    assert max(len(line) for line in con.splitlines()) <= 200
    tail = con[-12_000:].rstrip().splitlines()
    i = max(k for k, line in enumerate(tail) if "run_gpu summary" in line)
    table = tail[i:]
    assert table[-1].startswith("total ") and "budget" in table[-1]
    for name in ("preflight", "fails", "flood", "hang", "budget-hog", "late"):
        assert any(line.startswith(name) for line in table), name


def test_step_selection_and_listing(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "run_gpu.py"), "--out", str(tmp_path), "--list"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    names = [line.split()[0] for line in p.stdout.splitlines()]
    for must in ("preflight", "build", "cuda-check", "tests:speculative_accept", "smoke:cuda", "smoke:triton",
                 "bench:verify_attention", "bench:speculative_accept", "priority", "bench:e2e",
                 "sanitize:memcheck", "sanitize:racecheck"):
        assert must in names, must
    assert names.index("sanitize:memcheck") > names.index("bench:e2e") > names.index("priority")


# ---------------------------------------------------------------- FREE_KERNELS_REQUIRE_GPU
@pytest.mark.gpu
def test_gpu_marker_probe():
    """Runs on a GPU; elsewhere skipped, and under FREE_KERNELS_REQUIRE_GPU=1 that skip fails."""
    assert torch.cuda.is_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check: on a GPU the probe simply runs")
def test_require_gpu_turns_gpu_skips_into_failures():
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
            "-k", "gpu_marker_probe"]
    env = {k: v for k, v in os.environ.items() if k != "FREE_KERNELS_REQUIRE_GPU"}
    p = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0 and "1 skipped" in p.stdout, p.stdout[-2000:]
    p = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**env, "FREE_KERNELS_REQUIRE_GPU": "1"})
    # a skip in setup (the marker) reports as an error, one in the call as a failure: either is not a pass
    assert p.returncode == 1 and ("1 failed" in p.stdout or "1 error" in p.stdout), p.stdout[-2000:]
    assert "FREE_KERNELS_REQUIRE_GPU=1" in p.stdout


# ---------------------------------------------------------------- signals: nothing orphaned
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_kills_the_running_step_group_and_writes_the_final_summary(tmp_path, sig):
    """The supervisor killed mid-step (a command time limit, Ctrl-C, a closed terminal): every process of the
    step's group is killed (the stand-in ignores SIGTERM: escalated to SIGKILL), the scratch folder is removed,
    summary.json is final with the interrupted step marked, and the exit status is 128 + the signal number."""
    import signal

    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "run_gpu.py"), "--out", str(out), "--dry-run",
                             "--budget", "120", "--hang-limit", "60", "--only", "hang"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TMPDIR": str(scratch)})
    pids = []
    deadline = time.monotonic() + 60
    while len(pids) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        log = out / "steps.log"
        if log.is_file():
            pids = [int(line.split()[-1]) for line in log.read_text(errors="replace").splitlines()
                    if line.startswith("hang: ")]
    assert len(pids) == 2, "the hang stand-in did not start"
    t0 = time.monotonic()
    proc.send_signal(getattr(signal, sig))
    console, _ = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 15
    signum = int(getattr(signal, sig))
    assert proc.returncode == 128 + signum, console[-2000:]
    assert "Traceback" not in console
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a process of the interrupted step survived its supervisor"
    assert list(scratch.iterdir()) == [], "the scratch folder was left behind"
    s = json.loads((out / "summary.json").read_text())
    assert s["final"] is True and s["interrupted"] == sig
    by = {r["step"]: r for r in s["steps"]}
    assert by["hang"]["status"] == "interrupted" and sig in by["hang"]["reason"]
    assert set(by) == {"preflight", "ok", "fails", "flood", "hang", "priority", "budget-hog", "late"}
    assert all(by[k]["status"] == "skipped" for k in ("budget-hog", "late"))
    assert f"interrupted by {sig}" in console
    assert console.rstrip().splitlines()[-1].startswith("total ")

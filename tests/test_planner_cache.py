"""The draft planner's cost cache can never hurt a run: every damaged or foreign cache is ignored with one
warning line naming the file, the costs are measured again and the run completes; concurrent writers lose
nothing; the environment switches take the usual yes/no words."""
from __future__ import annotations

import json
import multiprocessing
import os

import pytest
import torch

import free_kernels as fk
from free_kernels import _env
from free_kernels.models import FeatureDrafter
from free_kernels.planner import DraftPlanner, exact_key, prior_key
from free_kernels.planning import cache as cache_mod
from free_kernels.planning.cache import FILE_NAME, SCHEMA, CostCache, check_entry

from test_sampler import inputs, make_target

STEPS = "4"   # a short schedule: every test here calibrates at least once


@pytest.fixture(scope="module")
def tiny():
    t = make_target(True, seed=4)
    dr = FeatureDrafter.for_target(t, init="random", generator=torch.Generator().manual_seed(2))
    return t, dr


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: one thread candidate, so a calibration times the fewest rounds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _sampler(tiny, cache_dir, plan="adaptive"):
    t, dr = tiny
    return fk.FreeSampler(t, dr, fk.create_diffusion(STEPS, learn_sigma=True),
                          planner=DraftPlanner(2, cache_dir=str(cache_dir), progress=False, plan=plan))


def _run(s):
    noise, y = inputs(s.target, n=1)
    out, st = s.sample(noise, y, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all() and sum(st.steps_per_sample) == s.diffusion.num_timesteps
    return st


def _keys(s):
    pk = prior_key(s, 1, 1, torch.device("cpu"))
    return pk, exact_key(pk, s)


def _good_entry(pk):
    return dict(schema=SCHEMA, prior_key=pk, written=1.0, device="cpu", calibrated={"1": [0.01, 0.012, 0.014]},
                learned=None, parts_ms=None, calibration_s=0.5)


def _warnings(err: str, path: str):
    return [line for line in err.splitlines() if "warning" in line and path in line]


def _damage(case, path, pk, ek):
    """Write the damaged cache of ``case`` at ``path`` (the entry for this setting where it is one entry)."""
    def entry(**change):
        e = _good_entry(pk)
        e.update(change)
        return json.dumps(dict(schema=SCHEMA, entries={ek: e}))

    text = {
        "string-costs": entry(calibrated={"1": ["fast", "0.1", "0.2"]}),
        "negative-costs": entry(calibrated={"1": [-1.0, -1.0, -1.0]}),   # would plan "-1000 ms" rounds
        "nan-costs": entry(calibrated={"1": [float("nan"), 0.01, 0.01]}),
        "infinite-costs": entry(calibrated={"1": [0.01, float("inf"), 0.01]}),
        "zero-costs": entry(calibrated={"1": [0.0, 0.0, 0.0]}),
        "bool-costs": entry(calibrated={"1": [True, True, True]}),
        "nested-costs": entry(calibrated={"1": [[[[0.01]]], 0.01, 0.01]}),
        "bad-thread-key": entry(calibrated={"one": [0.01, 0.01, 0.01]}),
        "missing-fields": json.dumps(dict(schema=SCHEMA, entries={ek: {"schema": SCHEMA}})),
        "entry-is-a-string": json.dumps(dict(schema=SCHEMA, entries={ek: "0.01"})),
        "other-schema-entry": entry(schema=SCHEMA + 1),
        "deeply-nested-file": "[" * 200_000 + "]" * 200_000,
        "truncated-file": entry()[:-7],
        "not-json": "costs: fast\n",
        "foreign-file": json.dumps({ek: {"rounds_s": [0.01, 0.01, 0.01]}}),   # an older flat layout
        "binary-file": None,
    }[case]
    if text is None:
        with open(path, "wb") as f:
            f.write(b"\xff\xfe\x00garbage")
    else:
        with open(path, "w") as f:
            f.write(text)


DAMAGE = ["string-costs", "negative-costs", "nan-costs", "infinite-costs", "zero-costs", "bool-costs", "nested-costs",
          "bad-thread-key", "missing-fields", "entry-is-a-string", "other-schema-entry", "deeply-nested-file",
          "truncated-file", "not-json", "foreign-file", "binary-file"]


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_cache_is_ignored_with_one_warning_and_measured_again(tiny, tmp_path, capsys, case):
    s = _sampler(tiny, tmp_path)
    pk, ek = _keys(s)
    path = str(tmp_path / FILE_NAME)
    _damage(case, path, pk, ek)
    capsys.readouterr()
    st = _run(s)                                    # no exception: the run completes
    err = capsys.readouterr().err
    assert len(_warnings(err, path)) == 1, err      # one warning line, naming the file
    assert "Traceback" not in err
    assert st.plan["cost_source"].startswith("calibrated now")   # measured again
    assert st.plan["calibration_s"] > 0
    assert all(v > 0 for v in st.plan["costs_ms"].values())
    with open(path) as f:                           # ... and the file rewritten valid, with this setting's entry
        data = json.load(f)
    assert data["schema"] == SCHEMA and check_entry(data["entries"][ek]) is None
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    # the next planner reads it back without a warning and without calibrating
    st2 = _run(_sampler(tiny, tmp_path))
    assert "cached calibration" in st2.plan["cost_source"] and st2.plan["calibration_s"] == 0
    assert not _warnings(capsys.readouterr().err, path)


def test_a_directory_in_place_of_the_cache_file(tiny, tmp_path, capsys):
    path = tmp_path / FILE_NAME
    path.mkdir()
    (path / "keep.txt").write_text("mine")
    for _ in range(2):  # two runs: one warning in all, no temp file left, the directory untouched
        st = _run(_sampler(tiny, tmp_path))
        assert st.plan["cost_source"].startswith("calibrated now")
    err = capsys.readouterr().err
    assert len(_warnings(err, str(path))) == 1, err
    assert sorted(os.listdir(tmp_path)) == [FILE_NAME, FILE_NAME + ".lock"] or \
        sorted(os.listdir(tmp_path)) == [FILE_NAME]
    assert os.listdir(path) == ["keep.txt"]


def test_a_file_in_place_of_the_cache_folder(tiny, tmp_path, capsys):
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    st = _run(_sampler(tiny, blocker))
    assert st.plan["cost_source"].startswith("calibrated now")
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "warning" in line and str(blocker) in line]) == 1, err
    assert blocker.read_text() == "not a folder"


def _store_many(directory, worker, n):
    c = CostCache(directory)
    for i in range(n):
        e = _good_entry("p")
        assert c.store(f"w{worker}-{i}", {k: v for k, v in e.items() if k not in ("schema", "written")})


def test_concurrent_writers_lose_no_entry(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_store_many, args=(str(tmp_path), w, 12)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with open(tmp_path / FILE_NAME) as f:
        entries = json.load(f)["entries"]
    assert sorted(entries) == sorted(f"w{w}-{i}" for w in range(4) for i in range(12))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_cache_keeps_at_most_max_entries_newest_first(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "MAX_ENTRIES", 3)
    c = CostCache(str(tmp_path))
    for i in range(5):
        assert c.store(f"k{i}", dict(prior_key="p", device="cpu", calibrated={"1": [0.01]}))
    assert sorted(json.load(open(tmp_path / FILE_NAME))["entries"]) == ["k2", "k3", "k4"]


def test_an_invalid_entry_is_never_written(tmp_path, capsys):
    c = CostCache(str(tmp_path))
    assert not c.store("k", dict(prior_key="p", device="cpu", calibrated={"1": [float("nan")]}))
    assert not os.path.exists(tmp_path / FILE_NAME)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert "cannot be written" in capsys.readouterr().err


@pytest.mark.parametrize("word,value", [("1", True), ("true", True), ("TRUE", True), (" yes ", True), ("On", True),
                                        ("0", False), ("false", False), ("No", False), ("off", False), ("", False)])
def test_env_flag_words(monkeypatch, capsys, word, value):
    monkeypatch.setenv("FREE_KERNELS_TEST_FLAG", word)
    assert _env.env_flag("FREE_KERNELS_TEST_FLAG") is value
    assert capsys.readouterr().err == ""


def test_env_flag_other_words_warn_once(monkeypatch, capsys):
    monkeypatch.setenv("FREE_KERNELS_TEST_FLAG2", "maybe")
    assert _env.env_flag("FREE_KERNELS_TEST_FLAG2") is False
    assert _env.env_flag("FREE_KERNELS_TEST_FLAG2") is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FREE_KERNELS_TEST_FLAG2" in err[0] and "'maybe'" in err[0]


def test_recalibrate_takes_true(tiny, tmp_path, monkeypatch):
    _run(_sampler(tiny, tmp_path))                                  # calibrated and cached
    assert "cached calibration" in _run(_sampler(tiny, tmp_path)).plan["cost_source"]
    monkeypatch.setenv("FREE_KERNELS_RECALIBRATE", "true")
    assert _run(_sampler(tiny, tmp_path)).plan["cost_source"].startswith("calibrated now")
    monkeypatch.setenv("FREE_KERNELS_RECALIBRATE", "off")
    assert "cached calibration" in _run(_sampler(tiny, tmp_path)).plan["cost_source"]


@pytest.mark.parametrize("plan", ["adaptive", "frozen"])
def test_no_calibration_still_drafts_at_batch_1(tiny, tmp_path, monkeypatch, capsys, plan):
    """FREE_KERNELS_NO_CALIBRATION=1 without cached costs: the uncalibrated prior, which drafts at batch 1."""
    monkeypatch.setenv("FREE_KERNELS_NO_CALIBRATION", "1")
    t, dr = tiny
    s = fk.FreeSampler(t, dr, fk.create_diffusion("12", learn_sigma=True),
                       planner=DraftPlanner(4, cache_dir=str(tmp_path), plan=plan))
    noise, y = inputs(t, n=1)
    _, st = s.sample(noise, y, generator=torch.Generator().manual_seed(0))
    assert "calibrating" not in capsys.readouterr().err
    assert st.plan["cost_source"].startswith("uncalibrated prior") and st.plan["calibration_s"] == 0
    assert st.plan["drafting_can_pay"] and sum(st.rounds_by_draft_length[1:]) > 0
    assert DraftPlanner(calibrate=True).calibrate is False


def test_another_checkouts_costs_are_a_prior_only(tiny, tmp_path, monkeypatch):
    """An entry written by another checkout (or for other weights) shares the prior key only: an adaptive run
    starts from it without calibrating; a frozen plan calibrates this checkout's own."""
    real = cache_mod.checkout
    monkeypatch.setattr(cache_mod, "checkout", lambda: "/elsewhere/free_kernels")
    st = _run(_sampler(tiny, tmp_path))
    assert st.plan["cost_source"].startswith("calibrated now")
    monkeypatch.setattr(cache_mod, "checkout", real)
    st = _run(_sampler(tiny, tmp_path))
    assert st.plan["cost_source"].startswith("another checkout's or model's costs, a prior")
    assert st.plan["calibration_s"] == 0
    st = _run(_sampler(tiny, tmp_path, plan="frozen"))
    assert st.plan["cost_source"].startswith("calibrated now") and st.plan["mode"] == "frozen"
    # other weights of the same shape: another exact key, the same prior key
    t, dr = tiny
    other = make_target(True, seed=5)
    s = _sampler((other, FeatureDrafter.for_target(other, init="random", generator=torch.Generator().manual_seed(2))),
                 tmp_path)
    assert _keys(s)[0] == _keys(_sampler(tiny, tmp_path))[0] and _keys(s)[1] != _keys(_sampler(tiny, tmp_path))[1]

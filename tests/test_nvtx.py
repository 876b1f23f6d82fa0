"""NVTX ranges: off (and call-free) by default, harmless when on with a CPU-only torch."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from free_kernels import nvtx as fnvtx


class _Recorder:
    """Stands in for the ``nvtx`` package and records every call."""

    def __init__(self):
        self.calls = []
        rec = self

        class Domain:
            def get_event_attributes(self, message=None, color=None):
                rec.calls.append(("attrs", message))
                return message

            def push_range(self, attributes=None):
                rec.calls.append(("push", attributes))

            def pop_range(self):
                rec.calls.append(("pop", None))

        self.module = types.ModuleType("nvtx")
        self.module.get_domain = lambda name: rec.calls.append(("domain", name)) or Domain()


@pytest.fixture
def recorder(monkeypatch):
    """Route the nvtx backend to a recorder; restore the module state afterwards."""
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "nvtx", rec.module)
    monkeypatch.setattr(fnvtx, "_backend", None)
    monkeypatch.setattr(fnvtx, "_ranges", {})
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda *a: rec.calls.append(("torch", a)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda *a: rec.calls.append(("torch_pop", a)))
    was = fnvtx.is_enabled()
    yield rec
    fnvtx.set_enabled(was)
    fnvtx._local.open = False


def _run_free():
    from free_kernels import FreeSampler, FrozenFeatureDrafter, create_diffusion
    from test_sampler import make_target

    t = make_target()
    d = create_diffusion("6")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 4, 4, generator=g)
    y = torch.tensor([0, 1])
    return FreeSampler(t, FrozenFeatureDrafter(t), d, draft_length=2).sample(noise, y, cfg_scale=2.0, generator=g)


def test_off_by_default_in_a_fresh_process():
    code = ("import os; os.environ.pop('FREE_KERNELS_NVTX', None); import free_kernels.nvtx as n; "
            "assert not n.is_enabled(); assert n.nvtx_range('draft') is n.nvtx_range('verify'); "
            "assert n._backend is None; print('ok')")
    env = {k: v for k, v in __import__("os").environ.items() if k != "FREE_KERNELS_NVTX"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_off_makes_no_nvtx_calls(recorder, monkeypatch):
    monkeypatch.delenv(fnvtx.ENV_VAR, raising=False)
    fnvtx.set_enabled(None)  # re-read the (unset) environment
    assert not fnvtx.is_enabled()
    null = fnvtx.nvtx_range("draft")
    assert null is fnvtx.nvtx_range("accept")  # one shared null context, nothing allocated
    with fnvtx.nvtx_range("decode"):
        fnvtx.nvtx_phase("verify")
        fnvtx.nvtx_phase(None)
    _run_free()  # the sampler's phase markers
    assert recorder.calls == []
    assert fnvtx._backend is None  # the backend was never even resolved


def test_on_emits_ranges_in_the_free_kernels_domain(recorder, monkeypatch):
    monkeypatch.setenv(fnvtx.ENV_VAR, "1")
    assert fnvtx.set_enabled(None)
    with fnvtx.nvtx_range("decode"):
        with fnvtx.nvtx_range("verify"):
            pass
    assert ("domain", "free_kernels") in recorder.calls
    pushes = [c for c in recorder.calls if c[0] == "push"]
    pops = [c for c in recorder.calls if c[0] == "pop"]
    assert pushes == [("push", "decode"), ("push", "verify")] and len(pops) == 2
    recorder.calls.clear()
    fnvtx.nvtx_phase("draft")
    fnvtx.nvtx_phase("verify")
    fnvtx.nvtx_phase(None)
    assert [c[0] for c in recorder.calls if c[0] in ("push", "pop")] == ["push", "pop", "push", "pop"]
    recorder.calls.clear()
    _run_free()
    ranges = [c for c in recorder.calls if c[0] in ("push", "pop")]
    names = [c[1] for c in ranges if c[0] == "push"]
    # every phase of a FREE round is marked (the run drafts: L = 2 over 6 steps), and nothing else
    assert {"draft", "verify", "accept"} <= set(names), names
    assert set(names) <= {"draft", "verify", "accept", "resample"}, names
    # phases follow each other: each range is closed before the next opens, and the last one is closed
    assert [c[0] for c in ranges] == ["push", "pop"] * len(names), ranges
    # a draft is always verified next
    assert all(b == "verify" for a, b in zip(names, names[1:]) if a == "draft"), names
    assert not any(c[0].startswith("torch") for c in recorder.calls)


def test_on_with_real_backends_on_cpu_only_torch_does_not_raise(monkeypatch):
    monkeypatch.setattr(fnvtx, "_backend", None)
    monkeypatch.setattr(fnvtx, "_ranges", {})
    fnvtx.set_enabled(True)
    try:
        with fnvtx.nvtx_range("accept"):
            fnvtx.nvtx_phase("draft")
            fnvtx.nvtx_phase(None)
        _run_free()
        # without the nvtx package: torch.cuda.nvtx only when CUDA exists, else silent
        monkeypatch.setitem(sys.modules, "nvtx", None)  # makes `import nvtx` fail
        monkeypatch.setattr(fnvtx, "_backend", None)
        with fnvtx.nvtx_range("verify"):
            pass
        expected = "torch.cuda.nvtx" if torch.cuda.is_available() else "none"
        assert fnvtx.backend() == expected
    finally:
        fnvtx.set_enabled(None)  # back to what the environment says
        fnvtx._local.open = False

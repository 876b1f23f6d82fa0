"""Backend resolution: the per-op cache and what invalidates it, the measured priority table, update_priority.

Runs on the CPU: a "CUDA context" here is a dispatch context whose device is
``cuda`` (no tensor is made), with the device name stood in, and stand-in
backends that can all run it.
"""
import importlib.util
import json
import os

import pytest
import torch

from free_kernels.ops import _dispatch
from free_kernels.ops._dispatch import Backend, BackendUnavailable, Op

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "Fake GPU 80GB"


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A device name for cuda contexts and a private priority table path (cleared caches around the test)."""
    monkeypatch.setattr(_dispatch, "device_name", lambda device: DEVICE)
    path = tmp_path / "priority.json"
    monkeypatch.setenv(_dispatch.PRIORITY_FILE_ENV, str(path))
    _dispatch.clear_caches()
    yield path
    _dispatch.clear_caches()


def write_table(path, entries):
    path.write_text(json.dumps({"format": 1, "entries": entries}))
    _dispatch.clear_caches()


def stand_in_op(name="stand_in_op", probes=None):
    """An op whose three backends run everything (or what ``probes`` says), counting probe calls."""
    op = Op(name)
    op.calls = 0
    probes = probes or {}

    def probe(b):
        def supports(ctx):
            op.calls += 1
            return probes.get(b)

        return supports

    for b in ("cuda", "triton", "torch"):
        op.register(Backend(b, (lambda b=b: (lambda: b)), probe(b)))
    op.shape_class = lambda ctx: _dispatch.size_class(ctx["M"], 100)
    return op


def cuda_ctx(M=10, dtype=torch.float16):
    return dict(device=torch.device("cuda"), dtype=dtype, M=M)


# ------------------------------------------------------------------ cache
def test_resolution_is_cached_and_probed_once(fake_gpu):
    op = stand_in_op()
    assert op.resolve(cuda_ctx()).name == "cuda"
    n = op.calls
    for _ in range(5):
        assert op.resolve(cuda_ctx()).name == "cuda"
    assert op.calls == n  # repeated calls: one dict lookup, no probe
    assert op.resolve(cuda_ctx(M=500)).name == "cuda"
    assert op.calls > n  # another context is resolved once


def test_explicit_backend_and_changed_override_variables_bypass_the_cache(fake_gpu, monkeypatch):
    op = stand_in_op("stand_in_env")
    assert op.resolve(cuda_ctx()).name == "cuda"
    assert op.resolve(cuda_ctx(), "torch").name == "torch"
    monkeypatch.setenv("FREE_KERNELS_BACKEND", "triton")
    assert op.resolve(cuda_ctx()).name == "triton"
    monkeypatch.setenv("FREE_KERNELS_BACKEND_STAND_IN_ENV", "torch")  # the per-op variable wins
    assert op.resolve(cuda_ctx()).name == "torch"
    monkeypatch.delenv("FREE_KERNELS_BACKEND_STAND_IN_ENV")
    monkeypatch.delenv("FREE_KERNELS_BACKEND")
    assert op.resolve(cuda_ctx()).name == "cuda"


def test_a_request_that_cannot_run_raises_every_time(fake_gpu):
    op = stand_in_op("stand_in_raise", probes={"triton": "no triton here"})
    for _ in range(2):
        with pytest.raises(BackendUnavailable, match="no triton here"):
            op.resolve(cuda_ctx(), "triton")
    assert op.resolve(cuda_ctx()).name == "cuda"


def test_real_op_cache_follows_triton_interpret(monkeypatch):
    from free_kernels.ops import get_op

    op = get_op("gated_residual")
    ctx = dict(device=torch.device("cpu"), dtype=torch.float32, H=32, M=4, requires_grad=False, mixed=None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        op.resolve(ctx, "triton")
    assert op.resolve(ctx).name == "torch"


# ------------------------------------------------------------------ measured priority table
def test_dispatcher_honours_the_measured_table(fake_gpu):
    write_table(fake_gpu, [
        dict(op="stand_in_table", device=DEVICE, dtype="float16", shape_class="small", order=["triton", "cuda"]),
        dict(op="stand_in_table", device=DEVICE, dtype="float16", shape_class="large", order=["torch"]),
    ])
    op = stand_in_op("stand_in_table")
    assert op.resolve(cuda_ctx(M=10)).name == "triton"
    order, source = op.order_for(cuda_ctx(M=10))
    assert order == ("triton", "cuda", "torch") and source.startswith("measured")
    assert op.resolve(cuda_ctx(M=1000)).name == "torch"
    assert op.order_for(cuda_ctx(M=1000))[0] == ("torch", "cuda", "triton")  # unlisted: default order after
    # an explicit request still wins over the table
    assert op.resolve(cuda_ctx(M=10), "cuda").name == "cuda"
    # the first backend of the measured order that can run the call
    op2 = stand_in_op("stand_in_table", probes={"triton": "cannot"})
    assert op2.resolve(cuda_ctx(M=10)).name == "cuda"
    # no entry for this dtype: default order, and says so
    order, source = op.order_for(cuda_ctx(dtype=torch.bfloat16))
    assert order == _dispatch.BACKEND_ORDER and source.startswith("default")
    assert op.resolve(cuda_ctx(dtype=torch.bfloat16)).name == "cuda"
    # CPU tensors take torch whatever the table says
    assert op.resolve(dict(device=torch.device("cpu"), dtype=torch.float16, M=10)).name == "torch"


def test_unknown_device_falls_back_to_the_default_order(fake_gpu, monkeypatch):
    write_table(fake_gpu, [dict(op="stand_in_dev", device="Another GPU", dtype="float16", shape_class="small",
                                order=["torch", "triton", "cuda"])])
    op = stand_in_op("stand_in_dev")
    assert op.resolve(cuda_ctx()).name == "cuda"
    assert "no entry for stand_in_dev/Fake GPU 80GB/float16/small" in op.order_for(cuda_ctx())[1]

    def no_device(device):
        raise RuntimeError("no CUDA driver")

    monkeypatch.setattr(_dispatch, "device_name", no_device)
    _dispatch.clear_caches()
    order, source = op.order_for(cuda_ctx())
    assert order == _dispatch.BACKEND_ORDER and "device name unknown" in source


def test_switching_the_table_file_changes_the_order(fake_gpu, monkeypatch, tmp_path):
    op = stand_in_op("stand_in_switch")
    assert op.resolve(cuda_ctx()).name == "cuda"  # no file: default
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"entries": [dict(op="stand_in_switch", device=DEVICE, dtype="float16",
                                                  shape_class="small", order=["triton"])]}))
    monkeypatch.setenv(_dispatch.PRIORITY_FILE_ENV, str(other))  # part of the cache key
    assert op.resolve(cuda_ctx()).name == "triton"


def test_a_broken_table_warns_and_uses_the_default(fake_gpu):
    fake_gpu.write_text('{"entries": [{"op": "x", "device": "d", "dtype": "float16", "order": ["fast"]}]}')
    _dispatch.clear_caches()
    op = stand_in_op("stand_in_broken")
    with pytest.warns(UserWarning, match="ignoring backend priority table"):
        assert op.resolve(cuda_ctx()).name == "cuda"


def test_real_op_reads_the_table_and_info_says_where_the_order_came_from(fake_gpu):
    from free_kernels.info import _op_contexts
    from free_kernels.ops import get_op

    write_table(fake_gpu, [dict(op="verify_attention", device=DEVICE, dtype="float16", shape_class="small",
                                order=["torch", "triton", "cuda"])])
    op = get_op("verify_attention")
    ctx = dict(device=torch.device("cuda"), dtype=torch.float16, head_dim=72, B=2, N=256, requires_grad=False)
    assert op.resolve(ctx).name == "torch"
    assert op.order_for(ctx) == (("torch", "triton", "cuda"),
                                 "measured (priority.json: verify_attention/Fake GPU 80GB/float16/small)")
    text = "\n".join(_dispatch.describe({"verify_attention": _op_contexts("verify_attention")}))
    assert "cuda float16 -> torch   [order: measured (priority.json: verify_attention/Fake GPU 80GB/float16/small)]" \
        in text
    assert "[order: default order (no entry for verify_attention/Fake GPU 80GB/bfloat16/small" in text


def test_shipped_table_is_valid():
    path = _dispatch.DEFAULT_PRIORITY_FILE
    doc = json.load(open(path))
    assert doc["format"] == 1 and isinstance(doc["entries"], list)
    for e in doc["entries"]:
        assert set(e["order"]) <= set(_dispatch.BACKEND_ORDER)


# ------------------------------------------------------------------ bench/update_priority.py
def _update_priority():
    spec = importlib.util.spec_from_file_location("update_priority", os.path.join(ROOT, "bench", "update_priority.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_update_priority_builds_a_table_the_dispatcher_reads(fake_gpu, tmp_path, capsys):
    env = dict(device=DEVICE)
    va = dict(environment=env, rows=[
        dict(provider=p, B=B, N=256, heads=16, head_dim=72, dtype="bfloat16", ms=ms)
        for B, times in ((2, dict(triton=0.02, cuda=0.03, **{"sdpa-flash": 0.01})),
                         (56, dict(triton=0.50, cuda=0.40, **{"triton-pad128": 0.1})))
        for p, ms in times.items()] + [dict(provider="cuda", B=112, N=256, heads=16, head_dim=72, dtype="bfloat16",
                                            ms=None, note="n/a")])
    acc = dict(environment=env, rows=[
        dict(mode="eqvar", B=1, L=6, D=4096, provider="triton", us=20.0),
        dict(mode="eqvar", B=1, L=6, D=4096, provider="cuda", us=9.0),
        dict(mode="eqvar", B=1, L=6, D=4096, provider="torch", us=300.0),
        dict(mode="eqvar", B=1, L=6, D=4096, provider="torch.compile", us=1.0),
    ])
    dr = dict(environment=env, rows=[
        dict(B=1, tokens=256, dtype="bfloat16", provider="fused", kind="draft", ms=0.30),
        dict(B=1, tokens=256, dtype="bfloat16", provider="triton", kind="draft", ms=0.25),
        dict(B=1, tokens=256, dtype="bfloat16", provider="eager-ref", kind="draft", ms=0.90),
        dict(B=1, tokens=256, dtype="bfloat16", provider="target", kind="target", ms=9.0),
    ])
    files = []
    for name, doc in (("va.json", va), ("acc.json", acc), ("dr.json", dr)):
        (tmp_path / name).write_text(json.dumps(doc))
        files.append(str(tmp_path / name))
    out = tmp_path / "priority.json"  # the path the fixture points the dispatcher to
    assert _update_priority().main(["--out", str(out), *files]) == 0
    table = {(e["op"], e["dtype"], e["shape_class"]): e for e in json.load(open(out))["entries"]}
    assert table[("verify_attention", "bfloat16", "small")]["order"] == ["triton", "cuda"]
    assert table[("verify_attention", "bfloat16", "large")]["order"] == ["cuda", "triton"]
    assert table[("speculative_accept", "float32", "small")]["order"] == ["cuda", "triton", "torch"]
    for op in ("modulated_layernorm", "gated_residual", "bias_gelu", "draft_epilogue", "draft_transition"):
        assert table[(op, "bfloat16", "small")]["order"] == ["triton", "cuda", "torch"]
    assert all(e["device"] == DEVICE for e in table.values())

    _dispatch.clear_caches()
    from free_kernels.ops import get_op

    order, source = get_op("gated_residual").order_for(dict(device=torch.device("cuda"), dtype=torch.bfloat16, M=512))
    assert order == ("triton", "cuda", "torch") and source.startswith("measured")


# ---------------------------------------------------------------- every fused kernel op
FUSED_OPS = ("modulated_layernorm", "gated_residual", "bias_gelu", "draft_epilogue", "verify_attention",
             "speculative_accept")


@pytest.mark.parametrize("name", FUSED_OPS)
def test_cpu_tensors_default_to_torch_and_every_probe_answers(name):
    from cuda_emulation.harness import probe_ctx
    from free_kernels.ops import get_op

    op = get_op(name)
    assert op.resolve(probe_ctx("cpu", torch.float32)).name == "torch"
    for dev in ("cpu", "cuda"):
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            for b, why in op.reasons(probe_ctx(dev, dt)).items():
                assert why is None or not why.startswith("probe failed"), f"{name} {b} {dev}: {why}"


@pytest.mark.parametrize("name", ("modulated_layernorm", "gated_residual", "bias_gelu", "draft_epilogue"))
def test_grad_and_mixed_dtypes_fall_back_to_torch_on_cuda(name):
    from cuda_emulation.harness import probe_ctx
    from free_kernels.ops import get_op

    op = get_op(name)
    for extra in (dict(requires_grad=True), dict(mixed="mixed dtypes (y is torch.float32)")):
        ctx = probe_ctx("cuda", torch.float16, **extra)
        assert op.reasons(ctx)["triton"] is not None
        assert op.reasons(ctx)["cuda"] is not None
        assert op.resolve(ctx).name == "torch"


# ------------------------------------------------------------------ the FREE_KERNELS_BACKEND* variables
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

from free_kernels.ops._dispatch import BackendEnvironmentWarning  # noqa: E402


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Each test sees the once-only warnings again; no FREE_KERNELS_BACKEND* variable from outside."""
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    for k in [k for k in os.environ if k.startswith("FREE_KERNELS_BACKEND")]:
        monkeypatch.delenv(k)
    _dispatch.clear_caches()
    yield
    _dispatch.clear_caches()


def _backend_warnings(fn):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in got if issubclass(w.category, BackendEnvironmentWarning)]


@pytest.mark.parametrize("value", ["bogus", " cpu", "CPU", "Torch", "cuda "])
def test_a_global_value_that_is_not_a_backend_is_ignored_with_one_warning(fake_gpu, fresh_warnings, monkeypatch,
                                                                         value):
    op = stand_in_op("stand_in_global_bad")
    monkeypatch.setenv("FREE_KERNELS_BACKEND", value)
    name, got = _backend_warnings(lambda: op.resolve(cuda_ctx()).name)
    assert name == "cuda" and len(got) == 1 and repr(value) in got[0] and "FREE_KERNELS_BACKEND" in got[0]
    assert "\n" not in got[0]
    _, again = _backend_warnings(lambda: op.resolve(cuda_ctx(M=500)).name)
    assert again == []  # once


def test_a_global_backend_applies_only_where_the_op_has_it(fake_gpu, fresh_warnings, monkeypatch):
    with_cpu = stand_in_op("stand_in_with_cpu")
    with_cpu.register(Backend("cpu", lambda: (lambda: "cpu")))
    without = stand_in_op("stand_in_without_cpu")
    cpu_ctx = dict(device=torch.device("cpu"), dtype=torch.float32, M=10)
    monkeypatch.setattr(_dispatch, "machine_reason", lambda name: None)
    monkeypatch.setenv("FREE_KERNELS_BACKEND", "cpu")
    assert _backend_warnings(lambda: with_cpu.resolve(cpu_ctx).name) == ("cpu", [])
    name, got = _backend_warnings(lambda: without.resolve(cuda_ctx()).name)
    assert name == "cuda" and len(got) == 1 and "applies to the ops that have a cpu backend" in got[0]
    assert "own order" in got[0]


def test_a_global_backend_this_machine_cannot_run_is_ignored_with_one_warning(fake_gpu, fresh_warnings, monkeypatch):
    op = stand_in_op("stand_in_machine")
    monkeypatch.setattr(_dispatch, "machine_reason", lambda name: "no GPU here" if name == "cuda" else None)
    monkeypatch.setenv("FREE_KERNELS_BACKEND", "cuda")
    cpu_ctx = dict(device=torch.device("cpu"), dtype=torch.float32, M=10)
    name, got = _backend_warnings(lambda: op.resolve(cpu_ctx).name)
    assert name == "torch" and len(got) == 1 and "no GPU here" in got[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU machine check")
def test_global_cuda_on_a_cpu_machine_runs_every_op_on_its_own_order(fresh_warnings, monkeypatch):
    from free_kernels import ops

    monkeypatch.setenv("FREE_KERNELS_BACKEND", "cuda")
    x, g, y = torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 3, 8)
    out, got = _backend_warnings(lambda: ops.gated_residual(x, g, y))
    torch.testing.assert_close(out, x + g[:, None] * y)
    assert len(got) == 1 and "cannot run on this machine" in got[0]


@pytest.mark.parametrize("var, value, error, words", [
    ("FREE_KERNELS_BACKEND_STAND_IN_PER_OP", "bogus", ValueError, "is not a backend name"),
    ("FREE_KERNELS_BACKEND_STAND_IN_PER_OP", "CPU", ValueError, "is not a backend name"),
    ("FREE_KERNELS_BACKEND_STAND_IN_PER_OP", "cpu", ValueError, "has no cpu backend"),
    ("FREE_KERNELS_BACKEND_STAND_IN_PER_OP", "triton", BackendUnavailable, "no triton here"),
])
def test_a_per_op_variable_is_strict_and_named_in_one_line(fake_gpu, fresh_warnings, monkeypatch, var, value, error,
                                                           words):
    op = stand_in_op("stand_in_per_op", probes={"triton": "no triton here"})
    monkeypatch.setenv(var, value)
    monkeypatch.setenv("FREE_KERNELS_BACKEND", "torch")  # the per-op variable wins, even when it is wrong
    with pytest.raises(error) as e:
        op.resolve(cuda_ctx())
    assert var in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def test_environment_problems_name_each_variable(fresh_warnings, monkeypatch):
    from free_kernels.cli import common
    from free_kernels.ops import environment_problems

    monkeypatch.setenv("FREE_KERNELS_BACKEND", "bogus")
    monkeypatch.setenv("FREE_KERNELS_BACKEND_VERIFY_ATENTION", "torch")  # a typo
    monkeypatch.setenv("FREE_KERNELS_BACKEND_BIAS_GELU", "cpu")
    errors, warns = environment_problems()
    assert len(errors) == 2 and len(warns) == 1
    assert any("FREE_KERNELS_BACKEND_VERIFY_ATENTION names no op" in e for e in errors)
    assert any("FREE_KERNELS_BACKEND_BIAS_GELU=cpu: bias_gelu has no cpu backend" in e for e in errors)
    with pytest.raises(common.UsageError, match="FREE_KERNELS_BACKEND_"):
        _backend_warnings(common.check_backend_environment)
    monkeypatch.delenv("FREE_KERNELS_BACKEND_VERIFY_ATENTION")
    monkeypatch.delenv("FREE_KERNELS_BACKEND_BIAS_GELU")
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    _, got = _backend_warnings(common.check_backend_environment)  # the global value: a warning, not an error
    assert len(got) == 1 and "'bogus'" in got[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU machine check")
def test_free_sample_refuses_a_per_op_backend_this_machine_lacks_before_loading(tmp_path, fresh_warnings, monkeypatch,
                                                                                capsys):
    from free_kernels.cli import sample as cli

    monkeypatch.setenv("FREE_KERNELS_BACKEND_VERIFY_ATTENTION", "cuda")
    with pytest.raises(SystemExit) as e:
        cli.main(["--target", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "g.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "FREE_KERNELS_BACKEND_VERIFY_ATTENTION=cuda: cuda cannot run on this machine" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("env", [
    {"FREE_KERNELS_BACKEND": "bogus"}, {"FREE_KERNELS_BACKEND": " cpu"}, {"FREE_KERNELS_BACKEND": "CPU"},
    {"FREE_KERNELS_BACKEND": "cuda"}, {"FREE_KERNELS_BACKEND": "cpu"},
    {"FREE_KERNELS_BACKEND_DRAFT_EPILOGUE": "bogus"}, {"FREE_KERNELS_BACKEND_VERIFY_ATTENTION": "cuda"},
    {"FREE_KERNELS_BACKEND_NO_SUCH_OP": "torch"},
])
def test_info_never_crashes_on_the_environment_it_diagnoses(env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("FREE_KERNELS_BACKEND")}
    for extra in ([], ["--json"]):
        p = subprocess.run([sys.executable, "-m", "free_kernels.info", *extra], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env={**base, **env})
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
        ((var, value),) = env.items()
        if not extra and (var != "FREE_KERNELS_BACKEND" or value not in ("cpu",) or torch.cuda.is_available()):
            assert var in p.stdout


def _tiny_sampler():
    from free_kernels.diffusion import create_diffusion
    from free_kernels.models import DiT, FeatureDrafter
    from free_kernels.sampler import FreeSampler

    torch.manual_seed(0)
    target = DiT(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                 learn_sigma=True).eval()
    drafter = FeatureDrafter.for_target(target, depth=1, init="identity")
    return FreeSampler(target, drafter, create_diffusion("6"), draft_length=3)


def _sample(s):
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return s.sample(noise, torch.tensor([1, 2]), generator=torch.Generator().manual_seed(2))


def test_the_draft_epilogue_variable_governs_what_sampling_runs_and_what_info_reports(fresh_warnings, monkeypatch):
    from free_kernels import _env, info
    from free_kernels.ops import get_op

    if _env.host_entry_unavailable_reason("draft_epilogue_host") is not None:
        pytest.skip("the extension's host kernel is not built here")
    host = get_op("draft_epilogue").backends["cpu"]
    real = host.impl()
    calls = []
    monkeypatch.setattr(host, "_impl", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = _tiny_sampler()
    _sample(s)
    assert calls, "control: without an override the CPU draft step takes the host kernel"

    def cpu_rows():
        rows = info.collect()["ops"]
        return {name: next(r["backend"] for r in rows[name] if r["context"] == "cpu float32")
                for name in ("draft_epilogue", "draft_transition", "verify_transition")}

    assert cpu_rows() == {"draft_epilogue": "cpu", "draft_transition": "cpu", "verify_transition": "torch"}
    calls.clear()
    monkeypatch.setenv("FREE_KERNELS_BACKEND_DRAFT_EPILOGUE", "torch")
    _sample(s)
    assert calls == [], "FREE_KERNELS_BACKEND_DRAFT_EPILOGUE=torch, but the host kernel ran"
    assert cpu_rows() == {"draft_epilogue": "torch", "draft_transition": "torch", "verify_transition": "torch"}
    monkeypatch.setenv("FREE_KERNELS_BACKEND_DRAFT_EPILOGUE", "bogus")
    with pytest.raises(ValueError, match="FREE_KERNELS_BACKEND_DRAFT_EPILOGUE='bogus'"):
        _sample(s)
    monkeypatch.setenv("FREE_KERNELS_BACKEND_DRAFT_EPILOGUE", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="FREE_KERNELS_BACKEND_DRAFT_EPILOGUE=triton"):
        _sample(s)
    # the draft transition's own variable comes first
    monkeypatch.setenv("FREE_KERNELS_BACKEND_DRAFT_TRANSITION", "cpu")
    monkeypatch.setenv("FREE_KERNELS_BACKEND_DRAFT_EPILOGUE", "torch")
    calls.clear()
    _sample(s)
    assert calls

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

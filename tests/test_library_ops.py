"""The ops as torch.library operators: schemas + fakes (opcheck), torch.compile without graph breaks, the ABI enum.

Every public op is ``torch.ops.free_kernels.<op>`` (functional) and ``<op>_out``
(destination passing); the public Python functions are thin wrappers.  On CPU
the operators run their torch backend; with a GPU the same checks run the
default CUDA dispatch (cuda / triton kernels).
"""
import os
import re
import shutil

import pytest
import torch

from free_kernels import _env
from free_kernels import ops
from free_kernels.ops import _abi

FK = torch.ops.free_kernels
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# test_autograd_registration needs inputs that require grad; the ops are forward-only by design
# (the wrappers send gradient calls to the torch reference outside the op)
OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def rnd(shape, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def opcheck(op, args, kwargs=None):
    torch.library.opcheck(op, args, kwargs or {}, test_utils=OPCHECK_UTILS)


def kernel_dtype(device):
    return torch.float16 if device == "cuda" else torch.float32


def test_every_public_op_is_a_library_operator():
    names = {"verify_attention", "modulated_layernorm", "gated_residual", "bias_gelu", "speculative_accept",
             "draft_epilogue"}
    for n in names:
        for variant in (n, n + "_out"):
            op = getattr(FK, variant).default
            assert isinstance(op, torch._ops.OpOverload), variant
            assert str(op._schema).startswith(f"free_kernels::{variant}(")
    # destination-passing variants declare the buffers they write
    assert "Tensor(a!) out" in str(FK.verify_attention_out.default._schema)
    sa = str(FK.speculative_accept_out.default._schema)
    for name in ("rng_state", "out", "num_accepted", "log_ratio", "residual_candidates", "fallbacks"):
        assert re.search(rf"Tensor\([a-z]!\)\?? {name}", sa), name
    assert re.search(r"Tensor\(a!\)\? rng_state", str(FK.draft_epilogue.default._schema))


# ------------------------------------------------------------------ opcheck per op
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_verify_attention(device):
    dt = kernel_dtype(device)
    qkv = rnd((2, 5, 3 * 2 * 64), 0, device, dt)
    opcheck(FK.verify_attention.default, (qkv, 2))
    opcheck(FK.verify_attention_out.default, (qkv, 2, torch.empty(2, 5, 128, device=device, dtype=dt)))


def adaln_args(device):
    """x, y (2, 3, 32), shift / scale (2, 32), and xt: a non-contiguous x (the patch-embedded tokens)."""
    dt = kernel_dtype(device)
    x, y = rnd((2, 3, 32), 0, device, dt), rnd((2, 3, 32), 1, device, dt)
    shift, scale = rnd((2, 32), 2, device, dt), rnd((2, 32), 3, device, dt)
    xt = rnd((2, 32, 3), 4, device, dt).transpose(1, 2)
    return x, y, shift, scale, xt


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_modulated_layernorm(device):
    x, _, shift, scale, xt = adaln_args(device)
    opcheck(FK.modulated_layernorm.default, (x, shift, scale), dict(eps=1e-6))
    opcheck(FK.modulated_layernorm.default, (xt, shift, scale))
    opcheck(FK.modulated_layernorm_out.default, (x, shift, scale, torch.empty_like(x)))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_gated_residual(device):
    x, y, shift, _, xt = adaln_args(device)
    opcheck(FK.gated_residual.default, (x, shift, y))
    opcheck(FK.gated_residual.default, (xt, shift, y))
    opcheck(FK.gated_residual_out.default, (x, shift, y, torch.empty_like(x)))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_bias_gelu(device):
    x, _, _, _, xt = adaln_args(device)
    dt = kernel_dtype(device)
    b, w = rnd((32,), 5, device, dt), rnd((32, 16), 6, device, dt)
    opcheck(FK.bias_gelu.default, (x, b))
    opcheck(FK.bias_gelu.default, (xt, b))
    opcheck(FK.bias_gelu.default, (x[..., :16], b), dict(weight=w))
    opcheck(FK.bias_gelu_out.default, (x, b, torch.empty_like(x)))


def accept_args(device, B=3, L=2, D=16, K=4):
    g = torch.Generator().manual_seed(0)
    mp = torch.randn(B, L + 1, D, generator=g)
    lp = -1.0 + 0.2 * torch.randn(B, L + 1, D, generator=g)
    mq = mp[:, :L] + 0.3 * torch.randn(B, L, D, generator=g)
    lq = lp[:, :L] + 0.05 * torch.randn(B, L, D, generator=g)
    nq = torch.randn(B, L, D, generator=g)
    nd = torch.tensor([L, 1, 0][:B], dtype=torch.int64)
    det = torch.tensor([False, True, False][:B])
    rand = dict(uniforms=torch.rand(B, L, generator=g), bonus_noise=torch.randn(B, D, generator=g),
                residual_noise=torch.randn(B, K, D, generator=g), residual_uniforms=torch.rand(B, K, generator=g))
    move = lambda t: t.to(device)  # noqa: E731
    return [move(t) for t in (mp, lp, mq, lq, nq, nd, det)], {k: move(v) for k, v in rand.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("equal_variance", [True, False])
def test_opcheck_speculative_accept(device, equal_variance):
    args, rand = accept_args(device)
    B, L1, D = args[0].shape
    rs = torch.tensor([5, 0], dtype=torch.int64, device=device)
    kw = dict(rand, rng_state=rs)
    opcheck(FK.speculative_accept.default, (*args, equal_variance), kw)
    outs = dict(out=torch.empty(B, D, device=device), num_accepted=torch.empty(B, dtype=torch.int32, device=device),
                log_ratio=torch.empty(B, L1 - 1, device=device),
                residual_candidates=torch.empty(B, dtype=torch.int32, device=device),
                fallbacks=torch.empty(B, dtype=torch.bool, device=device))
    opcheck(FK.speculative_accept_out.default, (*args, equal_variance), dict(kw, **outs))


def epilogue_args(device, learn_sigma=True, R=2, cfg=True, S=8, p=2, H=32):
    from free_kernels.diffusion import create_diffusion
    from free_kernels.reference.draft_epilogue import schedule_tables

    G = 2 if cfg else 1
    N = (S // p) ** 2
    C_out = 8 if learn_sigma else 4
    dif = create_diffusion("10", learn_sigma=learn_sigma)
    tensors = (rnd((G * R, N, H), 1, device), rnd((G * R, H), 2, device), rnd((G * R, H), 3, device),
               0.1 * rnd((p * p * C_out, H), 4, device), rnd((p * p * C_out,), 5, device), rnd((R, 4, S, S), 6, device),
               schedule_tables(dif).to(device), torch.tensor([7, 3][:R], dtype=torch.int64, device=device))
    scalars = (p, 4.0 if cfg else 1.0, 3, learn_sigma, False, False, 1e-6)
    return tensors, scalars


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_opcheck_draft_epilogue(device, learn_sigma):
    tensors, scalars = epilogue_args(device, learn_sigma)
    x = tensors[5]
    noise = rnd(tuple(x.shape), 7, device)
    opcheck(FK.draft_epilogue.default, (*tensors, noise, *scalars, None))
    outs = dict(x_next=torch.empty_like(x), mean=torch.empty_like(x), logvar=torch.empty_like(x))
    opcheck(FK.draft_epilogue_out.default, (*tensors, noise, *scalars, None), outs)
    if _env.extension() is not None:  # rng_state path: the host Philox mirror on CPU
        rs = torch.tensor([11, 0], dtype=torch.int64, device=device)
        opcheck(FK.draft_epilogue_out.default, (*tensors, None, *scalars, rs),
                dict(outs, noise_out=torch.empty_like(x)))


# ------------------------------------------------------------------ eager fast path vs the operator
def test_wrappers_use_the_operator_under_fake_tensors_and_dispatch_modes(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from free_kernels.ops import _library

    x = rnd((2, 3, 32), 0)
    assert _library.eager(x)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        assert not _library.eager(fx)
        y = ops.gated_residual(fx, fx[:, 0], fx)  # the fake implementation answers
        assert y.shape == x.shape and type(y) is not torch.Tensor
    # eager calls skip the dispatcher round trip but run the same kernel
    calls = []
    monkeypatch.setattr(_library, "eager", lambda t: calls.append(1) or False)
    with torch.no_grad():
        assert torch.equal(ops.gated_residual(x, x[:, 0], x), x + x[:, 0, None] * x)
    assert calls


# ------------------------------------------------------------------ wrappers keep their behaviour
def test_wrappers_equal_the_references_on_cpu():
    from free_kernels.reference.bias_gelu import bias_gelu as r_bg
    from free_kernels.reference.gated_residual import gated_residual as r_gr
    from free_kernels.reference.modulated_layernorm import modulated_layernorm as r_ml
    from free_kernels.reference.verify_attention import verify_attention as r_va

    x, y = rnd((2, 3, 32), 0), rnd((2, 3, 32), 1)
    s, c, b = rnd((2, 32), 2), rnd((2, 32), 3), rnd((32,), 4)
    with torch.no_grad():
        assert torch.equal(ops.modulated_layernorm(x, s, c), r_ml(x, s, c))
        assert torch.equal(ops.gated_residual(x, s, y), r_gr(x, s, y))
        assert torch.equal(ops.bias_gelu(x, b), r_bg(x, b))
        qkv = rnd((2, 3, 96), 5)
        out = torch.full((2, 3, 32), float("nan"))
        assert ops.verify_attention(qkv, 2, out=out) is out
        assert torch.equal(out, r_va(qkv, 2))
        xc = x.clone()
        assert ops.gated_residual(xc, s, y, out=xc) is xc  # the residual stream updated in place
        assert torch.equal(xc, r_gr(x, s, y))
    # a call that needs a gradient runs the reference (differentiable), outside the forward-only op
    xg = x.clone().requires_grad_(True)
    ops.modulated_layernorm(xg, s, c).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_speculative_accept_buffers_and_results():
    from free_kernels.reference.speculative_accept import AcceptResult
    from free_kernels.reference.speculative_accept import speculative_accept as ref

    args, rand = accept_args("cpu")
    B, L1, D = args[0].shape
    want = ref(*args, equal_variance=False, **rand)
    got = ops.speculative_accept(*args, equal_variance=False, **rand)
    assert isinstance(got, AcceptResult)
    bufs = dict(num_accepted=torch.full((B,), -7, dtype=torch.int32), log_ratio=torch.full((B, L1 - 1), float("nan")),
                residual_candidates=torch.full((B,), -7, dtype=torch.int32), fallbacks=torch.ones(B, dtype=torch.bool))
    out = torch.full((B, D), float("nan"))
    got_out = ops.speculative_accept(*args, equal_variance=False, out=out, **rand, **bufs)
    assert got_out.out is out and got_out.num_accepted is bufs["num_accepted"]
    for r in (got, got_out):
        for f in ("out", "num_accepted", "log_ratio", "residual_candidates", "fallbacks"):
            assert torch.equal(getattr(r, f), getattr(want, f)), f
    with pytest.raises(TypeError, match="num_acepted"):  # the backend rejects an unknown keyword
        ops.speculative_accept(*args, equal_variance=False, num_acepted=bufs["num_accepted"])
    with pytest.raises(TypeError, match="num_accepted"):
        ops.speculative_accept(*args, equal_variance=False, num_accepted=torch.empty(B, dtype=torch.int64))


# ------------------------------------------------------------------ torch.compile, no graph break
def tiny_dit():
    from free_kernels import DiT

    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=5,
            learn_sigma=True).eval()
    with torch.no_grad():  # non-zero adaLN-Zero / head weights, so every op contributes to the output
        for name, p in m.named_parameters():
            if "adaLN" in name or "final_layer.linear" in name:
                p.normal_(0, 0.02)
    return m


def dit_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 7]), torch.tensor([1, 5])


def test_dit_forward_compiles_fullgraph_and_matches_eager():
    import torch._dynamo

    m = tiny_dit()
    x, t, y = dit_inputs()
    torch._dynamo.reset()
    with torch.no_grad():
        want = m(x, t, y)
        # inductor (its generated code asserts the fakes' strides) where a C++ compiler exists;
        # fullgraph=True raises on any graph break
        backend = "inductor" if (shutil.which("g++") or shutil.which("c++")) else "aot_eager"
        got = torch.compile(m, fullgraph=True, backend=backend)(x, t, y)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

        def features_then_head(x, t, y):
            h, c = m.forward_features(x, t, y)
            return m.forward_head(h, c)

        got2 = torch.compile(features_then_head, fullgraph=True, backend="aot_eager")(x, t, y)
        torch.testing.assert_close(got2, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_drafter_step_compiles_fullgraph_and_matches_eager():
    import torch._dynamo

    from free_kernels.diffusion import create_diffusion
    from free_kernels.models.drafter import FeatureDrafter

    m = tiny_dit()
    x, t, y = dit_inputs()
    d = FeatureDrafter.for_target(m, depth=1, init="random", generator=torch.Generator().manual_seed(0)).eval()
    dif = create_diffusion("10")
    idx = torch.tensor([5, 5])
    noise = rnd((2, 4, 8, 8), 9)
    outs = tuple(torch.empty(2, 4, 8, 8) for _ in range(3))

    def step(h, x, t, y, idx, noise):
        h_new = ops.drafter_forward(d, h, x, t, y)
        c = m.embed_condition(t, y)
        return ops.draft_transition(m, dif, h_new, c, x, idx, noise, cfg_scale=1.0, out=outs)

    torch._dynamo.reset()
    with torch.no_grad():
        h, _ = m.forward_features(x, t, y)
        explain = torch._dynamo.explain(step)(h, x, t, y, idx, noise)
        assert explain.graph_break_count == 0, explain.break_reasons
        want = [o.clone() for o in step(h, x, t, y, idx, noise)]
        for o in outs:
            o.fill_(float("nan"))
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(h, x, t, y, idx, noise)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert all(g is o for g, o in zip(got, outs))  # written in place

        # noise from the counter-based rng_state (advanced in place) instead of a noise tensor
        if _env.extension() is not None:  # the host Philox mirror draws it on CPU
            noise_out = torch.empty(2, 4, 8, 8)

            def step_rng(h, x, t, y, idx, rng_state):
                h_new = ops.drafter_forward(d, h, x, t, y)
                c = m.embed_condition(t, y)
                return ops.draft_transition(m, dif, h_new, c, x, idx, None, rng_state=rng_state, out=outs,
                                            noise_out=noise_out)

            rs_eager, rs_comp = torch.tensor([3, 0]), torch.tensor([3, 0])
            want = [o.clone() for o in step_rng(h, x, t, y, idx, rs_eager)]
            want_noise = noise_out.clone()
            torch._dynamo.reset()
            got = torch.compile(step_rng, fullgraph=True, backend="aot_eager")(h, x, t, y, idx, rs_comp)
            assert torch.equal(rs_comp, rs_eager) and int(rs_comp[1]) == x.numel()
            assert torch.equal(noise_out, want_noise)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_speculative_accept_compiles_with_static_buffers():
    import torch._dynamo

    args, rand = accept_args("cpu")
    B, L1, D = args[0].shape
    bufs = dict(out=torch.empty(B, D), num_accepted=torch.empty(B, dtype=torch.int32),
                log_ratio=torch.empty(B, L1 - 1), residual_candidates=torch.empty(B, dtype=torch.int32),
                fallbacks=torch.empty(B, dtype=torch.bool))

    def accept(*a):
        r = ops.speculative_accept(*a, equal_variance=False, **rand, **bufs)
        return r.out * 1.0, r.num_accepted.sum()

    want = [t.clone() for t in accept(*args)]
    torch._dynamo.reset()
    got = torch.compile(accept, fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    torch._dynamo.reset()


# ------------------------------------------------------------------ one dtype enum for the pybind ABI
def test_dtype_enum_agrees_with_the_cpp_header_and_the_extension():
    header = open(os.path.join(ROOT, "csrc", "include", "free_kernels", "dtype.h")).read()
    cpp = {m.group(1): int(m.group(2)) for m in re.finditer(r"k(Float32|Float16|BFloat16)\s*=\s*(\d+)", header)}
    py = {"Float32": _abi.DType.FLOAT32, "Float16": _abi.DType.FLOAT16, "BFloat16": _abi.DType.BFLOAT16}
    assert cpp == {k: int(v) for k, v in py.items()}
    assert {_abi.dtype_code(dt) for dt in (torch.float32, torch.float16, torch.bfloat16)} == {0, 1, 2}
    with pytest.raises(ValueError, match="float64"):
        _abi.dtype_code(torch.float64)
    ext = _env.extension()
    if ext is None or not hasattr(ext, "dtype_codes"):
        pytest.skip("extension not built (or built before dtype_codes existed): header checked only")
    assert ext.dtype_codes() == {"float32": 0, "float16": 1, "bfloat16": 2}
    assert {name: int(getattr(_abi.DType, name.upper())) for name in ext.dtype_codes()} == ext.dtype_codes()


def test_no_second_dtype_code_convention_in_the_ops():
    ops_dir = os.path.join(ROOT, "free_kernels", "ops")
    for f in os.listdir(ops_dir):
        if f.endswith(".py") and f != "_abi.py":
            src = open(os.path.join(ops_dir, f)).read()
            own = re.search(r"torch\.(float16|bfloat16)\s*:\s*[0-2]\s*[,}]", src)
            assert not own, f"{f} defines its own dtype codes"

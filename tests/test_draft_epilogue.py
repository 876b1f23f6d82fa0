"""draft_epilogue: drafted features -> next drafted state, the triton and cuda kernels against the composition.

``draft_epilogue``'s oracle is the composition it replaces
(reference/draft_transition.py: ``target.forward_head`` -> guidance ->
``diffusion.transition_from_output`` -> ``mean + exp(logvar / 2) * noise``) on a
float64 copy of the target; accuracy rule and dtype table: tests/_tolerance.py
(the outputs are float32; the rule's dtype is the features' dtype).

CPU: the Triton kernel runs under TRITON_INTERPRET=1 (conftest), the CUDA kernel
as "cuda-emu" (csrc/kernels/draft_epilogue.cu under the host emulation, with a
lane-exact software mma.sync: tests/cuda_emulation/harness.py), through
``ops.draft_transition`` / the op's own wrapper.  GPU tests (``gpu`` marker)
run the real ``cuda`` and ``triton`` backends in float16 / bfloat16 / float32 at
DiT-XL sizes, the unaligned paths, and both backends' noise stream.  The
shared-memory limits and the random stream's independence:
tests/cuda_emulation/test_draft_epilogue_limits.py.
"""
from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from _tolerance import assert_flash_rule
from cuda_emulation.harness import (CUDA, DEV, INTERPRET, assert_cuda_compiles_without_spills, assert_no_spills,
                                    emu_impl, gpu_backends, gpu_skip_unless, kernel_backends, rnd,
                                    triton_missing, triton_ptxas_usage)
from free_kernels import _env, ops
from free_kernels.diffusion import create_diffusion
from free_kernels.models.dit import DiT
from free_kernels.ops.draft_transition import head_parameters, schedule_tables_on
from free_kernels.reference.draft_epilogue import schedule_tables
from free_kernels.reference.draft_transition import draft_transition as ref_composition

OP = "draft_epilogue"


# ============================================================ dispatch
def make_target(learn_sigma=True, S=8, p=2, H=32, seed=0, dtype=torch.float32, device=DEV):
    """A tiny DiT whose head output is far from zero (adaLN-Zero init would output zeros)."""
    torch.manual_seed(seed)
    m = DiT(input_size=S, patch_size=p, in_channels=4, hidden_size=H, depth=1, num_heads=2, num_classes=5,
            learn_sigma=learn_sigma)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if name == "pos_embed":
                continue
            std = 0.3 / max(prm.shape[-1], 1) ** 0.5 if prm.dim() > 1 else 0.05
            prm.copy_(torch.randn(prm.shape, generator=g) * std)
        m.final_layer.linear.weight.mul_(3.0)
    return m.eval().to(device=device, dtype=dtype)


def epilogue_case(R=3, cfg=True, S=8, p=2, H=32, seed=0, dtype=torch.float32, steps="10", device=DEV):
    G = 2 if cfg else 1
    N = (S // p) ** 2
    h = rnd((G * R, N, H), dtype, seed + 10, device=device)
    c = rnd((G * R, H), dtype, seed + 11, device=device)
    x = rnd((R, 4, S, S), torch.float32, seed + 12, device=device)
    noise = rnd((R, 4, S, S), torch.float32, seed + 13, device=device)
    n = int(steps)
    idx = torch.tensor([(n - 1 - 3 * i) % n for i in range(R)], dtype=torch.int64, device=device)
    idx[-1] = max(1, int(idx[-1]))
    return h, c, x, noise, idx


def composition_oracle(target, diffusion, h, c, x, idx, noise, **kw):
    """The composition in float64 (tables stay the fp32 constants: exactly what every backend uses)."""
    import copy

    tgt = copy.deepcopy(target).to(device="cpu", dtype=torch.float64)
    with torch.no_grad():
        return ref_composition(tgt, diffusion, h.double().cpu(), c.double().cpu(), x.double().cpu(), idx.cpu(),
                               noise.double().cpu(), **kw)


def run_transition(backend, target, diffusion, h, c, x, idx, noise, monkeypatch, **kw):
    """ops.draft_transition on ``backend``; cuda-emu: the tensor-level cuda closure on the gathered tensors."""
    if backend != "cuda-emu":
        with torch.no_grad():
            return ops.draft_transition(target, diffusion, h, c, x, idx, noise, backend=backend, **kw)
    fn = emu_impl("draft_epilogue", monkeypatch)
    from free_kernels.diffusion.gaussian_diffusion import ModelMeanType

    with torch.no_grad():
        shift, scale, w, b, eps = head_parameters(target, c)
        kw = dict(kw)
        rng_state = kw.pop("rng_state", None)
        out = kw.pop("out", None)
        noise_out = kw.pop("noise_out", None)
        return fn(h, shift, scale, w, b, x, schedule_tables_on(diffusion, x.device), idx, noise,
                  patch_size=target.patch_size, cfg_scale=kw.get("cfg_scale", 1.0),
                  guidance_channels=kw.get("guidance_channels", 3), learned_variance=diffusion.learned_variance,
                  predict_xstart=diffusion.model_mean_type == ModelMeanType.START_X,
                  clip_denoised=kw.get("clip_denoised", False), eps=eps, rng_state=rng_state, out=out,
                  noise_out=noise_out)


def host_kernel_missing():
    return _env.host_entry_unavailable_reason("draft_epilogue_host")


needs_host_kernel = pytest.mark.skipif(host_kernel_missing() is not None,
                                       reason=f"cpu backend: {host_kernel_missing()}")


def fp32_backends():
    """kernel_backends() plus the host kernel (``cpu``: CPU tensors, so only where the tests' device is the CPU;
    on a GPU machine test_cpu_backend_matches_the_composition covers it)."""
    out = list(kernel_backends())
    if DEV.type == "cpu":
        out.append(pytest.param("cpu", id="cpu", marks=needs_host_kernel))
    return out


def check_transition(res, ref64, same, dtype, what):
    for name, a, b, s in zip(("x_next", "mean", "logvar"), res, ref64, same):
        assert a.dtype == torch.float32, f"{what}: {name} is {a.dtype}"
        assert_flash_rule(a, b, s, dtype, f"{what} {name}")


EPI_CASES = [
    # learn_sigma, sigma_small (fixed variance kind), cfg, guidance_channels, clip, predict_xstart
    pytest.param(True, False, True, 3, False, False, id="learned-cfg3"),
    pytest.param(True, False, True, 4, True, False, id="learned-cfg4-clip"),
    pytest.param(True, False, False, 3, False, False, id="learned-nocfg"),
    pytest.param(False, False, True, 3, True, False, id="fixedlarge-cfg3-clip"),
    pytest.param(False, True, False, 3, False, False, id="fixedsmall-nocfg"),
    pytest.param(True, False, True, 3, True, True, id="learned-xstart-clip"),
]


def diffusion_for(learn_sigma, sigma_small=False, predict_xstart=False, steps="10"):
    return create_diffusion(steps, learn_sigma=learn_sigma, sigma_small=sigma_small, predict_xstart=predict_xstart)


# ============================================================ kernels against the composition (CPU: interpreter / emulation)
@pytest.mark.parametrize("learn,small,cfg,gc,clip,xstart", EPI_CASES)
def test_torch_tensor_epilogue_is_bit_exact_with_the_composition(learn, small, cfg, gc, clip, xstart):
    tgt = make_target(learn_sigma=learn, device="cpu")
    dif = diffusion_for(learn, small, xstart)
    h, c, x, noise, idx = epilogue_case(cfg=cfg, device="cpu")
    kw = dict(cfg_scale=4.0, guidance_channels=gc, clip_denoised=clip)
    with torch.no_grad():
        ref = ref_composition(tgt, dif, h, c, x, idx, noise, **kw)
        res = ops.draft_transition(tgt, dif, h, c, x, idx, noise, backend="torch", **kw)
        shift, scale, w, b, eps = head_parameters(tgt, c)
        from free_kernels.diffusion.gaussian_diffusion import ModelMeanType

        ten = ops.draft_epilogue(h, shift, scale, w, b, x, schedule_tables(dif), idx, noise, patch_size=2,
                                 cfg_scale=4.0, guidance_channels=gc, learned_variance=dif.learned_variance,
                                 predict_xstart=dif.model_mean_type == ModelMeanType.START_X, clip_denoised=clip,
                                 eps=eps, backend="torch")
    for a, b_, t in zip(ref, res, ten):
        assert torch.equal(a, b_) and torch.equal(a, t)


@pytest.mark.parametrize("backend", fp32_backends())
@pytest.mark.parametrize("learn,small,cfg,gc,clip,xstart", EPI_CASES)
def test_draft_epilogue_matches_the_composition(backend, learn, small, cfg, gc, clip, xstart, monkeypatch):
    dtype = torch.float32
    tgt = make_target(learn_sigma=learn, dtype=dtype)
    dif = diffusion_for(learn, small, xstart)
    h, c, x, noise, idx = epilogue_case(cfg=cfg, dtype=dtype)
    kw = dict(cfg_scale=4.0, guidance_channels=gc, clip_denoised=clip)
    ref64 = composition_oracle(tgt, dif, h, c, x, idx, noise, **kw)
    with torch.no_grad():
        same = ref_composition(tgt, dif, h, c, x, idx, noise, **kw)
    res = run_transition(backend, tgt, dif, h, c, x, idx, noise, monkeypatch, **kw)
    check_transition(res, ref64, same, dtype, f"{backend}")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("S,p,H", [(2, 2, 32), (8, 4, 96), (4, 2, 96)], ids=["N1", "p4-N4-H96", "N4-H96"])
def test_draft_epilogue_odd_geometries_fp16(backend, S, p, H, monkeypatch):
    dtype = torch.float16
    tgt = make_target(S=S, p=p, H=H, dtype=dtype)
    dif = diffusion_for(True)
    h, c, x, noise, idx = epilogue_case(R=2, cfg=True, S=S, p=p, H=H, dtype=dtype, seed=S + p + H)
    kw = dict(cfg_scale=1.5, guidance_channels=3, clip_denoised=False)
    ref64 = composition_oracle(tgt, dif, h, c, x, idx, noise, **kw)
    with torch.no_grad():
        same = ref_composition(tgt, dif, h, c, x, idx, noise, **kw)
    res = run_transition(backend, tgt, dif, h, c, x, idx, noise, monkeypatch, **kw)
    check_transition(res, ref64, same, dtype, f"{backend} S={S} p={p} H={H}")


@pytest.mark.parametrize("backend", fp32_backends())
def test_draft_epilogue_strided_inputs_and_poisoned_outputs(backend, monkeypatch):
    tgt = make_target()
    dif = diffusion_for(True)
    h, c, x, noise, idx = epilogue_case(R=2, cfg=True)
    # non-contiguous h (every other token of a wider buffer) and x (channels-last storage)
    hb = rnd((4, 32, 40), torch.float32, 30)
    hb[:, ::2, 3:35] = h
    h2 = hb[:, ::2, 3:35]
    x2 = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    # index: a column of a (R, L + 1) table, as the sampler passes it (stride L + 1)
    table = torch.zeros((2, 4), dtype=torch.int64, device=DEV)
    table[:, 2] = idx
    idx2 = table[:, 2]
    assert not h2.is_contiguous() and not x2.is_contiguous() and not idx2.is_contiguous()
    kw = dict(cfg_scale=3.0, guidance_channels=3, clip_denoised=False)
    # outputs: slices of (R, L, D)-style sampler buffers, poisoned
    bufs = [torch.full((2, 3, 4 * 8 * 8), float("nan"), device=DEV) for _ in range(3)]
    out = tuple(b[:, 1].view(2, 4, 8, 8) for b in bufs)
    res = run_transition(backend, tgt, dif, h2, c, x2, idx2, noise, monkeypatch, out=out, **kw)
    assert all(r.data_ptr() == o.data_ptr() for r, o in zip(res, out))
    for b in bufs:
        assert not torch.isnan(b[:, 1]).any(), "output element never written"
        assert torch.isnan(b[:, 0]).all() and torch.isnan(b[:, 2]).all(), "kernel wrote outside out"
    ref64 = composition_oracle(tgt, dif, h, c, x, idx, noise, **kw)
    with torch.no_grad():
        same = ref_composition(tgt, dif, h, c, x, idx, noise, **kw)
    check_transition(res, ref64, same, torch.float32, f"{backend} strided")


@pytest.mark.parametrize("backend", ["torch"] + fp32_backends())
def test_draft_epilogue_counter_based_noise(backend, monkeypatch):
    """noise=None: every backend draws philox_randn(seed, offset + flat index, the draft subsequence), keeps it
    in noise_out, advances."""
    ext = _env.extension()  # the real module (host Philox mirror), before cuda-emu patches the lookup
    if ext is None and backend in ("torch", "cuda-emu"):
        pytest.skip("needs the host Philox of free_kernels._C")
    tgt = make_target()
    dif = diffusion_for(True)
    h, c, x, _, idx = epilogue_case(R=2, cfg=True)
    seed, offset = 1234567, 99
    rng = torch.tensor([seed, offset], dtype=torch.int64, device=DEV)
    kw = dict(cfg_scale=2.0, guidance_channels=3, clip_denoised=False)

    def draw(z):
        return run_transition(backend, tgt, dif, h, c, x, idx, None, monkeypatch, rng_state=rng, noise_out=z, **kw)

    z = torch.full(x.shape, float("nan"), device=DEV)
    res = draw(z)
    n = x.numel()
    assert rng.tolist() == [seed, offset + n], "rng_state offset not advanced by R*C*S*S"
    assert not torch.isnan(z).any()
    if ext is not None:
        from free_kernels.reference.draft_epilogue import DRAFT_NOISE_SUBSEQUENCE as sub
        host = torch.from_numpy(np.asarray(ext.philox_normal(seed, offset, n, subsequence=sub))).reshape(x.shape)
        torch.testing.assert_close(z.cpu(), host, rtol=1e-5, atol=1e-5)
    # the outputs are the transition of exactly that noise
    ref = run_transition(backend, tgt, dif, h, c, x, idx, z, monkeypatch, **kw)
    for a, b in zip(res, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # the next call continues the stream
    z2 = torch.empty_like(z)
    draw(z2)
    assert rng.tolist() == [seed, offset + 2 * n]
    assert not torch.allclose(z, z2)


# ============================================================ the host kernel (cpu backend)
@needs_host_kernel
@pytest.mark.parametrize("learn,small,cfg,gc,clip,xstart", EPI_CASES)
def test_cpu_backend_matches_the_composition(learn, small, cfg, gc, clip, xstart):
    """The host kernel on CPU tensors (whatever the tests' device), to float32 rounding of the composition."""
    tgt = make_target(learn_sigma=learn, device="cpu")
    dif = diffusion_for(learn, small, xstart)
    h, c, x, noise, idx = epilogue_case(cfg=cfg, device="cpu")
    kw = dict(cfg_scale=4.0, guidance_channels=gc, clip_denoised=clip)
    ref64 = composition_oracle(tgt, dif, h, c, x, idx, noise, **kw)
    with torch.no_grad():
        same = ref_composition(tgt, dif, h, c, x, idx, noise, **kw)
        res = ops.draft_transition(tgt, dif, h, c, x, idx, noise, backend="cpu", **kw)
    check_transition(res, ref64, same, torch.float32, "cpu")


@needs_host_kernel
def test_cpu_tensors_take_the_host_kernel_where_it_can_run(monkeypatch):
    """Dispatch on CPU tensors: cpu for a float32 inference call of draft-step size; torch for float16 states,
    autograd or FREE_KERNELS_BACKEND=torch, and first past CPU_MAX_WORK; the verify transition stays torch
    (bit for bit the baseline's)."""
    import importlib

    from free_kernels.ops.draft_transition import OP as DT
    from free_kernels.ops.verify_transition import OP as VT

    de = importlib.import_module("free_kernels.ops.draft_epilogue")
    tgt = make_target(device="cpu")
    dif = diffusion_for(True)
    h, c, x, noise, idx = epilogue_case(device="cpu")
    with torch.no_grad():
        shift, scale, w, b, eps = head_parameters(tgt, c)
    w, b = w.detach(), b.detach()
    ctx = de.validate(h, shift, scale, w, b, x, schedule_tables(dif), idx, noise, patch_size=2, guidance_channels=3,
                      learned_variance=True, rng_state=None, out=None, noise_out=None)
    assert de.OP.resolve(ctx).name == "cpu"
    assert de.OP.resolve(dict(ctx, f32_states=False)).name == "torch"
    assert de.OP.resolve(dict(ctx, dtype=torch.float16)).name == "torch"
    assert de.OP.resolve(dict(ctx, requires_grad=True)).name == "torch"
    # DiT-XL/2 at batch 8 with CFG, past CPU_MAX_WORK: torch first, the host kernel still on request
    big = dict(ctx, M=4096, H=1152, PE=16)
    order, source = de.OP.order_for(big)
    assert order == ("torch", "cpu") and "multiply-adds" in source and de.OP.resolve(big).name == "torch"
    assert de.OP.resolve(big, "cpu").name == "cpu"
    monkeypatch.setenv("FREE_KERNELS_BACKEND", "torch")
    assert de.OP.resolve(ctx).name == "torch"
    monkeypatch.delenv("FREE_KERNELS_BACKEND")
    assert "cpu" not in VT.backends
    # the module-level entry: the host kernel, computing the head's adaLN once (not again in forward_head)
    calls = []
    real = tgt.head_parameters
    monkeypatch.setattr(tgt, "head_parameters", lambda cc: calls.append(1) or real(cc))
    with torch.no_grad():
        res = ops.draft_transition(tgt, dif, h, c, x, idx, noise, cfg_scale=2.0)
        ref = ops.draft_transition(tgt, dif, h, c, x, idx, noise, cfg_scale=2.0, backend="torch")
    assert calls == [1]
    for a, b_ in zip(res, ref):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)
    assert DT.resolve(dict(device=torch.device("cpu"), dtype=torch.float32, H=32, M=96, requires_grad=False,
                           target_reason=None, diffusion_reason=None, f32_states=True, mixed=None, PE=16)).name == "cpu"


@needs_host_kernel
def test_cpu_backend_rejects_bad_calls_before_reading():
    """The host kernel reads host memory: indices outside the tables and non-float32 tensors are refused with
    a one-line error naming them (not read out of bounds)."""
    tgt = make_target(device="cpu")
    dif = diffusion_for(True)
    h, c, x, noise, idx = epilogue_case(device="cpu")
    shift, scale, w, b, eps = head_parameters(tgt, c)
    tab = schedule_tables(dif)
    base = dict(patch_size=2, learned_variance=True, cfg_scale=2.0, backend="cpu")
    with torch.no_grad():
        with pytest.raises(ValueError, match="index 10 of row 1 is outside the tables"):
            ops.draft_epilogue(h, shift, scale, w, b, x, tab, torch.tensor([3, 10, 0]), noise, **base)
        with pytest.raises(ValueError, match="index -1"):
            ops.draft_epilogue(h, shift, scale, w, b, x, tab, torch.tensor([-1, 2, 0]), noise, **base)
        with pytest.raises(ops.BackendUnavailable, match="float32"):
            ops.draft_epilogue(h, shift, scale, w, b, x.half(), tab, idx, noise.half(), **base)
        # a sub-range of the tables (a column slice: the row stride stays T) bounds the indices too
        with pytest.raises(ValueError, match="outside the tables"):
            ops.draft_epilogue(h, shift, scale, w, b, x, tab[:, :5], torch.tensor([9, 4, 0]), noise, **base)


def test_draft_epilogue_validation():
    tgt = make_target(device="cpu")
    dif = diffusion_for(True)
    h, c, x, noise, idx = epilogue_case(device="cpu")
    shift, scale, w, b, eps = head_parameters(tgt, c)
    tab = schedule_tables(dif)
    base = dict(patch_size=2, learned_variance=True)
    with pytest.raises(ValueError, match="noise"):
        ops.draft_epilogue(h, shift, scale, w, b, x, tab, idx, None, **base)
    with pytest.raises(TypeError, match="index"):
        ops.draft_epilogue(h, shift, scale, w, b, x, tab, idx.int(), noise, **base)
    with pytest.raises(ValueError, match="h must have"):
        ops.draft_epilogue(h[:5], shift, scale, w, b, x, tab, idx, noise, **base)
    with pytest.raises(ValueError, match="learned variance"):
        ops.draft_epilogue(h, shift, scale, w[:16], b[:16], x, tab, idx, noise, **base)
    with pytest.raises(ValueError, match="tables"):
        ops.draft_epilogue(h, shift, scale, w, b, x, tab[:5], idx, noise, **base)
    with pytest.raises(ValueError, match="guidance_channels"):
        ops.draft_epilogue(h, shift, scale, w, b, x, tab, idx, noise, guidance_channels=5, **base)


# ============================================================ offline GPU compilation (CPU)
def test_cuda_kernel_compiles_for_sm80_sm90_without_spills(tmp_path):
    """nvcc -Xptxas -v on csrc/kernels/draft_epilogue.cu for sm_80 and sm_90: every instance 0 spill bytes.

    (draft_epilogue has a 32-byte stack frame and no spills: cosf's Payne-Hanek range reduction
    inside philox_randn's Box-Muller, never taken since its angle is in [0, 2 pi).)
    """
    assert_cuda_compiles_without_spills(OP, tmp_path)


_COMPILE_SNIPPET = textwrap.dedent("""
    import json, sys
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import free_kernels.triton.draft_epilogue as de
    cc, dt = int(sys.argv[1]), sys.argv[2]
    dtype, ptr = dict(fp16=(torch.float16, "*fp16"), bf16=(torch.bfloat16, "*bf16"), fp32=(torch.float32, "*fp32"))[dt]
    meta = de.launch_meta(1152, 2, 4, dtype, interpret=False)
    fn = de._draft_epilogue_kernel
    ptrs = ["Hf", "SHIFT", "SCALE", "W", "BIAS", "X", "TAB", "IDX", "NOISE", "RNG", "OUT_X", "OUT_M", "OUT_V",
            "OUT_Z"]
    types = [ptr] * 5 + ["*fp32", "*fp32", "*i64", "*fp32", "*i64"] + ["*fp32"] * 4
    sig = dict(zip(ptrs, types))
    for n in ["R", "N", "H", "GRID_W"]:
        sig[n] = "i32"
    sig.update(eps="fp32", cfg_scale="fp32")
    for n in fn.arg_names[len(sig):]:
        if n not in meta and n not in ("C", "P", "C_OUT", "GC", "CFG", "LEARNED", "XSTART", "CLIP",
                                       "HAS_NOISE", "WRITE_Z"):
            sig[n] = "i64"
    const = dict(meta, C=4, P=2, C_OUT=8, GC=3, CFG=True, LEARNED=True, XSTART=False, CLIP=False,
                 HAS_NOISE=False, WRITE_Z=True)
    sig.update({k: "constexpr" for k in const})
    ptx = []
    for v in (dict(HAS_NOISE=False), dict(HAS_NOISE=True)):
        k = triton.compile(ASTSource(fn, sig, dict(const, **v)), target=GPUTarget("cuda", cc, 32),
                           options=dict(num_warps=4))
        ptx.append(k.asm["ptx"])
    print(json.dumps(ptx))
""")


@pytest.mark.skipif(triton_missing() is not None and not INTERPRET, reason="needs triton")
@pytest.mark.skipif(CUDA, reason="CPU-only check; on a GPU the kernels are launched by the gpu tests")
@pytest.mark.parametrize("dt", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("cc", [80, 90])
def test_triton_kernel_compiles_for_gpu_without_spills(cc, dt, tmp_path):
    """The DiT-XL (H = 1152) Triton kernel, drawn and given noise, for sm_80 / sm_90 on the CPU (no launch):
    ptxas reports no spills."""
    assert_no_spills(triton_ptxas_usage(_COMPILE_SNIPPET, [cc, dt], cc, tmp_path), f"sm_{cc} {dt}")


# ============================================================ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("S,p,H,R", [(32, 2, 1152, 1), (32, 2, 1152, 8), (64, 2, 1152, 2), (8, 2, 96, 3),
                                     (16, 4, 72, 2)])
@pytest.mark.parametrize("learn,cfg", [(True, True), (False, False)])
def test_gpu_draft_epilogue_matches(backend, dtype, S, p, H, R, learn, cfg):
    gpu_skip_unless(OP, backend, dtype)
    tgt = make_target(learn_sigma=learn, S=S, p=p, H=H, dtype=dtype)
    dif = diffusion_for(learn, steps="250")
    h, c, x, noise, idx = epilogue_case(R=R, cfg=cfg, S=S, p=p, H=H, dtype=dtype, steps="250", seed=S + H + R)
    kw = dict(cfg_scale=4.0, guidance_channels=3, clip_denoised=False)
    ref64 = composition_oracle(tgt, dif, h, c, x, idx, noise, **kw)
    with torch.no_grad():
        same = ref_composition(tgt, dif, h, c, x, idx, noise, **kw)
        res = ops.draft_transition(tgt, dif, h, c, x, idx, noise, backend=backend, **kw)
    check_transition(res, ref64, same, dtype, f"{backend} S={S} H={H} R={R}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_unaligned_path(backend):
    """Odd offsets / strides: the CUDA element-wise paths (no 16-byte vectors, no mma weight pairs)."""
    dtype = torch.float16
    gpu_skip_unless(OP, backend, dtype)
    tgt = make_target(S=8, p=2, H=96, dtype=dtype)
    with torch.no_grad():
        wbig = torch.zeros(33, 97, dtype=dtype, device=DEV)
        wbig[1:, 1:] = tgt.final_layer.linear.weight
        tgt.final_layer.linear.weight = torch.nn.Parameter(wbig[1:, 1:])  # rows at an odd element offset
    dif = diffusion_for(True)
    h, c, x, noise, idx = epilogue_case(R=2, cfg=True, S=8, p=2, H=96, dtype=dtype)
    kw = dict(cfg_scale=4.0, guidance_channels=4, clip_denoised=True)
    ref64 = composition_oracle(tgt, dif, h, c, x, idx, noise, **kw)
    with torch.no_grad():
        same = ref_composition(tgt, dif, h, c, x, idx, noise, **kw)
        res = ops.draft_transition(tgt, dif, h, c, x, idx, noise, backend=backend, **kw)
    check_transition(res, ref64, same, dtype, "unaligned epilogue")


@pytest.mark.gpu
def test_gpu_backends_draw_the_same_noise_stream():
    gpu_skip_unless(OP, "cuda")
    gpu_skip_unless(OP, "triton")
    tgt = make_target(S=16, p=2, H=96, dtype=torch.float16)
    dif = diffusion_for(True)
    h, c, x, _, idx = epilogue_case(R=2, cfg=True, S=16, p=2, H=96, dtype=torch.float16)
    zs = []
    for backend in ("cuda", "triton"):
        rng = torch.tensor([42, 7], dtype=torch.int64, device=DEV)
        z = torch.empty(x.shape, device=DEV)
        with torch.no_grad():
            ops.draft_transition(tgt, dif, h, c, x, idx, None, rng_state=rng, noise_out=z, backend=backend)
        assert rng.tolist() == [42, 7 + x.numel()]
        zs.append(z)
    torch.testing.assert_close(zs[0], zs[1], rtol=1e-4, atol=1e-4)

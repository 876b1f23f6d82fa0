"""The fused drafter step as a whole: the adaLN ops wired into the DiT block, the draft transition, the sampler.

The ops' own kernel tests live in tests/test_<op>.py (modulated_layernorm,
gated_residual, bias_gelu, draft_epilogue; accuracy rule: tests/_tolerance.py).
Here: ``python -m free_kernels.info`` lists them, the DiT block's torch path is
bit for bit the official expression and its fused path matches it, the host
tests of their shared scalar math (adaln_math.h), the draft transition's
reasons, the sampler's draft loop through the fused epilogue, and (``gpu``
marker) a CUDA-graph capture of one draft step with static buffers.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cuda_emulation.harness import CUDA, DEV, gpu_backends, gpu_skip_unless, needs_triton, rnd
from free_kernels import ops
from free_kernels.models.dit import DiTBlock
from free_kernels.reference.modulated_layernorm import modulated_layernorm as ref_mln
from test_draft_epilogue import diffusion_for, make_target

ROOT = Path(__file__).resolve().parents[1]
OPS = ("modulated_layernorm", "gated_residual", "bias_gelu", "draft_epilogue")


def test_info_lists_the_new_ops():
    from free_kernels.info import _op_contexts
    from free_kernels.ops._dispatch import describe

    lines = describe({name: _op_contexts(name) for name in OPS})
    text = "\n".join(lines)
    for name in OPS:
        assert name in text


# ============================================================ DiT wiring
def _old_block_forward(blk, x, c):
    """The DiTBlock forward as written before the fused ops (the official expression)."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = blk.adaLN_modulation(c).chunk(6, dim=1)
    x = x + gate_msa.unsqueeze(1) * blk.attn(ref_mln(x, shift_msa, scale_msa))
    h = ref_mln(x, shift_mlp, scale_mlp)
    return x + gate_mlp.unsqueeze(1) * blk.mlp.fc2(F.gelu(blk.mlp.fc1(h), approximate="tanh"))


def _random_block(H=32, heads=2, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    blk = DiTBlock(H, heads)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) * (0.3 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.05))
    return blk.to(dtype)


def test_dit_block_torch_path_is_bit_identical_to_the_official_expression():
    blk = _random_block()
    x, c = rnd((3, 7, 32), torch.float32, 1, device="cpu"), rnd((3, 32), torch.float32, 2, device="cpu")
    with torch.no_grad():
        assert torch.equal(blk(x, c), _old_block_forward(blk, x, c))
    # and with autograd on (training): same values, gradients flow through every op
    xg = x.clone().requires_grad_(True)
    y = blk(xg, c)
    assert torch.equal(y.detach(), _old_block_forward(blk, x, c).detach())
    y.square().sum().backward()
    assert xg.grad is not None and all(p.grad is not None for p in blk.parameters())


@needs_triton
def test_dit_block_through_fused_backends_matches(monkeypatch):
    """Every dispatch point of the block forced to triton (interpreter on CPU): same block output."""
    dtype = torch.float32 if not CUDA else torch.float16
    blk = _random_block(dtype=dtype).to(DEV)
    x, c = rnd((2, 4, 32), dtype, 3), rnd((2, 32), dtype, 4)
    with torch.no_grad():
        ref = blk(x, c)
        for name in ("MODULATED_LAYERNORM", "GATED_RESIDUAL", "BIAS_GELU"):
            monkeypatch.setenv(f"FREE_KERNELS_BACKEND_{name}", "triton")
        out = blk(x, c)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


# ============================================================ draft transition, sampler
def test_draft_transition_reasons_for_unknown_heads():
    from free_kernels.ops.draft_transition import OP, head_reason

    class NoHead(torch.nn.Module):
        patch_size = 2

    assert "final_layer" in head_reason(NoHead())
    tgt = make_target(device="cpu")
    assert head_reason(tgt) is None
    ctx = dict(device=torch.device("cuda"), dtype=torch.float16, H=32, PE=16, target_reason=head_reason(NoHead()))
    assert "final_layer" in OP.reasons(ctx)["triton"]
    assert OP.resolve(ctx).name == "torch"


@needs_triton
def test_free_sampler_runs_with_fused_epilogue(monkeypatch):
    """The sampler's draft loop through the fused epilogue (triton; interpreter on CPU) completes."""
    from free_kernels.models.drafter import FeatureDrafter
    from free_kernels.sampler import FreeSampler

    monkeypatch.setenv("FREE_KERNELS_BACKEND_DRAFT_TRANSITION", "triton")
    tgt = make_target(S=4)
    dif = diffusion_for(True, steps="6")
    drafter = FeatureDrafter.for_target(tgt, init="random", generator=torch.Generator().manual_seed(0))
    smp = FreeSampler(tgt, drafter, dif, draft_length=2, clip_denoised=True)
    g = torch.Generator(device=DEV).manual_seed(0)
    noise = torch.randn(2, 4, 4, 4, generator=g, device=DEV)
    out = smp.sample(noise, torch.tensor([1, 2], device=DEV), cfg_scale=2.0, generator=g)
    x = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(x).all()


# ============================================================ shared scalar math (host)
def test_adaln_math_header_host_tests(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path / "test_adaln_math"
    cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
           f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'tests'}",
           str(ROOT / "csrc" / "tests" / "test_adaln_math.cpp"), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ============================================================ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_cuda_graph_capture_of_one_draft_step(backend):
    """drafter forward + fused epilogue captured with static buffers and a device rng_state: replay == eager."""
    from free_kernels.models.drafter import FeatureDrafter

    dtype = torch.bfloat16
    for name in ("modulated_layernorm", "gated_residual", "bias_gelu", "draft_epilogue"):
        gpu_skip_unless(name, backend, dtype)
    env = {f"FREE_KERNELS_BACKEND_{n.upper()}": backend
           for n in ("modulated_layernorm", "gated_residual", "bias_gelu", "draft_transition")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        tgt = make_target(S=32, p=2, H=1152, dtype=dtype)
        tgt.num_heads = 16
        dif = diffusion_for(True, steps="250")
        drafter = FeatureDrafter.for_target(tgt, init="random", generator=torch.Generator().manual_seed(0)).to(dtype)
        R, G = 2, 2
        h_prev = rnd((G * R, 256, 1152), dtype, 1)
        x = rnd((R, 4, 32, 32), torch.float32, 2)
        idx = torch.tensor([200, 150], device=DEV)
        t = torch.as_tensor(np.asarray(dif.timestep_map)[idx.cpu().numpy()], device=DEV).repeat(G)
        y = torch.tensor([1, 2, tgt.num_classes, tgt.num_classes], device=DEV)  # [cond; uncond (null class)]
        rng = torch.tensor([7, 0], dtype=torch.int64, device=DEV)
        outs = tuple(torch.empty(x.shape, device=DEV) for _ in range(3))
        z = torch.empty(x.shape, device=DEV)

        def step():
            h = ops.drafter_forward(drafter, h_prev, x.to(dtype).repeat(G, 1, 1, 1), t, y)
            c = tgt.embed_condition(t, y)
            return ops.draft_transition(tgt, dif, h, c, x, idx, None, cfg_scale=4.0, rng_state=rng, out=outs,
                                        noise_out=z)

        with torch.no_grad():
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                step()  # warm-up: kernel compilation / loading and the schedule-table cache
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            rng.copy_(torch.tensor([7, 0]))
            step()
            eager = [o.clone() for o in outs] + [z.clone()]
            rng.copy_(torch.tensor([7, 0]))
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            rng.copy_(torch.tensor([7, 0]))
            for o in outs + (z,):
                o.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(z, eager[3])  # counter-based noise: bit for bit
            for a, b in zip(eager[:3], outs):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            assert rng.tolist() == [7, x.numel()]
            g.replay()  # the offset lives on the device: fresh noise
            torch.cuda.synchronize()
            assert not torch.equal(z, eager[3])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

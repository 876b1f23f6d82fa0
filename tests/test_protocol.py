"""The target protocol (models/protocol.py) as the ops use it.

* ``head_parameters(c)`` of our DiT, diffusers' DiT (``DiffusersDiTTarget``) and an
  official-layout module (``OfficialDiTTarget``) reproduce ``forward_head``
  through the reference epilogue, bit for bit on the CPU in float32; the draft
  step's tensor-level op (``draft_epilogue``, torch backend) on them equals the
  composition through ``forward_head``, and the fused epilogue (triton, under the
  interpreter) runs them.
* A minimal target that is not a DiT, implementing only the protocol, samples
  with :class:`~free_kernels.FreeSampler` (drafts through the fused epilogue when
  it has the head part, through ``forward_head`` when it has not).
* A target without ``head_parameters`` takes the torch path, and an explicit
  fused request raises with the reason; so does a head the kernels do not
  implement (an affine LayerNorm).
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import free_kernels as fk
from free_kernels import ops
from free_kernels.diffusion import create_diffusion
from free_kernels.models import FeatureDrafter, FusableHead, HeadParameters, OfficialDiTTarget, Target
from free_kernels.models.protocol import follows_target_protocol
from free_kernels.ops import BackendUnavailable
from free_kernels.reference.draft_epilogue import unpatchify
from free_kernels.reference.draft_transition import draft_transition as ref_composition
from free_kernels.reference.modulated_layernorm import modulated_layernorm

from test_dropin import OfficialStyleDiT
from test_sampler import make_target
from cuda_emulation.harness import CUDA, needs_triton, triton_missing

NULL = 5


def _randomize(m: nn.Module, seed: int, std: float = 0.1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "pos_embed" and not name.endswith("pos_embed"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return m.eval()


# ------------------------------------------------------------------ targets
class TinyTarget(nn.Module):
    """Not a DiT: the required part of the target protocol on a few linear layers."""

    def __init__(self, S=4, p=2, C=4, H=32, num_classes=NULL, learn_sigma=True):
        super().__init__()
        self.hidden_size, self.patch_size, self.in_channels, self.input_size = H, p, C, S
        self.num_classes, self.num_heads, self.learn_sigma = num_classes, 2, learn_sigma
        self.out_channels = 2 * C if learn_sigma else C
        N = (S // p) ** 2
        self.embed = nn.Linear(p * p * C, H)
        self.pos = nn.Parameter(torch.zeros(1, N, H))
        self.t_mlp = nn.Sequential(nn.Linear(1, H), nn.SiLU(), nn.Linear(H, H))
        self.y_table = nn.Embedding(num_classes + 1, H)
        self.mix = nn.Linear(H, H)
        self.ada = nn.Linear(H, 2 * H)
        self.norm = nn.LayerNorm(H, elementwise_affine=False, eps=1e-6)
        self.out = nn.Linear(H, p * p * self.out_channels)

    def embed_tokens(self, x):
        B, C, S, _ = x.shape
        p, n = self.patch_size, S // self.patch_size
        tok = x.reshape(B, C, n, p, n, p).permute(0, 2, 4, 3, 5, 1).reshape(B, n * n, p * p * C)
        return self.embed(tok) + self.pos

    def embed_condition(self, t, y):
        return self.t_mlp(t.float()[:, None] / 1000.0) + self.y_table(y)

    def forward_features(self, x, t, y):
        h, c = self.embed_tokens(x), self.embed_condition(t, y)
        return h + torch.tanh(self.mix(h + c[:, None])), c

    def forward_head(self, h, c):
        shift, scale = self.ada(F.silu(c)).chunk(2, dim=1)
        return unpatchify(self.out(self.norm(h) * (1 + scale[:, None]) + shift[:, None]), self.patch_size,
                          self.out_channels)

    def forward(self, x, t, y):
        return self.forward_head(*self.forward_features(x, t, y))


class TinyFusableTarget(TinyTarget):
    """TinyTarget with the protocol's fused-head part."""

    def head_parameters(self, c):
        shift, scale = self.ada(F.silu(c)).chunk(2, dim=1)
        return HeadParameters(shift, scale, self.out.weight, self.out.bias, float(self.norm.eps))

    def head_fusion_problem(self):
        return None


def _diffusers_target():
    pytest.importorskip("diffusers")
    from diffusers import DiTTransformer2DModel

    from free_kernels.models import DiffusersDiTTarget

    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                              num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=NULL)
    return DiffusersDiTTarget(_randomize(m, 3))


def _target(kind):
    if kind == "dit":
        return make_target(True)
    if kind == "diffusers":
        return _diffusers_target()
    if kind == "official":
        return OfficialDiTTarget(_randomize(OfficialStyleDiT(depth=1, num_classes=NULL), 4))
    return _randomize(TinyFusableTarget(), 5)


KINDS = ["dit", "diffusers", "official", "tiny"]


def _features(tgt, R=3, cfg=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = tgt.input_size
    x = torch.randn(R, 4, S, S, generator=g)
    y = torch.randint(0, NULL, (R,), generator=g)
    t = torch.randint(0, 1000, (R,), generator=g)
    if cfg:
        XX, TT, YY = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL)])
    else:
        XX, TT, YY = x, t, y
    with torch.no_grad():
        h, c = tgt.forward_features(XX, TT, YY)
    return h, c, x


# ------------------------------------------------------------------ head_parameters
@pytest.mark.parametrize("kind", KINDS)
def test_head_parameters_reproduce_forward_head(kind):
    tgt = _target(kind)
    assert isinstance(tgt, Target) and isinstance(tgt, FusableHead) and follows_target_protocol(tgt)
    assert tgt.head_fusion_problem() is None
    h, c, _ = _features(tgt)
    with torch.no_grad():
        hp = tgt.head_parameters(c)
        assert isinstance(hp, HeadParameters)
        y = modulated_layernorm(h, hp.shift, hp.scale, eps=hp.eps)
        via = unpatchify(F.linear(y, hp.weight, hp.bias), tgt.patch_size, hp.weight.shape[0] // tgt.patch_size ** 2)
        assert torch.equal(via, tgt.forward_head(h, c))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("learn", [True, False], ids=["learned", "fixed"])
def test_tensor_epilogue_on_head_parameters_is_the_composition(kind, learn):
    """ops.draft_epilogue (torch) on head_parameters and schedule_tables() == forward_head -> guidance ->
    transition_from_output -> mean + sigma * noise, bit for bit."""
    tgt = _target(kind)
    dif = create_diffusion("10", learn_sigma=learn)
    h, c, x = _features(tgt, seed=1)
    idx = torch.tensor([9, 4, 0])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    kw = dict(cfg_scale=3.0, guidance_channels=3, clip_denoised=True)
    with torch.no_grad():
        ref = ref_composition(tgt, dif, h, c, x, idx, noise, **kw)
        hp = tgt.head_parameters(c)
        ten = ops.draft_epilogue(h, hp.shift, hp.scale, hp.weight, hp.bias, x, dif.schedule_tables(), idx, noise,
                                 patch_size=tgt.patch_size, learned_variance=dif.learned_variance,
                                 predict_xstart=dif.predicts_xstart, eps=hp.eps, backend="torch", **kw)
        via_op = ops.draft_transition(tgt, dif, h, c, x, idx, noise, backend="torch", **kw)
    for a, b, d in zip(ref, ten, via_op):
        assert torch.equal(a, b) and torch.equal(a, d)


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
def test_fused_epilogue_runs_every_protocol_head(kind):
    """The draft and verify transitions of each target through the triton epilogue (its head from
    head_parameters) agree with the torch composition to fp32 rounding."""
    dev = torch.device("cuda" if CUDA else "cpu")
    tgt = _target(kind).to(dev)
    dif = create_diffusion("10", learn_sigma=True)
    h, c, x = (v.to(dev) for v in _features(tgt, seed=3))
    idx = torch.tensor([9, 4, 0], device=dev)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(dev)
    kw = dict(cfg_scale=3.0, guidance_channels=3, clip_denoised=False)
    with torch.no_grad():
        for op, args in ((ops.draft_transition, (noise,)), (ops.verify_transition, ())):
            ref = op(tgt, dif, h, c, x, idx, *args, backend="torch", **kw)
            fused = op(tgt, dif, h, c, x, idx, *args, backend="triton", **kw)
            for a, b in zip(fused, ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))


# ------------------------------------------------------------------ a target that is not a DiT
@pytest.mark.parametrize("fusable", [True, False], ids=["with-head-part", "required-part-only"])
def test_minimal_custom_target_samples_with_free(fusable, monkeypatch):
    tgt = _randomize((TinyFusableTarget if fusable else TinyTarget)(), 6)
    assert follows_target_protocol(tgt) and isinstance(tgt, FusableHead) == fusable
    dif = create_diffusion("8", learn_sigma=True)
    drafter = FeatureDrafter.for_target(tgt, init="random", generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2, 4])
    for layout in ("static", "compact"):
        smp = fk.FreeSampler(tgt, drafter, dif, draft_length=3, layout=layout, clip_denoised=True)
        a, st = smp.sample(noise, y, cfg_scale=2.0, generator=torch.Generator().manual_seed(2))
        b, _ = smp.sample(noise, y, cfg_scale=2.0, generator=torch.Generator().manual_seed(2))
        assert torch.isfinite(a).all() and torch.equal(a, b)
        assert st.drafter_calls > 0 and sum(st.proposed_by_index) > 0
    if fusable and triton_missing() is None:  # the drafts through the fused epilogue
        monkeypatch.setenv("FREE_KERNELS_BACKEND_DRAFT_TRANSITION", "triton")
        smp = fk.FreeSampler(tgt, drafter, dif, draft_length=2, clip_denoised=True)
        x, _ = smp.sample(noise, y, cfg_scale=2.0, generator=torch.Generator().manual_seed(2))
        assert torch.isfinite(x).all()


# ------------------------------------------------------------------ without the head part
def test_target_without_head_parameters_takes_the_torch_path():
    tgt = _randomize(TinyTarget(), 7)
    dif = create_diffusion("10", learn_sigma=True)
    h, c, x = _features(tgt)
    idx = torch.tensor([9, 4, 0])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        res = ops.draft_transition(tgt, dif, h, c, x, idx, noise, cfg_scale=3.0)
        ref = ref_composition(tgt, dif, h, c, x, idx, noise, cfg_scale=3.0)
    assert all(torch.equal(a, b) for a, b in zip(res, ref))
    for backend in ("triton", "cuda"):
        with pytest.raises(BackendUnavailable, match=r"TinyTarget does not implement head_parameters"):
            ops.draft_transition(tgt, dif, h, c, x, idx, noise, cfg_scale=3.0, backend=backend)
        with pytest.raises(BackendUnavailable, match=r"head_parameters\(c\) / head_fusion_problem\(\)"):
            ops.verify_transition(tgt, dif, h, c, x, idx, cfg_scale=3.0, backend=backend)
    # on CUDA tensors the automatic choice falls back to torch (the reason is recorded, nothing raises)
    from free_kernels.ops.draft_transition import OP, head_reason

    why = head_reason(tgt)
    ctx = dict(device=torch.device("cuda"), dtype=torch.float32, H=32, PE=16, M=24, target_reason=why)
    assert OP.reasons(ctx)["triton"] == why and OP.resolve(ctx).name == "torch"


def test_head_the_kernels_do_not_implement_is_named():
    tgt = make_target(True)
    tgt.final_layer.norm_final = nn.LayerNorm(tgt.hidden_size, eps=1e-6)  # affine: not the adaLN head
    assert "affine" in tgt.head_fusion_problem()
    dif = create_diffusion("10", learn_sigma=True)
    h, c, x = _features(tgt)
    with pytest.raises(BackendUnavailable, match="affine"):
        ops.verify_transition(tgt, dif, h, c, x, torch.tensor([9, 4, 0]), cfg_scale=3.0, backend="triton")


def test_diffusion_without_the_fused_part_is_named():
    """The ops ask the diffusion for schedule_tables() / fused_transition_problem(); a diffusion the kernels
    cannot run (here: a mean type they do not implement) says so."""
    from free_kernels.diffusion import ModelMeanType

    dif = create_diffusion("10", learn_sigma=True)
    assert dif.fused_transition_problem() is None and not dif.predicts_xstart
    assert create_diffusion("10", predict_xstart=True).predicts_xstart
    tables = dif.schedule_tables()
    assert tables.shape == (6, 10) and tables.dtype == torch.float32
    assert torch.equal(tables[2], torch.from_numpy(dif.posterior_mean_coef1).float())
    assert torch.equal(tables[5], torch.from_numpy(dif.log_betas).float())
    fixed = create_diffusion("10", learn_sigma=False)
    assert torch.equal(fixed.schedule_tables()[4], fixed.schedule_tables()[5])
    dif.model_mean_type = ModelMeanType.PREVIOUS_X
    assert "PREVIOUS_X" in dif.fused_transition_problem()
    tgt = make_target(True)
    h, c, x = _features(tgt)
    with pytest.raises(BackendUnavailable, match="PREVIOUS_X"):
        ops.verify_transition(tgt, dif, h, c, x, torch.tensor([9, 4, 0]), cfg_scale=3.0, backend="triton")


def test_schedule_tables_are_what_transition_from_output_reads():
    """The tables' rows, gathered at an index, are extract()'s float32 values of the schedules."""
    from free_kernels.diffusion.gaussian_diffusion import extract

    for learn, small in ((True, False), (False, False), (False, True)):
        dif = create_diffusion("25", learn_sigma=learn, sigma_small=small)
        idx = torch.arange(dif.num_timesteps)
        tab = dif.schedule_tables()
        lo = dif.posterior_log_variance_clipped if learn else dif._fixed_var[dif.model_var_type][1]
        for k, arr in enumerate((dif.sqrt_recip_alphas_cumprod, dif.sqrt_recipm1_alphas_cumprod,
                                 dif.posterior_mean_coef1, dif.posterior_mean_coef2, lo,
                                 dif.log_betas if learn else lo)):
            assert torch.equal(tab[k][idx], extract(np.asarray(arr), idx, idx.shape))

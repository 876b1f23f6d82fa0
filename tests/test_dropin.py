"""free_kernels.dit as a drop-in for the official DiT imports.

``official_style_sample`` below is the sampling loop of the official scripts,
written the way they write it (doubled batch [z; z], null labels, the bound
``model.forward_with_cfg``, ``p_sample_loop(..., clip_denoised=False,
model_kwargs=dict(y=y, cfg_scale=s))``, then ``samples.chunk(2)``).  The only
thing a user changes is where ``create_diffusion`` comes from.

Distribution checks reuse the two-sample KS machinery of tests/test_sampler.py
(fixed projections, Bonferroni over them, overall false-alarm rate ALPHA per
comparison, fixed seeds: deterministic outcomes).

Why ``predict_xstart=True`` (an official ``create_diffusion`` argument) in the
distribution tests: the official loop passes ``clip_denoised=False``, and a
random network used as an epsilon-predictor makes x0 = x / sqrt(abar) blow up
(samples of size ~1e3 that are nearly a deterministic function of the initial
noise, which makes a KS test weak).  An x0-predicting random network keeps the
samples O(1) and the comparison sharp (the negative control below is rejected
at p ~ 1e-11 with these sizes).  The epsilon path of the same sampler is covered by
tests/test_sampler.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import free_kernels as fk
from free_kernels import dit as fdit
from free_kernels.models import FeatureDrafter
from free_kernels.models.dit import DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder

from test_sampler import ALPHA, inputs, make_target, min_pvalue  # noqa: E402  (shared KS helpers)

M = 800           # samples per side
NULL = 5          # the tiny targets' null class (num_classes = 5); ImageNet's is 1000
STEPS = "12"
CFG = 4.0
N_PROJ = 6        # projections in test_sampler.projections (Bonferroni)


def official_style_sample(create_diffusion, model, z, y, cfg_scale, seed, steps=STEPS, **diffusion_kwargs):
    """The official sampling loop; ``create_diffusion`` is whatever the script imported."""
    torch.manual_seed(seed)
    diffusion = create_diffusion(steps, **diffusion_kwargs)
    n = z.shape[0]
    z = torch.cat([z, z], 0)
    y_null = torch.tensor([NULL] * n)  # the official scripts write 1000
    y = torch.cat([y, y_null], 0)
    model_kwargs = dict(y=y, cfg_scale=cfg_scale)
    samples = diffusion.p_sample_loop(
        model.forward_with_cfg, z.shape, z, clip_denoised=False, model_kwargs=model_kwargs, progress=False,
        device="cpu",
    )
    samples, _ = samples.chunk(2, dim=0)
    return samples, diffusion


class OfficialStyleDiT(nn.Module):
    """A 'foreign' DiT: the official attribute layout and forward, but none of our split methods."""

    def __init__(self, input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                 num_classes=5, learn_sigma=True):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, 0.1)
        self.pos_embed = nn.Parameter(torch.zeros(1, (input_size // patch_size) ** 2, hidden_size),
                                      requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x):
        c, p = self.out_channels, self.x_embedder.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        t = self.t_embedder(t)
        y = self.y_embedder(y, self.training)
        c = t + y
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        return self.unpatchify(x)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


@pytest.fixture(scope="module")
def target():
    return make_target(True)


@pytest.fixture(scope="module")
def foreign(target):
    m = OfficialStyleDiT()
    m.load_state_dict(target.state_dict(), strict=True)  # same key layout as the official checkpoints
    return m.eval()


_BASE = {}


def baseline(target, cfg_scale=CFG):
    if cfg_scale not in _BASE:
        z, y = inputs(target, M, seed=3)
        _BASE[cfg_scale] = official_style_sample(fk.create_diffusion, target, z, y, cfg_scale, seed=7,
                                                 predict_xstart=True)[0]
    return _BASE[cfg_scale]


def _alpha():
    return ALPHA / N_PROJ


# ----------------------------------------------------------------------------- exactness in distribution
def test_dropin_free_matches_baseline_in_distribution_poor_drafter_from_path(target, tmp_path):
    """Official loop + ``free_kernels.dit.create_diffusion(drafter=PATH)``; a random (poor) drafter
    exercises the residual sampler.  Negative control: a guidance scale of 3 instead of 4 is rejected."""
    dr = FeatureDrafter.for_target(target, init="random", generator=torch.Generator().manual_seed(2))
    path = str(tmp_path / "drafter.safetensors")
    dr.save(path)
    z, y = inputs(target, M, seed=5)  # independent of the baseline's inputs
    out, diffusion = official_style_sample(fdit.create_diffusion, target, z, y, CFG, seed=11,
                                           predict_xstart=True, drafter=path, draft_length=3)
    st = diffusion.last_stats
    assert out.shape == z.shape and torch.isfinite(out).all()
    assert sum(st.steps_per_sample) == M * diffusion.num_timesteps
    assert st.residual_rejections > 0 and st.acceptance_rate < 0.5
    p = min_pvalue(out, baseline(target))
    assert p > _alpha(), f"drop-in FREE differs from the baseline (min KS p-value {p:.2e})"
    p_ctrl = min_pvalue(out, baseline(target, 3.0))
    assert p_ctrl < _alpha(), f"negative control (cfg 3 vs 4) not detected (p {p_ctrl:.2e})"


def test_dropin_foreign_official_layout_module_frozen_drafter(target, foreign):
    """A module that only has the official layout (no forward_features) is wrapped and sampled by FREE."""
    z, y = inputs(target, M, seed=5)
    out, diffusion = official_style_sample(fdit.create_diffusion, foreign, z, y, CFG, seed=13,
                                           predict_xstart=True, drafter="frozen", draft_length=3)
    st = diffusion.last_stats
    assert st.steps_per_target_call > 1.0  # per sample; the batch's rounds last as long as its slowest sample
    p = min_pvalue(out, baseline(target))  # same weights as ``target``
    assert p > _alpha(), f"drop-in FREE on a foreign DiT differs from the baseline (min KS p-value {p:.2e})"


def test_official_layout_wrapper_is_bit_identical(target, foreign):
    w = fdit.OfficialDiTTarget(foreign)
    assert (w.in_channels, w.out_channels, w.input_size, w.patch_size, w.num_heads, w.num_classes,
            w.hidden_size, w.learn_sigma) == (4, 8, 4, 2, 2, 5, 32, True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 4, 4, generator=g)
    t = torch.tensor([0, 3, 250, 500, 998, 999])
    yy = torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.no_grad():
        assert torch.equal(w(x, t, yy), foreign(x, t, yy))
        assert torch.equal(w.forward_with_cfg(x, t, yy, 4.0), foreign.forward_with_cfg(x, t, yy, 4.0))
        assert torch.equal(foreign(x, t, yy), target(x, t, yy))  # same function as our DiT


# ----------------------------------------------------------------------------- no drafter: the baseline, bitwise
@pytest.mark.parametrize("cfg", [True, False], ids=["forward_with_cfg", "forward"])
def test_without_drafter_bitwise_baseline(target, cfg):
    z, y = inputs(target, 8, seed=1)
    if cfg:
        a, _ = official_style_sample(fdit.create_diffusion, target, z, y, CFG, seed=21, steps="25")
        b, _ = official_style_sample(fk.create_diffusion, target, z, y, CFG, seed=21, steps="25")
    else:
        runs = []
        for make in (fdit.create_diffusion, fk.create_diffusion):
            torch.manual_seed(21)
            d = make("25")
            runs.append(d.p_sample_loop(target.forward, z.shape, z, clip_denoised=False, model_kwargs=dict(y=y)))
        a, b = runs
    assert torch.equal(a, b)
    d_ours, d_base = fdit.create_diffusion("ddim10", learn_sigma=False), fk.create_diffusion("ddim10", learn_sigma=False)
    assert isinstance(d_ours, fk.diffusion.SpacedDiffusion)
    assert d_ours.timestep_map == d_base.timestep_map and (d_ours.betas == d_base.betas).all()
    assert d_ours.model_var_type == d_base.model_var_type and d_ours.loss_type == d_base.loss_type


def test_without_drafter_progressive_is_baseline(target):
    z, y = inputs(target, 4, seed=2)
    outs = []
    for make in (fdit.create_diffusion, fk.create_diffusion):
        torch.manual_seed(5)
        outs.append([o["sample"] for o in make("10").p_sample_loop_progressive(
            target.forward, z.shape, z, clip_denoised=False, model_kwargs=dict(y=y))])
    assert len(outs[0]) == 10 and all(torch.equal(a, b) for a, b in zip(*outs))


# ----------------------------------------------------------------------------- shapes, progressive, stats
def test_free_doubled_output_and_progressive(target):
    z, y = inputs(target, 3, seed=4)
    d = fdit.create_diffusion("10", drafter="frozen", draft_length=4)
    zz = torch.cat([z, z])
    yy = torch.cat([y, torch.full_like(y, target.num_classes)])
    out = d.p_sample_loop(target.forward_with_cfg, zz.shape, zz, clip_denoised=False,
                          model_kwargs=dict(y=yy, cfg_scale=CFG), generator=torch.Generator().manual_seed(0))
    assert out.shape == zz.shape and torch.equal(out[:3], out[3:])
    items = list(d.p_sample_loop_progressive(target.forward_with_cfg, zz.shape, zz, clip_denoised=False,
                                             model_kwargs=dict(y=yy, cfg_scale=CFG),
                                             generator=torch.Generator().manual_seed(0)))
    assert len(items) == 1 and set(items[0]) >= {"sample", "pred_xstart"}
    assert torch.equal(items[0]["sample"], out)  # same generator -> same run
    st = d.last_stats
    assert st.steps_per_sample == [10, 10, 10] and st.target_calls < 10
    # no CFG: model.forward, undoubled batch; the module itself is accepted as well
    out1 = d.p_sample_loop(target, z.shape, z, clip_denoised=False, model_kwargs=dict(y=y))
    assert out1.shape == z.shape and torch.isfinite(out1).all()


# ----------------------------------------------------------------------------- clear errors
def test_non_dit_callable_raises_clear_error(target):
    d = fdit.create_diffusion("10", drafter="frozen")
    z, y = inputs(target, 2, seed=0)
    with pytest.raises(TypeError, match="forward_with_cfg or model.forward of a free_kernels DiT"):
        d.p_sample_loop(lambda x, t, y: x, z.shape, z, model_kwargs=dict(y=y))

    class NotADiT(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, t, y):
            return x

    with pytest.raises(TypeError, match=r"not a recognisable DiT.*x_embedder"):
        d.p_sample_loop(NotADiT().forward, z.shape, z, model_kwargs=dict(y=y))
    with pytest.raises(TypeError, match="only forward_with_cfg"):
        d.p_sample_loop(target.forward_head, z.shape, z, model_kwargs=dict(y=y))
    # the same callable runs without a drafter (baseline accepts any callable)
    out = fdit.create_diffusion("3").p_sample_loop(lambda x, t, y: torch.cat([x, x], 1) * 0.1, z.shape, z,
                                                    model_kwargs=dict(y=y))
    assert out.shape == z.shape


def test_unsupported_free_arguments_raise(target):
    d = fdit.create_diffusion("10", drafter="frozen")
    z, y = inputs(target, 2, seed=0)
    zz, yy = torch.cat([z, z]), torch.cat([y, y])
    with pytest.raises(ValueError, match="null class"):
        d.p_sample_loop(target.forward_with_cfg, zz.shape, zz, model_kwargs=dict(y=yy, cfg_scale=CFG))
    with pytest.raises(NotImplementedError, match="cond_fn"):
        d.p_sample_loop(target.forward, z.shape, z, model_kwargs=dict(y=y), cond_fn=lambda x, t, y: x)
    with pytest.raises(ValueError, match="class labels y"):
        d.p_sample_loop(target.forward, z.shape, z, model_kwargs={})
    target.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            d.p_sample_loop(target.forward, z.shape, z, model_kwargs=dict(y=y))
    finally:
        target.eval()
    with pytest.raises(FileNotFoundError):
        fdit.create_diffusion("10", drafter="/nonexistent/drafter.safetensors")
    with pytest.raises(ValueError, match="draft_length"):
        fdit.create_diffusion("10", drafter="frozen", draft_length=0)


def test_reexports():
    assert fdit.DiT_models is fk.DiT_models and fdit.find_model is fk.find_model
    assert "DiT-XL/2" in fdit.DiT_models


# ============================================================================= diffusers: FreeDiTPipeline
def _tiny_pipeline_parts(out_channels=8):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    tr = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                         out_channels=out_channels, num_layers=2, sample_size=8, patch_size=2,
                                         num_embeds_ada_norm=10).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                                  block_out_channels=(8, 8), norm_num_groups=4, sample_size=16).eval()
    return tr, vae, diffusers.DDPMScheduler()


def _count_transformer_calls(tr):
    n = [0]
    # every full transformer evaluation runs block 0 exactly once; draft steps only use the head
    tr.transformer_blocks[0].register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))
    return n


@pytest.mark.parametrize("out_channels", [8, 4], ids=["learned-sigma", "fixed-sigma"])
def test_pipeline_outputs_and_fewer_transformer_calls(out_channels):
    from PIL import Image

    from free_kernels.pipeline import FreeDiTPipeline

    tr, vae, sch = _tiny_pipeline_parts(out_channels)
    calls = _count_transformer_calls(tr)
    pipe = FreeDiTPipeline(transformer=tr, vae=vae, scheduler=sch, drafter="frozen", draft_length=4)
    pipe.set_progress_bar_config(disable=True)
    steps = 20
    out = pipe(class_labels=[1, 2, 7], num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    imgs = out.images
    assert len(imgs) == 3 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in imgs)
    st = pipe.last_stats
    assert calls[0] == st.target_calls < steps, "FREE must call the transformer fewer times than steps"
    assert st.steps_per_sample == [steps] * 3 and st.draft_length == 4

    calls[0] = 0
    (arr,) = pipe(class_labels=[0, 9], num_inference_steps=steps, output_type="np", return_dict=False, drafter=None)
    assert arr.shape == (2, 16, 16, 3) and arr.dtype.name == "float32" and 0 <= arr.min() and arr.max() <= 1
    assert calls[0] == steps and pipe.last_stats is None  # the baseline: one call per step

    pt = pipe(class_labels=[3], num_inference_steps=10, output_type="pt", guidance_scale=1.0, draft_length=2).images
    assert pt.shape == (1, 3, 16, 16) and torch.isfinite(pt).all()


def test_pipeline_same_generator_same_images_and_errors():
    from free_kernels.pipeline import FreeDiTPipeline

    tr, vae, sch = _tiny_pipeline_parts()
    # a fixed draft length: with "auto" the plan follows the machine's round times (the same law, not the
    # same pixels from call to call)
    pipe = FreeDiTPipeline(transformer=tr, vae=vae, scheduler=sch, drafter="frozen", draft_length=3)
    pipe.set_progress_bar_config(disable=True)
    a = pipe([4, 5], num_inference_steps=8, generator=torch.Generator().manual_seed(3), output_type="pt").images
    b = pipe([4, 5], num_inference_steps=8, generator=[torch.Generator().manual_seed(3)], output_type="pt").images
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="one torch.Generator"):
        pipe([4, 5], num_inference_steps=8, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="class_labels"):
        pipe([10], num_inference_steps=8)
    import diffusers

    bad = FreeDiTPipeline(transformer=tr, vae=vae, scheduler=diffusers.DDPMScheduler(beta_schedule="scaled_linear"))
    with pytest.raises(ValueError, match="scaled_linear"):
        bad([1], num_inference_steps=4)

"""The second embedded demo (D = 4096 mosaic): it loads, and exact FREE keeps its baseline's law.

The exactness check is the one of test_sampler.py (two-sample KS on fixed projections of the final
samples, Bonferroni-corrected) on the trained 4 x 32 x 32 model and its shipped drafter, with a
negative control at the same sample size: a baseline with a slightly different guidance scale must
be told apart.
"""
import pytest
import torch

import free_kernels as fk
from free_kernels.demo import DEMOS, demo_files, load_demo

from test_sampler import ALPHA, min_pvalue  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.skipif(demo_files("mosaic") is None, reason="mosaic demo assets not shipped")

N = 400          # samples per side
STEPS = "12"


@pytest.fixture(scope="module")
def demo():
    return load_demo("mosaic")


def _baseline(target, noise, y, cfg, gc, seed):
    from free_kernels.cli.common import sample_baseline

    with torch.inference_mode():
        return sample_baseline(target, fk.create_diffusion(STEPS), noise, y, cfg_scale=cfg, guidance_channels=gc,
                               generator=torch.Generator().manual_seed(seed))


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 4, 32, 32, generator=g), torch.randint(0, 10, (N,), generator=g)


def test_mosaic_demo_loads_with_its_settings(demo):
    t = demo["target"]
    assert (t.in_channels, t.input_size) == (4, 32) and DEMOS["mosaic"][0] == "mosaic"
    assert demo["cfg_scale"] > 1 and demo["guidance_channels"] == 4
    pic = demo["to_canvas"](torch.zeros(2, 4, 32, 32))
    assert pic.shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="unknown demo 'mosaik'"):
        load_demo("mosaik")


@pytest.mark.slow
def test_exact_free_matches_the_mosaic_baseline_and_the_control_is_detected(demo):
    t, d, cfg, gc = demo["target"], demo["drafter"], demo["cfg_scale"], demo["guidance_channels"]
    noise, y = _inputs(1)
    base = _baseline(t, noise, y, cfg, gc, seed=2)
    noise2, y2 = _inputs(3)
    s = fk.FreeSampler(t, d, fk.create_diffusion(STEPS), draft_length=4)
    with torch.inference_mode():
        out, st = s.sample(noise2, y2, cfg_scale=cfg, guidance_channels=gc, generator=torch.Generator().manual_seed(4))
    assert st.acceptance_rate > 0.05 and st.residual_rejections > 0  # both branches of the rule are exercised
    k = 6  # projections compared (test_sampler.projections)
    assert min_pvalue(out, base) > ALPHA / k
    control = _baseline(t, noise2, y2, cfg * 0.8, gc, seed=5)
    assert min_pvalue(control, base) < ALPHA / k

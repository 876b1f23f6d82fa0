"""Every import path the README and python/README.md name keeps working, and names one object, not a copy:
the short public names, the package-level re-exports, and the console scripts."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


def test_drop_in_short_name_is_the_integration_module():
    import free_kernels.dit as short
    import free_kernels.integrations.official as official
    from free_kernels.dit import DiT_models, create_diffusion, find_model  # the README's drop-in line

    assert short is official
    assert create_diffusion is official.create_diffusion
    assert find_model is official.find_model and DiT_models is official.DiT_models
    # the drop-in returns the FREE subclass of the official diffusion; without a drafter it is the baseline
    from free_kernels.diffusion import SpacedDiffusion

    assert isinstance(create_diffusion("10"), SpacedDiffusion)


def test_pipeline_short_name_is_the_integration_module():
    pytest.importorskip("diffusers")
    import free_kernels.integrations.diffusers as integ
    import free_kernels.pipeline as short

    assert short is integ
    from free_kernels.pipeline import FreeDiTPipeline

    assert FreeDiTPipeline is integ.FreeDiTPipeline


@pytest.mark.parametrize("old, new, name", [
    ("free_kernels.models.diffusers_adapter", "free_kernels.models", "DiffusersDiTTarget"),
    ("free_kernels.integrations.diffusers", "free_kernels.models.diffusers_adapter", "DiffusersDiTTarget"),
    ("free_kernels.models", "free_kernels.models.diffusers_convert", "convert_diffusers_to_dit"),
    ("free_kernels.models", "free_kernels.models.diffusers_convert", "convert_dit_to_diffusers"),
    ("free_kernels.integrations.diffusers", "free_kernels.models.diffusers_convert", "convert_diffusers_to_dit"),
    ("free_kernels.integrations.diffusers", "free_kernels.models.diffusers_convert", "convert_dit_to_diffusers"),
    ("free_kernels.integrations.official", "free_kernels.models", "OfficialDiTTarget"),
    ("free_kernels.models.drafter", "free_kernels.models.protocol", "target_signature"),
    ("free_kernels.models.drafter", "free_kernels.models.official_adapter", "as_target"),
    ("free_kernels.models.dit", "free_kernels.reference.guidance", "guide_output"),
    ("free_kernels.diffusion.guidance", "free_kernels.reference.guidance", "guide_output"),
    ("free_kernels.ops.speculative_accept", "free_kernels.reference.philox", "make_rng_state"),
    ("free_kernels.ops", "free_kernels.ops.draft_transition", "draft_transition"),
    ("free_kernels.ops", "free_kernels.ops.verify_transition", "verify_transition"),
    ("free_kernels", "free_kernels.diffusion", "create_diffusion"),
])
def test_old_and_new_names_are_one_object(old, new, name):
    if "free_kernels.integrations.diffusers" in (old, new):
        pytest.importorskip("diffusers")  # the pipeline module needs the optional extra
    a = getattr(importlib.import_module(old), name)
    b = getattr(importlib.import_module(new), name)
    assert a is b


@pytest.mark.parametrize("script", ["free_kernels.cli.sample", "free_kernels.cli.train_drafter"])
def test_console_script_modules_run(script):
    r = subprocess.run([sys.executable, "-m", script, "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage" in r.stdout.lower()

"""Diffusion schedules and the baseline samplers, with the official DiT semantics."""
from __future__ import annotations

from . import gaussian_diffusion as gd
from .gaussian_diffusion import (  # noqa: F401
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    extract,
    get_named_beta_schedule,
    per_sample_generators,
    randn_like,
)
from .respace import SpacedDiffusion, space_timesteps  # noqa: F401


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
) -> SpacedDiffusion:
    """Build the sampler exactly as the official DiT ``create_diffusion`` does.

    ``timestep_respacing``: "" or None for all ``diffusion_steps``, "250",
    "ddim50", "10,20" or a list of per-section counts.  ``learn_sigma=True``
    gives the learned-range variance; otherwise fixed large (default) or fixed
    small (``sigma_small=True``) variance.
    """
    betas = gd.get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=(gd.ModelMeanType.EPSILON if not predict_xstart else gd.ModelMeanType.START_X),
        model_var_type=(
            (gd.ModelVarType.FIXED_LARGE if not sigma_small else gd.ModelVarType.FIXED_SMALL)
            if not learn_sigma
            else gd.ModelVarType.LEARNED_RANGE
        ),
        loss_type=loss_type,
    )

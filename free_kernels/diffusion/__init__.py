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


def _is_int(v) -> bool:
    import numbers

    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


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

    ``timestep_respacing``: "" or None for all ``diffusion_steps``, "250" (or
    the int 250), "ddim50", "10,20" or a list of per-section counts.  ``learn_sigma=True``
    gives the learned-range variance; otherwise fixed large (default) or fixed
    small (``sigma_small=True``) variance.
    """
    use_timesteps, kwargs = spaced_diffusion_args(
        timestep_respacing, noise_schedule=noise_schedule, use_kl=use_kl, sigma_small=sigma_small,
        predict_xstart=predict_xstart, learn_sigma=learn_sigma, rescale_learned_sigmas=rescale_learned_sigmas,
        diffusion_steps=diffusion_steps)
    return SpacedDiffusion(use_timesteps, **kwargs)


def spaced_diffusion_args(timestep_respacing, noise_schedule="linear", use_kl=False, sigma_small=False,
                          predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False, diffusion_steps=1000):
    """``(use_timesteps, kwargs)`` of the official ``create_diffusion`` (checked), for ``SpacedDiffusion``
    or a subclass of it (the drop-in's ``FreeDiffusion``)."""
    if not _is_int(diffusion_steps) or diffusion_steps < 1:
        raise ValueError(f"diffusion_steps must be an int >= 1, got {diffusion_steps!r}")
    betas = gd.get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    elif not (_is_int(timestep_respacing) or isinstance(timestep_respacing, (str, list, tuple))):
        raise TypeError(f"timestep_respacing must be a step count (int or str such as \"250\" or \"ddim50\"), "
                        f"a comma-separated string or a list of ints; got {type(timestep_respacing).__name__} "
                        f"{timestep_respacing!r}")
    elif _is_int(timestep_respacing):
        timestep_respacing = [int(timestep_respacing)]  # create_diffusion(250) == create_diffusion("250")
    elif isinstance(timestep_respacing, (list, tuple)) and not all(_is_int(c) for c in timestep_respacing):
        raise TypeError(f"timestep_respacing list must hold ints, got {list(timestep_respacing)!r}")
    return space_timesteps(diffusion_steps, timestep_respacing), dict(
        betas=betas,
        model_mean_type=(gd.ModelMeanType.EPSILON if not predict_xstart else gd.ModelMeanType.START_X),
        model_var_type=(
            (gd.ModelVarType.FIXED_LARGE if not sigma_small else gd.ModelVarType.FIXED_SMALL)
            if not learn_sigma
            else gd.ModelVarType.LEARNED_RANGE
        ),
        loss_type=loss_type,
    )

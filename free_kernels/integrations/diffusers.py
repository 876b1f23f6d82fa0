"""``FreeDiTPipeline``: diffusers' ``DiTPipeline`` with FREE speculative sampling.

Same constructor and ``__call__`` as ``diffusers.DiTPipeline`` (``transformer``,
``vae``, ``scheduler``, ``id2label``; ``class_labels, guidance_scale=4.0,
generator=None, num_inference_steps=50, output_type="pil", return_dict=True``),
plus ``drafter``, ``draft_length`` and ``relax`` (constructor defaults,
overridable per call)::

    pipe = FreeDiTPipeline(transformer=..., vae=..., scheduler=..., drafter="frozen", draft_length=6)
    images = pipe(class_labels=[207, 360], num_inference_steps=50).images
    pipe.last_stats            # FreeStats of the last call (None without a drafter)

How it samples, and how that differs from ``DiTPipeline``
    A scheduler's ``step()`` advances every sample by one timestep; FREE
    verifies several timesteps of each sample in one batched transformer call,
    which ``step()`` cannot express.  So the pipeline samples with this
    package's ancestral DDPM sampler (the DiT paper's sampler):
    ``create_diffusion(str(num_inference_steps))`` respacing (evenly spread
    timesteps, 0 and T-1 included), the learned variance when the transformer
    has ``2 * in_channels`` output channels (fixed variance otherwise),
    ``clip_denoised=False``, guidance on all 4 noise channels as diffusers does
    (``guidance_channels=4``; pass 3 for the official DiT rule).

    * ``drafter=None``: the same ancestral sampler without speculation (the
      baseline FREE is exact against);
    * a drafter (``"frozen"``, a path to a saved ``FeatureDrafter``, or a
      drafter module): FREE, whose samples have the baseline's distribution
      (exactly, unless ``relax`` is set).

    The ``scheduler`` component is kept (so the pipeline loads and saves like
    ``DiTPipeline``) and its config defines the noise schedule: it must be a
    linear (1e-4 .. 0.02 at 1000 steps) or ``squaredcos_cap_v2`` schedule
    predicting epsilon; anything else raises.  Its ``step()`` is not used.  The
    betas are computed in float64 as in the official DiT code (diffusers'
    schedulers compute them in float32).  For diffusers' own sampling
    (DDIM, DPM-Solver...) use ``DiTPipeline``.

    The null class is the transformer's ``num_embeds_ada_norm`` (1000 for the
    hub DiTs; ``DiTPipeline`` hard-codes 1000).

Randomness
    ``generator``: one ``torch.Generator`` (or a list of exactly one) on the
    execution device, used for the initial latents and every draw of the
    sampler; ``None`` uses the global RNG.  Samples are equal to the
    baseline's in distribution, not per seed (FREE draws differently).
"""
from __future__ import annotations

import math
from typing import List, Optional, Union

import torch

from ..diffusion import create_diffusion
from ..models.diffusers_adapter import DiffusersDiTTarget  # the model adapter, public here too
from ..models.diffusers_convert import convert_diffusers_to_dit, convert_dit_to_diffusers  # noqa: F401  (public here)
from ..models.drafter import FeatureDrafter, FrozenFeatureDrafter
from ..nvtx import nvtx_range
from ..relax import as_policy

try:
    from diffusers import DiTPipeline
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # pragma: no cover - exercised only without diffusers
    raise ImportError("free_kernels.pipeline needs diffusers (pip install 'free-kernels[diffusers]')") from e

__all__ = ["FreeDiTPipeline", "DiffusersDiTTarget", "convert_diffusers_to_dit", "convert_dit_to_diffusers"]

_UNSET = object()


def _schedule_from_scheduler(config) -> dict:
    """Scheduler config -> create_diffusion kwargs; raises for schedules this sampler cannot reproduce."""
    T = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        raise ValueError("the scheduler has trained_betas: FreeDiTPipeline supports the linear and "
                         "squaredcos_cap_v2 schedules only")
    name = config.get("beta_schedule", "linear")
    if name == "linear":
        scale = 1000 / T
        b0, b1 = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        if not (math.isclose(b0, 1e-4 * scale, rel_tol=1e-6) and math.isclose(b1, 0.02 * scale, rel_tol=1e-6)):
            raise ValueError(f"linear schedule beta_start={b0}, beta_end={b1} at {T} steps differs from the DiT "
                             f"schedule ({1e-4 * scale:g} .. {0.02 * scale:g})")
    elif name != "squaredcos_cap_v2":
        raise ValueError(f"scheduler beta_schedule {name!r} is not supported (use 'linear' or 'squaredcos_cap_v2')")
    pred = config.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "sample"):
        raise ValueError(f"scheduler prediction_type {pred!r} is not supported (epsilon or sample)")
    return dict(noise_schedule=name, diffusion_steps=T, predict_xstart=pred == "sample")


class FreeDiTPipeline(DiTPipeline):
    """``DiTPipeline`` sampling with FREE (module docstring)."""

    def __init__(self, transformer, vae, scheduler, id2label=None, drafter=None, draft_length="auto",
                 relax=None, guidance_channels: int = 4):
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        self.drafter = self._load_drafter(drafter)
        self.draft_length = self._check_length(draft_length)
        self.relax = as_policy(relax)
        if guidance_channels not in (3, 4):
            raise ValueError(f"guidance_channels must be 4 (diffusers) or 3 (official DiT), got {guidance_channels}")
        self.guidance_channels = guidance_channels
        self.last_stats = None

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _check_length(L):
        from ..planner import check_draft_length

        return check_draft_length(L)

    @staticmethod
    def _load_drafter(drafter):
        if isinstance(drafter, str) and drafter != "frozen":
            return FeatureDrafter.load(drafter)
        return drafter

    def _generator(self, generator):
        if isinstance(generator, (list, tuple)):
            if len(generator) != 1:
                raise ValueError("FreeDiTPipeline takes one torch.Generator for the whole batch "
                                 f"(got a list of {len(generator)})")
            generator = generator[0]
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator

    @torch.no_grad()
    def __call__(
        self,
        class_labels: List[int],
        guidance_scale: float = 4.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        num_inference_steps: int = 50,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        drafter=_UNSET,
        draft_length=None,
        relax=_UNSET,
    ):
        """Generate images for ``class_labels``; ``drafter`` / ``draft_length`` / ``relax`` override the
        constructor's for this call.  Returns ``ImagePipelineOutput(images=...)`` or ``(images,)``."""
        from ..sampler import FreeSampler

        drafter = self.drafter if drafter is _UNSET else self._load_drafter(drafter)
        L = self.draft_length if draft_length is None else self._check_length(draft_length)
        relax = self.relax if relax is _UNSET else as_policy(relax)
        generator = self._generator(generator)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        target = DiffusersDiTTarget(self.transformer)
        diffusion = create_diffusion(str(int(num_inference_steps)), learn_sigma=target.learn_sigma,
                                     **_schedule_from_scheduler(self.scheduler.config))
        device = self._execution_device
        B = len(class_labels)
        latents = randn_tensor((B, target.in_channels, target.input_size, target.input_size),
                               generator=generator, device=device, dtype=self.transformer.dtype)
        labels = torch.tensor(class_labels, device=device).reshape(-1)
        if bool((labels < 0).any()) or bool((labels >= target.num_classes).any()):
            raise ValueError(f"class_labels must lie in [0, {target.num_classes}), got {labels.tolist()}")
        cfg = guidance_scale > 1
        progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)

        if drafter is None:
            self.last_stats = None
            if cfg:
                z = torch.cat([latents, latents])
                y = torch.cat([labels, torch.full_like(labels, target.num_classes)])
                kw = dict(y=y, cfg_scale=float(guidance_scale), guidance_channels=self.guidance_channels)
                fn = target.forward_with_cfg
            else:
                z, kw, fn = latents, dict(y=labels), target.forward
            latents = diffusion.p_sample_loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kw,
                                              progress=progress, generator=generator)[:B]
        else:
            if isinstance(drafter, str):  # "frozen"
                drafter = FrozenFeatureDrafter(target)
            elif isinstance(drafter, torch.nn.Module):
                drafter.to(device)
            sampler = FreeSampler(target, drafter, diffusion, draft_length=L, relax=relax, clip_denoised=False)
            latents, self.last_stats = sampler.sample(
                latents, labels, cfg_scale=float(guidance_scale) if cfg else 1.0,
                guidance_channels=self.guidance_channels, generator=generator, progress=progress)

        if output_type == "latent":
            samples = latents
        else:
            with nvtx_range("decode"):
                samples = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            samples = (samples / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    samples = self.numpy_to_pil(samples)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (samples,)
        return ImagePipelineOutput(images=samples)

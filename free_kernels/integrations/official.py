"""Drop-in replacement for the official DiT sampling imports, with FREE behind the same calls.

An official-style sampling script needs one import changed::

    # from diffusion import create_diffusion
    # from download import find_model
    # from models import DiT_models
    from free_kernels.dit import create_diffusion, find_model, DiT_models
    # (free_kernels.dit is this module, free_kernels.integrations.official, under its short public name)

    diffusion = create_diffusion(str(num_steps), drafter="frozen", draft_length=6)
    z = torch.cat([z, z], 0)
    y = torch.cat([y, y_null], 0)
    samples = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                      model_kwargs=dict(y=y, cfg_scale=4.0), device=device)
    samples, _ = samples.chunk(2, dim=0)

What the returned diffusion does
--------------------------------
``create_diffusion`` takes the official arguments plus ``drafter``,
``draft_length`` and ``relax`` and returns a :class:`FreeDiffusion`, a
subclass of this package's ``SpacedDiffusion`` (official semantics).

* ``drafter=None``: nothing changes.  Every method is the baseline's, bit for
  bit (``p_sample_loop`` included).
* with a drafter, ``p_sample_loop`` and ``p_sample_loop_progressive`` run the
  FREE sampler (:class:`free_kernels.FreeSampler`), whose final samples have
  the baseline's distribution (exact unless ``relax`` is set).  All other
  methods (``p_sample``, ``p_mean_variance``, ``ddim_sample_loop``,
  ``training_losses``...) stay the baseline's: FREE speculates ancestral steps
  only, and DDIM with eta = 0 has nothing random to speculate on.

The model argument under FREE
    FREE has to split the network into features and head, so the callable must
    be ``model.forward_with_cfg`` or ``model.forward`` (bound methods, or the
    module itself) of a recognisable DiT:

    * :class:`free_kernels.models.DiT` or :class:`~free_kernels.models.DiffusersDiTTarget`
      (anything with ``forward_features`` / ``forward_head`` / ``embed_tokens`` /
      ``embed_condition``) is used as is;
    * any other module with the official attribute layout (``x_embedder``,
      ``t_embedder``, ``y_embedder``, ``pos_embed``, ``blocks[i]`` with
      ``adaLN_modulation`` / ``attn`` / ``mlp``, ``final_layer``) - e.g. the
      official repository's own ``DiT`` - is wrapped by :class:`OfficialDiTTarget`,
      which evaluates the official forward in the official order.  A fork whose
      ``forward`` departs from that order (feature caching, token pruning) is
      sampled with the standard computation, not with its own forward.

    Anything else raises ``TypeError`` saying what is needed; there is no silent
    slow path.  ``cond_fn`` and ``denoised_fn`` are not supported under FREE
    (``NotImplementedError``); the model must be in ``eval()`` mode (the
    official scripts call it; in train mode DiT drops labels at random).

The doubled CFG batch
    With ``model.forward_with_cfg`` the official scripts pass ``[z; z]`` and
    labels ``[y; null]`` with ``model_kwargs=dict(y=y, cfg_scale=s)``.
    ``forward_with_cfg`` itself only ever reads the first half, so FREE samples
    the first half (B samples, guidance applied inside the sampler exactly as
    ``forward_with_cfg`` applies it; ``guidance_channels`` from ``model_kwargs``,
    else the method's own default: 3 for the official DiT, 4 for the diffusers
    adapter) and returns a tensor of the doubled shape whose BOTH halves hold
    those B samples.  ``samples.chunk(2)`` therefore gives the samples first,
    as in the official scripts.  (In the baseline the second half is an
    auxiliary chain the scripts throw away; it is not reproduced.)  The second
    half of the labels must be the null class ``num_classes``.

``p_sample_loop_progressive`` under FREE
    FREE advances each sample by a variable number of steps per round, so the
    per-step sequence of the baseline does not exist.  The generator yields ONE
    dict, after the whole run: ``{"sample": x_0, "pred_xstart": x_0,
    "free_stats": FreeStats}`` (doubled shape as above).  At respaced index 0
    the step is deterministic and its output is the x0 prediction itself, so
    ``pred_xstart`` of the final step is the sample.  The usual
    ``for out in ...: final = out`` pattern gets the right result.

Statistics of the last FREE run are kept in ``diffusion.last_stats``
(:class:`free_kernels.FreeStats`).

Randomness
    The baseline draws its noise from the global torch RNG (or ``generator=``).
    FREE draws a different number of normals in a different order, so samples
    are equal to the baseline's in distribution, not per seed.
"""
from __future__ import annotations

import inspect
import os
from typing import Tuple

import torch
import torch.nn as nn

from ..diffusion import spaced_diffusion_args
from ..diffusion.respace import SpacedDiffusion
from ..models.diffusers_adapter import DiffusersDiTTarget
from ..models.dit import DiT, DiT_models, create_model, find_model  # noqa: F401  (re-exports)
from ..models.drafter import FeatureDrafter, FrozenFeatureDrafter
from ..models.official_adapter import OfficialDiTTarget, official_layout_problems
from ..models.protocol import follows_target_protocol
from ..planner import check_draft_length
from ..relax import as_policy
from ..sampler import FreeSampler

__all__ = [
    "create_diffusion",
    "FreeDiffusion",
    "OfficialDiTTarget",
    "resolve_target",
    "DiT",
    "DiT_models",
    "find_model",
    "create_model",
]

_FREE_METHODS = ("forward", "forward_with_cfg")


def _describe(obj) -> str:
    if inspect.ismethod(obj):
        return f"method {type(obj.__self__).__name__}.{obj.__func__.__name__}"
    if inspect.isfunction(obj):
        return f"function {obj.__qualname__}"
    return f"{type(obj).__name__} object"


_NEEDS = (
    "pass model.forward_with_cfg or model.forward of a free_kernels DiT, a DiffusersDiTTarget, or a module "
    "with the official DiT layout (x_embedder, t_embedder, y_embedder, pos_embed, blocks[i] with "
    "adaLN_modulation/attn/mlp, final_layer)"
)


def resolve_target(model) -> Tuple[nn.Module, str, int]:
    """``model.forward_with_cfg`` / ``model.forward`` / ``model`` -> (target, method name, default guidance channels).

    Raises ``TypeError`` with what is needed when ``model`` is not a recognisable DiT.
    """
    if inspect.ismethod(model) and isinstance(model.__self__, nn.Module):
        owner, name = model.__self__, model.__func__.__name__
        method = model
    elif isinstance(model, nn.Module):
        owner, name = model, "forward"
        method = model.forward
    else:
        raise TypeError(
            f"FREE (create_diffusion(..., drafter=...)) got {_describe(model)}: it must split the network into "
            f"features and head, so {_NEEDS}. Without a drafter, any callable runs the baseline sampler."
        )
    if name not in _FREE_METHODS:
        raise TypeError(
            f"FREE got {_describe(model)}: only forward_with_cfg (doubled CFG batch) and forward are understood; "
            f"{_NEEDS}."
        )
    if follows_target_protocol(owner):
        target = owner
    else:
        problems = official_layout_problems(owner)
        if problems:
            raise TypeError(
                f"FREE got {_describe(model)}, but {type(owner).__name__} is not a recognisable DiT (it lacks "
                f"{problems}); {_NEEDS}. A diffusers DiTTransformer2DModel must be wrapped: "
                f"free_kernels.models.DiffusersDiTTarget(model)."
            )
        target = OfficialDiTTarget(owner)
    gc = 3
    try:
        p = inspect.signature(method).parameters.get("guidance_channels")
        if p is not None and p.default is not inspect.Parameter.empty:
            gc = int(p.default)
    except (TypeError, ValueError):
        pass
    return target, name, gc


# =====================================================================================
# The diffusion
# =====================================================================================
def _load_drafter(drafter):
    if drafter is None or isinstance(drafter, nn.Module) or (callable(drafter) and not isinstance(drafter, str)):
        return drafter
    if isinstance(drafter, (str, os.PathLike)):
        s = os.fspath(drafter)
        if s == "frozen":
            return "frozen"
        return FeatureDrafter.load(s)
    raise TypeError(f"drafter must be None, 'frozen', a path to a saved FeatureDrafter, or a drafter module; "
                    f"got {type(drafter).__name__}")


class FreeDiffusion(SpacedDiffusion):
    """``SpacedDiffusion`` whose ``p_sample_loop`` runs FREE when a drafter is set (module docstring)."""

    def __init__(self, use_timesteps, *, drafter=None, draft_length="auto", relax=None, **kwargs):
        super().__init__(use_timesteps, **kwargs)
        self.draft_length = check_draft_length(draft_length)
        self.drafter = _load_drafter(drafter)
        self.relax = as_policy(relax)
        self.last_stats = None

    # ------------------------------------------------------------- helpers
    def _drafter_for(self, target, device):
        d = self.drafter
        if isinstance(d, str) and d == "frozen":
            return FrozenFeatureDrafter(target)
        if isinstance(d, nn.Module):
            d.to(device)
        return d

    def _run_free(self, model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress,
                  generator):
        if cond_fn is not None or denoised_fn is not None:
            raise NotImplementedError(
                "FREE does not support cond_fn / denoised_fn (the verifier and the drafts use the plain transition); "
                "create the diffusion without a drafter to use them"
            )
        target, name, default_gc = resolve_target(model)
        inner = target.model if isinstance(target, (OfficialDiTTarget, DiffusersDiTTarget)) else target
        if inner.training:
            raise ValueError("the model is in train() mode (DiT drops labels at random there): call model.eval() "
                             "before sampling, as the official scripts do")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError("under FREE, generator must be one torch.Generator (per-row generators are a "
                            "baseline-only feature)")
        mk = dict(model_kwargs or {})
        if "y" not in mk:
            raise ValueError("model_kwargs must hold the class labels y (model_kwargs=dict(y=y, ...))")
        y = mk.pop("y")
        img, device = self._initial(shape, noise, device)
        if not torch.is_tensor(y) or y.dim() != 1 or y.shape[0] != img.shape[0]:
            raise ValueError(f"model_kwargs['y'] must be a 1-D tensor of {img.shape[0]} labels, "
                             f"got {getattr(y, 'shape', y)}")
        if name == "forward_with_cfg":
            if "cfg_scale" not in mk:
                raise ValueError("forward_with_cfg needs model_kwargs['cfg_scale']")
            cfg_scale = float(mk.pop("cfg_scale"))
            gc = int(mk.pop("guidance_channels", default_gc))
            if img.shape[0] % 2:
                raise ValueError(f"forward_with_cfg expects the doubled batch [z; z] (even size), got {img.shape[0]}")
            B = img.shape[0] // 2
            if bool((y[B:] != int(target.num_classes)).any()):
                raise ValueError(f"the second half of y must be the null class {int(target.num_classes)} "
                                 f"(labels [y; null] as in the official scripts), got {y[B:].tolist()}")
            z, yc = img[:B], y[:B]
        else:
            cfg_scale, gc = 1.0, 3
            z, yc = img, y
        if mk:
            raise TypeError(f"unexpected model_kwargs for FREE with {name}: {sorted(mk)}")
        sampler = FreeSampler(target, self._drafter_for(target, z.device), self, draft_length=self.draft_length,
                              relax=self.relax, clip_denoised=clip_denoised)
        samples, stats = sampler.sample(z, yc.to(z.device), cfg_scale=cfg_scale, guidance_channels=gc,
                                        generator=generator, progress=progress)
        self.last_stats = stats
        if name == "forward_with_cfg":
            samples = torch.cat([samples, samples], dim=0)
        return samples, stats

    def free_sampler(self, model, device=None):
        """The :class:`FreeSampler` this diffusion runs on ``model`` (official, diffusers or our DiT module).

        For callers that want more than the official loop offers, e.g.
        continuous batching with ``free_sampler(model).sample_stream(requests, batch_size)``.
        """
        if self.drafter is None:
            raise ValueError("this diffusion has no drafter: create it with create_diffusion(..., drafter=...)")
        target, _, _ = resolve_target(model)
        inner = target.model if isinstance(target, (OfficialDiTTarget, DiffusersDiTTarget)) else target
        if inner.training:
            raise ValueError("the model is in train() mode (DiT drops labels at random there): call model.eval() "
                             "before sampling, as the official scripts do")
        if device is None:
            device = next(iter(inner.parameters())).device
        return FreeSampler(target, self._drafter_for(target, torch.device(device)), self,
                           draft_length=self.draft_length, relax=self.relax, clip_denoised=False)

    # ------------------------------------------------------------ sampling
    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False, generator=None):
        if self.drafter is None:
            return super().p_sample_loop(model, shape, noise=noise, clip_denoised=clip_denoised,
                                         denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs,
                                         device=device, progress=progress, generator=generator)
        return self._run_free(model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device,
                              progress, generator)[0]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  cond_fn=None, model_kwargs=None, device=None, progress=False, generator=None):
        if self.drafter is None:
            yield from super().p_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                model_kwargs=model_kwargs, device=device, progress=progress, generator=generator)
            return
        samples, stats = self._run_free(model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs,
                                        device, progress, generator)
        yield {"sample": samples, "pred_xstart": samples, "free_stats": stats}


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
    drafter=None,
    draft_length="auto",
    relax=None,
) -> FreeDiffusion:
    """The official ``create_diffusion`` plus ``drafter`` / ``draft_length`` / ``relax``.

    ``drafter``: None (baseline, bit for bit), ``"frozen"`` (training-free
    drafter), a path to a saved :class:`FeatureDrafter` (``.safetensors`` +
    ``.json``), or a drafter module/callable.  ``draft_length``: ``"auto"``
    (the draft planner chooses per round where drafting pays) or a fixed L >= 1.
    ``relax``: None (exact) or an approximate relax strength / :class:`free_kernels.RelaxPolicy`.
    """
    use_timesteps, kwargs = spaced_diffusion_args(
        timestep_respacing, noise_schedule=noise_schedule, use_kl=use_kl, sigma_small=sigma_small,
        predict_xstart=predict_xstart, learn_sigma=learn_sigma, rescale_learned_sigmas=rescale_learned_sigmas,
        diffusion_steps=diffusion_steps,
    )
    return FreeDiffusion(use_timesteps, drafter=drafter, draft_length=draft_length, relax=relax, **kwargs)

"""Gaussian diffusion with the semantics of the official DiT sampler.

Schedules are float64 numpy arrays; per-row constants are gathered with
:func:`extract` (float64 -> index -> float32), exactly the rounding the
official code uses, so that the same model and the same noise give the same
numbers.  Timesteps ``t`` are RESPACED indices (0 .. num_timesteps-1), one per
row, and may differ between rows (FREE verifies several timesteps at once).
"""
from __future__ import annotations

import enum
import math
from typing import Callable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from .._checks import check_finite
from ..reference.draft_epilogue import TABLE_ROWS

GeneratorLike = Union[None, torch.Generator, Sequence[torch.Generator]]


class ModelMeanType(enum.Enum):
    PREVIOUS_X = enum.auto()
    START_X = enum.auto()
    EPSILON = enum.auto()


class ModelVarType(enum.Enum):
    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()
    RESCALED_MSE = enum.auto()
    KL = enum.auto()
    RESCALED_KL = enum.auto()

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


# ----------------------------------------------------------------- schedules
def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """'linear' (1e-4 .. 0.02 scaled to 1000 steps) or 'squaredcos_cap_v2' (cosine)."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ValueError(f"unknown noise_schedule {schedule_name!r}; choose 'linear' or 'squaredcos_cap_v2'")


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta=0.999):
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


def extract(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape) -> torch.Tensor:
    """arr[timesteps] as float32, broadcast to ``broadcast_shape`` (the official rounding)."""
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res + torch.zeros(broadcast_shape, device=timesteps.device)


def randn_like(x: torch.Tensor, generator: GeneratorLike = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``.

    ``generator`` may be None (global RNG, as the official sampler), one
    ``torch.Generator``, or a sequence of one generator per row: then every row
    draws from its own stream, so a sample does not change with batch size or
    its position in the batch.
    """
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ValueError(f"generator: got {len(gens)} per-sample generators for a batch of {x.shape[0]}")
    return torch.stack(
        [torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in gens], dim=0
    )


def per_sample_generators(seeds: Sequence[int], device="cpu") -> List[torch.Generator]:
    """One seeded generator per sample (for :func:`randn_like`'s per-row streams)."""
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    return gens


def mean_flat(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=list(range(1, len(t.shape))))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N1 || N2) elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-likelihood of data in [-1, 1] discretised to 256 bins."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


# ------------------------------------------------------------------ diffusion
class GaussianDiffusion:
    """DDPM utilities: schedule constants, posterior, model transition, samplers, losses."""

    def __init__(self, *, betas, model_mean_type: ModelMeanType, model_var_type: ModelVarType,
                 loss_type: LossType = LossType.MSE):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        self.betas = betas
        if betas.ndim != 1:
            raise ValueError("betas must be 1-D")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the posterior variance is 0 at the chain's start: clip the log with the next value
        if len(self.posterior_variance) > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:
            self.posterior_log_variance_clipped = np.array([np.log(betas[0])])
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # fixed-variance tables: FIXED_LARGE uses betas with the first entry replaced
        fixed_large = np.append(self.posterior_variance[1], betas[1:]) if len(betas) > 1 else betas.copy()
        self._fixed_var = {
            ModelVarType.FIXED_LARGE: (fixed_large, np.log(fixed_large)),
            ModelVarType.FIXED_SMALL: (self.posterior_variance, self.posterior_log_variance_clipped),
        }

    # ------------------------------------------------------------ properties
    @property
    def learned_variance(self) -> bool:
        return self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)

    @property
    def predicts_xstart(self) -> bool:
        """True when the model predicts x0 (``START_X``), False when it predicts the noise."""
        return self.model_mean_type == ModelMeanType.START_X

    # ----------------------------------------------- what the ops are given
    def schedule_tables(self) -> torch.Tensor:
        """(6, T) float32 CPU tensor: the per-index constants of :meth:`transition_from_output`.

        Rows in the order of ``free_kernels.reference.draft_epilogue.TABLE_ROWS`` (the kernels'
        ABI): sqrt(1/abar), sqrt(1/abar - 1), the two posterior-mean coefficients, and the
        log-variance bounds (learned variance: the clipped posterior log-variance and log beta,
        between which the model interpolates; fixed variance: the fixed log-variance, twice).
        Each float64 schedule is rounded to float32 as :func:`extract` rounds it, so a transition
        computed from these tables equals :meth:`transition_from_output` bit for bit.
        """
        if self.learned_variance:
            lo, hi = self.posterior_log_variance_clipped, self.log_betas
        else:
            lo = hi = self._fixed_var[self.model_var_type][1]
        rows = dict(sqrt_recip_alphas_cumprod=self.sqrt_recip_alphas_cumprod,
                    sqrt_recipm1_alphas_cumprod=self.sqrt_recipm1_alphas_cumprod,
                    posterior_mean_coef1=self.posterior_mean_coef1, posterior_mean_coef2=self.posterior_mean_coef2,
                    logvar_min=lo, logvar_max=hi)
        return torch.from_numpy(np.stack([np.asarray(rows[k], dtype=np.float64) for k in TABLE_ROWS])).float()

    def fused_transition_problem(self) -> Optional[str]:
        """Why the fused transition kernels (``draft_epilogue``) cannot compute this diffusion's
        transition, or None when they can (epsilon or x0 prediction; learned-range or fixed variance)."""
        if self.model_mean_type not in (ModelMeanType.EPSILON, ModelMeanType.START_X):
            return f"model_mean_type {self.model_mean_type} is not supported (EPSILON, START_X)"
        if not self.learned_variance and self.model_var_type not in self._fixed_var:
            return f"model_var_type {self.model_var_type} is not supported"
        return None

    # ------------------------------------------------------------- forward q
    def q_mean_variance(self, x_start, t):
        mean = extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = extract(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = extract(self.posterior_variance, t, x_t.shape)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    # --------------------------------------------------------- model output
    def _wrap_model(self, model):
        return model

    def transition_from_output(self, model_output, x, t, clip_denoised=True, denoised_fn=None):
        """Model output -> the reverse transition's mean / variance / log-variance / x0.

        The shared rule of the baseline sampler, the FREE verifier and the
        drafter's head (so all three agree to the last bit on the same output).
        """
        B, C = x.shape[:2]
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape[1] != 2 * C:
                raise ValueError(
                    f"a learned-variance diffusion needs a model output with {2 * C} channels "
                    f"(eps and variance), got {model_output.shape[1]}: build the model with learn_sigma=True "
                    f"or the diffusion with learn_sigma=False"
                )
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            # The official DiT sampler interpolates for LEARNED as well as for
            # LEARNED_RANGE (unlike IDDPM, where LEARNED is a raw log-variance).
            min_log = extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = extract(self.log_betas, t, x.shape)
            frac = (model_var_values + 1) / 2
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if model_output.shape[1] == 2 * C:
                # a learn_sigma model under a fixed-variance sampler: ignore the variance channels
                model_output = model_output[:, :C]
            elif model_output.shape[1] != C:
                raise ValueError(f"model output has {model_output.shape[1]} channels, expected {C}")
            var, logvar = self._fixed_var[self.model_var_type]
            model_variance = extract(var, t, x.shape)
            model_log_variance = extract(logvar, t, x.shape)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            if clip_denoised:
                return x0.clamp(-1, 1)
            return x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        elif self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
        else:
            raise NotImplementedError(f"model_mean_type {self.model_mean_type} is not supported")
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        if model_kwargs is None:
            model_kwargs = {}
        model = self._wrap_model(model)
        model_output = model(x, t, **model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output
        out = self.transition_from_output(model_output, x, t, clip_denoised, denoised_fn)
        out["extra"] = extra
        return out

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        gradient = cond_fn(x, t, **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Score conditioning (Song et al.): shift eps by -sqrt(1 - abar) * cond_fn, re-derive x0 and mean."""
        alpha_bar = extract(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t, **(model_kwargs or {}))
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # ------------------------------------------------------------- ancestral
    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                 generator: GeneratorLike = None):
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        noise = randn_like(x, generator)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _initial(self, shape, noise, device):
        if device is None:
            device = noise.device if noise is not None else "cpu"
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)} but shape is {tuple(shape)}")
            check_finite("noise", noise)
            return noise, device
        if not isinstance(shape, (tuple, list)):
            raise TypeError("shape must be a tuple or list")
        return torch.randn(*shape, device=device), device

    def _indices(self, progress, desc="sampling"):
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc=desc)
        return indices

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False, generator: GeneratorLike = None):
        final = None
        for sample in self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, generator=generator,
        ):
            final = sample
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  cond_fn=None, model_kwargs=None, device=None, progress=False,
                                  generator: GeneratorLike = None) -> Iterator[dict]:
        img, device = self._initial(shape, noise, device)
        for i in self._indices(progress):
            t = torch.tensor([i] * shape[0], device=device)
            with torch.no_grad():
                out = self.p_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                    cond_fn=cond_fn, model_kwargs=model_kwargs, generator=generator)
                yield out
                img = out["sample"]

    # ------------------------------------------------------------------ DDIM
    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                    eta=0.0, generator: GeneratorLike = None):
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = randn_like(x, generator)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0,
                         generator: GeneratorLike = None):
        final = None
        for sample in self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, eta=eta, generator=generator,
        ):
            final = sample
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0,
                                     generator: GeneratorLike = None):
        img, device = self._initial(shape, noise, device)
        for i in self._indices(progress, desc="DDIM sampling"):
            t = torch.tensor([i] * shape[0], device=device)
            with torch.no_grad():
                out = self.ddim_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                       cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta, generator=generator)
                yield out
                img = out["sample"]

    # ---------------------------------------------------------------- losses
    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None, model_output=None):
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        if model_output is None:
            out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        else:
            out = self.transition_from_output(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        output = torch.where((t == 0), decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample losses: MSE on eps (+ the variational bound term for learned variance)."""
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        model = self._wrap_model(model)
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] *= self.num_timesteps
            return terms
        model_output = model(x_t, t, **model_kwargs)
        C = x_t.shape[1]
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            eps_out, var_values = torch.split(model_output, C, dim=1)
            frozen_out = torch.cat([eps_out.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(None, x_start, x_t, t, clip_denoised=False,
                                             model_output=frozen_out)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] *= self.num_timesteps / 1000.0
            model_output = eps_out
        target = {
            ModelMeanType.START_X: x_start,
            ModelMeanType.EPSILON: noise,
        }[self.model_mean_type]
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms.get("vb", 0)
        return terms

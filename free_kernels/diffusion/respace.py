"""Respacing: keep a subset of the training timesteps; the network still sees the original ones."""
from __future__ import annotations

from typing import List, Sequence, Set, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]]) -> Set[int]:
    """Timesteps to keep.

    ``section_counts`` is "ddimN" (the DDIM stride giving exactly N steps), a
    comma-separated string of per-section counts ("250", "10,15,20"), or a list
    of ints.  Within a section the kept steps are evenly spread, first and last
    included, rounded to the nearest integer.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired_count = int(section_counts[len("ddim"):])
            except ValueError:
                raise ValueError(f"timestep_respacing {section_counts!r}: expected 'ddim<N>'") from None
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {desired_count} steps with an integer stride from {num_timesteps}")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep_respacing {section_counts!r}: expected an int, comma-separated ints or 'ddim<N>'"
            ) from None
    section_counts = list(section_counts)
    if not section_counts or any(c < 1 for c in section_counts):
        raise ValueError(f"timestep_respacing needs positive step counts, got {section_counts}")
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: List[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over a subset of the base process's timesteps.

    ``timestep_map[i]`` is the original timestep of respaced index i; models
    are called with it (they were trained on original timesteps).
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map: List[int] = []
        self.original_num_steps = len(kwargs["betas"])
        base = GaussianDiffusion(**kwargs)
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self._map_np = np.array(self.timestep_map, dtype=np.int64)

    def map_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Respaced indices -> original timesteps (same dtype and device as ``t``)."""
        return torch.as_tensor(self._map_np, device=t.device, dtype=t.dtype)[t]

    def condition_mean(self, cond_fn, *args, **kwargs):
        # cond_fn, like the model, sees the ORIGINAL timesteps (official behaviour)
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self)


class _WrappedModel:
    def __init__(self, model, diffusion: SpacedDiffusion):
        self.model = model
        self.diffusion = diffusion

    def __call__(self, x, ts, **kwargs):
        return self.model(x, self.diffusion.map_timesteps(ts), **kwargs)

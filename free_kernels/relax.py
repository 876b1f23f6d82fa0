"""FREE (relax): uncertainty-guided relaxed acceptance.  APPROXIMATE, opt-in.

Acceptance becomes ``u < (p/q)^(1/tau)`` with ``tau = 1 + strength * g``,
``g`` in [0, 1] the target's uncertainty at that transition:

* ``uncertainty="variance"`` (learned-variance targets): the mean, over
  elements, of where the target's predicted log-variance sits between the
  posterior variance (0) and beta (1).  DiT predicts larger variances where
  it is less certain; g is computed from the verified transition p_j, so it
  costs nothing extra.
* ``uncertainty="position"``: g = 1 - i / (num_timesteps - 1), rising to 1 at
  the last steps (for fixed-variance samplers, where there is no predicted
  variance).

``strength = 0`` gives tau = None: the exact rule, bit for bit.  Rejections
still draw from the residual sampler, so relax only changes how often a draft
is accepted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class RelaxPolicy:
    strength: float = 0.0
    uncertainty: str = "auto"  # "auto" | "variance" | "position"

    def __post_init__(self):
        if not isinstance(self.strength, (int, float)) or self.strength < 0 or self.strength != self.strength:
            raise ValueError(f"relax strength must be a finite number >= 0, got {self.strength!r}")
        if self.uncertainty not in ("auto", "variance", "position"):
            raise ValueError(f"relax uncertainty must be 'auto', 'variance' or 'position', got {self.uncertainty!r}")

    @property
    def exact(self) -> bool:
        return self.strength == 0

    def describe(self) -> str:
        return f"FREE (relax, approximate): strength={self.strength}, uncertainty={self.uncertainty}"

    def uncertainty_of(self, diffusion, logvar_p: torch.Tensor, index: torch.Tensor,
                       tables: Optional[torch.Tensor] = None) -> torch.Tensor:
        """g in [0, 1] per (sample, slot); ``logvar_p`` (B, L, D), ``index`` (B, L) respaced indices.

        ``tables``: the diffusion's (6, T) schedule tables already on the device
        (``ops.schedule_tables_on``; built from ``diffusion.schedule_tables()`` when None);
        rows 4 and 5 are the learned range's bounds.  With them nothing is copied from the host
        (CUDA-graph safe).
        """
        mode = self.uncertainty
        if mode == "auto":
            mode = "variance" if diffusion.learned_variance else "position"
        if mode == "variance":
            if not diffusion.learned_variance:
                raise ValueError("relax uncertainty='variance' needs a learned-variance diffusion")
            idx = index.clamp(min=0)
            if tables is None:
                tables = diffusion.schedule_tables().to(idx.device)
            lo, hi = tables[4][idx], tables[5][idx]
            span = (hi - lo).clamp_min(1e-12)
            g = (logvar_p.float().mean(-1) - lo) / span
        else:
            n = max(diffusion.num_timesteps - 1, 1)
            g = 1.0 - index.float() / n
        return g.clamp(0.0, 1.0)

    def tau(self, diffusion, logvar_p: torch.Tensor, index: torch.Tensor,
            tables: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        if self.exact:
            return None
        return 1.0 + self.strength * self.uncertainty_of(diffusion, logvar_p, index, tables)


def as_policy(relax) -> Optional[RelaxPolicy]:
    """None / a number (strength) / a RelaxPolicy -> RelaxPolicy or None."""
    if relax is None:
        return None
    if isinstance(relax, RelaxPolicy):
        return relax
    if isinstance(relax, (int, float)):
        return RelaxPolicy(strength=float(relax))
    raise TypeError(f"relax must be None, a strength (float) or a RelaxPolicy, got {type(relax).__name__}")

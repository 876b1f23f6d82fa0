"""Dispatch point: FREE's exact acceptance + residual resampling for a whole round.

See :mod:`free_kernels.reference.speculative_accept` for the rule, shapes and
randomness.  Kernel backends (Triton / CUDA) take their randomness from a
counter-based generator ``(seed, offset)``; the torch reference from the
caller's ``torch.Generator``.

Bytes (for benchmarks), B samples, L drafts, D elements, fp32:
reads mean_q, logvar_q, noise_q (3 B L D) + mean_p, logvar_p (2 B (L+1) D),
writes out (B D): 4 * (5 L + 3) * B * D bytes when every draft is inspected.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_finite, check_tensor
from ._dispatch import Backend, get_op

OP = get_op("speculative_accept")


def _load_torch():
    from ..reference.speculative_accept import speculative_accept as f

    return f


OP.register(Backend("torch", _load_torch))


def bytes_moved(B: int, L: int, D: int, elem: int = 4) -> int:
    return elem * (3 * B * L * D + 2 * B * (L + 1) * D + B * D)


def speculative_accept(mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts, deterministic_last, *,
                       equal_variance: bool, uniforms=None, bonus_noise=None, residual_noise=None,
                       residual_uniforms=None, tau=None, generator: Optional[torch.Generator] = None,
                       out=None, backend: Optional[str] = None, **kw):
    """Accept/reject a round of drafts for every sample; returns an ``AcceptResult``."""
    check_tensor("mean_p", mean_p, dim=3, floating=True)
    B, L1, D = mean_p.shape
    L = L1 - 1
    if L < 0:
        raise ValueError("mean_p needs at least one transition (L + 1 >= 1)")
    dev = mean_p.device
    check_tensor("logvar_p", logvar_p, shape=(B, L1, D), device=dev)
    for name, t in (("mean_q", mean_q), ("logvar_q", logvar_q), ("noise_q", noise_q)):
        check_tensor(name, t, shape=(B, L, D), device=dev, floating=True)
    check_tensor("num_drafts", num_drafts, shape=(B,), floating=False, device=dev)
    check_tensor("deterministic_last", deterministic_last, shape=(B,), device=dev)
    if uniforms is not None:
        check_tensor("uniforms", uniforms, shape=(B, L), device=dev, floating=True)
    if bonus_noise is not None:
        check_tensor("bonus_noise", bonus_noise, shape=(B, D), device=dev, floating=True)
    if residual_noise is not None or residual_uniforms is not None:
        if residual_noise is None or residual_uniforms is None:
            raise ValueError("residual_noise and residual_uniforms must be given together")
        check_tensor("residual_noise", residual_noise, dim=3, device=dev, floating=True)
        K = residual_noise.shape[1]
        check_tensor("residual_noise", residual_noise, shape=(B, K, D))
        check_tensor("residual_uniforms", residual_uniforms, shape=(B, K), device=dev, floating=True)
    if tau is not None:
        check_tensor("tau", tau, shape=(B, L), device=dev, floating=True)
    if out is not None:
        check_tensor("out", out, shape=(B, D), dtype=mean_p.dtype, device=dev)
    if not mean_p.is_cuda:
        # kernels propagate NaN into `out`; the CPU path refuses it outright
        for name, t in (("mean_p", mean_p), ("logvar_p", logvar_p), ("mean_q", mean_q),
                        ("logvar_q", logvar_q), ("noise_q", noise_q)):
            check_finite(name, t)
        nd = num_drafts
        if bool((nd < 0).any()) or bool((nd > L).any()):
            raise ValueError(f"num_drafts must lie in [0, {L}], got {nd.tolist()}")
    ctx = dict(device=dev, dtype=mean_p.dtype, equal_variance=equal_variance, given_randomness=uniforms is not None)
    impl = OP.resolve(ctx, backend).impl()
    return impl(mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts, deterministic_last,
                equal_variance=equal_variance, uniforms=uniforms, bonus_noise=bonus_noise,
                residual_noise=residual_noise, residual_uniforms=residual_uniforms, tau=tau,
                generator=generator, out=out, **kw)

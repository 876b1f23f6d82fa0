"""Philox4x32-10 in plain PyTorch: per-row keyed random numbers on any device.

The same bijection as ``csrc/include/free_kernels/philox.h`` (and Triton's
``tl.philox``), evaluated with int64 tensor arithmetic, so that every row of a
batch can have its own key: ``keyed_normal(keys, streams, tag, n)`` gives row
``b`` the numbers of the counter-based stream ``(keys[b], streams[b], tag)``,
which depend on nothing else: not on the row's position in the batch, not on
its neighbours, not on how many numbers other rows drew.  That is what the
FREE sampler needs for per-sample reproducibility under continuous batching.

Counter layout for element block ``j`` of a draw: ``(j, tag, lo32(stream),
hi32(stream))`` under key ``(lo32(key), hi32(key))``; that is
``philox_randint4x(seed=key, offset=j + tag * 2**32, subsequence=stream)`` of
the C++ header (tests check the integers against ``free_kernels._C``).

Conversions are chosen for exactness rather than speed: uniforms take 53 bits
from two words, in (0, 1]; normals are Box-Muller in float64 on those
uniforms (|z| is bounded only by ~8.6, a tail mass below 1e-17).

All ops are elementwise on device tensors: no host synchronisation, safe in
CUDA-graph capture and traceable by ``torch.compile``.

``make_rng_state`` makes the kernels' own counter-based state, an int64
``[seed, offset]`` tensor (``ops.speculative_accept``, ``ops.draft_epilogue``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

_M32 = 0xFFFFFFFF
_MUL0 = 0xD2511F53
_MUL1 = 0xCD9E8D57
_WEYL0 = 0x9E3779B9
_WEYL1 = 0xBB67AE85
_TWO_PI = 2.0 * math.pi


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 rounds on int64 tensors holding uint32 values (broadcastable); returns four int64 tensors.

    The 32x32-bit products are formed in int64 arithmetic (which wraps modulo
    2**64, so the 64-bit pattern of the unsigned product is exact) and split
    into high and low words with shifts and masks.
    """
    for _ in range(rounds):
        p0 = c0 * _MUL0
        p1 = c2 * _MUL1
        hi0 = (p0 >> 32) & _M32
        lo0 = p0 & _M32
        hi1 = (p1 >> 32) & _M32
        lo1 = p1 & _M32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _WEYL0) & _M32
        k1 = (k1 + _WEYL1) & _M32
    return c0, c1, c2, c3


def _words(keys: torch.Tensor, streams: torch.Tensor, tag, blocks: int):
    """Four (R, blocks) uint32-valued int64 word tensors for element blocks 0..blocks-1 of each row.

    ``tag`` is an int, or a list of (tag, blocks) parts laid side by side
    (each part's blocks numbered from 0): one Philox pass for several streams.
    """
    keys = keys.to(torch.int64)
    streams = streams.to(torch.int64)
    dev = keys.device
    if isinstance(tag, int):
        j = torch.arange(blocks, device=dev, dtype=torch.int64)[None, :]
        c1 = torch.full_like(j, int(tag) & _M32)
    else:
        j = torch.cat([torch.arange(b, device=dev, dtype=torch.int64) for _, b in tag])[None, :]
        c1 = torch.cat([torch.full((b,), int(t) & _M32, device=dev, dtype=torch.int64) for t, b in tag])[None, :]
    k0 = (keys & _M32)[:, None]
    k1 = ((keys >> 32) & _M32)[:, None]
    s0 = (streams & _M32)[:, None]
    s1 = ((streams >> 32) & _M32)[:, None]
    return philox4x32(j, c1, s0, s1, k0, k1)


def randint4x(keys: torch.Tensor, streams: torch.Tensor, tag: int, blocks: int) -> torch.Tensor:
    """(R, blocks, 4) int64 raw words (each in [0, 2**32)) of the rows' streams."""
    return torch.stack(_words(keys, streams, tag, blocks), dim=-1)


def _unit53(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Two 32-bit words -> float64 uniform in (0, 1] with 53 random bits."""
    k = ((hi >> 11) << 32) | lo  # 21 + 32 = 53 bits
    return (k.to(torch.float64) + 1.0) * 2.0 ** -53


def keyed_uniform(keys: torch.Tensor, streams: torch.Tensor, tag: int, n: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(R, n) uniforms in (0, 1] (never 0: safe inside ``log``); row b from stream (keys[b], streams[b], tag)."""
    blocks = (n + 1) // 2
    w0, w1, w2, w3 = _words(keys, streams, tag, blocks)
    u = torch.stack([_unit53(w0, w1), _unit53(w2, w3)], dim=-1).reshape(keys.shape[0], 2 * blocks)
    return u[:, :n].to(dtype)


def keyed_normal(keys: torch.Tensor, streams: torch.Tensor, tag: int, n: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(R, n) standard normals (Box-Muller in float64); row b from stream (keys[b], streams[b], tag)."""
    blocks = (n + 1) // 2
    w0, w1, w2, w3 = _words(keys, streams, tag, blocks)
    u1 = _unit53(w0, w1)
    u2 = _unit53(w2, w3)
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = _TWO_PI * u2
    z = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=-1).reshape(keys.shape[0], 2 * blocks)
    return z[:, :n].to(dtype)


def keyed_parts(keys: torch.Tensor, streams: torch.Tensor, parts, normal: bool,
                dtype: torch.dtype = torch.float32):
    """Several keyed draws in one Philox pass: ``parts`` = [(tag, n), ...] -> [(R, n) tensors].

    Part (tag, n) equals ``keyed_normal(keys, streams, tag, n)`` (``normal``)
    or ``keyed_uniform(...)``; parts with n = 0 give empty tensors.
    """
    R = keys.shape[0]
    blocks = [((n + 1) // 2) for _, n in parts]
    if sum(blocks) == 0:
        return [torch.empty(R, 0, device=keys.device, dtype=dtype) for _ in parts]
    w0, w1, w2, w3 = _words(keys, streams, [(t, b) for (t, _), b in zip(parts, blocks)], 0)
    u1, u2 = _unit53(w0, w1), _unit53(w2, w3)
    if normal:
        r = torch.sqrt(-2.0 * torch.log(u1))
        theta = _TWO_PI * u2
        a, b = r * torch.cos(theta), r * torch.sin(theta)
    else:
        a, b = u1, u2
    out, start = [], 0
    for (_, n), nb in zip(parts, blocks):
        seg = torch.stack([a[:, start:start + nb], b[:, start:start + nb]], dim=-1).reshape(R, 2 * nb)
        out.append(seg[:, :n].to(dtype))
        start += nb
    return out


def make_rng_state(device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A fresh ``[seed, 0]`` int64 tensor on ``device``, the seed drawn from ``generator``.

    The draw stays on the device when the generator lives there (no host sync).
    """
    device = torch.device(device)
    gdev = generator.device if generator is not None else device
    seed = torch.randint(0, 2 ** 62, (1,), generator=generator, device=gdev, dtype=torch.int64)
    if seed.device != device:
        seed = seed.to(device)
    return torch.cat([seed, torch.zeros(1, dtype=torch.int64, device=device)])

"""Independent float64 oracles for the foundation tests.

Written from the formulas stated in docs/official-behaviour.md only (not from
the package code): the linear schedule, respacing, ONE reverse step of the ancestral
(learned-range / fixed-large / fixed-small variance) and DDIM samplers, and a
plain forward pass of a DiT from its state dict.  Everything is float64 and
deliberately unoptimised so that it is easy to check by eye.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np
import torch

F64 = torch.float64


# ------------------------------------------------------------------ schedules
def linear_betas(num_steps: int = 1000) -> np.ndarray:
    """beta_k = 1e-4 + (0.02 - 1e-4) * k / (T - 1), rescaled by 1000 / T as the linear schedule is."""
    s = 1000.0 / num_steps
    lo, hi = s * 1e-4, s * 0.02
    return np.array([lo + (hi - lo) * k / (num_steps - 1) for k in range(num_steps)], dtype=np.float64)


def section_steps(num_steps: int, counts: Sequence[int]) -> List[int]:
    """The section rounding rule, spelled out.

    The T steps are cut into len(counts) sections (the first T % len(counts)
    one step longer).  In a section of `size` steps keeping n, a float position
    starts at 0.0 and grows by the stride (size - 1) / (n - 1) (1 when n == 1)
    after each kept step; the kept step is section start + Python round(position)
    (half to even).  The position is a running float sum, not k * stride: at
    exact .5 ties (e.g. 25 steps: 4 * 41.625 = 166.5) the sum's last-bit error
    decides, and that is the behaviour samplers in the wild reproduce.
    """
    out = []
    n_sec = len(counts)
    start = 0
    for i, n in enumerate(counts):
        size = num_steps // n_sec + (1 if i < num_steps % n_sec else 0)
        stride = 1.0 if n <= 1 else (size - 1) / (n - 1)
        pos = 0.0
        for _ in range(n):
            out.append(start + round(pos))
            pos += stride
        start += size
    return sorted(set(out))


class Schedule:
    """Respaced schedule: the kept original timesteps and every derived constant, float64."""

    def __init__(self, kept: Sequence[int], num_steps: int = 1000):
        base = linear_betas(num_steps)
        abar_full = np.cumprod(1.0 - base)
        self.timestep_map = [int(k) for k in sorted(kept)]
        abar = abar_full[self.timestep_map]
        abar_before = np.concatenate([[1.0], abar[:-1]])
        self.betas = 1.0 - abar / abar_before          # beta'_i
        self.abar = abar                              # alpha-bar at respaced index i
        self.abar_prev = abar_before                  # alpha-bar at i - 1 (1 for i = 0)
        self.n = len(self.betas)
        # posterior q(x_{i-1} | x_i, x0) variance, and its log with index 0 replaced by index 1
        self.post_var = self.betas * (1.0 - self.abar_prev) / (1.0 - self.abar)
        clipped = self.post_var.copy()
        if self.n > 1:
            clipped[0] = self.post_var[1]
        self.post_logvar_clipped = np.log(clipped)
        # "fixed large": beta'_i, but at i = 0 the posterior variance of index 1
        large = self.betas.copy()
        if self.n > 1:
            large[0] = self.post_var[1]
        self.fixed_large_var = large


def _col(v, idx: Sequence[int], ndim: int, fp32: bool) -> torch.Tensor:
    """Per-row constant v[idx] as a float64 column broadcastable to a (B, ...) tensor.

    With ``fp32`` the gathered value is first rounded to float32: the official
    sampler keeps its constant tables in float64 and rounds each gathered
    per-row constant to float32 before using it.  That rounding is observable
    (e.g. 1 - abar_prev near the end of the chain), so the oracle can apply it
    at the same places: each named coefficient below is one such table.
    """
    vals = [float(v[i]) for i in idx]
    col = torch.tensor(vals, dtype=torch.float32 if fp32 else F64).to(F64)
    return col.view(-1, *([1] * (ndim - 1)))


def _keep_mask(idx, ndim):
    """1 for rows with i > 0, 0 for i = 0 (the last step adds no noise)."""
    return torch.tensor([0.0 if i == 0 else 1.0 for i in idx], dtype=F64).view(-1, *([1] * (ndim - 1)))


def _x0_from_eps(sched, x, eps, idx, nd, fp32):
    """x0 = (x - sqrt(1 - abar) eps) / sqrt(abar), written as sqrt(1/abar) x - sqrt(1/abar - 1) eps."""
    c_x = _col(np.sqrt(1.0 / sched.abar), idx, nd, fp32)
    c_e = _col(np.sqrt(1.0 / sched.abar - 1.0), idx, nd, fp32)
    return c_x * x - c_e * eps


# ------------------------------------------------------------ one reverse step
def reverse_step(sched: Schedule, x, model_out, idx, *, var_type="learned_range", clip=False, noise=None,
                 fp32_constants=True):
    """One ancestral step x_i -> x_{i-1}, each row at its own respaced index ``idx[b]``.

    var_type: "learned_range" (model_out has 2C channels: eps, v), "fixed_large", "fixed_small".
    Returns dict(x0, x0_terms, mean, var, log_var, sample) in float64; the sample uses
    exp(log_var / 2); x0_terms = sqrt(1/abar)|x| + sqrt(1/abar - 1)|eps| bounds the cancellation in x0.
    """
    x = x.to(F64)
    out = model_out.to(F64)
    C = x.shape[1]
    nd = x.dim()
    r = fp32_constants
    eps = out[:, :C]
    x0 = _x0_from_eps(sched, x, eps, idx, nd, r)
    # size of the two terms x0 is the difference of (what its floating-point error scales with)
    x0_terms = _col(np.sqrt(1.0 / sched.abar), idx, nd, r) * x.abs() + _col(
        np.sqrt(1.0 / sched.abar - 1.0), idx, nd, r) * eps.abs()
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    # posterior mean of q(x_{i-1} | x_i, x0)
    a, a_prev, beta = sched.abar, sched.abar_prev, sched.betas
    coef_x0 = _col(beta * np.sqrt(a_prev) / (1.0 - a), idx, nd, r)
    coef_xt = _col((1.0 - a_prev) * np.sqrt(1.0 - beta) / (1.0 - a), idx, nd, r)
    mean = coef_x0 * x0 + coef_xt * x
    if var_type == "learned_range":
        assert out.shape[1] == 2 * C
        f = (out[:, C:] + 1.0) / 2.0
        log_var = f * _col(np.log(beta), idx, nd, r) + (1.0 - f) * _col(sched.post_logvar_clipped, idx, nd, r)
        var = torch.exp(log_var)
    elif var_type == "fixed_large":
        var = _col(sched.fixed_large_var, idx, nd, r).expand_as(x)
        log_var = _col(np.log(sched.fixed_large_var), idx, nd, r).expand_as(x)
    elif var_type == "fixed_small":
        # the variance itself is NOT clipped: it is exactly 0 at i = 0 (only its log is clipped)
        var = _col(sched.post_var, idx, nd, r).expand_as(x)
        log_var = _col(sched.post_logvar_clipped, idx, nd, r).expand_as(x)
    else:
        raise ValueError(var_type)
    sample = mean
    if noise is not None:
        sample = mean + _keep_mask(idx, nd) * torch.exp(0.5 * log_var) * noise.to(F64)
    return {"x0": x0, "x0_terms": x0_terms, "mean": mean, "var": var, "log_var": log_var, "sample": sample}


def ddim_step(sched: Schedule, x, model_out, idx, *, eta=0.0, clip=False, noise=None, fp32_constants=True):
    """One DDIM step (eq. 12 of Song et al.); the learned variance channels are ignored."""
    x = x.to(F64)
    C = x.shape[1]
    nd = x.dim()
    r = fp32_constants
    eps = model_out.to(F64)[:, :C]
    x0 = _x0_from_eps(sched, x, eps, idx, nd, r)
    x0_terms = _col(np.sqrt(1.0 / sched.abar), idx, nd, r) * x.abs() + _col(
        np.sqrt(1.0 / sched.abar - 1.0), idx, nd, r) * eps.abs()
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    # eps re-derived from the (possibly clipped) x0: (x / sqrt(abar) - x0) / sqrt(1/abar - 1)
    eps_hat = (_col(np.sqrt(1.0 / sched.abar), idx, nd, r) * x - x0) / _col(np.sqrt(1.0 / sched.abar - 1.0), idx,
                                                                           nd, r)
    a = _col(sched.abar, idx, nd, r)
    a_prev = _col(sched.abar_prev, idx, nd, r)
    if r:
        # The official sampler evaluates these per-row coefficients in fp32.  Near the end
        # of a fine chain (1000 steps, eta = 1) 1 - abar_prev - sigma^2 cancels to ~3e-5 and
        # fp32's rounding of 1 - abar / abar_prev shows at the 1e-4 level, so evaluate them
        # in fp32 here too (same formula; only the precision is matched).
        a, a_prev = a.float(), a_prev.float()
    sigma = eta * torch.sqrt((1.0 - a_prev) / (1.0 - a)) * torch.sqrt(1.0 - a / a_prev)
    coef_eps = torch.sqrt(1.0 - a_prev - sigma ** 2)
    coef_x0 = torch.sqrt(a_prev)
    a, a_prev, sigma, coef_eps, coef_x0 = (v.to(F64) for v in (a, a_prev, sigma, coef_eps, coef_x0))
    sample = coef_x0 * x0 + coef_eps * eps_hat
    if noise is not None:
        sample = sample + _keep_mask(idx, nd) * sigma * noise.to(F64)
    return {"x0": x0, "x0_terms": x0_terms, "sample": sample, "sigma": sigma}


# ------------------------------------------------------------- DiT forward
def timestep_sinusoid(t, dim: int = 256) -> torch.Tensor:
    """[cos(t f_k) | sin(t f_k)], f_k = 10000^(-k / (dim/2)), float64."""
    half = dim // 2
    f = torch.tensor([10000.0 ** (-k / half) for k in range(half)], dtype=F64)
    arg = torch.as_tensor(t, dtype=F64)[:, None] * f[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def sincos_2d(hidden: int, grid: int) -> torch.Tensor:
    """(grid*grid, hidden) table; token n = r * grid + c.

    First hidden/2 channels: [sin(c w_k) | cos(c w_k)] of the COLUMN index c;
    last hidden/2: the same of the ROW index r; w_k = 10000^(-k / (hidden/4)).
    """
    q = hidden // 4
    w = torch.tensor([10000.0 ** (-k / q) for k in range(q)], dtype=F64)
    rows = []
    for r in range(grid):
        for c in range(grid):
            rows.append(torch.cat([torch.sin(c * w), torch.cos(c * w), torch.sin(r * w), torch.cos(r * w)]))
    return torch.stack(rows)


def _ln(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _silu(x):
    return x / (1.0 + torch.exp(-x))


def _lin(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def dit_forward(sd: Dict[str, torch.Tensor], x, t, y, *, patch: int, heads: int, depth: int) -> torch.Tensor:
    """Plain float64 DiT forward from an official-layout state dict (docs/official-behaviour.md, 'Model forward')."""
    sd = {k: v.detach().to(F64) for k, v in sd.items()}
    x = x.to(F64)
    B, C, S, _ = x.shape
    p = patch
    G = S // p
    H = sd["pos_embed"].shape[-1]
    hd = H // heads
    # patchify: token (r, c) holds pixels [C, r*p:(r+1)*p, c*p:(c+1)*p], flattened (C, a, b)
    patches = x.reshape(B, C, G, p, G, p).permute(0, 2, 4, 1, 3, 5).reshape(B, G * G, C * p * p)
    h = patches @ sd["x_embedder.proj.weight"].reshape(H, -1).T + sd["x_embedder.proj.bias"]
    h = h + sd["pos_embed"]
    te = timestep_sinusoid(t, 256)
    te = _lin(sd, "t_embedder.mlp.2", _silu(_lin(sd, "t_embedder.mlp.0", te)))
    c = te + sd["y_embedder.embedding_table.weight"][y]
    for i in range(depth):
        pre = f"blocks.{i}."
        mod = _lin(sd, pre + "adaLN_modulation.1", _silu(c))
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = [mod[:, k * H:(k + 1) * H][:, None, :] for k in range(6)]
        a_in = _ln(h) * (1 + sc_a) + sh_a
        qkv = _lin(sd, pre + "attn.qkv", a_in)
        q, k, v = qkv[..., :H], qkv[..., H:2 * H], qkv[..., 2 * H:]
        outs = []
        for j in range(heads):
            sl = slice(j * hd, (j + 1) * hd)
            w = (q[..., sl] @ k[..., sl].transpose(1, 2)) / math.sqrt(hd)
            w = torch.exp(w - w.max(-1, keepdim=True).values)
            w = w / w.sum(-1, keepdim=True)
            outs.append(w @ v[..., sl])
        att = _lin(sd, pre + "attn.proj", torch.cat(outs, dim=-1))
        h = h + g_a * att
        m_in = _ln(h) * (1 + sc_m) + sh_m
        mlp = _lin(sd, pre + "mlp.fc2", _gelu_tanh(_lin(sd, pre + "mlp.fc1", m_in)))
        h = h + g_m * mlp
    mod = _lin(sd, "final_layer.adaLN_modulation.1", _silu(c))
    sh, sc = mod[:, None, :H], mod[:, None, H:]
    tok = _lin(sd, "final_layer.linear", _ln(h) * (1 + sc) + sh)          # (B, N, p*p*Cout), order (a, b, ch)
    Cout = tok.shape[-1] // (p * p)
    out = torch.empty(B, Cout, S, S, dtype=F64)
    for r in range(G):
        for cc in range(G):
            blk = tok[:, r * G + cc].reshape(B, p, p, Cout)              # (a, b, ch)
            out[:, :, r * p:(r + 1) * p, cc * p:(cc + 1) * p] = blk.permute(0, 3, 1, 2)
    return out


def expected_dit_keys(depth: int, hidden: int, patch: int, *, in_ch: int = 4, out_ch: int = 8,
                      num_classes: int = 1000, tokens: int = 256, null_row: bool = True) -> Dict[str, tuple]:
    """The official checkpoint's key -> shape table (docs/official-behaviour.md, 'Checkpoint keys')."""
    H = hidden
    p = patch
    table = {
        "pos_embed": (1, tokens, H),
        "x_embedder.proj.weight": (H, in_ch, p, p),
        "x_embedder.proj.bias": (H,),
        "t_embedder.mlp.0.weight": (H, 256),
        "t_embedder.mlp.0.bias": (H,),
        "t_embedder.mlp.2.weight": (H, H),
        "t_embedder.mlp.2.bias": (H,),
        "y_embedder.embedding_table.weight": (num_classes + (1 if null_row else 0), H),
        "final_layer.linear.weight": (p * p * out_ch, H),
        "final_layer.linear.bias": (p * p * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * H, H),
        "final_layer.adaLN_modulation.1.bias": (2 * H,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        table.update({
            b + "attn.qkv.weight": (3 * H, H), b + "attn.qkv.bias": (3 * H,),
            b + "attn.proj.weight": (H, H), b + "attn.proj.bias": (H,),
            b + "mlp.fc1.weight": (4 * H, H), b + "mlp.fc1.bias": (4 * H,),
            b + "mlp.fc2.weight": (H, 4 * H), b + "mlp.fc2.bias": (H,),
            b + "adaLN_modulation.1.weight": (6 * H, H), b + "adaLN_modulation.1.bias": (6 * H,),
        })
    return table

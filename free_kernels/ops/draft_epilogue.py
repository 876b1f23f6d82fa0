"""Dispatch point: the draft-step epilogue with a tensor-only signature.

``draft_epilogue(h, shift, scale, weight, bias, x, tables, index, noise=None, *,
patch_size, cfg_scale=1.0, guidance_channels=3, learned_variance, predict_xstart=False,
clip_denoised=False, eps=1e-6, rng_state=None, out=None, noise_out=None, backend=None)``

drafted features h (G*R, N, H) (G = 2 under CFG: rows [cond; uncond]) ->
(x_next, mean, logvar), each (R, C, S, S): head LayerNorm + modulate (shift /
scale (G*R, H), the final layer's adaLN of c, computed by the caller), the
final linear (weight (p*p*C_out, H), bias), unpatchify, guidance, the DDPM
transition at the rows' respaced ``index`` (R,) int64 from ``tables`` (6, T)
float32 (``GaussianDiffusion.schedule_tables()``, rows in the order of
``reference.draft_epilogue.TABLE_ROWS``), and
``x_next = mean + exp(logvar / 2) * noise``.

Randomness: ``noise`` (R, C, S, S), or ``rng_state`` (int64 [seed, offset] on
the device): the kernels draw ``philox_randn(seed, offset + flat index)`` and
advance ``rng_state[1]`` by R*C*S*S on the device, so a captured CUDA graph
draws fresh noise per replay.  ``noise_out`` receives the noise used (the
acceptance step needs it).  Outputs are float32; ``out`` = (x_next, mean,
logvar) buffers (any strides) are written in place.

Backends: ``cuda`` (csrc/kernels/draft_epilogue.cu) -> ``triton``
(free_kernels/triton/draft_epilogue.py) -> ``torch``
(free_kernels/reference/draft_epilogue.py, = the composition of
reference/draft_transition.py) on CUDA tensors; ``cpu``
(csrc/kernels/draft_epilogue_host.cpp: the kernel's computation in one
single-threaded host call, float32) -> ``torch`` on CPU tensors; past
:data:`CPU_MAX_WORK` multiply-adds ``torch`` goes first.  ``ops.draft_transition`` and
``ops.verify_transition`` (draft_transition.py, verify_transition.py) are the
module-level entries that gather these tensors from a target and a diffusion.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_tensor
from ..reference.draft_epilogue import NUM_TABLES
from . import _abi, _fused, _library
from ._dispatch import Backend, get_op, host_kernel_reason, size_class

OP = get_op("draft_epilogue")
INFO_CTX = dict(H=1152, P=32, patch_size=2, C=4, M=512, PE=16)  # DiT-XL/2, batch 1 with CFG
# shape class of the measured priority table: feature rows M = G * R * N per call
SMALL_ROWS = 2048
OP.shape_class = lambda ctx: size_class(ctx["M"], SMALL_ROWS)
MAX_PATCH_COLUMNS = 1024  # p*p*C eps columns per token (kernel tile width)
# the cuda kernel stages its 16 modulated feature rows in shared memory: 16 * (H + 24) * elem bytes
# must fit the opt-in limit of every supported device (A100: 163 KiB)
CUDA_MAX_H = {torch.float32: 2048, torch.float16: 4096, torch.bfloat16: 4096}


def _load_torch():
    from ..reference.draft_epilogue import draft_epilogue as f

    return f


def _load_triton():
    from ..triton.draft_epilogue import draft_epilogue as f

    return f


def _load_cuda():
    from .. import _env

    ext = _env.extension()

    def draft_epilogue_cuda(h, shift, scale, weight, bias, x, tables, index, noise=None, *, patch_size,
                            cfg_scale=1.0, guidance_channels=3, learned_variance, predict_xstart=False,
                            clip_denoised=False, eps=1e-6, rng_state=None, out=None, noise_out=None):
        res, args, _index = _kernel_args(h, shift, scale, weight, bias, x, tables, index, noise, rng_state, out,
                                         noise_out, patch_size)
        with _fused.on_device(x):
            ext.draft_epilogue(*args, float(eps), float(cfg_scale), int(guidance_channels), bool(learned_variance),
                               bool(predict_xstart), bool(clip_denoised), _fused.stream_of(x))
        return res

    return draft_epilogue_cuda


def _kernel_args(h, shift, scale, weight, bias, x, tables, index, noise, rng_state, out, noise_out, patch_size):
    """(outputs, the pointer / stride / dtype / size arguments shared by ``draft_epilogue`` and
    ``draft_epilogue_host`` up to ``table_stride``, the contiguous index they point to), outputs allocated
    when ``out`` is None.  The kernels read ``index[r]`` and the sampler passes a column of its (B, L + 1)
    index table, so a strided index is copied; the caller keeps the returned index alive across the call."""
    R, C, S, _ = x.shape
    index = index.contiguous()
    if out is None:
        out = tuple(torch.empty(x.shape, dtype=torch.float32, device=x.device) for _ in range(3))
    x_next, mean, logvar = out
    if noise is None and rng_state is None:
        raise ValueError("draft_epilogue: pass noise or rng_state")
    z = noise if noise is not None else x
    zo = noise_out if noise_out is not None else x_next
    code = _abi.dtype_code
    args = [h.data_ptr(), shift.data_ptr(), scale.data_ptr(), weight.data_ptr(), bias.data_ptr(),
            x.data_ptr(), tables.data_ptr(), index.data_ptr(),
            0 if noise is None else noise.data_ptr(), 0 if rng_state is None else rng_state.data_ptr(),
            x_next.data_ptr(), mean.data_ptr(), logvar.data_ptr(), 0 if noise_out is None else noise_out.data_ptr(),
            list(_fused.strides(h, shift, scale, weight, bias, x, z, x_next, mean, logvar, zo)),
            [code(h.dtype), code(x.dtype), code(z.dtype)],
            h.shape[0] // R, R, h.shape[1], h.shape[2], C, S, int(patch_size), weight.shape[0],
            tables.stride(0)]
    return (x_next, mean, logvar), args, index


def _load_cpu():
    from .. import _env

    ext = _env.extension()

    def draft_epilogue_cpu(h, shift, scale, weight, bias, x, tables, index, noise=None, *, patch_size,
                           cfg_scale=1.0, guidance_channels=3, learned_variance, predict_xstart=False,
                           clip_denoised=False, eps=1e-6, rng_state=None, out=None, noise_out=None):
        res, args, _index = _kernel_args(h, shift, scale, weight, bias, x, tables, index, noise, rng_state, out,
                                         noise_out, patch_size)
        ext.draft_epilogue_host(*args, tables.shape[1], float(eps), float(cfg_scale), int(guidance_channels),
                                bool(learned_variance), bool(predict_xstart), bool(clip_denoised))
        return res

    return draft_epilogue_cpu


# the host kernel is single-threaded.  Measured on a 2-core CPU (bench/bench_draft_epilogue_cpu.py) it beats
# torch's composition at every size up to DiT-XL/2 at batch 1 (18.9 M multiply-adds of its head GEMM,
# feature rows x H x GEMM columns: 3.4x at 2 threads); past 2^25 (beyond what was measured, where many
# cores could give torch's multi-threaded ops the edge) torch's composition is taken first
CPU_MAX_WORK = 1 << 25


def _cpu_supports(ctx: dict) -> Optional[str]:
    why = _fused.first_reason(host_kernel_reason(ctx, "draft_epilogue_host"), _fused.grad_reason(ctx))
    if why is not None:
        return why
    if ctx.get("dtype") != torch.float32 or not ctx.get("f32_states", False):
        return (f"h is {ctx.get('dtype')}, states {'float32' if ctx.get('f32_states') else 'not float32'}: "
                f"the host kernel reads float32 tensors only")
    return None


def cpu_prefers_torch(ctx: dict) -> Optional[str]:
    """Why torch goes first for this CPU call (work past CPU_MAX_WORK), or None."""
    work = ctx.get("M", 0) * ctx.get("H", 0) * ctx.get("PE", 0) * 2
    if work > CPU_MAX_WORK:
        return f"{work} multiply-adds > {CPU_MAX_WORK} for the single-threaded host kernel"
    return None


def _shape_reason(ctx: dict) -> Optional[str]:
    pe = ctx.get("PE")
    if pe is not None and pe > MAX_PATCH_COLUMNS:
        return f"p*p*C = {pe} eps columns per token > {MAX_PATCH_COLUMNS}"
    return None


def _cuda_extra(ctx: dict) -> Optional[str]:
    H, limit = ctx.get("H"), CUDA_MAX_H.get(ctx.get("dtype"), 4096)
    if H is not None and H > limit:
        return f"H {H} > {limit} for {ctx.get('dtype')} (the cuda kernel stages its tokens' rows in shared memory)"
    return _shape_reason(ctx)


OP.register(Backend("torch", _load_torch))
OP.register(Backend("triton", _load_triton, lambda ctx: _fused.triton_supports(ctx, _shape_reason(ctx))))
OP.register(Backend("cuda", _load_cuda, lambda ctx: _fused.cuda_supports(ctx, "draft_epilogue", _cuda_extra(ctx))))
OP.register(Backend("cpu", _load_cpu, _cpu_supports))
OP.host_prefers_torch = cpu_prefers_torch


def validate(h, shift, scale, weight, bias, x, tables, index, noise, *, patch_size, guidance_channels,
             learned_variance, rng_state, out, noise_out) -> dict:
    """Check every argument (errors name it); returns the dispatch context."""
    check_tensor("x", x, dim=4, floating=True)
    R, C, S, S2 = x.shape
    dev = x.device
    if S != S2:
        raise ValueError(f"x must be square (R, C, S, S), got {tuple(x.shape)}")
    if not isinstance(patch_size, int) or patch_size < 1 or S % patch_size:
        raise ValueError(f"patch_size must be a positive int dividing S={S}, got {patch_size!r}")
    check_tensor("h", h, dim=3, floating=True, device=dev)
    GR, N, H = h.shape
    if R == 0 or GR not in (R, 2 * R):
        raise ValueError(f"h must have R or 2R rows (R = {R} states, 2R under CFG), got {GR}")
    if N != (S // patch_size) ** 2:
        raise ValueError(f"h has {N} tokens, expected {(S // patch_size) ** 2} for S={S}, patch {patch_size}")
    check_tensor("shift", shift, shape=(GR, H), dtype=h.dtype, device=dev)
    check_tensor("scale", scale, shape=(GR, H), dtype=h.dtype, device=dev)
    check_tensor("weight", weight, dim=2, dtype=h.dtype, device=dev)
    pp = patch_size * patch_size
    if weight.shape[1] != H or weight.shape[0] % pp or weight.shape[0] // pp not in (C, 2 * C):
        raise ValueError(f"weight must be (p*p*C_out, H) = ({pp}*{C} or {pp}*{2 * C}, {H}), got {tuple(weight.shape)}")
    if learned_variance and weight.shape[0] != pp * 2 * C:
        raise ValueError(f"learned variance needs C_out = 2C = {2 * C} output channels, weight has "
                         f"{weight.shape[0] // pp}")
    check_tensor("bias", bias, shape=(weight.shape[0],), dtype=h.dtype, device=dev)
    check_tensor("tables", tables, dim=2, dtype=torch.float32, device=dev)
    if tables.shape[0] != NUM_TABLES or tables.stride(1) != 1:
        raise ValueError(f"tables must be ({NUM_TABLES}, T) float32 with unit column stride, got "
                         f"{tuple(tables.shape)} strides {tables.stride()}")
    check_tensor("index", index, shape=(R,), dtype=torch.int64, device=dev)
    if GR == 2 * R and not (1 <= guidance_channels <= C):
        raise ValueError(f"guidance_channels must be in 1..{C} (3 official, 4 diffusers), got {guidance_channels}")
    if noise is not None:
        check_tensor("noise", noise, shape=tuple(x.shape), floating=True, device=dev)
    elif rng_state is None:
        raise ValueError("draft_epilogue: pass noise (R, C, S, S) or rng_state (int64 [seed, offset])")
    if rng_state is not None:
        check_tensor("rng_state", rng_state, shape=(2,), dtype=torch.int64, device=dev)
    if out is not None:
        if len(out) != 3:
            raise ValueError("out must be a tuple (x_next, mean, logvar)")
        for name, t in zip(("out[0] (x_next)", "out[1] (mean)", "out[2] (logvar)"), out):
            check_tensor(name, t, shape=tuple(x.shape), dtype=torch.float32, device=dev)
    if noise_out is not None:
        check_tensor("noise_out", noise_out, shape=tuple(x.shape), dtype=torch.float32, device=dev)
    return _context(h, shift, scale, weight, bias, x, noise, patch_size,
                    _fused.needs_grad(h, shift, scale, weight, bias, x))


def states_are_f32(x, noise) -> bool:
    """x and the given noise are float32 (what the host kernel reads)."""
    return x.dtype == torch.float32 and (noise is None or noise.dtype == torch.float32)


def _context(h, shift, scale, weight, bias, x, noise, patch_size, requires_grad=False) -> dict:
    GR, N, H = h.shape
    odd = [f"{n} is {t.dtype}" for n, t in (("x", x), ("noise", noise))
           if t is not None and t.dtype not in _fused.KERNEL_DTYPES]
    return dict(device=x.device, dtype=h.dtype, H=H, PE=patch_size * patch_size * x.shape[1], N=N, M=GR * N,
                requires_grad=requires_grad, f32_states=states_are_f32(x, noise),
                mixed=f"{', '.join(odd)}: the kernels read float32 / float16 / bfloat16 states" if odd else None)


# ---------------------------------------------------------------- torch.ops.free_kernels
_ARGS = ("Tensor h, Tensor shift, Tensor scale, Tensor weight, Tensor bias, Tensor x, Tensor tables, Tensor index, "
         "Tensor? noise, int patch_size, float cfg_scale, int guidance_channels, bool learned_variance, "
         "bool predict_xstart, bool clip_denoised, float eps, Tensor(a!)? rng_state")


def _call(h, shift, scale, weight, bias, x, tables, index, noise, patch_size, cfg_scale, guidance_channels,
          learned_variance, predict_xstart, clip_denoised, eps, rng_state, backend, out=None, noise_out=None):
    ctx = _context(h, shift, scale, weight, bias, x, noise, patch_size)
    return OP.resolve(ctx, backend).impl()(
        h, shift, scale, weight, bias, x, tables, index, noise, patch_size=patch_size, cfg_scale=cfg_scale,
        guidance_channels=guidance_channels, learned_variance=learned_variance, predict_xstart=predict_xstart,
        clip_denoised=clip_denoised, eps=eps, rng_state=rng_state, out=out, noise_out=noise_out)


def _op_impl(*args, backend=None):
    x_next, mean, logvar = _call(*args, backend)
    # three distinct fresh tensors (the reference's fixed-variance log-variance may be a broadcast view)
    return x_next.contiguous(), mean.contiguous(), logvar.contiguous()


def _op_fake(h, shift, scale, weight, bias, x, *args, **kw):
    return tuple(x.new_empty(x.shape, dtype=torch.float32) for _ in range(3))


def _op_out_impl(*args, x_next, mean, logvar, noise_out=None, backend=None):
    _call(*args, backend, out=(x_next, mean, logvar), noise_out=noise_out)


def _op_out_fake(*args, **kw):
    return None


LIB_OP = _library.define("draft_epilogue", f"({_ARGS}, *, str? backend=None) -> (Tensor, Tensor, Tensor)",
                         _op_impl, _op_fake)
LIB_OP_OUT = _library.define(
    "draft_epilogue_out",
    f"({_ARGS}, *, Tensor(b!) x_next, Tensor(c!) mean, Tensor(d!) logvar, Tensor(e!)? noise_out=None, "
    "str? backend=None) -> ()",
    _op_out_impl, _op_out_fake)


def draft_epilogue(h, shift, scale, weight, bias, x, tables, index, noise=None, *, patch_size: int,
                   cfg_scale: float = 1.0, guidance_channels: int = 3, learned_variance: bool,
                   predict_xstart: bool = False, clip_denoised: bool = False, eps: float = 1e-6,
                   rng_state: Optional[torch.Tensor] = None, out=None, noise_out: Optional[torch.Tensor] = None,
                   backend: Optional[str] = None):
    """(x_next, mean, logvar): ``torch.ops.free_kernels.draft_epilogue`` (``draft_epilogue_out`` when
    ``out`` or ``noise_out`` is given; missing ``out`` buffers are allocated here).  A call that needs a
    gradient runs the torch reference here, outside the op."""
    ctx = validate(h, shift, scale, weight, bias, x, tables, index, noise, patch_size=patch_size,
                   guidance_channels=guidance_channels, learned_variance=learned_variance, rng_state=rng_state,
                   out=out, noise_out=noise_out)
    if ctx["requires_grad"]:
        return OP.resolve(ctx, backend).impl()(
            h, shift, scale, weight, bias, x, tables, index, noise, patch_size=patch_size, cfg_scale=cfg_scale,
            guidance_channels=guidance_channels, learned_variance=learned_variance, predict_xstart=predict_xstart,
            clip_denoised=clip_denoised, eps=eps, rng_state=rng_state, out=out, noise_out=noise_out)
    args = (h, shift, scale, weight, bias, x, tables, index, noise, int(patch_size), float(cfg_scale),
            int(guidance_channels), bool(learned_variance), bool(predict_xstart), bool(clip_denoised), float(eps),
            rng_state)
    if out is None and noise_out is None:
        return (_op_impl if _library.eager(h) else LIB_OP)(*args, backend=backend)
    if out is None:
        out = tuple(torch.empty(x.shape, dtype=torch.float32, device=x.device) for _ in range(3))
    (_op_out_impl if _library.eager(h) else LIB_OP_OUT)(*args, x_next=out[0], mean=out[1], logvar=out[2],
                                                        noise_out=noise_out, backend=backend)
    return tuple(out)

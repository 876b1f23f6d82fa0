"""Dispatch point: FREE's exact acceptance + residual resampling for a whole round.

See :mod:`free_kernels.reference.speculative_accept` for the rule, shapes and
randomness.  Kernel backends (Triton / CUDA) take their randomness from a
counter-based generator: ``rng_state``, an int64 tensor ``[seed, offset]`` on the
inputs' device that the kernels read and advance IN PLACE on the device (by
``max(D, L)`` per call), so a captured CUDA graph draws fresh numbers on every
replay.  Without ``rng_state`` a fresh one is seeded from ``generator`` (one
device-side ``torch.randint``, no host sync).  The torch reference ignores
``rng_state`` and draws from ``generator``.  Explicit ``uniforms`` /
``bonus_noise`` / ``residual_noise`` + ``residual_uniforms`` are used by every
backend (that is how the backends are compared with the oracle).

Backends: ``cuda`` (csrc/kernels/speculative_accept.cu) -> ``triton``
(free_kernels/triton/speculative_accept.py) -> ``torch`` (the reference), each
two launches, outputs in caller-providable buffers (``out``, ``num_accepted``,
``log_ratio``, ``residual_candidates``, ``fallbacks``).  Kernel backends do not
check for NaN (that would need a host sync): a NaN makes its draft a rejection
and propagates into ``out`` (see the Triton module).

Bytes (for benchmarks), B samples, L drafts, D elements, fp32:
reads mean_q, logvar_q, noise_q (3 B L D) + mean_p, logvar_p (2 B (L+1) D),
writes out (B D): 4 * (5 L + 3) * B * D bytes when every draft is inspected.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_finite, check_tensor
from ..reference.speculative_accept import AcceptResult
from ..reference.philox import make_rng_state  # noqa: F401  (public here too)
from . import _abi, _library
from ._dispatch import Backend, dtype_reason, extension_reason, first_reason, get_op, size_class, triton_reason

OP = get_op("speculative_accept")
INFO_CTX = dict(B=8, L=6, D=16384, equal_variance=False, given_randomness=False)
# shape class of the measured priority table: draft elements B * L * D per call
SMALL_ELEMENTS = 1 << 18
OP.shape_class = lambda ctx: size_class(ctx["B"] * ctx["L"] * ctx["D"], SMALL_ELEMENTS)


def _load_torch():
    from ..reference.speculative_accept import speculative_accept as f

    return f


OP.register(Backend("torch", _load_torch))

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SAMPLES = 65535  # grid dimension limit of both kernel backends


def _kernel_reason(ctx: dict) -> Optional[str]:
    B = ctx.get("B")
    if B is not None and B > MAX_SAMPLES:
        return f"batch {B} > {MAX_SAMPLES} samples per call"
    return None


# ---------------------------------------------------------------- triton
def _triton_supports(ctx: dict) -> Optional[str]:
    return first_reason(triton_reason(ctx), dtype_reason(ctx, KERNEL_DTYPES), _kernel_reason(ctx))


def _load_triton():
    from ..triton.speculative_accept import speculative_accept as f

    return f


OP.register(Backend("triton", _load_triton, _triton_supports))


# ---------------------------------------------------------------- cuda (csrc)
def _cuda_supports(ctx: dict) -> Optional[str]:
    return first_reason(extension_reason(ctx, "speculative_accept"), dtype_reason(ctx, KERNEL_DTYPES),
                        _kernel_reason(ctx))


def _f32(t):
    return None if t is None else t.to(torch.float32).contiguous()


_ptr = _abi.ptr


def cuda_call(ext, stream: int, mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts, deterministic_last, *,
              equal_variance: bool, uniforms=None, bonus_noise=None, residual_noise=None, residual_uniforms=None,
              tau=None, generator=None, out=None, candidates_per_iter: int = 8, max_candidates: int = 100_000,
              rng_state=None, num_accepted=None, log_ratio=None, residual_candidates=None, fallbacks=None):
    """Prepare the arguments of ``ext.speculative_accept`` (the _C entry point) and call it on ``stream``.

    ``ext`` is the extension module (or a stand-in with the same two functions:
    the host emulation in tests/ uses one).  Returns an ``AcceptResult``.
    """
    from ..reference.speculative_accept import AcceptResult

    del candidates_per_iter  # the kernel evaluates 4 candidates per iteration
    B, L1, D = mean_p.shape
    L = L1 - 1
    dev, dt = mean_p.device, mean_p.dtype
    big = [t if t.dtype == dt else t.to(dt) for t in (logvar_p, mean_q, logvar_q, noise_q)]
    if rng_state is None:
        rng_state = make_rng_state(dev, generator)
    out = torch.empty(B, D, dtype=dt, device=dev) if out is None else out
    num_accepted = torch.empty(B, dtype=torch.int32, device=dev) if num_accepted is None else num_accepted
    log_ratio = torch.empty(B, L, dtype=torch.float32, device=dev) if log_ratio is None else log_ratio
    if residual_candidates is None:
        residual_candidates = torch.empty(B, dtype=torch.int32, device=dev)
    fallbacks = torch.empty(B, dtype=torch.bool, device=dev) if fallbacks is None else fallbacks
    if not log_ratio.is_contiguous():
        raise ValueError("log_ratio must be contiguous")
    nd = num_drafts.to(torch.int64).contiguous()
    det = deterministic_last.to(torch.bool).contiguous()
    rn, ru = _f32(residual_noise), _f32(residual_uniforms)
    uf, tf, bf = _f32(uniforms), _f32(tau), _f32(bonus_noise)
    ws = torch.empty(ext.speculative_accept_workspace_bytes(B, L, D), dtype=torch.uint8, device=dev)
    strides = _abi.strides(mean_p, *big, out)
    ext.speculative_accept(
        mean_p.data_ptr(), big[0].data_ptr(), big[1].data_ptr(), big[2].data_ptr(), big[3].data_ptr(), strides,
        nd.data_ptr(), det.data_ptr(), _ptr(uf), _ptr(tf), _ptr(bf), _ptr(rn), _ptr(ru),
        0 if rn is None else rn.shape[1], rng_state.data_ptr(), ws.data_ptr(), ws.numel(), out.data_ptr(),
        num_accepted.data_ptr(), log_ratio.data_ptr(), residual_candidates.data_ptr(), fallbacks.data_ptr(),
        B, L, D, _abi.dtype_code(dt), bool(equal_variance), int(max_candidates), stream)
    return AcceptResult(out=out, num_accepted=num_accepted, log_ratio=log_ratio,
                        residual_candidates=residual_candidates, fallbacks=fallbacks)


def _load_cuda():
    from .. import _env

    ext = _env.extension()

    def speculative_accept_cuda(mean_p, *args, **kw):
        dev = mean_p.device
        if dev.index is not None and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                return speculative_accept_cuda(mean_p, *args, **kw)
        return cuda_call(ext, torch.cuda.current_stream(dev).cuda_stream, mean_p, *args, **kw)

    return speculative_accept_cuda


OP.register(Backend("cuda", _load_cuda, _cuda_supports))


def bytes_moved(B: int, L: int, D: int, elem: int = 4) -> int:
    return elem * (3 * B * L * D + 2 * B * (L + 1) * D + B * D)


_SMALL_OUTPUTS = ("num_accepted", "log_ratio", "residual_candidates", "fallbacks")


def _cpu_checks(mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts):
    # kernels propagate NaN into `out`; the CPU path refuses it outright (host reads: CPU tensors only)
    for name, t in (("mean_p", mean_p), ("logvar_p", logvar_p), ("mean_q", mean_q),
                    ("logvar_q", logvar_q), ("noise_q", noise_q)):
        check_finite(name, t)
    L = mean_p.shape[1] - 1
    if bool((num_drafts < 0).any()) or bool((num_drafts > L).any()):
        raise ValueError(f"num_drafts must lie in [0, {L}], got {num_drafts.tolist()}")


def _run(mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts, deterministic_last, equal_variance, uniforms,
         bonus_noise, residual_noise, residual_uniforms, tau, generator, rng_state, candidates_per_iter,
         max_candidates, backend, out=None, bufs=None, extra=None):
    if not mean_p.is_cuda:
        _cpu_checks(mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts)
    B, L1, D = mean_p.shape
    ctx = dict(device=mean_p.device, dtype=mean_p.dtype, equal_variance=equal_variance,
               given_randomness=uniforms is not None, B=B, L=L1 - 1, D=D)
    chosen = OP.resolve(ctx, backend)
    kw = dict(extra) if extra else {}
    if bufs is not None and chosen.name != "torch":
        kw.update(zip(_SMALL_OUTPUTS, bufs))
    res = chosen.impl()(mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts, deterministic_last,
                        equal_variance=equal_variance, uniforms=uniforms, bonus_noise=bonus_noise,
                        residual_noise=residual_noise, residual_uniforms=residual_uniforms, tau=tau,
                        generator=generator, out=out, rng_state=rng_state, candidates_per_iter=candidates_per_iter,
                        max_candidates=max_candidates, **kw)
    if bufs is not None and chosen.name == "torch":
        # the reference allocates its small outputs: copy them into the caller's buffers
        for name, buf in zip(_SMALL_OUTPUTS, bufs):
            buf.copy_(getattr(res, name))
    return res


# ---------------------------------------------------------------- torch.ops.free_kernels
_ARGS = ("Tensor mean_p, Tensor logvar_p, Tensor mean_q, Tensor logvar_q, Tensor noise_q, Tensor num_drafts, "
         "Tensor deterministic_last, bool equal_variance, Tensor? uniforms=None, Tensor? bonus_noise=None, "
         "Tensor? residual_noise=None, Tensor? residual_uniforms=None, Tensor? tau=None, "
         "Generator? generator=None, Tensor(a!)? rng_state=None, int candidates_per_iter=8, "
         "int max_candidates=100000")


def _op_impl(mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts, deterministic_last, equal_variance,
             uniforms=None, bonus_noise=None, residual_noise=None, residual_uniforms=None, tau=None, generator=None,
             rng_state=None, candidates_per_iter=8, max_candidates=100_000, backend=None):
    r = _run(mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts, deterministic_last, equal_variance, uniforms,
             bonus_noise, residual_noise, residual_uniforms, tau, generator, rng_state, candidates_per_iter,
             max_candidates, backend)
    return r.out, r.num_accepted, r.log_ratio, r.residual_candidates, r.fallbacks


def _small_fakes(mean_p):
    B, L1, _ = mean_p.shape
    return (mean_p.new_empty((B,), dtype=torch.int32), mean_p.new_empty((B, L1 - 1), dtype=torch.float32),
            mean_p.new_empty((B,), dtype=torch.int32), mean_p.new_empty((B,), dtype=torch.bool))


def _op_fake(mean_p, *args, **kw):
    B, _, D = mean_p.shape
    return (mean_p.new_empty((B, D)), *_small_fakes(mean_p))


def _op_out_impl(mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts, deterministic_last, equal_variance,
                 uniforms=None, bonus_noise=None, residual_noise=None, residual_uniforms=None, tau=None,
                 generator=None, rng_state=None, candidates_per_iter=8, max_candidates=100_000, *, out, num_accepted,
                 log_ratio, residual_candidates, fallbacks, backend=None):
    _run(mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts, deterministic_last, equal_variance, uniforms,
         bonus_noise, residual_noise, residual_uniforms, tau, generator, rng_state, candidates_per_iter,
         max_candidates, backend, out=out, bufs=(num_accepted, log_ratio, residual_candidates, fallbacks))


def _op_out_fake(*args, **kw):
    return None


LIB_OP = _library.define(
    "speculative_accept", f"({_ARGS}, str? backend=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _op_impl, _op_fake)
LIB_OP_OUT = _library.define(
    "speculative_accept_out",
    f"({_ARGS}, *, Tensor(b!) out, Tensor(c!) num_accepted, Tensor(d!) log_ratio, "
    "Tensor(e!) residual_candidates, Tensor(f!) fallbacks, str? backend=None) -> ()",
    _op_out_impl, _op_out_fake)


def speculative_accept(mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts, deterministic_last, *,
                       equal_variance: bool, uniforms=None, bonus_noise=None, residual_noise=None,
                       residual_uniforms=None, tau=None, generator: Optional[torch.Generator] = None,
                       out=None, rng_state: Optional[torch.Tensor] = None, backend: Optional[str] = None, **kw):
    """Accept/reject a round of drafts for every sample; returns an ``AcceptResult``.

    ``rng_state``: optional int64 ``[seed, offset]`` tensor on the inputs' device
    for the kernel backends (advanced in place); ``**kw``: ``candidates_per_iter``,
    ``max_candidates``, and preallocated ``num_accepted`` (int32 (B,)) / ``log_ratio``
    (float32 (B, L), contiguous) / ``residual_candidates`` (int32 (B,)) / ``fallbacks``
    (bool (B,)).  With ``out`` or any of those given, the call is
    ``torch.ops.free_kernels.speculative_accept_out`` (every output written in place,
    missing buffers allocated here); otherwise ``torch.ops.free_kernels.speculative_accept``.
    """
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
    if rng_state is not None:
        check_tensor("rng_state", rng_state, shape=(2,), dtype=torch.int64, device=dev)
    cpi = int(kw.pop("candidates_per_iter", 8))
    max_cand = int(kw.pop("max_candidates", 100_000))
    bufs = [kw.pop(k, None) for k in _SMALL_OUTPUTS]
    if kw:
        # backend-specific extras (the Triton launch ``config`` of tests and tuning): an eager call of the
        # chosen backend outside the operator; a backend that does not take them raises TypeError
        res = _run(mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts, deterministic_last, equal_variance,
                   uniforms, bonus_noise, residual_noise, residual_uniforms, tau, generator, rng_state, cpi,
                   max_cand, backend, out=out, bufs=None if all(b is None for b in bufs) else bufs, extra=kw)
        if all(b is None for b in bufs):
            return res
        return AcceptResult(res.out, *bufs)
    args = (mean_p, logvar_p, mean_q, logvar_q, noise_q, num_drafts, deterministic_last, bool(equal_variance),
            uniforms, bonus_noise, residual_noise, residual_uniforms, tau, generator, rng_state, cpi, max_cand)
    if out is None and all(b is None for b in bufs):
        if _library.eager(mean_p):
            return _run(*args, backend)
        return AcceptResult(*LIB_OP(*args, backend=backend))
    specs = ((torch.int32, (B,)), (torch.float32, (B, L)), (torch.int32, (B,)), (torch.bool, (B,)))
    for i, (name, (dt, shape)) in enumerate(zip(_SMALL_OUTPUTS, specs)):
        if bufs[i] is None:
            bufs[i] = torch.empty(shape, dtype=dt, device=dev)
        else:
            check_tensor(name, bufs[i], shape=shape, dtype=dt, device=dev)
    if out is None:
        out = torch.empty((B, D), dtype=mean_p.dtype, device=dev)
    (_op_out_impl if _library.eager(mean_p) else LIB_OP_OUT)(
        *args, out=out, num_accepted=bufs[0], log_ratio=bufs[1], residual_candidates=bufs[2], fallbacks=bufs[3],
        backend=backend)
    return AcceptResult(out, *bufs)

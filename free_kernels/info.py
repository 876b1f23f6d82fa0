"""``python -m free_kernels.info``: what this installation can run, and why.

The first troubleshooting step: prints the package, Python, torch (and its
CUDA), triton (and TRITON_INTERPRET), the csrc extension (importable? built
with CUDA? which architectures? usable here?) and, for every registered op,
the backend it resolves to for CUDA and CPU tensors with each backend's
reason.  ``--json`` prints the same as one JSON document.

Works on a CPU-only torch; queries CUDA only when run (never at import).

Op contexts: each op is asked about a typical DiT-XL/2 256px call (the
defaults below).  An op module may define ``INFO_CTX = {...}`` to override or
add keys its backends' probes read (e.g. head_dim, H).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from typing import Any, Dict, List, Optional

# Shape keys that op probes look at, for a DiT-XL/2 at 256x256 (latent 32x32,
# patch 2 -> N = 256 tokens, hidden 1152, 16 heads of 72).
# M = B * N token rows (the fused ops' shape class); L, D: a round of 6 drafts of a 4x32x32 latent;
# f32_states: the sampler's states (and noise) are float32.
DEFAULT_SHAPES: Dict[str, Any] = dict(B=2, N=256, M=512, H=1152, heads=16, head_dim=72, C=4, latent=32, L=6,
                                      D=4096, f32_states=True)


def _contexts() -> List[dict]:
    import torch

    return [
        dict(label="cuda float16", device=torch.device("cuda"), dtype=torch.float16),
        dict(label="cuda bfloat16", device=torch.device("cuda"), dtype=torch.bfloat16),
        dict(label="cuda float32", device=torch.device("cuda"), dtype=torch.float32),
        dict(label="cpu float32", device=torch.device("cpu"), dtype=torch.float32),
    ]


def _op_contexts(op_name: str) -> List[dict]:
    extra: Dict[str, Any] = {}
    try:
        mod = importlib.import_module(f"free_kernels.ops.{op_name}")
        extra = dict(getattr(mod, "INFO_CTX", {}) or {})
    except Exception:
        pass
    return [{**DEFAULT_SHAPES, **extra, **ctx} for ctx in _contexts()]


def _safe(fn, default=None):
    try:
        return fn()
    except Exception as e:  # report, never crash the report
        return default if default is not None else f"error: {type(e).__name__}: {e}"


def _torch_info() -> dict:
    try:
        import torch
    except Exception as e:
        return dict(importable=False, error=f"{type(e).__name__}: {e}")
    info: Dict[str, Any] = dict(importable=True, version=torch.__version__, cuda=torch.version.cuda)
    info["cuda_available"] = _safe(torch.cuda.is_available, False)
    if info["cuda_available"]:
        info["device_count"] = _safe(torch.cuda.device_count)
        info["devices"] = [
            _safe(lambda i=i: f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})")
            for i in range(torch.cuda.device_count())
        ]
    info["num_threads"] = torch.get_num_threads()
    return info


def _triton_info() -> dict:
    from . import _env

    return dict(
        version=_env.triton_version(),
        unavailable_reason=_env.triton_unavailable_reason(),
        TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET"),
        interpret=_env.triton_interpret(),
    )


def _extension_info() -> dict:
    from . import _env

    mod = _env.extension()
    if mod is None:
        return dict(importable=False, reason=_env._load_extension()[1])
    info: Dict[str, Any] = dict(importable=True, path=getattr(mod, "__file__", None))
    info["version"] = _safe(mod.version)
    info["built_with_cuda"] = _safe(mod.built_with_cuda)
    info["cuda_archs"] = _safe(mod.cuda_archs)
    if hasattr(mod, "build_info"):
        info["build"] = _safe(mod.build_info)
    if hasattr(mod, "cuda_runtime_version"):
        info["cuda_runtime"] = _safe(mod.cuda_runtime_version)
        info["cuda_driver"] = _safe(mod.cuda_driver_version)
        info["cuda_unusable_reason"] = _safe(mod.cuda_unusable_reason)
    info["unavailable_reason"] = _env.extension_unavailable_reason()
    return info


def _ops_info() -> Dict[str, List[dict]]:
    from .ops import OPS, BackendUnavailable

    out: Dict[str, List[dict]] = {}
    for name in sorted(OPS):
        op = OPS[name]
        rows = []
        for ctx in _op_contexts(name):
            row: Dict[str, Any] = dict(context=ctx["label"])
            try:
                row["backend"] = op.resolve(ctx).name
            except BackendUnavailable as e:
                row["backend"], row["error"] = None, str(e)
            except Exception as e:
                row["backend"], row["error"] = None, f"{type(e).__name__}: {e}"
            row["reasons"] = op.reasons(ctx)
            row["shape_class"] = op.classify(ctx)
            row["order"], row["order_source"] = op.order_for(ctx)
            rows.append(row)
        out[name] = rows
    return out


def _backend_env_problems() -> dict:
    """What is wrong with the FREE_KERNELS_BACKEND* variables (each a line), as the ops and tools see it."""
    from .ops import environment_problems

    errors, warns = environment_problems()
    return dict(errors=errors, warnings=warns)


def _priority_info() -> dict:
    from .ops._dispatch import priority_file, priority_table

    path = priority_file()
    return dict(path=path, exists=os.path.exists(path), entries=len(priority_table(path)))


def collect() -> dict:
    """Everything ``python -m free_kernels.info`` reports, as plain data."""
    import free_kernels

    return dict(
        package=dict(name="free_kernels", version=free_kernels.__version__, path=os.path.dirname(free_kernels.__file__)),
        python=dict(version=platform.python_version(), executable=sys.executable, platform=platform.platform()),
        torch=_torch_info(),
        triton=_triton_info(),
        extension=_extension_info(),
        backend_env={k: v for k, v in sorted(os.environ.items()) if k.startswith("FREE_KERNELS_BACKEND")},
        backend_env_problems=_safe(_backend_env_problems),
        priority_table=_priority_info(),
        ops=_ops_info(),
    )


def _yes(v: Optional[bool]) -> str:
    return "yes" if v else "no"


def format_text(info: dict) -> str:
    from .ops import OPS  # noqa: F401  (registers the ops)
    from .ops._dispatch import describe

    lines = []
    p, py, t, tr, ext = info["package"], info["python"], info["torch"], info["triton"], info["extension"]
    lines.append(f"free_kernels {p['version']}  ({p['path']})")
    lines.append(f"python       {py['version']}  ({py['executable']})")
    if t.get("importable"):
        cuda = f"CUDA {t['cuda']}" if t["cuda"] else "CPU-only build"
        lines.append(f"torch        {t['version']}  ({cuda}; cuda available: {_yes(t['cuda_available'])}; "
                     f"threads: {t['num_threads']})")
        for d in t.get("devices", []):
            lines.append(f"             device: {d}")
    else:
        lines.append(f"torch        not importable: {t['error']}")
    tr_version = tr["version"] or f"not available ({tr['unavailable_reason']})"
    lines.append(f"triton       {tr_version}  (TRITON_INTERPRET={tr['TRITON_INTERPRET'] or 'unset'}"
                 f"{', interpreter ON' if tr['interpret'] else ''})")
    if ext["importable"]:
        lines.append(f"extension    free_kernels._C {ext['version']}  ({ext['path']})")
        if ext["built_with_cuda"]:
            build = ext.get("build") or {}
            lines.append(f"             built with CUDA: yes (nvcc {build.get('cuda_compiler_version', '?')}, "
                         f"runtime {ext.get('cuda_runtime')} linked statically), archs: "
                         f"{', '.join(f'sm_{a}' for a in ext['cuda_archs'])}")
            why = ext.get("cuda_unusable_reason")
            driver = ext.get("cuda_driver") or "none"
            lines.append(f"             CUDA usable here: {'yes' if why is None else 'no: ' + str(why)}  "
                         f"(driver supports CUDA: {driver})")
        else:
            why = (ext.get("build") or {}).get("cuda_disabled_reason", "")
            lines.append(f"             built with CUDA: no ({why})")
    else:
        lines.append(f"extension    not importable: {ext['reason']}")
    pt = info.get("priority_table") or {}
    lines.append(f"priority     {pt.get('path')} ({pt.get('entries', 0)} measured entries"
                 f"{'' if pt.get('exists') else '; file absent'}; set FREE_KERNELS_PRIORITY_FILE to use another)")
    if info["backend_env"]:
        lines.append("backend env  " + ", ".join(f"{k}={v!r}" for k, v in info["backend_env"].items()))
    problems = info.get("backend_env_problems")
    if isinstance(problems, dict):
        for msg in problems.get("errors", []):
            lines.append(f"             error: {msg} (the tools refuse to start with it)")
        for msg in problems.get("warnings", []):
            lines.append(f"             warning: {msg}")
    elif problems:
        lines.append(f"             could not check: {problems}")

    lines.append("")
    lines.append("ops: backend chosen per context (CUDA tensors: the measured order of the priority table for "
                 "(op, device, dtype, shape class), else cuda -> triton -> torch; CPU tensors take torch unless a "
                 "backend is requested); [order: ...] says which")
    ops_ctx = {name: _op_contexts(name) for name in info["ops"]}
    lines.extend(describe(ops_ctx))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m free_kernels.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    args = parser.parse_args(argv)
    info = collect()
    text = json.dumps(info, indent=2, default=str) if args.json else format_text(info)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `... | head`: not an error
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

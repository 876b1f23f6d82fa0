"""What this machine can run: triton, the csrc extension, CUDA.  No GPU queries at import."""
from __future__ import annotations

import functools
import os
from typing import Optional


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def triton_unavailable_reason() -> Optional[str]:
    if triton_version() is None:
        return "triton is not installed"
    return None


@functools.lru_cache(maxsize=None)
def _load_extension():
    try:
        from . import _C  # type: ignore[attr-defined]

        return _C, None
    except Exception as e:  # ImportError, or a broken build
        return None, f"extension free_kernels._C not importable ({type(e).__name__}: {e})"


def extension():
    """The csrc extension module or None."""
    return _load_extension()[0]


def extension_unavailable_reason(symbol: Optional[str] = None) -> Optional[str]:
    mod, why = _load_extension()
    if mod is None:
        return why
    if not getattr(mod, "built_with_cuda", lambda: False)():
        return "extension was built without CUDA (FREE_KERNELS_SKIP_CUDA or no nvcc at build time)"
    if symbol is not None and not hasattr(mod, symbol):
        return f"extension has no entry point {symbol!r} (rebuild the package)"
    return _cuda_unusable(mod)


def host_entry_unavailable_reason(symbol: str) -> Optional[str]:
    """Why the extension's host kernel ``symbol`` (csrc/kernels/*.cpp, in every build) cannot run, or None."""
    mod, why = _load_extension()
    if mod is None:
        return why
    if not hasattr(mod, symbol):
        return f"extension has no entry point {symbol!r} (rebuild the package)"
    return None


@functools.lru_cache(maxsize=None)
def _cuda_unusable(mod) -> Optional[str]:
    """The extension's own CUDA runtime/driver check (no driver, driver too old for the build), cached."""
    probe = getattr(mod, "cuda_unusable_reason", None)
    if probe is None:
        return None
    try:
        why = probe()
    except Exception as e:  # never let a probe take the dispatch down
        return f"extension CUDA probe failed: {type(e).__name__}: {e}"
    return None if why is None else f"extension cannot use CUDA here: {why}"


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("", "0", "false", "no", "off")
_flag_warned: set = set()


def env_flag(name: str, default: bool = False) -> bool:
    """A yes/no environment variable: 1 / true / yes / on and 0 / false / no / off (any case, surrounding
    spaces ignored; unset or empty: ``default``).  Any other value counts as ``default`` and prints one
    warning line (once per process and value) naming the variable, so a typo is not silently ignored."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return default if word == "" else False
    if (name, raw) not in _flag_warned:
        _flag_warned.add((name, raw))
        import sys

        print(f"free_kernels: warning: {name}={raw!r} is not one of {'/'.join(TRUE_WORDS)} or "
              f"{'/'.join(FALSE_WORDS[1:])}; taken as {'on' if default else 'off'}", file=sys.stderr, flush=True)
    return default

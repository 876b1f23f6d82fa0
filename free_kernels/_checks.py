"""Input validation shared by the public entry points: errors name the argument."""
from __future__ import annotations

import math
import os
import re
from typing import Optional

import torch


def _capturing(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ValueError if ``t`` holds NaN/Inf.

    Costs a device->host sync on GPU, so it is skipped while a CUDA graph is
    being captured or under torch.compile, and can be switched off with
    FREE_KERNELS_CHECK_NAN=0 for timing runs.
    """
    if os.environ.get("FREE_KERNELS_CHECK_NAN", "1") == "0" or _capturing(t):
        return
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_tensor(name, t, *, dim=None, dtype=None, floating=None, device=None, shape=None):
    """Type / rank / dtype / device / shape checks with errors that name ``name``."""
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if floating is True and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if floating is False and (t.is_floating_point() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, (tuple, list)) else (dtype,)
        if t.dtype not in allowed:
            raise TypeError(f"{name} must have dtype {' or '.join(map(str, allowed))}, got {t.dtype}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    return t


# Classifier-free guidance scales the tools take: 1 (no guidance) up to this; larger scales push the
# guided prediction towards float32 overflow (NaN / Inf samples) long before they could mean anything
MAX_CFG_SCALE = 1000.0


def cfg_scale_problem(value) -> Optional[str]:
    """Why ``value`` is not a CFG scale of the command-line tools (a finite number in 1 .. MAX_CFG_SCALE), or None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        1.0 <= value <= MAX_CFG_SCALE
    if ok:
        return None
    return (f"must be a finite number in 1 .. {MAX_CFG_SCALE:g} (1: no guidance; the official scripts guide above "
            f"1; larger scales overflow float32), got {value!r}")


# ----------------------------------------------------------------------------- files
# Helpers for the command-line tools: every write is atomic (temp file in the same
# directory, fsync, os.replace), every read of a user-provided file is safe
# (no pickle code execution) and fails with one line that names the file.

TMP_SUFFIX = ".tmp"


class FileProblem(ValueError):
    """A user-provided file is missing, damaged or of the wrong kind (the message names it)."""


def _pid() -> int:  # a function so that tests can give a simulated killed run another process id
    return os.getpid()


def tmp_path_for(path: str) -> str:
    """The temporary name an atomic write of ``path`` uses (same directory, hidden, per process)."""
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.{_pid()}{TMP_SUFFIX}")


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write, *, binary: bool = True) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temp file beside it, then fsync and os.replace.

    Readers see the old file or the complete new one, never a partial one.  An
    ordinary error or an interrupt (``KeyboardInterrupt``: Ctrl-C, or a signal a tool
    turns into one) removes the temp file; a kill leaves it (a hidden
    ``.NAME.PID.tmp``) for :func:`remove_stale_tmp` to clean up on resume.
    """
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (Exception, KeyboardInterrupt):
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_json(path: str, obj) -> None:
    import json

    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), binary=False)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_safetensors(tensors: dict, path: str, metadata=None) -> None:
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def remove_stale_tmp(directory: str, names=None) -> list:
    """Delete temp files left in ``directory`` by interrupted atomic writes; returns their paths.

    ``names``: only temp files of these final file names (default: every ``.*.tmp``).
    """
    import glob

    if not os.path.isdir(directory):
        return []
    if names is None:
        found = glob.glob(os.path.join(glob.escape(directory), f".*{TMP_SUFFIX}"))
    else:
        found = []
        for n in names:
            found += glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(n)}.*{TMP_SUFFIX}"))
    removed = []
    for p in sorted(set(found)):
        try:
            os.remove(p)
            removed.append(p)
        except OSError:
            pass
    return removed


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content (identity of weights, whatever the file is called)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def safe_torch_load(path: str, what: str = "file", map_location="cpu", allow=()):
    """``torch.load(weights_only=True)`` with one-line errors that name ``path``.

    Only tensors and plain Python containers/scalars load (plus the classes in
    ``allow``, e.g. ``argparse.Namespace`` for official training checkpoints);
    a pickle that would run code is refused, never executed.
    """
    import pickle

    if not os.path.isfile(path):
        raise FileProblem(f"{what} {path!r} not found")
    if os.path.getsize(path) == 0:
        raise FileProblem(f"{what} {path!r} is empty (an interrupted write?)")
    try:
        if allow:
            with torch.serialization.safe_globals(list(allow)):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        if m or "Weights only load failed" in msg:
            found = f" (it references {m.group(1)})" if m else ""
            raise FileProblem(f"{what} {path!r} holds Python objects other than tensors and plain data{found}; "
                              f"refused: loading it could run code. Only load files you made or trust, with "
                              f"tools that expect them") from None
        raise FileProblem(f"{what} {path!r} is damaged or not a torch checkpoint ({_first_sentence(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise FileProblem(f"{what} {path!r} is damaged or not a torch checkpoint "
                          f"({type(e).__name__}: {_first_sentence(e)})") from None


def _first_sentence(e: BaseException) -> str:
    s = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    cut = s.find(". ")
    return s[:cut] if cut > 0 else s


def safe_load_safetensors(path: str, what: str = "file", device="cpu"):
    """``(tensors, metadata)`` of a .safetensors file, with one-line errors that name ``path``."""
    if not os.path.isfile(path):
        raise FileProblem(f"{what} {path!r} not found")
    if os.path.getsize(path) == 0:
        raise FileProblem(f"{what} {path!r} is empty (an interrupted write?)")
    try:
        from safetensors import safe_open

        tensors = {}
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        return tensors, dict(meta)
    except Exception as e:  # safetensors raises its own error types for damaged headers and data
        raise FileProblem(f"{what} {path!r} is damaged or not a .safetensors file ({_first_sentence(e)})") from None


def read_json_file(path: str, what: str = "file"):
    """Parse a JSON file; a damaged file (also one nested too deeply for the parser) raises
    :class:`FileProblem` naming it."""
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileProblem(f"{what} {path!r} not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise FileProblem(f"{what} {path!r} is damaged or not JSON ({e})") from None
    except RecursionError:
        raise FileProblem(f"{what} {path!r} is damaged or not JSON (nested too deeply to parse)") from None
    except OSError as e:
        raise FileProblem(f"{what} {path!r} cannot be read ({e.strerror or e})") from None


def check_output_path(opt: str, path: str, *, suffixes=(), protected=()) -> str:
    """Validate an output file path before any long work; returns the absolute path.

    Checks the extension (one of ``suffixes``, case-insensitive), that it is not
    a directory, not one of the ``protected`` files (model weights and
    configs), and that its directory exists (or can be created) and is writable.
    """
    if not path or path.endswith(os.sep):
        raise FileProblem(f"{opt} {path!r}: expected a file path")
    ap = os.path.abspath(path)
    if os.path.isdir(ap):
        raise FileProblem(f"{opt} {path!r} is a directory, expected a file path")
    if suffixes and not ap.lower().endswith(tuple(s.lower() for s in suffixes)):
        raise FileProblem(f"{opt} {path!r}: the file name must end with {' or '.join(suffixes)}")
    for p in protected:
        if p and os.path.exists(p) and os.path.exists(ap) and os.path.samefile(p, ap):
            raise FileProblem(f"{opt} {path!r} is an input file of this run ({p!r}); refusing to overwrite it")
    if os.path.exists(ap) and ap.lower().endswith((".safetensors", ".pt", ".pth", ".ckpt", ".bin")):
        raise FileProblem(f"{opt} {path!r} is an existing weights file; refusing to overwrite it")
    parent = os.path.dirname(ap)
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise FileProblem(f"{opt} {path!r}: {probe!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FileProblem(f"{opt} {path!r}: directory {probe!r} is not writable")
    # a real write in the nearest existing directory (catches read-only mounts, and a full device
    # for these 4 KiB; permission bits alone say nothing for root)
    try:
        _write_probe(os.path.join(probe, f".{os.path.basename(ap)}.{os.getpid()}.probe{TMP_SUFFIX}"))
    except OSError as e:
        raise FileProblem(f"{opt} {path!r}: cannot write in {probe!r} ({e.strerror or e})") from None
    return ap


def _write_probe(tmp: str) -> None:
    """Write, fsync and delete 4 KiB at ``tmp`` (raises OSError where the directory takes no writes)."""
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable_dir(opt: str, directory: str) -> None:
    """``directory`` (created if missing) accepts a real write; else :class:`FileProblem` naming ``opt``."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileProblem(f"{opt} {directory!r} exists and is not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
        _write_probe(os.path.join(directory, f".write-probe.{os.getpid()}{TMP_SUFFIX}"))
    except OSError as e:
        raise FileProblem(f"{opt} {directory!r}: cannot write there ({e.strerror or e})") from None

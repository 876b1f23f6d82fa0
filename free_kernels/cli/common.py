"""What every command-line tool of this package shares: loading, argument checks, seeding, the baseline.

Used by ``free-sample`` (:mod:`free_kernels.cli.sample`), ``free-train-drafter``
(:mod:`free_kernels.cli.train_drafter`), the official-script twins
``python/sample.py`` and ``python/sample_ddp.py``, and the benchmarks in
``bench/``.  The module is public (no leading underscore) because the scripts
in ``python/`` and ``bench/`` live outside the package and import it like any
user would; they import nothing private.

Problems are raised as :class:`UsageError` with one line that names the option
or file; each tool turns it into its own exit (status 2): ``free-sample``
through argparse, ``free-train-drafter`` as its ``TrainError``, the scripts in
``python/`` with ``error: ...``.

Files
    The file-safety helpers every tool writes and reads its files with are
    re-exported here, so that the scripts need no private module: atomic writes
    (``atomic_write``, ``atomic_write_json``: temporary file in the same
    directory, fsync, rename), output checks before any long work
    (``check_output_path``, ``check_writable_dir``), clean-up of the temporary
    files a killed run left (``remove_stale_tmp``), one-line errors for damaged
    files (``FileProblem``, ``read_json_file``) and content hashes
    (``file_sha256``).

Loading
    :func:`load_target` is the one target loader: the embedded demo DiT
    (``None`` / ``"demo"``), a DiT in this package's format (``.safetensors``
    weights + the ``.json`` ``{"config": {...}}`` beside them, missing keys taken
    from the demo config), or an official-layout checkpoint (``.pt`` or
    ``.safetensors``, read with ``find_model``: plain state dict, training
    checkpoint with ``"ema"``) built as the ``--model`` config with the
    geometry read from the weights.  :func:`load_drafter` loads a saved
    :class:`~free_kernels.models.FeatureDrafter`, the frozen drafter, or the demo
    drafter.

The baseline
    :func:`sample_baseline` is the official DiT sampling call: ``p_sample_loop``
    over ``forward_with_cfg`` on the doubled batch ``[x; x]`` with labels
    ``[y; null]`` when classifier-free guidance is on, over ``forward``
    otherwise, ``clip_denoised=False`` unless asked.  Guidance is on exactly when
    ``cfg_scale > 1`` (:func:`uses_cfg`): the rule of the official
    ``sample_ddp.py`` (``using_cfg = args.cfg_scale > 1.0``, after asserting
    ``cfg_scale >= 1``).  The official ``sample.py`` always doubles the batch,
    which at scale 1 gives the conditional prediction again (cond + 1 x (cond -
    uncond)), so the two official scripts sample the same model for every
    scale >= 1 (same distribution; not the same pixels, the random draws differ);
    :func:`check_cfg_scale` refuses scales below 1, as ``sample_ddp.py`` does,
    so that no tool silently ignores a scale it cannot honour.

Interruption
    :func:`interruptible` makes SIGTERM and SIGHUP end a run the way Ctrl-C (SIGINT) does, by an
    :class:`Interrupted` exception (a ``KeyboardInterrupt``) that unwinds through the atomic writes (a
    temporary file being written is removed); a second signal while unwinding is ignored.  Each tool's
    entry point turns it into one line and the exit status 128 + the signal
    number (130 for Ctrl-C) with :func:`interrupt_signal`, which also recognises an interrupt that a
    library turned into its own error (``torch.save`` does).

Seeding
    Every tool keeps its own documented seed policy (changing one would change
    the samples a seed gives, and ``python/sample_ddp.py`` must re-create the
    same samples on resume), but they share the code path: a sample's x_T is
    :func:`noise_from_seeds` of its seed, and the baseline draws its step noise
    from per-sample generators (:func:`per_sample_generators`).  ``free-sample``
    derives its seeds with :func:`derive_seed` (``(seed, stream, sample index)``:
    stream 0 for x_T, 1 and 2 for the conditional and unconditional rows of the
    baseline, 3 for FREE); ``python/sample_ddp.py`` with its ``SEED_POLICY``;
    ``python/sample.py`` seeds torch's global generator, as the official script.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._checks import MAX_CFG_SCALE, cfg_scale_problem
from .._checks import (  # noqa: F401  (re-exported: the file-safety helpers of every tool)
    FileProblem, atomic_write, atomic_write_json, check_output_path, check_writable_dir, file_sha256,
    read_json_file, remove_stale_tmp,
)
from ..diffusion.guidance import uses_cfg  # the guidance rule every tool and script applies

__all__ = [
    "UsageError", "first_line", "json_beside",
    "resolve_device", "check_positive", "check_nonnegative", "check_finite", "check_cfg_scale", "MAX_CFG_SCALE",
    "check_seed", "MAX_SEED", "check_threads", "available_cores", "check_backend_environment",
    "check_image_size", "parse_labels", "check_labels", "check_draft_length", "cap_draft_length",
    "is_demo", "target_file", "load_target", "load_target_file", "load_official_checkpoint",
    "drafter_file", "load_drafter",
    "derive_seed", "noise_from_seeds", "initial_noise", "baseline_generators", "per_sample_generators",
    "uses_cfg", "sample_baseline",
    "NOISE_STREAM", "BASELINE_STREAM", "BASELINE_UNCOND_STREAM", "FREE_STREAM",
    "FileProblem", "atomic_write", "atomic_write_json", "check_output_path", "check_writable_dir", "file_sha256",
    "read_json_file", "remove_stale_tmp",
    "Interrupted", "interruptible", "interrupt_signal", "file_states", "changed_files",
]


class UsageError(Exception):
    """An option or input-file problem: one line naming the option or file (each tool exits with status 2)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def json_beside(path: str) -> str:
    """The ``.json`` config that belongs to a ``.safetensors`` file (``x.safetensors`` -> ``x.json``)."""
    return path[: -len(".safetensors")] + ".json" if path.endswith(".safetensors") else path + ".json"


# ------------------------------------------------------------------ interruption
class Interrupted(KeyboardInterrupt):
    """A run ended by a signal (SIGINT, SIGTERM, SIGHUP): ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)


INTERRUPT_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def interruptible():
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread (the first one only; the
    clean-up it starts is not interrupted again); the previous handlers are restored on exit."""
    fired: List[int] = []

    def handler(signum, frame):
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous = {}
    for sig in INTERRUPT_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread: the default behaviour stays
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def interrupt_signal(e: BaseException) -> Optional[int]:
    """The signal number when ``e``, or an exception it arose from, is an interrupt (a bare
    ``KeyboardInterrupt`` counts as SIGINT); None for any other error."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, Interrupted):
            return e.signum
        if isinstance(e, KeyboardInterrupt):
            return int(signal.SIGINT)
        e = e.__cause__ or e.__context__
    return None


def file_states(paths: Iterable[Optional[str]]) -> Dict[str, Optional[tuple]]:
    """{path: (inode, size, mtime) or None when absent}: what :func:`changed_files` compares with later."""
    out: Dict[str, Optional[tuple]] = {}
    for p in paths:
        if not p:
            continue
        try:
            st = os.stat(p)
            out[p] = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            out[p] = None
    return out


def changed_files(before: Dict[str, Optional[tuple]]) -> List[str]:
    """The paths of ``before`` (:func:`file_states`) that were written, replaced or deleted since."""
    now = file_states(before)
    return [p for p in before if now[p] != before[p]]


# ------------------------------------------------------------------ argument checks
def resolve_device(name: Optional[str], option: str = "--device") -> torch.device:
    """``None`` -> cuda if available, else cpu; otherwise cpu, cuda or cuda:N, checked against this machine."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{option} {name!r}: unknown device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UsageError(f"{option} {name!r}: unsupported device (use cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise UsageError(f"{option} {name}: CUDA is not available to this torch ({torch.__version__}); "
                         f"use {option} cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"{option} {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev


def check_positive(value, option: str) -> int:
    """An int >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{option} must be >= 1, got {value}")
    return int(value)


def check_nonnegative(value, option: str) -> int:
    """An int >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise UsageError(f"{option} must be >= 0, got {value}")
    return int(value)


def check_finite(value, option: str, *, minimum: Optional[float] = None, above: Optional[float] = None) -> float:
    """A finite float, ``>= minimum`` and/or ``> above`` when given."""
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool) and \
        math.isfinite(value) and (minimum is None or value >= minimum) and (above is None or value > above)
    if not ok:
        bound = f" >= {minimum:g}" if minimum is not None else (f" > {above:g}" if above is not None else "")
        raise UsageError(f"{option} must be a finite number{bound}, got {value}")
    return float(value)


def check_cfg_scale(value, option: str = "--cfg-scale") -> float:
    """A finite CFG scale in 1 .. :data:`MAX_CFG_SCALE` (the official ``sample_ddp.py`` asserts >= 1; guidance
    is on above 1; far larger scales overflow float32)."""
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    why = cfg_scale_problem(value)
    if why is not None:
        raise UsageError(f"{option} {why}")
    return float(value)


def check_backend_environment() -> None:
    """The ``FREE_KERNELS_BACKEND*`` variables, before anything is loaded: a bad per-op variable is a
    :class:`UsageError` naming it; an ignored global value is a one-line warning (``free_kernels.ops``)."""
    from ..ops import check_environment

    try:
        check_environment()
    except ValueError as e:
        raise UsageError(str(e)) from None


MAX_SEED = 2 ** 32 - 1


def check_seed(value, option: str = "--seed") -> int:
    """An int in 0 .. 2**32 - 1: every tool's seeds are 32-bit words, and a larger or negative seed would be
    folded onto one of them (the same samples as another seed)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_SEED:
        raise UsageError(f"{option} must be an integer in 0 .. {MAX_SEED}, got {value!r}")
    return int(value)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(value, option: str = "--threads") -> int:
    """0 (the tool's automatic choice) or 1 .. the CPU cores available: more threads than cores only wait on
    each other (at hundreds a run, its calibration included, does not finish)."""
    check_nonnegative(value, option)
    cores = available_cores()
    if value > cores:
        raise UsageError(f"{option} {value}: this machine gives the process {cores} CPU core(s); use 0 (automatic) "
                         f"or 1 .. {cores}")
    return int(value)


def check_image_size(value, option: str = "--image-size") -> int:
    """An image size of a latent DiT: a positive multiple of 8 (latent = size / 8)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 8 or value % 8:
        raise UsageError(f"{option} must be a positive multiple of 8, got {value}")
    return int(value)


def parse_labels(text: str, option: str = "--labels") -> List[int]:
    """``"3,1,4"`` -> [3, 1, 4]."""
    parts = [s.strip() for s in str(text).split(",")]
    if not str(text).strip() or any(s == "" for s in parts):
        raise UsageError(f"{option} must be comma-separated integers, got {text!r}")
    try:
        return [int(s) for s in parts]
    except ValueError:
        raise UsageError(f"{option} must be comma-separated integers, got {text!r}") from None


def check_labels(labels: Sequence[int], num_classes: int, option: str = "--labels") -> List[int]:
    """Every label in 0 .. num_classes - 1."""
    bad = [int(v) for v in labels if not 0 <= int(v) < int(num_classes)]
    if bad:
        raise UsageError(f"{option} {bad} are out of range: this target has {num_classes} classes "
                         f"(0 .. {int(num_classes) - 1})")
    return [int(v) for v in labels]


def check_draft_length(value, option: str = "--draft-length", *, allow_auto: bool = True):
    """``"auto"`` or an int >= 1, by :func:`free_kernels.planner.check_draft_length` (the one validator).

    A command-line string that is a number is converted first.  ``allow_auto=False``
    for the tools that keep a fixed draft length (the ``python/`` twins: a planned run
    follows measured timings, and a resumed FID run must re-create the same samples).
    """
    from ..planner import check_draft_length as planner_check

    if isinstance(value, str) and value != "auto":
        try:
            value = int(value)
        except ValueError:
            pass
    fixed_only = f"{option} must be an int >= 1 (this tool keeps a fixed draft length), got {value!r}"
    if not allow_auto and value == "auto":
        raise UsageError(fixed_only)
    try:
        return planner_check(value, option)
    except ValueError as e:
        raise UsageError(str(e) if allow_auto else fixed_only) from None


def cap_draft_length(value, num_steps: int):
    """A fixed draft length capped at the number of sampling steps (a round never drafts past the last step)."""
    return value if value == "auto" else min(int(value), int(num_steps))


# ------------------------------------------------------------------ targets
def is_demo(spec: Optional[str]) -> bool:
    """The embedded demo target is meant (no path, ``""`` or ``"demo"``)."""
    return spec in (None, "", "demo")


def target_file(spec: Optional[str]) -> str:
    """The target's file: the demo DiT's for :func:`is_demo` specs, else ``spec``."""
    from .. import demo

    return demo.TARGET_FILE if is_demo(spec) else spec


def load_target(spec: Optional[str], device="cpu", *, model: Optional[str] = None,
                image_size: Optional[int] = None, num_classes: Optional[int] = None,
                in_channels: Optional[int] = None, option: str = "--target",
                model_option: str = "--model") -> Tuple[torch.nn.Module, str]:
    """(target in eval mode on ``device``, its file): the one target loader of the command-line tools.

    * ``spec`` None / "" / "demo": the embedded demo DiT;
    * a ``.safetensors`` file with its ``.json`` config beside it, or any ``.safetensors``
      file when ``model`` is None: this package's format (:func:`load_target_file`);
    * anything else: an official-layout checkpoint built as ``model`` (a ``DiT_models``
      name), checked against ``image_size`` / ``num_classes`` / ``in_channels`` where given
      (:func:`load_official_checkpoint`).
    """
    demo = is_demo(spec)
    path = target_file(spec)
    if not os.path.isfile(path):
        hint = " (the embedded demo assets are missing: train them or pass --target/--drafter)" if demo else ""
        raise UsageError(f"{option} {path!r} not found{hint}")
    if path.endswith(".safetensors") and (os.path.isfile(json_beside(path)) or model is None):
        return load_target_file(path, device, option=option), path
    if model is None:
        from ..models.dit import DiT_models

        raise UsageError(f"{option} {path!r} is not in our .safetensors + .json format: pass {model_option} "
                         f"(one of {sorted(DiT_models)}) and --image-size for an official checkpoint")
    input_size = None
    if image_size is not None:
        input_size = check_image_size(image_size) // 8
    net = load_official_checkpoint(path, device, model=model, input_size=input_size, num_classes=num_classes,
                                   in_channels=in_channels, option=option, model_option=model_option)
    return net, path


def load_target_file(path: str, device="cpu", *, option: str = "--target") -> torch.nn.Module:
    """A DiT in this package's format: ``.safetensors`` weights + ``.json`` ``{"config": {...}}`` beside them.

    Keys missing from the config (or a missing ``.json``) take the demo DiT's values.
    A damaged weights or config file is named in one line.
    """
    from .._checks import safe_load_safetensors
    from ..demo import DEMO_CONFIG
    from ..models.dit import DiT, config_problem, load_state_dict_strict

    if not os.path.isfile(path):
        raise UsageError(f"{option} {path!r} not found")
    cfg_path = json_beside(path)
    cfg = dict(DEMO_CONFIG)
    try:
        state, _ = safe_load_safetensors(path, option)  # a damaged file is named before the model is built
        if os.path.isfile(cfg_path):
            doc = read_json_file(cfg_path, f"{option} config")
            if not isinstance(doc, dict) or not isinstance(doc.get("config", {}), dict):
                raise FileProblem(f"{option} config {cfg_path!r} has no {{\"config\": {{...}}}} object")
            cfg.update(doc.get("config", {}))
    except FileProblem as e:
        raise UsageError(str(e)) from None
    why = config_problem(cfg, state)  # before building: a config claiming huge sizes allocates nothing
    try:
        if why is not None:
            raise ValueError(why)
        net = DiT(**cfg)
        load_state_dict_strict(net, state)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"{option} {path!r} does not match its config {cfg_path!r}: {first_line(e)}") from None
    return net.to(device).eval()


def load_official_checkpoint(path: str, device="cpu", *, model: str, input_size: Optional[int] = None,
                             num_classes: Optional[int] = None, in_channels: Optional[int] = None,
                             option: str = "--ckpt", model_option: str = "--model") -> torch.nn.Module:
    """An official-layout DiT checkpoint (``find_model``: state dict, ``"ema"`` entry, or .safetensors).

    The model is the ``model`` config of ``DiT_models``; its latent size, channels,
    classes and learned variance are read from the weights (a checkpoint has a null-class
    row), and ``input_size`` / ``num_classes`` / ``in_channels`` are checked against
    them where given.
    """
    from ..models.dit import DiT_models, find_model, load_state_dict_strict

    if not os.path.isfile(path):
        raise UsageError(f"{option} {path!r} not found (official weights cannot be downloaded from here: "
                         f"pass a local file)")
    if model not in DiT_models:
        raise UsageError(f"{model_option} must be one of {sorted(DiT_models)} for {option} {path!r}, got {model!r}")
    try:
        sd = find_model(path)
    except Exception as e:  # noqa: BLE001 - damaged / foreign files: one line naming the file
        msg = first_line(e)
        raise UsageError(msg if path in msg else f"cannot load {option} {path!r}: {msg}") from None
    try:
        hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
        n_tok = sd["pos_embed"].shape[1]
        out_rows = sd["final_layer.linear.weight"].shape[0]
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
    except (KeyError, ValueError, AttributeError) as e:
        raise UsageError(f"{option} {path!r} is not an official-layout DiT checkpoint (missing or malformed "
                         f"{first_line(e)})") from None
    size = int(round(n_tok ** 0.5)) * int(p)
    classes = int(rows) - 1  # the null-class row of classifier-free guidance
    if num_classes is not None and int(num_classes) != classes:
        raise UsageError(f"--num-classes {num_classes} but {option} {path!r} has {classes} classes "
                         f"(+ the null row)")
    if in_channels is not None and int(in_channels) != int(in_ch):
        raise UsageError(f"--in-channels {in_channels} but {option} {path!r} has {int(in_ch)} input channels")
    if input_size is not None and int(input_size) != size:
        raise UsageError(f"--image-size {int(input_size) * 8} does not fit {option} {path!r}: its latent is "
                         f"{size}x{size} (image size {size * 8})")
    try:
        net = DiT_models[model](input_size=size, in_channels=int(in_ch), num_classes=classes,
                                learn_sigma=int(out_rows) == 2 * int(in_ch) * int(p) ** 2)
        load_state_dict_strict(net, sd)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"{option} {path!r} does not fit {model_option} {model}: {first_line(e)}") from None
    return net.to(device).eval()


# ------------------------------------------------------------------ drafters
def drafter_file(spec: Optional[str], *, demo_target: bool = False) -> Optional[str]:
    """The drafter's ``.safetensors`` path, or None for the frozen drafter.

    ``spec`` None means the demo drafter with the demo target (``demo_target``), else frozen.
    """
    from .. import demo

    if spec is None:
        spec = demo.DRAFTER_FILE if demo_target else "frozen"
    if spec == "frozen":
        return None
    return spec if spec.endswith(".safetensors") else spec + ".safetensors"


def load_drafter(spec: Optional[str], target, device="cpu", *, demo_target: bool = False,
                 option: str = "--drafter"):
    """(drafter in eval mode, its file or ``"frozen"``, the training record saved with it or {}).

    ``spec``: a saved :class:`~free_kernels.models.FeatureDrafter` (``.safetensors`` +
    ``.json``), ``"frozen"`` (training-free h = h_prev), or None (see :func:`drafter_file`).
    The drafter is checked against ``target`` and attached to it.
    """
    from ..models.drafter import FeatureDrafter, FrozenFeatureDrafter

    path = drafter_file(spec, demo_target=demo_target)
    if path is None:
        return FrozenFeatureDrafter(target), "frozen", {}
    if not os.path.isfile(path):
        hint = (f" (the embedded demo drafter is missing: train it or pass {option} PATH / frozen)"
                if spec is None else "")
        raise UsageError(f"{option} {path!r} not found{hint}")
    try:
        drafter = FeatureDrafter.load(path, target=target, map_location=device)
    except Exception as e:  # noqa: BLE001 - any failure: one line naming the file
        msg = first_line(e)
        raise UsageError(msg if path in msg or path[: -len(".safetensors")] in msg
                         else f"cannot use {option} {path!r}: {msg}") from None
    return drafter.eval(), path, dict(drafter.extra)


# ------------------------------------------------------------------ seeding
NOISE_STREAM, BASELINE_STREAM, BASELINE_UNCOND_STREAM, FREE_STREAM = 0, 1, 2, 3


def derive_seed(*words: int) -> int:
    """An independent 63-bit seed per tuple of integers (``free-sample``: (seed, stream, sample index))."""
    s = np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words]).generate_state(2, dtype=np.uint32)
    return int(s[0]) << 31 ^ int(s[1])


def noise_from_seeds(seeds: Sequence[int], shape) -> torch.Tensor:
    """x_T of each sample from its own seed: ``randn(shape)`` of a CPU generator seeded with it.

    The same tensor :meth:`FreeSampler.sample_stream` makes from a request's seed; a sample's
    x_T does not depend on the others in its batch.
    """
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


def initial_noise(seed: int, n: int, shape, first: int = 0) -> torch.Tensor:
    """x_T of samples first .. first+n-1 under ``free-sample``'s seeding (stream 0; sample k is the same whatever n)."""
    return noise_from_seeds([derive_seed(seed, NOISE_STREAM, first + k) for k in range(n)], shape)


def per_sample_generators(seeds: Sequence[int], device="cpu") -> List[torch.Generator]:
    """One seeded generator per sample (the baseline's per-row step noise)."""
    from ..diffusion import per_sample_generators as make

    return make(seeds, device=device)


def baseline_generators(seed: int, n: int, *, first: int = 0, device="cpu", cfg_scale: float = 1.0):
    """(conditional, unconditional or None) per-sample generators of ``free-sample``'s baseline.

    Row k draws from stream (seed, 1, first + k); with guidance the unconditional row of the
    doubled batch draws from (seed, 2, first + k), so a sample's result does not depend on its batch.
    """
    cond = per_sample_generators([derive_seed(seed, BASELINE_STREAM, first + k) for k in range(n)], device)
    if not uses_cfg(cfg_scale):
        return cond, None
    return cond, per_sample_generators([derive_seed(seed, BASELINE_UNCOND_STREAM, first + k) for k in range(n)],
                                       device)


# ------------------------------------------------------------------ the baseline
@torch.no_grad()
def sample_baseline(model, diffusion, noise: torch.Tensor, y: torch.Tensor, *, cfg_scale: float = 1.0,
                    guidance_channels: int = 3, clip_denoised: bool = False, generator=None,
                    uncond_generator=None, progress: bool = False, wrap=None) -> torch.Tensor:
    """The official DiT sampling call on the B samples ``noise`` with labels ``y``; returns the B samples.

    With guidance (:func:`uses_cfg`): ``p_sample_loop(model.forward_with_cfg, ...)`` on
    ``[noise; noise]`` with labels ``[y; null]`` and the first half kept; else
    ``p_sample_loop(model.forward, ...)``.  ``diffusion`` may be the drop-in FREE
    diffusion (:func:`free_kernels.dit.create_diffusion` with a drafter): the model's
    own bound method is passed, so it finds the model.

    ``generator``: None (torch's global generator, as the official scripts), one
    ``torch.Generator``, or a list of B per-sample generators; with guidance the
    unconditional rows then draw from ``uncond_generator`` (B more) or, when it is None,
    from the same B generators after the conditional rows.  ``wrap``: a function
    applied to the model call (e.g. to count target calls).
    """
    n = noise.shape[0]
    if uses_cfg(cfg_scale):
        z = torch.cat([noise, noise], 0)
        yy = torch.cat([y, torch.full_like(y, int(model.num_classes))], 0)  # null class (1000 for ImageNet)
        kwargs = dict(y=yy, cfg_scale=float(cfg_scale), guidance_channels=int(guidance_channels))
        fn = model.forward_with_cfg
        if isinstance(generator, (list, tuple)):
            generator = list(generator) + list(generator if uncond_generator is None else uncond_generator)
    else:
        z, kwargs, fn = noise, dict(y=y), model.forward
    if wrap is not None:
        fn = wrap(fn)
    out = diffusion.p_sample_loop(fn, z.shape, z, clip_denoised=clip_denoised, model_kwargs=kwargs,
                                  progress=progress, device=z.device, generator=generator)
    return out[:n]

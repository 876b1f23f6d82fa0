"""Test-session setup shared by every test.

Order matters here:
1. Thread caps go into the environment before torch is imported (2 cores).
2. TRITON_INTERPRET=1 is set when CUDA is unavailable, before anything imports
   triton: the interpreter is read at import time.  An explicit
   TRITON_INTERPRET in the environment is respected.
3. The ``gpu`` marker skips, with a reason, when torch.cuda.is_available() is
   false.  Nothing here needs a GPU.
4. ``FREE_KERNELS_REQUIRE_GPU=1`` (set by bench/run_gpu.py on the GPU machine)
   turns a skip of a GPU case into a failure: any test carrying the ``gpu``
   marker, and any test whose id names a ``cuda`` or ``triton`` backend.  On a
   GPU such a skip means a kernel was not exercised, which must not read as a
   pass.  Expected failures (xfail) and the deliberate skips of CPU-only
   checks (reasons matching ``CPU_ONLY_SKIP``) are left alone.
5. ``FREE_KERNELS_GPU_CASES_ONLY=1`` deselects every test that is not such a
   GPU case (bench/run_gpu.py: the GPU slice is too short for the CPU suite).
   Unlike ``-k``, this looks at the test's name and parameters only, not at
   its file or folder name.
"""
import os
import re
import sys

os.environ.setdefault("OMP_NUM_THREADS", "2")
# the draft planner's cost-model cache (draft_length="auto") goes to a private folder, not ~/.cache
if "FREE_KERNELS_CACHE" not in os.environ:
    import tempfile

    os.environ["FREE_KERNELS_CACHE"] = tempfile.mkdtemp(prefix="free_kernels_test_cache_")
os.environ.setdefault("MKL_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402  (torch itself does not import triton)

CUDA_AVAILABLE = torch.cuda.is_available()

if not CUDA_AVAILABLE:
    if "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ:
        # Too late to switch the interpreter on for this process: say so loudly.
        print("conftest: triton was imported before TRITON_INTERPRET could be set; "
              "Triton tests on CPU will fail", file=sys.stderr)
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))

GPU_SKIP_REASON = "needs a CUDA GPU (torch.cuda.is_available() is False)"
def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


REQUIRE_GPU = _flag("FREE_KERNELS_REQUIRE_GPU")
GPU_CASES_ONLY = _flag("FREE_KERNELS_GPU_CASES_ONLY")
# skip reasons of checks that exist for CPU machines only: still skips under REQUIRE_GPU
CPU_ONLY_SKIP = re.compile(r"CPU-only|a GPU is present|on CPU|interpreter|not the default architecture list",
                           re.IGNORECASE)


def is_gpu_case(item) -> bool:
    """A test whose skip would hide a kernel: the gpu marker, or a cuda / triton backend in its id."""
    if item.get_closest_marker("gpu") is not None:
        return True
    ident = item.nodeid.split("::", 1)[-1].lower()
    return "cuda" in ident or "triton" in ident


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped when torch.cuda.is_available() is false")


def pytest_collection_modifyitems(config, items):
    if GPU_CASES_ONLY:
        keep = [it for it in items if is_gpu_case(it)]
        drop = [it for it in items if not is_gpu_case(it)]
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep
    if CUDA_AVAILABLE:
        return
    skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if not REQUIRE_GPU:
        return
    rep = outcome.get_result()
    if rep.skipped and not hasattr(rep, "wasxfail") and is_gpu_case(item):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3 else str(rep.longrepr)
        if CPU_ONLY_SKIP.search(reason):
            return
        rep.outcome = "failed"
        rep.longrepr = f"skipped under FREE_KERNELS_REQUIRE_GPU=1 (a GPU case must run): {reason}"


def pytest_report_header(config):
    return (f"free_kernels tests: torch {torch.__version__}, cuda available: {CUDA_AVAILABLE}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}, threads: {torch.get_num_threads()}"
            f"{', FREE_KERNELS_REQUIRE_GPU=1: skipped GPU cases fail' if REQUIRE_GPU else ''}")

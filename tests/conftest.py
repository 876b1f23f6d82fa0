"""Test-session setup shared by every test.

Order matters here:
1. Thread caps go into the environment before torch is imported (2 cores).
2. TRITON_INTERPRET=1 is set when CUDA is unavailable, before anything imports
   triton: the interpreter is read at import time.  An explicit
   TRITON_INTERPRET in the environment is respected.
3. The ``gpu`` marker skips, with a reason, when torch.cuda.is_available() is
   false.  Nothing here needs a GPU.
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "2")
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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped when torch.cuda.is_available() is false")


def pytest_collection_modifyitems(config, items):
    if CUDA_AVAILABLE:
        return
    skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_report_header(config):
    return (f"free_kernels tests: torch {torch.__version__}, cuda available: {CUDA_AVAILABLE}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}, threads: {torch.get_num_threads()}")

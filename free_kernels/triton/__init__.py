"""Triton kernels (``@triton.jit``) and their launchers, one module per op, named after it
(``free_kernels/triton/<op>.py``); launcher helpers shared by several ops in ``_common.py``.

Importing this package imports triton; the dispatch points in ``free_kernels.ops``
import these modules lazily, only when the triton backend is chosen.
"""

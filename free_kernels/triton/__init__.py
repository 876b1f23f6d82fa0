"""Triton kernels (``@triton.jit``) and their launchers, one module per op.

Importing this package imports triton; the dispatch points in ``free_kernels.ops``
import these modules lazily, only when the triton backend is chosen.
"""

"""Triton kernels (GPU; on a CPU they run under ``TRITON_INTERPRET=1`` for correctness tests).

Import the modules here only when a kernel is about to run: importing Triton is slow, and Triton decides
at decoration time whether a kernel is compiled or interpreted, so ``TRITON_INTERPRET`` must be set
before the first import.
"""

from __future__ import annotations

import importlib.util
import os


def available() -> bool:
    """Whether Triton is installed (it may still have no GPU to run on: see :func:`interpreted`)."""
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")

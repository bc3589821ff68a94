"""Where packed weights live for the CPU decode kernels: on transparent huge pages.

Decode streams every packed weight once per token. On 4 KiB pages a 7B-shaped layer spans thousands of
pages (more than the TLB holds) and the hardware prefetchers stop at each page boundary. Measured alone
(benchmarks/huge_pages.py, one token, 2 threads, weights cold) on an Intel Xeon, 2 MiB pages made the
kernels 1.01-1.09x faster (noted as 10-20% on the AMD EPYC where this was added; benchmarks/RESULTS.md).
``SparseLinear`` and the vLLM plugin place their CPU weights here.

Tensors under one huge page stay where they are (the allocation rounds up to whole pages). Set
``LOSA_HUGE_PAGES=0`` to keep every tensor on the default allocator (e.g. to measure the difference).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ._ext import ops

HUGE_PAGE_BYTES = 2 << 20
# Each copy starts one cache line into its first huge page, not on the 2 MiB boundary. On the Intel Xeon,
# 2:4 weights whose rows start exactly on 4 KiB boundaries (4096 columns: 4 KiB of values a row) decoded
# 5-11% slower from 2 MiB-aligned copies than from the default allocator's, and 4-6% faster with this
# offset (one token, 2 threads, layer streams, interleaved: RESULTS.md, "huge pages"). The default
# allocator's large blocks do not start on a page boundary either.
HUGE_PAGE_OFFSET = 64


def huge_pages_enabled() -> bool:
    return os.environ.get("LOSA_HUGE_PAGES", "1") not in ("0", "") and ops() is not None


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode: ``always``, ``madvise``, ``never``, or ``unknown``."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:  # not Linux, or no THP support
        return "unknown"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "unknown"


def placement_summary() -> str:
    """Where packed weights will live, in a few words (``losa-deploy env``)."""
    if ops() is None:
        return "default allocator (the compiled extension is not built)"
    if not huge_pages_enabled():
        return "default allocator (LOSA_HUGE_PAGES=0)"
    mode = thp_mode()
    if mode in ("always", "madvise"):
        return f"2 MiB huge pages (transparent huge pages: {mode})"
    return f"4 KiB pages (transparent huge pages: {mode}; the advice is ignored)"


def on_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a CPU ``tensor`` on huge pages, or ``tensor`` itself (small, not on the CPU, disabled, or
    in shared memory, where a copy would stop sharing it: ``Module.share_memory()``)."""
    if (tensor.device.type != "cpu" or tensor.nbytes < HUGE_PAGE_BYTES or tensor.is_shared()
            or not huge_pages_enabled()):
        return tensor
    return ops().huge_page_copy(tensor, HUGE_PAGE_OFFSET)


def place_for_decode(packed, changed: set[str] | None = None):
    """``packed`` (any layout with ``tensors()`` and ``replace()``) with its large CPU tensors on huge
    pages; ``changed``: only these tensors (the others are placed already)."""
    tensors = packed.tensors()
    placed = {name: on_huge_pages(t) for name, t in tensors.items() if changed is None or name in changed}
    moved = {name: t for name, t in placed.items() if t is not tensors[name]}
    return packed.replace(**moved) if moved else packed


__all__ = ["HUGE_PAGE_BYTES", "HUGE_PAGE_OFFSET", "huge_pages_enabled", "on_huge_pages", "place_for_decode",
           "placement_summary", "thp_mode"]

"""The GPU kernels' load-time layouts: the canonical arrays plus small derived offset tables.

Both are built once from a kernel weight (:class:`~.bitmask.BitmaskWeight`, :class:`~.nm.NMKernelLayout`)
on the weight's device, with tensor operations only, and share its ``values`` and ``mask`` tensors (no
copy). The tables exist so that a GPU program can start anywhere in a row without a prefix sum over
everything before it.

:class:`BitmaskGPULayout` adds ``chunk_offset``, int32 ``[out, ceil(in / 256)]``: the number of kept values
of row ``r`` before column ``256 * c`` (a row holds fewer than 2**31 values, so int32 suffices). A program
that decodes columns ``[256c, 256c + B)`` finds the value of a kept column at
``row_ptr[r] + chunk_offset[r, c] + (kept columns of the block before it)``, the last term being a prefix
sum over the block it already holds in registers. That costs 4 bytes per 256 weights (0.016 B/weight,
2% of the 0.725 B/weight of a 70%-sparse bf16 bitmask). The CUDA decode kernel
(``csrc/cuda/bitmask_gemv.cu``) does not need the table: a warp walks a whole row and scans popcounts.

:class:`NMGPULayout` (M divides 32) adds ``row_ptr`` (int64 ``[out + 1]``, where each row's values
start; the CPU kernel derives the starts from the block table on the host) and ``word_values`` (int32
``[out]``, 32·N/M for the row's N). In the filled load-time layout every group marks exactly N positions,
so every full 32-column word holds exactly 32·N/M values and word ``w`` of row ``r`` starts at
``row_ptr[r] + w * word_values[r]``: a fixed stride, no prefix sums beyond the word itself (the tail word
is partial, but it is the last one). The filled values and mask words with ``row_ptr`` are also a valid
bitmask weight: the CUDA decode kernel runs N:M weights through that view, and an M that does not divide
32 runs as a bitmask everywhere.

Both layouts expose ``row_ptr``, ``values`` and ``mask``: the bitmask view the CUDA kernel reads.

:class:`DeltaGPULayout` (``gpu_layout(weight, delta=True)``) is either of them plus the weight again in
the :mod:`delta layout <.delta>` (a copy: about 0.76 B/weight at 70% sparsity), which the CUDA op
``delta_linear`` reads at 1-16 tokens; every other token count runs on the bitmask view.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ...errors import LosaError
from .bitmask import WORD_BITS, BitmaskWeight, popcount
from .delta import DeltaWeight
from .nm import NMKernelLayout

CHUNK_COLS = 256  # columns per chunk_offset entry; the Triton kernels' column blocks are multiples of it
CHUNK_WORDS = CHUNK_COLS // WORD_BITS


def chunk_offsets(mask: torch.Tensor) -> torch.Tensor:
    """int32 ``[rows, ceil(words / 8)]``: kept columns of each row before each 256-column chunk."""
    rows, words = mask.shape
    chunks = -(-words // CHUNK_WORDS)
    counts = torch.zeros(rows, chunks * CHUNK_WORDS, dtype=torch.int32, device=mask.device)
    counts[:, :words] = popcount(mask).to(torch.int32)
    per_chunk = counts.view(rows, chunks, CHUNK_WORDS).sum(-1, dtype=torch.int32)
    return (per_chunk.cumsum(1, dtype=torch.int32) - per_chunk).contiguous()


class _KernelWeightView:
    """What every GPU layout forwards to its kernel weight."""

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    @property
    def values(self) -> torch.Tensor:
        return self.weight.values

    @property
    def mask(self) -> torch.Tensor:
        return self.weight.mask

    @property
    def device(self) -> torch.device:
        return self.weight.values.device


@dataclasses.dataclass(frozen=True, eq=False)
class BitmaskGPULayout(_KernelWeightView):
    """A :class:`BitmaskWeight` plus its ``chunk_offset`` table (see the module docstring)."""

    weight: BitmaskWeight
    chunk_offset: torch.Tensor  # int32 [out, ceil(in / 256)]

    @classmethod
    def build(cls, weight: BitmaskWeight) -> BitmaskGPULayout:
        return cls(weight, chunk_offsets(weight.mask))

    def __post_init__(self):
        rows, words = self.weight.mask.shape
        want = (rows, -(-words // CHUNK_WORDS))
        if self.chunk_offset.dtype != torch.int32 or tuple(self.chunk_offset.shape) != want:
            raise LosaError(f"bitmask GPU layout: chunk_offset must be int32 {list(want)}, got "
                            f"{self.chunk_offset.dtype} {list(self.chunk_offset.shape)}")
        if self.chunk_offset.device != self.weight.values.device:
            raise LosaError("bitmask GPU layout: chunk_offset is not on the weight's device")

    @property
    def row_ptr(self) -> torch.Tensor:
        return self.weight.row_ptr


@dataclasses.dataclass(frozen=True, eq=False)
class NMGPULayout(_KernelWeightView):
    """An :class:`NMKernelLayout` (M dividing 32) plus row offsets and word strides (module docstring)."""

    weight: NMKernelLayout
    row_ptr: torch.Tensor  # int64 [out + 1]
    word_values: torch.Tensor  # int32 [out]: 32 * N / M

    @classmethod
    def build(cls, weight: NMKernelLayout) -> NMGPULayout:
        if WORD_BITS % weight.m:
            raise LosaError(f"N:M GPU layout needs M dividing 32, got M = {weight.m} (run it as a bitmask)")
        row_ptr, row_n = _nm_rows(weight)
        return cls(weight, row_ptr, (row_n * (WORD_BITS // weight.m)).to(torch.int32).contiguous())

    def __post_init__(self):
        rows = self.weight.shape[0]
        if self.row_ptr.dtype != torch.int64 or tuple(self.row_ptr.shape) != (rows + 1,):
            raise LosaError(f"N:M GPU layout: row_ptr must be int64 [{rows + 1}]")
        if self.word_values.dtype != torch.int32 or tuple(self.word_values.shape) != (rows,):
            raise LosaError(f"N:M GPU layout: word_values must be int32 [{rows}]")
        if not self.row_ptr.device == self.word_values.device == self.weight.values.device:
            raise LosaError("N:M GPU layout: tables are not on the weight's device")


def _nm_rows(weight: NMKernelLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_ptr int64 [out + 1], N int64 [out]) of the filled layout, on the weight's device."""
    cols, m = weight.shape[1], weight.m
    row_n = weight.row_n().to(weight.values.device)
    stride = (cols // m) * row_n + (row_n * (cols % m) + m - 1) // m  # the tail keeps ceil(N*t/M)
    return torch.cat([stride.new_zeros(1), stride.cumsum(0)]), row_n


@dataclasses.dataclass(frozen=True, eq=False)
class DeltaGPULayout(_KernelWeightView):
    """A bitmask or N:M GPU layout (``base``) plus the same weight in the delta layout."""

    base: BitmaskGPULayout | NMGPULayout
    delta: DeltaWeight

    @property
    def weight(self) -> BitmaskWeight | NMKernelLayout:
        return self.base.weight

    @property
    def row_ptr(self) -> torch.Tensor:
        return self.base.row_ptr


GPULayout = BitmaskGPULayout | NMGPULayout | DeltaGPULayout


GPU_LAYOUTS = ("bitmask", "delta")


def gpu_layout_kind() -> str:
    """``$LOSA_GPU_LAYOUT``: ``bitmask`` (default: the packed tensors plus offset tables) or ``delta``
    (also the delta layout, for its 1-16 token kernel), for the layouts that models keep on CUDA."""
    kind = os.environ.get("LOSA_GPU_LAYOUT") or "bitmask"
    if kind not in GPU_LAYOUTS:
        raise LosaError(f"unknown LOSA_GPU_LAYOUT {kind!r} (choose from {', '.join(GPU_LAYOUTS)})")
    return kind


def gpu_layout(weight: BitmaskWeight | NMKernelLayout, delta: bool = False) -> GPULayout:
    """The GPU layout of a kernel weight (tables built on the weight's device); with ``delta`` and 16-bit
    values, plus the weight in the delta layout (:class:`DeltaGPULayout`; its kernel takes bf16 / fp16)."""
    if delta and weight.values.dtype in (torch.bfloat16, torch.float16):  # the delta kernel's dtypes
        base = gpu_layout(weight)
        return DeltaGPULayout(base, DeltaWeight.build(base.values, base.mask, base.shape[1]))
    if isinstance(weight, BitmaskWeight):
        return BitmaskGPULayout.build(weight)
    if isinstance(weight, NMKernelLayout) and WORD_BITS % weight.m == 0:
        return NMGPULayout.build(weight)
    if isinstance(weight, NMKernelLayout):  # the filled values and masks are a bitmask weight too
        row_ptr, _ = _nm_rows(weight)
        return BitmaskGPULayout.build(BitmaskWeight(weight.shape, weight.values, weight.mask, row_ptr))
    raise LosaError(f"no GPU layout for {type(weight).__name__}")


def model_gpu_layout(weight: BitmaskWeight | NMKernelLayout) -> GPULayout:
    """The GPU layout a model keeps for a weight on CUDA (``SparseLinear``, the vLLM plugin): with the delta
    layout too where ``$LOSA_GPU_LAYOUT=delta``."""
    return gpu_layout(weight, delta=gpu_layout_kind() == "delta")


__all__ = ["CHUNK_COLS", "GPU_LAYOUTS", "BitmaskGPULayout", "DeltaGPULayout", "GPULayout", "NMGPULayout",
           "chunk_offsets", "gpu_layout", "gpu_layout_kind", "model_gpu_layout"]

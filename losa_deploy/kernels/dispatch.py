"""``sparse_linear(x, packed, bias)``: y = x · Wᵀ (+ bias) for a packed sparse weight, on the best kernel.

Backends, chosen by ``backend=`` or ``$LOSA_SPARSE_BACKEND`` (default ``auto``):

* ``auto``: the compiled op when the extension is loaded and has a kernel for the device (the CPU kernels
  here; a CUDA kernel registered for the same op, issue #7, is picked up the same way), with the best
  instruction set of this CPU; the pure-PyTorch path otherwise.
* ``avx512_bf16``, ``avx512``, ``avx2``, ``portable``: that CPU kernel (an error when the CPU lacks it).
* ``torch``: decompress and ``F.linear`` in fp32 (slow, exact; every device).

``panel_tokens``: the token count from which the CPU op decompresses panels of rows and runs torch's
dense GEMM on them instead of its row kernel (default: the op's, tuned by benchmarks/kernels_cpu.py).

The ops are registered with fake implementations (so ``torch.compile`` and vLLM treat them as opaque)
and (in C++) an autograd formula for ``x`` and ``bias`` (the packed weight stays frozen).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from ..errors import LosaError
from . import ops
from .formats.bitmask import BitmaskWeight
from .formats.nm import NMKernelLayout, NMWeight

CPU_BACKENDS = ("avx512_bf16", "avx512", "avx2", "portable")
BACKENDS = ("auto", "torch", *CPU_BACKENDS)
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_OPS = ("bitmask_linear", "nm_linear")

Packed = BitmaskWeight | NMWeight | NMKernelLayout


def kernel_weight(packed: Packed) -> BitmaskWeight | NMKernelLayout:
    """The layout the kernels read: a bitmask weight as it is, an N:M weight in its load-time layout."""
    if isinstance(packed, NMWeight):
        return packed.kernel_layout()
    if isinstance(packed, BitmaskWeight | NMKernelLayout):
        return packed
    raise LosaError(f"sparse_linear needs a BitmaskWeight or NMWeight, got {type(packed).__name__}")


@torch.compiler.assume_constant_result  # decided once per graph under torch.compile, not traced
def _kernel_isa(op_name: str, device_type: str, dtype: torch.dtype, backend: str | None) -> str:
    """The ``isa`` argument of the compiled op for this call, or ``""`` for the pure-PyTorch path."""
    return _choose_isa(op_name, device_type, dtype, backend or os.environ.get("LOSA_SPARSE_BACKEND") or "auto")


@functools.lru_cache(maxsize=64)  # the answer depends only on the arguments: decode calls this per layer
def _choose_isa(op_name: str, device_type: str, dtype: torch.dtype, chosen: str) -> str:
    if chosen not in BACKENDS:
        raise LosaError(f"unknown sparse backend {chosen!r} (choose from {', '.join(BACKENDS)})")
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    has_kernel = (chosen != "torch" and ops() is not None and key is not None
                  and torch._C._dispatch_has_kernel_for_dispatch_key(f"losa::{op_name}", key))
    if chosen in CPU_BACKENDS and not (has_kernel and device_type == "cpu"):
        raise LosaError(f"sparse backend {chosen!r} needs the compiled extension and a CPU tensor")
    if not has_kernel or dtype not in KERNEL_DTYPES:
        return ""
    return chosen if chosen in CPU_BACKENDS else "auto"


def sparse_linear(x: torch.Tensor, packed: Packed, bias: torch.Tensor | None = None, *, backend: str | None = None,
                  panel_tokens: int | None = None) -> torch.Tensor:
    """``x`` of shape ``(..., in)`` times the packed ``[out, in]`` weight, transposed, plus ``bias``.

    The result has ``x``'s dtype; the kernels accumulate in fp32. An ``NMWeight`` is converted to its kernel
    layout on every call: convert once with ``packed.kernel_layout()`` (``SparseLinear`` does).
    """
    weight = kernel_weight(packed)
    rows, cols = weight.shape
    if not x.is_floating_point():
        raise LosaError(f"sparse_linear: x must be floating point, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != cols:
        raise LosaError(f"sparse_linear: x has shape {tuple(x.shape)}, the weight takes {cols} input features")
    if x.device != weight.values.device:
        raise LosaError(f"sparse_linear: x is on {x.device}, the packed weight on {weight.values.device}")
    if bias is not None and (bias.shape != (rows,) or bias.device != x.device):
        raise LosaError(f"sparse_linear: bias must be [{rows}] on {x.device}, got {tuple(bias.shape)} on "
                        f"{bias.device}")
    bitmask = isinstance(weight, BitmaskWeight)
    isa = _kernel_isa("bitmask_linear" if bitmask else "nm_linear", x.device.type, x.dtype, backend)
    if not isa:
        return _torch_linear(x, weight, bias)
    panel = panel_tokens or 0
    if bitmask:
        return torch.ops.losa.bitmask_linear(x, weight.values, weight.mask, weight.row_ptr, cols, bias, isa, panel)
    return torch.ops.losa.nm_linear(x, weight.values, weight.mask, weight.block_n, cols, weight.m,
                                    weight.rows_per_block, bias, isa, panel)


def _torch_linear(x: torch.Tensor, weight: BitmaskWeight | NMKernelLayout, bias: torch.Tensor | None) -> torch.Tensor:
    """The pure-PyTorch path: decompress and multiply with fp32 accumulation (fp64 stays fp64)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = F.linear(x.to(compute), weight.to_dense().to(compute), None if bias is None else bias.to(compute))
    return y.to(x.dtype)


# -- torch.library: fake (meta) kernels, so torch.compile and vLLM treat the ops as opaque -------------
# (Autograd is registered in C++, next to the CPU kernels: gradients for x and the bias.)


def _fake_linear(x, values, mask, *args, **kwargs):
    return x.new_empty((*x.shape[:-1], mask.shape[0]))


def register_op_metadata() -> None:
    """Called once when the extension loads."""
    for name in _OPS:
        torch.library.register_fake(f"losa::{name}")(_fake_linear)


__all__ = ["BACKENDS", "CPU_BACKENDS", "kernel_weight", "register_op_metadata", "sparse_linear"]

"""``sparse_linear(x, packed, bias)``: y = x · Wᵀ (+ bias) for a packed sparse weight, on the best kernel.

Backends, chosen by ``backend=`` or ``$LOSA_SPARSE_BACKEND`` (default ``auto``):

* ``auto``: on a CPU tensor, the compiled CPU op with the best instruction set of this CPU (the
  pure-PyTorch path when the extension is missing). On a CUDA tensor, by token count (the rows of x):
  the CUDA decode op (registered as the CUDA kernel of ``losa::bitmask_linear``; N:M weights run
  through their bitmask view) for 16-bit x and values and at most :data:`CUDA_OP_MAX_TOKENS` tokens, or
  up to :data:`CUDA_OP_MAX_TOKENS_GROUPS` where its value-group kernel holds 16 tokens of x in shared
  memory; otherwise the Triton kernels (``kernels/triton/sparse_gemm.py``: register decode + FMA up to
  8 tokens, decode + ``tl.dot`` up to 16, beyond that (prefill) W decoded once, a panel of rows at a time,
  and cuBLAS); the pure-PyTorch path when neither is available. The CUDA op
  picks its kernel itself (``csrc/cuda/bitmask_linear_cuda.cpp``): at one token with at least 20% of
  the weights kept the positions kernel (``bitmask_gemv_positions.cu``), otherwise the value-group
  kernel (``bitmask_gemv_groups.cu``) where it fits, else the row walk (``bitmask_gemv.cu``);
  ``$LOSA_CUDA_KERNEL`` overrides that choice (``rows``, ``groups:W:P[:window]``, ``positions:W[:R]``).
* ``amx``, ``avx512_bf16``, ``avx512``, ``avx2``, ``portable``: that CPU kernel (an error when the CPU lacks
  it). ``amx`` runs bf16 x bf16 calls of 4 tokens or more on Intel AMX tiles, everything else as ``avx512_bf16``;
  ``auto`` picks it where the CPU and the OS allow tiles.
* ``cuda``: the CUDA op (CUDA tensors, any token count, 16 tokens per launch; other dtypes than 16-bit x
  with same-dtype values are decompressed and run densely).
* ``triton``: the Triton kernels (a CUDA tensor, or any tensor under ``TRITON_INTERPRET=1``).
* ``torch``: decompress and ``F.linear`` in fp32 (slow, exact; every device).

``panel_tokens``: the token count from which the CPU op decompresses panels of rows and runs torch's
dense GEMM on them instead of its row kernel or tiles (default: the op's: 32, or never for the ``amx`` tiles;
tuned by benchmarks/kernels_cpu.py and benchmarks/amx_cpu.py).

The GPU kernels read a :mod:`GPU layout <.formats.gpu>` (the packed arrays plus small offset tables):
pass one (``SparseLinear`` keeps one per module on CUDA) or it is built on every call. A
:class:`~.formats.gpu.DeltaGPULayout` (``SparseLinear`` builds one when ``$LOSA_GPU_LAYOUT=delta``) also
holds the weight in the :mod:`delta layout <.formats.delta>`: where ``auto`` or ``cuda`` would run the CUDA
op on 1-:data:`DELTA_MAX_TOKENS` tokens and x fits one launch of it, the op ``losa::delta_linear`` runs instead
(``csrc/cuda/delta_gemv.cu``; ``$LOSA_DELTA_CONFIG``, ``warps:depth[:ahead]``, picks its launch shape).

The compiled ops are registered with fake implementations (so ``torch.compile`` and vLLM treat them as
opaque) and (in C++) an autograd formula for ``x`` and ``bias`` on the CPU. The GPU kernels are for
inference: when x or the bias needs a gradient on a GPU, the (differentiable) pure-PyTorch path runs.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from ..errors import LosaError
from . import ops
from . import triton as triton_kernels
from .formats.bitmask import BitmaskWeight
from .formats.delta import DeltaWeight
from .formats.gpu import BitmaskGPULayout, DeltaGPULayout, GPULayout, NMGPULayout, gpu_layout
from .formats.nm import NMKernelLayout, NMWeight

CPU_BACKENDS = ("amx", "avx512_bf16", "avx512", "avx2", "portable")
GPU_BACKENDS = ("cuda", "triton")
BACKENDS = ("auto", "torch", *GPU_BACKENDS, *CPU_BACKENDS)
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Measured on an H200 over the LLaMA-2-7B shapes (benchmarks/RESULTS.md, "GPU sparse inference kernels"):
# the CUDA op (value-group kernel) beats the best Triton configuration at every token count up to 16, 2:4
# at 1 token included (19.8 µs against 45.4 on 4096x4096), and at 32 tokens (two launches of 16) where
# the value-group kernel fits 16 tokens of x in shared memory (4096 input columns: 0.53-0.72x Triton's
# time). Where it does not (11008 input columns) Triton runs from 17 tokens: it was 1.5-2x faster than
# the row walk at 32, and the op's 8-token value-group launches would take about 4 x 74 µs against 215.
CUDA_OP_MAX_TOKENS = 16
CUDA_OP_MAX_TOKENS_GROUPS = 32
# The delta-layout kernel stages up to 16 tokens of x per launch (csrc/cuda/delta_gemv.h). Dispatch sends it
# only calls that fit one launch: more launches would read W again each time.
DELTA_MAX_TOKENS = 16
_OPS = ("bitmask_linear", "nm_linear")

Packed = BitmaskWeight | NMWeight | NMKernelLayout | BitmaskGPULayout | NMGPULayout | DeltaGPULayout


def kernel_weight(packed: Packed) -> BitmaskWeight | NMKernelLayout:
    """The layout the kernels read: a bitmask weight as it is, an N:M weight in its load-time layout."""
    if isinstance(packed, BitmaskGPULayout | NMGPULayout | DeltaGPULayout):
        return packed.weight
    if isinstance(packed, NMWeight):
        return packed.kernel_layout()
    if isinstance(packed, BitmaskWeight | NMKernelLayout):
        return packed
    raise LosaError(f"sparse_linear needs a BitmaskWeight or NMWeight, got {type(packed).__name__}")


@torch.compiler.assume_constant_result  # decided once per graph under torch.compile, not traced
def _kernel_isa(op_name: str, device_type: str, dtype: torch.dtype, backend: str | None) -> str:
    """The ``isa`` argument of the compiled op for this call, or ``""`` for the pure-PyTorch path."""
    return _choose_isa(op_name, device_type, dtype, backend or os.environ.get("LOSA_SPARSE_BACKEND") or "auto")


def check_backend(backend: str | None) -> None:
    """Refuse an unknown backend name (None: the default, always fine)."""
    if backend is not None and backend not in BACKENDS:
        raise LosaError(f"unknown sparse backend {backend!r} (choose from {', '.join(BACKENDS)})")


@functools.lru_cache(maxsize=64)  # the answer depends only on the arguments: decode calls this per layer
def _choose_isa(op_name: str, device_type: str, dtype: torch.dtype, chosen: str) -> str:
    check_backend(chosen)
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
    layout on every call: convert once with ``packed.kernel_layout()`` (``SparseLinear`` does); likewise
    the GPU kernels' layout (``formats.gpu.gpu_layout``).
    """
    weight = kernel_weight(packed)
    rows, cols = weight.shape
    if not x.is_floating_point():
        raise LosaError(f"sparse_linear: x must be floating point, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != cols:
        raise LosaError(f"sparse_linear: x has shape {tuple(x.shape)}, the weight takes {cols} input features")
    device = x.device  # looked up once: this runs per layer per decode step
    if device != weight.values.device:
        raise LosaError(f"sparse_linear: x is on {device}, the packed weight on {weight.values.device}")
    if bias is not None and (bias.shape != (rows,) or bias.device != device):
        raise LosaError(f"sparse_linear: bias must be [{rows}] on {device}, got {tuple(bias.shape)} on "
                        f"{bias.device}")
    chosen = backend or os.environ.get("LOSA_SPARSE_BACKEND") or "auto"
    if device.type == "cuda" or chosen in GPU_BACKENDS:
        gpu = packed if isinstance(packed, BitmaskGPULayout | NMGPULayout | DeltaGPULayout) else None
        if bias is not None and bias.requires_grad and not x.requires_grad and torch.is_grad_enabled():
            # The GPU kernels are inference-only. A trainable bias (nn.Linear's, kept by SparseLinear) alone
            # must not send the call to the dense fallback: autograd takes its gradient from this add.
            return _gpu_linear(x, weight, gpu, None, chosen) + bias.to(x.dtype)
        return _gpu_linear(x, weight, gpu, bias, chosen)
    bitmask = isinstance(weight, BitmaskWeight)
    isa = _kernel_isa("bitmask_linear" if bitmask else "nm_linear", device.type, x.dtype, chosen)
    if not isa or cols == 0:  # no input features: the bias alone (the kernels cannot shape an empty row)
        return _torch_linear(x, weight, bias)
    panel = panel_tokens or 0
    if bitmask:
        return torch.ops.losa.bitmask_linear(x, weight.values, weight.mask, weight.row_ptr, cols, bias, isa, panel)
    return torch.ops.losa.nm_linear(x, weight.values, weight.mask, weight.block_n, cols, weight.m,
                                    weight.rows_per_block, bias, isa, panel)


def groups_kernel_fits(cols: int, tokens: int, device: torch.device | str = "cuda", warps: int = 16) -> bool:
    """Whether the CUDA op's value-group kernel can run ``cols`` input columns at ``tokens`` tokens (up to
    16 per launch) on ``device``: x and the per-warp mask buffers must fit one block's shared memory.
    Mirrors ``make_plan`` in ``csrc/cuda/bitmask_gemv_groups.cu``."""
    nt = 1 << (min(max(tokens, 1), 16) - 1).bit_length()
    x_bytes = -(-(cols * nt + (cols // 128 + 1) * max(2, nt)) * 2 // 16) * 16
    words_padded = -(-(-(-cols // 32) + 1) // 4) * 4
    return x_bytes + warps * (2 * words_padded + 32) * 4 <= _smem_optin(str(device))


def positions_kernel_fits(cols: int, warps: int = 16, device: torch.device | str = "cuda") -> bool:
    """Whether the CUDA op's positions kernel (one token) can run ``cols`` input columns with ``warps``
    warps per block on ``device``: x in fp32 (36 floats per 32 columns, whole steps of 32 words) and two
    value buffers per warp must fit one block's shared memory. Mirrors ``make_plan`` in
    ``csrc/cuda/bitmask_gemv_positions.cu``."""
    words_padded = -(-max(-(-cols // 32), 1) // 32) * 32
    return words_padded * 36 * 4 + warps * 2 * (32 * 32 + 16) * 2 <= _smem_optin(str(device))


def delta_kernel_fits(cols: int, tokens: int = 1, device: torch.device | str = "cuda") -> bool:
    """Whether the delta-layout kernel runs ``tokens`` (1-16) tokens of ``cols`` input columns in one launch
    on ``device``: x staged in one block's shared memory, the tokens rounded up to a power of two, 4 bytes
    each up to 4 tokens and 2 from 8. (The op itself launches fewer tokens at a time where they do not
    fit, reading W once per launch: dispatch does not send it such calls.) Mirrors ``misfit`` and
    ``smem_bytes`` in ``csrc/cuda/delta_gemv.cu`` (compute capability 8.0+ here, where that allows 7.0)."""
    if not 1 <= tokens <= DELTA_MAX_TOKENS:
        return False
    stride = 1 << (tokens - 1).bit_length()
    return max(cols, 1) * stride * (4 if stride <= 4 else 2) <= _smem_optin(str(device))


@functools.lru_cache(maxsize=8)
def _smem_optin(device: str) -> int:
    """Shared memory one block may opt into on ``device``; 0 below compute capability 8.0, where the
    value-group kernel does not run (it needs ``cp.async``)."""
    props = torch.cuda.get_device_properties(torch.device(device))
    if props.major < 8:
        return 0
    # CUDA programming guide, per compute capability, where torch does not report it
    known = 227 * 1024 if props.major >= 9 else 163 * 1024 if props.minor == 0 else 99 * 1024
    return int(getattr(props, "shared_memory_per_block_optin", known))


@functools.lru_cache(maxsize=1)
def has_cuda_op() -> bool:
    """Whether the extension was built with the CUDA decode kernel."""
    return ops() is not None and torch._C._dispatch_has_kernel_for_dispatch_key("losa::bitmask_linear", "CUDA")


@functools.lru_cache(maxsize=1)
def has_delta_op() -> bool:
    """Whether the extension was built with the delta-layout CUDA kernel."""
    return ops() is not None and _has_delta_schema()


def _has_delta_schema() -> bool:
    # the op is defined only by CUDA builds (csrc/cuda/delta_linear_cuda.cpp), with its CUDA kernel
    return hasattr(torch.ops.losa, "delta_linear")


def delta_linear(x: torch.Tensor, delta: DeltaWeight, bias: torch.Tensor | None = None,
                 config: str | None = None) -> torch.Tensor:
    """``x · Wᵀ (+ bias)`` with W in the delta layout, on the CUDA op (16-bit x and values of x's dtype).
    ``config``: ``auto`` or ``warps:depth[:ahead]`` (default ``$LOSA_DELTA_CONFIG`` or ``auto``)."""
    if not has_delta_op():
        raise LosaError("delta_linear needs the extension built with CUDA")
    return torch.ops.losa.delta_linear(x, delta.values, delta.deltas, delta.row_ptr, delta.shape[1], bias,
                                       config or os.environ.get("LOSA_DELTA_CONFIG") or "auto")


def gpu_kernel(x: torch.Tensor, weight: BitmaskWeight | NMKernelLayout, bias: torch.Tensor | None,
               chosen: str = "auto") -> str:
    """Which implementation :func:`sparse_linear` runs for x on a GPU (or forced GPU backend): ``cuda``,
    ``triton`` or ``torch``."""
    check_backend(chosen)
    if chosen in CPU_BACKENDS:
        raise LosaError(f"sparse backend {chosen!r} is a CPU kernel; x is on {x.device}")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if chosen == "torch" or (needs_grad and chosen == "auto"):
        return "torch"
    if needs_grad:
        raise LosaError(f"sparse backend {chosen!r} is inference-only; x or bias requires grad")
    values = weight.values
    cuda_ok = has_cuda_op() and x.is_cuda
    if chosen == "cuda":
        if not cuda_ok:
            raise LosaError("sparse backend 'cuda' needs the extension built with CUDA and a CUDA tensor")
        return "cuda"
    tokens = x.numel() // max(x.shape[-1], 1)
    cols = weight.shape[1]
    in_range = tokens <= CUDA_OP_MAX_TOKENS or (
        tokens <= CUDA_OP_MAX_TOKENS_GROUPS and x.is_cuda and groups_kernel_fits(cols, 16, x.device))
    if (chosen == "auto" and cuda_ok and in_range and x.dtype in (torch.bfloat16, torch.float16)
            and values.dtype == x.dtype):
        return "cuda"
    triton_ok = triton_kernels.available() and (x.is_cuda or triton_kernels.interpreted())
    if chosen == "triton" and not triton_ok:
        raise LosaError("sparse backend 'triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    if triton_ok and x.dtype in KERNEL_DTYPES and values.dtype in KERNEL_DTYPES:
        return "triton"
    if chosen == "triton":
        raise LosaError(f"sparse backend 'triton' takes bf16/fp16/fp32, got x {x.dtype}, values {values.dtype}")
    return "torch"


def _gpu_linear(x, weight, gpu: GPULayout | None, bias, chosen: str) -> torch.Tensor:
    kernel = gpu_kernel(x, weight, bias, chosen)
    if kernel == "torch":
        return _torch_linear(x, weight, bias)
    gpu = gpu or gpu_layout(weight)
    rows, cols = weight.shape
    if isinstance(gpu, DeltaGPULayout):
        tokens = x.numel() // max(cols, 1)
        if (kernel == "cuda" and 0 < tokens <= DELTA_MAX_TOKENS and has_delta_op()
                and x.dtype in (torch.bfloat16, torch.float16) and gpu.delta.values.dtype == x.dtype
                and delta_kernel_fits(cols, tokens, x.device)):
            return delta_linear(x, gpu.delta, bias)
        gpu = gpu.base
    if kernel == "cuda":  # N:M weights too, through their bitmask view (formats/gpu.py)
        return torch.ops.losa.bitmask_linear(x, gpu.values, gpu.mask, gpu.row_ptr, cols, bias, "auto", 0)
    from .triton.sparse_gemm import sparse_matmul

    y = sparse_matmul(x.reshape(-1, cols), gpu, bias)
    return y.reshape(*x.shape[:-1], rows)


def _torch_linear(x: torch.Tensor, weight: BitmaskWeight | NMKernelLayout, bias: torch.Tensor | None) -> torch.Tensor:
    """The pure-PyTorch path: decompress and multiply with fp32 accumulation (fp64 stays fp64)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = F.linear(x.to(compute), weight.to_dense().to(compute), None if bias is None else bias.to(compute))
    return y.to(x.dtype)


# -- torch.library: fake (meta) kernels, so torch.compile and vLLM treat the ops as opaque -------------
# (Autograd is registered in C++, next to the CPU kernels: gradients for x and the bias. Its backward
# multiplies by the fp32 weight from the format's ``*_to_dense`` op, faked here too, so compiled training
# traces.)


def _fake_linear(x, values, mask, *args, **kwargs):
    return x.new_empty((*x.shape[:-1], mask.shape[0]))


def _fake_delta_linear(x, values, deltas, row_ptr, *args, **kwargs):
    return x.new_empty((*x.shape[:-1], row_ptr.shape[0] - 1))


def _fake_to_dense(values, mask, table, in_features, *args):
    return mask.new_empty((mask.shape[0], in_features), dtype=torch.float32)


def register_op_metadata() -> None:
    """Called once when the extension loads."""
    for name in _OPS:
        torch.library.register_fake(f"losa::{name}")(_fake_linear)
        torch.library.register_fake(f"losa::{name.removesuffix('_linear')}_to_dense")(_fake_to_dense)
    if _has_delta_schema():
        torch.library.register_fake("losa::delta_linear")(_fake_delta_linear)


__all__ = [
    "BACKENDS",
    "CPU_BACKENDS",
    "CUDA_OP_MAX_TOKENS",
    "CUDA_OP_MAX_TOKENS_GROUPS",
    "DELTA_MAX_TOKENS",
    "GPU_BACKENDS",
    "delta_kernel_fits",
    "delta_linear",
    "gpu_kernel",
    "groups_kernel_fits",
    "positions_kernel_fits",
    "has_cuda_op",
    "has_delta_op",
    "kernel_weight",
    "register_op_metadata",
    "sparse_linear",
]

"""Masked LoRA without the dense delta: the linear that LoSA, Shears and sparse-LoRA train through.

    y = x·(W⊙M)ᵀ + s·dropout(x)·((B·A)⊙M)ᵀ (+ bias)         W [d, k] frozen, A [r, k], B [d, r]

The reference code (LoSA, SQFT) builds the d×k delta s·(B·A)⊙M at every step and autograd keeps it
(and its gradient) alive; that is 64 MiB per fp32 4096×4096 layer, several times over. Here one
autograd function computes the output and the gradients of x, A and B from three products on the
effective weight W_eff = M ⊙ (W + s·B·A), each computed panel by panel or tile by tile, so no d×k
tensor is ever built (kernels.md §6):

    mm(x, W, M, A, B, s)       = x · W_effᵀ          forward (dropout 0: a single GEMM)
    mm_t(dY, W, M, A, B, s)    = dY · W_eff          input gradient
    grad_ab(dY, X, M, A, B, s) = (s·Bᵀ·G_M, s·G_M·Aᵀ) with G_M = (dYᵀ·X) ⊙ M, never whole

With dropout p > 0 the base and adapter products see different inputs, so each product runs twice:
once on M⊙W (scale 0) and once on the adapter alone (``weight=None``).

Four implementations of the products, picked by device (``backend="auto"``) or forced:

- ``"cpp"``: the compiled CPU kernels (``csrc/cpu/masked_lora.cpp``), tile by tile; the CPU default.
- ``"panels"``: the GPU default. Triton writes W_eff (or masks G) one bounded panel at a time (a quarter
  of a bf16 d×k delta), in one pass over W and the mask; the vendor GEMM does the three big products. A
  panel is transient, so nothing d×k outlives a product, but it is written once: on a GPU the vendor GEMM
  is worth that.
- ``"triton"``: everything in Triton kernels, tile by tile, nothing d×k ever written (the least memory).
- ``"torch"``: plain PyTorch, panel by panel, any device: the readable statement of the products.

Triton runs on CUDA, or on a CPU under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from types import SimpleNamespace

import torch

from ..errors import LosaError
from . import ops
from . import triton as triton_kernels
from .formats.bitmask import WORD_BITS, pack_mask, unpack_mask_reference, words_per_row

BACKENDS = ("auto", "cpp", "panels", "triton", "torch")
_CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_PANEL = 256  # rows or columns per panel on a CPU (a multiple of 32: panels start on a word)


# ---- the panel products: W_eff and G in bounded panels, the big products by the vendor GEMM ----


@dataclasses.dataclass(frozen=True)
class _PanelOps:
    """How one panel backend builds a panel of W_eff and masks a panel of G, and how big a GPU panel is."""

    build: Callable  # (weight, words, A, B, s, rows, cols, dtype) -> rows × cols of M ⊙ (W + s·B·A)
    mask_: Callable  # (g, words, cols) -> g ⊙ M[:, cols], in place
    panel_weights: Callable  # (dtype of the panel, d·k) -> weights per panel on a GPU


def _torch_panel(weight, words, lora_A, lora_B, scale, rows: slice, cols: slice, dtype) -> torch.Tensor:
    """Rows × cols of M ⊙ (W + s·B·A), computed in the adapters' dtype and rounded once to ``dtype``."""
    mask = _mask_columns(words[rows], cols)
    value = lora_B[rows] @ lora_A[:, cols] * scale if scale != 0 else torch.zeros_like(mask, dtype=lora_A.dtype)
    if weight is not None:
        value = value + weight[rows, cols].to(lora_A.dtype)
    return value.mul_(mask).to(dtype)


def _mask_columns(words: torch.Tensor, cols: slice) -> torch.Tensor:
    """The bool mask of ``cols`` (starting on a word) from the rows' bitmask words."""
    first_word, ncols = cols.start // WORD_BITS, cols.stop - cols.start
    return unpack_mask_reference(words[:, first_word:first_word + words_per_row(ncols)], ncols)


def _quarter_delta(dtype: torch.dtype, layer_weights: int) -> int:
    """Weights per panel of the ``panels`` backend: a quarter of the bytes of a bf16 d×k delta (at least
    8 MiB). The reference keeps that delta and more per layer, so a transient panel stays well under half of
    its extra memory (issue #6's bar), while each GEMM still gets a quarter of the layer."""
    return max(8 << 20, layer_weights * 2 // 4) // dtype.itemsize


def _triton_panel_ops() -> _PanelOps:
    from .triton import masked_lora as kernels

    return _PanelOps(kernels.effective_panel, kernels.mask_panel_, _quarter_delta)


# The pure-PyTorch panels (the readable statement of what the kernels do). On a GPU they are built in fp32
# with an unpacked mask: panels of up to 2^26 weights, built, used and freed within one product.
_TORCH_PANELS = _PanelOps(_torch_panel, lambda g, words, cols: g.mul_(_mask_columns(words, cols)),
                          lambda dtype, layer_weights: 1 << 26)


def _spans(total: int, other: int, device: torch.device, panel_weights: int):
    """Panels along a dimension of ``total``, the other dimension being ``other`` long."""
    size = _PANEL
    if device.type != "cpu":
        size = max(_PANEL, panel_weights // max(other, 1) // WORD_BITS * WORD_BITS)
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def _panel_mm(ops: _PanelOps, x, weight, words, lora_A, lora_B, scale):
    d, k = lora_B.shape[0], lora_A.shape[1]
    spans = _spans(d, k, x.device, ops.panel_weights(x.dtype, d * k))
    if len(spans) == 1:
        return x @ ops.build(weight, words, lora_A, lora_B, scale, spans[0], slice(0, k), x.dtype).t()
    y = torch.empty(x.shape[0], d, dtype=x.dtype, device=x.device)
    for rows in spans:
        y[:, rows] = x @ ops.build(weight, words, lora_A, lora_B, scale, rows, slice(0, k), x.dtype).t()
    return y


def _panel_mm_t(ops: _PanelOps, grad, weight, words, lora_A, lora_B, scale):
    d, k = lora_B.shape[0], lora_A.shape[1]
    spans = _spans(k, d, grad.device, ops.panel_weights(grad.dtype, d * k))
    if len(spans) == 1:
        return grad @ ops.build(weight, words, lora_A, lora_B, scale, slice(0, d), spans[0], grad.dtype)
    dx = torch.empty(grad.shape[0], k, dtype=grad.dtype, device=grad.device)
    for cols in spans:
        dx[:, cols] = grad @ ops.build(weight, words, lora_A, lora_B, scale, slice(0, d), cols, grad.dtype)
    return dx


def _panel_grad_ab(ops: _PanelOps, grad, x, words, lora_A, lora_B, scale):
    d, k = lora_B.shape[0], lora_A.shape[1]
    da, db = torch.empty_like(lora_A), torch.zeros_like(lora_B)
    for cols in _spans(k, d, grad.device, ops.panel_weights(lora_A.dtype, d * k)):
        g = ops.mask_(_gram(grad, x[:, cols], lora_A.dtype), words, cols)
        da[:, cols] = lora_B.t() @ g
        db.addmm_(g, lora_A[:, cols].t())
    return da.mul_(scale), db.mul_(scale)


def _gram(grad: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dYᵀ·X in ``dtype`` (contiguous). A bf16/fp16 product on CUDA keeps its fp32 accumulator when torch
    can write it out (``out_dtype``), instead of rounding G to 16 bits first."""
    if grad.device.type == "cuda" and grad.dtype != dtype and _mm_writes_fp32(grad.device, grad.dtype):
        return torch.mm(grad.t(), x, out_dtype=dtype)
    return (grad.t() @ x).to(dtype).contiguous()


@functools.cache
def _mm_writes_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    try:  # shaped like the real call: a transposed dY and a column slice of X
        grad, x = torch.ones(3, 4, dtype=dtype, device=device), torch.ones(3, 4, dtype=dtype, device=device)
        return torch.mm(grad.t(), x[:, 1:3], out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):  # an older torch, or no kernel for this device
        return False


def _panel_kernels(ops: _PanelOps) -> SimpleNamespace:
    return SimpleNamespace(mm=functools.partial(_panel_mm, ops), mm_t=functools.partial(_panel_mm_t, ops),
                           grad_ab=functools.partial(_panel_grad_ab, ops))


def _cpp_kernels():
    losa = ops()
    return SimpleNamespace(mm=losa.masked_lora_mm, mm_t=losa.masked_lora_mm_t, grad_ab=losa.masked_lora_grad_ab)


def _triton_kernels():
    from .triton import masked_lora as kernels

    return kernels


_KERNELS = {
    "cpp": _cpp_kernels,
    "panels": lambda: _panel_kernels(_triton_panel_ops()),
    "triton": _triton_kernels,
    "torch": lambda: _panel_kernels(_TORCH_PANELS),
}


# ---- the autograd function ----


class MaskedLoRAFunction(torch.autograd.Function):
    """y = x·(W⊙M)ᵀ + s·x_d·((B·A)⊙M)ᵀ on 2-D ``x`` [T, k] in the compute dtype.

    ``keep`` is None (no dropout) or the bool dropout keep-mask shaped like ``x``, with
    x_d = x ⊙ keep / (1 - dropout). Saves x (x_d with dropout), W, the mask words, A, B and ``keep``:
    nothing d×k beyond what the caller already holds. Gradients: x, A, B (W and the mask are frozen).
    """

    @staticmethod
    def forward(ctx, x, weight, words, lora_A, lora_B, scale, keep, dropout, backend):
        kernels = _KERNELS[backend]()
        a, b = _adapter_operands(lora_A, lora_B, x.dtype)
        w = _weight_operand(weight, x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            if keep is None:
                x_adapter = x
                y = kernels.mm(x, w, words, a, b, scale)
            else:
                x_adapter = _drop(x, keep, dropout)
                y = kernels.mm(x, w, words, a, b, 0.0) + kernels.mm(x_adapter, None, words, a, b, scale)
        # The caller's W is saved, not its cast: an fp32 W under bf16 autocast would otherwise keep a bf16
        # d x k copy per layer alive until backward, which casts again.
        ctx.save_for_backward(x_adapter, weight, words, lora_A, lora_B, keep)
        ctx.scale, ctx.dropout, ctx.backend = scale, dropout, backend
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels have no derivative of their own
    def backward(ctx, grad_y):
        x_adapter, weight, words, lora_A, lora_B, keep = ctx.saved_tensors
        kernels = _KERNELS[ctx.backend]()
        scale = ctx.scale
        grad_y = grad_y.contiguous()
        a, b = _adapter_operands(lora_A, lora_B, grad_y.dtype)
        dx = da = db = None
        with torch.autocast(grad_y.device.type, enabled=False):
            if ctx.needs_input_grad[0]:  # (only dX reads W: layers fed by frozen inputs skip the cast)
                weight = _weight_operand(weight, grad_y.dtype)
                if keep is None:
                    dx = kernels.mm_t(grad_y, weight, words, a, b, scale)
                else:
                    dx = kernels.mm_t(grad_y, weight, words, a, b, 0.0)
                    dx += _drop(kernels.mm_t(grad_y, None, words, a, b, scale), keep, ctx.dropout)
            if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
                da, db = kernels.grad_ab(grad_y, x_adapter, words, a, b, scale)
                da, db = da.to(lora_A.dtype), db.to(lora_B.dtype)
        return dx, None, None, da, db, None, None, None, None


def _weight_operand(weight: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    return weight.to(compute).contiguous()


def _drop(t: torch.Tensor, keep: torch.Tensor, dropout: float) -> torch.Tensor:
    return (t * keep).div_(1.0 - dropout)


def _dropout_keep(shape, dropout: float, device, generator) -> torch.Tensor:
    """The bool keep-mask of LoRA dropout (True with probability 1 - dropout), one draw per element."""
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - dropout, generator=generator)


def _accumulation_dtype(compute: torch.dtype) -> torch.dtype:
    return torch.float64 if compute == torch.float64 else torch.float32


def _adapter_operands(lora_A, lora_B, compute: torch.dtype):
    """A and B as the kernels take them: contiguous, in the accumulation dtype (fp32; fp64 for fp64)."""
    acc = _accumulation_dtype(compute)
    return lora_A.detach().to(acc).contiguous(), lora_B.detach().to(acc).contiguous()


# ---- the public entry point ----


def masked_lora_linear(x, weight, mask, lora_A, lora_B, scale, bias=None, dropout=0.0, training=False,
                       generator=None, *, backend="auto"):
    """y = x·(W⊙M)ᵀ + s·dropout(x)·((B·A)⊙M)ᵀ (+ bias), never building a d×k tensor.

    Args:
        x: ``(..., k)`` activations.
        weight: ``[d, k]`` frozen base weight (``requires_grad=False``), already pruned.
        mask: the keep-mask, either bool ``[d, k]`` or losa-bitmask words ``[d, ceil(k/32)]`` (int32 or
            uint32, :func:`losa_deploy.kernels.formats.bitmask.pack_mask`). The kernels read words; a
            bool mask is packed on every call, so keep the words if you call repeatedly.
        lora_A, lora_B: ``[r, k]`` and ``[d, r]`` adapters (any float dtype; fp32 master weights
            recommended). Their gradients come back in their own dtype.
        scale: s (LoSA: alpha / r_max).
        bias: optional ``[d]``, added outside the kernels (its gradient, if any, comes from autograd).
        dropout, training, generator: LoRA dropout on the adapter input only, applied when
            ``training`` and ``dropout > 0``; ``generator`` seeds the keep-mask. Dropout makes every
            product run twice (base and adapter separately).
        backend: ``"auto"`` (compiled CPU kernels on a CPU, ``"panels"`` on CUDA, else PyTorch), or
            force ``"cpp"``, ``"panels"``, ``"triton"`` or ``"torch"`` (module docstring).

    Dtypes: the compute dtype is the autocast dtype when autocast is on for ``x``'s device, else
    ``x.dtype`` (then ``weight`` must have the same dtype). x and W are cast to it; A, B and every
    accumulation are fp32 (fp64 when computing in fp64); y comes out in the compute dtype.
    """
    compute = _compute_dtype(x)
    d, k, words = _check(x, weight, mask, lora_A, lora_B, scale, dropout, compute, bias)
    chosen = resolve_backend(x.device, compute, backend)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), k).to(compute).contiguous()  # (-1 cannot be inferred when k is 0)
    keep = _dropout_keep(x2.shape, dropout, x.device, generator) if training and dropout > 0 else None
    y = MaskedLoRAFunction.apply(x2, weight, words, lora_A, lora_B, float(scale), keep, float(dropout), chosen)
    if bias is not None:
        y = y + bias.to(compute)
    return y.reshape(*lead, d)


def resolve_backend(device: torch.device | str, dtype: torch.dtype, backend: str = "auto") -> str:
    """The implementation ``masked_lora_linear`` runs for tensors on ``device`` computing in ``dtype``."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise LosaError(f"masked-LoRA backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    cpp_ok = device.type == "cpu" and dtype in _CPP_DTYPES and ops() is not None
    triton_ok = triton_kernels.available() and (device.type == "cuda" or triton_kernels.interpreted())
    if backend == "auto":
        return "cpp" if cpp_ok else "panels" if triton_ok and device.type == "cuda" else "torch"
    if backend == "cpp" and not cpp_ok:
        raise LosaError(f"masked-LoRA backend 'cpp' needs the compiled extension, a CPU tensor and "
                        f"float32/bfloat16/float64; got {device.type} {dtype}")
    if backend in ("panels", "triton") and not triton_ok:
        raise LosaError(f"masked-LoRA backend {backend!r} needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    return backend


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if x.dtype in (torch.float32, torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _check(x, weight, mask, lora_A, lora_B, scale, dropout, compute, bias):
    """Shapes, dtypes and devices, as LosaError; returns (d, k, mask words)."""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise LosaError(f"masked_lora_linear: {name} must be a floating-point tensor")
        if t.device != x.device:
            raise LosaError(f"masked_lora_linear: {name} is on {t.device}, x on {x.device}")
    if weight.dim() != 2:
        raise LosaError(f"masked_lora_linear: weight must be 2-D [d, k], got shape {tuple(weight.shape)}")
    d, k = weight.shape
    if weight.requires_grad:
        raise LosaError("masked_lora_linear: weight must be frozen (requires_grad=False); only x, lora_A "
                        "and lora_B get gradients")
    if x.dim() < 1 or x.shape[-1] != k:
        raise LosaError(f"masked_lora_linear: x has {x.shape[-1] if x.dim() else 0} features, weight {k}")
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        raise LosaError("masked_lora_linear: lora_A and lora_B must be 2-D ([r, k] and [d, r])")
    if lora_A.shape[0] != lora_B.shape[1]:
        raise LosaError(f"masked_lora_linear: rank mismatch: lora_A is {tuple(lora_A.shape)} (rank "
                        f"{lora_A.shape[0]}), lora_B is {tuple(lora_B.shape)} (rank {lora_B.shape[1]})")
    if lora_A.shape[1] != k or lora_B.shape[0] != d:
        raise LosaError(f"masked_lora_linear: adapters {tuple(lora_B.shape)} x {tuple(lora_A.shape)} do not "
                        f"fit weight [{d}, {k}]")
    if weight.dtype != compute and not torch.is_autocast_enabled(x.device.type):
        raise LosaError(f"masked_lora_linear: weight is {weight.dtype}, x is {x.dtype}; match them or run "
                        "under torch.autocast")
    if not (isinstance(scale, numbers.Real) and math.isfinite(scale)):  # numbers.Real: numpy scalars too
        raise LosaError(f"masked_lora_linear: scale must be a finite number, got {scale!r}")
    if not 0.0 <= dropout < 1.0:
        raise LosaError(f"masked_lora_linear: dropout must be in [0, 1), got {dropout}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (d,)):
        raise LosaError(f"masked_lora_linear: bias must be a [{d}] tensor, got "
                        f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    return d, k, mask_words(mask, (d, k), x.device)


def mask_words(mask: torch.Tensor, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """The int32 losa-bitmask words of ``mask`` (bool ``[d, k]``, or words already), checked against ``shape``."""
    d, k = shape
    if not isinstance(mask, torch.Tensor):
        raise LosaError("masked_lora_linear: mask must be a tensor")
    if mask.device != device:
        raise LosaError(f"masked_lora_linear: mask is on {mask.device}, x on {device}")
    if mask.dtype == torch.bool:
        if tuple(mask.shape) != (d, k):
            raise LosaError(f"masked_lora_linear: mask shape {tuple(mask.shape)} does not match weight [{d}, {k}]")
        if device.type == "cpu":
            return pack_mask(mask)
        # Row bands bound the reference packer's int64 scratch on devices without a compiled packer.
        return torch.cat([pack_mask(mask[i:i + _PANEL]) for i in range(0, d, _PANEL)]) if d else pack_mask(mask)
    if mask.dtype in (torch.int32, torch.uint32):
        if tuple(mask.shape) != (d, words_per_row(k)):
            raise LosaError(f"masked_lora_linear: mask words shape {tuple(mask.shape)} does not match weight "
                            f"[{d}, {k}] (expected [{d}, {words_per_row(k)}])")
        return mask.contiguous().view(torch.int32)
    raise LosaError(f"masked_lora_linear: mask must be bool [d, k] or int32/uint32 bitmask words, got {mask.dtype}")


# ---- references (tests, benchmarks, the merge) ----


def _bool_mask(mask: torch.Tensor, shape) -> torch.Tensor:
    """The bool [d, k] mask, from a bool mask or from bitmask words."""
    d, k = shape
    return mask if mask.dtype == torch.bool else unpack_mask_reference(mask_words(mask, (d, k), mask.device), k)


def effective_weight(weight, mask, lora_A, lora_B, scale, dtype=None) -> torch.Tensor:
    """The dense M ⊙ (W + s·B·A), computed in fp32 (fp64 for fp64 inputs) and cast once to ``dtype``
    (default: ``weight.dtype``). This is the merged weight; it is d×k, so not for training."""
    acc = _accumulation_dtype(weight.dtype)
    merged = (weight.to(acc) + scale * (lora_B.to(acc) @ lora_A.to(acc))) * _bool_mask(mask, weight.shape)
    return merged.to(dtype or weight.dtype)


def masked_lora_linear_materialized(x, weight, mask, lora_A, lora_B, scale, bias=None, dropout=0.0,
                                    training=False, generator=None):
    """What the LoSA / SQFT reference code does: build s·(B·A)⊙M densely and let autograd keep it.

    Same semantics and the same dropout draws as :func:`masked_lora_linear` for the same ``generator``;
    ``weight`` must already be zero outside the mask (the pruner's invariant), as the reference code
    assumes. The reference in tests and the baseline in benchmarks.
    """
    m = _bool_mask(mask, weight.shape)
    x_adapter = x
    if training and dropout > 0:
        keep = _dropout_keep((math.prod(x.shape[:-1]), x.shape[-1]), dropout, x.device, generator)
        x_adapter = _drop(x, keep.reshape(x.shape), dropout)
    delta = (lora_B @ lora_A) * m * scale
    y = torch.nn.functional.linear(x, weight) + torch.nn.functional.linear(x_adapter, delta)
    return y if bias is None else y + bias


__all__ = [
    "BACKENDS",
    "MaskedLoRAFunction",
    "effective_weight",
    "mask_words",
    "masked_lora_linear",
    "masked_lora_linear_materialized",
    "resolve_backend",
]

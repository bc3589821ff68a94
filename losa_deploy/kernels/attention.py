"""Attention on the CPU without a gradient: calibration and evaluation (prefill), and our runtime's decode.

Pruning, RMI allocation and every LoSA phase run each decoder block over the calibration windows several
times, and perplexity runs the whole model over many windows. PyTorch's CPU flash-attention kernel cuts
each head into small GEMM calls whose fixed cost dominates at small head sizes; our kernel
(``csrc/cpu/causal_attention.cpp``, AVX-512) does the same exact-softmax attention per (batch, head) in
registers: 4.4x faster at head size 8 (stories260K), 1.1-1.3x at 64 and 128 on 256-token windows
(benchmarks/RESULTS.md); longer sequences with wide heads stay on SDPA, where the kernel is slower.

A decode step (a few new rows per sequence against the KV cache) is a read of the cache, which the flash
kernel tiles like a prefill; ``csrc/cpu/decode_attention.cpp`` reads each cached key and value once per
(batch, kv head) for every query row that shares it, in fp32, bf16 or fp16, with transformers' padding
mask or none (benchmarks/attention_cpu.py --decode).

Both plug into transformers' attention interface under the name ``losa_cpu``, with SDPA's mask rules, so
a model runs them with no change to its code:

    with fast_attention(model):      # calibration passes, perplexity
        model(input_ids=windows)
    use_fast_attention(model)        # from now on (losa_deploy.load does this for our runtime)

Every call the kernels do not cover goes to transformers' own SDPA function unchanged: anything that
needs a gradient (training), prefill with a mask beyond the causal one (padding) or in 16-bit dtypes,
prefill continuing a cache, dropout, soft-capping, attention sinks, other devices, CPUs without AVX-512,
prefill sequences over 512 positions with heads wider than 16, more than ``DECODE_ROWS`` new rows.
``LOSA_FAST_ATTENTION=0`` switches both off.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from ._ext import ops

NAME = "losa_cpu"
# Where the kernel is faster than SDPA (benchmarks/attention_cpu.py): any length at head sizes up to 16,
# and up to 512 positions beyond that. It walks all keys once per four query rows, so past ~512 positions
# a 64/128-wide head's keys fall out of L2 and SDPA's key tiling wins (0.4x at 1024 x 64 and 2048 x 128).
SMALL_HEAD = 16
LONG_SEQUENCE = 512
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "cache")
# New query rows per call the decode kernel takes: one token per sequence, or a few drafted ones. Each row
# walks the whole cache; a longer prefill against a cache stays on SDPA.
DECODE_ROWS = 16
# fp32 heads narrower than this decode faster on SDPA (0.8x at 8 wide; 16-bit ones are 1.7-2.2x there).
DECODE_FP32_MIN_HEAD = 16
_DECODE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available() -> bool:
    """True when the kernel is built, enabled, and this CPU runs its AVX-512 variant."""
    if os.environ.get("LOSA_FAST_ATTENTION", "1") in ("0", ""):
        return False
    lib = ops()
    return (lib is not None and hasattr(lib, "causal_attention") and hasattr(lib, "decode_attention")
            and lib.causal_attention_isa() == "avx512")


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """softmax(scale·Q·Kᵀ + causal mask)·V for ``query [B, H, S, D]``, ``key``/``value [B, Hkv, S, D]``
    (grouped-query heads allowed); returns ``[B, S, H, D]``, the layout transformers' attention returns."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return ops().causal_attention(query, key, value, float(scale))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """softmax(scale·Q·Kᵀ + mask)·V for a few new rows ``query [B, H, Tq, D]`` against the whole cache
    ``key``/``value [B, Hkv, Tk, D]`` (the new positions included; grouped-query heads allowed). ``mask``:
    bool (True attends) or additive, broadcast over ``[B, H, Tq, Tk]``; without one, row i sees keys up to
    Tk - Tq + i. Returns ``[B, Tq, H, D]`` in the query's dtype, the layout transformers' attention returns."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return ops().decode_attention(query, key, value, mask, float(scale))


def _plain_cpu_call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
                    kwargs: dict) -> bool:
    """What both kernels need of a call: CPU, no gradient, no dropout, nothing beyond softmax attention."""
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return (not needs_grad and dropout == 0.0 and query.device.type == "cpu"
            and not kwargs.get("output_attentions", False)
            and all(kwargs.get(k) is None for k in _UNSUPPORTED_KWARGS))


def covers(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, dropout: float,
           is_causal: bool, kwargs: dict) -> bool:
    """Whether the kernel computes what SDPA would for this call (to fp32 rounding), and faster."""
    return (_plain_cpu_call(query, key, value, dropout, kwargs) and attention_mask is None and is_causal
            and query.dtype == key.dtype == value.dtype == torch.float32
            and query.shape[2] == key.shape[2] > 1
            and (query.shape[-1] <= SMALL_HEAD or query.shape[2] <= LONG_SEQUENCE)
            and query.shape[-1] == key.shape[-1] == value.shape[-1]
            and query.shape[1] % key.shape[1] == 0)


def covers_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, dropout: float,
                  kwargs: dict) -> bool:
    """Whether the decode kernel computes what SDPA would for this call (to fp32 rounding of the scores)."""
    (batch, heads, rows, dim), tk = query.shape, key.shape[2]
    return (_plain_cpu_call(query, key, value, dropout, kwargs)
            and query.dtype == key.dtype == value.dtype and query.dtype in _DECODE_DTYPES
            and 1 <= rows <= DECODE_ROWS and rows < tk
            and (query.dtype != torch.float32 or dim >= DECODE_FP32_MIN_HEAD)
            and key.shape == value.shape and key.shape[0] == batch and key.shape[-1] == dim
            and heads % key.shape[1] == 0
            # No mask: SDPA attends every key, which is the causal rule only for one row.
            and (rows == 1 if attention_mask is None else _broadcasts(attention_mask, (batch, heads, rows, tk))))


def _broadcasts(mask: torch.Tensor, shape: tuple[int, int, int, int]) -> bool:
    return (mask.dim() == 4 and mask.device.type == "cpu" and (mask.dtype == torch.bool or mask.is_floating_point())
            and mask.shape[-1] == shape[-1] and all(m in (1, n) for m, n in zip(mask.shape[:3], shape[:3])))


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: our kernels where they apply, else SDPA's function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if covers(query, key, value, attention_mask, dropout, causal, kwargs):
        return causal_attention(query, key, value, scaling), None
    if covers_decode(query, key, value, attention_mask, dropout, kwargs):
        return decode_attention(query, key, value, attention_mask, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # same masks as SDPA: none when causal suffices


@contextlib.contextmanager
def fast_attention(model):
    """Run ``model`` (an SDPA transformers model on the CPU) on the ``losa_cpu`` attention inside the block.

    Only CPU models on SDPA are switched (eager or flash models keep what they chose); the previous choice
    is restored on exit, so nothing of it reaches a saved config.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    switched = use_fast_attention(model)
    try:
        yield model
    finally:
        if switched:
            config._attn_implementation = current


def use_fast_attention(model) -> bool:
    """Switch ``model`` (an SDPA transformers model on the CPU) to the ``losa_cpu`` attention for good;
    True if it was switched. Calls the kernels do not cover still run SDPA, so moving the model to a GPU
    or training it later stays correct. The choice is not written by ``save_pretrained``."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not available():
        return False
    if not all(p.device.type == "cpu" for p in model.parameters()):
        return False
    _register()
    config._attn_implementation = NAME
    return True


__all__ = ["DECODE_ROWS", "NAME", "attention_forward", "available", "causal_attention", "covers", "covers_decode",
           "decode_attention", "fast_attention", "use_fast_attention"]

"""Small ``@triton.jit`` helpers shared by the Triton kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a · b`` with ``tl.dot``.

    The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584): there (``UPCAST``),
    widen the operands first. bf16 products are exact in fp32, so only the summation order differs.
    float64 is multiplied and reduced on the CUDA cores instead: Triton 3.6's GPU lowering of an fp64
    ``tl.dot`` aborts (an ``applyLinearLayout`` assertion, seen on an H200), and fp64 only serves tests.
    """
    if a.dtype == tl.float64:
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    if UPCAST and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def word_bits(words):
    """``[R, W, 32]``: bit j of each of the ``[R, W]`` mask words (column 32·w + j of its tile), 0 or 1,
    expanded in registers from words loaded once."""
    return (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1

"""Triton kernels of the fused masked-LoRA linear (kernels.md §6.2-6.4).

The three products of :mod:`losa_deploy.kernels.masked_lora`, on tiles of the effective weight
W_eff = M ⊙ (W + s·B·A) that are computed in registers and never stored:

- ``mm``:      y  = x · W_effᵀ        grid over (token block, output block), loop over input blocks
- ``mm_t``:    dX = dY · W_eff        grid over (token block, input block), loop over output blocks
- ``grad_ab``: G = (dYᵀ · X) ⊙ M one (output block, input block) tile at a time, accumulated over
  all tokens in fp32, then dB += s·G·Aᵀ and dA += s·Bᵀ·G with atomic adds; G is never stored.

Each W_eff tile costs a rank-r dot (r padded to 16 for ``tl.dot``) on top of the main product: an
overhead of r/BLOCK_T in the forward (kernels.md §6.2). The mask is read as losa-bitmask words.
A and B are fp32 (fp64 for gradcheck); activations and W are fp32, bf16, fp16 or fp64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreted


@triton.jit
def _effective_tile(w_ptr, words_ptr, a_ptr, b_ptr, rows, cols, d, k, n_words, rank, scale,
                    HAS_W: tl.constexpr, HAS_AB: tl.constexpr, R: tl.constexpr, ACC: tl.constexpr,
                    PRECISION: tl.constexpr):
    """The [len(rows), len(cols)] tile of M ⊙ (W + s·B·A), in the accumulation type; zero off the edges."""
    row_ok = rows < d
    col_ok = cols < k
    inside = row_ok[:, None] & col_ok[None, :]
    word = tl.load(words_ptr + rows.to(tl.int64)[:, None] * n_words + (cols // 32)[None, :], mask=inside, other=0)
    keep = ((word >> (cols % 32)[None, :]) & 1) != 0
    tile = tl.zeros((rows.shape[0], cols.shape[0]), dtype=ACC)
    if HAS_AB:
        ranks = tl.arange(0, R)
        rank_ok = ranks < rank
        b = tl.load(b_ptr + rows.to(tl.int64)[:, None] * rank + ranks[None, :],
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        a = tl.load(a_ptr + ranks.to(tl.int64)[:, None] * k + cols[None, :],
                    mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        tile = tl.dot(b, a, input_precision=PRECISION, out_dtype=ACC) * scale
    if HAS_W:
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * k + cols[None, :], mask=inside, other=0.0)
        tile += w.to(ACC)
    return tl.where(keep, tile, 0.0)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584): there, widen
    # the operands first. bf16 products are exact in fp32, so only the summation order differs.
    if UPCAST and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _mm_kernel(x_ptr, w_ptr, words_ptr, a_ptr, b_ptr, y_ptr, tokens, d, k, n_words, rank, scale,
               HAS_W: tl.constexpr, HAS_AB: tl.constexpr, R: tl.constexpr, ACC: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_ok = toks < tokens
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=ACC)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + toks.to(tl.int64)[:, None] * k + cols[None, :],
                    mask=tok_ok[:, None] & (cols < k)[None, :], other=0.0)
        tile = _effective_tile(w_ptr, words_ptr, a_ptr, b_ptr, rows, cols, d, k, n_words, rank, scale,
                               HAS_W, HAS_AB, R, ACC, PRECISION)
        acc = _dot(x, tl.trans(tile.to(x.dtype)), acc, PRECISION, UPCAST)
    tl.store(y_ptr + toks.to(tl.int64)[:, None] * d + rows[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & (rows < d)[None, :])


@triton.jit
def _mm_t_kernel(g_ptr, w_ptr, words_ptr, a_ptr, b_ptr, dx_ptr, tokens, d, k, n_words, rank, scale,
                 HAS_W: tl.constexpr, HAS_AB: tl.constexpr, R: tl.constexpr, ACC: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tok_ok = toks < tokens
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=ACC)
    for n0 in range(0, d, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(g_ptr + toks.to(tl.int64)[:, None] * d + rows[None, :],
                    mask=tok_ok[:, None] & (rows < d)[None, :], other=0.0)
        tile = _effective_tile(w_ptr, words_ptr, a_ptr, b_ptr, rows, cols, d, k, n_words, rank, scale,
                               HAS_W, HAS_AB, R, ACC, PRECISION)
        acc = _dot(g, tile.to(g.dtype), acc, PRECISION, UPCAST)
    tl.store(dx_ptr + toks.to(tl.int64)[:, None] * k + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & (cols < k)[None, :])


@triton.jit
def _grad_ab_kernel(g_ptr, x_ptr, words_ptr, a_ptr, b_ptr, da_ptr, db_ptr, tokens, d, k, n_words, rank, scale,
                    R: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < d
    col_ok = cols < k
    inside = row_ok[:, None] & col_ok[None, :]
    word = tl.load(words_ptr + rows.to(tl.int64)[:, None] * n_words + (cols // 32)[None, :], mask=inside, other=0)
    keep = ((word >> (cols % 32)[None, :]) & 1) != 0
    if tl.max(keep.to(tl.int32)) > 0:  # an all-zero tile has no gradient: skip its T-long reduction
        grad = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
        for t0 in range(0, tokens, BLOCK_T):
            toks = t0 + tl.arange(0, BLOCK_T)
            tok_ok = toks < tokens
            g = tl.load(g_ptr + toks.to(tl.int64)[:, None] * d + rows[None, :],
                        mask=tok_ok[:, None] & row_ok[None, :], other=0.0)
            x = tl.load(x_ptr + toks.to(tl.int64)[:, None] * k + cols[None, :],
                        mask=tok_ok[:, None] & col_ok[None, :], other=0.0)
            grad = _dot(tl.trans(g), x, grad, PRECISION, UPCAST)
        grad = tl.where(keep, grad, 0.0) * scale
        ranks = tl.arange(0, R)
        rank_ok = ranks < rank
        a = tl.load(a_ptr + ranks.to(tl.int64)[:, None] * k + cols[None, :],
                    mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rows.to(tl.int64)[:, None] * rank + ranks[None, :],
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        db = tl.dot(grad, tl.trans(a), input_precision=PRECISION, out_dtype=ACC)  # [BLOCK_N, R]
        da = tl.dot(tl.trans(b), grad, input_precision=PRECISION, out_dtype=ACC)  # [R, BLOCK_K]
        tl.atomic_add(db_ptr + rows.to(tl.int64)[:, None] * rank + ranks[None, :], db,
                      mask=row_ok[:, None] & rank_ok[None, :])
        tl.atomic_add(da_ptr + ranks.to(tl.int64)[:, None] * k + cols[None, :], da,
                      mask=rank_ok[:, None] & col_ok[None, :])


_TL_ACC = {torch.float64: tl.float64, torch.float32: tl.float32}


def _config(act: torch.Tensor, lora_A: torch.Tensor) -> dict:
    """Compile-time constants shared by the three kernels."""
    # fp32 dots follow torch's own switch for TF32 (off by default), so fp32 results match torch's.
    if act.dtype == torch.float64:
        precision = "ieee"
    elif act.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        precision = "ieee"
    else:
        precision = "tf32"
    block = 64 if act.dtype in (torch.bfloat16, torch.float16) and not interpreted() else 32
    return dict(R=max(16, triton.next_power_of_2(lora_A.shape[0])), ACC=_TL_ACC[lora_A.dtype], PRECISION=precision,
                UPCAST=interpreted(), BLOCK_T=block, BLOCK_N=block, BLOCK_K=block)


def mm(x, weight, words, lora_A, lora_B, scale):
    """x · (M ⊙ (W + s·B·A))ᵀ; ``weight=None`` means W = 0 and ``scale=0`` means no adapter."""
    tokens, k = x.shape
    d = lora_B.shape[0]
    y = torch.empty(tokens, d, dtype=x.dtype, device=x.device)
    cfg = _config(x, lora_A)
    grid = (triton.cdiv(tokens, cfg["BLOCK_T"]), triton.cdiv(d, cfg["BLOCK_N"]))
    _mm_kernel[grid](x.contiguous(), weight if weight is not None else x, words, lora_A, lora_B, y,
                     tokens, d, k, words.shape[1], lora_A.shape[0], float(scale),
                     HAS_W=weight is not None, HAS_AB=scale != 0, **cfg)
    return y


def mm_t(grad, weight, words, lora_A, lora_B, scale):
    """dY · (M ⊙ (W + s·B·A)), the input gradient of :func:`mm`."""
    tokens, d = grad.shape
    k = lora_A.shape[1]
    dx = torch.empty(tokens, k, dtype=grad.dtype, device=grad.device)
    cfg = _config(grad, lora_A)
    grid = (triton.cdiv(tokens, cfg["BLOCK_T"]), triton.cdiv(k, cfg["BLOCK_K"]))
    _mm_t_kernel[grid](grad.contiguous(), weight if weight is not None else grad, words, lora_A, lora_B, dx,
                       tokens, d, k, words.shape[1], lora_A.shape[0], float(scale),
                       HAS_W=weight is not None, HAS_AB=scale != 0, **cfg)
    return dx


def grad_ab(grad, x, words, lora_A, lora_B, scale):
    """(dA, dB) = (s·Bᵀ·G_M, s·G_M·Aᵀ) with G_M = (dYᵀ·X) ⊙ M, in the adapters' dtype."""
    tokens, d = grad.shape
    rank, k = lora_A.shape
    da = torch.zeros_like(lora_A)
    db = torch.zeros_like(lora_B)
    cfg = _config(grad, lora_A)
    grid = (triton.cdiv(d, cfg["BLOCK_N"]), triton.cdiv(k, cfg["BLOCK_K"]))
    _grad_ab_kernel[grid](grad.contiguous(), x.contiguous(), words, lora_A, lora_B, da, db,
                          tokens, d, k, words.shape[1], rank, float(scale), **cfg)
    return da, db

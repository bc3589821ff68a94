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

The ``panels`` backend uses two more kernels and leaves the big products to the vendor GEMM:
``effective_panel`` writes a bounded panel of W_eff in the compute dtype in one pass (the mask decoded
and B·A formed in registers, as above), and ``mask_panel_`` zeroes a panel of G = dYᵀ·X outside the mask
in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...errors import LosaError
from . import interpreted
from .common import dot as _dot
from .common import word_bits

RANK_STEP = tl.constexpr(16)  # ranks per adapter product inside a tile (tl.dot's smallest inner size)


@triton.jit
def _keep(words_ptr, rows, row_ok, c0, n_words, BLOCK_K: tl.constexpr):
    """bool [len(rows), BLOCK_K]: the mask bits of columns c0, c0 + 1, ... Bits past the row width are zero
    in the words, so no column check is needed. From 32 columns on (c0 then starts a word) each word is
    loaded once and its bits expanded in registers: a load and a 64-bit address per element cost the
    fused kernels their registers."""
    if BLOCK_K >= 32:
        at = c0 // 32 + tl.arange(0, BLOCK_K // 32)
        words = tl.load(words_ptr + rows.to(tl.int64)[:, None] * n_words + at[None, :],
                        mask=row_ok[:, None] & (at < n_words)[None, :], other=0)
        return tl.reshape(word_bits(words), (rows.shape[0], BLOCK_K)) != 0
    else:
        cols = c0 + tl.arange(0, BLOCK_K)
        word = tl.load(words_ptr + rows.to(tl.int64)[:, None] * n_words + (cols // 32)[None, :],
                       mask=row_ok[:, None] & (cols // 32 < n_words)[None, :], other=0)
        return ((word >> (cols % 32)[None, :]) & 1) != 0


@triton.jit
def _adapter_slices(a_ptr, b_ptr, rows, row_ok, cols, col_ok, r0, rank, k):
    """Ranks r0 .. r0 + 15 of B (``[len(rows), 16]``) and of A (``[16, len(cols)]``), zero past the rank."""
    ranks = r0 + tl.arange(0, RANK_STEP)
    rank_ok = ranks < rank
    b = tl.load(b_ptr + rows.to(tl.int64)[:, None] * rank + ranks[None, :],
                mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    a = tl.load(a_ptr + ranks.to(tl.int64)[:, None] * k + cols[None, :],
                mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    return b, a


@triton.jit
def _effective_tile(w_ptr, words_ptr, a_ptr, b_ptr, rows, c0, d, k, n_words, rank,
                    HAS_W: tl.constexpr, HAS_AB: tl.constexpr, R: tl.constexpr, ACC: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [len(rows), BLOCK_K] tile of M ⊙ (W + B·A) at columns c0, c0 + 1, ..., in the accumulation type;
    zero off the edges. B arrives scaled by s (the host does it once, in the adapters' dtype: Triton
    passes floats as fp32)."""
    cols = c0 + tl.arange(0, BLOCK_K)
    row_ok = rows < d
    col_ok = cols < k
    inside = row_ok[:, None] & col_ok[None, :]
    keep = _keep(words_ptr, rows, row_ok, c0, n_words, BLOCK_K)
    tile = tl.zeros((rows.shape[0], BLOCK_K), dtype=ACC)
    if HAS_AB:  # 16 ranks at a time, so a rank of 64 costs no more registers than one of 16
        for r0 in tl.static_range(0, R, RANK_STEP):
            b, a = _adapter_slices(a_ptr, b_ptr, rows, row_ok, cols, col_ok, r0, rank, k)
            tile = _dot(b, a, tile, PRECISION, UPCAST)
    if HAS_W:
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * k + cols[None, :], mask=inside, other=0.0)
        tile += w.to(ACC)
    return tl.where(keep, tile, 0.0)


@triton.jit
def _mm_kernel(x_ptr, w_ptr, words_ptr, a_ptr, b_ptr, y_ptr, tokens, d, k, n_words, rank,
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
        tile = _effective_tile(w_ptr, words_ptr, a_ptr, b_ptr, rows, k0, d, k, n_words, rank,
                               HAS_W, HAS_AB, R, ACC, PRECISION, UPCAST, BLOCK_K)
        acc = _dot(x, tl.trans(tile.to(x.dtype)), acc, PRECISION, UPCAST)
    tl.store(y_ptr + toks.to(tl.int64)[:, None] * d + rows[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & (rows < d)[None, :])


@triton.jit
def _mm_t_kernel(g_ptr, w_ptr, words_ptr, a_ptr, b_ptr, dx_ptr, tokens, d, k, n_words, rank,
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
        tile = _effective_tile(w_ptr, words_ptr, a_ptr, b_ptr, rows, tl.program_id(1) * BLOCK_K, d, k, n_words,
                               rank, HAS_W, HAS_AB, R, ACC, PRECISION, UPCAST, BLOCK_K)
        acc = _dot(g, tile.to(g.dtype), acc, PRECISION, UPCAST)
    tl.store(dx_ptr + toks.to(tl.int64)[:, None] * k + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & (cols < k)[None, :])


@triton.jit
def _grad_ab_kernel(g_ptr, x_ptr, words_ptr, a_ptr, b_ptr, da_ptr, db_ptr, tokens, d, k, n_words, rank,
                    R: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < d
    col_ok = cols < k
    keep = _keep(words_ptr, rows, row_ok, tl.program_id(1) * BLOCK_K, n_words, BLOCK_K)
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
        grad = tl.where(keep, grad, 0.0)  # dB's factor s is applied on the host
        for r0 in tl.static_range(0, R, RANK_STEP):
            b, a = _adapter_slices(a_ptr, b_ptr, rows, row_ok, cols, col_ok, r0, rank, k)
            ranks = r0 + tl.arange(0, RANK_STEP)
            rank_ok = ranks < rank
            db = _dot(grad, tl.trans(a), tl.zeros((BLOCK_N, RANK_STEP), dtype=ACC), PRECISION, UPCAST)
            da = _dot(tl.trans(b), grad, tl.zeros((RANK_STEP, BLOCK_K), dtype=ACC), PRECISION, UPCAST)
            tl.atomic_add(db_ptr + rows.to(tl.int64)[:, None] * rank + ranks[None, :], db,
                          mask=row_ok[:, None] & rank_ok[None, :])
            tl.atomic_add(da_ptr + ranks.to(tl.int64)[:, None] * k + cols[None, :], da,
                          mask=rank_ok[:, None] & col_ok[None, :])


@triton.jit
def _panel_kernel(w_ptr, words_ptr, a_ptr, b_ptr, out_ptr, row0, col0, panel_rows, panel_cols,
                  d, k, n_words, rank,
                  HAS_W: tl.constexpr, HAS_AB: tl.constexpr, R: tl.constexpr, ACC: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    local_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    local_cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tile = _effective_tile(w_ptr, words_ptr, a_ptr, b_ptr, row0 + local_rows, col0 + tl.program_id(1) * BLOCK_K, d,
                           k, n_words, rank, HAS_W, HAS_AB, R, ACC, PRECISION, UPCAST, BLOCK_K)
    inside = (local_rows < panel_rows)[:, None] & (local_cols < panel_cols)[None, :]
    tl.store(out_ptr + local_rows.to(tl.int64)[:, None] * panel_cols + local_cols[None, :],
             tile.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _mask_kernel(g_ptr, words_ptr, col0, rows_total, panel_cols, n_words,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    local_cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < rows_total
    inside = row_ok[:, None] & (local_cols < panel_cols)[None, :]
    keep = _keep(words_ptr, rows, row_ok, col0 + tl.program_id(1) * BLOCK_K, n_words, BLOCK_K)
    at = g_ptr + rows.to(tl.int64)[:, None] * panel_cols + local_cols[None, :]
    g = tl.load(at, mask=inside, other=0.0)
    tl.store(at, tl.where(keep, g, 0.0), mask=inside)


_TL_ACC = {torch.float64: tl.float64, torch.float32: tl.float32}


def _config(act: torch.Tensor, lora_A: torch.Tensor) -> dict:
    """Compile-time constants and launch options shared by the kernels. 8 warps: with 4, the fused products
    need more than 255 registers a thread and spill, in every dtype (Triton's sm_90 build;
    tests/test_masked_lora.py compiles them at ranks 16 and 64)."""
    # fp32 dots follow torch's own switch for TF32 (off by default), so fp32 results match torch's.
    if act.dtype == torch.float64:
        precision = "ieee"
    elif act.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        precision = "ieee"
    else:
        precision = "tf32"
    if interpreted():
        block = 32
    else:  # fp64 is reduced in registers (common.dot): small tiles keep it out of local memory
        block = {torch.bfloat16: 64, torch.float16: 64, torch.float64: 16}.get(act.dtype, 32)
    return dict(R=max(16, triton.next_power_of_2(lora_A.shape[0])), ACC=_TL_ACC[lora_A.dtype], PRECISION=precision,
                UPCAST=interpreted(), BLOCK_T=block, BLOCK_N=block, BLOCK_K=block, num_warps=8)


def _scaled_b(lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """s·B, the B the kernels read (a d×r product; it keeps s in the adapters' precision)."""
    return lora_B * scale if scale != 0 else lora_B


def mm(x, weight, words, lora_A, lora_B, scale):
    """x · (M ⊙ (W + s·B·A))ᵀ; ``weight=None`` means W = 0 and ``scale=0`` means no adapter."""
    tokens, k = x.shape
    d = lora_B.shape[0]
    y = torch.empty(tokens, d, dtype=x.dtype, device=x.device)
    cfg = _config(x, lora_A)
    grid = (triton.cdiv(tokens, cfg["BLOCK_T"]), triton.cdiv(d, cfg["BLOCK_N"]))
    _mm_kernel[grid](x.contiguous(), weight if weight is not None else x, words, lora_A, _scaled_b(lora_B, scale), y,
                     tokens, d, k, words.shape[1], lora_A.shape[0],
                     HAS_W=weight is not None, HAS_AB=scale != 0, **cfg)
    return y


def mm_t(grad, weight, words, lora_A, lora_B, scale):
    """dY · (M ⊙ (W + s·B·A)), the input gradient of :func:`mm`."""
    tokens, d = grad.shape
    k = lora_A.shape[1]
    dx = torch.empty(tokens, k, dtype=grad.dtype, device=grad.device)
    cfg = _config(grad, lora_A)
    grid = (triton.cdiv(tokens, cfg["BLOCK_T"]), triton.cdiv(k, cfg["BLOCK_K"]))
    _mm_t_kernel[grid](grad.contiguous(), weight if weight is not None else grad, words, lora_A,
                       _scaled_b(lora_B, scale), dx, tokens, d, k, words.shape[1], lora_A.shape[0],
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
    _grad_ab_kernel[grid](grad.contiguous(), x.contiguous(), words, lora_A, lora_B * scale, da, db,
                          tokens, d, k, words.shape[1], rank, **cfg)
    return da, db.mul_(scale)


# ---- the panels backend's two kernels: the GEMMs around them are the vendor's ----


def effective_panel(weight, words, lora_A, lora_B, scale, rows: slice, cols: slice, dtype) -> torch.Tensor:
    """Rows × cols of M ⊙ (W + s·B·A) in ``dtype``, from one pass over W and the mask words: B·A is
    computed by tiles in registers (with TF32 products for a 16-bit panel: their error is below the
    panel's own rounding) and each value is rounded once to ``dtype``."""
    d, k = lora_B.shape[0], lora_A.shape[1]
    _check_word_start(cols)
    panel_rows, panel_cols = rows.stop - rows.start, cols.stop - cols.start
    out = torch.empty(panel_rows, panel_cols, dtype=dtype, device=words.device)
    cfg = _config(out, lora_A)
    del cfg["BLOCK_T"]
    grid = (triton.cdiv(panel_rows, cfg["BLOCK_N"]), triton.cdiv(panel_cols, cfg["BLOCK_K"]))
    _panel_kernel[grid](weight if weight is not None else out, words, lora_A, _scaled_b(lora_B, scale), out,
                        rows.start, cols.start, panel_rows, panel_cols, d, k, words.shape[1], lora_A.shape[0],
                        HAS_W=weight is not None, HAS_AB=scale != 0, **cfg)
    return out


def mask_panel_(g: torch.Tensor, words: torch.Tensor, cols: slice) -> torch.Tensor:
    """Zero ``g`` (contiguous ``[rows of the mask, len(cols)]``) outside the mask's ``cols``, in place."""
    _check_word_start(cols)
    rows_total, panel_cols = g.shape
    block = 32 if interpreted() else 64
    grid = (triton.cdiv(rows_total, block), triton.cdiv(panel_cols, block))
    _mask_kernel[grid](g, words, cols.start, rows_total, panel_cols, words.shape[1], BLOCK_N=block, BLOCK_K=block,
                       num_warps=8 if block == 64 else 4)
    return g


def _check_word_start(cols: slice) -> None:
    if cols.start % 32:
        raise LosaError(f"masked-LoRA panels start on a mask word (a multiple of 32 columns), got column {cols.start}")

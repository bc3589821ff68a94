"""Triton sparse GEMV / GEMM for the bitmask and N:M GPU layouts (kernels.md §5.1-5.2, formats/gpu.py).

y = x · Wᵀ (+ bias) with W packed. Every program decodes tiles of W in registers, never in memory:
a tile is ``[BLOCK_R rows, G mask words, 32 columns]``. A kept column's value sits at

- bitmask: ``row_ptr[r] + chunk_offset[r, k0/256]`` + the kept columns of the tile before it, a prefix
  sum over the tile (``tl.cumsum`` of the word popcounts, then of the bits inside each word);
- N:M (M divides 32): ``row_start[r] + w·(32N/M)`` + the kept columns of word w before it. In the filled
  load-time layout every full word holds exactly 32N/M values, so the stride is fixed and the prefix
  sum never leaves the word.

Two paths, picked by token count (:func:`sparse_matmul`):

- ``decode`` (1-8 tokens): FMA of the decoded tile with each token's x slice, fp32 accumulation, one
  reduction at the end (1 token) or per tile (2-8 tokens). Split-K over column ranges, with fp32 atomic
  adds, when there are too few row blocks to fill the GPU.
- ``dot`` (more tokens): the decoded tile is reshaped to ``[BLOCK_R, BLOCK_K]`` and multiplied with the
  ``[BLOCK_T, BLOCK_K]`` x tile on the tensor cores (``tl.dot``); split-K the same way.

Activations and values may be bf16, fp16 or fp32 (the values are cast to x's dtype for the dot);
the result has x's dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from ...errors import LosaError
from ..formats.gpu import CHUNK_COLS, BitmaskGPULayout, GPULayout, NMGPULayout
from . import interpreted
from .common import dot

PATHS = ("decode", "dot")
DECODE_MAX_TOKENS = 8
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _decode(values_ptr, mask_ptr, row_a, row_b, rows, row_ok, k0, g, j, n_words, n_chunks, IS_NM: tl.constexpr):
    """The ``[R, G, 32]`` tile of W at columns ``k0 + 32g + j``, in the values' dtype; zero where not kept.

    Bitmask: ``row_a`` = row_ptr, ``row_b`` = the chunk table (read here). N:M: ``row_a`` = the row's start,
    ``row_b`` = the values in each of its full words. Bits past the row width are zero in both formats, so
    no column check is needed.
    """
    rows64 = rows.to(tl.int64)
    word_idx = k0 // 32 + g
    word = tl.load(mask_ptr + rows64[:, None] * n_words + word_idx[None, :],
                   mask=row_ok[:, None] & (word_idx < n_words)[None, :], other=0)
    bit = (word[:, :, None] >> j[None, None, :]) & 1
    if IS_NM:  # every word before this one is full: a fixed stride
        base = row_a
        before = word_idx.to(tl.int64)[None, :] * row_b[:, None]
    else:  # the chunk table, then the popcounts of the tile's words before this one
        base = row_a + tl.load(row_b + rows64 * n_chunks + k0 // 256, mask=row_ok, other=0)
        count = tl.sum(bit, 2)
        before = tl.cumsum(count, 1) - count
    slot = base[:, None, None] + before[:, :, None] + tl.cumsum(bit, 2) - 1
    return tl.load(values_ptr + slot, mask=bit != 0, other=0.0)


@triton.jit
def _row_tables(ptr_a, ptr_b, rows, row_ok, IS_NM: tl.constexpr):
    row_a = tl.load(ptr_a + rows, mask=row_ok, other=0)  # int64: row_ptr (bitmask) or row_start (N:M)
    if IS_NM:
        row_b = tl.load(ptr_b + rows, mask=row_ok, other=0).to(tl.int64)  # values per full word
    else:
        row_b = ptr_b  # the chunk table, read per tile in _decode
    return row_a, row_b


@triton.jit
def _store(y_ptr, bias_ptr, acc, toks, tok_ok, rows, row_ok, n_rows, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    """acc is ``[tokens, rows]`` fp32; y is ``[tokens, n_rows]`` (fp32 scratch when ATOMIC)."""
    offs = toks.to(tl.int64)[:, None] * n_rows + rows[None, :]
    ok = tok_ok[:, None] & row_ok[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptr + offs, acc, mask=ok)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _decode_kernel(x_ptr, y_ptr, bias_ptr, values_ptr, mask_ptr, ptr_a, ptr_b,
                   tokens, n_rows, n_cols, n_words, n_chunks, k_per_split,
                   IS_NM: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr, T: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    row_a, row_b = _row_tables(ptr_a, ptr_b, rows, row_ok, IS_NM)
    g = tl.arange(0, G)
    j = tl.arange(0, 32)
    toks = tl.arange(0, T)
    k_begin = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, n_cols)
    acc = tl.zeros((BLOCK_R, T), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_R, G, 32), dtype=tl.float32)  # 1 token: reduce once, after the loop
    for k0 in range(k_begin, k_end, G * 32):
        cols = k0 + g[:, None] * 32 + j[None, :]
        col_ok = cols < n_cols
        w = _decode(values_ptr, mask_ptr, row_a, row_b, rows, row_ok, k0, g, j, n_words, n_chunks,
                    IS_NM).to(tl.float32)
        if T == 1:
            acc1 += w * tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :, :]
        else:
            for t in tl.static_range(T):
                xt = tl.load(x_ptr + t * n_cols + cols, mask=col_ok & (cols * 0 + t < tokens), other=0.0).to(tl.float32)
                part = tl.sum(tl.sum(w * xt[None, :, :], 2), 1)
                acc += tl.where(toks[None, :] == t, part[:, None], 0.0)
    if T == 1:
        acc += tl.sum(tl.sum(acc1, 2), 1)[:, None]
    _store(y_ptr, bias_ptr, tl.trans(acc), toks, toks < tokens, rows, row_ok, n_rows, HAS_BIAS, ATOMIC)


@triton.jit
def _dot_kernel(x_ptr, y_ptr, bias_ptr, values_ptr, mask_ptr, ptr_a, ptr_b,
                tokens, n_rows, n_cols, n_words, n_chunks, k_per_split,
                IS_NM: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = toks < tokens
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    row_a, row_b = _row_tables(ptr_a, ptr_b, rows, row_ok, IS_NM)
    g = tl.arange(0, G)
    j = tl.arange(0, 32)
    k_begin = tl.program_id(2) * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, n_cols)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_begin, k_end, G * 32):
        cols = k0 + g[:, None] * 32 + j[None, :]
        col_ok = cols < n_cols
        x = tl.load(x_ptr + toks.to(tl.int64)[:, None, None] * n_cols + cols[None, :, :],
                    mask=tok_ok[:, None, None] & col_ok[None, :, :], other=0.0)
        w = _decode(values_ptr, mask_ptr, row_a, row_b, rows, row_ok, k0, g, j, n_words, n_chunks, IS_NM)
        x2 = tl.reshape(x, (BLOCK_T, G * 32))
        w2 = tl.reshape(w.to(x.dtype), (BLOCK_R, G * 32))
        acc = dot(x2, tl.trans(w2), acc, PRECISION, UPCAST)
    _store(y_ptr, bias_ptr, acc, toks, tok_ok, rows, row_ok, n_rows, HAS_BIAS, ATOMIC)


# -- host side ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch parameters of one call (``split_k`` 0: choose from the SM count)."""

    path: str
    block_r: int
    block_k: int = 256
    block_t: int = 16
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 2


def default_config(tokens: int) -> Config:
    """The configuration :func:`sparse_matmul` uses for ``tokens`` rows of x (benchmarks/gpu_suite.py tunes it)."""
    if interpreted():  # few, large programs: the interpreter's cost is per program and per op
        return Config("decode", 16) if tokens <= DECODE_MAX_TOKENS else Config("dot", 16, block_t=16)
    if tokens <= DECODE_MAX_TOKENS:
        return Config("decode", 8 if tokens <= 2 else 4)
    block_t = 16 if tokens <= 16 else 32 if tokens <= 32 else 64
    return Config("dot", 64, block_t=block_t, num_warps=4 if block_t <= 32 else 8)


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_k(programs: int, k_steps: int, device: torch.device) -> int:
    """Column ranges per row block, so that at least ~4 programs per SM run (never below 4 steps each)."""
    if device.type != "cuda":
        return 1
    want = -(-4 * _sm_count(device.index or 0) // max(programs, 1))
    return max(1, min(want, k_steps // 4))


def _tables(layout: GPULayout):
    if isinstance(layout, BitmaskGPULayout):
        w = layout.weight
        return w.values, w.mask, w.row_ptr, layout.chunk_offset, False
    if isinstance(layout, NMGPULayout):
        w = layout.weight
        return w.values, w.mask, layout.row_start, layout.word_values, True
    raise LosaError(f"sparse_matmul needs a BitmaskGPULayout or NMGPULayout, got {type(layout).__name__}")


def sparse_matmul(x: torch.Tensor, layout: GPULayout, bias: torch.Tensor | None = None,
                  config: Config | None = None) -> torch.Tensor:
    """``x [tokens, in]`` · Wᵀ (+ bias) -> ``[tokens, out]`` in x's dtype (fp32 accumulation)."""
    values, mask, ptr_a, ptr_b, is_nm = _tables(layout)
    rows, cols = layout.shape
    if x.dim() != 2 or x.shape[1] != cols:
        raise LosaError(f"sparse_matmul: x must be [tokens, {cols}], got {tuple(x.shape)}")
    if x.dtype not in DTYPES or values.dtype not in DTYPES:
        raise LosaError(f"sparse_matmul: x and values must be bf16, fp16 or fp32, got {x.dtype} and {values.dtype}")
    if x.device != values.device or (bias is not None and bias.device != x.device):
        raise LosaError(f"sparse_matmul: x ({x.device}), the weight ({values.device}) and bias must share a device")
    tokens = x.shape[0]
    cfg = config or default_config(tokens)
    if cfg.path not in PATHS:
        raise LosaError(f"sparse_matmul: path must be one of {', '.join(PATHS)}, got {cfg.path!r}")
    if cfg.path == "decode" and tokens > DECODE_MAX_TOKENS:
        raise LosaError(f"sparse_matmul: the decode path takes at most {DECODE_MAX_TOKENS} tokens, got {tokens}")
    if cfg.block_k % CHUNK_COLS:
        raise LosaError(f"sparse_matmul: block_k must be a multiple of {CHUNK_COLS}, got {cfg.block_k}")
    if tokens == 0 or rows == 0 or cols == 0:
        y = x.new_zeros(tokens, rows)
        return y if bias is None else y + bias.to(x.dtype)
    x = x.contiguous()
    group = cfg.block_k // 32  # mask words per tile
    k_steps = -(-cols // cfg.block_k)
    row_blocks = -(-rows // cfg.block_r)
    token_blocks = 1 if cfg.path == "decode" else -(-tokens // cfg.block_t)
    split = cfg.split_k or _split_k(row_blocks * token_blocks, k_steps, x.device)
    split = max(1, min(split, k_steps))
    k_per_split = -(-k_steps // split) * cfg.block_k
    split = -(-cols // k_per_split)
    atomic = split > 1
    y = torch.zeros(tokens, rows, dtype=torch.float32, device=x.device) if atomic else x.new_empty(tokens, rows)
    common = dict(IS_NM=is_nm, G=group, BLOCK_R=cfg.block_r, HAS_BIAS=bias is not None,
                  ATOMIC=atomic, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    args = (x, y, bias if bias is not None else y, values, mask, ptr_a, ptr_b, tokens, rows, cols, mask.shape[1],
            ptr_b.shape[1] if not is_nm else 0, k_per_split)
    if cfg.path == "decode":
        _decode_kernel[(row_blocks, split)](*args, T=triton.next_power_of_2(tokens), **common)
    else:
        precision = "ieee" if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
        _dot_kernel[(token_blocks, row_blocks, split)](*args, BLOCK_T=cfg.block_t, PRECISION=precision,
                                                      UPCAST=interpreted(), **common)
    if atomic:
        y = (y + bias.to(torch.float32) if bias is not None else y).to(x.dtype)
    return y


__all__ = ["DECODE_MAX_TOKENS", "PATHS", "Config", "default_config", "sparse_matmul"]

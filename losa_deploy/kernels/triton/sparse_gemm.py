"""Triton sparse GEMV / GEMM for the bitmask and N:M GPU layouts (kernels.md §5.1-5.2, formats/gpu.py).

y = x · Wᵀ (+ bias) with W packed. Every program decodes tiles of W in registers, never in memory:
programs walk 256-column chunks, each in tiles of ``[BLOCK_R rows, BLOCK_K columns]`` (BLOCK_K divides
256). A kept column's value sits at (the row's first value in the tile) + (the kept columns of the tile
before it), the second term from popcounts: of the tile's words before the column's word, and of the
bits below it in its word. The first is the previous tile's plus its kept count, and at a chunk start

- bitmask: ``row_ptr[r] + chunk_offset[r, c/256]`` (formats/gpu.py);
- N:M (M divides 32): ``row_ptr[r] + (c/32)·(32N/M)``. In the filled load-time layout every full
  32-column word holds exactly 32N/M values, so the stride is fixed: no table.

Three paths, picked by token count (:func:`default_config`):

- ``decode`` (1-8 tokens): FMA of the decoded tile with each token's x slice, fp32 accumulation, one
  reduction at the end (1 token) or per tile (2-8 tokens). Split-K over column ranges, with fp32 atomic
  adds, when there are too few row blocks to fill the GPU.
- ``dot`` (9-16 tokens): the decoded ``[BLOCK_R, BLOCK_K]`` tile is multiplied with the
  ``[BLOCK_T, BLOCK_K]`` x tile on the tensor cores (``tl.dot``); split-K the same way. Every token tile
  decodes W again.
- ``panels`` (more tokens: prefill): W is decoded once, a panel of rows at a time (:data:`PANEL_BYTES`,
  about a third of an H100's L2, one buffer reused so the GEMM reads it back from L2), into the dense
  dtype of x, and the vendor GEMM multiplies. Sparsity saves no FLOPs there; the aim is to stay near
  dense speed (kernels.md §5.3), where the ``dot`` path, decoding once per 64 tokens, measured 0.04-0.10x
  cuBLAS at 128 tokens.

Measured on an H200 (benchmarks/RESULTS.md) the decode and dot paths are the portable path, not the fast
one: their decode costs a gather per column, whatever the sparsity (about 45 µs for a 4096x4096 GEMV,
where cuBLAS takes 18 µs, with the earlier prefix-scan decoder); the CUDA op (csrc/cuda/) runs 1-16
tokens, or 32 where x fits.

Activations and values may be bf16, fp16 or fp32 (the values are cast to x's dtype for the dot);
the result has x's dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ...errors import LosaError
from ..formats.gpu import CHUNK_COLS, BitmaskGPULayout, DeltaGPULayout, GPULayout, NMGPULayout
from . import interpreted
from .common import dot, word_bits

PATHS = ("decode", "dot", "panels")
DECODE_MAX_TOKENS = 8
DOT_MAX_TOKENS = 16  # above: the panels path (not yet timed on a GPU; the dot path measured 0.08-0.19x dense at 32)
PANEL_BYTES = 16 << 20
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _popcount(x):
    """Set bits of each uint32, as int32 (SWAR, which LLVM turns into ``popc``; the interpreter has none)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _decode(values_ptr, mask_ptr, base, rows, row_ok, k0, n_words, BLOCK_K: tl.constexpr):
    """The ``[R, BLOCK_K]`` tile of W at columns ``k0, k0 + 1, ...`` (k0 a multiple of 32, BLOCK_K of 32 or
    more), in the values' dtype and zero where not kept, and the kept count of each row in it. ``base``
    [R]: the index of each row's first value at ``k0``. A kept column's value sits at base + the kept
    counts of the tile's words before its word + the set bits below it in its word: popcounts on words
    loaded once, where a prefix scan along the tile cost twice the instructions and 70 times the shuffles
    (sm_90 builds of the dot path). Bits past the row width are zero in both formats, so no column check
    is needed."""
    at = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    words = tl.load(mask_ptr + rows.to(tl.int64)[:, None] * n_words + at[None, :],
                    mask=row_ok[:, None] & (at < n_words)[None, :], other=0).to(tl.uint32, bitcast=True)
    counts = _popcount(words)
    bit = tl.arange(0, 32)
    below = _popcount(words[:, :, None] & ((tl.full((32,), 1, tl.uint32) << bit) - 1)[None, None, :])
    index = base[:, None, None] + ((tl.cumsum(counts, 1) - counts)[:, :, None] + below).to(tl.int64)
    kept = word_bits(words) != 0
    w = tl.load(values_ptr + index, mask=kept, other=0.0)
    return tl.reshape(w, (rows.shape[0], BLOCK_K)), tl.sum(counts, 1)


@triton.jit
def _chunk_base(row_ptr, table_ptr, rows, row_ok, c0, n_chunks, IS_NM: tl.constexpr):
    """[R] int64: the index of each row's first value at column ``c0`` (a multiple of 256). ``table_ptr``:
    the chunk offsets (bitmask) or the values per full word (N:M)."""
    start = tl.load(row_ptr + rows, mask=row_ok, other=0)
    if IS_NM:  # every word before c0 is full: a fixed stride
        return start + (c0 // 32) * tl.load(table_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    return start + tl.load(table_ptr + rows.to(tl.int64) * n_chunks + c0 // 256, mask=row_ok, other=0)


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
def _decode_kernel(x_ptr, y_ptr, bias_ptr, values_ptr, mask_ptr, row_ptr, table_ptr,
                   tokens, n_rows, n_cols, n_words, n_chunks, k_per_split,
                   IS_NM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, T: tl.constexpr,
                   HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    toks = tl.arange(0, T)
    k_begin = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, n_cols)
    acc = tl.zeros((BLOCK_R, T), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)  # 1 token: reduce once, after the loop
    for c0 in range(k_begin, k_end, 256):
        base = _chunk_base(row_ptr, table_ptr, rows, row_ok, c0, n_chunks, IS_NM)
        for k0 in range(c0, c0 + 256, BLOCK_K):  # not unrolled: one tile's registers at a time
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < n_cols
            w, kept = _decode(values_ptr, mask_ptr, base, rows, row_ok, k0, n_words, BLOCK_K)
            base += kept
            w = w.to(tl.float32)
            if T == 1:
                acc1 += w * tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            else:
                for t in tl.static_range(T):
                    xt = tl.load(x_ptr + t * n_cols + cols, mask=col_ok & (cols * 0 + t < tokens), other=0.0)
                    part = tl.sum(w * xt.to(tl.float32)[None, :], 1)
                    acc += tl.where(toks[None, :] == t, part[:, None], 0.0)
    if T == 1:
        acc += tl.sum(acc1, 1)[:, None]
    _store(y_ptr, bias_ptr, tl.trans(acc), toks, toks < tokens, rows, row_ok, n_rows, HAS_BIAS, ATOMIC)


@triton.jit
def _dot_kernel(x_ptr, y_ptr, bias_ptr, values_ptr, mask_ptr, row_ptr, table_ptr,
                tokens, n_rows, n_cols, n_words, n_chunks, k_per_split,
                IS_NM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
                HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = toks < tokens
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    k_begin = tl.program_id(2) * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, n_cols)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for c0 in range(k_begin, k_end, 256):
        base = _chunk_base(row_ptr, table_ptr, rows, row_ok, c0, n_chunks, IS_NM)
        for k0 in range(c0, c0 + 256, BLOCK_K):  # not unrolled: one tile's registers at a time
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + toks.to(tl.int64)[:, None] * n_cols + cols[None, :],
                        mask=tok_ok[:, None] & (cols < n_cols)[None, :], other=0.0)
            w, kept = _decode(values_ptr, mask_ptr, base, rows, row_ok, k0, n_words, BLOCK_K)
            base += kept
            acc = dot(x, tl.trans(w.to(x.dtype)), acc, PRECISION, UPCAST)
    _store(y_ptr, bias_ptr, acc, toks, tok_ok, rows, row_ok, n_rows, HAS_BIAS, ATOMIC)


@triton.jit
def _decompress_kernel(values_ptr, mask_ptr, row_ptr, table_ptr, out_ptr, row0, panel_rows, n_rows, n_cols,
                       n_words, n_chunks, IS_NM: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows ``row0 + [0, panel_rows)`` of W, dense, into ``out [panel_rows, n_cols]``: one program per
    BLOCK_R rows and 256-column chunk."""
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = row0 + local
    row_ok = (local < panel_rows) & (rows < n_rows)
    c0 = tl.program_id(1) * 256
    base = _chunk_base(row_ptr, table_ptr, rows, row_ok, c0, n_chunks, IS_NM)
    w, _ = _decode(values_ptr, mask_ptr, base, rows, row_ok, c0, n_words, 256)
    cols = c0 + tl.arange(0, 256)
    tl.store(out_ptr + local.to(tl.int64)[:, None] * n_cols + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols < n_cols)[None, :])


# -- host side ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch parameters of one call. ``block_k`` divides 256 (the chunk of the offset table); ``split_k``
    0 chooses the column ranges from the SM count; ``block_t`` is the dot path's token tile."""

    path: str
    block_r: int
    block_k: int = 256
    block_t: int = 16
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 2


def default_config(tokens: int) -> Config:
    """The configuration :func:`sparse_matmul` uses for ``tokens`` rows of x. Up to 16 tokens: the fastest
    of the candidates benchmarks/gpu_suite.py sweeps, over the LLaMA-2-7B shapes and patterns on an H200
    (benchmarks/RESULTS.md; decode: best at 1 token everywhere, within 3% of the best at 8; dot: best or
    within 3% at 16). Beyond, the panels path: the dot path measured 0.08-0.19x cuBLAS at 32 tokens and
    0.04-0.10x at 128, decoding W once per token tile; the panels path decodes it once, in about 24
    instructions a weight in its sm_90 build (about 25 µs for 4096x4096 on an H100, estimated, not yet
    timed). They compile without register spills (tests/test_gpu_kernels.py checks it for sm_90)."""
    if interpreted():  # few, large programs: the interpreter's cost is per program and per op
        return Config("decode", 16) if tokens <= DECODE_MAX_TOKENS else Config("dot", 16, block_t=16)
    if tokens <= DECODE_MAX_TOKENS:
        return Config("decode", 2, num_warps=2)
    if tokens > DOT_MAX_TOKENS:
        return Config("panels", 16)
    return Config("dot", 128, block_k=64, block_t=16, num_warps=8)


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_k(programs: int, k_steps: int, device: torch.device) -> int:
    """Column ranges per row block, so that at least ~4 programs per SM run (never below 4 steps each)."""
    if device.type != "cuda":
        return 1
    want = -(-4 * _sm_count(device.index or 0) // max(programs, 1))
    return max(1, min(want, k_steps // 4))


def _chunk_table(layout: GPULayout) -> tuple[torch.Tensor, bool]:
    """The per-chunk table the kernels read (bitmask: chunk_offset; N:M: word_values) and whether it is N:M."""
    if isinstance(layout, DeltaGPULayout):  # these kernels read its bitmask or N:M base
        layout = layout.base
    if isinstance(layout, BitmaskGPULayout):
        return layout.chunk_offset, False
    if isinstance(layout, NMGPULayout):
        return layout.word_values, True
    raise LosaError(f"sparse_matmul needs a BitmaskGPULayout or NMGPULayout, got {type(layout).__name__}")


def sparse_matmul(x: torch.Tensor, layout: GPULayout, bias: torch.Tensor | None = None,
                  config: Config | None = None) -> torch.Tensor:
    """``x [tokens, in]`` · Wᵀ (+ bias) -> ``[tokens, out]`` in x's dtype (fp32 accumulation)."""
    table, is_nm = _chunk_table(layout)
    values, mask = layout.values, layout.mask
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
    if cfg.block_k not in (32, 64, 128, 256):
        raise LosaError(f"sparse_matmul: block_k must be 32, 64, 128 or 256, got {cfg.block_k}")
    if tokens == 0 or rows == 0 or cols == 0:
        y = x.new_zeros(tokens, rows)
        return y if bias is None else y + bias.to(x.dtype)
    x = x.contiguous()
    bias = None if bias is None else bias.contiguous()  # the kernels read it at bias_ptr + row
    if cfg.path == "panels":
        return _panels_matmul(x, layout, bias, cfg)
    k_steps = -(-cols // CHUNK_COLS)
    row_blocks = -(-rows // cfg.block_r)
    token_blocks = 1 if cfg.path == "decode" else -(-tokens // cfg.block_t)
    split = cfg.split_k or _split_k(row_blocks * token_blocks, k_steps, x.device)
    split = max(1, min(split, k_steps))
    k_per_split = -(-k_steps // split) * CHUNK_COLS
    split = -(-cols // k_per_split)
    atomic = split > 1
    y = torch.zeros(tokens, rows, dtype=torch.float32, device=x.device) if atomic else x.new_empty(tokens, rows)
    common = dict(IS_NM=is_nm, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r, HAS_BIAS=bias is not None,
                  ATOMIC=atomic, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    args = (x, y, bias if bias is not None else y, values, mask, layout.row_ptr, table, tokens, rows, cols,
            mask.shape[1], 0 if is_nm else table.shape[1], k_per_split)
    if cfg.path == "decode":
        _decode_kernel[(row_blocks, split)](*args, T=triton.next_power_of_2(tokens), **common)
    else:
        precision = "ieee" if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
        _dot_kernel[(token_blocks, row_blocks, split)](*args, BLOCK_T=cfg.block_t, PRECISION=precision,
                                                      UPCAST=interpreted(), **common)
    if atomic:
        y = (y + bias.to(torch.float32) if bias is not None else y).to(x.dtype)
    return y


def decompress(layout: GPULayout, rows: slice, dtype: torch.dtype, out: torch.Tensor | None = None,
               block_r: int = 16, num_warps: int = 4) -> torch.Tensor:
    """Rows ``rows`` (a slice with step 1) of the packed weight as a dense ``[len(rows), in]`` tensor of
    ``dtype``: into ``out`` when given (contiguous, ``dtype``, at least that many rows of ``in`` columns)."""
    table, is_nm = _chunk_table(layout)
    n_rows, n_cols = layout.shape
    start, stop, step = rows.indices(n_rows)
    if step != 1:
        raise LosaError(f"decompress: rows must be a slice with step 1, got {rows}")
    panel_rows = max(stop - start, 0)
    if out is None:
        out = torch.empty(panel_rows, n_cols, dtype=dtype, device=layout.device)
    elif (out.dtype != dtype or out.dim() != 2 or out.shape[0] < panel_rows or out.shape[1] != n_cols
          or not out.is_contiguous() or out.device != layout.device):
        raise LosaError(f"decompress: out must be a contiguous {dtype} [>= {panel_rows}, {n_cols}] tensor on "
                        f"{layout.device}, got {out.dtype} {list(out.shape)} on {out.device}")
    out = out[:panel_rows]
    grid = (triton.cdiv(panel_rows, block_r), triton.cdiv(n_cols, CHUNK_COLS))
    if panel_rows and n_cols:
        _decompress_kernel[grid](layout.values, layout.mask, layout.row_ptr, table, out, start, panel_rows,
                                 n_rows, n_cols, layout.mask.shape[1], 0 if is_nm else table.shape[1], IS_NM=is_nm,
                                 BLOCK_R=block_r, num_warps=num_warps)
    return out


def _panels_matmul(x: torch.Tensor, layout: GPULayout, bias: torch.Tensor | None, cfg: Config) -> torch.Tensor:
    """The panels path: decode a panel of rows into one reused buffer, multiply it with the vendor GEMM."""
    rows, cols = layout.shape
    bias = None if bias is None else bias.to(x.dtype)
    per_panel = max(cfg.block_r, PANEL_BYTES // (cols * x.element_size()) // cfg.block_r * cfg.block_r)
    if per_panel >= rows:
        return F.linear(x, decompress(layout, slice(0, rows), x.dtype, None, cfg.block_r, cfg.num_warps), bias)
    y = x.new_empty(x.shape[0], rows)
    buffer = torch.empty(per_panel, cols, dtype=x.dtype, device=x.device)
    for start in range(0, rows, per_panel):
        span = slice(start, min(start + per_panel, rows))
        panel = decompress(layout, span, x.dtype, buffer, cfg.block_r, cfg.num_warps)
        y[:, span] = F.linear(x, panel, None if bias is None else bias[span])
    return y


__all__ = ["DECODE_MAX_TOKENS", "DOT_MAX_TOKENS", "PANEL_BYTES", "PATHS", "Config", "decompress", "default_config",
           "sparse_matmul"]

"""Tensor-parallel slices of packed weights (rows for column-parallel layers, columns for row-parallel).

A column-parallel rank keeps a contiguous block of output rows: a bitmask weight slices its mask rows,
its ``row_ptr`` range and the values between, and an N:M weight its rows (and the per-block N table when
the slice starts on a row-block boundary). A row-parallel rank keeps a block of input columns: a bitmask
weight whose slice starts on a 32-column word boundary slices its mask words and gathers each row's
values by popcount. The cases the packed layout cannot express by slicing (an N:M column slice, a
misaligned bitmask column slice, a mixed-N:M row slice inside a row block) are decoded to the slice's
dense rows/columns and packed again: exact, and bounded by one layer's weight at load time.
"""

from __future__ import annotations

import torch

from ...kernels.formats.bitmask import WORD_BITS, BitmaskWeight, popcount, unpack_mask, words_per_row
from ...kernels.formats.nm import NMWeight

Packed = BitmaskWeight | NMWeight


def take(packed: Packed, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> Packed:
    """The ``[r0, r1) x [c0, c1)`` block of a packed ``[out, in]`` weight, in the same format."""
    out, inp = packed.shape
    rows = rows or (0, out)
    cols = cols or (0, inp)
    if not (0 <= rows[0] <= rows[1] <= out and 0 <= cols[0] <= cols[1] <= inp):
        raise ValueError(f"slice rows {rows} x cols {cols} is outside the {out}x{inp} weight")
    if rows != (0, out):
        packed = _take_rows(packed, *rows)
    if cols != (0, inp):
        packed = _take_cols(packed, *cols)
    return packed


def _take_rows(packed: Packed, r0: int, r1: int) -> Packed:
    if isinstance(packed, BitmaskWeight):
        ptr = packed.row_ptr[r0:r1 + 1]
        start, end = int(ptr[0]), int(ptr[-1])
        return BitmaskWeight((r1 - r0, packed.shape[1]), packed.values[start:end], packed.mask[r0:r1],
                             ptr - start)
    shape, rpb = (r1 - r0, packed.shape[1]), packed.rows_per_block
    if packed.block_n is None:
        return NMWeight(shape, packed.n, packed.m, packed.values[r0:r1], packed.mask[r0:r1], None, rpb)
    if r0 % rpb == 0:
        block_n = packed.block_n[r0 // rpb: -(-r1 // rpb)]
        if int(block_n.max()) == packed.n:  # the value slots are laid out for the same N
            uniform = bool((block_n == packed.n).all())
            return NMWeight(shape, packed.n, packed.m, packed.values[r0:r1], packed.mask[r0:r1],
                            None if uniform else block_n, rpb)
    return _repack(packed, packed.to_dense()[r0:r1])


def _take_cols(packed: Packed, c0: int, c1: int) -> Packed:
    if isinstance(packed, BitmaskWeight) and c0 % WORD_BITS == 0:
        w0, w1 = c0 // WORD_BITS, c0 // WORD_BITS + words_per_row(c1 - c0)
        words = packed.mask[:, w0:w1].clone()
        tail = (c1 - c0) % WORD_BITS
        if tail:  # clear the bits past c1 in the last word
            words[:, -1] &= (1 << tail) - 1
        before = popcount(packed.mask[:, :w0]).sum(1) if w0 else torch.zeros_like(packed.row_ptr[:-1])
        keep = unpack_mask(words, c1 - c0)
        # Each row's kept values in [c0, c1) follow its first `before` values, in column order.
        counts = keep.sum(1)
        starts = packed.row_ptr[:-1] + before.to(packed.row_ptr.dtype)
        offsets = torch.arange(int(counts.sum()), device=counts.device) - torch.repeat_interleave(
            counts.cumsum(0) - counts, counts)
        index = torch.repeat_interleave(starts, counts) + offsets
        row_ptr = torch.zeros_like(packed.row_ptr)
        row_ptr[1:] = counts.cumsum(0)
        return BitmaskWeight((packed.shape[0], c1 - c0), packed.values[index], words, row_ptr)
    return _repack(packed, packed.to_dense()[:, c0:c1])


def _repack(packed: Packed, dense: torch.Tensor) -> Packed:
    """Pack a decoded slice again in its weight's format (N:M: the same M, N per row block)."""
    if isinstance(packed, BitmaskWeight):
        return BitmaskWeight.from_dense(dense)
    return NMWeight.from_dense(dense, m=packed.m, rows_per_block=packed.rows_per_block)

"""The delta layout: a GPU decode layout of a sparse weight, built at load time (kernels.md §1.1, MACKO).

Each row's kept values are stored in column order as *entries*, each a 16-bit value plus a 4-bit column
delta: the column of entry ``i`` is the sum of the deltas of entries ``0..i`` (the first delta is the
first kept column itself). A gap wider than 15 columns is bridged by zero-valued padding entries of
delta 15, and each row's entries are padded with (value 0, delta 0) to a whole *group* of 8. So:

* ``values``: ``[groups * 8]``, the entries' values (16-byte groups, so a GPU lane loads one group with
  one 16-byte load);
* ``deltas``: int32 ``[groups]``, the 8 deltas of a group, entry ``j`` in bits ``4j .. 4j + 3``;
* ``row_ptr``: int64 ``[out + 1]``, where each row's groups start.

Why a second GPU layout: the bitmask kernels spend their instructions per weight *position* (or, per kept
value, on finding its bit), and on an H200 they stayed instruction-bound at 50-70% sparsity (about 11.6
instructions per position, ``benchmarks/RESULTS.md``). Here a lane's work is per stored entry: a
nibble, an add, a shared-memory load of x and an FMA, with every lane doing the same 8 entries (no
divergence), while a warp's loads stay contiguous. It costs 2.5 bytes per entry: 0.76 B/weight at 70%
sparsity (0.725 for the bitmask), 1.26 at 50% (1.125). The padding is 0.7**15 = 0.5% of the entries at
70% sparsity, 3.5% at 80%, 20% at 90% (where the bitmask's row walk is as fast anyway).

The layout is built from a kernel weight's bitmask view (:mod:`.gpu`), on its device, with tensor
operations only; :meth:`DeltaWeight.to_dense` inverts it exactly.
"""

from __future__ import annotations

import dataclasses

import torch

from ...errors import LosaError
from .bitmask import popcount, unpack_mask_reference

GROUP = 8  # entries per group: one 16-byte load of 16-bit values
MAX_DELTA = 15  # a nibble


@dataclasses.dataclass(frozen=True, eq=False)
class DeltaWeight:
    """A sparse ``[out, in]`` weight in the delta layout (module docstring)."""

    shape: tuple[int, int]
    values: torch.Tensor  # [groups * 8], 16-bit
    deltas: torch.Tensor  # int32 [groups]
    row_ptr: torch.Tensor  # int64 [out + 1], in groups

    def __post_init__(self):
        rows, _ = self.shape
        groups = self.deltas.numel()
        if self.deltas.dtype != torch.int32 or self.deltas.dim() != 1:
            raise LosaError(f"delta layout: deltas must be int32 [groups], got {self.deltas.dtype} "
                            f"{tuple(self.deltas.shape)}")
        if self.values.dim() != 1 or self.values.numel() != groups * GROUP:
            raise LosaError(f"delta layout: values must be [{groups * GROUP}] (8 per group), got "
                            f"{tuple(self.values.shape)}")
        if self.row_ptr.dtype != torch.int64 or tuple(self.row_ptr.shape) != (rows + 1,):
            raise LosaError(f"delta layout: row_ptr must be int64 [{rows + 1}], got {self.row_ptr.dtype} "
                            f"{tuple(self.row_ptr.shape)}")
        if len({t.device for t in (self.values, self.deltas, self.row_ptr)}) != 1:
            raise LosaError("delta layout: values, deltas and row_ptr are on different devices")

    @classmethod
    def build(cls, values: torch.Tensor, mask: torch.Tensor, cols: int, chunk: int = 1 << 24) -> DeltaWeight:
        """From a bitmask view (kept ``values`` in row-major column order, int32 ``mask`` words), on its
        device. Rows are encoded ``chunk`` kept weights at a time (whole rows; about 64 bytes of
        temporaries per kept weight, so about 1 GiB at the default), then joined."""
        ends = popcount(mask).sum(1).cumsum(0).cpu()  # kept weights up to the end of each row
        total = int(ends[-1]) if len(ends) else 0
        if total != values.numel():
            raise LosaError(f"delta layout: the mask keeps {total} weights, values holds {values.numel()}")
        parts, row0 = [], 0
        while row0 < mask.shape[0] or not parts:
            start = int(ends[row0 - 1]) if row0 else 0
            # at least one row; then as many as fit the chunk
            row1 = max(row0 + 1, int(torch.searchsorted(ends, start + chunk, right=True)))
            row1 = min(row1, mask.shape[0])
            stop = int(ends[row1 - 1]) if row1 else 0
            parts.append(cls._encode(values[start:stop], mask[row0:row1], cols))
            row0 = row1
        return parts[0] if len(parts) == 1 else cls._join(parts)

    @classmethod
    def _join(cls, parts: list[DeltaWeight]) -> DeltaWeight:
        """Row blocks (same columns) one after the other."""
        offsets = torch.tensor([0] + [p.deltas.numel() for p in parts[:-1]]).cumsum(0)
        row_ptr = torch.cat([p.row_ptr[:-1] + int(o) for p, o in zip(parts, offsets)]
                            + [parts[-1].row_ptr[-1:] + int(offsets[-1])])
        return cls((sum(p.shape[0] for p in parts), parts[0].shape[1]), torch.cat([p.values for p in parts]),
                   torch.cat([p.deltas for p in parts]), row_ptr)

    @classmethod
    def _encode(cls, values: torch.Tensor, mask: torch.Tensor, cols: int) -> DeltaWeight:
        """One block of rows (see the module docstring)."""
        rows = mask.shape[0]
        device = values.device
        keep_rows, keep_cols = unpack_mask_reference(mask, cols).nonzero(as_tuple=True)
        # each kept value's gap from the previous kept column of its row (from column 0 for the first)
        previous = torch.zeros_like(keep_cols)
        previous[1:] = keep_cols[:-1]
        first = torch.ones_like(keep_rows, dtype=torch.bool)
        first[1:] = keep_rows[1:] != keep_rows[:-1]
        gap = keep_cols - torch.where(first, torch.zeros_like(previous), previous)
        pads = ((gap - 1) // MAX_DELTA).clamp_min(0)  # padding entries of delta 15 before this value

        # entries per row -> groups per row -> where each row's entries start
        row_entries = torch.zeros(rows, dtype=torch.int64, device=device)
        row_entries.index_add_(0, keep_rows, pads + 1)
        row_groups = (row_entries + GROUP - 1) // GROUP
        group_ptr = torch.zeros(rows + 1, dtype=torch.int64, device=device)
        group_ptr[1:] = row_groups.cumsum(0)
        groups = int(group_ptr[-1])

        # a value's entry index: its row's first entry + the entries (values and padding) up to it
        through = (pads + 1).cumsum(0)
        before_row = torch.zeros(rows + 1, dtype=torch.int64, device=device)
        before_row[1:] = row_entries.cumsum(0)
        entry = group_ptr[keep_rows] * GROUP + through - 1 - before_row[keep_rows]

        delta = torch.zeros(groups * GROUP, dtype=torch.int64, device=device)
        delta[entry] = gap - MAX_DELTA * pads
        owner = torch.repeat_interleave(torch.arange(pads.numel(), device=device), pads)
        pad_entry = entry[owner] - pads[owner] + (torch.arange(owner.numel(), device=device)
                                                  - (pads.cumsum(0) - pads)[owner])
        delta[pad_entry] = MAX_DELTA
        out = torch.zeros(groups * GROUP, dtype=values.dtype, device=device)
        out[entry] = values
        nibbles = delta.view(groups, GROUP) << (4 * torch.arange(GROUP, device=device))
        words = nibbles.sum(1)
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # same bits as uint32
        return cls((rows, cols), out, words.contiguous(), group_ptr)

    def columns(self) -> torch.Tensor:
        """int64 ``[groups * 8]``: each entry's column."""
        return self._columns(self._entry_rows())

    def _entry_rows(self) -> torch.Tensor:
        """int64 ``[groups * 8]``: each entry's row."""
        return torch.repeat_interleave(torch.arange(self.shape[0], device=self.deltas.device),
                                       self.row_ptr.diff() * GROUP)

    def _columns(self, row_of: torch.Tensor) -> torch.Tensor:
        shifts = 4 * torch.arange(GROUP, device=self.deltas.device, dtype=torch.int64)
        nibbles = ((self.deltas.to(torch.int64) & 0xFFFFFFFF).unsqueeze(1) >> shifts) & MAX_DELTA
        flat = nibbles.reshape(-1)
        if flat.numel() == 0:
            return flat
        total = flat.cumsum(0)
        # the running sum restarts at each row's first entry
        starts = self.row_ptr[:-1] * GROUP
        before = torch.where(starts > 0, total[(starts - 1).clamp_min(0)], torch.zeros_like(starts))
        return total - before[row_of]

    def to_dense(self) -> torch.Tensor:
        row_of = self._entry_rows()
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        # padding entries are zeros at a real column (or a kept column again): add, do not overwrite
        return dense.index_put_((row_of, self._columns(row_of)), self.values, accumulate=True)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.deltas.nbytes + self.row_ptr.nbytes


__all__ = ["GROUP", "MAX_DELTA", "DeltaWeight"]

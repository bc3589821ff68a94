"""The N:M packed weight (engines-and-formats.md §4.2), for any ``N < M <= 16`` and ragged widths.

Groups are ``M`` consecutive input columns. A weight ``[out, in]`` has ``G = in // M`` full groups and,
when ``t = in % M`` is not 0, one tail group of width ``t`` that keeps at most ``ceil(N*t/M)`` weights
(:func:`losa_deploy.sparsity.patterns.nm_tail_keep`). N may differ between blocks of ``rows_per_block``
rows (mixed N:M); ``N`` below is the largest.

Canonical arrays (:meth:`NMWeight.state_dict`, the on-disk format; ``<p>`` is the module name):

=================  ======================  ==========================================================
``<p>.nm_shape``   int64 [2]               ``[out, in]``
``<p>.nm_pattern`` int64 [3]               ``[N, M, rows_per_block]``
``<p>.nm_values``  bf16/fp16/fp32          per group, its kept values in column order in slots
                   [out, G*N + ceil(N*t/M)] ``[g*N, g*N + N)`` then zeros; the tail group's in the last
                                            ``ceil(N*t/M)`` slots
``<p>.nm_mask``    uint8 [out, B]          per group (the tail too) an F-bit field, ``F`` = 4, 8 or 16
                                            (the smallest that holds M): bit ``j`` set when column
                                            ``g*M + j`` is kept; fields packed little-endian in group
                                            order (two groups a byte for F = 4, two bytes a group for
                                            F = 16); ``B = ceil(ceil(in/M) * F / 8)``
``<p>.nm_n``       uint8 [ceil(out/RB)]    N of each row block; written only when N varies
=================  ======================  ==========================================================

For M = 4, 8 or 16 a row's mask bytes are, bit for bit, its losa-bitmask words (column ``c`` is bit
``c`` of the row's bit stream). Compared with the design table, the shape and pattern keys are added
(the table left them implicit), M goes up to 16, and the tail group is a short group with
``ceil(N*t/M)`` slots rather than a separate unstructured block: the tail convention bounds its count,
so fixed slots suffice and no row offsets are needed.

:class:`NMKernelLayout` is what the CPU kernel reads, built once at load time: each group's mask is
*filled* to exactly its N (the tail group's to ``ceil(N*t/M)``) by also marking zero-valued positions,
lowest first; the values at the marked positions follow row after row without padding, and the masks
become losa-bitmask words. Every row of a block then has the same length, and when M divides 32 every
full 32-column chunk holds exactly ``32*N/M`` values, so the kernel needs neither offsets nor popcounts.

Checking, packing, unpacking and the kernel layout run in the compiled codec (``csrc/cpu/nm_codec.cpp``)
for CPU tensors; the PyTorch functions here are its reference and the path on other devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from ...errors import LosaError
from ...sparsity.patterns import detect_pattern, nm_group_counts, nm_tail_keep
from .. import ops
from .bitmask import (
    VALUE_DTYPES,
    check_words_fit,
    key,
    pack_mask,
    replace_arrays,
    unpack_mask,
    value_dtype,
    words_per_row,
)

DEFAULT_ROWS_PER_BLOCK = 64
_CHUNK_ROWS = 256  # rows converted at a time, to bound the temporaries of big layers


def field_bits(m: int) -> int:
    """Width of one group's mask field: 4, 8 or 16 bits."""
    return 4 if m <= 4 else 8 if m <= 8 else 16


def mask_bytes(cols: int, m: int) -> int:
    return (-(-cols // m) * field_bits(m) + 7) // 8


def slots_per_row(cols: int, n: int, m: int) -> int:
    """Values stored per row: N per full group plus the tail group's ``ceil(N*t/M)``."""
    return (cols // m) * n + nm_tail_keep(n, m, cols % m)


def _check_pattern(n: int, m: int, rows_per_block: int) -> None:
    if not 2 <= m <= 16:
        raise LosaError(f"N:M needs 2 <= M <= 16, got M = {m}")
    if not 0 <= n < m:
        raise LosaError(f"N:M needs 0 <= N < M, got {n}:{m}")
    if rows_per_block < 1:
        raise LosaError(f"rows_per_block must be positive, got {rows_per_block}")


def _groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """``[rows, in]`` -> ``[rows, ceil(in/M), M]``, the last group padded with zeros (False)."""
    rows, cols = t.shape
    ngroups = -(-cols // m)
    padded = t.new_zeros(rows, ngroups * m)
    padded[:, :cols] = t
    return padded.view(rows, ngroups, m)


def _valid_columns(cols: int, m: int, device) -> torch.Tensor:
    """``[ceil(in/M), M]``: True where a group position is a real column."""
    return _groups(torch.ones(1, cols, dtype=torch.bool, device=device), m)[0]


def _group_targets(row_n: torch.Tensor, cols: int, m: int) -> torch.Tensor:
    """``[rows, ceil(in/M)]``: the slots of each group, N for full groups, ``ceil(N*t/M)`` for the tail."""
    ngroups, tail = -(-cols // m), cols % m
    target = row_n[:, None].expand(-1, ngroups).clone()
    if tail:
        target[:, -1] = (row_n * tail + m - 1) // m
    return target


def _required_n(keep: torch.Tensor, m: int) -> torch.Tensor:
    """Per row, the smallest N under which every group (and the tail) keeps at most its share."""
    rows, cols = keep.shape
    full, tail = cols // m, cols % m
    need = nm_group_counts(keep, m).amax(1) if full else torch.zeros(rows, dtype=torch.int64, device=keep.device)
    if tail:
        c = keep[:, full * m:].sum(1)
        # ceil(n*t/m) >= c  <=>  n >= floor((c-1)*m/t) + 1 for c >= 1
        need = torch.maximum(need, torch.where(c > 0, (c - 1) * m // tail + 1, 0))
    return need


def _first_misfit(weight: torch.Tensor, row: int, n: int, m: int) -> str:
    """Where a row first keeps more than N:M allows: the group, what it keeps, what it may keep."""
    counts = _groups(weight[row:row + 1] != 0, m).sum(-1)[0]
    tail = weight.shape[1] % m
    allowed = torch.full_like(counts, n)
    if tail:
        allowed[-1] = nm_tail_keep(n, m, tail)
    g = int((counts > allowed).nonzero()[0])
    where = (f"its tail group (the last {tail} columns)" if tail and g == len(counts) - 1
             else f"group {g} (columns {g * m}-{g * m + m - 1})")
    return f"row {row}, {where} keeps {int(counts[g])} where {int(allowed[g])} may stay"


def _encode_fields(keep_g: torch.Tensor, m: int) -> torch.Tensor:
    """``[rows, groups, M]`` bool -> uint8 ``[rows, B]``."""
    rows, ngroups, _ = keep_g.shape
    fields = (keep_g.to(torch.int32) << torch.arange(m, device=keep_g.device, dtype=torch.int32)).sum(-1)
    bits = field_bits(m)
    if bits == 8:
        return fields.to(torch.uint8)
    if bits == 16:
        return torch.stack([fields & 0xFF, fields >> 8], -1).reshape(rows, 2 * ngroups).to(torch.uint8)
    if ngroups % 2:
        fields = torch.cat([fields, fields.new_zeros(rows, 1)], 1)
    return (fields[:, 0::2] | (fields[:, 1::2] << 4)).to(torch.uint8)


def _codec(*tensors: torch.Tensor):
    """``torch.ops.losa`` when the compiled codec can take these tensors (all on the CPU), else None."""
    return ops() if all(t.device.type == "cpu" for t in tensors) else None


def _decode_fields(mask: torch.Tensor, ngroups: int, m: int) -> torch.Tensor:
    """uint8 ``[rows, B]`` -> ``[rows, groups, field_bits]`` bool (bits past M kept, for checking)."""
    rows = mask.shape[0]
    bits = field_bits(m)
    b = mask.to(torch.int32)
    if bits == 8:
        fields = b
    elif bits == 16:
        fields = b[:, 0::2] | (b[:, 1::2] << 8)
    else:
        fields = torch.stack([b & 0xF, b >> 4], -1).reshape(rows, -1)
    fields = fields[:, :ngroups]
    return ((fields[..., None] >> torch.arange(bits, device=mask.device, dtype=torch.int32)) & 1).bool()


@dataclasses.dataclass(frozen=True, eq=False)
class NMWeight:
    """A sparse ``[out, in]`` weight in the canonical N:M layout (see the module docstring). Checked when built."""

    shape: tuple[int, int]
    n: int  # the largest N of any row block
    m: int
    values: torch.Tensor  # [out, G*N + ceil(N*t/M)]
    mask: torch.Tensor  # uint8 [out, mask_bytes(in, M)]
    block_n: torch.Tensor | None = None  # uint8 [ceil(out / rows_per_block)], None when uniform
    rows_per_block: int = DEFAULT_ROWS_PER_BLOCK

    def __post_init__(self):
        rows, cols = self.shape
        what = f"{self.n}:{self.m} weight"
        _check_pattern(self.n, self.m, self.rows_per_block)
        if rows < 0 or cols < 0:
            raise LosaError(f"{what}: bad shape {self.shape}")
        slots = slots_per_row(cols, self.n, self.m)
        if self.values.dtype not in VALUE_DTYPES or tuple(self.values.shape) != (rows, slots):
            raise LosaError(f"{what}: values must be bf16/fp16/fp32 [{rows}, {slots}], got {self.values.dtype} "
                            f"{tuple(self.values.shape)}")
        if self.mask.dtype != torch.uint8 or tuple(self.mask.shape) != (rows, mask_bytes(cols, self.m)):
            raise LosaError(f"{what}: mask must be uint8 [{rows}, {mask_bytes(cols, self.m)}], got "
                            f"{self.mask.dtype} {tuple(self.mask.shape)}")
        if self.block_n is not None:
            blocks = -(-rows // self.rows_per_block)
            bn = self.block_n
            if bn.dtype != torch.uint8 or tuple(bn.shape) != (blocks,):
                raise LosaError(f"{what}: block N must be uint8 [{blocks}], got {bn.dtype} {tuple(bn.shape)}")
            if blocks and int(bn.max()) != self.n:
                raise LosaError(f"{what}: the largest block N is {int(bn.max())}, not {self.n}")
        self._check_fields(self.row_n())

    def _check_fields(self, row_n: torch.Tensor) -> None:
        """Every group's field marks only its own columns, and at most its N of them."""
        rows, cols = self.shape
        what = f"{self.n}:{self.m} weight"
        losa = _codec(self.mask)
        if losa is not None:
            r, g, code = (int(v) for v in losa.nm_canonical_check(self.mask, row_n, self.m, cols))
            if code == 1:
                raise LosaError(f"{what}: mask bits are set outside the columns of their group")
            if code == 2:
                raise LosaError(f"{what}: row {r} group {g} keeps more weights than its N allows")
            return
        ngroups = -(-cols // self.m)
        for r0 in range(0, rows, _CHUNK_ROWS):
            fields = _decode_fields(self.mask[r0:r0 + _CHUNK_ROWS], ngroups, self.m)
            outside = ~torch.nn.functional.pad(_valid_columns(cols, self.m, fields.device),
                                               (0, fields.shape[-1] - self.m))
            if bool((fields & outside).any()):
                raise LosaError(f"{what}: mask bits are set outside the columns of their group")
            over = fields.sum(-1) > _group_targets(row_n[r0:r0 + _CHUNK_ROWS], cols, self.m)
            if bool(over.any()):
                r, g = (int(i) for i in over.nonzero()[0])
                raise LosaError(f"{what}: row {r0 + r} group {g} keeps more weights than its N allows")

    # -- building ------------------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, weight: torch.Tensor, n: int | None = None, m: int | None = None, *,
                   rows_per_block: int = DEFAULT_ROWS_PER_BLOCK, dtype: torch.dtype | None = None) -> NMWeight:
        """Pack an N:M-sparse weight. Without ``m``, the pattern is detected (M in 4, 8, 16); without
        ``n``, each row block gets the smallest N its rows fit (mixed N:M when they differ). A weight
        that does not fit the asked ``n:m`` is an error."""
        if weight.dim() != 2:
            raise LosaError(f"a weight to pack must be 2-D [out, in], got shape {tuple(weight.shape)}")
        weight = weight.detach()
        if m is None:
            pattern = detect_pattern(weight)
            if pattern.kind not in ("nm", "mixed_nm"):
                raise LosaError(f"the weight is not N:M sparse ({pattern.describe()}); pack it as a bitmask")
            m = pattern.m
        _check_pattern(n if n is not None else 0, m, rows_per_block)
        rows = weight.shape[0]
        need = _required_n(weight != 0, m)
        if n is not None:
            if n < 1:
                raise LosaError(f"N:M needs N >= 1, got {n}:{m}")
            bad = (need > n).nonzero()
            if len(bad):
                raise LosaError(f"the weight is not {n}:{m} sparse: {_first_misfit(weight, int(bad[0]), n, m)}")
            block_n = torch.full((-(-rows // rows_per_block),), n, dtype=torch.int64)
        else:
            padded = torch.zeros(-(-rows // rows_per_block) * rows_per_block, dtype=torch.int64)
            padded[:rows] = need.cpu()
            block_n = padded.view(-1, rows_per_block).amax(1)
            if len(block_n) and int(block_n.max()) >= m:
                b = int((block_n >= m).nonzero()[0])
                raise LosaError(f"the weight is not N:{m} sparse: row block {b} has a group keeping all {m}")
        return _pack(weight, block_n, m, rows_per_block, value_dtype(weight.dtype, dtype))

    def row_n(self) -> torch.Tensor:
        """N of every row (int64 ``[out]``)."""
        rows = self.shape[0]
        if self.block_n is None:
            return torch.full((rows,), self.n, dtype=torch.int64, device=self.mask.device)
        bn = self.block_n.to(device=self.mask.device, dtype=torch.int64)
        return bn.repeat_interleave(self.rows_per_block)[:rows]

    def keep(self, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Stored positions of rows ``[r0, r1)`` as ``[rows, groups, M]`` bool."""
        ngroups = -(-self.shape[1] // self.m)
        return _decode_fields(self.mask[r0:r1], ngroups, self.m)[..., : self.m].contiguous()

    def to_dense(self) -> torch.Tensor:
        losa = _codec(self.values, self.mask)
        if losa is not None:
            return losa.nm_canonical_to_dense(self.values, self.mask, self.n, self.m, self.shape[1])
        return self._to_dense_torch()

    def _to_dense_torch(self) -> torch.Tensor:
        rows, cols = self.shape
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        ngroups = -(-cols // self.m)
        base = torch.arange(ngroups, device=self.values.device) * self.n
        for r0 in range(0, rows, _CHUNK_ROWS):
            keep = self.keep(r0, r0 + _CHUNK_ROWS)
            slot = base[None, :, None] + keep.cumsum(-1) - 1  # the slot of each kept position
            slot = slot.clamp(0, max(self.values.shape[1] - 1, 0)).view(keep.shape[0], -1)
            vals = self.values[r0:r0 + _CHUNK_ROWS]
            taken = vals.gather(1, slot) if vals.shape[1] else torch.zeros_like(slot, dtype=vals.dtype)
            grouped = torch.where(keep.view(keep.shape[0], -1), taken, torch.zeros((), dtype=vals.dtype))
            dense[r0:r0 + _CHUNK_ROWS] = grouped[:, :cols]
        return dense

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.mask.nbytes + (self.block_n.nbytes if self.block_n is not None else 0)

    def kernel_layout(self) -> NMKernelLayout:
        """The load-time layout the CPU kernel reads (filled masks, values back to back)."""
        blocks = -(-self.shape[0] // self.rows_per_block)
        block_n = (self.block_n.to(torch.int32) if self.block_n is not None
                   else torch.full((blocks,), self.n, dtype=torch.int32)).to(self.mask.device)
        losa = _codec(self.values, self.mask)
        if losa is not None:
            values, words = losa.nm_canonical_to_kernel(self.values, self.mask, self.row_n(), self.n, self.m,
                                                         self.shape[1])
        else:
            values, words = self._kernel_arrays_torch()
        return NMKernelLayout(self.shape, self.m, self.rows_per_block, block_n, values, words)

    def _kernel_arrays_torch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = self.shape
        row_n = self.row_n()
        valid = _valid_columns(cols, self.m, self.mask.device)
        dense = self.to_dense()
        values, words = [], []
        for r0 in range(0, rows, _CHUNK_ROWS):
            keep = self.keep(r0, r0 + _CHUNK_ROWS)
            target = _group_targets(row_n[r0:r0 + _CHUNK_ROWS], cols, self.m)
            free = ~keep & valid
            fill = free & (free.cumsum(-1) <= (target - keep.sum(-1))[..., None])
            filled = (keep | fill).view(keep.shape[0], -1)[:, :cols]
            values.append(dense[r0:r0 + _CHUNK_ROWS][filled])
            words.append(pack_mask(filled.cpu()).to(self.mask.device))
        return (torch.cat(values) if values else self.values.new_zeros(0),
                torch.cat(words) if words else torch.zeros(0, words_per_row(cols), dtype=torch.int32))

    # -- on disk ---------------------------------------------------------------------------------------

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {
            key(prefix, "nm_shape"): torch.tensor(self.shape, dtype=torch.int64),
            key(prefix, "nm_pattern"): torch.tensor([self.n, self.m, self.rows_per_block], dtype=torch.int64),
            key(prefix, "nm_values"): self.values,
            key(prefix, "nm_mask"): self.mask,
        }
        if self.block_n is not None:
            out[key(prefix, "nm_n")] = self.block_n
        return out

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], prefix: str = "") -> NMWeight:
        names = ("nm_shape", "nm_pattern", "nm_values", "nm_mask")
        missing = [key(prefix, n) for n in names if key(prefix, n) not in state]
        if missing:
            raise LosaError(f"N:M weight is missing {', '.join(missing)}")
        shape, pattern = state[key(prefix, "nm_shape")], state[key(prefix, "nm_pattern")]
        if shape.dtype != torch.int64 or tuple(shape.shape) != (2,):
            raise LosaError(f"{key(prefix, 'nm_shape')} must be int64 [2]")
        if pattern.dtype != torch.int64 or tuple(pattern.shape) != (3,):
            raise LosaError(f"{key(prefix, 'nm_pattern')} must be int64 [3] (N, M, rows_per_block)")
        n, m, rows_per_block = (int(v) for v in pattern)
        return cls((int(shape[0]), int(shape[1])), n, m, state[key(prefix, "nm_values")],
                   state[key(prefix, "nm_mask")], state.get(key(prefix, "nm_n")), rows_per_block)


def _pack(weight: torch.Tensor, block_n: torch.Tensor, m: int, rows_per_block: int,
          dtype: torch.dtype) -> NMWeight:
    """Canonical arrays of a weight that fits the per-block N in ``block_n`` (int64, CPU)."""
    rows, cols = weight.shape
    n = int(block_n.max()) if len(block_n) else 0
    uniform = len(block_n) == 0 or bool((block_n == n).all())
    losa = _codec(weight)
    if losa is not None:
        row_n = block_n.repeat_interleave(rows_per_block)[:rows].contiguous()
        values, mask = losa.nm_canonical_encode(weight != 0, weight.to(dtype), row_n, n, m)
    else:
        values, mask = _encode_torch(weight, n, m, dtype)
    return NMWeight((rows, cols), n, m, values, mask,
                    None if uniform else block_n.to(torch.uint8).to(weight.device), rows_per_block)


def _encode_torch(weight: torch.Tensor, n: int, m: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    ngroups = -(-cols // m)
    slots = slots_per_row(cols, n, m)
    values = torch.zeros(rows, slots, dtype=dtype, device=weight.device)
    masks = []
    base = torch.arange(ngroups, device=weight.device) * n
    for r0 in range(0, rows, _CHUNK_ROWS):
        w = _groups(weight[r0:r0 + _CHUNK_ROWS], m)
        keep = w != 0
        slot = base[None, :, None] + keep.cumsum(-1) - 1
        row = torch.arange(w.shape[0], device=weight.device)[:, None, None].expand_as(slot)
        values[r0:r0 + _CHUNK_ROWS].index_put_((row[keep], slot[keep]), w[keep].to(dtype))
        masks.append(_encode_fields(keep, m))
    mask = torch.cat(masks) if masks else torch.zeros(0, mask_bytes(cols, m), dtype=torch.uint8)
    return values, mask


@dataclasses.dataclass(frozen=True, eq=False)
class NMKernelLayout:
    """The CPU kernel's N:M layout (see the module docstring). Checked when built."""

    shape: tuple[int, int]
    m: int
    rows_per_block: int
    block_n: torch.Tensor  # int32 [ceil(out / rows_per_block)]
    values: torch.Tensor  # 1-D: each row's values at its filled positions, rows back to back
    mask: torch.Tensor  # int32 losa-bitmask words [out, ceil(in / 32)] of the filled masks

    def __post_init__(self):
        self._check_arrays()
        self._check_bits()

    def _check_arrays(self) -> None:
        """Shapes, dtypes and the value count: cheap, and checked again by ``replace``."""
        rows, cols = self.shape
        what = f"N:{self.m} kernel layout"
        blocks = -(-rows // self.rows_per_block) if self.rows_per_block > 0 else 0
        if self.block_n.dtype != torch.int32 or tuple(self.block_n.shape) != (blocks,):
            raise LosaError(f"{what}: block N must be int32 [{blocks}]")
        _check_pattern(int(self.block_n.max()) if blocks else 0, self.m, self.rows_per_block)
        if self.mask.dtype != torch.int32 or tuple(self.mask.shape) != (rows, words_per_row(cols)):
            raise LosaError(f"{what}: mask must be int32 [{rows}, {words_per_row(cols)}]")
        if self.values.dim() != 1 or self.values.dtype not in VALUE_DTYPES:
            raise LosaError(f"{what}: values must be 1-D bf16/fp16/fp32")
        row_n = self.row_n()
        stride = (cols // self.m) * row_n + (row_n * (cols % self.m) + self.m - 1) // self.m
        if int(stride.sum()) != self.values.numel():
            raise LosaError(f"{what}: {self.values.numel()} values, the layout holds {int(stride.sum())}")

    def _check_bits(self) -> None:
        """Every group marks exactly its N positions: a pass over the whole mask."""
        rows, cols = self.shape
        what = f"N:{self.m} kernel layout"
        row_n = self.row_n()
        check_words_fit(self.mask, cols, what)
        losa = _codec(self.mask)
        if losa is not None:
            if losa.nm_kernel_check(self.mask, row_n, self.m, cols) >= 0:
                raise LosaError(f"{what}: every group must mark exactly its N positions")
            return
        for r0 in range(0, rows, _CHUNK_ROWS):
            keep = _groups(unpack_mask(self.mask[r0:r0 + _CHUNK_ROWS].cpu(), cols), self.m)
            target = _group_targets(row_n[r0:r0 + _CHUNK_ROWS].cpu(), cols, self.m)
            if not torch.equal(keep.sum(-1), target):
                raise LosaError(f"{what}: every group must mark exactly its N positions")

    def row_n(self) -> torch.Tensor:
        return self.block_n.to(torch.int64).repeat_interleave(self.rows_per_block)[: self.shape[0]]

    @classmethod
    def concat_rows(cls, parts: Sequence[NMKernelLayout]) -> NMKernelLayout:
        """The parts' rows stacked into one layout; every part but the last must fill whole row blocks."""
        first = parts[0]
        if any((p.shape[1], p.m, p.rows_per_block, p.values.dtype) != (first.shape[1], first.m, first.rows_per_block,
                                                                       first.values.dtype) for p in parts):
            raise LosaError("N:M parts to stack need the same input width, M, row block and value dtype")
        if any(p.shape[0] % p.rows_per_block for p in parts[:-1]):
            raise LosaError(f"N:M parts to stack must hold whole blocks of {first.rows_per_block} rows")
        return cls((sum(p.shape[0] for p in parts), first.shape[1]), first.m, first.rows_per_block,
                   torch.cat([p.block_n for p in parts]), torch.cat([p.values for p in parts]),
                   torch.cat([p.mask for p in parts]))

    def to_dense(self) -> torch.Tensor:
        keep = unpack_mask(self.mask, self.shape[1]).to(self.values.device)
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        return dense.masked_scatter_(keep, self.values)

    def canonical(self) -> NMWeight:
        """The on-disk arrays (the filled, zero-valued positions are not kept)."""
        return _pack(self.to_dense(), self.block_n.cpu().to(torch.int64), self.m, self.rows_per_block,
                     self.values.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes the kernel streams: values, mask words and the block table."""
        return self.values.nbytes + self.mask.nbytes + self.block_n.nbytes

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "mask": self.mask, "block_n": self.block_n}

    def replace(self, **copies: torch.Tensor) -> NMKernelLayout:
        """This layout holding ``copies`` of its arrays (on another device, on huge pages, values in another
        dtype): see :func:`~.bitmask.replace_arrays`."""
        return replace_arrays(self, copies)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return self.canonical().state_dict(prefix)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], prefix: str = "") -> NMKernelLayout:
        return NMWeight.from_state_dict(state, prefix).kernel_layout()


__all__ = ["DEFAULT_ROWS_PER_BLOCK", "NMKernelLayout", "NMWeight", "field_bits", "mask_bytes", "slots_per_row"]

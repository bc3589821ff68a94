"""The losa-bitmask v1 packed weight and its keep-mask words (engines-and-formats.md §4.2).

Per output row, one 32-bit word per 32 input columns: bit ``b`` of word ``w`` of row ``i`` is set when
column ``32*w + b`` is kept. Bits past the row width are zero. On disk the words are little-endian
``uint32``; in memory they are carried as ``int32`` with the same bits, because PyTorch implements few
operations for ``uint32``. A uint32 little-endian word is byte-identical to compressed-tensors'
``packbits(bitorder="little")`` over the same 32 columns.

:class:`BitmaskWeight` is the whole packed weight: the kept values of each row in column order, one
after the other (``values [nnz]``), the mask words ``[out, ceil(in/32)]`` and ``row_ptr [out + 1]``, the
start of each row in ``values``. On disk (``state_dict``) its arrays are ``<p>.lb_shape``,
``<p>.lb_values``, ``<p>.lb_mask`` (uint32) and ``<p>.lb_row_ptr``. The CPU kernel reads exactly these
arrays, so loading needs no repacking.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Mapping, Sequence

import torch

from ...errors import LosaError
from .. import ops

WORD_BITS = 32
VALUE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def words_per_row(cols: int) -> int:
    return (cols + WORD_BITS - 1) // WORD_BITS


def pack_mask_reference(mask: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch packing of a bool ``[out, in]`` mask into int32 words ``[out, ceil(in/32)]``."""
    rows, cols = mask.shape
    nwords = words_per_row(cols)
    padded = torch.zeros(rows, nwords * WORD_BITS, dtype=torch.int64, device=mask.device)
    padded[:, :cols] = mask.to(torch.int64)
    bits = torch.ones(WORD_BITS, dtype=torch.int64, device=mask.device) << torch.arange(
        WORD_BITS, device=mask.device
    )
    unsigned = (padded.view(rows, nwords, WORD_BITS) * bits).sum(-1)
    # Reinterpret the unsigned 32-bit value as int32 (two's complement): same bits.
    return torch.where(unsigned >= 2**31, unsigned - 2**32, unsigned).to(torch.int32)


def unpack_mask_reference(words: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask_reference`."""
    rows, nwords = words.shape
    # int32 arithmetic: an arithmetic right shift by b still leaves bit b in bit 0 (4 bytes per weight)
    shifts = torch.arange(WORD_BITS, device=words.device, dtype=torch.int32)
    bits = (words.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.view(rows, nwords * WORD_BITS)[:, :cols].to(torch.bool)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool ``[out, in]`` keep-mask into int32 words, with the compiled op when available."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [out, in], got shape {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    losa = ops()
    if losa is not None and mask.device.type == "cpu":
        return losa.pack_mask(mask)
    return pack_mask_reference(mask)


def unpack_mask(words: torch.Tensor, cols: int) -> torch.Tensor:
    losa = ops()
    if losa is not None and words.device.type == "cpu":
        return losa.unpack_mask(words.to(torch.int32), cols)
    return unpack_mask_reference(words, cols)


def mask_sha256(weight: torch.Tensor) -> str:
    """SHA-256 of the packed little-endian bitmask of ``weight != 0`` (the sidecar's ``mask_sha256``)."""
    return words_sha256(pack_mask(weight.detach().cpu() != 0))


def words_sha256(words: torch.Tensor) -> str:
    """SHA-256 of bitmask words as stored: little-endian 32-bit, row after row."""
    return hashlib.sha256(words.cpu().numpy().astype("<u4", copy=False).tobytes()).hexdigest()


def popcount(words: torch.Tensor) -> torch.Tensor:
    """Set bits of each 32-bit word (int64 result), with SWAR arithmetic so it runs on any device."""
    x = words.to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def tail_word_mask(cols: int) -> int:
    """The bits of the last word of a row that hold columns (all 32 when ``cols`` is a multiple of 32)."""
    rem = cols % WORD_BITS
    return 0xFFFFFFFF if rem == 0 else (1 << rem) - 1


def key(prefix: str, name: str) -> str:
    """``<prefix>.<name>``; a module's state-dict prefix may already end with the dot, or be empty."""
    prefix = prefix.rstrip(".")
    return f"{prefix}.{name}" if prefix else name


def value_dtype(weight_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype packed values are stored in: ``dtype`` if given, else the weight's own."""
    chosen = dtype or weight_dtype
    if chosen not in VALUE_DTYPES:
        raise LosaError(f"packed values must be bfloat16, float16 or float32, not {chosen}")
    return chosen


def check_words_fit(words: torch.Tensor, cols: int, what: str) -> None:
    """No bit may be set past the last column of a row."""
    if words.shape[1] and cols % WORD_BITS:
        spill = (words[:, -1].to(torch.int64) & 0xFFFFFFFF) & ~tail_word_mask(cols)
        if bool(spill.any()):
            raise LosaError(f"{what}: mask bits are set past column {cols}")


def replace_arrays(weight, copies: Mapping[str, torch.Tensor]):
    """``weight`` (a packed layout checked when built) holding ``copies`` of some of its arrays. Only their
    shapes, dtypes and devices are checked again: the bits are the ones checked when it was built, and
    that pass is what a load would otherwise repeat for every move (a 4096x11008 N:M layout: about 40 ms
    each, three times per module in ``ld.load``). Anything but a copy goes through the constructor."""
    new = copy.copy(weight)
    for name, tensor in copies.items():
        if tuple(tensor.shape) != tuple(getattr(weight, name).shape):
            raise LosaError(f"{type(weight).__name__}.replace: {name} must keep its shape "
                            f"{tuple(getattr(weight, name).shape)}, got {tuple(tensor.shape)}")
        object.__setattr__(new, name, tensor)  # frozen dataclass
    new._check_arrays()
    return new


@dataclasses.dataclass(frozen=True, eq=False)
class BitmaskWeight:
    """A sparse ``[out, in]`` weight in the losa-bitmask v1 layout. Checked when built."""

    shape: tuple[int, int]
    values: torch.Tensor  # [nnz] bf16 / fp16 / fp32, row-major
    mask: torch.Tensor  # int32 [out, ceil(in / 32)]
    row_ptr: torch.Tensor  # int64 [out + 1]

    def __post_init__(self):
        self._check_arrays()
        self._check_bits()

    def _check_arrays(self) -> None:
        """Shapes, dtypes and devices: cheap, and checked again by ``replace``."""
        rows, cols = self.shape
        what = "bitmask weight"
        if rows < 0 or cols < 0:
            raise LosaError(f"{what}: bad shape {self.shape}")
        if self.values.dim() != 1 or self.values.dtype not in VALUE_DTYPES:
            raise LosaError(f"{what}: values must be 1-D bf16/fp16/fp32, got {self.values.dtype} "
                            f"{tuple(self.values.shape)}")
        if self.mask.dtype != torch.int32 or tuple(self.mask.shape) != (rows, words_per_row(cols)):
            raise LosaError(f"{what}: mask must be int32 [{rows}, {words_per_row(cols)}], got "
                            f"{self.mask.dtype} {tuple(self.mask.shape)}")
        if self.row_ptr.dtype != torch.int64 or tuple(self.row_ptr.shape) != (rows + 1,):
            raise LosaError(f"{what}: row_ptr must be int64 [{rows + 1}], got {self.row_ptr.dtype} "
                            f"{tuple(self.row_ptr.shape)}")
        if len({t.device for t in (self.values, self.mask, self.row_ptr)}) != 1:
            raise LosaError(f"{what}: values, mask and row_ptr are on different devices")

    def _check_bits(self) -> None:
        """The mask bits against the row offsets and the value count: a pass over the whole mask."""
        rows, cols = self.shape
        what = "bitmask weight"
        counts = popcount(self.mask).sum(1) if cols else torch.zeros(rows, dtype=torch.int64)
        starts = self.row_ptr.new_zeros(rows + 1)
        starts[1:] = counts.to(self.row_ptr.device).cumsum(0)
        if not torch.equal(starts, self.row_ptr) or int(self.row_ptr[-1]) != self.values.numel():
            raise LosaError(f"{what}: row_ptr does not match the mask bits and the {self.values.numel()} "
                            "values")
        check_words_fit(self.mask, cols, what)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, dtype: torch.dtype | None = None) -> BitmaskWeight:
        """Pack the non-zeros of a 2-D weight (values in ``dtype``, default the weight's)."""
        if weight.dim() != 2:
            raise LosaError(f"a weight to pack must be 2-D [out, in], got shape {tuple(weight.shape)}")
        weight = weight.detach()
        keep = weight != 0
        stored = value_dtype(weight.dtype, dtype)
        losa = ops()
        if losa is not None and weight.device.type == "cpu":  # one compiled pass (7B layer: 0.06-0.08 s, not 0.76)
            values, words, row_ptr = losa.bitmask_encode(keep, weight.to(stored))
            return cls(tuple(weight.shape), values, words, row_ptr)
        values = weight[keep].to(stored)
        row_ptr = torch.zeros(weight.shape[0] + 1, dtype=torch.int64, device=weight.device)
        row_ptr[1:] = keep.sum(1).cumsum(0)
        return cls(tuple(weight.shape), values.contiguous(), pack_mask(keep).to(weight.device), row_ptr)

    @classmethod
    def concat_rows(cls, parts: Sequence[BitmaskWeight]) -> BitmaskWeight:
        """The parts' rows stacked into one weight (e.g. a fused q/k/v layer: one kernel call, not three)."""
        cols = {p.shape[1] for p in parts}
        if len(cols) != 1 or len({p.values.dtype for p in parts}) != 1:
            raise LosaError("bitmask parts to stack need the same input width and value dtype")
        starts = torch.tensor([0, *(p.nnz for p in parts)], dtype=torch.int64).cumsum(0).tolist()
        row_ptr = torch.cat([p.row_ptr[:-1] + s for p, s in zip(parts, starts)] + [parts[0].row_ptr.new_tensor(starts[-1:])])
        return cls((sum(p.shape[0] for p in parts), cols.pop()), torch.cat([p.values for p in parts]),
                   torch.cat([p.mask for p in parts]), row_ptr)

    def to_dense(self) -> torch.Tensor:
        keep = unpack_mask(self.mask, self.shape[1]).to(self.values.device)
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        return dense.masked_scatter_(keep, self.values)  # fills the kept positions in row-major order

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        """Bytes the kernel streams: values, mask words and row offsets."""
        return self.values.nbytes + self.mask.nbytes + self.row_ptr.nbytes

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "mask": self.mask, "row_ptr": self.row_ptr}

    def replace(self, **copies: torch.Tensor) -> BitmaskWeight:
        """This weight holding ``copies`` of its arrays (on another device, on huge pages, values in another
        dtype): see :func:`replace_arrays`."""
        return replace_arrays(self, copies)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {
            key(prefix, "lb_shape"): torch.tensor(self.shape, dtype=torch.int64),
            key(prefix, "lb_values"): self.values,
            key(prefix, "lb_mask"): to_disk(self.mask),
            key(prefix, "lb_row_ptr"): self.row_ptr,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], prefix: str = "") -> BitmaskWeight:
        names = ("lb_shape", "lb_values", "lb_mask", "lb_row_ptr")
        missing = [key(prefix, n) for n in names if key(prefix, n) not in state]
        if missing:
            raise LosaError(f"losa-bitmask weight is missing {', '.join(missing)}")
        shape = state[key(prefix, "lb_shape")]
        if shape.dtype != torch.int64 or tuple(shape.shape) != (2,):
            raise LosaError(f"{key(prefix, 'lb_shape')} must be int64 [2]")
        try:
            mask = from_disk(state[key(prefix, "lb_mask")])
        except ValueError as exc:
            raise LosaError(f"{key(prefix, 'lb_mask')}: {exc}") from None
        return cls((int(shape[0]), int(shape[1])), state[key(prefix, "lb_values")], mask,
                   state[key(prefix, "lb_row_ptr")])


def to_disk(words: torch.Tensor) -> torch.Tensor:
    """The on-disk ``uint32`` view of in-memory int32 words."""
    return words.contiguous().view(torch.uint32)


def from_disk(words: torch.Tensor) -> torch.Tensor:
    if words.dtype not in (torch.uint32, torch.int32):
        raise ValueError(f"bitmask words must be uint32, got {words.dtype}")
    return words.contiguous().view(torch.int32)


__all__ = [
    "VALUE_DTYPES",
    "WORD_BITS",
    "BitmaskWeight",
    "from_disk",
    "mask_sha256",
    "pack_mask",
    "pack_mask_reference",
    "popcount",
    "to_disk",
    "unpack_mask",
    "unpack_mask_reference",
    "words_per_row",
]

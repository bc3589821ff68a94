"""The losa-bitmask keep-mask words (engines-and-formats.md §4.2).

Per output row, one 32-bit word per 32 input columns: bit ``b`` of word ``w`` of row ``i`` is set when
column ``32*w + b`` is kept. Bits past the row width are zero. On disk the words are little-endian
``uint32``; in memory they are carried as ``int32`` with the same bits, because PyTorch implements few
operations for ``uint32``. A uint32 little-endian word is byte-identical to compressed-tensors'
``packbits(bitorder="little")`` over the same 32 columns.
"""

from __future__ import annotations

import hashlib

import torch

from .. import ops

WORD_BITS = 32


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
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(WORD_BITS, device=words.device)
    bits = (unsigned.unsqueeze(-1) >> shifts) & 1
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
    words = pack_mask(weight.detach().cpu() != 0)
    return hashlib.sha256(words.numpy().astype("<u4", copy=False).tobytes()).hexdigest()


def to_disk(words: torch.Tensor) -> torch.Tensor:
    """The on-disk ``uint32`` view of in-memory int32 words."""
    return words.contiguous().view(torch.uint32)


def from_disk(words: torch.Tensor) -> torch.Tensor:
    if words.dtype not in (torch.uint32, torch.int32):
        raise ValueError(f"bitmask words must be uint32, got {words.dtype}")
    return words.contiguous().view(torch.int32)


__all__ = [
    "WORD_BITS",
    "from_disk",
    "mask_sha256",
    "pack_mask",
    "pack_mask_reference",
    "to_disk",
    "unpack_mask",
    "unpack_mask_reference",
    "words_per_row",
]

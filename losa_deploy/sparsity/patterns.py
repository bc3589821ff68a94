"""Sparsity patterns of weight matrices: measure them and tell which pattern a weight follows.

Conventions shared by every pruner, kernel and exporter:

* A weight is ``[out, in]``; N:M groups run along the input (K) dimension, ``M`` consecutive columns.
* When ``in`` is not a multiple of ``M`` the last, partial group of width ``t`` keeps at most
  ``nm_tail_keep(n, m, t) = ceil(n * t / m)`` weights (at least the group's share, never a whole
  column's worth more). Packed formats store that tail in the unstructured sub-format.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

NM_GROUP_SIZES = (4, 8, 16)
# A layer counts as N:M when its groups are on average this full (kept weights that happen to be exactly
# zero make a few groups hold fewer than N).
_FULL_GROUPS = 0.98
_DENSE_BELOW = 1e-3  # sparsity under this is "dense" (a few exact zeros occur in real checkpoints)


def nm_tail_keep(n: int, m: int, width: int) -> int:
    """How many weights the partial tail group of ``width < m`` columns keeps under N:M."""
    return -(-n * width // m)


@dataclass(frozen=True)
class LayerPattern:
    """What one weight matrix looks like."""

    kind: str  # "dense" | "unstructured" | "nm" | "mixed_nm" (N varies across rows)
    sparsity: float
    nnz: int
    numel: int
    n: int | None = None  # N (the largest N for mixed_nm)
    m: int | None = None

    def describe(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "mixed_nm":
            return f"mixed N:{self.m} (N<={self.n})"
        return self.kind

    def as_dict(self) -> dict:
        return asdict(self)


def sparsity(weight: torch.Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(weight)) / max(weight.numel(), 1)


def global_sparsity(weights) -> float:
    """Fraction of zeros over several weights together (weighted by size)."""
    weights = list(weights)
    kept = sum(int(torch.count_nonzero(w)) for w in weights)
    return 1.0 - kept / max(1, sum(w.numel() for w in weights))


def nm_group_counts(keep: torch.Tensor, m: int) -> torch.Tensor:
    """Kept entries per full group of ``m`` columns: ``[out, in // m]`` (int64)."""
    return _group_counts(keep, m).to(torch.int64)


def _group_counts(keep: torch.Tensor, m: int, mask_bytes: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`nm_group_counts` as uint8 (``mask_bytes``: the mask's :func:`_mask_bytes`, when already made)."""
    rows, cols = keep.shape
    full = cols // m
    if m in NM_GROUP_SIZES and keep.device.type == "cpu":
        return _popcount_groups(_mask_bytes(keep) if mask_bytes is None else mask_bytes, m)[:, :full]
    # Summed as bytes (a count is at most 16): 5-7x faster than an int64 sum of bools.
    groups = keep[:, : full * m].to(torch.bool).reshape(rows, full, m).view(torch.uint8)
    return groups.sum(-1, dtype=torch.uint8)


def _mask_bytes(keep: torch.Tensor) -> torch.Tensor:
    """The mask as bytes of bits, ``[out, 4 * ceil(in/32)]``: byte j holds columns 8j..8j+7 (the
    losa-bitmask words, little-endian), so groups of 4, 8 and 16 are nibbles, bytes and byte pairs."""
    from ..kernels.formats.bitmask import pack_mask  # kernels import this module: resolve at call time

    return pack_mask(keep).view(torch.uint8)


def _popcount_groups(mask_bytes: torch.Tensor, m: int) -> torch.Tensor:
    """uint8 popcounts of every group of ``m`` in 4, 8, 16 columns (past the last column: zeros): an
    eighth of the data a per-column sum reads."""
    rows, nbytes = mask_bytes.shape
    # SWAR in bytes: bit pairs, then nibbles (the counts of groups of 4), then whole bytes.
    pairs = mask_bytes - ((mask_bytes >> 1) & 0x55)
    nibbles = (pairs & 0x33) + ((pairs >> 2) & 0x33)
    if m == 4:
        return torch.stack([nibbles & 0xF, nibbles >> 4], -1).view(rows, 2 * nbytes)  # sizes: rows may be 0
    counts = (nibbles + (nibbles >> 4)) & 0xF
    return counts if m == 8 else counts.view(rows, nbytes // 2, 2).sum(-1, dtype=torch.uint8)


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group (and the partial tail group) keeps at most its N:M share."""
    keep = weight != 0
    if keep.shape[1] >= m and int(nm_group_counts(keep, m).max()) > n:
        return False
    tail = keep.shape[1] % m
    return tail == 0 or int(keep[:, -tail:].sum(1).max()) <= nm_tail_keep(n, m, tail)


def detect_pattern(weight: torch.Tensor) -> LayerPattern:
    """Classify a 2-D weight as dense, unstructured, N:M or mixed N:M (per-row N)."""
    keep = weight.detach() != 0
    numel = keep.numel()
    nnz = int(torch.count_nonzero(keep))  # 15x faster than keep.sum() on big bool masks
    sp = 1.0 - nnz / max(numel, 1)
    base = {"sparsity": sp, "nnz": nnz, "numel": numel}
    if sp < _DENSE_BELOW:
        return LayerPattern("dense", **base)
    best = None
    packed = _mask_bytes(keep) if keep.device.type == "cpu" else None
    for m in NM_GROUP_SIZES:
        found = _nm_fit(keep, m, packed)
        if found is not None and (best is None or found[1] / m < best[1] / best[2]):
            best = (found[0], found[1], m)
    if best is None:
        return LayerPattern("unstructured", **base)
    kind, n, m = best
    return LayerPattern(kind, n=n, m=m, **base)


def _nm_fit(keep: torch.Tensor, m: int, mask_bytes: torch.Tensor | None = None) -> tuple[str, int] | None:
    """("nm" | "mixed_nm", N) if the mask is N:M for this M (N per row for mixed), else None
    (``mask_bytes``: the mask's :func:`_mask_bytes`, when already made)."""
    rows, cols = keep.shape
    if cols < 2 * m:  # one full group per row fits any mask: a row's N would be whatever it keeps
        return None
    counts = _group_counts(keep, m, mask_bytes)
    row_n = counts.amax(dim=1).to(torch.int64)  # the N each row follows
    n = int(row_n.max())
    if n >= m or n == 0:
        return None
    # Groups must be (nearly) full relative to their row's N: random unstructured masks are not. An empty
    # row fits every N:M pattern, so it counts neither for nor against.
    used = row_n > 0
    fill = counts[used].sum(1).double() / (row_n[used].double() * counts.shape[1])
    if float(fill.mean()) < _FULL_GROUPS:
        return None
    tail = cols % m
    if tail and bool((keep[:, -tail:].sum(1) > (row_n * tail + m - 1) // m).any()):
        return None  # the tail group may keep at most nm_tail_keep(row N, m, tail)
    return ("nm" if int(row_n[used].min()) == n else "mixed_nm"), n


def model_pattern(patterns: dict[str, LayerPattern]) -> str:
    """The checkpoint-level pattern: dense, unstructured, nm (one N:M everywhere) or mixed_nm."""
    kinds = {p.kind for p in patterns.values()}
    sparse = [p for p in patterns.values() if p.kind != "dense"]
    if not sparse:
        return "dense"
    if kinds & {"unstructured"}:
        return "unstructured"
    if len({p.m for p in sparse}) > 1:
        return "unstructured"  # different group sizes: no single N:M kernel applies
    if "mixed_nm" in kinds or len({p.n for p in sparse}) > 1 or "dense" in kinds:
        return "mixed_nm"
    return "nm"

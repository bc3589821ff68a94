"""Keep-masks from scores: a fraction of every row (unstructured) or N of every M inputs (N:M).

A mask is a bool tensor shaped like the weight ``[out, in]``, True where the weight is kept. Every pruner
scores the weights its own way and then asks this module which entries survive, so the counting rules
live in one place:

* **Unstructured** keeps the same number of weights in every output row: ``in - round(in * sparsity)``
  (Wanda's comparison group; rounding half up, so a layer's sparsity is within ``1 / (2 in)`` of the
  target).
* **N:M** keeps the top ``N`` of every ``M`` consecutive inputs of a row. A partial tail group of width
  ``t < M`` keeps ``nm_tail_keep(N, M, t) = ceil(N t / M)``, the convention of :mod:`.patterns`.
* **Mixed N:M** is N:M with ``M`` fixed and ``N`` chosen per layer by an allocator: one :class:`Target`
  per layer, nothing special here.
* **Nesting**: given a previous mask, entries outside it stay pruned (their score is ``-inf`` and the
  result is intersected with it), so masks only ever shrink — the invariant LoSA's progressive steps need.
  The layer still ends at the target when its rows are unevenly sparse (a SparseGPT-pruned input): a row
  already sparser than the target keeps what it has, and the other rows are cut to one common level that
  makes the layer's count exact (``nested_row_keeps``), not each to the target, which overshot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LosaError
from .patterns import nm_tail_keep

# Wider N:M groups are unstructured sparsity in all but name (the packed N:M formats take M <= 16), and an
# absurd M (2:99999999999999999999) would only fail inside a reshape.
MAX_M = 64


@dataclass(frozen=True)
class Target:
    """What one weight is pruned to: a fraction of every row, or ``n`` of every ``m`` inputs."""

    sparsity: float
    n: int | None = None
    m: int | None = None

    @classmethod
    def unstructured(cls, sparsity: float) -> Target:
        sparsity = float(sparsity)
        if not 0.0 <= sparsity < 1.0:
            raise LosaError(f"sparsity must be in [0, 1), got {sparsity:g}")
        return cls(sparsity)

    @classmethod
    def nm(cls, n: int, m: int) -> Target:
        if not (isinstance(n, int) and isinstance(m, int)) or not 2 <= m <= MAX_M or not 1 <= n < m:
            raise LosaError(f"N:M needs integers 1 <= N < M and 2 <= M <= {MAX_M}, got {n}:{m}")
        return cls(1.0 - n / m, n, m)

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    def pruned_count(self, numel: int) -> int:
        """Unstructured: how many of ``numel`` weights (a row, or a whole layer) are pruned, rounded half up."""
        return int(numel * self.sparsity + 0.5)

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{100 * self.sparsity:.2f}%"


def topk_mask(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep the ``keep`` highest scores of every row."""
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if keep > 0:
        mask.scatter_(-1, score.topk(keep, dim=-1, sorted=False).indices, True)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the top ``n`` of every ``m`` consecutive columns of each row (tail: ``nm_tail_keep``)."""
    rows, cols = score.shape
    full = cols // m * m
    groups = topk_mask(score[:, :full].reshape(rows, -1, m), n).reshape(rows, full)
    tail = topk_mask(score[:, full:], nm_tail_keep(n, m, cols - full)) if cols > full else groups[:, :0]
    return torch.cat([groups, tail], dim=1)


def nested_row_keeps(prev_kept: torch.Tensor, keep_total: int) -> torch.Tensor:
    """How many entries each row keeps when the rows together keep ``keep_total``, no row gains, and the
    rows above a common level are cut to it (water-filling); rows at or below it keep all they have.

    The level is the largest integer ``L`` with ``sum(min(kept, L)) <= keep_total``; what is left over
    goes, one each, to the first rows that still hold more than ``L``. If the rows hold no more than
    ``keep_total`` already, nothing is cut.
    """
    prev_kept = prev_kept.long()
    if int(prev_kept.sum()) <= keep_total:
        return prev_kept
    low, high = 0, int(prev_kept.max())  # sum(min(kept, low)) <= keep_total < sum(min(kept, high))
    while high - low > 1:
        mid = (low + high) // 2
        if int(prev_kept.clamp(max=mid).sum()) <= keep_total:
            low = mid
        else:
            high = mid
    keeps = prev_kept.clamp(max=low)
    spare = keep_total - int(keeps.sum())
    above = (prev_kept > low).nonzero().flatten()[:spare]
    keeps[above] += 1
    return keeps


def _topk_rows(score: torch.Tensor, keeps: torch.Tensor) -> torch.Tensor:
    """Keep the ``keeps[i]`` highest scores of row ``i``."""
    rank = torch.empty_like(score, dtype=torch.long)
    order = score.argsort(dim=-1, descending=True, stable=True)
    rank.scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    return rank < keeps.to(score.device).unsqueeze(-1)


def select_mask(score: torch.Tensor, target: Target, prev_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The keep-mask for ``target`` from ``score`` (higher = more important), nested in ``prev_mask``."""
    if prev_mask is not None:
        score = score.masked_fill(~prev_mask, float("-inf"))
    rows, cols = score.shape
    if target.is_nm:
        mask = nm_mask(score, target.n, target.m)
    else:
        keep = cols - target.pruned_count(cols)
        if prev_mask is None or bool((prev_mask.sum(1) >= keep).all()):
            mask = topk_mask(score, keep)
        else:  # some rows are sparser than the target already: the others make up for them
            mask = _topk_rows(score, nested_row_keeps(prev_mask.sum(1), rows * keep))
    # N:M: a group that already lost more than the target keeps losing (-inf entries never come back).
    return mask if prev_mask is None else mask & prev_mask


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight`` with every entry outside ``mask`` set to +0.0, and kept -0.0 scrubbed to +0.0.

    Engines have mishandled negative zeros, and ``w * 0`` is -0.0 for negative ``w``, hence ``where``.
    """
    return torch.where(mask & (weight != 0), weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

"""LoSA's rank allocation: ranks proportional to reconstruction error, under an exact budget.

r_l ≈ L·Ω_t·E_l / ΣE, rounded by largest remainders (Hamilton apportionment) within [r_lo, r_hi], so
Σ r_l = L·Ω_t whenever that is feasible. The reference code's single greedy pass can miss the budget
(losa.md §6.3); ``allocate_ranks_reference`` reproduces it for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import LosaError


def average_rank(step: int, first: int = 6) -> int:
    """Ω_t = Ω_1 + (t − 1): 6, 7, 8, 9, 10 for t = 1..5 (mean 8, the LoRA r = 8 budget)."""
    return first + step - 1


def allocate_ranks(errors: Sequence[float], average: float, lo: int = 1, hi: int = 16) -> list[int]:
    """Integer ranks in [lo, hi] proportional to ``errors`` that sum to round(L·average) when feasible."""
    n = len(errors)
    if n == 0:
        raise LosaError("no blocks to allocate ranks to")
    if lo > hi or lo < 1:
        raise LosaError(f"bad rank bounds [{lo}, {hi}]")
    if any(e < 0 or not math.isfinite(e) for e in errors):
        raise LosaError("reconstruction errors must be finite and non-negative")
    budget = min(max(round(n * average), n * lo), n * hi)
    total = sum(errors)
    quota = [budget * e / total if total > 0 else budget / n for e in errors]
    ranks = [min(max(math.floor(q), lo), hi) for q in quota]
    # Largest remainders first when adding; smallest first when removing. Ties go to the lower index.
    remainder = [q - r for q, r in zip(quota, ranks)]
    while sum(ranks) < budget:
        i = max((i for i in range(n) if ranks[i] < hi), key=lambda i: (remainder[i], -i))
        ranks[i] += 1
        remainder[i] -= 1
    while sum(ranks) > budget:
        i = min((i for i in range(n) if ranks[i] > lo), key=lambda i: (remainder[i], i))
        ranks[i] -= 1
        remainder[i] += 1
    return ranks


def allocate_ranks_reference(errors: Sequence[float], average: float, lo: int = 1, hi: int = 16) -> list[int]:
    """The reference code's rule: clipped rounding, then one greedy pass (may miss the budget)."""
    n, total = len(errors), sum(errors)
    budget = n * average
    ranks = [min(max(round(n * average * e / total), lo), hi) for e in errors]
    order = sorted(range(n), key=lambda i: errors[i])
    if sum(ranks) > budget:
        for i in order:
            if sum(ranks) <= budget:
                break
            if ranks[i] > lo:
                ranks[i] -= 1
    elif sum(ranks) < budget:
        for i in reversed(order):
            if sum(ranks) >= budget:
                break
            if ranks[i] < hi:
                ranks[i] += 1
    return ranks

"""LoSA's progressive schedules: cubic sparsity per step, λ per step, N:M snapping.

s_t = S − S·(1 − t/T)³ for t = 1..T (Zhu & Gupta, 2017). λ_t bounds how far a block's sparsity may move
from s_t in the RMI allocation (losa.md §5.3).
"""

from __future__ import annotations

from ..errors import LosaError


def cubic_sparsity(target: float, step: int, steps: int) -> float:
    if not 1 <= step <= steps:
        raise LosaError(f"step {step} outside 1..{steps}")
    return target - target * (1.0 - step / steps) ** 3


def sparsity_schedule(target: float, steps: int) -> list[float]:
    """[s_1, ..., s_T]; the last one is exactly the target."""
    if not 0.0 <= target < 1.0:
        raise LosaError(f"target sparsity must be in [0, 1), got {target}")
    if steps < 1:
        raise LosaError(f"steps must be positive, got {steps}")
    values = [cubic_sparsity(target, t, steps) for t in range(1, steps + 1)]
    values[-1] = target
    return values


def nm_schedule(n: int, m: int, steps: int) -> list[int]:
    """Kept-per-group N at each step: the cubic schedule snapped to the nearest grid point {j/M}.

    For 2:4 and T = 5 this gives 3, 2, 2, 2, 2: groups only ever lose kept entries.
    """
    out = []
    for s in sparsity_schedule(1.0 - n / m, steps):
        out.append(max(n, min(m, m - round(m * s))))
    out[-1] = n
    return out


def lambda_for(sparsity: float, mode: str = "banded", previous: float | None = None) -> float:
    """λ_t for a step's sparsity.

    ``banded`` (default, stateless): 0.01 / 0.02 / 0.03 for s in (0, .5] / (.5, .6] / above .6.
    ``reference``: the same bands up to .7, then unchanged from the previous step (stateful).
    ``constant:<λ>``: a fixed λ, for ablations.
    """
    if mode.startswith("constant:"):
        try:
            lam = float(mode.split(":", 1)[1])
        except ValueError:
            raise LosaError(f"bad lambda schedule '{mode}'") from None
        if not 0.0 <= lam < 1.0:
            raise LosaError(f"lambda schedule '{mode}': lambda must be in [0, 1)")
        return lam
    if mode not in ("banded", "reference"):
        raise LosaError(f"unknown lambda schedule '{mode}' (banded, reference, constant:<λ>)")
    if sparsity <= 0.5:
        return 0.01
    if sparsity <= 0.6:
        return 0.02
    if mode == "banded" or sparsity <= 0.7:
        return 0.03
    return previous if previous is not None else 0.01

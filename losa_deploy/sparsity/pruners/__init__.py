"""Pruners, one module per method, behind :class:`~.base.Pruner`: weight + statistics + target -> mask."""

from __future__ import annotations

from ...errors import LosaError
from .base import Pruned, Pruner
from .magnitude import Magnitude
from .sparsegpt import SparseGPT, sparsegpt_solve
from .wanda import Wanda, wanda_score

PRUNERS: dict[str, type[Pruner]] = {p.name: p for p in (Magnitude, Wanda, SparseGPT)}


def get_pruner(name: str, **options) -> Pruner:
    """A pruner by name; ``options`` go to its constructor (SparseGPT: ``blocksize``, ``percdamp``)."""
    try:
        cls = PRUNERS[name]
    except KeyError:
        raise LosaError(f"unknown pruning method '{name}' (choose from {', '.join(PRUNERS)})") from None
    return cls(**options) if options else cls()


__all__ = ["PRUNERS", "Magnitude", "Pruned", "Pruner", "SparseGPT", "Wanda", "get_pruner", "sparsegpt_solve",
           "wanda_score"]

"""Wanda (Sun et al., 2024): score ``|W_ij| * ||X_j||_2``, compared within each output row.

``||X_j||_2`` is the norm of input feature ``j`` over every calibration token. Kept weights keep their
values exactly: Wanda only chooses the mask.
"""

from __future__ import annotations

import torch

from ..masks import Target, select_mask
from ..stats import InputStats
from .base import Pruned, Pruner


def wanda_score(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs() * norms.to(weight.device).float().unsqueeze(0)


class Wanda(Pruner):
    name = "wanda"
    needs = "norms"

    def prune(self, weight: torch.Tensor, target: Target, stats: InputStats | None = None,
              prev_mask: torch.Tensor | None = None) -> Pruned:
        if stats is None:
            raise ValueError("Wanda needs the input norms of the layer")
        return Pruned(select_mask(wanda_score(weight, stats.norms()), target, prev_mask))

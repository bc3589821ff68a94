"""Magnitude pruning: keep the largest ``|W_ij|`` of every row (or of every N:M group)."""

from __future__ import annotations

import torch

from ..masks import Target, select_mask
from ..stats import InputStats
from .base import Pruned, Pruner


class Magnitude(Pruner):
    name = "magnitude"

    def prune(self, weight: torch.Tensor, target: Target, stats: InputStats | None = None,
              prev_mask: torch.Tensor | None = None) -> Pruned:
        return Pruned(select_mask(weight.detach().float().abs(), target, prev_mask))

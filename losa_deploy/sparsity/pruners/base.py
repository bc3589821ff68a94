"""The pruner interface: a weight to score, its input statistics and a target in; a keep-mask out.

A pruner knows nothing about models, files or schedules. It may be handed a weight other than the one
stored in the model (LoSA scores the LoRA-merged weight ``W + s * (B A) * M``), and a previous mask whose
pruned entries must stay pruned. It returns the mask and, when it changes the kept values (SparseGPT's
OBS update), the updated weight; the caller applies them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..masks import Target
from ..stats import InputStats


@dataclass
class Pruned:
    """A pruner's answer for one weight."""

    mask: torch.Tensor  # bool [out, in], True = kept
    weight: torch.Tensor | None = None  # updated values (zero outside mask), or None: keep the input values


class Pruner(ABC):
    """One pruning method. ``needs`` names the input statistics :meth:`prune` reads."""

    name: ClassVar[str]
    needs: ClassVar[str | None] = None  # None | "norms" | "hessian"

    @abstractmethod
    def prune(self, weight: torch.Tensor, target: Target, stats: InputStats | None = None,
              prev_mask: torch.Tensor | None = None) -> Pruned:
        """Choose what to keep of ``weight [out, in]`` for ``target``, nested in ``prev_mask``."""

    def options(self) -> dict:
        """The method's settings, as recorded in the sidecar."""
        return {}

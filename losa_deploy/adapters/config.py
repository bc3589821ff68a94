"""Adapter configuration: one dataclass for LoRA, masked LoRA (LoSA, sparse-LoRA) and elastic LoRA."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import LosaError


@dataclass
class AdapterConfig:
    """How adapters are attached.

    ``scale = alpha / scale_rank`` is fixed for the adapter's whole life, whatever rank is active: a rank
    change then never changes the function (LoSA's reference keeps alpha/8 = 2; Shears keeps alpha/r_max).
    """

    rank: int = 8  # initial rank of every module (LoSA re-allocates it per block each step)
    max_rank: int = 16  # the capacity: no allocated rank may exceed it (no silent cap)
    alpha: float = 16.0
    scale_rank: int = 8
    dropout: float = 0.0
    masked: bool = True  # the update carries the weight mask: (W + s·B·A) ⊙ M
    targets: tuple[str, ...] | None = None  # linear names inside a block; None = the architecture's all
    init: str = "gaussian"  # A rows of new components: "gaussian" N(0, 1/max_rank²) or "kaiming" (PEFT)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not 1 <= self.rank <= self.max_rank:
            raise LosaError(f"adapter rank {self.rank} must be between 1 and max_rank {self.max_rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0) or self.scale_rank < 1:
            raise LosaError("adapter alpha and scale_rank must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise LosaError(f"adapter dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("gaussian", "kaiming"):
            raise LosaError(f"unknown adapter init '{self.init}' (gaussian or kaiming)")

    @property
    def scale(self) -> float:
        return self.alpha / self.scale_rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets) if self.targets is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        d = dict(d)
        if d.get("targets") is not None:
            d["targets"] = tuple(d["targets"])
        return cls(**d)

"""Running statistics of the inputs one linear layer sees during calibration.

Wanda needs the per-input-column norm ``||X_j||_2`` over all calibration tokens; SparseGPT needs the
layer Hessian ``X^T X``. Both are accumulated in float64 from float32 batch products, so 128 x 2048
tokens sum without drift, and the pruners never see activations, only these statistics.
"""

from __future__ import annotations

import torch


class InputStats:
    """Token count, per-column sum of squares and (optionally) ``X^T X`` of a linear's inputs."""

    def __init__(self, features: int, hessian: bool = False, device: torch.device | str | None = None):
        self.features = features
        self.tokens = 0
        self.sq_sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(features, features, dtype=torch.float64, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs ``[..., features]``."""
        x = x.detach().reshape(-1, self.features).float()
        self.tokens += x.shape[0]
        self.sq_sum += x.square().sum(0, dtype=torch.float64)
        if self.xtx is not None:
            self.xtx += (x.T @ x).double()

    def norms(self) -> torch.Tensor:
        """``||X_j||_2`` over every token seen, float32 ``[features]``."""
        return self.sq_sum.sqrt().float()

    def hessian(self) -> torch.Tensor:
        """The mean ``X^T X / tokens``, float64 ``[features, features]`` (the scale does not matter)."""
        if self.xtx is None:
            raise ValueError("these statistics were collected without the Hessian")
        return self.xtx / max(self.tokens, 1)

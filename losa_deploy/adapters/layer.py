"""``LoraLinear``: a frozen (possibly pruned) linear plus a low-rank update, masked or not.

    masked:    y = x·((W + s·B·A) ⊙ M)ᵀ + b      (LoSA, sparse-LoRA, SQFT-style Shears)
    unmasked:  y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ + b  (plain LoRA; merging it makes W dense)

The mask ``M`` is data, not a side effect: the pruner produces it and it is the source of truth, with
the invariant (W ≠ 0) ⊆ M. It is held as losa-bitmask words (1 bit per weight), the form the fused
kernels read. A and B are fp32 master weights whatever the base dtype. The rank can change
between training phases: growing appends components with zero contribution (new B columns are zero),
shrinking drops the last components (``"index"``, the default) or keeps the best rank-r approximation
of B·A (``"svd"``).

Elastic LoRA (Shears): ``active_rank = r`` makes the layer compute with its first r components only
(``A[:r]``, ``B[:, :r]``, a nested sub-adapter sharing the super-adapter's weights) at the same fixed
scale; ``None`` uses them all. It is a plain attribute set from outside (``adapters.elastic``): the
forward never draws random numbers, so a recomputed forward (gradient checkpointing) sees the same rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LosaError
from ..kernels.formats.bitmask import pack_mask, unpack_mask
from ..kernels.masked_lora import masked_lora_linear


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, scale: float, max_rank: int, dropout: float = 0.0,
                 masked: bool = True, init: str = "gaussian", generator: torch.Generator | None = None):
        super().__init__()
        if rank > max_rank:
            raise LosaError(f"rank {rank} exceeds the adapter capacity max_rank {max_rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        self.register_buffer("mask_words", pack_mask(self.weight.detach().cpu() != 0).to(self.weight.device)
                             if masked else None)
        self.scale, self.max_rank, self.dropout, self.init = scale, max_rank, dropout, init
        self.enabled = True  # False: the plain base linear (LoSA's dense reference runs use it)
        self.active_rank: int | None = None  # elastic LoRA: compute with the first r components only
        self.lora_A = nn.Parameter(self._new_rows(rank, generator).to(self.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device))

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def masked(self) -> bool:
        return self.mask_words is not None

    @property
    def mask(self) -> torch.Tensor | None:
        """The bool keep-mask ``[out, in]`` (unpacked on demand), or None for an unmasked adapter."""
        return None if self.mask_words is None else unpack_mask(self.mask_words.cpu(), self.in_features).to(
            self.weight.device)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the active sub-adapter: views of the first ``active_rank`` components, or all of them."""
        r = self.active_rank
        if r is None or r == self.rank:
            return self.lora_A, self.lora_B
        if not 1 <= r <= self.rank:
            raise LosaError(f"active rank {r} outside [1, rank={self.rank}]")
        return self.lora_A[:r], self.lora_B[:, :r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(x, self.weight.to(x.dtype), self.bias)
        lora_A, lora_B = self.factors()
        if self.masked:
            return masked_lora_linear(x, self.weight, self.mask_words, lora_A, lora_B, self.scale,
                                      self.bias, dropout=self.dropout, training=self.training)
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        xd = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return F.linear(x, self.weight.to(x.dtype), self.bias) + self.scale * F.linear(F.linear(xd, A), B)

    # --- the update as a matrix (fp32, transient: one layer at a time) ------------------------------
    def delta(self) -> torch.Tensor:
        """s·(B·A) of the active components, masked if the adapter is masked, in float32."""
        A, B = self.factors()
        d = self.scale * (B.detach().float() @ A.detach().float())
        return d * self.mask if self.masked else d

    def merged_weight(self) -> torch.Tensor:
        """W + s·(B·A)⊙M in float32 (the weight the pruner scores in LoSA's merge → prune → unmerge)."""
        return self.weight.detach().float() + self.delta()

    def set_base(self, weight: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Install a new (pruned) base weight and mask. Only masks can shrink: (new M) ⊆ (old M)."""
        if weight.shape != self.weight.shape:
            raise LosaError(f"new base weight has shape {tuple(weight.shape)}, expected {tuple(self.weight.shape)}")
        if self.masked:
            mask = (weight != 0) if mask is None else mask.to(torch.bool)
            if bool((mask & ~self.mask).any()):
                raise LosaError("the new mask would un-prune weights (masks must be nested)")
            if bool((weight.ne(0) & ~mask).any()):
                raise LosaError("the new base weight has non-zeros outside its mask")
            self.mask_words = pack_mask(mask.cpu()).to(self.weight.device)
        self.weight.data = weight.to(self.weight.dtype).contiguous()

    # --- rank changes ----------------------------------------------------------------------------
    def set_rank(self, rank: int, shrink: str = "index", generator: torch.Generator | None = None) -> None:
        """Grow (new components contribute zero) or shrink (the first r components, or the best rank-r)."""
        if not 1 <= rank <= self.max_rank:
            raise LosaError(f"rank {rank} outside [1, max_rank={self.max_rank}]")
        A, B = self.lora_A.detach(), self.lora_B.detach()
        if rank > self.rank:
            A = torch.cat([A, self._new_rows(rank - self.rank, generator).to(A.device)])
            B = torch.cat([B, B.new_zeros(self.out_features, rank - B.shape[1])], dim=1)
        elif rank < self.rank:
            if shrink == "svd":
                B, A = _best_rank(B, A, rank)
            elif shrink == "index":
                A, B = A[:rank], B[:, :rank]
            else:
                raise LosaError(f"unknown shrink rule '{shrink}' (svd or index)")
        self.lora_A = nn.Parameter(A.contiguous())
        self.lora_B = nn.Parameter(B.contiguous())
        self.active_rank = None  # new factors: any sub-adapter choice referred to the old ones

    def _new_rows(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        rows = torch.empty(n, self.in_features)
        if self.init == "gaussian":
            return rows.normal_(0.0, 1.0 / self.max_rank, generator=generator)
        bound = 1.0 / math.sqrt(self.in_features)  # PEFT's kaiming_uniform(a=√5) on A
        return rows.uniform_(-bound, bound, generator=generator)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the merged weight, cast once to ``dtype`` (default: the base's)."""
        dtype = dtype or self.weight.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=dtype, device=self.weight.device)
        merged = self.merged_weight()  # already exactly zero outside the mask: delta() is masked
        # Cast once, then + 0.0: it turns every -0.0 (also one born of underflow in the cast) into +0.0.
        linear.weight.data = merged.to(dtype) + 0.0
        if self.bias is not None:
            linear.bias.data = self.bias.detach().to(dtype)
        return linear

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale}, "
                f"masked={self.masked}" + (f", active_rank={self.active_rank}" if self.active_rank else ""))


def _best_rank(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the best rank-``rank`` approximation of B·A (QR of both factors, then an r×r SVD)."""
    qb, rb = torch.linalg.qr(B.double())
    qa, ra = torch.linalg.qr(A.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    root = s[:rank].sqrt()
    new_b = (qb @ u[:, :rank]) * root
    new_a = (root[:, None] * vh[:rank]) @ qa.T
    return new_b.float(), new_a.float()

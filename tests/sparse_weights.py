"""Random sparse weights for the kernel, format and runtime tests (ragged shapes, exact zeros), and the
float64 check of a sparse linear's output."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losa_deploy.sparsity.patterns import nm_tail_keep


def random_sparse(rows: int, cols: int, sparsity: float, gen: torch.Generator,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unstructured: each weight is zero with probability ``sparsity``; kept values never round to zero."""
    w = torch.randn(rows, cols, generator=gen)
    w = torch.where(w.abs() < 1e-2, torch.full_like(w, 0.5), w)
    w[torch.rand(rows, cols, generator=gen) < sparsity] = 0
    return w.to(dtype)


def random_nm(rows: int, cols: int, n, m: int, gen: torch.Generator, underfill: float = 0.1,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N:M along the input dimension (``n`` an int or a per-row tensor); the tail group keeps at most
    ``nm_tail_keep``; a fraction ``underfill`` of the kept weights is zeroed so some groups hold fewer than N."""
    row_n = torch.full((rows,), n) if isinstance(n, int) else n
    groups = -(-cols // m)
    scores = torch.rand(rows, groups, m, generator=gen)
    rank = scores.argsort(-1).argsort(-1)  # a random permutation of 0..m-1 per group
    keep = rank < row_n[:, None, None]
    tail = cols % m
    if tail:
        limit = torch.tensor([nm_tail_keep(int(k), m, tail) for k in row_n])
        tail_rank = torch.rand(rows, tail, generator=gen).argsort(-1).argsort(-1)
        keep[:, -1, :] = False
        keep[:, -1, :tail] = tail_rank < limit[:, None]
    keep = keep.view(rows, -1)[:, :cols] & (torch.rand(rows, cols, generator=gen) >= underfill)
    return torch.where(keep, random_sparse(rows, cols, 0.0, gen), 0.0).to(dtype)


def prune_linears_(model: torch.nn.Module, sparsity: float | None = None, nm: tuple[int, int] | None = None,
                   skip: tuple[str, ...] = ("lm_head",)) -> None:
    """Magnitude-prune every ``nn.Linear`` in place: unstructured to ``sparsity``, or N:M (``nm``)."""
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] in skip:
            continue
        w = module.weight.data
        score = w.abs().float()
        if nm is None:
            k = max(1, int(sparsity * w.numel()))
            keep = score > score.flatten().kthvalue(k).values
        else:
            n, m = nm
            rows, cols = w.shape
            groups = -(-cols // m)
            padded = torch.full((rows, groups * m), -1.0)
            padded[:, :cols] = score
            rank = padded.view(rows, groups, m).argsort(-1, descending=True).argsort(-1)
            keep = (rank < n).view(rows, -1)[:, :cols]
            tail = cols % m
            if tail:
                tail_rank = score[:, -tail:].argsort(-1, descending=True).argsort(-1)
                keep[:, -tail:] = tail_rank < nm_tail_keep(n, m, tail)
        w.mul_(keep)
        w[w == 0] = 0.0  # no negative zeros


# unit roundoff of the output dtype (the kernels round their fp32 result once)
ROUNDOFF = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def check_linear(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, ulps: int = 1):
    """``y`` against F.linear in float64 on the same values: within ``ulps`` roundings of the output plus an
    fp32 accumulation bound on the sum of |x·w| terms."""
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    scale = F.linear(x.double().abs(), w.double().abs()) + (0 if bias is None else bias.double().abs())
    err = (y.double().cpu() - ref.cpu()).abs()
    bound = ulps * ROUNDOFF[y.dtype] * 1.01 * ref.abs().cpu() + 1e-5 * scale.cpu() + 1e-30
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert bool(torch.isfinite(y).all()), "non-finite output (an element was not written?)"
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.2f}x the bound; max abs error {err.max().item():.3e}"
    assert ref.abs().max() > 0  # the problem is not all zeros

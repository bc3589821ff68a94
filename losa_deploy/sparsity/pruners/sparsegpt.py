"""SparseGPT (Frantar & Alistarh, 2023): prune a layer in one shot and update the weights it keeps so
that the layer's output on the calibration inputs moves as little as possible.

The solver is the paper's Algorithm 1:

* ``H = X^T X`` over the calibration tokens, dampened by ``percdamp * mean(diag H)`` so it is positive
  definite. Inputs that are always zero ("dead" columns) get ``H_jj = 1`` and score zero, so they are
  pruned first. The reference zeroes all their weights; here those the mask still keeps (an N:M group
  with more than M-N dead inputs, common after OPT's ReLU) keep their values, so the layer ends exactly
  at its pattern instead of past it. Their inputs are zero, so the calibration output is the same.
* ``U``, the upper Cholesky factor of ``H^-1``: row ``j`` of ``U`` holds the optimal (OBS) correction of
  the columns after ``j`` when column ``j`` is fixed, given the columns before it are fixed already.
* Columns are visited left to right in blocks of ``blocksize``. Inside a block every column's error is
  spread over the block's later columns at once; the rest of the matrix receives the block's errors in
  one matrix product at the end of the block ("lazy batch updates").
* The mask is chosen per block from the OBS saliency ``w^2 / U_jj^2`` of the weights as updated so far:
  unstructured over the whole ``[out, blocksize]`` block (adaptive mask selection, so rows may differ),
  N:M per group of ``M`` columns when the solver reaches the group's first column.

Deviation from the reference code: the layer loses exactly ``P = round(s * out * in)`` weights, the
block of columns ``[a, b)`` ``floor(P b / in) - floor(P a / in)`` of them, instead of
``floor(s * out * blocksize)`` per block. The Cholesky factorisation runs in float64; the column updates run in
``dtype`` (float32 by default, as in the reference).
"""

from __future__ import annotations

import contextlib

import torch

from ...errors import LosaError
from ..allocation import fill_to_mean
from ..masks import Target, apply_mask, topk_mask
from ..patterns import nm_tail_keep
from ..stats import InputStats
from .base import Pruned, Pruner


def _saliency(wt: torch.Tensor, u_diag: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """OBS saliency of each weight (input-major ``[cols, rows]``); entries pruned earlier score -inf."""
    return (wt.square() / u_diag.square().unsqueeze(1)).masked_fill(~allowed, float("-inf"))


def hessian_inverse_factor(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(``U``, dead columns): the upper Cholesky factor of the dampened ``H^-1``, in float64."""
    h = hessian.to(torch.float64).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(percdamp * h.diagonal().mean())
    # H^-1 through cholesky_solve: torch's CPU cholesky_inverse is ~15x slower at these sizes.
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    try:
        return torch.linalg.cholesky(torch.cholesky_solve(eye, torch.linalg.cholesky(h)), upper=True), dead
    except torch.linalg.LinAlgError:
        raise LosaError(f"SparseGPT: the dampened Hessian is not positive definite (percdamp {percdamp:g}); raise "
                        "--percdamp or give more calibration tokens") from None


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """The column loop is thousands of ops on a few hundred KB each: on CPU, splitting every one of them
    across threads costs more than it gains (4-5x slower on a busy 2-core machine), so run it on one."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sparsegpt_solve(weight: torch.Tensor, hessian: torch.Tensor, target: Target, prev_mask: torch.Tensor | None = None,
              blocksize: int = 128, percdamp: float = 0.01, dtype: torch.dtype = torch.float32
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned and updated weight in ``dtype``, keep-mask) for ``weight [out, in]`` and ``H [in, in]``."""
    rows, cols = weight.shape
    if target.is_nm and blocksize % target.m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={target.m}")
    u, dead = hessian_inverse_factor(hessian, percdamp)
    u = u.to(dtype)
    # Input-major [in, out] copies, so that "column j of W" is a contiguous row in the loops below.
    wt = weight.detach().to(dtype).T.contiguous()
    dead_values = wt[dead]
    wt[dead] = 0  # saliency 0: pruned first
    allowed = torch.ones_like(wt, dtype=torch.bool) if prev_mask is None else prev_mask.to(wt.device).T
    keep = torch.zeros_like(wt, dtype=torch.bool)
    counts = None if target.is_nm else _block_prune_counts(allowed, target.pruned_count(rows * cols), blocksize)
    with _one_cpu_thread(wt.device):
        _solve(wt, u, allowed, keep, target, counts, blocksize)
    # A dead column gets no update (its row and column of H^-1 are zero off the diagonal): the entries the
    # mask keeps take their values back, or zeros beyond the pattern would push the layer past its target.
    wt[dead] = torch.where(keep[dead], dead_values, 0.0)
    return apply_mask(wt.T, keep.T), keep.T.contiguous()


def _block_prune_counts(allowed: torch.Tensor, to_prune: int, blocksize: int) -> list[int]:
    """Unstructured: how many weights each column block of ``allowed [in, out]`` prunes. The layer's total
    is spread over the blocks by size; a block that already holds more zeros than its share (a pruned
    input) keeps them, and the other blocks rise to one common level to make up the difference, so the
    layer still ends at its total (each block at its share overshot it)."""
    cols = allowed.shape[0]
    starts = range(0, cols, blocksize)
    nominal = [to_prune * min(i + blocksize, cols) // cols - to_prune * i // cols for i in starts]
    present = [int((~allowed[i:i + blocksize]).sum()) for i in starts]
    if all(p <= n for p, n in zip(present, nominal)):
        return nominal
    sizes = [allowed[i:i + blocksize].numel() for i in starts]
    levels = fill_to_mean([p / s for p, s in zip(present, sizes)], to_prune / sum(sizes), sizes)
    counts, planned, done = [], 0.0, 0
    for level, size, already in zip(levels, sizes, present):
        planned += level * size
        counts.append(max(already, min(size, round(planned) - done)))  # cumulative rounding: exact total
        done += counts[-1]
    return counts


def _solve(wt: torch.Tensor, u: torch.Tensor, allowed: torch.Tensor, keep: torch.Tensor, target: Target,
           counts: list[int] | None, blocksize: int) -> None:
    """Algorithm 1 on the input-major weight ``wt [in, out]``, in place; fills ``keep [in, out]``.
    ``counts``: unstructured, how many weights each column block prunes."""
    cols = wt.shape[0]
    for block, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        w1, u1, ok1, keep1 = wt[i1:i2].clone(), u[i1:i2, i1:i2], allowed[i1:i2], keep[i1:i2]
        err = torch.zeros_like(w1)
        if not target.is_nm:
            k = counts[block]
            score = _saliency(w1, u1.diagonal(), ok1).reshape(1, -1)
            keep1.copy_(topk_mask(score, score.numel() - k).reshape(ok1.shape) & ok1)
        for i in range(i2 - i1):
            if target.is_nm and i % target.m == 0:
                g = slice(i, min(i + target.m, i2 - i1))
                width = g.stop - g.start
                n_keep = target.n if width == target.m else nm_tail_keep(target.n, target.m, width)
                keep1[g] = topk_mask(_saliency(w1[g], u1.diagonal()[g], ok1[g]).T, n_keep).T & ok1[g]
            q = torch.where(keep1[i], w1[i], 0.0)
            err[i] = (w1[i] - q) / u1[i, i]
            w1[i:].addr_(u1[i, i:], err[i], alpha=-1)  # spread the error over the block's later columns
            w1[i] = q
        wt[i1:i2] = w1
        wt[i2:] -= u[i1:i2, i2:].T @ err  # the lazy update of every later column, once per block


class SparseGPT(Pruner):
    name = "sparsegpt"
    needs = "hessian"

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01):
        self.blocksize = blocksize
        self.percdamp = percdamp

    def prune(self, weight: torch.Tensor, target: Target, stats: InputStats | None = None,
              prev_mask: torch.Tensor | None = None) -> Pruned:
        if stats is None:
            raise ValueError("SparseGPT needs the Hessian of the layer's inputs")
        new, mask = sparsegpt_solve(weight, stats.hessian().to(weight.device), target, prev_mask,
                              self.blocksize, self.percdamp)
        return Pruned(mask, new.to(weight.dtype))

    def options(self) -> dict:
        return {"blocksize": self.blocksize, "percdamp": self.percdamp}

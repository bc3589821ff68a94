"""Layer-wise sparsity allocation: per-block signals and a target in, per-block sparsity (or N) out.

Allocators do not know how their signals were measured (see :mod:`.calibration` for the collectors).

* **uniform**: every block at the target.
* **RMI** (LoSA §4-5, after ITPruner): linear CKA between the inputs of the decoder blocks; a block
  whose representation is shared with the others (high summed similarity) is redundant and gets more
  sparsity. The allocation LP ``min sum_l s_l I_l`` s.t. ``mean(s) = target``, ``|s_l - target| <= lam``
  with ``I_l = exp(-beta * m_l)`` has a bang-bang optimum, found exactly by a fractional-knapsack greedy
  (:func:`solve_allocation_lp`): every block starts at its lower bound and the most redundant blocks are
  filled to their upper bound until the mean reaches the target. Since ``exp`` is monotone, ``beta``
  only matters through the ranking and drops out. No SLSQP, no SciPy.
* **OWL** (Yin et al., 2024): blocks with more outliers in the Wanda score get less sparsity; the outlier
  ratios are mapped linearly onto a range of width ``2 lam`` around the target, mean preserved (OWL's
  code). Defaults: outlier threshold ``M = 5``, ``lam = 0.08`` (the paper's LLaMA settings).
* **mixed N:M**: the same LP on the grid of N, with ``lam`` one grid step (``1/M``) by default: the most
  redundant half drops to ``N - 1``, the rest rises to ``N + 1`` (middle block of an odd count: ``N``).
* **file**: explicit per-block or per-linear sparsities from JSON.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import LosaError

S_MAX = 0.99  # no block is pruned beyond this, whatever the LP says
OWL_M = 5.0
OWL_LAMBDA = 0.08


def uniform(num_blocks: int, target: float) -> list[float]:
    return [float(target)] * num_blocks


def fill_to_mean(current: Sequence[float], target: float, weights: Sequence[float] | None = None) -> list[float]:
    """The allocation with (``weights``-weighted) mean ``target`` that lowers no entry and raises the
    lowest ones together: water-filling. For nested masks that are already uneven (a model pruned before
    LoSA), where every entry raised to the target would overshoot it. A mean already at or above the
    target comes back unchanged."""
    current = [float(c) for c in current]
    weights = [1.0] * len(current) if weights is None else [float(w) for w in weights]
    total = target * sum(weights)
    if sum(w * c for w, c in zip(weights, current)) >= total:
        return current
    # (an entry of weight 0, e.g. an empty linear, changes no mean: it keeps its value)
    order = sorted((i for i in range(len(current)) if weights[i] > 0), key=current.__getitem__)
    raised_weight, rest = 0.0, sum(w * c for w, c in zip(weights, current))
    for k, i in enumerate(order):  # raise the k + 1 lowest entries to one level
        raised_weight += weights[i]
        rest -= weights[i] * current[i]
        level = (total - rest) / raised_weight
        if k + 1 == len(order) or level <= current[order[k + 1]]:
            break
    return [max(level, c) if w > 0 else c for c, w in zip(current, weights)]


def banded_lambda(target: float) -> float:
    """LoSA's stateless lambda for RMI: 0.01 / 0.02 / 0.03 for targets up to 0.5 / 0.6 / above."""
    return 0.01 if target <= 0.5 else 0.02 if target <= 0.6 else 0.03


def linear_cka(grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[L, L]`` linear CKA between the features behind each Gram matrix ``K_l = F_l F_l^T``.

    Each Gram matrix is centred (``H K H``) and normalised once; CKA is then one ``[L, n^2]`` product.
    """
    rows = []
    for gram in grams:
        k = gram.double()
        centred = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
        rows.append((centred / centred.norm().clamp_min(1e-300)).flatten())
    flat = torch.stack(rows)
    return flat @ flat.T


# CKA compares blocks through the centred n x n Gram matrices of n windows: with one window they are
# zero (CKA is 0/0), with two every CKA is exactly 1. Three is the least that carries any signal.
MIN_RMI_WINDOWS = 3


def check_rmi_windows(nsamples: int, rmi_samples: int) -> None:
    """RMI compares blocks over the calibration windows it is given: refuse too few before any work."""
    if min(nsamples, rmi_samples) < MIN_RMI_WINDOWS:
        raise LosaError(f"RMI allocation compares blocks over calibration windows: it needs --nsamples >= "
                        f"{MIN_RMI_WINDOWS}, got {nsamples}")


def rmi_redundancy(grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """``m_i = sum_{j != i} CKA_ij``, normalised to sum to 1: higher = more redundant."""
    cka = linear_cka(grams)
    m = cka.sum(1) - cka.diagonal()
    m = m / m.sum()
    if not bool(torch.isfinite(m).all()):
        raise LosaError("RMI redundancy is undefined: the blocks' features do not vary across the calibration "
                        f"windows (give more, and at least {MIN_RMI_WINDOWS}, distinct windows)")
    return m


def solve_allocation_lp(redundancy: Sequence[float], target: float, lam: float,
                        lower: Sequence[float] | None = None, s_max: float = S_MAX) -> list[float]:
    """Exact optimum of ``min sum s_l I_l`` (``I`` decreasing in redundancy) under the mean and box limits.

    Bounds per block: ``[max(target - lam, lower_l, 0), max(min(target + lam, s_max), that)]``;
    ``lower`` is the sparsity a block already has (nested masks cannot regrow). Ties in redundancy go to
    the lower block index.
    """
    num = len(redundancy)
    lower = [0.0] * num if lower is None else list(lower)
    lo = [max(target - lam, low, 0.0) for low in lower]
    hi = [max(min(target + lam, s_max), b) for b in lo]
    budget = num * target - sum(lo)
    if budget < -1e-9 or budget > sum(h - b for h, b in zip(hi, lo)) + 1e-9:
        raise LosaError(f"no allocation has mean sparsity {target:g} with every block within +-{lam:g} of it, "
                        f"above its current sparsity and at most {s_max:g}")
    alloc = list(lo)
    for i in sorted(range(num), key=lambda j: (-float(redundancy[j]), j)):
        add = min(hi[i] - lo[i], max(budget, 0.0))
        alloc[i] += add
        budget -= add
    return alloc


def rmi_allocation(grams: Sequence[torch.Tensor], target: float, lam: float | None = None,
                   lower: Sequence[float] | None = None) -> list[float]:
    """Per-block sparsity from the block-input Gram matrices (LoSA's RMI)."""
    lam = banded_lambda(target) if lam is None else lam
    return solve_allocation_lp(rmi_redundancy(grams).tolist(), target, lam, lower)


def owl_allocation(outlier_ratios: Sequence[float], target: float, lam: float = OWL_LAMBDA,
                   s_max: float = S_MAX) -> list[float]:
    """OWL: sparsity ``target - (r_l - mean r)``, with ``r`` the outlier ratios scaled onto ``[0, 2 lam]``.

    If that would leave ``[0, s_max]``, the deviations shrink (same factor for all) so the mean stays.
    """
    r = torch.tensor(outlier_ratios, dtype=torch.float64)
    spread = float(r.max() - r.min())
    if spread == 0.0:
        return uniform(len(r), target)
    dev = (r - r.min()) / spread * 2 * lam
    dev = dev - dev.mean()
    room = min(target / float(dev.max()), (s_max - target) / float(-dev.min()), 1.0)
    return (target - room * dev).tolist()


def nm_allocation(redundancy: Sequence[float], n: int, m: int, steps: int = 1) -> list[int]:
    """Mixed N:M: N per block in ``[n - steps, n + steps]`` (within ``1..m-1``), mean exactly ``n``.

    The integer form of :func:`solve_allocation_lp`: the most redundant blocks get the smallest N.
    """
    num = len(redundancy)
    lo, hi = max(1, n - steps), min(m - 1, n + steps)
    alloc = [hi] * num
    excess = (hi - n) * num  # N units to take away, most redundant blocks first
    for i in sorted(range(num), key=lambda j: (-float(redundancy[j]), j)):
        take = min(hi - lo, excess)
        alloc[i] -= take
        excess -= take
    return alloc


def read_allocation_file(path: str | os.PathLike, num_blocks: int, linears: Sequence[str],
                         blocks_path: str) -> dict[str, float]:
    """Per-linear sparsity from JSON: a list of one number per block, or an object whose keys are block
    indices (``"3"``) or fully qualified linear names (``"model.layers.3.mlp.up_proj"``); a linear's own
    entry wins over its block's. Every linear must be covered.
    """
    path = Path(path)
    if not path.is_file():
        raise LosaError(f"allocation file {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    try:
        spec = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, or an integer too long to parse
        raise LosaError(f"allocation file {path} is not valid JSON ({exc})") from None
    if isinstance(spec, list):
        if len(spec) != num_blocks:
            raise LosaError(f"allocation file {path} lists {len(spec)} values for {num_blocks} blocks")
        spec = {str(i): v for i, v in enumerate(spec)}
    if not isinstance(spec, dict):
        raise LosaError(f"allocation file {path} must hold a list or an object of sparsities")
    for key, value in spec.items():
        # an int too large for a float (10**400) overflows isfinite: only the range check is needed there
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            isinstance(value, int) or math.isfinite(value))
        if not ok or not 0.0 <= value < 1.0:
            raise LosaError(f"allocation file {path}: sparsity of '{key}' must be a number in [0, 1), got {repr(value)[:40]}")
        if key not in linears and not (key.isdigit() and str(int(key)) == key and int(key) < num_blocks):
            raise LosaError(f"allocation file {path}: '{key}' is neither a block index below {num_blocks} "
                            "nor a prunable linear of this model")
    out = {}
    for name in linears:
        block = name[len(blocks_path) + 1:].split(".", 1)[0]
        value = spec.get(name, spec.get(block))
        if value is None:
            raise LosaError(f"allocation file {path} gives no sparsity for {name} (nor for block {block})")
        out[name] = float(value)
    return out

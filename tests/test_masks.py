"""Masks and the mask-only pruners (magnitude, Wanda): exact counts, N:M groups with ragged tails, nesting."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from losa_deploy.errors import LosaError
from losa_deploy.sparsity import is_nm, nm_tail_keep
from losa_deploy.sparsity.masks import Target, apply_mask, nested_row_keeps, select_mask
from losa_deploy.sparsity.pruners import get_pruner
from losa_deploy.sparsity.stats import InputStats


def _weight(rows, cols, seed):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 1e-3


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 180), sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 2**31))
def test_unstructured_keeps_exact_count_per_row(rows, cols, sparsity, seed):
    w = _weight(rows, cols, seed)
    mask = select_mask(w.abs(), Target.unstructured(sparsity))
    pruned = int(cols * sparsity + 0.5)
    assert (mask.sum(1) == cols - pruned).all()
    # The kept entries are the largest of each row: every kept |w| >= every pruned |w| of that row.
    kept_min = w.abs().masked_fill(~mask, float("inf")).min(1).values
    pruned_max = w.abs().masked_fill(mask, float("-inf")).max(1).values
    assert (kept_min >= pruned_max).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (2, 8), (1, 4), (3, 8), (7, 16), (1, 2)])
def test_nm_every_group_and_the_tail(rng, n, m):
    cols = 172 if 172 % m else 171  # always a partial tail group
    w = torch.randn(23, cols, generator=rng)
    mask = select_mask(w.abs(), Target.nm(n, m))
    full = cols // m * m
    assert (mask[:, :full].reshape(23, -1, m).sum(-1) == n).all()
    assert (mask[:, full:].sum(1) == nm_tail_keep(n, m, cols - full)).all()
    # Within each group the kept entries are the group's largest.
    groups = w.abs()[:, :full].reshape(23, -1, m)
    gmask = mask[:, :full].reshape(23, -1, m)
    assert (groups.masked_fill(~gmask, float("inf")).min(-1).values
            >= groups.masked_fill(gmask, float("-inf")).max(-1).values).all()
    assert is_nm(apply_mask(w, mask), n, m)


def test_nesting_never_regrows(rng):
    w = torch.randn(19, 101, generator=rng)
    prev = torch.rand(19, 101, generator=rng) > 0.3
    for target in (Target.unstructured(0.5), Target.unstructured(0.1), Target.nm(2, 4), Target.nm(3, 8)):
        mask = select_mask(w.abs(), target, prev)
        assert not (mask & ~prev).any(), target
    # Where the previous mask leaves room, the count is exact again.
    loose = torch.ones(19, 101, dtype=torch.bool)
    loose[:, :5] = False
    assert (select_mask(w.abs(), Target.unstructured(0.6), loose).sum(1) == 101 - 61).all()


@given(rows=st.integers(1, 30), cols=st.integers(2, 150), sparsity=st.floats(0.05, 0.95),
       seed=st.integers(0, 2**31))
def test_nesting_in_uneven_rows_keeps_the_layer_count(rows, cols, sparsity, seed):
    """Rows already sparser than the target keep all they have; the others are cut to one level (one more
    for the first few) so the layer keeps exactly rows x the per-row count, never more per row than before."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    prev = torch.rand(rows, cols, generator=g) < torch.rand(rows, 1, generator=g)  # each row its own density
    target = Target.unstructured(sparsity)
    keep = cols - target.pruned_count(cols)
    mask = select_mask(w.abs(), target, prev)
    assert not (mask & ~prev).any()
    prev_kept, kept = prev.sum(1), mask.sum(1)
    assert int(kept.sum()) == min(rows * keep, int(prev_kept.sum()))
    assert (kept <= prev_kept).all()
    cut = kept < prev_kept
    if cut.any():  # the rows that lost entries share one level (+1), and the untouched rows lie at or below it
        level = int(kept[cut].min())
        assert int(kept[cut].max()) <= level + 1 and (prev_kept[~cut] <= level + 1).all()
    # Within each row the kept entries are the largest of those the previous mask kept.
    score = w.abs().masked_fill(~prev, float("-inf"))
    assert (score.masked_fill(~mask, float("inf")).min(1).values
            >= score.masked_fill(mask, float("-inf")).max(1).values).all()


def test_nested_row_keeps_by_hand():
    assert nested_row_keeps(torch.tensor([10, 2, 10, 6]), 20).tolist() == [6, 2, 6, 6]
    assert nested_row_keeps(torch.tensor([10, 2, 10, 6]), 21).tolist() == [7, 2, 6, 6]
    assert nested_row_keeps(torch.tensor([10, 2, 10, 6]), 40).tolist() == [10, 2, 10, 6]


def test_apply_mask_scrubs_negative_zero():
    w = torch.tensor([[-1.0, -0.0, 2.0, -3.0]])
    out = apply_mask(w, torch.tensor([[False, True, True, False]]))
    assert out.tolist() == [[0.0, 0.0, 2.0, 0.0]]
    assert not (out.signbit() & (out == 0)).any()


def test_wanda_scores_by_input_norms(rng):
    w = torch.randn(13, 37, generator=rng)
    x = torch.randn(3, 50, 37, generator=rng) * torch.linspace(0.01, 5.0, 37)
    stats = InputStats(37)
    for chunk in x.split(1):
        stats.add(chunk)
    norms = x.reshape(-1, 37).double().norm(dim=0)
    assert torch.allclose(stats.norms().double(), norms, rtol=1e-6)
    pruned = get_pruner("wanda").prune(w, Target.unstructured(0.5), stats)
    score = w.double().abs() * norms
    kth = score.sort(1).values[:, int(37 * 0.5 + 0.5)]  # the smallest kept score per row
    assert torch.equal(pruned.mask, score >= kth.unsqueeze(1))
    assert pruned.weight is None  # Wanda never changes kept values
    # Magnitude ignores the inputs.
    mag = get_pruner("magnitude").prune(w, Target.unstructured(0.5))
    assert not torch.equal(mag.mask, pruned.mask)


@pytest.mark.parametrize("bad", [(0, 4), (4, 4), (5, 4), (1, 1)])
def test_bad_nm(bad):
    with pytest.raises(LosaError, match="1 <= N < M"):
        Target.nm(*bad)


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5])
def test_bad_sparsity(s):
    with pytest.raises(LosaError, match=r"\[0, 1\)"):
        Target.unstructured(s)

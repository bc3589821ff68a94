"""SparseGPT's blocked Cholesky solver against a plain float64 OBS reference written here."""

import pytest
import torch

from losa_deploy.sparsity import is_nm, nm_tail_keep
from losa_deploy.sparsity.masks import Target
from losa_deploy.sparsity.pruners import get_pruner, sparsegpt_solve
from losa_deploy.sparsity.stats import InputStats


def obs_reference(w, h, target, blocksize, percdamp=0.01):
    """Column by column: fix column j with the OBS update from inv(H[j:, j:]) (no Cholesky, no lazy
    updates); masks chosen per block (unstructured) or per group (N:M) by saliency w^2 / inv(H[j:, j:])_00."""
    w, h = w.double().clone(), h.double().clone()
    rows, cols = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0
    h += percdamp * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    pivots = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(cols)])
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    total = target.pruned_count(rows * cols)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        if not target.is_nm:
            sal = (w[:, b0:b1] ** 2 / pivots[b0:b1]).flatten()
            k = total * b1 // cols - total * b0 // cols
            block_keep = torch.ones_like(sal, dtype=torch.bool)
            block_keep[sal.argsort()[:k]] = False
            keep[:, b0:b1] = block_keep.view(rows, b1 - b0)
        for j in range(b0, b1):
            if target.is_nm and j % target.m == 0:
                g1 = min(j + target.m, cols)
                n = target.n if g1 - j == target.m else nm_tail_keep(target.n, target.m, g1 - j)
                sal = w[:, j:g1] ** 2 / pivots[j:g1]
                keep[:, j:g1] = False
                keep[:, j:g1].scatter_(1, sal.topk(n, dim=1).indices, True)
            hinv = torch.linalg.inv(h[j:, j:])
            q = torch.where(keep[:, j], w[:, j], 0.0)
            w[:, j:] -= ((w[:, j] - q) / hinv[0, 0]).unsqueeze(1) * hinv[0].unsqueeze(0)
            w[:, j] = q
    return w, keep


def _layer(rng, rows=29, cols=75, tokens=300):
    w = torch.randn(rows, cols, generator=rng, dtype=torch.float64)
    x = torch.randn(tokens, cols, generator=rng, dtype=torch.float64) @ torch.randn(cols, cols, generator=rng,
                                                                                   dtype=torch.float64) * 0.3
    x[:, 7] = 0  # a dead input
    return w, x


@pytest.mark.parametrize("target,blocksize", [(Target.unstructured(0.5), 32), (Target.unstructured(0.7), 16),
                                              (Target.nm(2, 4), 16), (Target.nm(3, 8), 32)])
def test_sparsegpt_equals_float64_reference(rng, target, blocksize):
    w, x = _layer(rng)
    h = x.T @ x / x.shape[0]
    ref_w, ref_keep = obs_reference(w, h, target, blocksize)
    out, keep = sparsegpt_solve(w, h, target, blocksize=blocksize, dtype=torch.float64)
    assert torch.equal(keep, ref_keep)
    assert torch.allclose(out, ref_w, rtol=1e-9, atol=1e-9)
    assert torch.equal(out != 0, keep & (ref_w != 0))
    if target.is_nm:
        assert is_nm(out, target.n, target.m)
    else:
        assert abs(int((~keep).sum()) - target.sparsity * w.numel()) <= 0.5  # exact per layer
    # The float32 path (the default) lands on the same solution up to float32 rounding.
    out32, keep32 = sparsegpt_solve(w.float(), h, target, blocksize=blocksize)
    agree = (keep32 == ref_keep).double().mean()
    assert agree > 0.99
    err_ref = (x @ (ref_w - w).T).norm()
    assert abs(float((x @ (out32.double() - w).T).norm() / err_ref) - 1) < 1e-3


def test_obs_update_beats_masking_alone(rng):
    """The weight update is the point of SparseGPT: same mask, no update, larger output error."""
    w, x = _layer(rng, rows=41, cols=66)
    stats = InputStats(66, hessian=True)
    stats.add(x.float())
    pruned = get_pruner("sparsegpt", blocksize=16).prune(w.float(), Target.unstructured(0.6), stats)
    updated = (x @ (pruned.weight.double() - w).T).norm()
    masked = (x @ (w * pruned.mask - w).T).norm()
    assert updated < 0.9 * masked


def test_sparsegpt_nested_in_previous_mask(rng):
    w, x = _layer(rng, rows=17, cols=48)
    h = x.T @ x
    prev = torch.rand(17, 48, generator=rng) > 0.4
    for target in (Target.unstructured(0.5), Target.nm(2, 4)):
        out, keep = sparsegpt_solve(w, h, target, prev_mask=prev, blocksize=16)
        assert not (keep & ~prev).any() and not ((out != 0) & ~prev).any()


def test_zeros_gathered_in_one_column_block_do_not_push_the_layer_past_its_target(rng):
    """A pruned input whose zeros sit mostly in one column block (80% there, none elsewhere): that block
    keeps them, and the other blocks make up the difference, so the layer ends at exactly its target (each
    block pruning its own share had ended at 64.5% for 50%)."""
    rows, cols = 23, 70  # ragged: the last column block is partial
    w, x = _layer(rng, rows=rows, cols=cols)
    prev = torch.ones(rows, cols, dtype=torch.bool)
    prev[:, :16] = torch.rand(rows, 16, generator=rng) > 0.8
    target = Target.unstructured(0.5)
    out, keep = sparsegpt_solve(w, x.T @ x, target, prev_mask=prev, blocksize=16, dtype=torch.float64)
    assert not (keep & ~prev).any() and not ((out != 0) & ~prev).any()
    assert int((~keep).sum()) == target.pruned_count(rows * cols)
    assert int((~keep[:, :16]).sum()) == int((~prev[:, :16]).sum())  # the crowded block prunes nothing more


def test_a_hessian_the_dampening_cannot_fix_is_a_clear_error(rng):
    """Rank-1 H (one calibration token) with a negligible percdamp: Cholesky fails; say what to change."""
    from losa_deploy.errors import LosaError
    from losa_deploy.sparsity.pruners.sparsegpt import hessian_inverse_factor

    x = torch.randn(1, 24, generator=rng, dtype=torch.float64)
    with pytest.raises(LosaError, match="raise --percdamp or give more calibration tokens"):
        hessian_inverse_factor(x.T @ x, 1e-20)
    u, dead = hessian_inverse_factor(x.T @ x, 0.01)  # the default dampening makes it definite
    assert torch.isfinite(u).all() and not dead.any()


@pytest.mark.parametrize("target", [Target.nm(2, 4), Target.unstructured(0.5)])
def test_dead_inputs_do_not_push_the_layer_past_its_pattern(rng, target):
    """ReLU models (OPT) have many inputs that are always zero. SparseGPT zeroed every weight of a dead
    input, also those the mask keeps: an OPT fc2 pruned 2:4 came out 52.9-57.4% sparse, not N:M by
    inspect, and `finetune --structure 2:4` refused it as already past the target. Kept dead weights
    now keep their values; the output on the calibration inputs is the reference's."""
    w, x = _layer(rng, rows=24, cols=64)
    dead = torch.rand(64, generator=rng) < 0.7
    dead[:4] = True  # at least one group with every input dead
    dead[7] = True  # _layer's own dead input: its weights tie at score 0 too
    x[:, dead] = 0
    h = x.T @ x / x.shape[0]
    out, keep = sparsegpt_solve(w, h, target, blocksize=32, dtype=torch.float64)
    assert int((out == 0).sum()) == int((~keep).sum()) == target.pruned_count(w.numel())
    if target.is_nm:
        assert bool(((out != 0).reshape(24, 16, 4).sum(-1) == 2).all())
    assert torch.equal(out[:, dead][keep[:, dead]], w[:, dead][keep[:, dead]])
    ref_w, ref_keep = obs_reference(w, h, target, 32)
    assert torch.equal(keep[:, ~dead], ref_keep[:, ~dead])  # (which dead weights stay is a tie at score 0)
    assert torch.allclose(x @ out.T, x @ ref_w.T, rtol=1e-9, atol=1e-9)

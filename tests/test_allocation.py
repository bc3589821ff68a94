"""Allocators: RMI (linear CKA + the exact LP), OWL, mixed N:M levels, per-layer files."""

import itertools
import json

import pytest
import torch

from losa_deploy.errors import LosaError
from losa_deploy.sparsity import allocation as alloc


def _low_rank(rng, n, dim, *factors):
    z = torch.cat(factors, dim=1)
    return z @ torch.randn(z.shape[1], dim, generator=rng, dtype=torch.float64)


def _cka_reference(x, y):
    """Linear CKA in feature space: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred features."""
    x, y = x - x.mean(0), y - y.mean(0)
    return (y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())


def test_rmi_known_split(rng):
    """Blocks 1 and 3 see the same representation (rotated and scaled), block 2 half of it, blocks 0 and 4
    their own: 1 and 3 are the redundant pair (+lam), 2 sits at the target, 0 and 4 stay denser (-lam)."""
    n, dim = 48, 30
    shared, own = (torch.randn(n, 2, generator=rng, dtype=torch.float64) for _ in range(2))
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=rng, dtype=torch.float64)).Q
    block1 = _low_rank(rng, n, dim, shared)
    features = [
        _low_rank(rng, n, dim, torch.randn(n, 2, generator=rng, dtype=torch.float64)),
        block1,
        _low_rank(rng, n, dim, shared, own),
        2.5 * block1 @ rotation,
        _low_rank(rng, n, dim, torch.randn(n, 2, generator=rng, dtype=torch.float64)),
    ]
    grams = [f @ f.T for f in features]
    cka = alloc.linear_cka(grams)
    for i, j in itertools.product(range(5), repeat=2):
        assert float(cka[i, j]) == pytest.approx(float(_cka_reference(features[i], features[j])), rel=1e-9)
    assert float(cka[1, 3]) == pytest.approx(1.0)
    sparsity = alloc.rmi_allocation(grams, 0.7, lam=0.03)
    assert sparsity == pytest.approx([0.67, 0.73, 0.70, 0.73, 0.67])
    # Mixed N:M from the same signal: the redundant pair drops to N-1, the independent blocks rise to N+1.
    assert alloc.nm_allocation(alloc.rmi_redundancy(grams).tolist(), 2, 8) == [3, 1, 2, 1, 3]


def _lp_by_vertices(redundancy, target, lo, hi):
    """Brute force: every vertex of {lo <= s <= hi, sum s = L target} has all but one coordinate at a bound."""
    num, best = len(lo), None
    for free in range(num):
        for bounds in itertools.product((0, 1), repeat=num - 1):
            s = [None] * num
            others = [i for i in range(num) if i != free]
            for i, b in zip(others, bounds):
                s[i] = hi[i] if b else lo[i]
            s[free] = num * target - sum(s[i] for i in others)
            if lo[free] - 1e-12 <= s[free] <= hi[free] + 1e-12:
                cost = sum(-r * v for r, v in zip(redundancy, s))  # I decreasing in redundancy
                best = cost if best is None or cost < best else best
    return best


@pytest.mark.parametrize("num", [4, 5, 7])
def test_lp_closed_form_is_optimal(rng, num):
    for _ in range(20):
        red = torch.rand(num, generator=rng, dtype=torch.float64).tolist()
        target, lam = 0.5 + 0.3 * float(torch.rand((), generator=rng)), 0.05
        lower = (torch.rand(num, generator=rng, dtype=torch.float64) * (target + 0.01)).tolist()
        try:
            s = alloc.solve_allocation_lp(red, target, lam, lower)
        except LosaError:
            continue  # the lower bounds alone exceed the target mean
        lo = [max(target - lam, low) for low in lower]
        hi = [max(target + lam, b) for b in lo]
        assert sum(s) / num == pytest.approx(target, abs=1e-12)
        assert all(a - 1e-12 <= v <= b + 1e-12 for a, v, b in zip(lo, s, hi))
        assert sum(-r * v for r, v in zip(red, s)) == pytest.approx(_lp_by_vertices(red, target, lo, hi), abs=1e-12)


def test_lp_infeasible_lower_bounds():
    with pytest.raises(LosaError, match="no allocation"):
        alloc.solve_allocation_lp([0.1, 0.2], 0.5, 0.01, lower=[0.6, 0.6])


@pytest.mark.parametrize("weighted", [False, True])
def test_fill_to_mean_raises_the_lowest_together(rng, weighted):
    """Nested masks that start uneven: no entry drops, the weighted mean is the target, and the raised
    entries share one level that every untouched entry is at or above (against a bisection)."""
    for _ in range(50):
        num = int(torch.randint(1, 9, (1,), generator=rng))
        current = (torch.rand(num, generator=rng, dtype=torch.float64) * 0.8).tolist()
        weights = (torch.rand(num, generator=rng, dtype=torch.float64) + 0.1).tolist() if weighted else [1.0] * num
        target = float(torch.rand((), generator=rng)) * 0.9
        out = alloc.fill_to_mean(current, target, weights if weighted else None)
        mean = sum(w * c for w, c in zip(weights, current)) / sum(weights)
        if mean >= target:
            assert out == current
            continue
        assert all(o >= c for o, c in zip(out, current))
        assert sum(w * o for w, o in zip(weights, out)) / sum(weights) == pytest.approx(target, abs=1e-12)
        low, high = 0.0, 1.0  # the level by bisection on the weighted mean of max(level, current)
        for _ in range(100):
            mid = (low + high) / 2
            low, high = (mid, high) if sum(w * max(mid, c) for w, c in zip(weights, current)) < target * sum(
                weights) else (low, mid)
        assert out == pytest.approx([max(low, c) for c in current], abs=1e-9)


def test_fill_to_mean_leaves_an_empty_entry_alone():
    """An entry of weight 0 (an empty linear) changes no mean; it used to divide by zero."""
    assert alloc.fill_to_mean([0.0, 0.2], 0.5, [0, 10]) == pytest.approx([0.0, 0.5])
    assert alloc.fill_to_mean([0.9, 0.1, 0.3], 0.5, [0, 1, 1]) == pytest.approx([0.9, 0.5, 0.5])


def test_owl_follows_its_formula(rng):
    ratios = (torch.rand(9, generator=rng, dtype=torch.float64) * 0.02).tolist()
    s = alloc.owl_allocation(ratios, 0.7, lam=0.08)
    lo, hi = min(ratios), max(ratios)
    density = [(r - lo) / (hi - lo) * 0.16 for r in ratios]
    mean = sum(density) / 9
    assert s == pytest.approx([1 - (d - mean + 0.3) for d in density], abs=1e-12)
    assert sum(s) / 9 == pytest.approx(0.7, abs=1e-12) and max(s) - min(s) == pytest.approx(0.16)
    order = sorted(range(9), key=lambda i: ratios[i])
    assert all(s[a] >= s[b] for a, b in zip(order, order[1:]))  # more outliers, less sparsity
    # Near the edge the spread shrinks instead of leaving [0, 0.99); the mean stays.
    edge = alloc.owl_allocation(ratios, 0.96, lam=0.08)
    assert max(edge) <= 0.99 + 1e-12 and sum(edge) / 9 == pytest.approx(0.96)
    assert alloc.owl_allocation([0.01] * 4, 0.5) == [0.5] * 4


def test_nm_allocation_levels():
    assert alloc.nm_allocation([0.3, 0.1, 0.4, 0.2], 2, 4) == [1, 3, 1, 3]
    assert alloc.nm_allocation([0.3, 0.1, 0.4, 0.2, 0.0], 4, 8, steps=2) == [2, 6, 2, 4, 6]  # bang-bang
    assert alloc.nm_allocation([0.3, 0.1, 0.4], 1, 4) == [1, 1, 1]  # N cannot drop below 1
    assert sum(alloc.nm_allocation([0.5, 0.1, 0.9, 0.2, 0.3, 0.7], 3, 8)) == 18


def test_allocation_file(tmp_path):
    names = [f"model.layers.{b}.{n}" for b in range(3) for n in ("q", "down")]
    (tmp_path / "list.json").write_text(json.dumps([0.5, 0.6, 0.7]))
    got = alloc.read_allocation_file(tmp_path / "list.json", 3, names, "model.layers")
    assert got["model.layers.1.down"] == 0.6 and got["model.layers.2.q"] == 0.7
    (tmp_path / "mixed.json").write_text(json.dumps({"0": 0.5, "1": 0.5, "2": 0.4, "model.layers.2.down": 0.9}))
    got = alloc.read_allocation_file(tmp_path / "mixed.json", 3, names, "model.layers")
    assert got["model.layers.2.down"] == 0.9 and got["model.layers.2.q"] == 0.4
    for content, match in [([0.5, 0.5], "2 values for 3 blocks"), ({"0": 1.0, "1": 0, "2": 0}, r"\[0, 1\)"),
                           ({"0": 0.5, "1": 0.5}, "no sparsity for model.layers.2.q"),
                           ({"7": 0.5}, "neither a block index"), ("0.5", "list or an object")]:
        (tmp_path / "bad.json").write_text(json.dumps(content))
        with pytest.raises(LosaError, match=match):
            alloc.read_allocation_file(tmp_path / "bad.json", 3, names, "model.layers")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(LosaError, match="not valid JSON"):
        alloc.read_allocation_file(tmp_path / "broken.json", 3, names, "model.layers")

"""Pattern detection, the sparsity sidecar, and `inspect` verifying it."""

import json

import pytest
import torch

from losa_deploy.errors import LosaError
from losa_deploy.models import get_architecture, load_model, load_tokenizer, save_model
from losa_deploy.sparsity import (
    build_sidecar,
    detect_pattern,
    is_nm,
    nm_tail_keep,
    verify_sidecar,
    write_sidecar,
)


def nm_prune(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest |w| of every m consecutive inputs (tail group: nm_tail_keep), in float64."""
    out = torch.zeros_like(weight)
    for start in range(0, weight.shape[1], m):
        block = weight[:, start: start + m]
        keep = n if block.shape[1] == m else nm_tail_keep(n, m, block.shape[1])
        idx = block.abs().topk(keep, dim=1).indices
        out[:, start: start + m].scatter_(1, idx, block.gather(1, idx))
    return out


def random_weight(rng, rows=None, cols=None):
    rows = rows or int(torch.randint(3, 70, (), generator=rng))
    cols = cols or int(torch.randint(9, 200, (), generator=rng))
    return torch.randn(rows, cols, generator=rng) + 0.01  # no accidental zeros


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (2, 8), (1, 4), (3, 8), (5, 16)])
def test_nm_detected_with_ragged_tail(rng, n, m):
    w = nm_prune(random_weight(rng, cols=172), n, m)
    p = detect_pattern(w)
    assert (p.kind, p.n, p.m) == ("nm", n, m) or (p.n / p.m == n / m and p.m < m)
    assert is_nm(w, n, m)


def test_dense_unstructured_mixed(rng):
    # At least 8 rows of 64 columns: a tiny random mask can look N:M by chance (3 rows of 16 columns whose
    # two 8-groups each keep as many: about 1 in 100), which is not what this test is about.
    w = random_weight(rng, int(torch.randint(8, 70, (), generator=rng)), int(torch.randint(64, 200, (), generator=rng)))
    assert detect_pattern(w).kind == "dense"
    for s in (0.5, 0.7, 0.9):
        u = w * (torch.rand(w.shape, generator=rng) > s)
        assert detect_pattern(u).kind == "unstructured", s
        assert abs(detect_pattern(u).sparsity - s) < 0.15
    big = random_weight(rng, 64, 256)
    mixed = torch.cat([nm_prune(big[:32], 2, 8), nm_prune(big[32:], 4, 8)])
    p = detect_pattern(mixed)
    assert (p.kind, p.n, p.m) == ("mixed_nm", 4, 8)
    assert not is_nm(mixed, 2, 8) and is_nm(mixed, 4, 8)


def test_empty_rows_fit_any_nm_pattern(rng):
    # A 2:4 weight with whole rows pruned (a dead neuron) is still 2:4, not unstructured nor mixed.
    w = nm_prune(random_weight(rng, 16, 64), 2, 4)
    w[[3, 11]] = 0
    p = detect_pattern(w)
    assert (p.kind, p.n, p.m) == ("nm", 2, 4)
    mixed = torch.cat([w[:8], nm_prune(random_weight(rng, 8, 64), 1, 4)])
    assert (detect_pattern(mixed).kind, detect_pattern(mixed).n) == ("mixed_nm", 2)
    # Empty rows alone are no evidence: a random mask with some pruned rows stays unstructured.
    u = random_weight(rng, 16, 64) * (torch.rand(16, 64, generator=rng) > 0.5)
    u[:4] = 0
    assert detect_pattern(u).kind == "unstructured"


def test_one_group_per_row_is_no_evidence_of_nm(rng):
    # 8 x 12 at 50% (seed 3828779092 in CI): with one full 8-group per row, every row "fills" its group,
    # so any mask passed for mixed N:M. Now M needs two full groups per row.
    w = random_weight(rng, 8, 12)
    u = w * (torch.rand(w.shape, generator=rng) > 0.5)
    assert detect_pattern(u).kind == "unstructured"
    assert detect_pattern(nm_prune(random_weight(rng, 8, 12), 2, 4)).kind == "nm"  # M = 4 has 3 groups


def test_tail_rule():
    assert [nm_tail_keep(2, 4, t) for t in (1, 2, 3)] == [1, 1, 2]
    assert [nm_tail_keep(2, 8, t) for t in (1, 4, 7)] == [1, 1, 2]


@pytest.fixture
def pruned_stories(stories_dir, tmp_path):
    """stories260K with its block linears pruned 2:4 by magnitude, saved with a sidecar."""
    model = load_model(stories_dir)
    weights = {}
    with torch.no_grad():
        for name, lin in get_architecture(model).linears(model).items():
            lin.weight.copy_(nm_prune(lin.weight, 2, 4))
            weights[name] = lin.weight
    sidecar = build_sidecar(weights.items(), method={"pruner": "magnitude"})
    out = save_model(model, tmp_path / "pruned", tokenizer=load_tokenizer(stories_dir))
    write_sidecar(out, sidecar)
    return out, weights


def test_sidecar_describes_and_verifies(pruned_stories):
    out, weights = pruned_stories
    sidecar = json.loads((out / "losa_sparsity.json").read_text())
    assert sidecar["pattern"] == "nm" and abs(sidecar["global_sparsity"] - 0.5) < 1e-6
    assert all(e["nm"] == {"n": 2, "m": 4} for e in sidecar["modules"].values())
    verify_sidecar(sidecar, weights)
    tampered = {k: v.clone() for k, v in weights.items()}
    name = sorted(tampered)[3]
    flat = tampered[name].view(-1)
    flat[(flat == 0).nonzero()[0]] = 1.0  # one pruned weight comes back
    with pytest.raises(LosaError, match=name.replace(".", r"\.")):
        verify_sidecar(sidecar, tampered)


def test_inspect_reports_and_verifies(cli, pruned_stories, tmp_path):
    out, _ = pruned_stories
    code, stdout, _ = cli("inspect", out, "--json", tmp_path / "i.json", "--plot", tmp_path / "s.png")
    assert code == 0, stdout
    report = json.loads((tmp_path / "i.json").read_text())
    assert len(report["layers"]) == 5 * 7 and report["pattern"] == "nm"
    assert all(r["pattern"] == "2:4" for r in report["layers"])
    assert report["sidecar"]["verified_modules"] == 35
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    # Now make the sidecar lie about one layer: inspect must refuse.
    side = json.loads((out / "losa_sparsity.json").read_text())
    first = next(iter(side["modules"]))
    side["modules"][first]["mask_sha256"] = "0" * 64
    (out / "losa_sparsity.json").write_text(json.dumps(side))
    code, _, err = cli("inspect", out)
    assert code == 2 and "sidecar disagrees" in err and first in err


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_group_counts_from_packed_bits_equal_column_sums(rng, density):
    """The popcount path (groups of 4, 8, 16 read as nibbles, bytes and byte pairs of the packed mask)
    counts what a plain sum over each group's columns counts, on ragged widths; and _nm_fit decides the
    same with or without the packed bytes."""
    from losa_deploy.sparsity import patterns

    for _ in range(6):
        rows, cols = (int(v) for v in torch.randint(1, 80, (2,), generator=rng) * torch.tensor([1, 3]))
        keep = torch.rand(rows, cols, generator=rng) < density
        for m in (4, 8, 16):
            full = cols // m
            expected = keep[:, : full * m].reshape(rows, full, m).sum(-1)
            assert torch.equal(patterns.nm_group_counts(keep, m), expected), (rows, cols, m)
            if cols >= 2 * m:
                nm_keep = keep.clone()
                nm_keep[:, : full * m] &= torch.arange(m).repeat(full) < m // 2  # an N:M mask to fit too
                for k in (keep, nm_keep):
                    assert patterns._nm_fit(k, m) == patterns._nm_fit(k, m, patterns._mask_bytes(k))

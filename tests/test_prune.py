"""`losa-deploy prune` end to end on stories260K: exact sparsity, N:M, mixed N:M, allocation, the written
checkpoint and its sidecar; bad input fails in one line and writes nothing."""

import json

import pytest
import torch

import losa_deploy as ld
from losa_deploy.models import get_architecture, load_model
from losa_deploy.sparsity import is_nm, nm_tail_keep, read_sidecar

FAST = ["--nsamples", "8", "--seqlen", "64", "--no-progress"]  # small calibration keeps the tests quick


@pytest.fixture
def prune(cli, stories_dir, tinystories, tmp_path):
    """Run the CLI on stories260K with a train-slice calibration; returns (output dir, JSON report)."""

    def run(*args, name="out"):
        out, report = tmp_path / name, tmp_path / f"{name}.json"
        code, stdout, err = cli("prune", stories_dir, "-o", out, "--calib", tinystories, "--slice", "0:0.8",
                                *FAST, "--json", report, *args)
        assert code == 0, err
        return out, json.loads(report.read_text())

    return run


def _weights(path):
    model = load_model(path)
    return {name: lin.weight.detach() for name, lin in get_architecture(model).linears(model).items()}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_per_layer_sparsity_and_reload(prune, stories_dir, method, tmp_path):
    out, report = prune("--method", method, "--sparsity", "0.6", "--plot", tmp_path / "s.png")
    weights = _weights(out)
    assert len(weights) == 35
    for name, w in weights.items():
        pruned = int((w == 0).sum())
        if method == "sparsegpt":  # SparseGPT's comparison group is a column block: exact per layer
            assert abs(pruned - 0.6 * w.numel()) <= 0.5, name
        else:  # magnitude and Wanda compare within each row: exact per row
            assert ((w == 0).sum(1) == int(0.6 * w.shape[1] + 0.5)).all(), name
        assert not (w.signbit() & (w == 0)).any(), "negative zero written"
    assert report["achieved_sparsity"] == pytest.approx(0.6, abs=1 / (2 * 64))
    assert report["method"] == method and len(report["blocks"]) == 5
    # The checkpoint reloads with the zero pattern the report and the sidecar describe.
    sidecar = read_sidecar(out)
    assert sidecar["method"]["pruner"] == method and sidecar["checks"]["negative_zeros"] == 0
    for row in report["layers"]:
        assert row["sparsity"] == pytest.approx(sidecar["modules"][row["name"]]["sparsity"], abs=1e-6)
    reloaded = _weights(out)
    assert all(torch.equal(reloaded[k] == 0, weights[k] == 0) for k in weights)
    assert ld.inspect(out)["sidecar"]["verified_modules"] == 35
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    # Everything outside the prunable linears is untouched.
    dense = load_model(stories_dir).state_dict()
    pruned_state = load_model(out).state_dict()
    untouched = [k for k in dense if not any(k.startswith(n) for n in weights)]
    assert untouched and all(torch.equal(dense[k], pruned_state[k]) for k in untouched)
    if method == "wanda":  # Wanda keeps the surviving weights bit for bit
        assert all(torch.equal(w[w != 0], dense[k + ".weight"][w != 0]) for k, w in weights.items())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_pruned_input_keeps_its_zeros(cli, tinystories, stories_dir, tmp_path, method):
    """Re-pruning a model pruned with one threshold per layer (rows unevenly sparse): every input zero
    stays zero (SparseGPT's update revived some) and the layers end at the target, not past it."""
    from losa_deploy.models import load_tokenizer, save_model

    model = load_model(stories_dir)
    for lin in get_architecture(model).linears(model).values():
        w = lin.weight.data
        w[w.abs() <= w.abs().flatten().kthvalue(int(0.3 * w.numel())).values] = 0
    source = save_model(model, tmp_path / "in", tokenizer=load_tokenizer(stories_dir))
    before = _weights(source)
    code, _, err = cli("prune", source, "-o", tmp_path / "out", "--calib", tinystories, "--method", method,
                       "--sparsity", "0.5", *FAST)
    assert code == 0, err
    for name, w in _weights(tmp_path / "out").items():
        assert not bool((w[before[name] == 0] != 0).any()), f"{name}: a pruned weight came back"
        assert abs(float((w == 0).float().mean()) - 0.5) <= 1.0 / w.shape[1], name


@pytest.mark.parametrize("method,structure,n,m", [("wanda", "2:4", 2, 4), ("sparsegpt", "4:8", 4, 8),
                                                  ("magnitude", "2:8", 2, 8)])
def test_nm_every_group_including_the_tail(prune, method, structure, n, m):
    out, report = prune("--method", method, "--structure", structure)
    for name, w in _weights(out).items():
        keep = w != 0
        full = w.shape[1] // m * m
        assert (keep[:, :full].reshape(w.shape[0], -1, m).sum(-1) == n).all(), name
        if full < w.shape[1]:  # mlp.down_proj: 172 inputs, a tail of 4 when M = 8
            assert (keep[:, full:].sum(1) == nm_tail_keep(n, m, w.shape[1] - full)).all(), name
    assert ld.inspect(out)["pattern"] == "nm"
    assert report["target_sparsity"] == pytest.approx(1 - n / m)


@pytest.mark.parametrize("allocation", ["rmi", "owl"])
def test_mixed_nm_uses_the_allocated_n(prune, allocation):
    out, report = prune("--method", "wanda", "--structure", "mixed-2:8", "--allocation", allocation)
    ns = report["allocation"]["n_per_block"]
    assert sorted(ns) == [1, 1, 2, 3, 3]  # bang-bang around N = 2, mean exactly 2
    kept, numel = 0, 0
    for name, w in _weights(out).items():
        n = ns[int(name.split(".")[2])]
        assert is_nm(w, n, 8) and int((w != 0)[:, :8].sum(1).max()) == n, name
        rows, cols = w.shape
        kept += rows * (cols // 8 * n + (nm_tail_keep(n, 8, cols % 8) if cols % 8 else 0))
        numel += w.numel()
    assert ld.inspect(out)["pattern"] == "mixed_nm"
    # 75% up to the tail groups of the 172-wide down_proj (ceil(N t / M) of t = 4 kept)
    assert report["achieved_sparsity"] == pytest.approx(1 - kept / numel, abs=1e-12)
    assert report["achieved_sparsity"] == pytest.approx(0.75, abs=1 / (2 * 172))


def test_mixed_nm_with_lambda_zero_is_uniform(prune):
    """--lam 0 allows no grid step: every block keeps N (it used to move by one step); a small positive lam
    still allows one (round(0.05 * 8) = 0 would silently be uniform)."""
    _, report = prune("--method", "magnitude", "--structure", "mixed-2:8", "--allocation", "rmi", "--lam", "0")
    assert report["allocation"]["n_per_block"] == [2] * 5 and report["allocation"]["lam"] == 0
    _, report = prune("--method", "magnitude", "--structure", "mixed-2:8", "--allocation", "rmi", "--lam", "0.05",
                      name="small")
    assert sorted(report["allocation"]["n_per_block"]) == [1, 1, 2, 3, 3]


def test_rmi_and_owl_allocations(prune):
    _, rmi = prune("--method", "wanda", "--sparsity", "0.7", "--allocation", "rmi", name="rmi")
    per_block = rmi["allocation"]["sparsity_per_block"]
    assert sorted(per_block) == pytest.approx([0.67, 0.67, 0.70, 0.73, 0.73])  # lambda 0.03 at 70%
    red = rmi["allocation"]["redundancy"]
    assert per_block[max(range(5), key=red.__getitem__)] == pytest.approx(0.73)
    assert rmi["achieved_sparsity"] == pytest.approx(0.7, abs=1 / (2 * 64))
    assert [b["sparsity"] for b in rmi["blocks"]] == pytest.approx(per_block, abs=1 / 64)
    _, owl = prune("--method", "sparsegpt", "--sparsity", "0.7", "--allocation", "owl", name="owl")
    s = owl["allocation"]["sparsity_per_block"]
    assert sum(s) / 5 == pytest.approx(0.7) and max(s) - min(s) == pytest.approx(0.16)
    assert owl["achieved_sparsity"] == pytest.approx(0.7, abs=1 / (2 * 64))


def test_allocation_file_per_linear(prune, tmp_path):
    spec = {"0": 0.3, "1": 0.4, "2": 0.5, "3": 0.6, "4": 0.7, "model.layers.4.mlp.down_proj": 0.9}
    (tmp_path / "alloc.json").write_text(json.dumps(spec))
    out, report = prune("--method", "magnitude", "--allocation", tmp_path / "alloc.json")
    w = _weights(out)
    assert float((w["model.layers.4.mlp.down_proj"] == 0).double().mean()) == pytest.approx(0.9, abs=1 / 344)
    assert float((w["model.layers.1.self_attn.q_proj"] == 0).double().mean()) == pytest.approx(0.4, abs=1 / 128)
    assert report["calibration"] is None  # magnitude with a fixed allocation needs no data


def test_python_api_self_calibration(stories_dir, tmp_path):
    report = ld.prune(stories_dir, tmp_path / "o", sparsity=0.5, method="wanda", calib="self", nsamples=4,
                      seqlen=32, progress=False)
    assert report["calibration"]["source"] == "self"
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=1 / 128)
    assert read_sidecar(tmp_path / "o")["method"]["calibration"]["nsamples"] == 4


def _fails_cleanly(cli, tmp_path, args, match):
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = cli("prune", *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"


@pytest.mark.parametrize("args,match", [
    (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    (["--sparsity", "-0.2"], "sparsity must be in [0, 1)"),
    (["--structure", "4:4"], "1 <= N < M"),
    (["--structure", "mixed-5:4"], "1 <= N < M"),
    (["--structure", "2x4"], "unknown structure"),
    (["--method", "obs", "--sparsity", "0.5"], "unknown pruning method 'obs'"),
    (["--allocation", "nope.json", "--sparsity", "0.5"], "allocation file nope.json does not exist"),
    (["--structure", "2:4", "--allocation", "rmi"], "mixed-2:4"),
    (["--structure", "2:4", "--sparsity", "0.6"], "contradicts 2:4"),
    (["--method", "wanda"], "pass --sparsity"),
    (["--sparsity", "0.5", "--seqlen", "4096"], "between 2 and the model's context (512"),
    (["--sparsity", "0.5", "--calib", "self", "--slice", "0:0.5"], "does not apply to --calib self"),
])
def test_bad_input(cli, stories_dir, tinystories, tmp_path, args, match):
    _fails_cleanly(cli, tmp_path, [stories_dir, "-o", tmp_path / "out", "--calib", tinystories,
                                   "--json", tmp_path / "r.json", *args], match)


def test_calibration_shorter_than_a_window(cli, stories_dir, tmp_path):
    (tmp_path / "short.txt").write_text("Once upon a time there was a cat.")
    _fails_cleanly(cli, tmp_path, [stories_dir, "-o", tmp_path / "out", "--sparsity", "0.5", "--calib",
                                   tmp_path / "short.txt", "--seqlen", "128"], "shorter than one window of 128")


def test_existing_output_is_kept(cli, stories_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    _fails_cleanly(cli, tmp_path, [stories_dir, "-o", tmp_path / "out", "--sparsity", "0.5", "--method",
                                   "magnitude"], "already exists")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"

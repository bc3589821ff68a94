"""End-to-end fine-tuning (LoSA and the baselines) on stories260K, resume, data parallel and bad input.

Runs are tiny (a few thousand tokens, short windows) so the whole file stays around a minute on two cores;
what they check is structure and exactness, not quality (benchmarks/losa_quality.py measures that).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from losa_deploy.finetuning.schedule import sparsity_schedule

TINY = ["--budget-tokens", "6144", "--max-len", "64", "--nsamples", "8", "--lr", "5e-3", "--batch-size", "4",
        "--grad-accum", "2", "--no-progress"]


def finetune_args(stories_dir, tinystories, out, *extra):
    return ["finetune", stories_dir, "-o", out, "--data", tinystories, "--data-slice", "0:0.5", *TINY, *extra]


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / "model.safetensors")


def linears(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if ".layers." in k and k.endswith("proj.weight")}


@pytest.fixture(scope="module")
def losa_run(stories_dir, tinystories, tmp_path_factory):
    from losa_deploy.cli import main

    out = tmp_path_factory.mktemp("losa") / "out"
    args = finetune_args(stories_dir, tinystories, out, "--method", "losa", "--sparsity", "0.6", "--save-base",
                         "--eval-data", tinystories, "--eval-slice", "0.9:1", "--json", out.parent / "r.json")
    assert main([str(a) for a in args]) == 0
    return out, json.loads((out.parent / "r.json").read_text())


def assert_base_sidecar(base):
    """OUT/base carries a sidecar of its own zeros, like every pruned model we write (it was missing)."""
    import losa_deploy as ld

    report = ld.inspect(base)  # raises where the sidecar disagrees with the weights
    assert report["sidecar"]["verified_modules"] == len(report["layers"]) == len(linears(weights(base)))
    sidecar = json.loads((base / "losa_sparsity.json").read_text())
    assert sidecar["global_sparsity"] == pytest.approx(report["global_sparsity"], abs=1e-6)
    assert sidecar["checks"]["negative_zeros"] == 0 and "merged_zero_pattern_equals_mask" not in sidecar["checks"]
    assert sidecar["method"]["merge"].startswith("none")
    for name, w in linears(weights(base)).items():
        assert sidecar["modules"][name.removesuffix(".weight")]["nnz"] == int((w != 0).sum()), name


def test_losa_follows_the_schedule_and_merges_exactly(losa_run):
    out, report = losa_run
    phases = report["phases"]
    assert len(phases) == 5
    schedule = sparsity_schedule(0.6, 5)
    for record, s_t in zip(phases, schedule):
        assert record["schedule_sparsity"] == pytest.approx(s_t)
        blocks = record["block_sparsity"]
        assert sum(blocks) / len(blocks) == pytest.approx(s_t, abs=0.01)  # RMI keeps the mean on target
        assert record["average_rank"] > 0 and len(record["losses"]) > 0 and record["eval_ppl"] > 1
    assert [r["sparsity"] for r in phases] == sorted(r["sparsity"] for r in phases)
    assert report["achieved_sparsity"] == pytest.approx(0.6, abs=2e-3)
    merged, base = linears(weights(out)), linears(weights(out / "base"))
    changed = 0
    for name, w in merged.items():
        keep = base[name] != 0
        assert torch.equal(w != 0, keep), name  # the merged zero pattern is the final mask
        changed += int((w != base[name]).sum())
    assert changed > 0  # the adapter did move the weights
    sidecar = json.loads((out / "losa_sparsity.json").read_text())
    assert sidecar["checks"]["merged_zero_pattern_equals_mask"] is True
    assert (out / "finetune.png").stat().st_size > 0 and (out / "adapter" / "adapter_config.json").is_file()
    assert not Path(f"{out}.ckpt").exists()
    assert_base_sidecar(out / "base")
    written = json.loads((out / "finetune.json").read_text())
    assert written["final_eval_ppl"] == report["final_eval_ppl"] == phases[-1]["eval_ppl"]


def test_merge_command_rebuilds_the_output_bit_for_bit(losa_run, cli, tmp_path):
    out, _ = losa_run
    code, _, err = cli("merge", out / "base", "--adapter", out / "adapter", "-o", tmp_path / "m")
    assert code == 0, err
    a, b = weights(out), weights(tmp_path / "m")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_refuses_the_merged_model(losa_run, cli, tmp_path):
    out, _ = losa_run
    code, _, err = cli("merge", out, "--adapter", out / "adapter", "-o", tmp_path / "m")
    assert code == 2 and "different base" in err and not (tmp_path / "m").exists()


def test_baselines_on_the_same_budget(stories_dir, tinystories, tmp_path, cli):
    pruned = {}
    for method in ("sparse-lora", "lora"):
        out = tmp_path / method
        code, _, err = cli(*finetune_args(stories_dir, tinystories, out, "--method", method, "--sparsity", "0.5",
                                          "--json", tmp_path / f"{method}.json"))
        assert code == 0, err
        report = json.loads((tmp_path / f"{method}.json").read_text())
        assert len(report["phases"]) == 1 and report["phases"][0]["tokens"] >= 6144
        pruned[method] = linears(weights(out))
        assert report["achieved_sparsity"] == pytest.approx(0.5, abs=2e-3)
    # The masked adapter's pruned base was not saved (no --save-base): the adapter names no base, not the
    # dense input, which PEFT would follow to the wrong weights; plain LoRA's base is OUT itself.
    bases = {m: json.loads((tmp_path / m / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
             for m in pruned}
    assert bases == {"sparse-lora": None, "lora": str((tmp_path / "lora").resolve())}
    # Same one-shot mask; sparse-LoRA merged into it, plain LoRA left the pruned base untouched.
    for name, w in pruned["lora"].items():
        assert torch.equal(w != 0, pruned["sparse-lora"][name] != 0), name
    assert any(not torch.equal(pruned["lora"][n], w) for n, w in pruned["sparse-lora"].items())
    side = json.loads((tmp_path / "lora" / "adapter" / "losa_adapter.json").read_text())
    assert side["masked"] is False
    code, _, err = cli("merge", tmp_path / "lora", "--adapter", tmp_path / "lora" / "adapter", "-o", tmp_path / "d")
    assert code == 2 and "dense" in err and not (tmp_path / "d").exists()
    code, _, err = cli("merge", tmp_path / "lora", "--adapter", tmp_path / "lora" / "adapter", "-o", tmp_path / "d",
                       "--allow-dense")
    assert code == 0, err
    dense = linears(weights(tmp_path / "d"))
    assert sum(int((w == 0).sum()) for w in dense.values()) < 0.01 * sum(w.numel() for w in dense.values())


def _cli_env(threads: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def _cli_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "losa_deploy", *[str(a) for a in args]]


def test_resume_after_sigkill_gives_the_same_weights(stories_dir, tinystories, tmp_path):
    common = ["--method", "losa", "--sparsity", "0.5", "--steps", "3"]
    full = tmp_path / "full"
    subprocess.run(_cli_cmd(*finetune_args(stories_dir, tinystories, full, *common)), env=_cli_env(), check=True,
                   capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli_cmd(*finetune_args(stories_dir, tinystories, out, *common)), env=_cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = Path(f"{out}.ckpt") / "state.json"
    deadline = time.monotonic() + 300
    while not (state.is_file() and json.loads(state.read_text())["phase"] >= 1) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed"
    again = subprocess.run(_cli_cmd(*finetune_args(stories_dir, tinystories, out, *common)), env=_cli_env(),
                           capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # no silent restart over a checkpoint
    subprocess.run(_cli_cmd(*finetune_args(stories_dir, tinystories, out, *common, "--resume")), env=_cli_env(),
                   check=True, capture_output=True)
    a, b = weights(full), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((out / "finetune.json").read_text())["phases"]
    assert len(history) == 3 and not Path(f"{out}.ckpt").exists()


def test_two_process_data_parallel_matches_one_process(stories_dir, tinystories, tmp_path):
    # With adapter dropout: each micro-batch draws its masks from a seed of its own (one stream per
    # process gave rank 1 rank 0's masks, and neither matched the single process).
    common = ["--method", "sparse-lora", "--sparsity", "0.5", "--autocast", "none", "--dropout", "0.1"]
    single = tmp_path / "single"
    subprocess.run(_cli_cmd(*finetune_args(stories_dir, tinystories, single, *common)), env=_cli_env(), check=True,
                   capture_output=True)
    ddp = tmp_path / "ddp"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "losa_deploy",
                          *[str(a) for a in finetune_args(stories_dir, tinystories, ddp, *common)]],
                         env=_cli_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    a, b = linears(weights(single)), linears(weights(ddp))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    dense = linears(weights(stories_dir))
    assert max(float((a[k] - dense[k])[a[k] != 0].abs().max()) for k in a) > 1e-4  # training moved them
    report = json.loads((ddp / "finetune.json").read_text())
    assert report["world_size"] == 2


def _assert_refused(result, tmp_path, before, match):
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_target_below_the_present_sparsity_is_refused(cli, sparse_stories, tinystories, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli(*finetune_args(sparse_stories, tinystories, tmp_path / "o", "--method", "losa", "--sparsity", "0.3"))
    _assert_refused(result, tmp_path, before, "un-prune")


def test_losa_with_rmi_runs_on_a_pruned_model(cli, sparse_stories, tinystories, tmp_path):
    # Already at the target: the RMI allocation has no solution below the present sparsity (it used to stop
    # the run), so every block keeps at least its own zeros and the phases train the adapters.
    result = cli(*finetune_args(sparse_stories, tinystories, tmp_path / "o", "--method", "losa", "--sparsity", "0.5",
                                "--steps", "2", "--allocation", "rmi"))
    assert result[0] == 0, result[2]
    before, after = linears(weights(sparse_stories)), linears(weights(tmp_path / "o"))
    assert all(bool((after[k][before[k] == 0] == 0).all()) for k in before), "a pruned weight came back"
    kept = sum(int((t != 0).sum()) for t in after.values()) / sum(t.numel() for t in after.values())
    assert 1 - kept >= 0.5 - 1e-3


def test_losa_on_unevenly_pruned_rows_ends_at_the_target(cli, stories_dir, tinystories, tmp_path):
    """A model pruned with one threshold per layer (as SparseGPT prunes: rows unevenly sparse) at 40%: LoSA
    to 50% keeps every zero, and the rows already sparser than a phase's target no longer push the layers
    past it (each phase used to cut every row to the target, ending near 56-60%)."""
    from losa_deploy.models import get_architecture, load_model, load_tokenizer, save_model

    model = load_model(stories_dir)
    for linear in get_architecture(model).linears(model).values():
        w = linear.weight.data
        w[w.abs() <= w.abs().flatten().kthvalue(int(0.4 * w.numel())).values] = 0
    pruned = save_model(model, tmp_path / "uneven", tokenizer=load_tokenizer(stories_dir))
    rows_kept = [(t != 0).sum(1).float() for t in linears(weights(pruned)).values()]
    assert max(float(r.std() / r.mean()) for r in rows_kept) > 0.1  # the rows really are uneven
    result = cli(*finetune_args(pruned, tinystories, tmp_path / "o", "--method", "losa", "--sparsity", "0.5",
                                "--steps", "3"))
    assert result[0] == 0, result[2]
    before, after = linears(weights(pruned)), linears(weights(tmp_path / "o"))
    assert all(bool((after[k][before[k] == 0] == 0).all()) for k in before), "a pruned weight came back"
    zeros = sum(int((t == 0).sum()) for t in after.values()) / sum(t.numel() for t in after.values())
    assert abs(zeros - 0.5) <= 0.005  # a row's rounding (1/64 per block) averages out over the blocks


def test_a_model_pruned_to_the_target_keeps_its_mask(cli, sparse_stories, tinystories, tmp_path):
    # prune -> finetune -> merge: the one-shot prune (Wanda here) would re-prune the magnitude-pruned model
    # and move its zeros; at the target already, the model keeps its own.
    out = tmp_path / "o"
    args = finetune_args(sparse_stories, tinystories, out, "--method", "sparse-lora", "--sparsity", "0.5",
                         "--json", tmp_path / "r.json")
    assert cli(*args)[0] == 0
    assert json.loads((tmp_path / "r.json").read_text())["one_shot"]["kept_input_mask"]
    before, after = linears(weights(sparse_stories)), linears(weights(out))
    assert all(torch.equal(after[k] == 0, before[k] == 0) for k in before)
    # The adapter was trained on the input's own weights: it names the input as its base, and merges there.
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(sparse_stories)
    code, _, err = cli("merge", sparse_stories, "--adapter", out / "adapter", "-o", tmp_path / "m")
    assert code == 0, err
    assert all(torch.equal(w, after[k]) for k, w in linears(weights(tmp_path / "m")).items())


def test_a_bf16_model_comes_out_bf16(cli, sparse_stories, tinystories, tmp_path):
    # Trained in fp32, written as stored: OUT, OUT/base and a later `merge` of the two are bf16, the merge
    # reproduces OUT bit for bit, and the zeros are the input's.
    import losa_deploy as ld

    model = tmp_path / "bf16"
    ld.pack(sparse_stories, model, format="hf", dtype="bf16", progress=False)
    out = tmp_path / "o"
    assert cli(*finetune_args(model, tinystories, out, "--method", "sparse-lora", "--sparsity", "0.5",
                              "--save-base"))[0] == 0
    assert cli("merge", out / "base", "--adapter", out / "adapter", "-o", tmp_path / "m")[0] == 0
    before = linears(weights(model))
    for path in (out, out / "base", tmp_path / "m"):
        state = weights(path)
        assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.bfloat16}, path
        assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
        assert all(torch.equal(linears(state)[k] == 0, before[k] == 0) for k in before), path
    merged, again = weights(out), weights(tmp_path / "m")
    assert all(torch.equal(merged[k], again[k]) for k in merged)
    assert_base_sidecar(out / "base")  # hashed from the bf16 tensors written, not the fp32 ones trained
    # The tied embedding is stored once in every output, OUT/base included (casting each entry on its own
    # had untied it there: a second vocab x hidden copy).
    assert all(set(weights(path)) == set(weights(model)) for path in (out, out / "base", tmp_path / "m"))


def test_data_without_usable_examples_is_refused(cli, stories_dir, tmp_path):
    data = tmp_path / "empty.jsonl"
    long_prompt = "Tell me a long story about a cat and a dog who went to the park. " * 8
    data.write_text("".join(json.dumps({"instruction": long_prompt, "output": "Once."}) + "\n" for _ in range(5)))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("finetune", stories_dir, "-o", tmp_path / "o", "--data", data, "--sparsity", "0.5", "--max-len", "32",
                 "--no-progress")
    _assert_refused(result, tmp_path, before, "no usable examples")


@pytest.mark.parametrize("extra, match", [
    (["--method", "qlora", "--sparsity", "0.5"], "unknown fine-tuning method"),
    (["--sparsity", "0.5", "--max-rank", "8"], "exceeds max_rank"),
    (["--sparsity", "0.5", "--budget-tokens", "99999999"], "exceeds"),
    (["--sparsity", "0.5", "--seqlen", "1"], "--seqlen (calibration windows) must be at least 2"),
    (["--sparsity", "0.5", "--calib-slice", "0:0.5"], "--calib-slice selects part of the --calib file, and --calib is self"),
    (["--sparsity", "0.5", "--eval-slice", "9:1"], "slice"),
    (["--sparsity", "0.5", "--eval-slice", "0.8:1"], "--eval-slice selects part of the --eval-data file, and "
                                                      "--eval-data is not given"),
    (["--method", "shears", "--sparsity", "0.5", "--eval-data", "EVAL", "--search-slice", "0.8:0.9"],
     "--search-slice selects part of the --search-data file"),
    (["--method", "sparse-lora", "--sparsity", "0.5", "--search-data", "EVAL"], "--method sparse-lora has no search"),
    (["--method", "sparse-lora", "--sparsity", "0.5", "--steps", "3", "--shrink", "svd"],
     "--steps, --shrink: LoSA options (--method losa), not for method 'sparse-lora'"),
    (["--method", "shears", "--sparsity", "0.5", "--allocation", "uniform"], "--allocation: LoSA options"),
    (["--sparsity", "0.5", "--rank", "4"], "method 'losa' takes its ranks from --first-rank"),
], ids=["method", "max-rank", "budget", "seqlen-1", "calib-slice-self", "bad-slice", "eval-slice-alone",
        "search-slice-alone", "search-data-not-shears", "losa-options-baseline", "losa-options-shears",
        "rank-losa"])
def test_bad_settings_are_refused(cli, stories_dir, tinystories, tmp_path, extra, match):
    before = sorted(p.name for p in tmp_path.iterdir())
    extra = [tinystories if a == "EVAL" else a for a in extra]
    args = ["finetune", stories_dir, "-o", tmp_path / "o", "--data", tinystories, "--no-progress", *extra]
    _assert_refused(cli(*args), tmp_path, before, match)

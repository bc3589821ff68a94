"""The end-to-end demo on a tiny configuration (stories260K): every stage runs and the report holds what
the printed summary and the plot need. DeepSparse is left out here (test_bench and the packing tests
cover it); the real demo takes it when .venv-deepsparse exists."""

import json
import math

from losa_deploy.demo import format_report, run_demo


def test_demo_end_to_end_on_stories(stories_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LOSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOSA_DEEPSPARSE_PYTHON", str(tmp_path / "no-deepsparse"))
    out = tmp_path / "demo"
    report = run_demo(str(stories_dir), out, sparsity=0.5, nsamples=12, seqlen=64, steps=2, lr=1e-2,
                      bench_gen_len=4, bench_repeats=1, progress=False)
    s = report["stages"]
    for key in ("ppl_dense", "ppl_wanda", "ppl_losa"):
        assert math.isfinite(s[key]) and s[key] > 1
    assert s["ppl_wanda"] > s["ppl_dense"]  # the dense model scores its own text best
    assert abs(s["prune"]["achieved_sparsity"] - 0.5) < 0.01
    assert abs(s["pack"]["losa"]["global_sparsity"] - 0.5) < 0.01  # the merge kept the mask
    assert s["losa"]["phases"] == 2 and s["losa"]["train_tokens"] > 0
    assert [(r["engine"], r["speedup"] > 0) for r in s["bench"]] == [("torch", True), ("losa", True)]
    assert "bitmask" in s["bench"][1]["kernel_path"]
    assert (out / "demo.png").stat().st_size > 0
    assert json.loads((out / "demo_report.json").read_text())["stages"]["ppl_losa"] == s["ppl_losa"]
    assert (out / "packed-deepsparse" / "model.onnx").is_file()
    assert "LoSA 2 phases" in format_report(report)

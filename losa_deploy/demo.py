"""The end-to-end demo on the embedded default model (what ``make demo`` runs).

Today it covers the stages that are built: fetch and convert SmolLM2-135M-Instruct, inspect it, and
measure its perplexity on text it samples itself. Each later stage (prune, LoSA, merge, pack, bench)
adds its step here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .data import self_generate
from .eval.perplexity import perplexity
from .models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model
from .sparsity.report import inspect_checkpoint


def run_demo(model: str = DEFAULT_MODEL, out_dir: str | os.PathLike | None = None, nsamples: int = 16,
             seqlen: int = 256, seed: int = 0, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    path = resolve_model(model)
    report = {"model": str(path), "stages": {}}
    report["stages"]["inspect"] = _inspect_summary(inspect_checkpoint(path))
    tokenizer = load_tokenizer(path)
    lm = load_model(path, dtype="fp32")
    t = time.perf_counter()
    windows = self_generate(lm, tokenizer, nsamples, seqlen, seed=seed, progress=progress)
    sample = tokenizer.decode(windows[0, 1:49], skip_special_tokens=True)
    report["stages"]["self_generate"] = {"windows": nsamples, "seqlen": seqlen, "seconds": time.perf_counter() - t,
                                         "sample": sample}
    report["stages"]["eval_dense"] = perplexity(lm, windows, progress=progress)
    report["seconds"] = time.perf_counter() - t0
    if out_dir is not None:
        from .utils.fs import write_json

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(out_dir) / "demo_report.json", report)
    return report


def _inspect_summary(r: dict) -> dict:
    return {"model_type": r["model_type"], "linears": len(r["layers"]), "linear_params": r["linear_params"],
            "global_sparsity": r["global_sparsity"], "pattern": r["pattern"]}


def format_report(report: dict) -> str:
    s = report["stages"]
    ins, gen, ev = s["inspect"], s["self_generate"], s["eval_dense"]
    return "\n".join([
        "",
        "losa-deploy demo",
        f"  model       {report['model']}",
        f"  inspect     {ins['model_type']}, {ins['linears']} prunable linears, {ins['linear_params']:,} weights, "
        f"sparsity {100 * ins['global_sparsity']:.2f}% ({ins['pattern']})",
        f"  self-text   {gen['windows']} x {gen['seqlen']} tokens sampled in {gen['seconds']:.1f}s: "
        f"\"{gen['sample'].strip()[:90]}...\"",
        f"  perplexity  {ev['ppl']:.3f} (dense, on its own text; {ev['windows']} windows x {ev['seqlen']})",
        f"  total       {report['seconds']:.1f}s",
    ])

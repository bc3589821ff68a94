"""The end-to-end demo on the embedded default model (what ``make demo`` runs).

    SmolLM2-135M-Instruct (dense)
      -> text it samples itself (no data set needed): the first 80% trains and calibrates, the rest scores
      -> Wanda one-shot to ``sparsity`` (self-calibrated)                   perplexity
      -> LoSA: Wanda inside every phase, RMI per-block sparsity, rank allocation, short training,
         exact masked merge                                                  perplexity
      -> pack the merged model to ``losa`` (bf16) and ``deepsparse`` (ONNX)
      -> tokens/s: the dense model in plain PyTorch against the packed sparse model on our kernels (and
         DeepSparse on the export when its venv is there), interleaved by the bench harness
      -> one printed report, ``demo_report.json`` and ``demo.png``

Perplexities are on the held-out 20% of the self-generated text, so they measure how far each sparse
model drifts from the dense model's own distribution (the dense model scores lowest by construction).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model


def run_demo(model: str = DEFAULT_MODEL, out_dir: str | os.PathLike = "demo-out", sparsity: float = 0.5,
             nsamples: int = 32, seqlen: int = 128, steps: int = 3, budget_tokens: int | None = None,
             lr: float = 1e-3, bench_gen_len: int = 32, bench_repeats: int = 3, seed: int = 0,
             overwrite: bool = False, progress: bool = True) -> dict:
    """Run the pipeline into ``out_dir`` and return the report (also ``out_dir/demo_report.json``)."""
    from . import api
    from .envinfo import deepsparse_python
    from .errors import LosaError
    from .utils.fs import write_json

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LosaError(f"demo output {out} exists and is not empty (pass --overwrite to redo the demo there)")
    if not 0 < sparsity < 1:
        raise LosaError(f"--sparsity must be in (0, 1), got {sparsity}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = resolve_model(model)
    report = {"model": str(path), "sparsity": sparsity, "stages": {}, "seconds": {}}
    stages, seconds = report["stages"], report["seconds"]

    def timed(name, fn):
        started = time.perf_counter()
        result = fn()
        seconds[name] = time.perf_counter() - started
        return result

    text = out / "self-text.txt"
    stages["self_text"] = timed("self_text", lambda: _write_self_text(path, text, nsamples, seqlen, seed, progress))
    train, held_out = "0:0.8", "0.8:1"

    def ppl(checkpoint):
        return api.evaluate(checkpoint, str(text), seqlen=seqlen, data_slice=held_out, progress=progress)["ppl"]

    stages["ppl_dense"] = timed("eval_dense", lambda: ppl(path))
    pruned = out / "wanda-oneshot"
    stages["prune"] = _prune_summary(timed("prune", lambda: api.prune(
        path, pruned, sparsity=sparsity, method="wanda", calib=str(text), data_slice=train, nsamples=16,
        seqlen=seqlen, seed=seed, overwrite=True, progress=progress)))
    stages["ppl_wanda"] = timed("eval_wanda", lambda: ppl(pruned))
    merged = out / "losa-merged"
    stages["losa"] = _finetune_summary(timed("losa", lambda: api.finetune(
        path, merged, str(text), method="losa", sparsity=sparsity, pruner="wanda", steps=steps,
        data_slice=train, calib=str(text), calib_slice=train, nsamples=16, seqlen=seqlen,
        budget_tokens=budget_tokens, lr=lr, max_len=seqlen, batch_size=4, grad_accum=1, seed=seed,
        overwrite=True, progress=progress)))
    stages["ppl_losa"] = timed("eval_losa", lambda: ppl(merged))
    packs = {}
    for fmt, dtype in (("losa", "bf16"), ("deepsparse", "fp32")):
        packs[fmt] = timed(f"pack_{fmt}", lambda fmt=fmt, dtype=dtype: api.pack(
            merged, out / f"packed-{fmt}", format=fmt, dtype=dtype, overwrite=True, progress=progress))
    stages["pack"] = {fmt: {"output": p["output"], "weight_bytes": p["weight_bytes"], "dense_bytes": p["dense_bytes"],
                            "global_sparsity": p["global_sparsity"]} for fmt, p in packs.items()}
    pairs = [(str(path), "torch"), (packs["losa"]["output"], "losa")]
    if deepsparse_python() is not None:
        pairs.append((packs["deepsparse"]["output"], "deepsparse"))
    bench = timed("bench", lambda: api.bench([], pairs=pairs, batches=[1], prompt_len=64, gen_len=bench_gen_len,
                                             repeats=bench_repeats, progress=progress))
    stages["bench"] = _bench_summary(bench)
    report["bench_command"] = bench["command"]
    seconds["total"] = time.perf_counter() - t0
    plot_demo(report, out / "demo.png")
    write_json(out / "demo_report.json", report)
    return report


def _write_self_text(path: Path, target: Path, nsamples: int, seqlen: int, seed: int, progress: bool) -> dict:
    """``nsamples`` windows the dense model samples itself, as text separated by blank lines (so slices
    of the file never split a window)."""
    from .data import self_generate

    tokenizer = load_tokenizer(path)
    windows = self_generate(load_model(path, dtype="fp32"), tokenizer, nsamples, seqlen, seed=seed, batch_size=32,
                            progress=progress)
    texts = [" ".join(tokenizer.decode(w[1:], skip_special_tokens=True).split()) for w in windows]
    target.write_text("\n\n".join(texts) + "\n")
    return {"windows": nsamples, "seqlen": seqlen, "file": str(target), "sample": texts[0][:160]}


def _prune_summary(r: dict) -> dict:
    return {"output": r["output"], "achieved_sparsity": r["achieved_sparsity"]}


def _finetune_summary(r: dict) -> dict:
    phases = r["phases"]
    return {"phases": len(phases), "sparsity_per_phase": [p["sparsity"] for p in phases],
            "average_rank_per_phase": [p["average_rank"] for p in phases],
            "final_loss": phases[-1]["losses"][-1] if phases[-1]["losses"] else None,
            "train_tokens": sum(p["tokens"] for p in phases), "train_seconds": r["train_seconds"],
            "prune_seconds": r["prune_seconds"]}


def _bench_summary(results: dict) -> list[dict]:
    return [{"engine": r["engine"], "dtype": r["dtype"], "model": Path(r["model"]).name,
             "decode_tok_s": r["decode_tok_s"]["median"], "decode_q1": r["decode_tok_s"]["q1"],
             "decode_q3": r["decode_tok_s"]["q3"], "prefill_tok_s": r["prefill_tok_s"]["median"],
             "speedup": r["decode_speedup"], "kernel_path": r["kernel_path"]}
            for r in results["rows"] if "skipped" not in r]


def _ppl_line(label: str, ppl: float, note: str = "") -> str:
    # One label width for every row, so the perplexities line up whatever the phase count or sparsity.
    return f"                 {label:<30}{ppl:8.3f}" + (f"   {note}" if note else "")


def format_report(report: dict) -> str:
    s, t = report["stages"], report["seconds"]
    losa, pack = s["losa"], s["pack"]
    lines = [
        "",
        "losa-deploy demo",
        f"  model        {report['model']}",
        f"  self-text    {s['self_text']['windows']} windows x {s['self_text']['seqlen']} tokens sampled by the "
        f"model ({t['self_text']:.0f}s): \"{s['self_text']['sample'][:80]}...\"",
        "  perplexity   on the held-out 20% of that text:",
        _ppl_line("dense", s["ppl_dense"]),
        _ppl_line(f"Wanda one-shot {100 * s['prune']['achieved_sparsity']:.1f}%", s["ppl_wanda"], f"({t['prune']:.0f}s)"),
        _ppl_line(f"LoSA {losa['phases']} phases, merged {100 * pack['losa']['global_sparsity']:.1f}%", s["ppl_losa"],
                  f"({t['losa']:.0f}s: {losa['train_tokens']:,} training tokens, ranks "
                  f"{' -> '.join(f'{r:g}' for r in losa['average_rank_per_phase'])})"),
        f"  packed       losa {pack['losa']['weight_bytes'] / 2**20:.1f} MiB (bf16; dense bf16 "
        f"{pack['losa']['dense_bytes'] / 2**20:.1f} MiB), deepsparse {pack['deepsparse']['weight_bytes'] / 2**20:.1f} MiB "
        f"(fp32 ONNX)",
        "  decode       tokens/s at batch 1 (median of the repeats; machine load matters):",
    ]
    for r in s["bench"]:
        lines.append(f"                 {r['engine']:<10} {r['dtype']:<5} {r['model']:<28} {r['decode_tok_s']:8.1f}"
                     f"   {r['speedup']:.2f}x   {r['kernel_path']}")
    lines.append(f"  total        {t['total']:.0f}s; report and plot in {Path(report['stages']['self_text']['file']).parent}")
    return "\n".join(lines)


def plot_demo(report: dict, path: Path) -> None:
    """Perplexity by stage and decode tokens/s by engine, side by side."""
    from .utils.plots import _pyplot, save_figure

    plt = _pyplot()
    s = report["stages"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    names = ["dense", f"Wanda {100 * report['sparsity']:.0f}%", f"LoSA {100 * report['sparsity']:.0f}%"]
    values = [s["ppl_dense"], s["ppl_wanda"], s["ppl_losa"]]
    left.bar(names, values, color=["tab:gray", "tab:red", "tab:green"])
    for x, v in enumerate(values):
        left.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    left.set_ylabel("perplexity (held-out self-generated text)")
    left.set_title("quality", fontsize=10)
    rows = s["bench"]
    labels = [f"{r['engine']} {r['dtype']}\n{'dense' if i == 0 else 'sparse'}" for i, r in enumerate(rows)]
    medians = [r["decode_tok_s"] for r in rows]
    errors = [[r["decode_tok_s"] - r["decode_q1"] for r in rows], [r["decode_q3"] - r["decode_tok_s"] for r in rows]]
    right.bar(labels, medians, yerr=errors, capsize=3, color=["tab:gray", "tab:green", "tab:blue"][:len(rows)])
    for x, r in enumerate(rows):
        right.text(x, r["decode_q3"], f"{r['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
    right.set_ylabel("decode tokens/s (batch 1)")
    right.set_title("speed", fontsize=10)
    fig.suptitle(f"{Path(report['model']).name}: LoSA to {100 * report['sparsity']:.0f}% sparsity", fontsize=11)
    save_figure(fig, path)

"""LoSA quality on stories260K: dense, one-shot pruned, + LoRA, + sparse-LoRA, + LoSA on one token budget.

Every fine-tune trains on the same examples (the first ``--budget`` tokens of slice 0:0.8 of
tinystories-val-a, 256-token windows) with the same optimiser settings; calibration is 128 windows of
that slice; evaluation is the disjoint slice 0.8:1 and wikitext2-test (256-token windows, at most 64).
The time of each run is recorded as wall seconds and as process CPU seconds (all threads): the machine
is shared, so the CPU time is the fairer measure of work.

    .venv/bin/python benchmarks/losa_quality.py --out /tmp/losa-quality

Prints the markdown table for benchmarks/RESULTS.md and writes every number to ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import losa_deploy as ld

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("LOSA_ASSETS", ROOT.parent / "shared" / "assets"))
MODEL = ASSETS / "models" / "stories260K-hf"
TINY = ASSETS / "data" / "tinystories-val-a.txt"
WIKI = ASSETS / "data" / "wikitext2-test.raw"
SETTINGS = {"50%": {"sparsity": 0.5}, "70%": {"sparsity": 0.7}, "2:4": {"structure": "2:4"}}
METHODS = ("lora", "sparse-lora", "losa")


def evaluate(path) -> dict:
    tiny = ld.evaluate(path, str(TINY), seqlen=256, data_slice="0.8:1", max_windows=64, progress=False)["ppl"]
    wiki = ld.evaluate(path, str(WIKI), seqlen=256, max_windows=64, progress=False)["ppl"]
    return {"tinystories": tiny, "wikitext2": wiki}


def timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def unmerged_ppl(out: Path) -> dict:
    """Plain LoRA stays unmerged: evaluate base + adapter through a dense merge into a scratch copy."""
    merged = out.with_name(out.name + "-merged-dense")
    if not merged.exists():
        ld.merge(out, out / "adapter", merged, allow_dense=True)
    return evaluate(merged)


def finetune(method: str, dest: Path, setting: dict, budget: int, lr: float = 1e-2, data_split: str = "even",
             progress: bool = False, seed: int = 0) -> dict:
    """One fine-tune in this benchmark's setting (the first ``budget`` tokens of slice 0:0.8, batch 4 x 2,
    calibration 128 x 256 of the same slice, Wanda); ``setting`` is one of :data:`SETTINGS`."""
    return ld.finetune(MODEL, dest, str(TINY), method=method, pruner="wanda", lr=lr, data_slice="0:0.8",
                       budget_tokens=budget, max_len=256, batch_size=4, grad_accum=2, calib=str(TINY),
                       calib_slice="0:0.8", nsamples=128, seqlen=256, data_split=data_split, overwrite=True,
                       progress=progress, seed=seed, **setting)


def prune_oneshot(dest: Path, setting: dict, seed: int = 0) -> None:
    """The one-shot baseline: Wanda on this benchmark's calibration (128 x 256 of slice 0:0.8)."""
    ld.prune(MODEL, dest, method="wanda", calib=str(TINY), data_slice="0:0.8", nsamples=128, seqlen=256,
             seed=seed, overwrite=True, progress=False, **setting)


def run_setting(name: str, args: dict, out: Path, opts) -> dict:
    row = {}
    pruned = out / f"oneshot-{name.replace('%', 'pct').replace(':', 'of')}"
    if not pruned.exists():
        prune_oneshot(pruned, args)
    row["one-shot"] = evaluate(pruned)
    runs = [(m, "even") for m in METHODS] + [("losa", split) for split in opts.losa_splits]
    for method, split in runs:
        key = method if split == "even" else f"{method} {split}"
        dest = out / f"{key.replace(' ', '-')}-{pruned.name.split('-', 1)[1]}-lr{opts.lr:g}"
        report, times = timed(finetune, method, dest, args, opts.budget, opts.lr, split, opts.progress)
        ppl = unmerged_ppl(dest) if method == "lora" else evaluate(dest)
        row[key] = {**ppl, **times, "train_s": report["train_seconds"], "prune_s": report["prune_seconds"],
                       "sparsity": report["achieved_sparsity"]}
        print(f"  {name} {key}: {ppl} {times}", flush=True)
    return row


def recovery(dense: float, oneshot: float, tuned: float) -> float:
    """Share of the log-perplexity gap between one-shot pruned and dense that fine-tuning closes."""
    return (math.log(oneshot) - math.log(tuned)) / (math.log(oneshot) - math.log(dense))


def table(results: dict) -> str:
    dense = results["dense"]
    extra = [k for k in next(iter(results["settings"].values())) if k.startswith("losa ")]
    lines = ["| setting | eval | dense | one-shot | + LoRA | + sparse-LoRA | + LoSA | LoSA gap recovered | "
             + "".join(f"+ LoSA, {k[5:]} | gap recovered | " for k in extra),
             "|---|---|---|---|---|---|---|---|" + "---|---|" * len(extra)]
    for name, row in results["settings"].items():
        for ev in ("tinystories", "wikitext2"):
            cells = [f"{row[k][ev]:.2f}" for k in ("one-shot", *METHODS)]
            rec = recovery(dense[ev], row["one-shot"][ev], row["losa"][ev])
            more = "".join(f" {row[k][ev]:.2f} | {100 * recovery(dense[ev], row['one-shot'][ev], row[k][ev]):.0f}% |"
                           for k in extra)
            lines.append(f"| {name} | {ev} | {dense[ev]:.2f} | " + " | ".join(cells) + f" | {100 * rec:.0f}% |" + more)
    lines += ["", "| setting | method | final sparsity | wall s | CPU s | of which prune s | CPU vs LoRA |",
              "|---|---|---|---|---|---|---|"]
    for name, row in results["settings"].items():
        for method in (*METHODS, *extra):
            r = row[method]
            lines.append(f"| {name} | {method} | {100 * r['sparsity']:.2f}% | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
                         f"{r['prune_s']:.0f} | {r['cpu_s'] / row['lora']['cpu_s']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/losa-quality", help="scratch directory for the checkpoints")
    p.add_argument("--budget", type=int, default=204800, help="training tokens per method (default 204800)")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate of every method (default 1e-2)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma list of 50%%,70%%,2:4")
    p.add_argument("--losa-splits", type=lambda v: [x for x in v.split(",") if x], default=[],
                   help="extra LoSA runs with these --data-split values (e.g. final-heavy), as extra columns")
    p.add_argument("--progress", action="store_true")
    opts = p.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"budget_tokens": opts.budget, "lr": opts.lr, "dense": evaluate(MODEL), "settings": {}}
    for name in opts.settings.split(","):
        results["settings"][name] = run_setting(name, SETTINGS[name], out, opts)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()

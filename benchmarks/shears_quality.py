"""Shears quality on stories260K at 50% unstructured: Shears (heuristic, hill-climb; masked and unmasked)
vs LoRA at a fixed rank vs sparse-LoRA vs LoSA, all on one token budget.

Every fine-tune trains on the same examples (the first ``--budget`` tokens of slice 0:0.8 of
tinystories-val-a, 256-token windows, batch 4 x accum 2, lr 1e-2), Wanda calibrated on 128 windows of
that slice. Shears chooses its sub-adapter on the validation slice 0.8:0.9; every method is scored on
that validation slice, on the disjoint test slice 0.9:1 and on wikitext2-test (256-token windows, at
most 64 per text). Unmerged adapters (LoRA, unmasked Shears) are scored through a dense merge into a
scratch copy (the same function as base + adapter).

    .venv/bin/python benchmarks/shears_quality.py --out /tmp/shears-quality

Prints the markdown table for benchmarks/RESULTS.md and writes every number to ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from safetensors import safe_open

import losa_deploy as ld

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("LOSA_ASSETS", ROOT.parent / "shared" / "assets"))
MODEL = ASSETS / "models" / "stories260K-hf"
TINY = ASSETS / "data" / "tinystories-val-a.txt"
WIKI = ASSETS / "data" / "wikitext2-test.raw"
# 0.8:1 capped at 64 windows (the LoSA table's slice) is the first 64 windows of 0.8:0.9: the same text.
EVALS = {"val 0.8:0.9": (TINY, "0.8:0.9"), "test 0.9:1": (TINY, "0.9:1"), "wikitext2": (WIKI, None)}


def runs(opts) -> dict[str, dict]:
    """Name -> ld.finetune keyword arguments beyond the shared ones."""
    shears = dict(method="shears", rank_choices=opts.choices, max_rank=max(int(c) for c in opts.choices.split(",")),
                  search_data=str(TINY), search_slice="0.8:0.9", search_evals=opts.search_evals)
    return {
        f"LoRA r{opts.rank}": dict(method="lora", rank=opts.rank),
        f"sparse-LoRA r{opts.rank}": dict(method="sparse-lora", rank=opts.rank),
        "LoSA": dict(method="losa"),
        "Shears heuristic": dict(shears, search="heuristic"),
        "Shears hill-climb": dict(shears, search="hill-climb"),
        "Shears max": dict(shears, search="max"),
        "Shears heuristic per micro-batch": dict(shears, search="heuristic", sample_per="micro-batch"),
        "Shears heuristic unmasked": dict(shears, search="heuristic", masked=False),
    }


def evaluate(path) -> dict:
    return {name: ld.evaluate(path, str(data), seqlen=256, data_slice=part, max_windows=64, progress=False)["ppl"]
            for name, (data, part) in EVALS.items()}


def adapter_params(out: Path) -> int:
    with safe_open(out / "adapter" / "adapter_model.safetensors", "pt") as f:
        return sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())


def run(name: str, kwargs: dict, out: Path, opts) -> dict:
    dest = out / name.replace(" ", "-").replace(",", "")
    t0 = time.perf_counter()
    report = ld.finetune(MODEL, dest, str(TINY), sparsity=0.5, pruner="wanda", lr=opts.lr, data_slice="0:0.8",
                         budget_tokens=opts.budget, max_len=256, batch_size=4, grad_accum=2, calib=str(TINY),
                         calib_slice="0:0.8", nsamples=128, seqlen=256, seed=opts.seed, overwrite=True,
                         progress=opts.progress,
                         **kwargs)
    seconds = time.perf_counter() - t0
    merged = "merge" in report  # masked methods come back merged, exactly sparse
    if merged:
        ppl = evaluate(dest)
    else:
        scratch = dest.with_name(dest.name + "-merged-dense")
        ld.merge(dest, dest / "adapter", scratch, allow_dense=True, overwrite=True)
        ppl = evaluate(scratch)
    row = {"ppl": ppl, "adapter_params": adapter_params(dest), "merged": merged, "wall_s": seconds,
           "train_s": report["train_seconds"], "sparsity": report["achieved_sparsity"]}
    if "shears" in report:
        s = report["shears"]
        row["shears"] = {"chosen_ranks": sorted(set(s["chosen"]["ranks"].values()), reverse=True),
                         "rank_histogram": {str(r): list(s["chosen"]["ranks"].values()).count(r) for r in s["choices"]},
                         "evaluations": s["evaluations"], "super_adapter_params": s["super_adapter_params"],
                         "candidates": [(c["adapter_params"], c["val_ppl"]) for c in s["candidates"]]}
    print(f"  {name}: {ppl} params {row['adapter_params']} {seconds:.0f} s", flush=True)
    return row


def table(results: dict) -> str:
    cols = list(EVALS)
    lines = ["| method | adapter params | at inference | " + " | ".join(f"{c} ppl" for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for key in ("dense", "one-shot Wanda 50%"):
        lines.append(f"| {key} | - | - | " + " | ".join(f"{results[key][c]:.3f}" for c in cols) + " |")
    for name, row in results["runs"].items():
        extra = "merged (0 extra)" if row["merged"] else "unmerged adapter"
        ranks = f" (ranks {row['shears']['rank_histogram']})" if "shears" in row else ""
        lines.append(f"| {name}{ranks} | {row['adapter_params']:,} | {extra} | "
                     + " | ".join(f"{row['ppl'][c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/shears-quality", help="scratch directory for the checkpoints")
    p.add_argument("--budget", type=int, default=204800, help="training tokens per method (default 204800)")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate of every method (default 1e-2)")
    p.add_argument("--rank", type=int, default=8, help="LoRA / sparse-LoRA fixed rank (default 8)")
    p.add_argument("--choices", default="12,8,4", help="Shears rank choices (default 12,8,4: heuristic 8)")
    p.add_argument("--search-evals", type=int, default=24, help="hill-climb evaluations (default 24)")
    p.add_argument("--seed", type=int, default=0, help="training seed of every run (default 0)")
    p.add_argument("--only", help="comma list of run names to do (default: all)")
    p.add_argument("--progress", action="store_true")
    opts = p.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {"runs": {}}
    results.update(budget_tokens=opts.budget, lr=opts.lr, choices=opts.choices, seed=opts.seed,
                   dense=evaluate(MODEL))
    pruned = out / "oneshot-50pct"
    if not pruned.exists():
        ld.prune(MODEL, pruned, method="wanda", sparsity=0.5, calib=str(TINY), data_slice="0:0.8", nsamples=128,
                 seqlen=256, progress=False)
    results["one-shot Wanda 50%"] = evaluate(pruned)
    wanted = opts.only.split(",") if opts.only else None
    for name, kwargs in runs(opts).items():
        if wanted is None or name in wanted:
            results["runs"][name] = run(name, kwargs, out, opts)
            saved.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()

"""Calibration-seed spread of ours vs llm-compressor's Wanda and SparseGPT on stories260K.

One calibration draw is one sample: at 70% this model's perplexity moves by a few % with any perturbation,
so "at least as good as llm-compressor" is judged on the mean over seeds, both sides pruning the very
same windows of each seed (dumped to safetensors and read by benchmarks/llmcompressor_prune.py).

    .venv/bin/python benchmarks/prune_seeds.py --llmc-python /work/scratch-llmc/venv/bin/python --seeds 0 1 2 3 4

Same setting as benchmarks/prune_quality.py (128 x 256 windows of the 0:0.8 slice, eval on 0.8:1).
Prints a markdown table (mean, standard deviation and per-seed perplexity) and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from prune_quality import DATA, MODEL, evaluate, llmc
from safetensors.torch import save_file
from tqdm.auto import tqdm

import losa_deploy as ld
from losa_deploy.data import calibration_windows
from losa_deploy.models import load_tokenizer

CELLS = [("sparsegpt", 0.7), ("sparsegpt", 0.5), ("wanda", 0.5)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llmc-python", required=True, help="python of a venv with llmcompressor")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default="/tmp/losa-prune-seeds", help="scratch directory for the checkpoints")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    tokenizer = load_tokenizer(MODEL)
    results: dict = {f"{who} {method} {s:g}": {} for method, s in CELLS for who in ("ours", "llm-compressor")}
    for seed in tqdm(args.seeds, desc="seeds"):
        windows = out / f"windows-{seed}.safetensors"
        save_file({"input_ids": calibration_windows(None, tokenizer, str(DATA), 128, 256, seed, "0:0.8").contiguous()},
                  windows)
        for method, sparsity in CELLS:
            name = f"{method}-{sparsity:g}-{seed}"
            ld.prune(MODEL, out / f"ours-{name}", method=method, sparsity=sparsity, calib=str(DATA),
                     data_slice="0:0.8", nsamples=128, seqlen=256, seed=seed, progress=False)
            results[f"ours {method} {sparsity:g}"][str(seed)] = evaluate(out / f"ours-{name}")
            cell = llmc(args.llmc_python, out, f"llmc-{name}", windows, method, {"sparsity": sparsity})
            results[f"llm-compressor {method} {sparsity:g}"][str(seed)] = cell.get("ppl", cell.get("error"))
            (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(results: dict) -> None:
    """Per cell: mean and spread over seeds, then ours minus llm-compressor's, seed by seed."""
    print("| method | sparsity | mean ppl | std | median | per seed |\n|---|---|---|---|---|---|")
    for key, per_seed in results.items():
        who, method, sparsity = key.rsplit(" ", 2)
        values = [v for v in per_seed.values() if isinstance(v, float)]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {who} {method} | {float(sparsity):.0%} | {statistics.mean(values):.2f} | {spread:.2f} | "
              f"{statistics.median(values):.2f} | " + " / ".join(f"{v:.2f}" for v in values) + " |")
    print("\n| method | sparsity | ours - llm-compressor: mean (std) | seeds where ours is lower |\n|---|---|---|---|")
    for method, sparsity in CELLS:
        ours, theirs = results[f"ours {method} {sparsity:g}"], results[f"llm-compressor {method} {sparsity:g}"]
        diffs = [ours[s] - theirs[s] for s in ours if isinstance(theirs.get(s), float)]
        spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        print(f"| {method} | {sparsity:.0%} | {statistics.mean(diffs):+.2f} ({spread:.2f}) | "
              f"{sum(d < 0 for d in diffs)} of {len(diffs)} (ties {sum(d == 0 for d in diffs)}) |")


if __name__ == "__main__":
    sys.exit(main())

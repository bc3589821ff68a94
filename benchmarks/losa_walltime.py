"""LoSA's wall time against LoRA's on one token budget (issue #4's <= 1.3x bar), in alternating pairs.

The settings of benchmarks/losa_quality.py (stories260K, Wanda, 204,800 tokens, batch 4 x 2, calibration
128 x 256), one process, an untimed warm-up run, then the order LoRA, LoSA, LoRA, LoSA, ... so that a slow
spell of a shared machine hits both; each pair gives one ratio, and the median over pairs is reported with
the range.

    .venv/bin/python benchmarks/losa_walltime.py --pairs 3 --setting 70%

Prints a markdown table; writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from losa_quality import SETTINGS, finetune
from tqdm.auto import tqdm


def run(method: str, dest: Path, setting: dict, budget: int) -> dict:
    start = time.perf_counter()
    report = finetune(method, dest, setting, budget)
    return {"wall_s": time.perf_counter() - start, "train_s": report["train_seconds"],
            "prune_s": report["prune_seconds"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--setting", default="70%", choices=list(SETTINGS))
    p.add_argument("--budget", type=int, default=204800)
    p.add_argument("--out", default="/tmp/losa-walltime")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # One short untimed run first: the first fine-tune in a process pays one-off costs (imports, kernel
    # and allocator warm-up, ~4 s here) that would otherwise land on the first LoRA run only.
    run("lora", out / "warmup", SETTINGS[args.setting], 4096)
    pairs = []
    for _ in tqdm(range(args.pairs), desc="pairs"):
        pairs.append({m: run(m, out / m, SETTINGS[args.setting], args.budget) for m in ("lora", "losa")})
        (out / "results.json").write_text(json.dumps({"setting": args.setting, "pairs": pairs}, indent=2))
    ratios = [pair["losa"]["wall_s"] / pair["lora"]["wall_s"] for pair in pairs]
    print("| pair | LoRA wall s | LoSA wall s | of which LoSA prune phases s | LoSA / LoRA |\n|---|---|---|---|---|")
    for i, (pair, ratio) in enumerate(zip(pairs, ratios), 1):
        print(f"| {i} | {pair['lora']['wall_s']:.1f} | {pair['losa']['wall_s']:.1f} | {pair['losa']['prune_s']:.1f} | "
              f"{ratio:.2f}x |")
    total = sum(p["losa"]["wall_s"] for p in pairs) / sum(p["lora"]["wall_s"] for p in pairs)
    print(f"\nmedian LoSA / LoRA: {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}x); "
          f"total LoSA wall time / total LoRA wall time: {total:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LoSA against sparse-LoRA over several seeds, in one setting of benchmarks/losa_quality.py.

A seed draws everything random in a run: the calibration windows (when the slice holds more than are
used), the adapter initialisation and the order of the training examples. Every seed gets its own one-shot
pruned baseline (same calibration draw), so the share of the gap recovered is per seed too.

    .venv/bin/python benchmarks/losa_seeds.py --setting 70% --seeds 0,1,2 [--json benchmarks/results/losa_seeds.json]

Prints a markdown table (per seed and the mean) and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from losa_quality import MODEL, SETTINGS, evaluate, finetune, prune_oneshot, recovery
from tqdm.auto import tqdm

from losa_deploy.utils.fs import atomic_file

EVALS = ("tinystories", "wikitext2")


def run_seed(seed: int, setting: dict, out: Path, budget: int) -> dict:
    oneshot = out / f"oneshot-s{seed}"
    prune_oneshot(oneshot, setting, seed)
    row = {"one-shot": evaluate(oneshot)}
    for method in ("sparse-lora", "losa"):
        finetune(method, out / f"{method}-s{seed}", setting, budget, seed=seed)
        row[method] = evaluate(out / f"{method}-s{seed}")
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", default="70%", choices=list(SETTINGS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=int, default=204800)
    p.add_argument("--out", default="/tmp/losa-seeds")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense = evaluate(MODEL)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = {seed: run_seed(seed, SETTINGS[args.setting], out, args.budget) for seed in tqdm(seeds, desc="seeds")}
    print("| seed | eval | one-shot | + sparse-LoRA | + LoSA | LoSA gap recovered | LoSA beats sparse-LoRA |\n"
          "|---|---|---|---|---|---|---|")
    for seed, row in rows.items():
        for ev in EVALS:
            rec = recovery(dense[ev], row["one-shot"][ev], row["losa"][ev])
            print(f"| {seed} | {ev} | {row['one-shot'][ev]:.2f} | {row['sparse-lora'][ev]:.2f} | "
                  f"{row['losa'][ev]:.2f} | {100 * rec:.0f}% | {'yes' if row['losa'][ev] < row['sparse-lora'][ev] else 'no'} |")
    for ev in EVALS:
        mean = {k: statistics.mean(r[k][ev] for r in rows.values()) for k in ("one-shot", "sparse-lora", "losa")}
        rec = statistics.mean(recovery(dense[ev], r["one-shot"][ev], r["losa"][ev]) for r in rows.values())
        wins = sum(r["losa"][ev] < r["sparse-lora"][ev] for r in rows.values())
        print(f"| mean | {ev} | {mean['one-shot']:.2f} | {mean['sparse-lora']:.2f} | {mean['losa']:.2f} | "
              f"{100 * rec:.0f}% | {wins} of {len(rows)} |")
    if args.json:
        with atomic_file(args.json) as handle:
            handle.write(json.dumps({"setting": args.setting, "budget_tokens": args.budget, "dense": dense,
                                     "command": " ".join(sys.argv), "seeds": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pruning quality on stories260K: perplexity after one-shot pruning, ours and llm-compressor's.

Calibration: 128 windows x 256 tokens of the 0:0.8 slice of tinystories-val-a (seed 0); evaluation: the
disjoint 0.8:1 slice, non-overlapping 256-token windows. llm-compressor runs in its own venv
(``--llmc-python``) on the very same windows, through benchmarks/llmcompressor_prune.py.

    .venv/bin/python benchmarks/prune_quality.py --llmc-python /work/scratch-llmc/venv/bin/python

Prints the markdown tables for benchmarks/RESULTS.md and writes every number to ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import losa_deploy as ld

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("LOSA_ASSETS", ROOT.parent / "shared" / "assets"))
MODEL = ASSETS / "models" / "stories260K-hf"
DATA = ASSETS / "data" / "tinystories-val-a.txt"
SETTINGS = [("50%", {"sparsity": 0.5}), ("70%", {"sparsity": 0.7}), ("2:4", {"structure": "2:4"}),
            ("4:8", {"structure": "4:8"})]


def evaluate(path) -> float:
    return ld.evaluate(path, str(DATA), seqlen=256, data_slice="0.8:1", progress=False)["ppl"]


def ours(out: Path, name: str, args: dict, calib: dict) -> dict:
    report = ld.prune(MODEL, out / name, calib=str(DATA), data_slice="0:0.8", progress=False, **calib, **args)
    return {"ppl": evaluate(out / name), "sparsity": report["achieved_sparsity"],
            "seconds": report["seconds"]["total"], "allocation": report["allocation"]}


def llmc(python: str, out: Path, name: str, windows: Path, method: str, args: dict, owl: bool = False) -> dict:
    structure = args.get("structure", "0:0")
    n, m = (int(x) for x in structure.split(":"))
    sparsity = args.get("sparsity", 1 - n / m if m else 0.0)
    cmd = [python, str(ROOT / "benchmarks" / "llmcompressor_prune.py"), str(MODEL), str(windows), str(out / name),
           "--method", method, "--sparsity", str(sparsity), "--structure", structure] + (["--owl"] if owl else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # recorded, not fatal: e.g. its OWL profile fails in llmcompressor 0.14.0.1
        return {"error": done.stderr.strip().splitlines()[-1]}
    seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    return {"ppl": evaluate(out / name), "sparsity": ld.inspect(out / name)["global_sparsity"], "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/losa-prune-quality", help="scratch directory for the checkpoints")
    p.add_argument("--llmc-python", help="python of a venv with llmcompressor (skip the comparison if absent)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    calib = {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0}
    results: dict = {"dense": {"ppl": evaluate(MODEL), "sparsity": 0.0}, "main": {}, "allocation": {}, "mixed": {}}
    started = time.perf_counter()

    for method in ("magnitude", "wanda", "sparsegpt"):
        for label, setting in SETTINGS:
            results["main"][f"{method} {label}"] = ours(out, f"{method}-{label.replace(':', '_')}", {
                "method": method, **setting}, calib)
    allocations = [("uniform", {}), ("rmi", {"allocation": "rmi"}), ("rmi lam=0.08", {"allocation": "rmi", "lam": 0.08}),
                   ("owl", {"allocation": "owl"})]
    for method in ("magnitude", "wanda", "sparsegpt"):
        for label, setting in allocations:
            key = f"{method} 70% {label}"
            results["allocation"][key] = (results["main"][f"{method} 70%"] if label == "uniform" else
                                          ours(out, key.replace(" ", "-").replace("%", ""), {
                                              "method": method, "sparsity": 0.7, **setting}, calib))
    for method in ("wanda", "sparsegpt"):
        for structure, label, setting in [("2:8", "uniform", {}), ("mixed-2:8", "rmi", {"allocation": "rmi"}),
                                          ("mixed-2:8", "owl", {"allocation": "owl"}),
                                          ("2:4", "uniform", {}), ("mixed-2:4", "rmi", {"allocation": "rmi"})]:
            key = f"{method} {structure} {label}"
            results["mixed"][key] = ours(out, key.replace(" ", "-").replace(":", "_"), {
                "method": method, "structure": structure, **setting}, calib)

    if args.llmc_python:
        from safetensors.torch import save_file

        from losa_deploy.data import calibration_windows
        from losa_deploy.models import load_tokenizer

        windows = calibration_windows(None, load_tokenizer(MODEL), str(DATA), args.nsamples, args.seqlen, 0, "0:0.8")
        save_file({"input_ids": windows.contiguous()}, out / "windows.safetensors")
        for method in ("wanda", "sparsegpt"):
            for label, setting in SETTINGS:
                results["main"][f"llm-compressor {method} {label}"] = llmc(
                    args.llmc_python, out, f"llmc-{method}-{label.replace(':', '_')}", out / "windows.safetensors",
                    method, setting)
            results["allocation"][f"llm-compressor {method} 70% owl"] = llmc(
                args.llmc_python, out, f"llmc-{method}-owl", out / "windows.safetensors", method,
                {"sparsity": 0.7}, owl=True)
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_tables(results)


def print_tables(results: dict) -> None:
    dense = results["dense"]["ppl"]
    print(f"dense: {dense:.3f}\n")
    print("| method | 50% | 70% | 2:4 | 4:8 |\n|---|---|---|---|---|")
    for method in ("magnitude", "wanda", "sparsegpt", "llm-compressor wanda", "llm-compressor sparsegpt"):
        cells = [results["main"].get(f"{method} {label}") for label, _ in SETTINGS]
        if any(cells):
            print(f"| {method} | " + " | ".join("-" if c is None or "error" in c else
                                               f"{c['ppl']:.2f} ({100 * c['sparsity']:.2f}%)" for c in cells) + " |")
    print("\n| 70% unstructured | ppl | achieved sparsity | per-block sparsity |\n|---|---|---|---|")
    for key, r in results["allocation"].items():
        if "error" in r:
            print(f"| {key} | failed: {r['error']} | | |")
            continue
        blocks = r.get("allocation", {}).get("sparsity_per_block")
        print(f"| {key} | {r['ppl']:.2f} | {100 * r['sparsity']:.2f}% | "
              + (" / ".join(f"{b:.3f}" for b in blocks) if blocks else "-") + " |")
    print("\n| N:M | ppl | achieved sparsity | N per block |\n|---|---|---|---|")
    for key, r in results["mixed"].items():
        ns = r["allocation"].get("n_per_block")
        print(f"| {key} | {r['ppl']:.2f} | {100 * r['sparsity']:.2f}% | {ns if ns else '-'} |")


if __name__ == "__main__":
    sys.exit(main())

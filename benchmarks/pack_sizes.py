"""Packed checkpoint sizes: ``losa`` (and ``deepsparse``) against ``hf``, per model, pattern and dtype.

    python benchmarks/pack_sizes.py [--models stories260k smollm2-135m] [--out benchmarks/pack_sizes.png]

Each model is magnitude-pruned per layer (50% unstructured, or 2:4 along the input dimension; the
pruning engine is its own stage, this is only to have sparse weights), saved, then packed. Sizes are
bytes of the weight files (``weight_bytes``), and of the prunable linears alone (packed tensors against
the dense weights). Prints a Markdown table for RESULTS.md and draws the ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import magnitude_prune_  # noqa: E402  (the tests' magnitude rule)

from losa_deploy import pack  # noqa: E402
from losa_deploy.models import get_architecture, load_model, load_tokenizer, resolve_model, save_model  # noqa: E402
from losa_deploy.models.tensors import iter_tensors  # noqa: E402

MODELS = {"stories260k": ROOT.parent / "shared" / "assets" / "models" / "stories260K-hf",
          "smollm2-135m": "smollm2-135m"}
DTYPES = {"stories260k": ("fp32", "bf16"), "smollm2-135m": ("bf16",)}


def linear_bytes(path: Path) -> int:
    """Bytes of the prunable linears: dense ``*proj.weight``/``fc*.weight`` or their packed tensors."""
    total = 0
    for key, tensor in iter_tensors(path):
        leaf = key.rsplit(".", 1)[1]
        if leaf.startswith(("lb_", "nm_")) or (leaf == "weight" and key.rsplit(".", 2)[1].endswith(("proj", "fc1", "fc2"))):
            total += tensor.numel() * tensor.element_size()
    return total


def measure(name: str, work: Path) -> list[dict]:
    source = resolve_model(MODELS[name])
    rows = []
    for pattern in ("50%", "2:4"):
        model = load_model(source)
        for linear in get_architecture(model).linears(model).values():
            magnitude_prune_(linear.weight, pattern)
        pruned = save_model(model, work / f"{name}-{pattern.replace(':', 'of').replace('%', 'pct')}",
                            tokenizer=load_tokenizer(source), overwrite=True)
        del model
        for dtype in DTYPES[name]:
            formats = ("hf", "losa", "deepsparse") if dtype == "fp32" else ("hf", "losa")
            results = {fmt: pack(pruned, work / f"{pruned.name}-{dtype}-{fmt}", format=fmt, dtype=dtype,
                                 overwrite=True, progress=False) for fmt in formats}
            hf_linear = linear_bytes(work / f"{pruned.name}-{dtype}-hf")
            for fmt, result in results.items():
                row = {"model": name, "pattern": pattern, "dtype": dtype, "format": fmt,
                       "weight_bytes": result["weight_bytes"],
                       "vs_hf": result["weight_bytes"] / results["hf"]["weight_bytes"]}
                if fmt == "losa":
                    row["linear_vs_hf"] = linear_bytes(work / f"{pruned.name}-{dtype}-losa") / hf_linear
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "pack_sizes.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for name in args.models for row in measure(name, Path(tmp))]
    print("| model | pattern | dtype | format | weight bytes | vs hf | prunable linears vs hf |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        linear = f"{r['linear_vs_hf']:.3f}" if "linear_vs_hf" in r else ""
        print(f"| {r['model']} | {r['pattern']} | {r['dtype']} | {r['format']} | {r['weight_bytes']:,} | "
              f"{r['vs_hf']:.3f} | {linear} |")
    plot(rows, args.out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from losa_deploy.utils.plots import save_figure

    packed = [r for r in rows if r["format"] != "hf"]
    labels = [f"{r['model']}\n{r['pattern']} {r['dtype']}\n{r['format']}" for r in packed]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(packed)), 4))
    ax.bar(range(len(packed)), [r["vs_hf"] for r in packed], color="tab:blue", label="whole checkpoint")
    ax.bar(range(len(packed)), [r.get("linear_vs_hf", float("nan")) for r in packed], width=0.4,
           color="tab:orange", label="prunable linears")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(packed)), labels, fontsize=7)
    ax.set_ylabel("bytes / bytes of the hf output")
    ax.set_title("packed size on disk")
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()

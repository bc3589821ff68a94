"""Plots for results people would rather see than read, as PNG, SVG or PDF by the file's suffix.
matplotlib runs headless (Agg)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LosaError
from .fs import atomic_file, check_output_file

PLOT_FORMATS = ("png", "svg", "pdf")


def plot_format(path: str | os.PathLike) -> str:
    """The format the suffix names; any other suffix is refused (x.txt got PNG bytes)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise LosaError(f"--plot {path}: name a .png, .svg or .pdf file (the suffix picks the format)")
    return suffix


def check_plot_file(path: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """``check_output_file`` for ``--plot``, and its suffix."""
    path = check_output_file(path, "--plot", inputs=inputs)
    plot_format(path)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write the figure atomically in the format of its suffix, then close it."""
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format=plot_format(path), dpi=120, bbox_inches="tight")
    _pyplot().close(fig)


def plot_layer_sparsity(layers: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """One bar per linear layer (grouped by block), coloured by the linear's name."""
    plt = _pyplot()
    kinds = list(dict.fromkeys(r["name"].rsplit(".", 1)[-1] for r in layers))  # first-seen order
    colours = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(layers) + 2), 3.6))
    xs = range(len(layers))
    ax.bar(xs, [100 * r["sparsity"] for r in layers], color=[colours[r["name"].rsplit(".", 1)[-1]] for r in layers])
    for k, c in colours.items():
        ax.bar([], [], color=c, label=k)
    blocks = [r["block"] for r in layers]
    ticks = [i for i in xs if i == 0 or blocks[i] != blocks[i - 1]]
    ax.set_xticks(ticks, [str(blocks[i]) for i in ticks], fontsize=7)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "per-layer sparsity")
    ax.legend(fontsize=7, ncol=min(len(kinds), 7), loc="upper center", bbox_to_anchor=(0.5, -0.22))
    save_figure(fig, path)

"""The fine-tuning figure: per-block sparsity and rank across phases, and the loss curve."""

from __future__ import annotations

import os

from ..utils.plots import _pyplot, save_figure


def plot_finetune(report: dict, path: str | os.PathLike) -> None:
    plt = _pyplot()
    phases = report["phases"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if phases and "block_sparsity" in phases[0]:
        blocks = range(len(phases[0]["block_sparsity"]))
        for r in phases:
            axes[0].plot(blocks, [100 * s for s in r["block_sparsity"]], marker="o", label=f"phase {r['phase']}")
            axes[1].plot(blocks, r["ranks"], marker="o", label=f"phase {r['phase']}")
        axes[0].set_ylabel("sparsity (%)")
        axes[1].set_ylabel("adapter rank")
        for ax in axes[:2]:
            ax.set_xlabel("decoder block")
            ax.legend(fontsize=7)
    else:
        for ax, text in zip(axes[:2], ("fixed one-shot mask", f"fixed rank {report['method']['rank']}")):
            ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
    axes[0].set_title("per-block sparsity")
    axes[1].set_title("per-block rank")
    step = 0
    for r in phases:
        xs = range(step, step + len(r["losses"]))
        axes[2].plot(xs, r["losses"], label=f"phase {r['phase']}")
        step += len(r["losses"])
    axes[2].set_xlabel("optimizer update")
    axes[2].set_ylabel("training loss")
    axes[2].set_title(f"{report['method']['method']}: loss")
    save_figure(fig, path)

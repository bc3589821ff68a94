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
        ranks = f"fixed rank {report['method']['rank']}" if "shears" not in report else \
            f"elastic ranks {report['shears']['choices']}\n(see shears.png)"
        for ax, text in zip(axes[:2], ("fixed one-shot mask", ranks)):
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


def plot_shears(report: dict, path: str | os.PathLike) -> None:
    """Shears' trade-off: adapter size vs validation loss of every scored sub-adapter."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    scored = [c for c in report["candidates"] if "val_loss" in c]
    mixed = [c for c in scored if not c["uniform"]]
    uniform = sorted((c for c in scored if c["uniform"]), key=lambda c: c["adapter_params"])
    if mixed:
        ax.scatter([c["adapter_params"] for c in mixed], [c["val_loss"] for c in mixed], s=18, color="tab:gray",
                   alpha=0.7, label="searched (mixed ranks)")
    if uniform:
        ax.plot([c["adapter_params"] for c in uniform], [c["val_loss"] for c in uniform], marker="o",
                color="tab:blue", label="uniform rank")
        for c in uniform:
            ax.annotate(f"r={next(iter(c['ranks'].values()))}", (c["adapter_params"], c["val_loss"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    chosen = report["chosen"]
    if "val_loss" in chosen:
        ax.scatter([chosen["adapter_params"]], [chosen["val_loss"]], marker="*", s=160, color="tab:red", zorder=3,
                   label=f"chosen ({report['search']})")
    else:
        ax.text(0.5, 0.5, "no validation data: nothing scored", ha="center", va="center", transform=ax.transAxes)
    ax.axvline(report["super_adapter_params"], color="tab:gray", linestyle=":", linewidth=1)
    ax.set_xlabel("adapter parameters")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Shears sub-adapters: {report['n_groups']} groups, ranks {report['choices']}")
    if scored:
        ax.legend(fontsize=8)
    save_figure(fig, path)

"""The printed table and the PNG plot of a bench run."""

from __future__ import annotations

import os

from .runners import TIMED_BY_SUBTRACTION


def _cell(summary: dict, digits: int = 1) -> str:
    return f"{summary['median']:.{digits}f} ({summary['q1']:.{digits}f}-{summary['q3']:.{digits}f})"


def display_name(spec: str) -> str:
    """A model spec as shown in tables: a path by its last component, a standard name as it is."""
    return os.path.basename(spec.rstrip("/")) or spec


def format_table(results: dict) -> str:
    """One line per (model, engine, batch): medians with their interquartile range, speed-ups."""
    from ..cli.common import format_table as table

    s = results["settings"]
    rows = []
    for r in results["rows"]:
        if "skipped" in r:
            rows.append([display_name(r["model"]), r["engine"], r["dtype"], r["batch"], "-", "-", "-", "-",
                         r["skipped"]])
            continue
        rows.append([display_name(r["model"]), r["engine"], r["dtype"], r["batch"], _cell(r["prefill_tok_s"]),
                     _cell(r["decode_tok_s"]), _cell(r["tpot_ms"], 2), f"{r['decode_speedup']:.2f}x",
                     r["kernel_path"]])
    header = ["model", "engine", "dtype", "batch", "prefill tok/s", "decode tok/s", "TPOT ms", "decode x",
              "kernel path"]
    lines = [f"prompt {s['prompt_len']}, generate {s['gen_len']}, {s['threads']} threads, {s['repeats']} repeats "
             f"after {s['warmup']} warm-up; medians (interquartile range); 'decode x' against the first measured "
             "row of each batch (an engine skipped at a batch is no baseline there)", table(rows, header)]
    for r in results["rows"]:
        if TIMED_BY_SUBTRACTION in r.get("timing", ""):  # vLLM gave no per-request timestamps
            lines.append(f"note: {display_name(r['model'])} / {r['engine']} batch {r['batch']}: timed as a "
                         "gen_len generation minus a 1-token one (two runs' noise)")
    different = [a for a in results["agreement"] if not a["identical"]]
    for a in different:
        lines.append(f"note: {a['model']} batch {a['batch']}: {a['engine']} first differs from {a['reference']} "
                     f"at generated token {a['first_difference']}")
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    """The rows as a Markdown table (for benchmarks/RESULTS.md): medians, IQR, speed-ups, kernel path."""
    lines = ["| model | engine | batch | prefill tok/s | decode tok/s | TPOT ms | decode x | prefill x | kernel path |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        name = f"{display_name(r['model'])} | {r['engine']} {r['dtype']} | {r['batch']}"
        if "skipped" in r:
            lines.append(f"| {name} | - | - | - | - | - | {r['skipped']} |")
            continue
        lines.append(f"| {name} | {_cell(r['prefill_tok_s'])} | {_cell(r['decode_tok_s'])} | {_cell(r['tpot_ms'], 1)} "
                     f"| **{r['decode_speedup']:.2f}** | {r['prefill_speedup']:.2f} | {r['kernel_path']} |")
    m = results["machine"]
    start, end = m["load_average_start"][0], m["load_average_end"][0]
    lines.append(f"\n`{results['command']}` ({results['started_utc']}, {results['seconds'] / 60:.0f} min; load "
                 f"average {start:.1f} at the start, {end:.1f} at the end)")
    return "\n".join(lines)


def plot_results(results: dict, path: str | os.PathLike) -> None:
    """Per batch size: decode and prefill tokens/s of every cell (median, interquartile whiskers)."""
    from ..utils.plots import _pyplot, save_figure

    plt = _pyplot()
    rows = [r for r in results["rows"] if "skipped" not in r]
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    height = max(2.0, 0.35 * max(sum(r["batch"] == b for r in rows) for b in batches) + 1.2)
    fig, axes = plt.subplots(len(batches), 2, figsize=(12, height * len(batches)), squeeze=False,
                             layout="constrained")
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    colours = {e: plt.cm.tab10(i % 10) for i, e in enumerate(engines)}
    for axis_row, batch in zip(axes, batches):
        group = [r for r in rows if r["batch"] == batch]
        labels = [f"{display_name(r['model'])} / {r['engine']} {r['dtype']}" for r in group]
        for ax, key, title in ((axis_row[0], "decode_tok_s", "decode"), (axis_row[1], "prefill_tok_s", "prefill")):
            medians = [r[key]["median"] for r in group]
            errors = [[r[key]["median"] - r[key]["q1"] for r in group], [r[key]["q3"] - r[key]["median"] for r in group]]
            ys = range(len(group))
            ax.barh(ys, medians, xerr=errors, color=[colours[r["engine"]] for r in group], capsize=2)
            ax.set_yticks(list(ys), labels if key == "decode_tok_s" else [""] * len(group), fontsize=7)
            ax.invert_yaxis()
            speedups = [r[f"{title}_speedup"] for r in group]
            for y, (r, x) in enumerate(zip(group, speedups)):
                ax.text(r[key]["q3"], y, f" {x:.2f}x", va="center", fontsize=7)
            ax.set_xlim(0, 1.15 * max(r[key]["q3"] for r in group))
            ax.set_xlabel(f"{title} tokens/s", fontsize=8)
            ax.set_title(f"batch {batch}: {title}", fontsize=9)
    s = results["settings"]
    fig.suptitle(f"prompt {s['prompt_len']}, generate {s['gen_len']}, {s['threads']} threads "
                 f"(speed-ups against the first row)", fontsize=10)
    save_figure(fig, path)

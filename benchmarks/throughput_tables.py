"""Markdown tables for benchmarks/RESULTS.md from ``losa-deploy bench --json`` files.

    python benchmarks/throughput_tables.py benchmarks/throughput/*.json

Other JSON files among them (the demo's report, say) are skipped with a note on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from losa_deploy.throughput.report import markdown_table


def read_report(path: Path) -> dict | None:
    """The bench report in ``path``, or None (with a note) for any other JSON."""
    try:
        report = json.loads(path.read_text())
    except ValueError as exc:  # UnicodeDecodeError included
        print(f"note: {path}: not a bench report (not JSON: {exc}), skipped", file=sys.stderr)
        return None
    if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
        print(f"note: {path}: not a bench report (no rows), skipped", file=sys.stderr)
        return None
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, metavar="JSON",
                        help="bench --json files; one table each, headed by the file's name")
    args = parser.parse_args(argv)
    for path in args.reports:
        if not path.is_file():
            parser.error(f"{path}: no such file")
    for path in args.reports:
        report = read_report(path)
        if report is not None:
            print(f"#### {path.stem}\n")
            print(markdown_table(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

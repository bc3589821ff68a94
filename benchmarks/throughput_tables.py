"""Markdown tables for benchmarks/RESULTS.md from ``losa-deploy bench --json`` files.

    python benchmarks/throughput_tables.py benchmarks/throughput/*.json
"""

import json
import sys
from pathlib import Path

from losa_deploy.throughput.report import markdown_table

for name in sys.argv[1:]:
    print(f"#### {Path(name).stem}\n")
    print(markdown_table(json.loads(Path(name).read_text())) + "\n")

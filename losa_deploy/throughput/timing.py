"""Engine workers as processes, and the statistics of repeated measurements.

Each (model, engine) cell runs in its own worker process, loaded once. The harness asks the cells in
turn, one request at a time (only one cell computes at any moment, so the cells never compete for the
cores), round-robin with the starting cell rotated each repeat, so slow drifts of a shared machine spread
evenly over the cells and the ratios between them stay fair.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..errors import LosaError


class WorkerProcess:
    """A running engine worker speaking :mod:`.protocol`; its stderr goes to a log file kept on failure."""

    def __init__(self, label: str, argv: list[str], env: dict[str, str], work: Path):
        self.label, self.work = label, work
        self.log_path = work / "worker.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                        env={**os.environ, **env}, text=True, bufsize=1)

    def wait_ready(self, timeout: float) -> dict:
        return self._receive(timeout)["info"]

    def request(self, message: dict, timeout: float) -> dict:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        return self._receive(timeout)

    def _receive(self, timeout: float) -> dict:
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                self.close()
                raise LosaError(f"{self.label}: no answer within {timeout:.0f} s")
        line = self.process.stdout.readline()
        if not line:
            raise LosaError(f"{self.label}: the worker exited (code {self.process.wait()}): {self._last_log_line()}")
        message = json.loads(line)
        if "error" in message:
            raise LosaError(f"{self.label}: {message['error']}")
        return message

    def _last_log_line(self) -> str:
        self._log.flush()
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def close(self, timeout: float = 60) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "close"}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._log.close()


def scratch_dir(label: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"losa-bench-{label.replace('/', '_')[:40]}-"))


def remove_scratch(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def round_robin(cells: list, repeat: int) -> list:
    """The cells in the order of this repeat: the list rotated by the repeat index."""
    k = repeat % len(cells)
    return cells[k:] + cells[:k]


def summarize(values: list[float]) -> dict:
    """Median with its spread: quartiles (IQR) and the extremes."""
    a = np.asarray(values, dtype=np.float64)
    q1, median, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "min": float(a.min()),
            "max": float(a.max()), "n": int(a.size)}

"""Engine workers as processes, and the statistics of repeated measurements.

Each (model, engine) cell runs in its own worker process, loaded once. The harness asks the cells in
turn, one request at a time (only one cell computes at any moment, so the cells never compete for the
cores), round-robin with the starting cell rotated each repeat, so slow drifts of a shared machine spread
evenly over the cells and the ratios between them stay fair.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..errors import LosaError


class WorkerProcess:
    """A running engine worker speaking :mod:`.protocol`; its stderr goes to a log file in ``work``, moved
    beside ``work`` and kept when the worker fails (the error names it)."""

    def __init__(self, label: str, argv: list[str], env: dict[str, str], work: Path):
        self.label, self.work = label, work
        self.log_path = work / "worker.log"
        self._log = open(self.log_path, "wb")
        # The worker removes `work` itself if the harness dies without cleaning up (see .protocol).
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                        env={**os.environ, **env, "LOSA_BENCH_WORK": str(work)}, text=True,
                                        bufsize=1)

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
                error = self._failure(f"no answer within {timeout:.0f} s")  # (keeps the log, while it is open)
                self.stop()  # busy past the timeout: a polite close would wait for it again
                raise error
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise self._failure(f"the worker exited (code {code}): {self._last_words()}")
        message = json.loads(line)
        if "error" in message:
            raise self._failure(message["error"])
        return message

    def _failure(self, reason: str) -> LosaError:
        """The error, with the worker's log kept outside ``work`` (which the harness removes)."""
        self._log.flush()
        kept = self.work.with_name(f"{self.work.name}.log")
        try:
            os.replace(self.log_path, kept)  # the worker may still write: same file, new name
        except OSError:
            return LosaError(f"{self.label}: {reason}")
        self.log_path = kept
        return LosaError(f"{self.label}: {reason} (worker log: {kept})")

    def _last_words(self) -> str:
        """The log's last line that is not a progress bar (a traceback ends with its exception)."""
        self._log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()  # splits at a bar's \r updates too
        said = [line.strip() for line in lines if line.strip() and not _PROGRESS_BAR.search(line)]
        return said[-1] if said else "no output"

    def close(self, timeout: float = 60) -> None:
        """Ask the worker to finish (an engine may shut down cleanly), waiting at most ``timeout`` s."""
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "close"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._release()

    def terminate(self) -> None:
        """Send SIGTERM now (see :func:`stop_workers`)."""
        if self.process.poll() is None:
            self.process.terminate()

    def stop(self, grace: float = 3) -> None:
        """Stop the worker now, busy or not: SIGTERM, then SIGKILL after ``grace`` s."""
        self.terminate()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._release()

    def _release(self) -> None:
        # Only now that the worker has exited: closing its stdin first would make it exit on its own.
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:  # a worker that died before reading its last message: nothing to flush to
                pass
        self._log.close()


# tqdm's lines: "load:  50%|#####     | 1/2 [00:01<00:01, 1.2it/s]", or "12it [00:01, 9.8it/s]" without a total.
_PROGRESS_BAR = re.compile(r"\|\s*[\d.]+[kMG]?/[\d.]+[kMG]?\s*\[|\d+(?:\.\d+)?[kMG]?it \[")


def stop_workers(workers: list[WorkerProcess]) -> None:
    """Stop every worker at once, for a failed or interrupted run (SIGTERM to all first, so the grace
    periods overlap)."""
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.stop()


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

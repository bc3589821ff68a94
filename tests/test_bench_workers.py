"""The bench harness's worker processes: stopped at once when the run is terminated or interrupted, gone
with their scratch directories when the harness itself is killed, and a dead worker's error names its
real last words and the log kept for it.

The workers here are stand-ins speaking the real line protocol (:mod:`losa_deploy.throughput.protocol`),
so a request can be made to take as long as a test needs.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A worker that loads at once and then spends ten minutes on its first request (after saying so).
BUSY_WORKER = """
import os, sys, time
from pathlib import Path
from losa_deploy.throughput.protocol import serve

def measure(request):
    Path(os.environ["BUSY_MARK"]).write_text(str(os.getpid()))
    time.sleep(600)

sys.exit(serve(dict, measure))
"""

# `losa-deploy bench` whose torch engine runs the worker given as the first argument.
BENCH_WITH = """
import sys
from losa_deploy.throughput import engines

class Stand_in(engines.TorchEngine):
    def command(self, folder, dtype, threads, shape, work):
        return [sys.executable, "-c", WORKER], {}

WORKER = sys.argv[1]
engines.ENGINES["torch"] = Stand_in()
from losa_deploy.cli import main

sys.exit(main(sys.argv[2:]))
"""


def _default_signals():
    os.setsid()  # its own group: a signal for it never reaches pytest
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background job may inherit SIGINT ignored


def _start_bench(worker: str, model: Path, tmp_path: Path, *args) -> subprocess.Popen:
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "BUSY_MARK": str(tmp_path / "busy"),
           "LOSA_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", BENCH_WITH, worker, "bench", str(model), "--engine", "torch",
                             "--prompt-len", "4", "--gen-len", "4", "--threads", "1", "--no-progress", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)


def _busy_worker(bench: subprocess.Popen, mark: Path) -> int:
    """The pid of the stand-in worker, once it is busy in its first request."""
    deadline = time.monotonic() + 120
    while not (mark.is_file() and mark.read_text()):
        assert bench.poll() is None, bench.communicate()
        assert time.monotonic() < deadline, "the worker never got its request"
        time.sleep(0.1)
    return int(mark.read_text())


def _scratch(tmp_path: Path) -> list[str]:
    """What the harness left in TMPDIR (torch leaves a cache folder of its own there)."""
    return sorted(p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("losa-bench-"))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


@pytest.fixture
def cleanup():
    """Kill whatever a failed test left running (by pid: only the processes the test started)."""
    pids = []
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signame,code,message", [("SIGTERM", 143, "error: terminated"),
                                                  ("SIGINT", 130, "error: interrupted")])
def test_a_terminated_bench_stops_its_busy_worker_at_once(stories_dir, tmp_path, cleanup, signame, code,
                                                          message):
    """A polite close waits for the request in flight (up to 60 s); a signalled run must not."""
    bench = _start_bench(BUSY_WORKER, stories_dir, tmp_path)
    cleanup.append(bench.pid)
    worker = _busy_worker(bench, tmp_path / "busy")
    cleanup.append(worker)
    started = time.monotonic()
    bench.send_signal(getattr(signal, signame))
    _, err = bench.communicate(timeout=120)
    assert time.monotonic() - started < 15, "the harness waited for the busy worker"
    assert bench.returncode == code and err.strip().splitlines()[-1] == message, err
    assert _gone_within(worker, 5)
    assert _scratch(tmp_path) == []  # the scratch directory (and log) removed


def test_a_worker_exits_when_the_harness_is_killed(stories_dir, tmp_path, cleanup):
    """kill -9 of the harness runs none of its clean-up: the busy worker notices its pipe closed, removes
    its scratch directory and exits, instead of running on."""
    bench = _start_bench(BUSY_WORKER, stories_dir, tmp_path)
    cleanup.append(bench.pid)
    worker = _busy_worker(bench, tmp_path / "busy")
    cleanup.append(worker)
    bench.kill()
    bench.communicate()
    assert _gone_within(worker, 15), "the orphaned worker kept running"
    assert _scratch(tmp_path) == []


# A worker that dies in its first request after a traceback and a progress bar, as an engine might.
DYING_WORKER = r"""
import os, sys
from losa_deploy.throughput.protocol import serve

def measure(request):
    print("Traceback (most recent call last):\n  File 'engine.py', line 1\nMemoryError: out of pages",
          file=sys.stderr)
    for done in (1, 2):
        print(f"\rcompile:  {50 * done}%|#####     | {done}/2 [00:01<00:01,  1.00it/s]", end="", file=sys.stderr)
    sys.stderr.flush()
    os._exit(3)

sys.exit(serve(dict, measure))
"""


def test_a_dead_worker_is_reported_by_its_last_words_and_its_log_kept(stories_dir, tmp_path, cleanup):
    bench = _start_bench(DYING_WORKER, stories_dir, tmp_path)
    cleanup.append(bench.pid)
    _, err = bench.communicate(timeout=120)
    assert bench.returncode == 2 and err.count("\n") == 1, err
    assert "the worker exited (code 3): MemoryError: out of pages (worker log: " in err
    log = Path(err.rsplit("(worker log: ", 1)[1].rstrip().rstrip(")"))
    assert log.parent == tmp_path / "tmp" and "MemoryError: out of pages" in log.read_text()
    assert _scratch(tmp_path) == [log.name]  # the log kept, the scratch directory removed


def test_a_worker_past_its_timeout_is_stopped_and_its_log_kept(tmp_path):
    """No answer in time: the worker is stopped, the error is one LosaError naming the log, and the log is
    kept (the error path flushed the log after stopping had closed it: a ValueError traceback)."""
    from losa_deploy.errors import LosaError
    from losa_deploy.throughput.timing import WorkerProcess, remove_scratch

    work = tmp_path / "work"
    work.mkdir()
    quiet = "import sys, time; print('loading the model', file=sys.stderr, flush=True); time.sleep(600)"
    worker = WorkerProcess("stand-in", [sys.executable, "-c", quiet], {}, work)
    started = time.monotonic()
    with pytest.raises(LosaError, match=r"stand-in: no answer within 1 s \(worker log: .*\)") as failure:
        worker.wait_ready(1)
    assert time.monotonic() - started < 15 and worker.process.poll() is not None
    remove_scratch(work)
    log = Path(str(failure.value).rsplit("worker log: ", 1)[1].rstrip(")"))
    assert log.is_file() and "loading the model" in log.read_text()

"""The line protocol between the harness and its engine workers (standard library only: the DeepSparse
worker imports it from its own venv, which has neither torch nor losa_deploy).

A worker loads its model, sends ``{"ready": true, "info": {...}}``, then answers each request line
``{"prompts": [[ids], ...], "gen_len": G}`` with ``{"prefill_s": ..., "decode_s": ..., "tokens": [...]}``
(the greedy ids of the first prompt), or ``{"error": "..."}``. Messages travel on a private copy of the
original stdout; file descriptor 1 is pointed at stderr, so whatever an engine prints (vLLM logs to
stdout, C libraries write to fd 1) cannot corrupt the protocol.

A worker outlives no harness: when its stdin pipe loses its writer (the harness died, even by kill -9,
which runs no clean-up), it removes its scratch directory (``$LOSA_BENCH_WORK``) and exits, even in the
middle of a request. The harness closes that pipe only after the worker has exited.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import sys
import threading
import traceback
from collections.abc import Callable


def serve(load: Callable[[], dict], measure: Callable[[dict], dict], close: Callable[[], None] | None = None) -> int:
    """Load, report ready, answer requests until ``{"op": "close"}``, then ``close()``. End of input means
    the harness is gone: the worker then exits at once, without ``close()`` (see the module docstring)."""
    _exit_with_the_harness()
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")

    try:
        send({"ready": True, "info": load()})
    except Exception as exc:  # reported to the harness, which turns it into one error line
        traceback.print_exc()
        send({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "close":
            break
        try:
            send(measure(request))
        except Exception as exc:
            traceback.print_exc()
            send({"error": f"{type(exc).__name__}: {exc}"})
    if close is not None:
        close()
    return 0


def _exit_with_the_harness() -> None:
    """Exit as soon as stdin has no writer left. A thread waits for the pipe's hang-up without reading
    it (poll with no events asked reports only POLLHUP and POLLERR), so requests still reach the main
    loop; the parent's pid is not watched, since a wrapper script between them would be the parent."""
    if not hasattr(select, "poll"):
        return  # no poll() (Windows): the worker ends at its next read of stdin, on end of input

    def watch() -> None:
        poller = select.poll()
        poller.register(sys.stdin.fileno(), 0)
        while not poller.poll():
            pass
        work = os.environ.get("LOSA_BENCH_WORK")
        if work:
            shutil.rmtree(work, ignore_errors=True)  # nobody else is left to remove it
        os._exit(1)

    threading.Thread(target=watch, name="losa-bench-harness-watch", daemon=True).start()

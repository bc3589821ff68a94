"""The line protocol between the harness and its engine workers (standard library only: the DeepSparse
worker imports it from its own venv, which has neither torch nor losa_deploy).

A worker loads its model, sends ``{"ready": true, "info": {...}}``, then answers each request line
``{"prompts": [[ids], ...], "gen_len": G}`` with ``{"prefill_s": ..., "decode_s": ..., "tokens": [...]}``
(the greedy ids of the first prompt), or ``{"error": "..."}``. Messages travel on a private copy of the
original stdout; file descriptor 1 is pointed at stderr, so whatever an engine prints (vLLM logs to
stdout, C libraries write to fd 1) cannot corrupt the protocol.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable


def serve(load: Callable[[], dict], measure: Callable[[dict], dict], close: Callable[[], None] | None = None) -> int:
    """Load, report ready, answer requests until ``{"op": "close"}`` or end of input, then ``close()``."""
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

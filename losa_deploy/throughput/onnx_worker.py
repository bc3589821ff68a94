"""The ``onnxruntime`` and ``deepsparse`` engine worker: greedy decoding of a ``deepsparse``-format folder
(:mod:`losa_deploy.engines.onnx_decode`, DeepSparse's own fixed-window protocol), timed, behind the
harness's line protocol (:mod:`.protocol`). Run as a script, because for DeepSparse it runs in the
DeepSparse venv, which has numpy but neither torch nor losa_deploy::

    python onnx_worker.py {onnxruntime|deepsparse} MODEL_DIR --sequence-length N --prompt-chunk C \\
        --threads T --work-dir DIR

Batch 1 only: the decoding protocol keeps one sequence's cache. The prompt runs in chunks of
``--prompt-chunk`` tokens (DeepSparse compiles one engine per input length: the chunk and 1).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed_greedy(decoder, prompt: np.ndarray, gen_len: int) -> dict:
    """Prefill (prompt to first token) and decode (the other ``gen_len - 1`` tokens) times."""
    decoder.check_length(prompt.size, gen_len)
    start = time.perf_counter()
    logits, cache, done = decoder.prefill(prompt)
    tokens = [int(logits[0, -1].argmax())]
    prefilled = time.perf_counter()
    for _ in range(gen_len - 1):
        logits, cache = decoder.step(np.array([tokens[-1]]), done, cache)
        done += 1
        tokens.append(int(logits[0, -1].argmax()))
    return {"prefill_s": prefilled - start, "decode_s": time.perf_counter() - prefilled, "tokens": tokens}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=["onnxruntime", "deepsparse"])
    parser.add_argument("model_dir")
    parser.add_argument("--sequence-length", type=int, required=True)
    parser.add_argument("--prompt-chunk", type=int, required=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work-dir", required=True)
    args = parser.parse_args(argv)
    protocol = _module("losa_bench_protocol", HERE / "protocol.py")
    onnx_decode = _module("losa_onnx_decode", HERE.parent / "engines" / "onnx_decode.py")
    state = {}

    def load() -> dict:
        state["decoder"] = onnx_decode.open_decoder(args.engine, args.model_dir, args.sequence_length,
                                                    args.prompt_chunk, work_dir=args.work_dir,
                                                    threads=args.threads)
        return {"version": importlib.metadata.version(args.engine), "dtype": "fp32",
                "sequence_length": args.sequence_length, "prompt_chunk": args.prompt_chunk,
                "kernel_path": f"{args.engine} on model.onnx (fp32 initializers, exact zeros)"}

    def measure(request: dict) -> dict:
        if len(request["prompts"]) != 1:
            raise ValueError(f"{args.engine} runs batch 1 only")
        return timed_greedy(state["decoder"], np.asarray(request["prompts"][0], dtype=np.int64),
                            request["gen_len"])

    return protocol.serve(load, measure)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

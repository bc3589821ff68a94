"""The worker process of the ``torch``, ``losa`` and ``vllm`` engines (one model each), behind the line
protocol of :mod:`.protocol`. vLLM starts processes of its own, so this runs only as ``__main__``::

    python -m losa_deploy.throughput.worker {torch|losa|vllm} PATH --dtype bf16 --threads T \\
        --max-batch B --prompt-len P --max-len L [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .protocol import serve
from .runners import HFRunner, VLLMRunner


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=["torch", "losa", "vllm"])
    parser.add_argument("path", type=Path)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.engine == "vllm":
        runner = VLLMRunner(args.path, args.dtype, args.threads, args.max_batch, args.prompt_len, args.max_len)
        return serve(runner.load, runner.measure, runner.close)
    runner = HFRunner(args.engine, args.path, args.dtype, args.threads, args.device)
    return serve(runner.load, runner.measure)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

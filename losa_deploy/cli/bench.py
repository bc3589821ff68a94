"""``losa-deploy bench MODEL... --engine torch,losa,vllm,deepsparse,onnxruntime --batch 1,8,32 ...``."""

from __future__ import annotations

import shlex
import sys

from .common import positive_int, show_progress

HELP = "prefill / decode tokens/s of models on engines, interleaved in one run (medians with spread)"


def add_arguments(parser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="a checkpoint or PEFT adapter directory, or a standard model NAME[@VARIANT]: "
                             "smollm2-135m, llama2-7b-2blocks; variants dense, 50, 70, 2:4, 70-lora, 70-losa "
                             "(built into the cache on first use)")
    parser.add_argument("--engine", default="torch,losa",
                        help="comma list of torch, losa, vllm, deepsparse, onnxruntime, each optionally :DTYPE "
                             "(default torch,losa); the first engine on the first model is the baseline")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batch", default="1", help="comma list of batch sizes (default 1)")
    parser.add_argument("--prompt-len", type=positive_int, default=128,
                        help="prompt tokens per sequence, timed as prefill (default 128)")
    parser.add_argument("--gen-len", type=positive_int, default=128,
                        help="tokens generated per sequence, timed as decode; at least 2 (default 128)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed rounds per batch size; each round runs every cell once (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--threads", type=positive_int, help="threads per engine (default: every core this process may use)")
    parser.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32 (default bf16) for engines without "
                        ":DTYPE; one that cannot run it runs its own (DeepSparse and ONNX Runtime fp32, vLLM bf16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--plot", metavar="FILE", help="write a bar chart of the results (.png, .svg or .pdf)")


def run(args) -> dict:
    from ..api import bench
    from ..throughput.report import format_table

    command = "losa-deploy " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None
    results = bench(args.models, engines=args.engine, device=args.device, batches=args.batch,
                    prompt_len=args.prompt_len, gen_len=args.gen_len, repeats=args.repeats, warmup=args.warmup,
                    threads=args.threads, dtype=args.dtype, seed=args.seed, plot=args.plot, command=command,
                    progress=show_progress(args))
    print(format_table(results))
    return results

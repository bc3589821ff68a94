"""``losa-deploy generate MODEL --prompt TEXT``."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import LosaError
from .common import add_model_argument, positive_int, show_progress

HELP = "continue a prompt on our runtime (packed or pruned model, sparse kernels), streaming the text"


def add_arguments(parser) -> None:
    add_model_argument(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="the text to continue")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 text file")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate at most (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy (default); above: sample at this temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="dtype to run in (default auto: as stored)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")


def _prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    path = Path(args.prompt_file)
    if not path.is_file():
        raise LosaError(f"prompt file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LosaError(f"prompt file {path} is not UTF-8 text") from None


def run(args) -> dict:
    from ..api import generate

    prompt = _prompt(args)
    result = generate(args.model, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, seed=args.seed, chat=args.chat, ignore_eos=args.ignore_eos,
                      dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                      stream=sys.stdout, echo_prompt=not args.chat, progress=show_progress(args))
    speed = (f", decode {result['decode_tokens_per_s']:.1f} tokens/s" if result["decode_tokens_per_s"] else "")
    print(f"[{result['prompt_tokens']} prompt + {result['new_tokens']} new tokens, {result['sampling']}; "
          f"prefill {result['prefill_s']:.2f} s{speed}; {result['kernel_path']}, {result['dtype']}]", file=sys.stderr)
    return {**result, "prompt": prompt}

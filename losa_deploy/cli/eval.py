"""``losa-deploy eval MODEL --data FILE|self``."""

from __future__ import annotations

from .common import add_model_argument, positive_int, show_progress

HELP = "perplexity: the text tokenized once, non-overlapping windows, ppl = exp(mean token NLL)"


def add_arguments(parser) -> None:
    add_model_argument(parser)
    parser.add_argument("--data", required=True, metavar="FILE|self",
                        help="text, JSON/JSONL or Alpaca JSON file; 'self' scores text the model samples itself")
    parser.add_argument("--slice", metavar="A:B", help="evaluate only this fraction range of the file (e.g. 0.8:1)")
    parser.add_argument("--text-field", help="the JSON field holding text (default: text, content, ...)")
    parser.add_argument("--seqlen", type=positive_int, help="window length (default: min(2048, context))")
    parser.add_argument("--max-windows", type=positive_int, help="score at most this many windows")
    parser.add_argument("--nsamples", type=positive_int, default=16,
                        help="windows to sample with --data self (default 16)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward (default 4)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "auto"],
                        help="dtype to evaluate in (default fp32; auto: as stored)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --data self sampling (default 0)")


def run(args) -> dict:
    from ..api import evaluate

    result = evaluate(args.model, args.data, seqlen=args.seqlen, max_windows=args.max_windows,
                      data_slice=args.slice, text_field=args.text_field, nsamples=args.nsamples,
                      batch_size=args.batch_size, dtype=args.dtype, seed=args.seed,
                      trust_remote_code=args.trust_remote_code, progress=show_progress(args))
    print(f"perplexity {result['ppl']:.4f}  ({result['windows']} windows x {result['seqlen']} tokens, "
          f"data {result['data']})")
    return result

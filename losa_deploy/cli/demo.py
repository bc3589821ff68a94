"""``losa-deploy demo``: the pipeline end to end on the embedded default model."""

from __future__ import annotations

from .common import positive_int, show_progress

HELP = ("the pipeline end to end on the embedded SmolLM2-135M: self-generated text, Wanda, LoSA, merge, pack, "
        "perplexity and tokens/s, one report and a PNG")


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model spec (default: the embedded SmolLM2-135M)")
    parser.add_argument("--out", default="demo-out", help="directory for the report and artefacts (default demo-out)")
    parser.add_argument("--overwrite", action="store_true", help="redo the demo in a non-empty --out")
    parser.add_argument("--sparsity", type=float, default=0.5, help="target sparsity (default 0.5)")
    parser.add_argument("--nsamples", type=positive_int, default=32, help="self-generated windows (default 32)")
    parser.add_argument("--seqlen", type=positive_int, default=128, help="tokens per window (default 128)")
    parser.add_argument("--steps", type=positive_int, default=3, help="LoSA phases (default 3)")
    parser.add_argument("--budget-tokens", type=positive_int,
                        help="LoSA training tokens (default: all of the training 80%% of the text)")
    parser.add_argument("--lr", type=float, default=1e-3, help="LoSA learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling, pruning and training (default 0)")


def run(args) -> dict:
    from ..demo import format_report, run_demo

    report = run_demo(args.model, args.out, sparsity=args.sparsity, nsamples=args.nsamples, seqlen=args.seqlen,
                      steps=args.steps, budget_tokens=args.budget_tokens, lr=args.lr, seed=args.seed,
                      overwrite=args.overwrite, progress=show_progress(args))
    print(format_report(report))
    return report

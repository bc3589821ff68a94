"""``losa-deploy demo``: the pipeline end to end on the embedded default model."""

from __future__ import annotations

from .common import positive_int, show_progress

HELP = "run the pipeline end to end on the embedded default model (SmolLM2-135M-Instruct) and report"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model spec (default: the embedded SmolLM2-135M)")
    parser.add_argument("--out", default="demo-out", help="directory for the report and artefacts")
    parser.add_argument("--nsamples", type=positive_int, default=16, help="self-generated windows")
    parser.add_argument("--seqlen", type=positive_int, default=256)
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> dict:
    from ..demo import format_report, run_demo

    report = run_demo(args.model, args.out, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                      progress=show_progress(args))
    print(format_report(report))
    return report

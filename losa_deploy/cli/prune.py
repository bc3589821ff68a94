"""``losa-deploy prune MODEL -o OUT --sparsity S --method M --structure T [--allocation A] [--calib FILE|self]``."""

from __future__ import annotations

import argparse

from .common import add_model_argument, positive_int, print_table, show_progress

HELP = "one-shot pruning (magnitude, Wanda, SparseGPT; unstructured, N:M, mixed N:M; per-layer allocation)"


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None


def add_arguments(parser) -> None:
    add_model_argument(parser)
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output checkpoint directory")
    parser.add_argument("--sparsity", type=_fraction, metavar="S",
                        help="target sparsity in [0, 1) (implied by N:M structures)")
    parser.add_argument("--method", default="wanda", help="magnitude | wanda | sparsegpt (default: wanda)")
    parser.add_argument("--structure", default="unstructured",
                        help="unstructured (default) | N:M (e.g. 2:4, 4:8) | mixed-N:M (N per block, mean N)")
    parser.add_argument("--allocation", default="uniform", metavar="uniform|rmi|owl|FILE.json",
                        help="per-block sparsity: uniform (default), RMI (LoSA's CKA), OWL, or per-layer JSON")
    parser.add_argument("--lam", type=_fraction, metavar="LAMBDA",
                        help="allocation range +-LAMBDA (default: RMI 0.01/0.02/0.03 by target, OWL 0.08, "
                             "mixed N:M one step 1/M)")
    parser.add_argument("--calib", default="self", metavar="FILE|self",
                        help="calibration text file, or 'self' to sample it from the model (default)")
    parser.add_argument("--slice", metavar="A:B", help="use only this fraction range of the calibration file")
    parser.add_argument("--nsamples", type=positive_int, default=128, help="calibration windows (default 128)")
    parser.add_argument("--seqlen", type=positive_int, help="window length (default: min(2048, context))")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="windows per block forward (default 8)")
    parser.add_argument("--blocksize", type=positive_int, default=128,
                        help="SparseGPT column block (default 128)")
    parser.add_argument("--percdamp", type=_fraction, default=0.01,
                        help="SparseGPT Hessian dampening, a share of mean(diag H) (default 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    parser.add_argument("--plot", metavar="FILE", help="draw the per-layer sparsity to this .png, .svg or .pdf file")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args) -> dict:
    from ..api import prune

    report = prune(args.model, args.output, sparsity=args.sparsity, method=args.method, structure=args.structure,
                   allocation=args.allocation, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                   data_slice=args.slice, seed=args.seed, lam=args.lam, batch_size=args.batch_size,
                   blocksize=args.blocksize, percdamp=args.percdamp, overwrite=args.overwrite, plot=args.plot,
                   trust_remote_code=args.trust_remote_code, progress=show_progress(args))
    rows = [[b["block"], ", ".join(b["targets"]), f"{100 * b['sparsity']:.2f}%",
             "-" if b["recon_error"] is None else f"{b['recon_error']:.4g}"] for b in report["blocks"]]
    print_table(rows, ["block", "target", "achieved", "recon error"])
    print(f"\n{report['method']} {report['structure']}, {report['allocation']['kind']} allocation: "
          f"target {100 * report['target_sparsity']:.2f}%, achieved {100 * report['achieved_sparsity']:.2f}% "
          f"in {report['seconds']['total']:.1f} s")
    print(f"wrote {report['output']}" + (f" and {args.plot}" if args.plot else ""))
    return report

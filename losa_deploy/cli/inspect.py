"""``losa-deploy inspect MODEL [--json FILE] [--plot PNG|SVG|PDF]``."""

from __future__ import annotations

from .common import add_model_argument, print_table

HELP = "per-layer shape, sparsity and pattern (dense / unstructured / N:M / mixed N:M); verifies the sidecar"


def add_arguments(parser) -> None:
    add_model_argument(parser)
    parser.add_argument("--plot", metavar="FILE", help="draw per-layer sparsity to this .png, .svg or .pdf file")


def run(args) -> dict:
    from ..models import resolve_model
    from ..sparsity.report import inspect_checkpoint

    report = inspect_checkpoint(resolve_model(args.model), args.trust_remote_code)
    rows = [[r["name"], "x".join(map(str, r["shape"])), f"{100 * r['sparsity']:.2f}%", r["pattern"]]
            for r in report["layers"]]
    print_table(rows, ["layer", "shape", "sparsity", "pattern"])
    side = report["sidecar"]
    print(f"\n{report['model_type']} ({report['architecture']} layout), {len(rows)} prunable linears, "
          f"{report['linear_params']:,} weights; global sparsity {100 * report['global_sparsity']:.2f}%, "
          f"pattern {report['pattern']}")
    print("sidecar:   " + ("none" if side is None else f"verified ({side['verified_modules']} modules match)"))
    if args.plot:
        from ..utils.plots import plot_layer_sparsity

        plot_layer_sparsity(report["layers"], args.plot, title=f"{args.model}: per-layer sparsity")
        print(f"plot:      {args.plot}")
    return report

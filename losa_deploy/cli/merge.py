"""``losa-deploy merge BASE --adapter DIR -o OUT [--allow-dense]``."""

from __future__ import annotations

from .common import add_model_argument

HELP = "merge a saved adapter into its pruned base, keeping the zero pattern exactly"


def add_arguments(parser) -> None:
    add_model_argument(parser)
    parser.add_argument("--adapter", required=True, metavar="DIR", help="the adapter directory (PEFT format)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output checkpoint directory")
    parser.add_argument("--allow-dense", action="store_true",
                        help="merge an unmasked (plain LoRA) adapter into a sparse base, making it dense")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args) -> dict:
    from ..api import merge

    report = merge(args.model, args.adapter, args.output, allow_dense=args.allow_dense, overwrite=args.overwrite,
                   trust_remote_code=args.trust_remote_code)
    m = report["merge"]
    kind = "masked (zero pattern kept)" if report["masked"] else "unmasked"
    print(f"merged {m['modules']} {kind} adapters: sparsity {100 * report['base_sparsity']:.2f}% -> "
          f"{100 * report['sparsity']:.2f}%; wrote {report['output']}")
    return report

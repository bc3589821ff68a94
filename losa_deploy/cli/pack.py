"""``losa-deploy pack MODEL -o OUT --format hf|losa|vllm|deepsparse|nm-vllm [--dtype ...] [--overwrite]``."""

from __future__ import annotations

from .common import add_model_argument, print_table, show_progress

HELP = "pack a (sparse) checkpoint for serving: hf, losa, vllm (our plugin), deepsparse (ONNX) or nm-vllm"


def add_arguments(parser) -> None:
    from ..export import FORMATS

    add_model_argument(parser)
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory")
    parser.add_argument("--format", default="hf", metavar="FORMAT",
                        help="; ".join(f"{name}: {e.description}" for name, e in FORMATS.items())
                        + " (default: hf)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                        help="convert floating tensors (default: keep the stored dtype; deepsparse is fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args) -> dict:
    from ..api import pack

    result = pack(args.model, args.output, format=args.format, dtype=args.dtype, overwrite=args.overwrite,
                  trust_remote_code=args.trust_remote_code, progress=show_progress(args))
    print_table([[name, f"{size:,}"] for name, size in result["files"].items()], ["file", "bytes"])
    ratio = result["weight_bytes"] / max(result["dense_bytes"], 1)
    print(f"\nwrote {result['output']} ({result['format']}, {result['dtype']}): weights {result['weight_bytes']:,} "
          f"bytes, {ratio:.2f}x the dense {result['dense_bytes']:,}; pattern {result['pattern']}, "
          f"global sparsity {100 * result['global_sparsity']:.2f}%")
    return result

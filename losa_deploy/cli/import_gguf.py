"""``losa-deploy import-gguf FILE -o OUT``."""

from __future__ import annotations

HELP = "convert a GGUF file (dequantized by transformers' GGUF loader) into an HF safetensors checkpoint"


def add_arguments(parser) -> None:
    parser.add_argument("gguf", metavar="FILE", help="the .gguf file")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output checkpoint directory")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="dtype of the imported weights, dequantized from the GGUF's (default fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args) -> dict:
    from ..models import import_gguf
    from ..utils.fs import check_output_dir

    check_output_dir(args.output, args.overwrite, inputs=(args.gguf,))
    out = import_gguf(args.gguf, args.output, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return {"output": str(out), "source": args.gguf}

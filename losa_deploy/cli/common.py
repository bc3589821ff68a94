"""Arguments and helpers shared by several commands."""

from __future__ import annotations

import argparse


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="an HF model directory, a .gguf file, or 'smollm2-135m' (the embedded default)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a checkpoint's own modelling code to run (off unless you pass this)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def show_progress(args) -> bool:
    return not getattr(args, "no_progress", False)


def format_table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(line.format(*[str(x) for x in row]).rstrip() for row in [header, *rows])


def print_table(rows: list[list[str]], header: list[str]) -> None:
    print(format_table(rows, header))

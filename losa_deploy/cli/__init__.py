"""``losa-deploy``: one module per command under ``losa_deploy/cli/``, each thin (parse, call the API, print).

Every command module defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> dict``. The dict is
what ``--json PATH`` writes. A command whose module does not exist yet is listed anyway and says it is not
built (exit 2). User errors (:class:`~losa_deploy.errors.LosaError`) print one ``error: ...`` line on
stderr and exit 2; nothing is written. An OSError (a full disk, a refused write) is one line too, exit 1
(``LOSA_DEBUG=1`` shows its traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from pathlib import Path

from .._version import __version__
from ..errors import LosaError

# (command, module, the issue that builds it) in the order of the pipeline.
COMMANDS = (
    ("env", "env", None),
    ("inspect", "inspect", None),
    ("eval", "eval", None),
    ("import-gguf", "import_gguf", None),
    ("prune", "prune", "the pruning engine (issue #3)"),
    ("finetune", "finetune", "LoSA fine-tuning (issue #4)"),
    ("merge", "merge", "LoSA fine-tuning (issue #4)"),
    ("pack", "pack", "packing for serving (issue #8)"),
    ("bench", "bench", "the throughput harness (issue #9)"),
    ("generate", "generate", None),
    ("demo", "demo", None),
)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error: ...`` line and exit 2, like every other error."""

    def error(self, message):
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def _load(module: str):
    try:
        return importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{module}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="losa-deploy", description="Prune, fine-tune, merge, pack and serve sparse LLMs.")
    parser.add_argument("--version", action="version", version=f"losa-deploy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, module_name, pending in COMMANDS:
        module = _load(module_name)
        if module is None:
            p = sub.add_parser(name, help=f"(not built yet: {pending})", add_help=True)
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            p.set_defaults(run=_pending(name, pending))
        else:
            p = sub.add_parser(name, help=module.HELP, description=module.HELP)
            module.add_arguments(p)
            p.set_defaults(run=module.run)
        p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _pending(name: str, pending: str):
    def run(args):
        raise LosaError(f"`{name}` is not built yet (it comes with {pending})")

    return run


class _Terminated(BaseException):
    """SIGTERM, raised as an exception so that every ``atomic_dir`` removes its temporary directory (the
    default action would kill the process and leave a half-written ``.OUT.tmp-*`` behind)."""


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Only where SIGTERM would kill us outright: an inherited SIG_IGN, or a caller's own handler, stays.
    ours = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    if ours:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(args)
    finally:
        if ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _main(args) -> int:
    try:
        _check_output_files(args)
        _quiet_libraries()
        result = args.run(args)
        if args.json and result is not None:  # None: a worker process of a multi-process run
            from ..utils.fs import write_json

            write_json(args.json, {"command": args.command, **(result or {})})
    except LosaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("error: terminated", file=sys.stderr)
        return 143
    except OSError as exc:  # the system refused a read or write (disk full, permissions): not our bug
        if os.environ.get("LOSA_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


_WRITTEN = ("output", "out", "json", "plot")  # the arguments that name what a command writes


def _check_output_files(args) -> None:
    """--json and --plot are written last: check them before any work, that neither is OUT nor the other,
    that neither replaces anything the command reads (see ``check_output_file``), and the plot's suffix."""
    from ..utils.fs import check_output_file
    from ..utils.plots import check_plot_file

    output = getattr(args, "output", None)
    inputs = _input_paths(args)
    json_path, plot = getattr(args, "json", None), getattr(args, "plot", None)
    if json_path and plot and Path(json_path).resolve() == Path(plot).resolve():
        raise LosaError(f"--json and --plot both name {plot}; choose two files")
    for flag in ("json", "plot"):
        path = getattr(args, flag, None)
        if path is None:
            continue
        if flag == "plot":
            check_plot_file(path, inputs=inputs)
        else:
            check_output_file(path, f"--{flag}", inputs=inputs)
        if output is not None and Path(path).resolve() == Path(output).resolve():
            raise LosaError(f"--{flag} {path} is the output directory; choose another path")


def _input_paths(args) -> tuple[Path, ...]:
    """Every argument value that names an existing path, apart from the outputs: what the command reads."""
    values = [v for name, value in vars(args).items() if name not in _WRITTEN
              for v in (value if isinstance(value, list) else [value]) if isinstance(v, (str, Path)) and v]
    paths = []
    for value in values:
        try:
            if Path(value).exists():
                paths.append(Path(value))
        except OSError:  # a value too long to be a path (ENAMETOOLONG) is not one
            continue
    return tuple(paths)


def _quiet_libraries() -> None:
    # transformers' own "Loading weights" bars and advisory warnings drown our output.
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


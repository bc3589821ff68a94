"""Writes that lose nothing: everything goes to a temporary sibling path, renamed into place at the end.

A crash, a Ctrl-C or a bad input half-way through leaves the destination as it was (absent, or the old
version) and removes the temporary path.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import LosaError


def check_output_dir(path: str | os.PathLike, overwrite: bool = False,
                     inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Validate an output directory before any work starts, so bad input fails fast. ``inputs``: the
    directories the command reads, which the output must neither be nor contain (replacing it would
    delete them)."""
    path = Path(path)
    for source in inputs:
        if not Path(source).exists():  # a model alias, say: nothing on disk to lose
            continue
        source = Path(source).resolve()
        if source == path.resolve() or path.resolve() in source.parents:
            raise LosaError(f"output {path} {'is' if source == path.resolve() else 'contains'} the input "
                            f"{source}; choose another directory")
    if path.exists() and not overwrite:
        raise LosaError(f"output {path} already exists (pass --overwrite to replace it)")
    if path.exists() and not path.is_dir():
        raise LosaError(f"output {path} exists and is not a directory")
    _check_parent(path, f"output {path}")
    return path


def check_output_file(path: str | os.PathLike, what: str, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Validate a file to be written at the end (``--json``, ``--plot``) before any work starts. It may not
    replace one of ``inputs`` (files and directories the command reads), nor a model's own file inside one
    (weights, config, tokenizer, sidecar); an existing file is replaced only if it is a report of ours (a
    re-run rewrites its report; a data file given by mistake is kept)."""
    path = Path(path)
    if path.is_dir():
        raise LosaError(f"{what} {path} is a directory")
    # Both spellings: a weight symlinked into a model folder (the HF cache's layout) resolves elsewhere.
    targets = {path.absolute(), path.resolve()} if path.exists() else set()
    for source in inputs:
        sources = {Path(source).absolute(), Path(source).resolve()}
        if targets & sources:
            raise LosaError(f"{what} {path} would replace the input {source}; choose another path")
        if _is_model_file(path) and any(s in t.parents for s in sources for t in targets):
            raise LosaError(f"{what} {path} would replace a file of the input {source}; choose another path")
    if path.exists() and not _is_report(path):
        raise LosaError(f"{what} {path} exists and is not a losa-deploy report (JSON with a 'command', or an "
                        "image); remove it or choose another path")
    _check_parent(path, f"{what} {path}")
    return path


_MAX_REPORT_BYTES = 64 << 20  # a bench report is kilobytes; a larger file is data, not to be parsed here
_IMAGE_MAGIC = (b"\x89PNG", b"%PDF", b"<?xml", b"<svg")


def _is_report(path: Path) -> bool:
    """Whether an existing file is one of our reports: the CLI's JSON (it always holds ``command``) or an
    image (a plot)."""
    try:
        if path.stat().st_size > _MAX_REPORT_BYTES:
            return False
        with open(path, "rb") as handle:
            head = handle.read(8)
            if head.startswith(_IMAGE_MAGIC):
                return True
            if not head.lstrip().startswith(b"{"):
                return False
            handle.seek(0)
            return "command" in json.load(handle)
    except (OSError, ValueError):
        return False


_MODEL_SUFFIXES = (".safetensors", ".bin", ".gguf", ".onnx", ".data", ".model", ".pt", ".pth", ".py")


def _is_model_file(path: Path) -> bool:
    """Whether a file in a model folder is part of the model (what loaders read), not a report."""
    from ..models.checkpoint import TOKENIZER_FILES
    from ..sparsity.sidecar import SIDECAR

    names = {*TOKENIZER_FILES, "config.json", "generation_config.json", SIDECAR, "adapter_config.json",
             "losa_adapter.json", "added_tokens.json"}
    return path.suffix in _MODEL_SUFFIXES or path.name in names or path.name.endswith(".index.json")


def _check_parent(path: Path, what: str) -> None:
    parent = path.resolve().parent
    if not parent.is_dir():
        raise LosaError(f"parent directory {parent} of {what} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LosaError(f"cannot write {what}: directory {parent} is not writable")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block completes."""
    path = check_output_dir(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.resolve().parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _ordinary_modes(tmp)
    if path.exists():
        # Move the old version aside first so that a failed rename can be undone.
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.resolve().parent))
        os.rename(path, old / "x")
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary file beside ``path``; it replaces ``path`` when the block completes."""
    path = Path(path)
    parent = path.resolve().parent
    _check_parent(path, str(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _ordinary_modes(root: Path) -> None:
    """safetensors writes its files private (0600); the outputs are ordinary files, readable per the umask."""
    mode = 0o666 & ~_umask()
    for file in root.rglob("*"):
        if file.is_file() and not file.is_symlink() and file.stat().st_mode & 0o777 == 0o600:
            os.chmod(file, mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_file(path) as handle:
        handle.write(json_text(obj))


def json_text(obj) -> str:
    """``obj`` as indented strict JSON (NaN and infinities as null; numpy scalars, tensors and paths as
    plain values), for files written inside an ``atomic_dir``."""
    return json.dumps(_finite(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n"


def _finite(obj):
    """NaN and infinities as null: JSON has no such numbers, and strict readers reject Python's NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj):
    # numpy scalars, paths and tensors of one element show up in results; make them plain JSON.
    if hasattr(obj, "item"):
        return _finite(obj.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)  # a dtype, say: a results file must not fail after the work it reports

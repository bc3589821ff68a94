"""Writes that lose nothing: everything goes to a temporary sibling path, renamed into place at the end.

A crash, a Ctrl-C or a bad input half-way through leaves the destination as it was (absent, or the old
version) and removes the temporary path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import LosaError


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Validate an output directory before any work starts, so bad input fails fast."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise LosaError(f"output {path} already exists (pass --overwrite to replace it)")
    if path.exists() and not path.is_dir():
        raise LosaError(f"output {path} exists and is not a directory")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise LosaError(f"parent directory {parent} of output {path} does not exist")
    return path


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
    if not parent.is_dir():
        raise LosaError(f"parent directory {parent} of {path} does not exist")
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_file(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")


def _json_default(obj):
    # numpy scalars, paths and tensors of one element show up in results; make them plain JSON.
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

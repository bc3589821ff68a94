"""Stream a packed checkpoint (``pack --format losa|vllm``) as plain tensors and whole packed modules.

A packed module is stored as several tensors (``<p>.lb_*`` or ``<p>.nm_*``) that may lie far apart in a
file, or in different shards. :func:`iter_packed` learns from the headers which tensors make up each
module, and hands the module over, read, as soon as its last tensor has streamed by: a reader holds one
module's tensors at a time, not the whole model's (tensors are read into memory of their own, not viewed
through the mapped file, whose pages would stay resident).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import LosaError
from ..kernels.formats import read_packed
from ..models.checkpoint import stored_shapes
from ..models.tensors import iter_tensors
from .sparse_linear import PACKED_KEYS


def iter_packed(path: str | os.PathLike, modules: Mapping[str, str], plain: bool = True) -> Iterator[tuple[str, object]]:
    """Yield, in file order, ``(key, tensor)`` for each plain tensor (a packed module's ``bias`` is one) and
    ``(module, packed weight)`` for each module of ``modules`` (name -> ``"bitmask"`` or ``"nm"``, the
    packing block's table), read by :func:`read_packed` once its last tensor has gone by. ``plain=False``
    skips reading the plain tensors.

    Raises :class:`LosaError`, before any tensor is read, for a module with no packed tensors or with a
    tensor its format does not have."""
    path = Path(path)
    expected = _module_keys(path, modules)
    module_of = {key: module for module, keys in expected.items() for key in keys}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    # Read, not viewed through the mapped file: a view would keep every packed tensor's pages resident for
    # as long as the model keeps any plain tensor of the file, i.e. for good.
    for key, tensor in iter_tensors(path, lambda k: plain or k in module_of, mmap=False):
        module = module_of.get(key)
        if module is None:
            yield key, tensor
            continue
        parts.setdefault(module, {})[key] = tensor
        if len(parts[module]) == len(expected[module]):
            # Yielded without a local name, so this generator keeps no reference to the module while the
            # next one streams in.
            yield module, _read(path, modules[module], parts.pop(module), module)


def _module_keys(path: Path, modules: Mapping[str, str]) -> dict[str, set[str]]:
    """Each packed module's stored tensors (its bias aside), from the headers, checked."""
    found: dict[str, set[str]] = {}
    for key in stored_shapes(path):
        module, _, leaf = key.rpartition(".")
        if module in modules and leaf != "bias":
            found.setdefault(module, set()).add(key)
    for name, fmt in modules.items():
        if name not in found:
            raise LosaError(f"{path} has no packed tensors for {name}")
        allowed = PACKED_KEYS.get(fmt)  # (an unknown format is read_packed's to name)
        foreign = sorted(key for key in found[name] if allowed and key.rpartition(".")[2] not in allowed)
        if foreign:  # e.g. a dense <p>.weight beside the packed one: which is meant?
            raise LosaError(f"{path}: {name} is packed ({fmt}) but also stores {foreign[0]}")
    return found


def _read(path: Path, fmt: str, state: dict[str, torch.Tensor], module: str):
    try:
        return read_packed(fmt, state, prefix=module)  # a missing or malformed tensor is the format's to name
    except LosaError as exc:
        raise LosaError(f"{path}: {exc}") from None

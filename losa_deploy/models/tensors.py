"""Stream a checkpoint's tensors one at a time (memory of one tensor, not the model)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..errors import LosaError
from .arch import Architecture
from .checkpoint import (
    SAFETENSORS_DTYPES,
    _safetensors_header,
    check_safetensors,
    stored_shapes,
    weight_files,
)


def iter_tensors(path: str | os.PathLike, keep: Callable[[str], bool] = lambda key: True, mmap: bool = True
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` for every stored tensor whose key passes ``keep``.

    A safetensors tensor is a view of the mapped file, which stays mapped, every page read through it
    resident, while any tensor of the file lives (a model holding one plain tensor keeps them all).
    ``mmap=False`` reads each one into memory of its own instead, so a tensor let go is memory given back."""
    for file in weight_files(Path(path)):
        if file.suffix == ".safetensors" and not mmap:
            yield from _read_safetensors(file, keep)
        elif file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    if keep(key):
                        yield key, handle.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for key, tensor in state.items():
                if keep(key):
                    yield key, tensor


def _read_safetensors(file: Path, keep: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one safetensors file, in safe_open's (sorted) key order, each read into a new tensor."""
    check_safetensors(file)  # a header that contradicts itself, or a file shorter than it says, named as such
    header_len, entries = _safetensors_header(file)
    with open(file, "rb") as raw:
        for key in sorted(entries):
            if not keep(key):
                continue
            entry = entries[key]
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise LosaError(f"{file}: {key} is stored as {entry['dtype']}, which losa-deploy does not read")
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
            raw.seek(8 + header_len + begin)
            if raw.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise LosaError(f"{file} is truncated: {key} ends past the end of the file")
            yield key, tensor


def iter_model_tensors(path: str | os.PathLike, arch: Architecture, keep: Callable[[str], bool] = lambda key: True,
                       mmap: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`iter_tensors` under the model's own key names (``model.decoder.layers...`` whatever the file
    calls them: :meth:`Architecture.model_keys`), so the architecture's module names find the stored
    weights. ``mmap`` as there: False where each tensor is looked at once and let go."""
    model_key = arch.model_keys(stored_shapes(path))
    for key, tensor in iter_tensors(path, lambda k: keep(model_key(k)), mmap=mmap):
        yield model_key(key), tensor

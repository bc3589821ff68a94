"""Stream a checkpoint's tensors one at a time (memory of one tensor, not the model)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .arch import Architecture
from .checkpoint import stored_shapes, weight_files


def iter_tensors(path: str | os.PathLike, keep: Callable[[str], bool] = lambda key: True
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` for every stored tensor whose key passes ``keep``."""
    for file in weight_files(Path(path)):
        if file.suffix == ".safetensors":
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


def iter_model_tensors(path: str | os.PathLike, arch: Architecture, keep: Callable[[str], bool] = lambda key: True
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`iter_tensors` under the model's own key names (``model.decoder.layers...`` whatever the file
    calls them: :meth:`Architecture.model_keys`), so the architecture's module names find the stored
    weights."""
    model_key = arch.model_keys(stored_shapes(path))
    for key, tensor in iter_tensors(path, lambda k: keep(model_key(k))):
        yield model_key(key), tensor

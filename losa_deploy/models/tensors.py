"""Stream a checkpoint's tensors one at a time (memory of one tensor, not the model)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .checkpoint import weight_files


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

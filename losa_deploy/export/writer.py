"""Write safetensors one tensor at a time, so packing a model holds one tensor in memory, not the model.

``safetensors.torch.save_file`` needs every tensor at once. A safetensors file is an 8-byte little-endian
header length, a JSON header (dtype, shape and byte range of every tensor) and the raw bytes. We append
each tensor's bytes to a spool file as it arrives, and when a shard is complete write the header followed
by the spooled bytes. Shards follow the Hugging Face layout: ``model.safetensors`` when one file is
enough, else ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..models.checkpoint import SAFETENSORS_DTYPES

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_ALIGN = 8  # header padded with spaces so the data starts 8-byte aligned (what safetensors writes)
DEFAULT_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


class SafetensorsWriter:
    """Collect tensors into (sharded) safetensors files in ``directory``.

    Use it as a context manager (or call :meth:`close`); the files get their final names only then.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str = "model",
                 max_shard_bytes: int | None = None, metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_shard_bytes = max_shard_bytes or DEFAULT_SHARD_BYTES
        self.metadata = {"format": "pt", **(metadata or {})}
        self.total_bytes = 0
        self._shards: list[tuple[Path, dict]] = []  # (finished file, header) per shard
        self._keys: set[str] = set()
        self.files: list[Path] = []  # the finished files, after close()
        self._open_shard()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._spool.close()  # the caller's atomic_dir removes the half-written files

    def _open_shard(self) -> None:
        self._spool_path = self.directory / f".{self.prefix}-{len(self._shards):05d}.spool"
        self._spool = open(self._spool_path, "wb")
        self._header: dict[str, dict] = {}
        self._offset = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._keys:
            raise ValueError(f"tensor {key} written twice")
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"safetensors cannot store {tensor.dtype} ({key})")
        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        if self._header and self._offset + data.nbytes > self.max_shard_bytes:
            self._finish_shard()
            self._open_shard()
        self._spool.write(memoryview(data))
        self._header[key] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [self._offset, self._offset + data.nbytes]}
        self._offset += data.nbytes
        self.total_bytes += data.nbytes
        self._keys.add(key)

    def _finish_shard(self) -> None:
        self._spool.close()
        header = json.dumps({"__metadata__": self.metadata, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % _ALIGN)
        path = self.directory / f".{self.prefix}-{len(self._shards):05d}.safetensors"
        with open(path, "wb") as out, open(self._spool_path, "rb") as spool:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(spool, out, 2**22)
        self._spool_path.unlink()
        self._shards.append((path, self._header))

    def close(self) -> list[Path]:
        """Finish the last shard, give the shards their final names, write the index if sharded."""
        self._finish_shard()
        count = len(self._shards)
        files = []
        for i, (path, _) in enumerate(self._shards):
            name = f"{self.prefix}.safetensors" if count == 1 else \
                f"{self.prefix}-{i + 1:05d}-of-{count:05d}.safetensors"
            files.append(path.rename(self.directory / name))
        self.files = files
        if count > 1:
            weight_map = {key: file.name for file, (_, header) in zip(files, self._shards) for key in header}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return files

"""The small interface every output format implements (one module per format, like vLLM's quantization
methods): write the weights, then adjust config.json. Everything else a packed directory holds (the
sidecar, tokenizer files, generation config) is written once, by :func:`losa_deploy.export.pack_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LosaError
from ..models.checkpoint import parse_dtype
from .source import PackSource


class Exporter:
    """One output format."""

    name: str = ""
    description: str = ""
    dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16")  # the --dtype values it accepts
    default_dtype: str | None = None  # None: keep each tensor's stored dtype

    def resolve_dtype(self, dtype: str | None) -> torch.dtype | None:
        dtype = dtype or self.default_dtype
        if dtype is None:
            return None
        torch_dtype = parse_dtype(dtype)
        if torch_dtype not in {parse_dtype(d) for d in self.dtypes}:
            raise LosaError(f"format {self.name} cannot be written in {dtype} (it takes {', '.join(self.dtypes)})")
        return torch_dtype

    def write_weights(self, source: PackSource, out: Path) -> list[Path]:
        """Stream the source's tensors into ``out``; return the files written."""
        raise NotImplementedError

    def edit_config(self, config: dict, sidecar: dict, out: Path) -> dict:
        """config.json of the output (``config`` already carries the output dtype; ``out`` holds the
        written weights)."""
        return config

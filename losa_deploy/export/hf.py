"""``hf``: a plain Hugging Face checkpoint, safetensors with exact zeros, plus ``losa_sparsity.json``.

No ``quantization_config`` and no ``sparsity_config``: it loads in transformers, every vLLM release, TGI,
SGLang and converters alike (engines-and-formats.md §4.1).
"""

from __future__ import annotations

from pathlib import Path

from .base import Exporter
from .source import PackSource
from .writer import SafetensorsWriter


class HFExporter(Exporter):
    name = "hf"
    description = "plain HF safetensors with exact zeros and the losa_sparsity.json sidecar"

    def write_weights(self, source: PackSource, out: Path) -> list[Path]:
        with SafetensorsWriter(out) as writer:
            for key, tensor in source.tensors():
                writer.add(key, tensor)
        return writer.files

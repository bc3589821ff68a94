"""``losa``: our compressed checkpoint. Every prunable linear is stored packed, the rest as in ``hf``.

Each ``<p>.weight`` of a prunable linear becomes the tensors of one packed format
(:mod:`losa_deploy.kernels.formats`): ``<p>.nm_*`` (:class:`NMWeight`) when the weight is N:M or mixed
N:M, else ``<p>.lb_*`` (:class:`BitmaskWeight`, losa-bitmask v1). A dense layer is packed as a bitmask too
(every bit set), so every target reads the same way; packing a dense model warns. Biases, norms and
embeddings are written unchanged.

config.json gets a ``losa_sparse`` block naming the format of every packed module;
:func:`losa_deploy.load` reads it. The ``vllm`` format writes the same block as ``quantization_config``.
"""

from __future__ import annotations

from pathlib import Path

from ..kernels.formats.bitmask import BitmaskWeight
from ..kernels.formats.nm import NMWeight
from .base import Exporter
from .source import PackSource
from .writer import SafetensorsWriter

CONFIG_KEY = "losa_sparse"
FORMAT = "losa-bitmask"
FORMAT_VERSION = 1
# The packed format each sidecar pattern is stored in.
PACKING = {"nm": "nm", "mixed_nm": "nm", "unstructured": "bitmask", "dense": "bitmask"}


class LosaExporter(Exporter):
    name = "losa"
    description = "our compressed checkpoint (bitmask / N:M packed safetensors) for losa_deploy.load"

    def write_weights(self, source: PackSource, out: Path) -> list[Path]:
        with SafetensorsWriter(out) as writer:
            for key, tensor in source.tensors():
                name = source.module_name(key)
                if name is None:
                    writer.add(key, tensor)
                    continue
                packed = pack_weight(tensor, source.sidecar.patterns[name].kind)
                for packed_key, packed_tensor in packed.state_dict(name).items():
                    writer.add(packed_key, packed_tensor)
        return writer.files

    def edit_config(self, config: dict, sidecar: dict) -> dict:
        return {**config, CONFIG_KEY: packing_config(sidecar)}


def pack_weight(weight, pattern_kind: str) -> BitmaskWeight | NMWeight:
    """The packed form of one prunable weight, chosen from its sparsity pattern."""
    if PACKING[pattern_kind] == "nm":
        return NMWeight.from_dense(weight)
    return BitmaskWeight.from_dense(weight)


def packing_config(sidecar: dict) -> dict:
    """The config.json block that says which packed format each target module is stored in (no
    ``producer`` key: vLLM reads ``quantization_config.producer`` as a ModelOpt-style dict)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "modules": {name: PACKING[entry["pattern"]] for name, entry in sorted(sidecar["modules"].items())},
    }

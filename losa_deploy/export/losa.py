"""``losa``: our compressed checkpoint. Every prunable linear is stored packed, the rest as in ``hf``.

Each ``<p>.weight`` of a prunable linear becomes the tensors of one packed format, chosen by
:func:`losa_deploy.runtime.sparse_linear.pack_weight` (the runtime's own rule): ``<p>.nm_*``
(:class:`~losa_deploy.kernels.formats.nm.NMWeight`) for N:M and mixed N:M weights, else ``<p>.lb_*``
(:class:`~losa_deploy.kernels.formats.bitmask.BitmaskWeight`, losa-bitmask v1). A dense layer is packed
as a bitmask too (every bit set), so every target reads the same way; packing a dense model warns.
Biases, norms and embeddings are written unchanged.

config.json gets a ``losa_sparse`` block naming the format of every packed module, read back from the
written files, and the ``mask_sha256`` of each from the sidecar; :func:`losa_deploy.load` reads it. The
``vllm`` format writes the same block as ``quantization_config``, where the hashes let the plugin check
each zero pattern it loads (vLLM hands a quantization method only this block, not the sidecar file).
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from ..errors import LosaError
from ..runtime.sparse_linear import pack_weight
from .base import Exporter
from .source import PackSource
from .writer import SafetensorsWriter

CONFIG_KEY = "losa_sparse"
FORMAT = "losa-bitmask"
FORMAT_VERSION = 1
# The tensor that marks a module's packed format in the checkpoint.
_MARKERS = {"lb_values": "bitmask", "nm_values": "nm"}
PACKED_FORMATS = tuple(_MARKERS.values())


class LosaExporter(Exporter):
    name = "losa"
    description = "our compressed checkpoint (bitmask / N:M packed safetensors) for losa_deploy.load"

    def write_weights(self, source: PackSource, out: Path) -> list[Path]:
        with SafetensorsWriter(out) as writer:
            for key, tensor in source.tensors():
                name = source.module_name(key)
                tensors = ({key: tensor} if name is None
                           else pack_weight(tensor, pattern=source.sidecar.patterns[name]).state_dict(name))
                for packed_key, packed_tensor in tensors.items():
                    writer.add(packed_key, packed_tensor)
        return writer.files

    def edit_config(self, config: dict, sidecar: dict, out: Path) -> dict:
        return {**config, CONFIG_KEY: packing_config(out, sidecar)}


def packing_config(out: Path, sidecar: dict) -> dict:
    """The config.json block naming the packed format of each module, read from the written headers, and
    its zero pattern's hash from the sidecar (no ``producer`` key: vLLM reads
    ``quantization_config.producer`` as a ModelOpt-style dict)."""
    modules = {}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                module, _, leaf = key.rpartition(".")
                if leaf in _MARKERS:
                    modules[module] = _MARKERS[leaf]
    hashes = {name: sidecar["modules"][name]["mask_sha256"] for name in sorted(modules)
              if name in sidecar["modules"]}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "modules": dict(sorted(modules.items())),
            "mask_sha256": hashes}


def check_packing_block(block: dict, where: str) -> dict[str, str]:
    """The module -> packed format table of a ``losa_sparse`` block, checked: this format and version, a
    table, known formats. ``where`` starts the message (the checkpoint, or the vLLM plugin's name)."""
    if block.get("format") != FORMAT or block.get("format_version") != FORMAT_VERSION:
        raise LosaError(f"{where}: packed format {block.get('format')} v{block.get('format_version')} is not "
                        f"{FORMAT} v{FORMAT_VERSION}")
    modules = block.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise LosaError(f"{where}: the losa_sparse block has no 'modules' (packed module -> format)")
    unknown = sorted(set(modules.values()) - set(PACKED_FORMATS))
    if unknown:
        raise LosaError(f"{where}: unknown packed format(s) {unknown} in the losa_sparse modules (known: "
                        f"{', '.join(PACKED_FORMATS)})")
    return modules


def packing_hashes(block: dict, where: str) -> dict[str, str]:
    """The optional module -> ``mask_sha256`` table of a checked ``losa_sparse`` block (older packings
    have none: their patterns are not checked)."""
    hashes = block.get("mask_sha256", {})
    if not isinstance(hashes, dict) or not all(isinstance(h, str) for h in hashes.values()):
        raise LosaError(f"{where}: the losa_sparse 'mask_sha256' must map each packed module to its hash")
    return hashes

"""Packing for serving: one module per output format behind :class:`~.base.Exporter`.

=============  ==============================================================================
format         what it writes
=============  ==============================================================================
``hf``         plain HF safetensors with exact zeros + ``losa_sparsity.json`` (loads anywhere)
``nm-vllm``    ``hf`` + the top-level ``sparsity_config`` hint nm-vllm read
``losa``       the ``losa-bitmask`` compressed checkpoint; :func:`losa_deploy.load` serves it
``vllm``       ``losa`` + ``quantization_config.quant_method = "losa_sparse"`` for our vLLM plugin
``deepsparse`` ``model.onnx`` with KV-cache inputs/outputs (fp32, exact zeros) + config + tokenizer
=============  ==============================================================================

Every format streams: tensors are read, converted and written one at a time (the ONNX export is the
exception: tracing needs the module, so it holds the model once). The output is built in a temporary
directory renamed into place at the end; an existing output is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil

from ..errors import LosaError
from ..models.checkpoint import TOKENIZER_FILES
from ..models.zoo import resolve_model
from ..sparsity.sidecar import write_sidecar
from ..utils.fs import atomic_dir, check_output_dir
from .base import Exporter
from .deepsparse import DeepSparseExporter
from .hf import HFExporter
from .losa import LosaExporter
from .nm_vllm import NMVLLMExporter
from .source import PackSource
from .vllm import VLLMExporter

FORMATS: dict[str, Exporter] = {e.name: e for e in (HFExporter(), NMVLLMExporter(), LosaExporter(),
                                                      VLLMExporter(), DeepSparseExporter())}
# Written beside the weights when the source has them.
_SIDE_FILES = (*TOKENIZER_FILES, "generation_config.json")


def get_exporter(name: str) -> Exporter:
    try:
        return FORMATS[name]
    except KeyError:
        raise LosaError(f"unknown format '{name}' (choose from {', '.join(FORMATS)})") from None


def pack_checkpoint(model: str | os.PathLike, out: str | os.PathLike, format: str = "hf",
                    dtype: str | None = None, overwrite: bool = False, trust_remote_code: bool = False,
                    progress: bool = True) -> dict:
    """Pack ``model`` into ``out`` in ``format``; returns what was written (files, sizes, sparsity)."""
    exporter = get_exporter(format)
    torch_dtype = exporter.resolve_dtype(dtype)
    out = check_output_dir(out, overwrite)
    source = PackSource.open(resolve_model(model), torch_dtype, trust_remote_code, progress)
    check_output_dir(out, overwrite, inputs=(source.path, model))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        weight_files = exporter.write_weights(source, tmp)
        sidecar = source.output_sidecar()
        write_sidecar(tmp, sidecar)
        config = exporter.edit_config(_plain_config(source), sidecar, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in _SIDE_FILES:
            if (source.path / name).is_file() and not (tmp / name).exists():  # an exporter may adapt one
                shutil.copyfile(source.path / name, tmp / name)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    source.warn_if_dense(sidecar)
    weight_bytes = sum(files[p.name] for p in weight_files)
    return {
        "output": str(out),
        "format": format,
        "dtype": source.output_dtype_name,
        "files": files,
        "weight_bytes": weight_bytes,
        "pattern": sidecar["pattern"],
        "global_sparsity": sidecar["global_sparsity"],
        **source.stats,
        "warnings": source.warnings,
    }


# What the input's config.json may say about how its weights are stored, which the output's does not hold:
# every exporter writes plain floats or says itself how it packs them.
_STORAGE_KEYS = ("quantization_config", "sparsity_config", "compression_config", "losa_sparse")


def _plain_config(source: PackSource) -> dict:
    """The input's config without storage hints, in the output dtype (``torch_dtype`` too where present:
    transformers 4 reads only that one, and a stale one loads bf16 weights as fp32)."""
    config = {k: v for k, v in source.config.items() if k not in _STORAGE_KEYS}
    config["dtype"] = source.output_dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = config["dtype"]
    return config


__all__ = ["FORMATS", "Exporter", "PackSource", "get_exporter", "pack_checkpoint"]

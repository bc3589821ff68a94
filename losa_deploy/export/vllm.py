"""``vllm``: the ``losa`` checkpoint with ``quantization_config.quant_method = "losa_sparse"``.

vLLM reads the quantization method from config.json and, with ``losa-deploy[vllm]`` installed, finds it
in our plugin (:mod:`losa_deploy.engines.vllm`, registered through the ``vllm.general_plugins`` entry
point), so ``vllm serve OUT`` and ``vllm.LLM(OUT)`` need no extra flags. The block carries the same
per-module packing map and zero-pattern hashes as the ``losa`` format; the plugin checks each loaded
pattern against its hash (``LOSA_VERIFY=0`` skips that).
"""

from __future__ import annotations

from pathlib import Path

from ..engines.vllm_plugin import QUANT_METHOD
from .losa import LosaExporter, packing_config


class VLLMExporter(LosaExporter):
    name = "vllm"
    description = "the losa checkpoint + quantization_config for our vLLM plugin (quant_method losa_sparse)"

    def edit_config(self, config: dict, sidecar: dict, out: Path) -> dict:
        return {**config, "quantization_config": {"quant_method": QUANT_METHOD, **packing_config(out, sidecar)}}

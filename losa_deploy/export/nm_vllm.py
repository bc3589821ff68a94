"""``nm-vllm``: the ``hf`` output plus the sparsity hint Neural Magic's vLLM fork read from config.json.

nm-vllm (archived 2024-10; its sparse kernels come from ``nm-magic-wand`` 0.2.x, CUDA SM >= 80) looks for
a top-level ``sparsity_config`` in config.json, the SparseML-era compressed-tensors ``CompressionConfig``
with exactly the fields ``format``, ``global_sparsity`` and ``sparsity_structure``. It maps
``"unstructured"`` to its ``sparse_w16a16`` kernels and ``"2:4"`` to ``semi_structured_sparse_w16a16``,
for fp16/bf16 models only (fp32 runs dense). Any other field makes it refuse the config, so we write
those three and nothing else. Being top-level (not under ``quantization_config``), the hint is an unknown
attribute to transformers and stock vLLM, so the checkpoint still loads everywhere the ``hf`` one does.
"""

from __future__ import annotations

from pathlib import Path

from .hf import HFExporter


class NMVLLMExporter(HFExporter):
    name = "nm-vllm"
    description = "the hf output plus the top-level sparsity_config hint nm-vllm reads"

    def edit_config(self, config: dict, sidecar: dict, out: Path) -> dict:
        config = {**config, "sparsity_config": sparsity_hint(sidecar)}
        # nm-vllm pins transformers 4.x, which reads the dtype from `torch_dtype`.
        config["torch_dtype"] = config["dtype"]
        return config


def sparsity_hint(sidecar: dict) -> dict:
    """The ``sparsity_config`` nm-vllm understands, from the sidecar of the written weights."""
    nm = {(e["nm"]["n"], e["nm"]["m"]) for e in sidecar["modules"].values() if e["nm"]}
    two_four = sidecar["pattern"] == "nm" and nm == {(2, 4)}
    return {
        "format": "dense",
        "global_sparsity": sidecar["global_sparsity"],
        "sparsity_structure": "2:4" if two_four else "unstructured",
    }

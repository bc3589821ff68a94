"""``LosaSparseConfig``: which linears of a ``vllm``-format checkpoint are packed, and in which format."""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, QKVParallelLinear, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from ...export.losa import check_packing_block, packing_hashes
from . import QUANT_METHOD


@register_quantization_config(QUANT_METHOD)
class LosaSparseConfig(QuantizationConfig):
    """``modules`` maps each packed checkpoint module (``model.layers.0.self_attn.q_proj``) to ``bitmask`` or
    ``nm``; a vLLM layer fusing several of them (``qkv_proj``) gets one packed weight per part. ``hashes``
    maps modules to the ``mask_sha256`` of their zero patterns, checked as each part loads."""

    def __init__(self, modules: dict[str, str], hashes: dict[str, str] | None = None):
        super().__init__()
        self.modules = modules
        self.hashes = hashes or {}

    def __repr__(self) -> str:
        return f"LosaSparseConfig({len(self.modules)} packed modules)"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # CPU kernels, CUDA kernels where built, a dense fallback elsewhere

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LosaSparseConfig:
        # LosaError is a ValueError, which vLLM reports as a bad config
        return cls(dict(check_packing_block(config, QUANT_METHOD)), dict(packing_hashes(config, QUANT_METHOD)))

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Follow vLLM's renames of checkpoint module paths (e.g. a prefix some models add)."""
        self.modules = _renamed(self.modules, hf_to_vllm_mapper)
        self.hashes = _renamed(self.hashes, hf_to_vllm_mapper)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None
        parts = self.layer_parts(layer, prefix)
        packed = [name in self.modules for _, name in parts]
        if not any(packed):
            return UnquantizedLinearMethod()
        if not all(packed):
            raise ValueError(f"losa_sparse: {prefix} fuses packed and unpacked modules "
                             f"({', '.join(name for _, name in parts)})")
        from .linear_method import LosaSparseLinearMethod

        return LosaSparseLinearMethod([(shard, self.modules[name]) for shard, name in parts],
                                      [(name, self.hashes.get(name)) for _, name in parts])

    def layer_parts(self, layer: LinearBase, prefix: str) -> list[tuple[str | int | None, str]]:
        """(shard id, checkpoint module) of each logical weight a vLLM layer holds, in output order, from
        the model's ``packed_modules_mapping``: ``qkv_proj`` -> (q, q_proj), (k, k_proj), (v, v_proj);
        ``gate_up_proj`` -> (0, gate_proj), (1, up_proj); an unfused layer -> (None, itself)."""
        parent, _, leaf = prefix.rpartition(".")
        fused = self.packed_modules_mapping.get(leaf)
        if not fused:
            return [(None, prefix)]
        shard_ids = ["q", "k", "v"] if isinstance(layer, QKVParallelLinear) else list(range(len(fused)))
        return [(shard, f"{parent}.{name}" if parent else name) for shard, name in zip(shard_ids, fused)]


def _renamed(table: dict[str, str], hf_to_vllm_mapper) -> dict[str, str]:
    return {mapped: value for name, value in table.items()
            if (mapped := hf_to_vllm_mapper.map_name(name)) is not None}

"""The architecture adapter: which modules are the decoder blocks, and which linears each block holds.

Every later stage (pruning, calibration, adapters, packing) asks this module instead of hard-coding
module names, so adding a model family means adding one :class:`Architecture` entry here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from ..errors import LosaError


@dataclass(frozen=True)
class Architecture:
    """Module names of one model family, relative to the ``*ForCausalLM`` root."""

    name: str
    model_types: tuple[str, ...]
    blocks_path: str  # the ModuleList of decoder blocks
    linear_names: tuple[str, ...]  # prunable linears inside one block, in execution order
    embeddings: str
    final_norm: str
    # Adapter groups (Shears' search space): linears that share one elastic rank.
    groups: tuple[tuple[str, ...], ...]

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The prunable linears of one block, by name relative to the block."""
        return {name: block.get_submodule(name) for name in self.linear_names}

    def linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """Every prunable linear of the model, by fully qualified module name."""
        out = {}
        for i, block in enumerate(self.block_list(model)):
            for name, module in self.block_linears(block).items():
                out[f"{self.blocks_path}.{i}.{name}"] = module
        return out

    def locate(self, module_name: str) -> tuple[int, str]:
        """(block index, name inside the block) of a fully qualified linear name."""
        prefix = f"{self.blocks_path}."
        if not module_name.startswith(prefix):
            raise LosaError(f"{module_name} is not inside {self.blocks_path}")
        index, _, rest = module_name[len(prefix):].partition(".")
        return int(index), rest

    def model_keys(self, stored: Iterable[str]) -> Callable[[str], str]:
        """The names a checkpoint's stored keys have in the ``*ForCausalLM`` model. A checkpoint saved from
        the base model (the facebook/opt-* ones: ``decoder.layers.0...``, no ``model.``) is loaded by
        transformers (and vLLM) under the base-model prefix; this renames its keys the same way (identity
        for a checkpoint of the whole causal LM)."""
        prefix = self.blocks_path.split(".", 1)[0] + "."
        if any(key.startswith(prefix) for key in stored):
            return lambda key: key
        # the head is the causal LM's own module, never under the base prefix
        return lambda key: key if key.startswith("lm_head.") else prefix + key

    def weight_key_pattern(self) -> re.Pattern:
        """Matches the checkpoint key of a prunable weight; group 1 is the block index."""
        names = "|".join(re.escape(n) for n in self.linear_names)
        return re.compile(rf"^{re.escape(self.blocks_path)}\.(\d+)\.({names})\.weight$")


_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="llama",
        # Llama layout: GQA attention and a SwiGLU MLP. Mistral, Qwen2/3 differ only in attention
        # details (sliding window, q/k/v bias, q/k norms) that do not change the linear names.
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        blocks_path="model.layers",
        linear_names=_LLAMA_LINEARS,
        embeddings="model.embed_tokens",
        final_norm="model.norm",
        groups=_LLAMA_GROUPS,
    ),
    Architecture(
        name="opt",
        model_types=("opt",),
        blocks_path="model.decoder.layers",
        linear_names=(
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "fc1",
            "fc2",
        ),
        embeddings="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
        groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
)

SUPPORTED_MODEL_TYPES = tuple(t for a in ARCHITECTURES for t in a.model_types)


def architecture_for(model_type: str) -> Architecture:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise LosaError(
        f"unsupported architecture: model_type '{model_type}' "
        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    )


def get_architecture(model_or_config) -> Architecture:
    """The adapter for a model (or its config)."""
    config = getattr(model_or_config, "config", model_or_config)
    return architecture_for(getattr(config, "model_type", "<none>"))


def head_size(config) -> int | None:
    """Attention head size (``config`` is a config object or its dict): ``head_dim`` where the family sets
    it (Qwen3, Mistral variants), else hidden size over heads; None when the config names neither.
    ``engines/onnx_decode.py`` repeats this rule: it runs where losa_deploy cannot be imported."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    heads, hidden = get("num_attention_heads"), get("hidden_size")
    return get("head_dim") or (hidden // heads if heads and hidden else None)


def attention_window(config) -> int | None:
    """The sliding-window length when the model applies one (Mistral; Qwen2 with ``use_sliding_window``),
    else None. Our ONNX export does not apply it: it is exact only up to this many positions."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    window = get("sliding_window")
    use = get("use_sliding_window")
    return window if window and use is not False else None


def context_length(config) -> int:
    """The longest sequence the model was built for (``config`` is a config object or its dict)."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = get(key)
        if isinstance(value, int) and value > 0:
            return value
    raise LosaError(f"cannot tell the context length of model_type '{get('model_type')}'")

"""One decoder step with an explicit KV cache, in the form DeepSparse 1.8's text-generation engine runs.

Inputs and outputs, in the order DeepSparse expects (checked against deepsparse 1.8.0:
``utils/onnx.py::overwrite_onnx_model_inputs_for_kv_cache_models``, ``transformers/utils/helpers.py::
compute_engine_inputs`` and ``transformers/engines/nl_decoder_engine.py``; the engine maps the non-cache
inputs by position, so ``input_ids, attention_mask, positions, causal_mask`` must come first, in this
order):

============================  =======  ===========================================================
name                          dtype    shape
============================  =======  ===========================================================
``input_ids``                 int64    [batch, input_ids_length]
``attention_mask``            int64    [batch, sequence_length]  (1 = a real token; cache slots are
                                       left-padded, so the ones are at the right end)
``positions``                 int64    [batch, input_ids_length]
``causal_mask``               int64    [batch, 1, input_ids_length, sequence_length]
``past_key_values.{i}.key``   float32  [batch, kv_heads, sequence_length - input_ids_length, head_dim]
``past_key_values.{i}.value`` float32  same
``logits`` (output)           float32  [batch, input_ids_length, vocab]
``present.{i}.key/value``     float32  [batch, kv_heads, sequence_length, head_dim]
============================  =======  ===========================================================

The attention is written out here (the rest of each block calls the Hugging Face modules), because the
cache must be a plain tensor input and output rather than a transformers ``Cache`` object. Supported: the
Llama family of :mod:`losa_deploy.models.arch` (llama, mistral, qwen2, qwen3: GQA, q/k/v bias, q/k norms,
any RoPE type the model's own rotary module computes). Sliding-window attention is not applied: the graph
is exact while ``sequence_length`` stays within the window.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.arch import head_size

INPUTS = ("input_ids", "attention_mask", "positions", "causal_mask")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def cache_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(cache input names, cache output names), layer by layer, key before value."""
    inputs = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    outputs = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return inputs, outputs


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class CachedDecoderStep(nn.Module):
    """``forward(input_ids, attention_mask, positions, causal_mask, *past) -> (logits, *present)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.head_dim = head_size(config)
        self.kv_groups = config.num_attention_heads // config.num_key_value_heads
        # RoPE as a table lookup (a Gather, like the token embedding), computed once by the model's own
        # rotary module over every position: DeepSparse 1.8 crashes running Sin/Cos of a runtime input.
        inner = model.model
        positions = torch.arange(config.max_position_embeddings)[None]
        cos, sin = inner.rotary_emb(inner.embed_tokens.weight[:1], positions)
        self.register_buffer("rope_cos", cos[0].float(), persistent=False)
        self.register_buffer("rope_sin", sin[0].float(), persistent=False)

    def forward(self, input_ids, attention_mask, positions, causal_mask, *past):
        inner = self.model.model
        hidden = inner.embed_tokens(input_ids)
        cos = nn.functional.embedding(positions, self.rope_cos).unsqueeze(1)  # [batch, 1, length, head_dim]
        sin = nn.functional.embedding(positions, self.rope_sin).unsqueeze(1)
        # Float arithmetic, not boolean ops: DeepSparse cannot compile comparisons on runtime inputs.
        # A large finite negative, not -inf: a fully masked row (a padded query) must not become NaN.
        allowed = causal_mask.to(hidden.dtype) * attention_mask.to(hidden.dtype)[:, None, None, :]
        bias = (1.0 - allowed) * torch.finfo(hidden.dtype).min
        present = []
        for i, layer in enumerate(inner.layers):
            attn_out, key, value = self._attention(layer.self_attn, layer.input_layernorm(hidden), cos, sin,
                                                   bias, past[2 * i], past[2 * i + 1])
            present += [key, value]
            hidden = hidden + attn_out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = self.model.lm_head(inner.norm(hidden))
        return (logits, *present)

    def _attention(self, attn, x, cos, sin, bias, past_key, past_value):
        batch, length, _ = x.shape
        heads = (batch, length, -1, self.head_dim)
        query, key = attn.q_proj(x).view(heads), attn.k_proj(x).view(heads)
        if hasattr(attn, "q_norm"):  # qwen3 normalises each head before RoPE
            query, key = attn.q_norm(query), attn.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = attn.v_proj(x).view(heads).transpose(1, 2)
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin
        key = torch.cat((past_key, key), dim=2)
        value = torch.cat((past_value, value), dim=2)
        return attn.o_proj(self._grouped_attention(query, key, value, bias, attn.scaling)), key, value

    def _grouped_attention(self, query, key, value, bias, scaling):
        """softmax(q kᵀ · scaling + bias) v, with GQA done by folding each KV head's ``kv_groups`` query heads
        into its rows (query head ``h`` reads KV head ``h // kv_groups``, as transformers' ``repeat_kv``).

        Keys and values are never repeated, so the cache concat feeds the matmuls directly: the pattern
        DeepSparse's internal KV-cache fusion needs (it rejects an expand/reshape in between).
        """
        batch, heads, length, dim = query.shape
        kv_heads, groups = key.shape[1], self.kv_groups
        query = query.reshape(batch, kv_heads, groups * length, dim)
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if groups > 1:
            scores = (scores.reshape(batch, kv_heads, groups, length, -1) + bias[:, :, None]).reshape(
                batch, kv_heads, groups * length, -1)
        else:
            scores = scores + bias
        out = torch.matmul(torch.softmax(scores, dim=-1), value)  # [batch, kv_heads, groups * length, dim]
        return out.reshape(batch, heads, length, dim).transpose(1, 2).reshape(batch, length, heads * dim)

    def example_inputs(self, input_ids_length: int = 4, sequence_length: int = 16) -> tuple[torch.Tensor, ...]:
        """Inputs of the right dtypes and ranks for tracing (the exported dims stay symbolic)."""
        config = self.model.config
        past_length = sequence_length - input_ids_length
        ids = torch.ones(1, input_ids_length, dtype=torch.int64)
        mask = torch.ones(1, sequence_length, dtype=torch.int64)
        positions = torch.arange(past_length, sequence_length, dtype=torch.int64)[None]
        causal = torch.ones(1, 1, input_ids_length, sequence_length, dtype=torch.int64).tril(past_length)
        cache = torch.zeros(1, config.num_key_value_heads, past_length, self.head_dim)
        return (ids, mask, positions, causal, *[cache] * (2 * self.num_layers))

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        past_in, present_out = cache_names(self.num_layers)
        axes = {
            "input_ids": {0: "batch", 1: "input_ids_length"},
            "attention_mask": {0: "batch", 1: "sequence_length"},
            "positions": {0: "batch", 1: "input_ids_length"},
            "causal_mask": {0: "batch", 2: "input_ids_length", 3: "sequence_length"},
            "logits": {0: "batch", 1: "input_ids_length"},
        }
        axes.update({name: {0: "batch", 2: "past_sequence_length"} for name in past_in})
        axes.update({name: {0: "batch", 2: "sequence_length"} for name in present_out})
        return axes

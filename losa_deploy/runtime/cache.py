"""A KV cache that appends in place: transformers' ``DynamicCache`` without the copy of the whole cache per step.

``DynamicLayer.update`` grows the cache with ``torch.cat``, so every decode step copies every cached key
and value of every layer: on the CPU, with 1024 cached positions at batch 8, that copy took 65% of a
7B-shaped sparse model's decode step, six times the attention itself (benchmarks/RESULTS.md, "Decode
attention"). :class:`GrowingCache` keeps each full-attention layer's keys and values in a buffer with
spare positions at the end (a quarter of the length, at least ``SPARE``) and writes new positions into it;
the layer hands attention a view of the filled part. The buffer is copied only when it fills up, or when
something outside (beam reordering, ``batch_select_indices``) swaps in tensors of its own. Sliding-window
layers keep transformers' own, already bounded, layer.

    from losa_deploy.runtime.cache import GrowingCache
    model.generate(ids, past_key_values=GrowingCache(model.config), max_new_tokens=256)

or, once for a model, :func:`use_growing_cache` (``losa_deploy.load`` does it): every ``generate`` call that
would have built a ``DynamicCache`` then builds a :class:`GrowingCache`.
"""

from __future__ import annotations

import functools
import os

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

SPARE = 256  # positions added at least when a buffer grows


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of buffers with room to append in place."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, end = self.get_seq_length(), self.get_seq_length() + key_states.shape[-2]
        if not self._has_room(key_states, end):
            self._grow(key_states, value_states, length, end)
        keys, values = self.buffers
        keys[:, :, length:end] = key_states
        values[:, :, length:end] = value_states
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values

    def _has_room(self, key_states: torch.Tensor, end: int) -> bool:
        """True when the buffers hold the cache as it is (self.keys is still their view) and fit ``end``."""
        if self.buffers is None or self.keys.dim() != 4:
            return False
        keys = self.buffers[0]
        return (self.keys.data_ptr() == keys.data_ptr() and self.keys.stride() == keys.stride()
                and self.values.data_ptr() == self.buffers[1].data_ptr()
                and keys.shape[:2] == key_states.shape[:2] and keys.shape[-1] == key_states.shape[-1]
                and keys.dtype == key_states.dtype and keys.device == key_states.device and end <= keys.shape[2])

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, end: int) -> None:
        capacity = end + max(SPARE, end // 4)
        batch, heads, _, dim = key_states.shape
        keys = key_states.new_empty(batch, heads, capacity, dim)
        values = value_states.new_empty(batch, value_states.shape[1], capacity, value_states.shape[-1])
        if length:
            keys[:, :, :length] = self.keys
            values[:, :, :length] = self.values
        self.buffers = (keys, values)


class GrowingCache(DynamicCache):
    """``DynamicCache`` with :class:`GrowingLayer` for its full-attention layers (see the module docstring)."""

    def __init__(self, config=None, **kwargs):
        super().__init__(config=config, **kwargs)
        self.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        if self.layer_class_to_replicate is DynamicLayer:
            self.layer_class_to_replicate = GrowingLayer


class GrowingCacheGeneration:
    """Mixin for a transformers model class: ``generate`` builds a :class:`GrowingCache` where it would
    build its default ``DynamicCache``. A cache passed in, ``use_cache=False``, and every
    ``cache_implementation`` (static, offloaded, quantized) are left as transformers handles them."""

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        # Only transformers' own default: exactly a DynamicCache it just built (not one the caller passed,
        # which it marks), for a decoder-only model, outside assisted decoding (which records the cache).
        if (type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False)
                and generation_config.cache_implementation in (None, "dynamic")
                and not generation_config.is_assistant and not self.config.is_encoder_decoder):
            model_kwargs["past_key_values"] = GrowingCache(self.config.get_text_config(decoder=True))


@functools.cache
def _with_growing_cache(cls: type) -> type:
    # Same name and module as the model's class, so save_pretrained writes the same "architectures"
    # entry and nothing of this reaches a saved checkpoint.
    return type(cls.__name__, (GrowingCacheGeneration, cls), {"__module__": cls.__module__,
                                                               "__qualname__": cls.__qualname__})


def use_growing_cache(model) -> bool:
    """Make ``model.generate`` use :class:`GrowingCache` by default (see :class:`GrowingCacheGeneration`);
    True if it does. ``LOSA_GROWING_CACHE=0`` leaves transformers' default; models without
    ``generate`` are left alone."""
    if os.environ.get("LOSA_GROWING_CACHE", "1") in ("0", ""):
        return False
    if isinstance(model, GrowingCacheGeneration):
        return True
    if not hasattr(model, "_prepare_cache_for_generation"):
        return False
    model.__class__ = _with_growing_cache(type(model))
    return True


__all__ = ["SPARE", "GrowingCache", "GrowingCacheGeneration", "GrowingLayer", "use_growing_cache"]

"""GrowingCache (runtime/cache.py): the same tokens and bit-identical scores as transformers' DynamicCache
(greedy with padding, sampling-free beam search, a crop and continue), new positions written in place
until the spare room runs out, and sliding-window layers left to transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

import losa_deploy.runtime.cache as cache_module
from losa_deploy.runtime.cache import GrowingCache, GrowingLayer


def _model(model_type: str, rng) -> torch.nn.Module:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    config = tiny_config(model_type)
    if model_type == "mistral":
        config.sliding_window = 7
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mistral"])
def test_greedy_generation_equals_dynamic_cache_bit_for_bit(rng, monkeypatch, model_type):
    monkeypatch.setattr(cache_module, "SPARE", 3)  # the buffers grow several times on the way
    model = _model(model_type, rng)
    ids = torch.randint(1, 96, (3, 9), generator=rng)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    kw = dict(attention_mask=mask, max_new_tokens=25, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        want = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)
        cache = GrowingCache(model.config)
        got = model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        assert torch.equal(a, b)
    kinds = {type(layer) for layer in cache.layers}
    assert kinds == ({DynamicSlidingWindowLayer} if model_type == "mistral" else {GrowingLayer})


def test_beam_search_reorders_and_equals_dynamic_cache(rng):
    model = _model("llama", rng)
    ids = torch.randint(1, 96, (2, 6), generator=rng)
    kw = dict(max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)
        got = model.generate(ids, past_key_values=GrowingCache(model.config), **kw)
    assert torch.equal(got, want)


def test_new_positions_are_written_in_place_until_the_room_runs_out(rng, monkeypatch):
    monkeypatch.setattr(cache_module, "SPARE", 4)
    layer = GrowingLayer()
    keys = [torch.randn(2, 3, n, 5, generator=rng) for n in (6, 1, 1, 1, 1, 2)]
    values = [torch.randn(2, 3, n, 5, generator=rng) for n in (6, 1, 1, 1, 1, 2)]
    buffers = []
    for k, v in zip(keys, values):
        got_k, got_v = layer.update(k, v)
        buffers.append(layer.buffers[0].data_ptr())
        assert torch.equal(got_k, torch.cat(keys[:len(buffers)], -2))
        assert torch.equal(got_v, torch.cat(values[:len(buffers)], -2))
    # 6 positions + max(4, 6 // 4) spare = 10: four single steps fit, the two after them do not.
    assert buffers[:5] == [buffers[0]] * 5 and buffers[5] != buffers[0]
    assert layer.get_seq_length() == 12 and layer.buffers[0].shape[2] == 12 + max(4, 12 // 4)


def test_crop_then_continue_and_swapped_tensors(rng):
    layer = GrowingLayer()
    k, v = torch.randn(1, 2, 8, 4, generator=rng), torch.randn(1, 2, 8, 4, generator=rng)
    layer.update(k, v)
    layer.crop(-3)  # as assisted decoding drops rejected positions
    assert layer.get_seq_length() == 5
    k2, v2 = torch.randn(1, 2, 2, 4, generator=rng), torch.randn(1, 2, 2, 4, generator=rng)
    got_k, _ = layer.update(k2, v2)
    assert torch.equal(got_k, torch.cat([k[:, :, :5], k2], -2))
    layer.batch_repeat_interleave(2)  # a new tensor of its own: adopted into fresh buffers
    k3, v3 = torch.randn(2, 2, 1, 4, generator=rng), torch.randn(2, 2, 1, 4, generator=rng)
    got_k, got_v = layer.update(k3, v3)
    assert torch.equal(got_k, torch.cat([torch.cat([k[:, :, :5], k2], -2).repeat_interleave(2, 0), k3], -2))
    assert got_v.shape == (2, 2, 8, 4)


def _generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=14, do_sample=False, pad_token_id=0, output_scores=True,
                              return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_use_growing_cache_makes_it_generates_default(rng, monkeypatch, model_type):
    monkeypatch.setattr(cache_module, "SPARE", 3)
    model = _model(model_type, rng)
    ids = torch.randint(1, 96, (2, 7), generator=rng)
    want = _generate(model, ids)
    assert type(want.past_key_values) is DynamicCache
    cls = type(model)
    assert cache_module.use_growing_cache(model) and cache_module.use_growing_cache(model)  # idempotent
    # Still the model's class by name and by isinstance: save_pretrained's "architectures" is unchanged.
    assert isinstance(model, cls) and type(model).__name__ == cls.__name__ and type(model).__mro__[2] is cls
    got = _generate(model, ids)
    assert type(got.past_key_values) is GrowingCache
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        assert torch.equal(a, b)


def test_use_growing_cache_leaves_explicit_choices_alone(rng, monkeypatch):
    model = _model("llama", rng)
    ids = torch.randint(1, 96, (1, 5), generator=rng)
    cache_module.use_growing_cache(model)
    mine = DynamicCache(config=model.config)
    assert _generate(model, ids, past_key_values=mine).past_key_values is mine
    static = _generate(model, ids, cache_implementation="static").past_key_values
    assert type(static).__name__ == "StaticCache"
    assert _generate(model, ids, use_cache=False).past_key_values is None
    other = _model("qwen3", rng)
    monkeypatch.setenv("LOSA_GROWING_CACHE", "0")
    assert not cache_module.use_growing_cache(other)
    assert type(_generate(other, ids).past_key_values) is DynamicCache

"""The CPU causal-attention kernel against a float64 reference, its transformers integration (same logits
as SDPA, config restored), every fallback to SDPA, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from losa_deploy.kernels import has_extension, ops
from losa_deploy.kernels.attention import NAME, attention_forward, available, covers, fast_attention

needs_ext = pytest.mark.skipif(not has_extension(), reason="compiled extension not built")
needs_fast = pytest.mark.skipif(not has_extension() or not available(), reason="needs the AVX-512 kernel")


def reference(q, k, v, scale):
    """softmax(scale·QKᵀ + causal)·V in float64, [B, S, H, D]; grouped heads repeated explicitly."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = scale * q.double() @ k.transpose(-1, -2)
    seq = q.shape[2]
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def assert_as_accurate_as_sdpa(got, q, k, v, scale):
    """Within fp32 rounding: the error against float64 is at most 3x that of torch's own fp32 SDPA (plus
    a floor for tiny cases), so larger heads and peaked scores get the tolerance fp32 allows them."""
    want = reference(q, k, v, scale)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                          enable_gqa=True).transpose(1, 2).double()
    err, sdpa_err = (got.double() - want).abs().max().item(), (sdpa - want).abs().max().item()
    assert err <= 3 * sdpa_err + 1e-6, f"error {err:.3g} against float64, SDPA's {sdpa_err:.3g}"


def make_qkv(rng, batch, heads, kv_heads, seq, dim, spread=1.0):
    """q, k, v as transformers hands them over: [B, S, H, D] projections viewed as [B, H, S, D]."""
    q = torch.randn(batch, seq, heads, dim, generator=rng) * spread
    k, v = (torch.randn(batch, seq, kv_heads, dim, generator=rng) for _ in range(2))
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


@needs_ext
@pytest.mark.parametrize("isa", ["default", "avx512"])
@pytest.mark.parametrize("batch,heads,kv_heads,seq,dim", [
    (1, 1, 1, 1, 1), (2, 4, 2, 17, 8), (3, 6, 3, 37, 12), (1, 9, 3, 70, 64), (2, 2, 2, 129, 80)])
def test_kernel_matches_float64_reference(rng, monkeypatch, isa, batch, heads, kv_heads, seq, dim):
    monkeypatch.setenv("LOSA_CPU_ISA", isa)
    q, k, v = make_qkv(rng, batch, heads, kv_heads, seq, dim)
    scale = float(torch.rand(1, generator=rng)) + 0.1
    got = ops().causal_attention(q, k, v, scale)
    assert got.shape == (batch, seq, heads, dim) and got.is_contiguous()
    assert_as_accurate_as_sdpa(got, q, k, v, scale)


@needs_ext
@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.integers(1, 3), seq=st.integers(2, 90),
       dim=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_kernel_on_fuzzed_shapes(batch, kv_heads, group, seq, dim, seed):
    q, k, v = make_qkv(torch.Generator().manual_seed(seed), batch, kv_heads * group, kv_heads, seq, dim)
    got = ops().causal_attention(q, k, v, dim ** -0.5)
    assert_as_accurate_as_sdpa(got, q, k, v, dim ** -0.5)


@needs_ext
def test_peaked_scores_and_contiguous_inputs(rng):
    """Scores spread over hundreds (the exp clamp at -87 is reached) and plain contiguous inputs."""
    q, k, v = (t.contiguous() for t in make_qkv(rng, 2, 4, 4, 50, 16, spread=40.0))
    got = ops().causal_attention(q, k, v, 0.25)
    assert_as_accurate_as_sdpa(got, q, k, v, 0.25)


@needs_fast
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_model_logits_equal_sdpa_and_config_restored(rng, monkeypatch, model_type):
    from transformers import AutoModelForCausalLM

    import losa_deploy.kernels.attention as attention

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="sdpa").eval()
    ids = torch.randint(0, 96, (3, 45), generator=rng)
    calls = []
    kernel = attention.causal_attention
    monkeypatch.setattr(attention, "causal_attention", lambda *args: calls.append(1) or kernel(*args))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with fast_attention(model):
            assert model.config._attn_implementation == NAME
            got = model(input_ids=ids).logits
    assert model.config._attn_implementation == "sdpa"
    assert len(calls) == model.config.num_hidden_layers  # every layer ran the kernel, once
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_fast
def test_padding_mask_and_gradients_fall_back_to_sdpa(rng):
    """A padded batch carries a mask, training needs gradients: both take SDPA's path, same results."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa")
    ids = torch.randint(0, 96, (2, 20), generator=rng)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    with fast_attention(model), torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want)
    loss_ref = model(input_ids=ids).logits.square().mean()
    grads_ref = torch.autograd.grad(loss_ref, list(model.parameters()))
    with fast_attention(model):
        loss = model(input_ids=ids).logits.square().mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, loss_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_covers_only_what_the_kernel_computes():
    q, k, v = (torch.zeros(1, 4, 8, 16) for _ in range(3))
    ok = dict(attention_mask=None, dropout=0.0, is_causal=True, kwargs={})
    assert covers(q, k, v, **ok)
    assert not covers(q, k, v, **{**ok, "attention_mask": torch.ones(1, 1, 8, 8, dtype=torch.bool)})
    assert not covers(q, k, v, **{**ok, "dropout": 0.1})
    assert not covers(q, k, v, **{**ok, "is_causal": False})
    assert not covers(q, k, v, **{**ok, "kwargs": {"softcap": 30.0}})
    assert not covers(q, k, v, **{**ok, "kwargs": {"s_aux": torch.zeros(4)}})
    assert not covers(q[:, :, :1], k, v, **ok)  # a decode step against a cache
    long_wide = torch.zeros(1, 2, 513, 32)
    assert not covers(long_wide, long_wide, long_wide, **ok)  # SDPA is faster there
    long_narrow = torch.zeros(1, 2, 2000, 16)
    assert covers(long_narrow, long_narrow, long_narrow, **ok)
    assert not covers(q.bfloat16(), k.bfloat16(), v.bfloat16(), **ok)
    assert not covers(q.requires_grad_(), k, v, **ok)
    with torch.no_grad():
        assert covers(q, k, v, **ok)


def test_switch_off_keeps_sdpa(monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LOSA_FAST_ATTENTION", "0")
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa")
    with fast_attention(model):
        assert model.config._attn_implementation == "sdpa"
    eager = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager")
    monkeypatch.delenv("LOSA_FAST_ATTENTION")
    with fast_attention(eager):
        assert eager.config._attn_implementation == "eager"


@needs_fast
def test_attention_forward_signature_falls_back_on_a_mask(rng):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = make_qkv(rng, 1, 4, 2, 9, 8)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    mask = torch.ones(1, 1, 9, 9, dtype=torch.bool).tril()
    mask[..., 0] = False  # not the causal pattern: only SDPA with the mask is right
    got, _ = attention_forward(module, q, k, v, mask, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(got, want)
    fast, _ = attention_forward(module, q, k, v, None, scaling=0.3)
    assert_as_accurate_as_sdpa(fast, q, k, v, 0.3)


@needs_ext
def test_bad_input_is_a_clear_error(rng):
    q, k, v = make_qkv(rng, 1, 4, 2, 9, 8)
    with pytest.raises(RuntimeError, match="float32 only"):
        ops().causal_attention(q.double(), k.double(), v.double(), 1.0)
    with pytest.raises(RuntimeError, match="not a multiple"):
        ops().causal_attention(q[:, :3], k, v, 1.0)
    with pytest.raises(RuntimeError, match="does not match query"):
        ops().causal_attention(q, k[:, :, :5], v[:, :, :5], 1.0)
    with pytest.raises(RuntimeError, match="differ"):
        ops().causal_attention(q, k, v[..., :4], 1.0)
    with pytest.raises(RuntimeError, match=r"\[batch, heads, seq, head_dim\]"):
        ops().causal_attention(q[0], k[0], v[0], 1.0)

"""The CPU decode-attention kernel (a few new rows against a KV cache) against a float64 reference, in
fp32, bf16 and fp16, with no mask (the causal rule), bool and additive masks; its transformers routing
(generation with and without padding equals SDPA's), what it leaves to SDPA, and bad input.

Tolerance: q, k and v are exact in their dtype, so the float64 reference differs from the kernel only by
fp32 arithmetic and the one rounding of the output to its dtype (at most 2^-8 relative in bf16, 2^-11
in fp16). The fp32 part may be 4x the error of the same reference computed in fp32 with PyTorch, or the
error an fp32 rounding of the largest score can cause (peaked scores), whichever is larger.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from losa_deploy.kernels import has_extension, ops
from losa_deploy.kernels.attention import (
    DECODE_ROWS,
    NAME,
    attention_forward,
    available,
    covers_decode,
    use_fast_attention,
)

needs_ext = pytest.mark.skipif(not has_extension(), reason="compiled extension not built")
needs_fast = pytest.mark.skipif(not has_extension() or not available(), reason="needs the AVX-512 kernel")
ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # half an ulp, relative


def reference(q, k, v, mask, scale, dtype=torch.float64):
    """softmax(scale·QKᵀ + mask)·V in ``dtype``, [B, Tq, H, D]; no mask: row i sees keys <= Tk - Tq + i."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.to(dtype).repeat_interleave(group, dim=1) for t in (k, v))
    scores = scale * q.to(dtype) @ k.transpose(-1, -2)
    tq, tk = q.shape[2], k.shape[2]
    if mask is None:
        mask = torch.arange(tk)[None] <= torch.arange(tq)[:, None] + (tk - tq)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, -math.inf)
    else:
        scores = scores + mask.to(dtype)
    probs = scores.softmax(-1).nan_to_num(0.0)  # a row that sees no key: zeros
    return (probs @ v).transpose(1, 2)


def assert_exact_to_rounding(got, q, k, v, mask, scale):
    want = reference(q, k, v, mask, scale)
    assert got.shape == want.shape and got.dtype == q.dtype and got.is_contiguous()
    fp32_err = (reference(q, k, v, mask, scale, torch.float32).double() - want).abs().max()
    group = q.shape[1] // k.shape[1]
    score_size = (scale * q.double().abs() @ k.double().abs().repeat_interleave(group, 1).transpose(-1, -2)).max()
    peaked = 2 * torch.finfo(torch.float32).eps * score_size * v.double().abs().max()
    bound = ROUNDING[q.dtype] * want.abs() + max(4 * fp32_err, peaked) + 1e-6
    err = (got.double() - want).abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), f"error {err.flatten()[worst]:.3g} over its bound {bound.flatten()[worst]:.3g}"


def make_inputs(rng, batch, heads, kv_heads, tq, tk, dim, dtype, mask_kind):
    """q as transformers hands it over ([B, Tq, H, D] viewed as [B, H, Tq, D]); the cache as a slice of
    a longer buffer (a static cache: strided rows); masks broadcast as transformers builds them."""
    q = torch.randn(batch, tq, heads, dim, generator=rng).to(dtype).transpose(1, 2)
    cache = torch.randn(2, batch, kv_heads, tk + 5, dim, generator=rng).to(dtype)
    k, v = cache[0, :, :, :tk], cache[1, :, :, :tk]
    if mask_kind == "none":
        mask = None
    elif mask_kind == "bool":  # padding: some leading keys hidden per sequence, the newest always visible
        mask = torch.rand(batch, 1, tq, tk, generator=rng) > 0.3
        mask[..., -1] = True
    else:  # additive, per head, in the model's dtype
        mask = (3 * torch.randn(1, heads, 1, tk, generator=rng)).to(dtype)
    return q, k, v, mask


@needs_ext
@pytest.mark.parametrize("isa", ["default", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("batch,heads,kv_heads,tq,tk,dim", [
    (1, 1, 1, 1, 1, 1),       # the smallest step
    (2, 4, 4, 1, 37, 8),      # one row per kv head (stories260K's head size)
    (3, 6, 3, 1, 50, 72),     # two rows: grouped heads; a head of 4.5 vectors
    (1, 9, 3, 1, 133, 128),   # three rows, run as a four-row tile
    (2, 4, 1, 5, 9, 33),      # 20 rows: whole and partial row tiles; five new positions
    (1, 2, 2, 2, 2, 200),     # the cache is the new rows; a head of 12.5 vectors
])
def test_kernel_matches_float64_reference(rng, monkeypatch, isa, dtype, mask_kind, batch, heads, kv_heads, tq,
                                          tk, dim):
    monkeypatch.setenv("LOSA_CPU_ISA", isa)
    q, k, v, mask = make_inputs(rng, batch, heads, kv_heads, tq, tk, dim, dtype, mask_kind)
    scale = float(torch.rand(1, generator=rng)) + 0.05
    assert_exact_to_rounding(ops().decode_attention(q, k, v, mask, scale), q, k, v, mask, scale)


@needs_ext
@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.integers(1, 5), tq=st.integers(1, 4),
       extra=st.integers(0, 70), dim=st.integers(1, 140), mask_kind=st.sampled_from(["none", "bool", "additive"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**31 - 1))
def test_kernel_on_fuzzed_shapes(batch, kv_heads, group, tq, extra, dim, mask_kind, dtype, seed):
    q, k, v, mask = make_inputs(torch.Generator().manual_seed(seed), batch, kv_heads * group, kv_heads, tq,
                                tq + extra, dim, dtype, mask_kind)
    assert_exact_to_rounding(ops().decode_attention(q, k, v, mask, dim ** -0.5), q, k, v, mask, dim ** -0.5)


@needs_ext
def test_peaked_scores_hidden_rows_and_extreme_masks(rng):
    """Scores spread over hundreds (the exp clamp is reached), a row that sees no key (zeros, as SDPA's
    CPU kernels give), and transformers' additive masks at the dtype's minimum."""
    q, k, v, _ = make_inputs(rng, 2, 4, 2, 3, 40, 16, torch.float32, "none")
    q = q * 40
    mask = torch.rand(2, 1, 3, 40, generator=rng) > 0.5
    mask[1, 0, 2] = False  # sees nothing
    got = ops().decode_attention(q, k, v, mask, 0.25)
    assert_exact_to_rounding(got, q, k, v, mask, 0.25)
    assert torch.equal(got[1, 2], torch.zeros_like(got[1, 2]))
    additive = torch.zeros(2, 1, 3, 40).masked_fill(~mask, torch.finfo(torch.float32).min)
    additive[1, 0, 2] = 0.0  # keep every row visible: at the minimum it would be a uniform average
    mask[1, 0, 2] = True
    assert_exact_to_rounding(ops().decode_attention(q, k, v, additive, 0.25), q, k, v, mask, 0.25)


@needs_ext
@pytest.mark.parametrize("isa", ["default", "avx512"])
def test_static_cache_tail_and_left_padding(rng, monkeypatch, isa):
    """A static cache: keys past each sequence's length are masked (the value pass skips them) and may
    hold anything, NaN included; left padding hides a sequence's first keys."""
    monkeypatch.setenv("LOSA_CPU_ISA", isa)
    q, k, v, _ = make_inputs(rng, 3, 6, 2, 2, 64, 40, torch.bfloat16, "none")
    lengths, padding = torch.tensor([20, 64, 33]), torch.tensor([3, 0, 9])
    keys = torch.arange(64)
    visible = (keys >= padding[:, None]) & (keys < lengths[:, None])  # [B, Tk]
    causal = keys[None, :] <= (lengths[:, None, None] - 2 + torch.arange(2)[None, :, None])  # [B, Tq, Tk]
    mask = (visible[:, None, :] & causal)[:, None]  # [B, 1, Tq, Tk]
    k, v = k.clone(), v.clone()
    for b, n in enumerate(lengths.tolist()):
        k[b, :, n:], v[b, :, n:] = float("nan"), float("nan")
    got = ops().decode_attention(q, k, v, mask, 0.2)
    clean_k, clean_v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    assert not got.isnan().any()
    assert_exact_to_rounding(got, q, clean_k, clean_v, mask, 0.2)


@needs_ext
def test_bad_input_is_a_clear_error(rng):
    q, k, v, _ = make_inputs(rng, 2, 4, 2, 1, 9, 8, torch.float32, "none")
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ops().decode_attention(q.double(), k.double(), v.double(), None, 1.0)
    with pytest.raises(RuntimeError, match="must be BFloat16 as the query is"):
        ops().decode_attention(q.bfloat16(), k, v, None, 1.0)
    with pytest.raises(RuntimeError, match="not a multiple"):
        ops().decode_attention(q[:, :3], k, v, None, 1.0)
    with pytest.raises(RuntimeError, match="does not match query"):
        ops().decode_attention(q[:1], k, v, None, 1.0)
    with pytest.raises(RuntimeError, match="differ"):
        ops().decode_attention(q, k, v[:, :, :5], None, 1.0)
    with pytest.raises(RuntimeError, match="without a mask the queries must be the last keys"):
        ops().decode_attention(q.expand(2, 4, 12, 8), k, v, None, 1.0)
    with pytest.raises(RuntimeError, match="does not broadcast"):
        ops().decode_attention(q, k, v, torch.ones(2, 3, 1, 9, dtype=torch.bool), 1.0)
    with pytest.raises(RuntimeError, match="bool or floating"):
        ops().decode_attention(q, k, v, torch.ones(1, 1, 1, 9, dtype=torch.int64), 1.0)
    with pytest.raises(RuntimeError, match=r"\[batch, heads, seq, head_dim\]"):
        ops().decode_attention(q[0], k[0], v[0], None, 1.0)


def test_covers_decode_only_what_the_kernel_computes():
    q, k, v = torch.zeros(2, 4, 1, 16), torch.zeros(2, 2, 30, 16), torch.zeros(2, 2, 30, 16)
    ok = dict(attention_mask=None, dropout=0.0, kwargs={})
    assert covers_decode(q, k, v, **ok)
    assert covers_decode(q.bfloat16(), k.bfloat16(), v.bfloat16(), **ok)
    padded = torch.ones(2, 1, 1, 30, dtype=torch.bool)
    assert covers_decode(q, k, v, **{**ok, "attention_mask": padded})
    assert not covers_decode(q, k, v, **{**ok, "attention_mask": torch.ones(2, 1, 1, 29, dtype=torch.bool)})
    assert not covers_decode(q, k, v, **{**ok, "attention_mask": torch.ones(3, 1, 1, 30, dtype=torch.bool)})
    assert not covers_decode(q, k, v, **{**ok, "attention_mask": torch.ones(2, 1, 1, 30, dtype=torch.int64)})
    rows = torch.zeros(2, 4, 3, 16)
    assert not covers_decode(rows, k, v, **ok)  # no mask: SDPA attends everything, not the causal rule
    assert covers_decode(rows, k, v, **{**ok, "attention_mask": torch.ones(2, 1, 3, 30, dtype=torch.bool)})
    many = torch.zeros(2, 4, DECODE_ROWS + 1, 16)
    assert not covers_decode(many, k, v, **{**ok, "attention_mask": torch.ones(2, 1, DECODE_ROWS + 1, 30) > 0})
    square = torch.zeros(2, 2, 30, 16)
    assert not covers_decode(square, k, v, **ok)  # a prefill: the causal kernel's or SDPA's
    assert not covers_decode(q.double(), k.double(), v.double(), **ok)
    narrow = torch.zeros(2, 4, 1, 8), torch.zeros(2, 2, 30, 8)
    assert not covers_decode(narrow[0], narrow[1], narrow[1], **ok)  # fp32 at 8 wide: SDPA is faster
    assert covers_decode(narrow[0].bfloat16(), narrow[1].bfloat16(), narrow[1].bfloat16(), **ok)
    assert not covers_decode(q, k.bfloat16(), v.bfloat16(), **ok)
    assert not covers_decode(q, k, v, **{**ok, "dropout": 0.1})
    assert not covers_decode(q, k, v, **{**ok, "kwargs": {"softcap": 30.0}})
    assert not covers_decode(q, k, v, **{**ok, "kwargs": {"output_attentions": True}})
    assert not covers_decode(q.requires_grad_(), k, v, **ok)
    with torch.no_grad():
        assert covers_decode(q, k, v, **ok)


@needs_fast
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_forward_equals_sdpas_function_on_a_padding_mask(rng, dtype):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, mask = make_inputs(rng, 3, 4, 2, 1, 20, 8, dtype, "bool")
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    got, _ = attention_forward(module, q, k, v, mask, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert_exact_to_rounding(got, q, k, v, mask, 0.3)


def _teacher_forced_logits(model, ids, attention_mask, prompt_len):
    """Logits of a prefill of ``prompt_len`` tokens, then of one decode step per further token of ``ids``."""
    out = model(input_ids=ids[:, :prompt_len], attention_mask=attention_mask[:, :prompt_len], use_cache=True)
    logits, past = [out.logits[:, -1]], out.past_key_values
    for t in range(prompt_len, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], attention_mask=attention_mask[:, :t + 1], past_key_values=past,
                    use_cache=True)
        logits.append(out.logits[:, -1])
        past = out.past_key_values
    return torch.stack(logits)


@needs_fast
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_decoding_on_the_kernel_equals_sdpa(rng, monkeypatch, model_type, padded):
    import copy

    from transformers import AutoModelForCausalLM

    import losa_deploy.kernels.attention as attention

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    config = tiny_config(model_type)
    config.head_dim = 18  # ragged, and wide enough that fp32 decodes on the kernel
    if model_type == "mistral":
        config.sliding_window = 9  # shorter than the sequence: the mask carries the window
    sdpa = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ours = copy.deepcopy(sdpa)
    assert use_fast_attention(ours) and ours.config._attn_implementation == NAME
    calls = []
    kernel = attention.decode_attention
    monkeypatch.setattr(attention, "decode_attention", lambda *args: calls.append(1) or kernel(*args))
    ids = torch.randint(0, 96, (3, 23), generator=rng)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :6], mask[2, :3] = 0, 0
    with torch.no_grad():
        want = _teacher_forced_logits(sdpa, ids, mask, 11)
        got = _teacher_forced_logits(ours, ids, mask, 11)
    assert len(calls) == config.num_hidden_layers * 12  # every decode step of every layer ran the kernel
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(ids, **kw), sdpa.generate(ids, **kw))


@needs_fast
def test_use_fast_attention_leaves_other_models_and_saved_configs_alone(tmp_path, monkeypatch):
    import json

    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager")
    assert not use_fast_attention(eager) and eager.config._attn_implementation == "eager"
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa")
    monkeypatch.setenv("LOSA_FAST_ATTENTION", "0")
    assert not use_fast_attention(model)
    monkeypatch.delenv("LOSA_FAST_ATTENTION")
    assert use_fast_attention(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert NAME not in json.dumps(saved)  # a saved model loads anywhere, with transformers' default


@needs_fast
def test_load_sets_up_the_losa_attention(sparse_stories, tmp_path, pack_prompts):
    """ld.load sets up the losa_cpu attention (stories260K: 8-wide fp32 heads, so its decode steps stay on
    SDPA by the rule above and its prefill runs the causal kernel), with transformers' greedy tokens."""
    from conftest import PACK_NEW_TOKENS, greedy_reference

    import losa_deploy as ld

    ld.pack(sparse_stories, tmp_path / "losa", format="losa", progress=False)
    model = ld.load(tmp_path / "losa")
    assert model.config._attn_implementation == NAME
    reference = ld.load_model(sparse_stories)
    for prompt in pack_prompts:
        tokens, logits = greedy_reference(model, prompt, PACK_NEW_TOKENS)
        want_tokens, want_logits = greedy_reference(reference, prompt, PACK_NEW_TOKENS)
        assert tokens == want_tokens
        torch.testing.assert_close(logits, want_logits, rtol=1e-3, atol=1e-3)


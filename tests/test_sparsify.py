"""sparsify_ and SparseLinear: a pruned model gives the dense model's logits and generations after the
swap (stories260K and a tiny random Llama with ragged widths), state dicts hold the on-disk format and
load back, and bad input is a clear error."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from sparse_weights import prune_linears_, random_nm, random_sparse

import losa_deploy as ld
from losa_deploy.errors import LosaError
from losa_deploy.runtime import SparseLinear


def _sparse_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def _load(stories_dir, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(stories_dir, dtype=dtype).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.02)])
def test_stories_unstructured_matches_dense(stories_dir, rng, dtype, tol):
    model = _load(stories_dir, dtype)
    prune_linears_(model, sparsity=0.6)
    ids = torch.randint(3, 512, (2, 48), generator=rng)
    prompt = ids[:1, :6]
    dense = _logits(model, ids)
    dense_one = _logits(model, ids[:1, :1])  # one token: the decode path of the kernels
    with torch.no_grad():
        dense_gen = model.generate(prompt, max_new_tokens=24, do_sample=False)
    ld.sparsify_(model, min_sparsity=0.5, progress=False)
    swapped = _sparse_modules(model)
    assert len(swapped) == 35 and all(m.format == "bitmask" for m in swapped.values())
    assert all(m.packed.values.dtype == dtype for m in swapped.values())
    scale = dense.abs().max()
    assert float((_logits(model, ids) - dense).abs().max()) <= tol * scale
    assert float((_logits(model, ids[:1, :1]) - dense_one).abs().max()) <= tol * scale
    if dtype == torch.float32:  # bf16 rounding can flip a near-tie, fp32 cannot at this tolerance
        with torch.no_grad():
            assert torch.equal(model.generate(prompt, max_new_tokens=24, do_sample=False), dense_gen)


@pytest.mark.parametrize("n,m,label", [(2, 4, "2:4"), (2, 8, "2:8")])
def test_stories_nm_matches_dense(stories_dir, rng, n, m, label):
    model = _load(stories_dir, torch.float32)
    prune_linears_(model, nm=(n, m))  # 2:8 leaves a 4-wide tail group on the 172-wide down_proj
    ids = torch.randint(3, 512, (1, 40), generator=rng)
    dense = _logits(model, ids)
    ld.sparsify_(model, progress=False)
    swapped = _sparse_modules(model)
    assert len(swapped) == 35 and {m.format for m in swapped.values()} == {label}
    assert float((_logits(model, ids) - dense).abs().max()) <= 1e-4 * dense.abs().max()


def test_tiny_llama_state_dict_round_trip(tmp_path, rng):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=rng)))
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    prune_linears_(model, sparsity=0.7)
    ids = torch.randint(0, 96, (3, 21), generator=rng)
    dense = _logits(model, ids)
    ld.sparsify_(model, progress=False)
    assert len(_sparse_modules(model)) == 14
    assert torch.allclose(_logits(model, ids), dense, atol=1e-5, rtol=1e-4)

    state = model.state_dict()
    key = "model.layers.1.mlp.down_proj"
    assert state[f"{key}.lb_mask"].dtype == torch.uint32 and state[f"{key}.lb_shape"].tolist() == [40, 68]
    assert not any(k.startswith(key) and k.endswith(".weight") for k in state)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")

    other = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    prune_linears_(other, sparsity=0.5)  # a different pattern: loading must replace it
    ld.sparsify_(other, progress=False)
    other.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert torch.allclose(_logits(other, ids), dense, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["bitmask", "2:4"])
def test_sparsified_model_saves_a_checkpoint_load_opens(stories_dir, rng, tmp_path, nm):
    """sparsify_ names the packed modules in the config as load does, so save_pretrained writes a packed
    checkpoint (without the block, the saved linears read as missing weights everywhere)."""
    model = _load(stories_dir, torch.float32)
    prune_linears_(model, sparsity=0.6) if nm is None else prune_linears_(model, nm=nm)
    ld.sparsify_(model, progress=False)
    model.save_pretrained(tmp_path / "saved")
    again = ld.load(tmp_path / "saved")
    assert set(_sparse_modules(again)) == set(_sparse_modules(model))
    ld.use_fast_attention(model)  # as load set up `again`: the same attention, so the same bits
    ids = torch.randint(3, 512, (2, 33), generator=rng)
    assert torch.equal(_logits(again, ids), _logits(model, ids))


def test_sparsify_skips_dense_filtered_and_tied(rng):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config).eval()
    prune_linears_(model, sparsity=0.6, skip=())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ld.sparsify_(model, min_sparsity=0.7, progress=False)
    assert not _sparse_modules(model)  # nothing is 70% sparse
    ld.sparsify_(model, min_sparsity=0.5, filter_fn=lambda module, name: "mlp" in name, progress=False)
    assert set(_sparse_modules(model)) == {f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1)
                                          for p in ("gate", "up", "down")}
    ld.sparsify_(model, min_sparsity=0.5, progress=False)
    assert "lm_head" not in _sparse_modules(model)  # tied to the embeddings: stays dense
    with pytest.raises(LosaError, match="min_sparsity"):
        ld.sparsify_(model, min_sparsity=1.5)
    with pytest.raises(LosaError, match="unknown sparse format"):
        ld.sparsify_(model, format="csr")
    with pytest.raises(LosaError, match="SparseLinear.from_linear"):  # a bare linear has no parent to swap in
        ld.sparsify_(model.lm_head)


@pytest.mark.parametrize("format", ["bitmask", "nm"])
def test_sparse_linear_module(rng, format):
    linear = torch.nn.Linear(90, 37)
    with torch.no_grad():
        linear.weight.copy_(random_nm(37, 90, 3, 8, rng, underfill=0.0))
    sparse = SparseLinear.from_linear(linear, format=format)
    assert sparse.format == ("bitmask" if format == "bitmask" else "3:8")
    assert 0.6 < sparse.sparsity < 0.7
    x = torch.randn(4, 5, 90, generator=rng)
    torch.testing.assert_close(sparse(x), linear(x), atol=1e-5, rtol=1e-4)
    # The bias trains as nn.Linear's does (the packed weight is frozen); a frozen one stays frozen.
    assert sparse.bias.requires_grad
    sparse(x).square().sum().backward()
    linear(x).square().sum().backward()
    torch.testing.assert_close(sparse.bias.grad, linear.bias.grad, atol=1e-4, rtol=1e-4)
    linear.bias.requires_grad_(False)
    assert not SparseLinear.from_linear(linear, format=format).bias.requires_grad
    back = sparse.to_dense_linear()
    assert torch.equal(back.weight, linear.weight) and torch.equal(back.bias, linear.bias)
    half = sparse.to(torch.bfloat16)  # .to() converts the packed values like a dense weight
    assert half.packed.values.dtype == torch.bfloat16 and half(x.bfloat16()).dtype == torch.bfloat16
    assert "in_features=90, out_features=37" in repr(sparse)


def test_sparse_linear_bad_input(rng):
    linear = torch.nn.Linear(40, 10)
    with torch.no_grad():
        linear.weight.copy_(random_sparse(10, 40, 0.5, rng))
    with pytest.raises(LosaError, match="not N:M sparse"):
        SparseLinear.from_linear(linear, format="nm")
    with pytest.raises(LosaError, match="unknown sparse format"):
        SparseLinear.from_linear(linear, format="coo")
    sparse = SparseLinear.from_linear(linear)
    with pytest.raises(LosaError, match="takes 40 input features"):
        sparse(torch.randn(3, 41))
    bigger = torch.nn.Linear(40, 11)
    with torch.no_grad():
        bigger.weight.copy_(random_sparse(11, 40, 0.5, rng))
    with pytest.raises(RuntimeError, match=r"packed weight is \(11, 40\)"):
        sparse.load_state_dict(SparseLinear.from_linear(bigger).state_dict())
    state = sparse.state_dict()
    state["lb_row_ptr"] = state["lb_row_ptr"].flip(0)
    with pytest.raises(RuntimeError, match="row_ptr"):
        sparse.load_state_dict(state)


def test_float64_conversion_keeps_values_in_float32(rng):
    """model.double() (a float64 reference run) must convert the whole model: the packed values stay
    float32 (no format holds float64; exact for fp32 weights), bias and outputs become float64."""
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.ReLU(), torch.nn.Linear(24, 9))
    with torch.no_grad():
        model[0].weight.copy_(random_sparse(24, 40, 0.6, rng))
        model[2].weight.copy_(random_nm(9, 24, 2, 4, rng))
    reference = [m.weight.detach().double() for m in (model[0], model[2])]
    ld.sparsify_(model, progress=False)
    model.double()
    assert model[0].bias.dtype == model[2].bias.dtype == torch.float64
    assert model[0].packed.values.dtype == model[2].packed.values.dtype == torch.float32
    x = torch.randn(5, 40, generator=rng, dtype=torch.float64)
    expected = torch.relu(x @ reference[0].T + model[0].bias) @ reference[1].T + model[2].bias
    y = model(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_sparsify_is_all_or_nothing(rng):
    """format="nm" with one unstructured linear: an error naming it, and no linear swapped."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 8))
    with torch.no_grad():
        model[0].weight.copy_(random_nm(16, 32, 2, 4, rng, underfill=0.0))
        model[1].weight.copy_(random_sparse(8, 16, 0.5, rng))
    with pytest.raises(LosaError, match="^1: the weight is not N:M sparse"):
        ld.sparsify_(model, format="nm", progress=False)
    assert all(type(m) is torch.nn.Linear for m in model)
    with pytest.raises(LosaError, match="unknown sparse backend 'fast'"):
        ld.sparsify_(model, backend="fast", progress=False)
    with pytest.raises(LosaError, match="unknown sparse backend 'fast'"):
        SparseLinear.from_linear(model[1], backend="fast")


def test_sparse_linear_loads_like_nn_linear(rng):
    linear = torch.nn.Linear(40, 10)
    with torch.no_grad():
        linear.weight.copy_(random_sparse(10, 40, 0.5, rng))
    sparse = SparseLinear.from_linear(linear)
    other = torch.nn.Linear(40, 10)
    with torch.no_grad():
        other.weight.copy_(random_sparse(10, 40, 0.6, rng))
    # A bf16 state dict loads into the fp32 module as fp32 values, as nn.Linear copies into its own dtype.
    state = SparseLinear.from_linear(other, dtype=torch.bfloat16).state_dict()
    sparse.load_state_dict(state)
    assert sparse.packed.values.dtype == torch.float32
    assert torch.equal(sparse.packed.to_dense(), other.weight.detach().bfloat16().float())
    # Without the packed keys: strict raises naming them; strict=False lists them, loads the bias and keeps
    # the packed weight as it is.
    with pytest.raises(RuntimeError, match="Missing key.*lb_values"):
        sparse.load_state_dict({"bias": other.bias.detach()})
    before = sparse.packed.to_dense().clone()
    result = sparse.load_state_dict({"bias": linear.bias.detach()}, strict=False)
    assert torch.equal(sparse.packed.to_dense(), before) and torch.equal(sparse.bias, linear.bias)
    assert result.missing_keys == ["lb_shape", "lb_values", "lb_mask", "lb_row_ptr"]
    two_four = torch.nn.Linear(8, 4)
    with torch.no_grad():
        two_four.weight.view(4, 2, 4)[..., :2] = 0
    nm = SparseLinear.from_linear(two_four, format="nm")
    assert nm.load_state_dict({"bias": nm.bias.detach()}, strict=False).missing_keys == \
        ["nm_shape", "nm_pattern", "nm_values", "nm_mask", "nm_n"]


def test_public_api_exports():
    assert ld.sparsify_ is ld.api.sparsify_ and ld.SparseLinear is SparseLinear

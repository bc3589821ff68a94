"""The ``losa`` format and ``losa_deploy.load``: packed on disk, SparseLinear in memory, same greedy tokens.

Tolerance: every generated step's fp32 logits agree with transformers on the ``hf`` output to 1e-3
(observed about 2e-5); the greedy tokens must be identical.
"""

import json

import pytest
import torch
from conftest import PACK_NEW_TOKENS, greedy_reference

import losa_deploy as ld
from losa_deploy.errors import LosaError
from losa_deploy.models import get_architecture
from losa_deploy.models.tensors import iter_tensors


@pytest.fixture(scope="module")
def packed(sparse_stories, tmp_path_factory):
    out = tmp_path_factory.mktemp("losa")
    results = {fmt: ld.pack(sparse_stories, out / fmt, format=fmt, progress=False) for fmt in ("hf", "losa")}
    return out, results


def test_load_serves_sparse_linears_with_transformers_tokens(packed, pack_prompts, sparse_stories):
    out, _ = packed
    model = ld.load(out / "losa")
    reference = ld.load_model(out / "hf")
    linears = get_architecture(model).linears(model)
    assert len(linears) == 35 and all(isinstance(m, ld.SparseLinear) for m in linears.values())
    expected = "2:4" if "2of4" in sparse_stories.name else "bitmask"
    assert {m.format for m in linears.values()} == {expected}
    assert not any(n.endswith("proj.weight") for n, _ in model.named_parameters()), "a dense copy was kept"
    for prompt in pack_prompts:
        tokens, logits = greedy_reference(model, prompt, PACK_NEW_TOKENS)
        ref_tokens, ref_logits = greedy_reference(reference, prompt, PACK_NEW_TOKENS)
        assert tokens == ref_tokens
        assert (logits - ref_logits).abs().max() <= 1e-3


def test_packed_weights_round_trip_exactly(packed):
    out, _ = packed
    model, reference = ld.load(out / "losa"), ld.load_model(out / "hf")
    for name, module in get_architecture(model).linears(model).items():
        assert torch.equal(module.packed.to_dense(), reference.get_submodule(name).weight), name


def test_losa_is_smaller_on_disk(packed):
    out, results = packed
    linear_keys = {k for k, _ in iter_tensors(out / "hf") if k.endswith("proj.weight")}
    dense_linear = sum(t.numel() * t.element_size() for k, t in iter_tensors(out / "hf") if k in linear_keys)
    packed_linear = sum(t.numel() * t.element_size() for k, t in iter_tensors(out / "losa")
                        if k.rsplit(".", 1)[1].startswith(("lb_", "nm_")))
    # 50% of fp32 values plus at most one bit per weight of mask and a row pointer per row.
    assert packed_linear < 0.56 * dense_linear
    assert results["losa"]["weight_bytes"] < 0.7 * results["hf"]["weight_bytes"]
    config = json.loads((out / "losa" / "config.json").read_text())
    assert config["losa_sparse"]["format"] == "losa-bitmask" and len(config["losa_sparse"]["modules"]) == 35


def test_load_converts_dtype(packed, pack_prompts):
    out, _ = packed
    model = ld.load(out / "losa", dtype="bf16")
    linear = model.model.layers[0].mlp.down_proj
    assert linear.packed.values.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model(torch.tensor([pack_prompts[0]])).logits.isfinite().all()


def test_loaded_model_saves_a_packed_checkpoint(packed, pack_prompts, tmp_path):
    # save_pretrained writes SparseLinear's packed tensors, and the block that tells ld.load they are packed.
    out, _ = packed
    assert ld.load(out / "losa", dtype="bf16").config.dtype == torch.bfloat16
    model = ld.load(out / "losa")
    model.save_pretrained(tmp_path / "saved")
    again = ld.load(tmp_path / "saved")
    assert {m.format for m in get_architecture(again).linears(again).values()} == \
        {m.format for m in get_architecture(model).linears(model).values()}
    with torch.no_grad():
        ids = torch.tensor([pack_prompts[0]])
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_load_checks_its_arguments_first(packed):
    out, _ = packed
    with pytest.raises(LosaError, match="unknown sparse backend 'avx9'"):
        ld.load(out / "losa", backend="avx9")
    with pytest.raises(LosaError, match="bad device 'gpu0'"):
        ld.load(out / "losa", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(LosaError, match="sees no CUDA GPU"):
            ld.load(out / "losa", device="cuda")


def test_dense_model_packs_and_loads(stories_dir, tmp_path, pack_prompts):
    result = ld.pack(stories_dir, tmp_path / "losa", format="losa", progress=False)
    assert result["warnings"] and result["pattern"] == "dense"
    model, reference = ld.load(tmp_path / "losa"), ld.load_model(stories_dir)
    with torch.no_grad():
        ids = torch.tensor([pack_prompts[1]])
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_load_refuses_a_plain_checkpoint(stories_dir):
    with pytest.raises(LosaError, match="not a packed checkpoint"):
        ld.load(stories_dir)


def test_load_refuses_missing_packed_tensors(packed, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    out, _ = packed
    broken = tmp_path / "broken"
    shutil.copytree(out / "losa", broken)
    state = load_file(broken / "model.safetensors")
    for key in [k for k in state if k.startswith("model.layers.2.mlp.up_proj.")]:
        del state[key]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LosaError, match="no packed tensors for model.layers.2.mlp.up_proj"):
        ld.load(broken)


@pytest.mark.parametrize("which", ["packed values", "plain tensor"])
def test_load_refuses_non_finite_weights(packed, tmp_path, which):
    """A NaN written into a packed checkpoint after ``pack`` (which refuses them) would only show as NaN
    logits; load names the tensor instead, packed values and plain tensors alike."""
    import shutil

    from safetensors.torch import load_file, save_file

    out, _ = packed
    broken = tmp_path / "broken"
    shutil.copytree(out / "losa", broken)
    state = load_file(broken / "model.safetensors")
    values = sorted(k for k in state if k.endswith(("lb_values", "nm_values")))
    key = values[len(values) // 2] if which == "packed values" else "model.norm.weight"
    state[key] = state[key].clone()
    state[key].view(-1)[state[key].numel() // 2] = float("nan")
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    named = key.rsplit(".", 1)[0] if which == "packed values" else key  # a packed weight is named by module
    with pytest.raises(LosaError, match=f"{named} holds NaN or Inf values"):
        ld.load(broken)

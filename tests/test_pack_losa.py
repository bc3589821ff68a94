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
from losa_deploy.kernels.formats.bitmask import popcount
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


def test_loaded_model_generates_on_the_in_place_cache(packed, pack_prompts):
    # generate() with nothing passed: the in-place KV cache, and the tokens of transformers on the hf output.
    from losa_deploy.runtime.cache import GrowingCache

    out, _ = packed
    model, reference = ld.load(out / "losa"), ld.load_model(out / "hf")
    ids = torch.tensor([pack_prompts[1]])
    kw = dict(max_new_tokens=PACK_NEW_TOKENS, min_new_tokens=PACK_NEW_TOKENS, do_sample=False,
              return_dict_in_generate=True)
    with torch.no_grad():
        got, want = model.generate(ids, **kw), reference.generate(ids, **kw)
    assert type(got.past_key_values) is GrowingCache and type(want.past_key_values) is not GrowingCache
    assert torch.equal(got.sequences, want.sequences)


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


def test_load_converts_dtype_as_transformers_does(packed):
    """``load(dtype=bf16)`` of an fp32 packing is the model ``from_pretrained(dtype=bf16)`` builds: weights
    in bf16, the RoPE inverse frequencies kept in fp32 (rounded to bf16 they moved the logits by up to
    1.4 at a few hundred positions)."""
    from transformers import AutoModelForCausalLM

    out, _ = packed
    model = ld.load(out / "losa", dtype="bf16")
    linear = model.model.layers[0].mlp.down_proj
    assert linear.packed.values.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    reference = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 512, (2, 300), generator=torch.Generator().manual_seed(300))
    with torch.no_grad():
        logits, ref = model(ids).logits.float(), reference(ids).logits.float()
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.99
    assert (logits - ref).abs().max() <= 0.1


def test_loaded_model_saves_a_packed_checkpoint(packed, pack_prompts, tmp_path):
    # save_pretrained writes SparseLinear's packed tensors, and the block that tells ld.load they are packed.
    out, _ = packed
    assert ld.load(out / "losa", dtype="bf16").config.dtype == torch.bfloat16
    model = ld.load(out / "losa")
    model.save_pretrained(tmp_path / "saved")
    # ld.load's generate-time cache changes the model's class, not what save_pretrained writes.
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["architectures"] == json.loads((out / "losa" / "config.json").read_text())["architectures"]
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
    out, _ = packed

    def edit(state):
        for key in [k for k in state if k.startswith("model.layers.2.mlp.up_proj.")]:
            del state[key]

    broken = _edited_copy(out / "losa", tmp_path / "broken", edit)
    for read in (ld.load, ld.inspect):
        with pytest.raises(LosaError, match="no packed tensors for model.layers.2.mlp.up_proj"):
            read(broken)


def test_load_reads_the_generation_config(packed, tmp_path):
    """generate() keeps the checkpoint's defaults (an instruct model's extra EOS ids, its sampling
    settings), as from_pretrained does; load used to fall back to the config's single EOS."""
    import shutil

    out, _ = packed
    folder = tmp_path / "gc"
    shutil.copytree(out / "losa", folder)
    settings = {"bos_token_id": 1, "eos_token_id": [2, 13], "repetition_penalty": 1.3, "max_new_tokens": 17}
    (folder / "generation_config.json").write_text(json.dumps(settings))
    config = ld.load(folder).generation_config
    assert {k: getattr(config, k) for k in settings} == settings
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(LosaError, match="generation_config.json"):
        ld.load(folder)


def _swap_mask_rows(module: str):
    """An edit of a packed state that swaps two mask rows of ``module``: rows of equal popcount (N:M groups
    stay full), so every count the format checks stays right and only the sidecar's mask_sha256 can tell."""

    def edit(state):
        key = next(f"{module}.{leaf}" for leaf in ("lb_mask", "nm_mask") if f"{module}.{leaf}" in state)
        mask = state[key].view(torch.int32) if state[key].dtype == torch.uint32 else state[key]  # (no uint32 indexing)
        rows = [r for r in range(1, mask.shape[0]) if not torch.equal(mask[r], mask[0])
                and (key.endswith("nm_mask") or bool(popcount(mask[r]).sum() == popcount(mask[0]).sum()))]
        mask[[0, rows[0]]] = mask[[rows[0], 0]].clone()

    return edit


def test_load_checks_the_zero_pattern_against_the_sidecar(packed, tmp_path, pack_prompts):
    """Two mask rows swapped keep every count the format checks (rows of equal popcount, N:M groups still
    full): only the sidecar's mask_sha256 can tell, and load names the module."""
    out, _ = packed
    module = "model.layers.1.mlp.down_proj"
    broken = _edited_copy(out / "losa", tmp_path / "broken", _swap_mask_rows(module))
    with pytest.raises(LosaError, match=f"zero pattern of {module} does not match"):
        ld.load(broken)
    ids = torch.tensor([pack_prompts[0]])
    unchecked = ld.load(broken, verify=False)  # the format's own checks pass: wrong logits, silently
    assert not torch.equal(unchecked(ids).logits, ld.load(out / "losa")(ids).logits)


def test_inspect_reads_a_packed_checkpoint_as_its_unpacked_twin(packed, tmp_path, cli):
    """inspect on the losa (and vllm) output reports what it reports on the hf output of the same model,
    layer by layer, with the sidecar checked against the packed zero patterns; a swapped mask row is an
    error naming the module."""
    out, _ = packed
    ld.pack(out / "hf", tmp_path / "vllm", format="vllm", progress=False)
    plain = ld.inspect(out / "hf")
    assert plain["packed"] is False and plain["sidecar"]["verified_modules"] == len(plain["layers"])
    for folder in (out / "losa", tmp_path / "vllm"):
        report = ld.inspect(folder)
        assert report["packed"] is True
        for key in ("linear_params", "global_sparsity", "pattern", "model_type"):
            assert report[key] == plain[key], key
        assert [{k: v for k, v in r.items() if k != "dtype"} for r in report["layers"]] == \
            [{k: v for k, v in r.items() if k != "dtype"} for r in plain["layers"]]
        assert report["sidecar"]["verified_modules"] == len(report["layers"])
    code, stdout, _ = cli("inspect", out / "losa")
    assert code == 0 and f"global sparsity {100 * plain['global_sparsity']:.2f}%" in stdout
    module = "model.layers.0.self_attn.o_proj"
    with pytest.raises(LosaError, match=f"zero pattern of {module} does not match"):
        ld.inspect(_edited_copy(out / "losa", tmp_path / "broken", _swap_mask_rows(module)))


@pytest.mark.parametrize("where", ["same file", "later shard"])
def test_load_refuses_a_dense_weight_beside_a_packed_one(packed, tmp_path, where):
    """load and inspect alike, wherever the stray weight is stored (found from the headers, before any
    tensor is read)."""
    out, _ = packed

    def edit(state):
        state["model.layers.0.mlp.up_proj.weight"] = torch.randn(172, 64)

    later = (lambda key: key.endswith(".weight")) if where == "later shard" else None
    broken = _edited_copy(out / "losa", tmp_path / "broken", edit, later)
    for read in (ld.load, ld.inspect):
        with pytest.raises(LosaError, match=r"up_proj is packed \((bitmask|nm)\) but also stores "
                                            "model.layers.0.mlp.up_proj.weight"):
            read(broken)


def test_load_refuses_a_plain_tensor_of_the_wrong_shape(packed, tmp_path):
    out, _ = packed

    def edit(state):
        state["model.norm.weight"] = torch.ones(state["model.norm.weight"].numel() + 3)

    broken = _edited_copy(out / "losa", tmp_path / "broken", edit)
    with pytest.raises(LosaError, match=r"model.norm.weight has shape \(67,\), which does not fit"):
        ld.load(broken)


@pytest.mark.parametrize("which", ["packed values", "plain tensor"])
def test_load_refuses_non_finite_weights(packed, tmp_path, which):
    """A NaN written into a packed checkpoint after ``pack`` (which refuses them) would only show as NaN
    logits; load names the tensor instead, packed values and plain tensors alike."""
    out, _ = packed
    values = sorted(k for k, _ in iter_tensors(out / "losa") if k.endswith(("lb_values", "nm_values")))
    key = values[len(values) // 2] if which == "packed values" else "model.norm.weight"

    def edit(state):
        state[key] = state[key].clone()
        state[key].view(-1)[state[key].numel() // 2] = float("nan")

    broken = _edited_copy(out / "losa", tmp_path / "broken", edit)
    named = key.rsplit(".", 1)[0] if which == "packed values" else key  # a packed weight is named by module
    with pytest.raises(LosaError, match=f"{named} holds NaN or Inf values"):
        ld.load(broken)


@pytest.fixture(scope="module")
def sharded(packed, sparse_stories, tmp_path_factory):
    """The losa packing again, in shards small enough that some packed modules straddle two of them."""
    from unittest import mock

    out = tmp_path_factory.mktemp("sharded") / "losa"
    with mock.patch("losa_deploy.export.writer.DEFAULT_SHARD_BYTES", 100_000):
        ld.pack(sparse_stories, out, format="losa", progress=False)
    files = {}
    for key, file in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].items():
        files.setdefault(key.rpartition(".")[0], set()).add(file)
    assert any(len(f) > 1 for f in files.values()), "no module straddles two shards"
    return out


def test_sharded_packing_loads_and_inspects_as_one_file(packed, sharded):
    out, _ = packed
    model, reference = ld.load(sharded), ld.load(out / "losa")
    for name, module in reference.named_modules():
        if isinstance(module, ld.SparseLinear):
            assert torch.equal(model.get_submodule(name).packed.to_dense(), module.packed.to_dense()), name
    assert all(torch.equal(t, reference.state_dict()[k]) for k, t in model.state_dict().items())
    assert ld.inspect(sharded)["layers"] == ld.inspect(out / "losa")["layers"]


@pytest.mark.parametrize("layout", ["one file", "shards"])
def test_load_builds_each_sparse_linear_as_soon_as_its_module_has_streamed_in(packed, sharded, layout,
                                                                              monkeypatch):
    """The loader never holds more than one packed module's file tensors: each SparseLinear is built once
    its module's last tensor has gone by (it used to collect every module's tensors first)."""
    import losa_deploy.runtime.loader as loader
    import losa_deploy.runtime.packed_tensors as packed_tensors

    out, _ = packed
    folder = out / "losa" if layout == "one file" else sharded
    modules = json.loads((folder / "config.json").read_text())["losa_sparse"]["modules"]
    streamed, built, most_held = set(), [], [0]
    iter_tensors = packed_tensors.iter_tensors

    def counting(*args, **kwargs):
        for key, tensor in iter_tensors(*args, **kwargs):
            if key.rpartition(".")[0] in modules:
                streamed.add(key.rpartition(".")[0])
            most_held[0] = max(most_held[0], len(streamed) - len(built))
            yield key, tensor

    class CountingSparseLinear(ld.SparseLinear):
        def __init__(self, *args, **kwargs):
            built.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(packed_tensors, "iter_tensors", counting)
    monkeypatch.setattr(loader, "SparseLinear", CountingSparseLinear)
    ld.load(folder)
    assert len(built) == len(modules) and most_held[0] == 1


@pytest.mark.parametrize("where", ["same file", "later shard"])
def test_a_packed_module_gets_its_bias_whether_it_streams_before_or_after(packed, tmp_path, pack_prompts, where):
    """A packed module's bias is a plain tensor: in one file it streams before the module's packed tensors
    (keys are sorted), from a later shard after them. The SparseLinear gets it either way (it copies the bias
    it is built with), and inspect reads the module (it used to skip a module with a bias)."""
    out, _ = packed
    generator, biases = torch.Generator().manual_seed(0), {}

    def add_biases(state):
        for key in sorted(state):
            module, _, leaf = key.rpartition(".")
            if ".self_attn." in module and leaf in ("weight", "lb_shape", "nm_shape"):
                rows = state[key].shape[0] if leaf == "weight" else int(state[key][0])
                state[f"{module}.bias"] = biases.setdefault(module, torch.randn(rows, generator=generator))

    later = (lambda key: key.endswith(".bias")) if where == "later shard" else None
    folder = _edited_copy(out / "losa", tmp_path / "losa", add_biases, later)
    dense = _edited_copy(out / "hf", tmp_path / "hf", add_biases)
    for each in (folder, dense):
        _set_config(each, attention_bias=True)
    model, reference = ld.load(folder), ld.load_model(dense)
    assert len(biases) == 20
    for module, bias in biases.items():
        assert isinstance(model.get_submodule(module), ld.SparseLinear)
        assert torch.equal(model.get_submodule(module).bias, bias), module
    with torch.no_grad():
        ids = torch.tensor([pack_prompts[0]])
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-3, atol=1e-3)
    assert ld.load(folder, dtype="bf16").get_submodule(module).bias.dtype == torch.bfloat16
    assert len(ld.inspect(folder)["layers"]) == 35


def test_load_names_the_missing_bias_of_a_packed_module(packed, tmp_path):
    import shutil

    out, _ = packed
    folder = tmp_path / "nobias"
    shutil.copytree(out / "losa", folder)
    _set_config(folder, attention_bias=True)
    with pytest.raises(LosaError, match=r"is missing 20 weight\(s\), e.g. model.layers.0.self_attn.\w_proj.bias"):
        ld.load(folder)


def _edited_copy(folder, dest, edit, later=None):
    """A copy of the packed ``folder`` whose tensors ``edit(state)`` changed in place; ``later``: store it
    as two shards, the keys ``later(key)`` picks in the second."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dest)
    state = load_file(dest / "model.safetensors")
    edit(state)
    if later is None:
        save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
        return dest
    (dest / "model.safetensors").unlink()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {key: names[bool(later(key))] for key in state}
    for name in names:
        save_file({k: t for k, t in state.items() if weight_map[k] == name}, dest / name, metadata={"format": "pt"})
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest


def _set_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))

"""The ``deepsparse`` format: greedy tokens identical to transformers on ONNX Runtime and DeepSparse.

Logit tolerance: every generated step's fp32 logits agree with transformers' to 1e-3 absolute (observed
about 2e-5 on both engines); the greedy tokens must be identical.
"""

import os

import numpy as np
import onnx
import pytest
from conftest import PACK_NEW_TOKENS, greedy_reference
from onnx import numpy_helper

from losa_deploy import pack
from losa_deploy.engines.onnx_generate import deepsparse_pipeline_generate, onnx_generate
from losa_deploy.envinfo import deepsparse_python
from losa_deploy.models import load_model

pytestmark = pytest.mark.engine
LOGIT_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def packed(sparse_stories, tmp_path_factory, pack_prompts):
    """(the deepsparse folder, transformers' greedy tokens and logits on the hf output, per prompt)."""
    out = tmp_path_factory.mktemp("onnx")
    pack(sparse_stories, out / "hf", format="hf", progress=False)
    pack(sparse_stories, out / "ds", format="deepsparse", progress=False)
    model = load_model(out / "hf")
    return out / "ds", [greedy_reference(model, p, PACK_NEW_TOKENS) for p in pack_prompts]


def _assert_matches(results, references):
    for (tokens, logits), (ref_tokens, ref_logits) in zip(results, references):
        assert tokens.tolist() == ref_tokens
        assert np.abs(logits - ref_logits.numpy()).max() <= LOGIT_TOLERANCE


def test_graph_interface_is_what_deepsparse_reads(packed):
    folder, _ = packed
    model = onnx.load(folder / "model.onnx")
    inputs = [i.name for i in model.graph.input]
    assert inputs[:4] == ["input_ids", "attention_mask", "positions", "causal_mask"]
    assert inputs[4:] == [f"past_key_values.{i}.{k}" for i in range(5) for k in ("key", "value")]
    assert [o.name for o in model.graph.output] == ["logits"] + [f"present.{i}.{k}" for i in range(5)
                                                                 for k in ("key", "value")]
    assert model.opset_import[0].version == 14
    for path in ("config.json", "tokenizer.json", "losa_sparsity.json"):
        assert (folder / path).is_file()


def test_zeros_survive_in_the_initializers(packed, sparse_stories):
    """DeepSparse reads sparsity from the weights: each pruned linear is an initializer with its zeros."""
    from losa_deploy.models.tensors import iter_tensors

    folder, _ = packed
    initializers = [numpy_helper.to_array(t) for t in onnx.load(folder / "model.onnx").graph.initializer]
    zero_counts = sorted(int((a == 0).sum()) for a in initializers if a.ndim == 2)
    pruned = sorted(int((w == 0).sum()) for k, w in iter_tensors(sparse_stories) if k.endswith("proj.weight"))
    assert all(c > 0 for c in pruned)
    for count in pruned:  # every pruned weight appears (transposed) with exactly its zeros
        assert count in zero_counts
        zero_counts.remove(count)


def test_onnxruntime_matches_transformers(packed, pack_prompts):
    folder, references = packed
    _assert_matches(onnx_generate(folder, pack_prompts, PACK_NEW_TOKENS, engine="onnxruntime"), references)


def test_deepsparse_matches_transformers(packed, pack_prompts):
    if deepsparse_python() is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the DeepSparse venv is missing (make deepsparse-venv)")
        pytest.skip("the DeepSparse venv is missing (make deepsparse-venv)")
    folder, references = packed
    _assert_matches(onnx_generate(folder, pack_prompts, PACK_NEW_TOKENS, engine="deepsparse"), references)


def test_deepsparse_reads_initializers_stored_beside_the_graph(packed, pack_prompts, tmp_path):
    """An export over 2 GB keeps its initializers in files beside model.onnx (one per tensor, as the
    TorchScript exporter writes them); the DeepSparse runner shapes copies of the graph in a work folder,
    which must still find them."""
    import onnx

    if deepsparse_python() is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the DeepSparse venv is missing (make deepsparse-venv)")
        pytest.skip("the DeepSparse venv is missing (make deepsparse-venv)")
    folder, references = packed
    external = tmp_path / "external"
    external.mkdir()
    for item in folder.iterdir():
        if item.name != "model.onnx":
            (external / item.name).write_bytes(item.read_bytes())
    onnx.save(onnx.load(folder / "model.onnx"), external / "model.onnx", save_as_external_data=True,
              all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(external.iterdir())) > len(list(folder.iterdir())) + 10
    _assert_matches(onnx_generate(external, pack_prompts, PACK_NEW_TOKENS, engine="deepsparse"), references)


def test_deepsparse_text_generation_pipeline_accepts_the_export(packed):
    """DeepSparse's own TextGeneration pipeline (its tokenizer, engines and internal KV cache) opens the
    folder and generates the same greedy tokens."""
    from conftest import PACK_PROMPTS

    if deepsparse_python() is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the DeepSparse venv is missing (make deepsparse-venv)")
        pytest.skip("the DeepSparse venv is missing (make deepsparse-venv)")
    folder, references = packed
    export = (folder / "model.onnx").read_bytes()
    _assert_matches(deepsparse_pipeline_generate(folder, list(PACK_PROMPTS), PACK_NEW_TOKENS), references)
    # the pipeline rewrites the graph it opens with static shapes: it must be given a copy, not the export
    assert (folder / "model.onnx").read_bytes() == export


def test_tokenizer_config_is_one_transformers_4_reads(tmp_path, stories_dir):
    """transformers 5 writes a generic fast tokenizer as TokenizersBackend, which DeepSparse's transformers
    4.39 does not know: the export names PreTrainedTokenizerFast, and the tokens are the same."""
    import json
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(stories_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="TokenizersBackend", backend="tokenizers", is_local=True)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    pack(model, tmp_path / "ds", format="deepsparse", progress=False)
    written = json.loads((tmp_path / "ds" / "tokenizer_config.json").read_text())
    assert written["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "backend" not in written and "is_local" not in written
    text = "Once upon a time, a cat sat."
    assert (AutoTokenizer.from_pretrained(tmp_path / "ds")(text)["input_ids"]
            == AutoTokenizer.from_pretrained(stories_dir)(text)["input_ids"])


def test_generation_requests_are_checked(packed):
    from losa_deploy.errors import LosaError

    folder, _ = packed
    for prompts, new_tokens, match in [([[]], 4, "no empty one"), ([], 4, "at least one prompt"),
                                       ([[1, 2]], 0, "new_tokens must be at least 1"),
                                       ([[1] * 500], 20, "exceeds the model's 512 positions")]:
        with pytest.raises(LosaError, match=match):
            onnx_generate(folder, prompts, new_tokens)


def test_legacy_tokenizer_keeps_what_old_metaspace_would_tokenize_differently():
    """Old Metaspace always splits on spaces: with split false over a vocabulary holding a piece that spans
    a space ("▁▁", as Llama-2's does) the conversion would change the tokens, so it is refused."""
    from losa_deploy.export.legacy_tokenizer import legacy_tokenizer_json

    metaspace = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    tokenizer = {"model": {"type": "BPE", "vocab": {"\u2581a": 0, "b": 1}, "merges": [["\u2581", "a"]]},
                 "pre_tokenizer": metaspace, "decoder": metaspace}
    legacy = legacy_tokenizer_json(tokenizer)
    assert legacy["model"]["merges"] == ["\u2581 a"] and legacy["pre_tokenizer"]["add_prefix_space"] is True
    tokenizer["model"]["vocab"]["\u2581\u2581"] = 2
    assert legacy_tokenizer_json(tokenizer) is None
    assert legacy_tokenizer_json({**tokenizer, "pre_tokenizer": {**metaspace, "split": True}}) is not None


def test_export_warnings_reach_the_report(tmp_path, stories_dir):
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(stories_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "sliding_window": 64}))
    result = pack(model, tmp_path / "ds", format="deepsparse", progress=False)
    assert any("sliding-window attention" in w and "up to 64" in w for w in result["warnings"])
    assert any("no sparsity" in w for w in result["warnings"])  # stories260K itself is dense


def test_onnx_generation_refuses_sequences_past_a_sliding_window(tmp_path, stories_dir, rng):
    """The graph attends to every past position: past a sliding window its logits are full attention's
    (measured: relative error 1.5 on an 8-token window), so generation refuses that instead of answering;
    within the window it runs, and a model whose config turns the window off runs past it."""
    import json
    import shutil

    import torch

    from losa_deploy.engines.onnx_generate import onnx_generate
    from losa_deploy.errors import LosaError

    model = tmp_path / "model"
    shutil.copytree(stories_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "sliding_window": 24}))
    pack(model, tmp_path / "ds", format="deepsparse", progress=False)
    prompt = torch.randint(3, 500, (int(torch.randint(10, 20, (1,), generator=rng)),), generator=rng).tolist()
    with pytest.raises(LosaError, match="exceed the model's 24-token sliding window"):
        onnx_generate(tmp_path / "ds", [prompt], 25 - len(prompt))
    assert len(onnx_generate(tmp_path / "ds", [prompt], 24 - len(prompt))[0][0]) == 24 - len(prompt)
    ds_config = json.loads((tmp_path / "ds" / "config.json").read_text())
    (tmp_path / "ds" / "config.json").write_text(json.dumps({**ds_config, "use_sliding_window": False}))
    assert len(onnx_generate(tmp_path / "ds", [prompt], 30)[0][0]) == 30

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


def test_deepsparse_text_generation_pipeline_accepts_the_export(packed):
    """DeepSparse's own TextGeneration pipeline (its tokenizer, engines and internal KV cache) opens the
    folder and generates the same greedy tokens."""
    from conftest import PACK_PROMPTS

    if deepsparse_python() is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the DeepSparse venv is missing (make deepsparse-venv)")
        pytest.skip("the DeepSparse venv is missing (make deepsparse-venv)")
    folder, references = packed
    _assert_matches(deepsparse_pipeline_generate(folder, list(PACK_PROMPTS), PACK_NEW_TOKENS), references)

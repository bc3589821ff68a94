"""Pack -> load -> serve on every claimed family (llama, mistral, qwen2 with q/k/v biases, qwen3 with q/k
norms, opt), not only stories260K: tiny random models with ragged widths, magnitude-pruned 50% and 2:4.

Reference: plain ``AutoModelForCausalLM.from_pretrained`` of the unpacked pruned model, fp32. Tolerance:
logits to 1e-4 of their largest magnitude (observed about 1e-6), greedy tokens identical.
"""

import pytest
import torch
from conftest import greedy_reference, magnitude_prune_, tiny_config

import losa_deploy as ld
from losa_deploy.models import get_architecture

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "opt"]
NEW_TOKENS = 12


def _pruned_family(model_type: str, pattern: str, out, rng, config=None):
    """A tiny random model of ``model_type`` (``config``: tiny_config's) with random biases and norm weights (so qwen2's q/k/v biases
    and qwen3's q/k norms matter), every prunable linear pruned to ``pattern``; saved to ``out``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(int(torch.randint(2**31, (1,), generator=rng)))
    config = config or tiny_config(model_type)
    if model_type == "opt":
        config.init_std = 0.2
    else:
        config.initializer_range = 0.2  # peaked logits: greedy tokens are not decided by rounding
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=rng))
        for linear in get_architecture(model).linears(model).values():
            magnitude_prune_(linear.weight, pattern)
    model.save_pretrained(out)
    return AutoModelForCausalLM.from_pretrained(out).eval()


def _assert_close(logits, reference):
    scale = reference.abs().max()
    assert float((logits - reference).abs().max()) <= 1e-4 * float(scale)


@pytest.mark.parametrize("pattern", ["50%", "2:4"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_losa_and_vllm_formats_load_as_transformers_runs_them(model_type, pattern, tmp_path, rng):
    reference = _pruned_family(model_type, pattern, tmp_path / "pruned", rng)
    ids = torch.randint(0, 96, (2, 11), generator=rng)
    prompt = ids[0, :5].tolist()
    with torch.no_grad():
        expected = reference(ids).logits
    tokens, logits = greedy_reference(reference, prompt, NEW_TOKENS)
    for fmt in ("losa", "vllm"):
        ld.pack(tmp_path / "pruned", tmp_path / fmt, format=fmt, progress=False)
        model = ld.load(tmp_path / fmt)
        assert sum(isinstance(m, ld.SparseLinear) for m in model.modules()) == 2 * len(
            get_architecture(model).linear_names)
        with torch.no_grad():
            _assert_close(model(ids).logits, expected)
        got_tokens, got_logits = greedy_reference(model, prompt, NEW_TOKENS)
        assert got_tokens == tokens
        _assert_close(got_logits, logits)
    sparse = ld.sparsify_(_pruned_family(model_type, pattern, tmp_path / "again", rng), progress=False)
    reference = ld.load_model(tmp_path / "again")
    with torch.no_grad():
        _assert_close(sparse(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_onnx_export_runs_as_transformers_on_every_llama_layout_family(model_type, tmp_path, rng):
    pytest.importorskip("onnxruntime")
    from losa_deploy.engines.onnx_generate import onnx_generate

    reference = _pruned_family(model_type, "50%", tmp_path / "pruned", rng)
    ld.pack(tmp_path / "pruned", tmp_path / "ds", format="deepsparse", progress=False)
    prompts = [torch.randint(0, 96, (n,), generator=rng).tolist() for n in (3, 9)]
    for (tokens, logits), prompt in zip(onnx_generate(tmp_path / "ds", prompts, NEW_TOKENS), prompts):
        ref_tokens, ref_logits = greedy_reference(reference, prompt, NEW_TOKENS)
        assert tokens.tolist() == ref_tokens
        _assert_close(torch.from_numpy(logits), ref_logits)


def test_onnx_export_refuses_opt_with_one_error_line(cli, tmp_path, rng, capsys):
    _pruned_family("opt", "50%", tmp_path / "pruned", rng)
    capsys.readouterr()
    code, _, err = cli("pack", tmp_path / "pruned", "-o", tmp_path / "ds", "--format", "deepsparse", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "not opt" in err
    assert not (tmp_path / "ds").exists()


def test_a_checkpoint_of_the_base_model_packs_and_inspects(tmp_path, rng):
    """facebook/opt-* store the base model's keys (``decoder.layers.0...``, no ``model.``), which transformers
    and vLLM load under the prefix. inspect found no prunable linear in them (and reported 100% sparsity),
    pack refused them as missing every weight."""
    from safetensors.torch import load_file, save_file

    reference = _pruned_family("opt", "50%", tmp_path / "pruned", rng)
    stored = load_file(tmp_path / "pruned" / "model.safetensors")
    assert all(key.startswith("model.") for key in stored)
    save_file({key[len("model."):]: t for key, t in stored.items()}, tmp_path / "pruned" / "model.safetensors",
              metadata={"format": "pt"})
    report = ld.inspect(tmp_path / "pruned")
    assert len(report["layers"]) == 12 and report["layers"][0]["name"] == "model.decoder.layers.0.self_attn.q_proj"
    assert abs(report["global_sparsity"] - 0.5) < 0.01
    ld.pack(tmp_path / "pruned", tmp_path / "losa", format="losa", progress=False)
    ids = torch.randint(0, 96, (2, 11), generator=rng)
    with torch.no_grad():
        _assert_close(ld.load(tmp_path / "losa")(ids).logits, reference(ids).logits)


@pytest.mark.engine
@pytest.mark.slow
def test_vllm_plugin_serves_every_family_as_transformers(tmp_path, rng, stories_dir):
    """vLLM (CPU) through the losa_sparse plugin on qwen2 (q/k/v biases), qwen3 (q/k norms, head_dim set
    apart from hidden / heads), opt (its own layer names, biases everywhere) and mistral: greedy tokens equal
    transformers', log-probabilities to 1e-3 (observed about 1e-5). vLLM's CPU attention needs a head size
    of 32 or more, so these models are wider than tiny_config's; vLLM opens a tokenizer, so they take
    stories260K's (vocabulary 512)."""
    import json
    import shutil
    import subprocess
    import sys

    pytest.importorskip("vllm")
    from transformers import AutoConfig

    common = dict(vocab_size=512, num_hidden_layers=2, max_position_embeddings=64, num_attention_heads=4)
    configs = {
        "qwen2": AutoConfig.for_model("qwen2", hidden_size=128, intermediate_size=68, num_key_value_heads=2, **common),
        "qwen3": AutoConfig.for_model("qwen3", hidden_size=96, intermediate_size=68, num_key_value_heads=2,
                                      head_dim=32, **common),
        "opt": AutoConfig.for_model("opt", hidden_size=128, ffn_dim=68, word_embed_proj_dim=128, **common),
        "mistral": AutoConfig.for_model("mistral", hidden_size=128, intermediate_size=68, num_key_value_heads=1,
                                        **common),
    }
    references, runs = {}, []
    prompts = [torch.randint(0, 512, (n,), generator=rng).tolist() for n in (4, 9)]
    for i, (model_type, config) in enumerate(configs.items()):
        pattern = ("50%", "2:4")[i % 2]
        model = _pruned_family(model_type, pattern, tmp_path / model_type, rng, config=config)
        references[model_type] = [greedy_reference(model, p, NEW_TOKENS) for p in prompts]
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(stories_dir / name, tmp_path / model_type / name)
        ld.pack(tmp_path / model_type, tmp_path / f"{model_type}-vllm", format="vllm", progress=False)
        runs.append({"model": str(tmp_path / f"{model_type}-vllm"), "prompts": prompts, "new_tokens": NEW_TOKENS,
                     "dtype": "float32", "max_model_len": 32, "kv_cache_bytes": 32 << 20})
    (tmp_path / "request.json").write_text(json.dumps(runs))
    done = subprocess.run([sys.executable, "-m", "losa_deploy.engines.vllm_generate", tmp_path / "request.json",
                           tmp_path / "result.json"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for model_type, run in zip(configs, json.loads((tmp_path / "result.json").read_text())):
        (worker,) = run["workers"]
        assert worker["losa_layers"] == 4 * 2 and worker["dense_fallback"] == 0, model_type
        for tokens, logprobs, (ref_tokens, ref_logits) in zip(run["tokens"], run["logprobs"], references[model_type]):
            assert tokens == ref_tokens, model_type
            ref_logprobs = torch.log_softmax(ref_logits.double(), -1)[torch.arange(len(tokens)), tokens]
            assert (torch.tensor(logprobs, dtype=torch.float64) - ref_logprobs).abs().max() <= 1e-3, model_type

"""Prune -> fine-tune -> merge on every supported family, against plain PyTorch references.

Most end-to-end tests run on stories260K (llama); these check what differs between families: OPT's
module names and checkpoint layout, ReLU MLPs, Qwen2's q/k/v biases, Qwen3's q/k norms.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file


def _save_tiny(model_type: str, out, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    model.save_pretrained(out)
    return model


def _headless_copy(src, out):
    """The checkpoint as facebook/opt-* store it: saved from the bare OPTModel (``decoder.layers...``, no
    ``model.`` prefix, no tied lm_head). transformers loads it under the usual names."""
    out.mkdir()
    (out / "config.json").write_bytes((src / "config.json").read_bytes())
    state = load_file(src / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in state.items() if not k.startswith("lm_head")},
              out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_a_headless_opt_checkpoint_is_read_under_the_model_names(tmp_path, rng):
    """inspect found no prunable linear in it (0 weights, "100% sparse"), and LoSA's dense reference read
    no weights, so it silently ran the current, pruned block as the reference."""
    from losa_deploy.models import get_architecture, load_model
    from losa_deploy.sparsity.calibration import checkpoint_reference
    from losa_deploy.sparsity.report import inspect_checkpoint

    model = _save_tiny("opt", tmp_path / "full", int(torch.randint(1 << 30, (1,), generator=rng)))
    arch = get_architecture(model)
    with torch.no_grad():  # some zeros, so that sparsity is measured too
        for lin in arch.linears(model).values():
            lin.weight[torch.rand(lin.weight.shape, generator=rng) < 0.3] = 0.0
    model.save_pretrained(tmp_path / "full")
    headless = _headless_copy(tmp_path / "full", tmp_path / "headless")
    assert torch.equal(load_model(headless).model.decoder.layers[1].fc2.weight, model.model.decoder.layers[1].fc2.weight)

    report = inspect_checkpoint(headless)
    expected = {name: 1 - float((lin.weight != 0).float().mean()) for name, lin in arch.linears(model).items()}
    assert {r["name"]: r["sparsity"] for r in report["layers"]} == pytest.approx(expected)

    for index, block in enumerate(arch.block_list(model)):
        state = checkpoint_reference(headless, arch)(index)
        assert state.keys() == block.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in block.state_dict().items())


def test_a_reference_checkpoint_without_the_block_is_refused(tmp_path):
    from losa_deploy.errors import LosaError
    from losa_deploy.models import get_architecture
    from losa_deploy.sparsity.calibration import checkpoint_reference

    model = _save_tiny("llama", tmp_path / "llama", 0)
    with pytest.raises(LosaError, match="no weights of block 5"):
        checkpoint_reference(tmp_path / "llama", get_architecture(model))(5)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "opt"])
def test_losa_on_every_family_merges_to_the_reference(family, stories_dir, tinystories, tmp_path):
    """LoSA with SparseGPT (the base absorbs the pruner's update) on each family: OUT equals W + s·(B·A)⊙M
    computed here from OUT/base and the saved factors, its zeros are OUT/base's, and everything that is not
    a prunable linear (biases, q/k norms, positional embeddings, tied head) is the input's, bit for bit."""
    import json

    from transformers import AutoModelForCausalLM

    import losa_deploy as ld
    from losa_deploy.models import get_architecture, load_tokenizer

    config = tiny_config(family)
    config.vocab_size = 512  # stories260K's tokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random biases and norms, so that a dropped or pruned one shows
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path / "dense")
    load_tokenizer(stories_dir).save_pretrained(tmp_path / "dense")
    out = tmp_path / "out"
    ld.finetune(tmp_path / "dense", out, str(tinystories), method="losa", sparsity=0.5, pruner="sparsegpt", steps=2,
                first_rank=4, allocation="uniform", lr=5e-3, max_len=32, batch_size=4, grad_accum=1, budget_tokens=256,
                nsamples=16, seqlen=32, calib=str(tinystories), data_slice="0:0.5", save_base=True, progress=False)

    dense, merged, base = (load_file(p / "model.safetensors") for p in (tmp_path / "dense", out, out / "base"))
    assert merged.keys() == base.keys() == dense.keys()
    prunable = get_architecture(model).weight_key_pattern()
    for key in dense:
        if not prunable.match(key):
            assert torch.equal(merged[key], dense[key]) and torch.equal(base[key], dense[key]), key
    factors = load_file(out / "adapter" / "adapter_model.safetensors")
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    scale = json.loads((out / "adapter" / "losa_adapter.json").read_text())["scale"]
    assert scale == adapter["lora_alpha"] / adapter["r"]
    sparsity = []
    for key in filter(prunable.match, dense):
        module = key.removesuffix(".weight")
        a = factors[f"base_model.model.{module}.lora_A.weight"].double()
        b = factors[f"base_model.model.{module}.lora_B.weight"].double()
        w = base[key].double()
        expected = (w + scale * (b @ a) * (w != 0)).float() + 0.0
        assert torch.equal(merged[key] != 0, base[key] != 0), key
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=2e-7)
        sparsity.append(float((w == 0).double().mean()))
        assert not bool(((dense[key] == 0) & (w != 0)).any())  # no zero of the input regrows
    assert sum(sparsity) / len(sparsity) == pytest.approx(0.5, abs=0.02)
    # OUT/base carries a sidecar that matches its zeros, under each family's module names
    assert ld.inspect(out / "base")["sidecar"]["verified_modules"] == len(sparsity)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "opt"])
def test_wanda_masks_equal_a_full_model_reference(family, rng):
    """Wanda through the block runner equals Wanda written with hooks on the whole model's forward: block
    by block, |W|·||X||_2 of the inputs each linear receives with the earlier blocks already pruned. Mistral
    with a window shorter than the windows, so its sliding-window mask matters."""
    from transformers import AutoModelForCausalLM

    from losa_deploy.models import get_architecture
    from losa_deploy.sparsity.prune import PruneConfig, prune_model

    config = tiny_config(family)
    if family == "mistral":
        config.sliding_window = 8
    torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=rng)))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    reference.load_state_dict(model.state_dict())
    windows = torch.randint(config.vocab_size, (12, 32), generator=rng)
    prune_model(model, PruneConfig(method="wanda", sparsity=0.5, batch_size=5), windows, progress=False)

    arch = get_architecture(reference)
    for block in arch.block_list(reference):
        linears = arch.block_linears(block)
        squares = {name: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in linears.items()}

        def hook(name, squares=squares):
            def record(_module, args):
                squares[name].add_(args[0].reshape(-1, args[0].shape[-1]).double().square().sum(0))
            return record

        handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
        with torch.no_grad():
            reference(input_ids=windows, use_cache=False)
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, lin in linears.items():
                score = lin.weight.abs() * squares[name].sqrt().float()
                drop = score.argsort(dim=1)[:, : lin.in_features // 2]
                lin.weight.scatter_(1, drop, 0.0)
    # (a score tie within float rounding, from the different batching, could flip one pair: never seen)
    for name, lin in arch.linears(model).items():
        differ = int(((lin.weight != 0) != (reference.get_submodule(name).weight != 0)).sum())
        assert differ <= 2, f"{name}: {differ} entries of the mask differ"

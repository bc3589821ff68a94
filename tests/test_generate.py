"""``losa-deploy generate`` / ``ld.generate``: a prompt through a packed or pruned model on our runtime gives
transformers' own greedy tokens (and seeded samples), streams the text, and refuses bad input first."""

from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import greedy_reference

import losa_deploy as ld
from losa_deploy.models import load_tokenizer

PROMPT = "Lily wanted to play with the big"


@pytest.fixture(scope="module")
def packed_stories(sparse_stories, tmp_path_factory):
    out = tmp_path_factory.mktemp("generate") / "losa"
    ld.pack(sparse_stories, out, format="losa", progress=False)
    return out


def _reference_tokens(model_dir, new_tokens: int) -> list[int]:
    ids = load_tokenizer(model_dir)(PROMPT)["input_ids"]
    return greedy_reference(ld.load_model(model_dir), ids, new_tokens)[0]


@pytest.mark.parametrize("which", ["packed", "pruned"])
def test_greedy_tokens_are_transformers_tokens(which, packed_stories, sparse_stories):
    # A packed folder opens with ld.load, a pruned one is sparsified: both run SparseLinear.
    model = packed_stories if which == "packed" else sparse_stories
    stream = io.StringIO()
    got = ld.generate(model, PROMPT, max_new_tokens=24, ignore_eos=True, stream=stream, progress=False)
    assert got["token_ids"] == _reference_tokens(sparse_stories, 24)
    assert got["new_tokens"] == 24 and got["prompt_tokens"] == len(load_tokenizer(sparse_stories)(PROMPT)["input_ids"])
    tokenizer = load_tokenizer(sparse_stories)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    assert tokenizer.decode(prompt_ids + got["token_ids"], skip_special_tokens=True) == \
        tokenizer.decode(prompt_ids, skip_special_tokens=True) + got["text"]
    assert stream.getvalue().strip() == got["text"].strip()  # streamed as it was decoded
    assert "losa SparseLinear (35 " in got["kernel_path"]
    assert got["prefill_s"] > 0 and got["decode_tokens_per_s"] > 0


def test_sampling_follows_the_seed(packed_stories):
    kw = dict(max_new_tokens=20, ignore_eos=True, temperature=1.3, top_p=0.95, progress=False)
    first, again = ld.generate(packed_stories, PROMPT, seed=1, **kw), ld.generate(packed_stories, PROMPT, seed=1, **kw)
    assert first["token_ids"] == again["token_ids"]
    others = {tuple(ld.generate(packed_stories, PROMPT, seed=s, **kw)["token_ids"]) for s in (2, 3, 4)}
    assert others != {tuple(first["token_ids"])}  # a sampler that ignored the seed would repeat itself
    assert first["sampling"] == "temperature 1.3, top-p 0.95, seed 1"
    state = torch.get_rng_state()
    ld.generate(packed_stories, PROMPT, seed=5, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left alone


def test_cli_streams_prompt_and_text_and_writes_json(cli, packed_stories, tmp_path):
    report = tmp_path / "gen.json"
    code, out, err = cli("generate", packed_stories, "--prompt", PROMPT, "--max-new-tokens", "12", "--ignore-eos",
                         "--json", report, "--no-progress")
    assert code == 0, err
    result = json.loads(report.read_text())
    assert out.rstrip("\n") == PROMPT + result["text"]
    assert result["new_tokens"] == 12 and result["command"] == "generate" and result["prompt"] == PROMPT
    assert "12 new tokens, greedy" in err and "SparseLinear" in err


def test_prompt_file(cli, packed_stories, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT, encoding="utf-8")
    code, out, err = cli("generate", packed_stories, "--prompt-file", prompt, "--max-new-tokens", "4", "--no-progress")
    assert code == 0, err
    assert out.startswith(PROMPT) and len(out) > len(PROMPT)


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "x", "--temperature", "-1"], "temperature must be 0"),
    (["--prompt", "x", "--temperature", "nan"], "temperature must be 0"),
    (["--prompt", "x", "--top-p", "0"], "top-p must be in (0, 1]"),
    (["--prompt", "x", "--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["--prompt", "x", "--device", "gpu0"], "bad device"),
    (["--prompt", "x", "--chat"], "needs a chat template"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "does not exist"),
    (["--prompt", "x", "--max-new-tokens", "0"], "expected a positive integer"),
    ([], "one of the arguments --prompt --prompt-file is required"),
])
def test_bad_input_is_one_line_and_exit_2(cli, packed_stories, args, message):
    code, out, err = cli("generate", packed_stories, *args, "--no-progress")
    assert code == 2 and err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1, err
    assert out == ""


def test_non_utf8_prompt_file(cli, packed_stories, tmp_path):
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    code, _, err = cli("generate", packed_stories, "--prompt-file", bad, "--no-progress")
    assert code == 2 and "is not UTF-8 text" in err


def test_generated_model_runs_on_the_in_place_cache(sparse_stories):
    from losa_deploy.runtime.cache import GrowingCache
    from losa_deploy.runtime.serving import open_model

    model = open_model(sparse_stories, progress=False)
    ids = torch.tensor([load_tokenizer(sparse_stories)(PROMPT)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert type(out.past_key_values) is GrowingCache

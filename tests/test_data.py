"""Data sources, slices, windows, instruction examples and self-generated calibration."""

import json
import re

import pytest
import torch

from losa_deploy.data import (
    IGNORE_INDEX,
    calibration_windows,
    collate,
    eval_windows,
    parse_slice,
    read_source,
    sample_windows,
    self_generate,
    slice_source,
    tokenize_examples,
    tokenize_text,
)
from losa_deploy.errors import LosaError
from losa_deploy.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def stories(stories_dir):
    return load_model(stories_dir), load_tokenizer(stories_dir)


def test_formats(tmp_path, assets):
    (tmp_path / "a.txt").write_text("one story.\n\nanother story.")
    assert read_source(tmp_path / "a.txt").text == "one story.\n\nanother story."
    (tmp_path / "b.jsonl").write_text('{"text": "alpha"}\n\n{"text": "beta"}\n')
    assert read_source(tmp_path / "b.jsonl").text == "alpha\n\nbeta"
    (tmp_path / "c.json").write_text(json.dumps([{"body": "x1"}, {"body": "x2"}]))
    assert read_source(tmp_path / "c.json", text_field="body").text == "x1\n\nx2"
    alpaca = read_source(assets / "data" / "alpaca-700.json")
    assert alpaca.is_instruct and len(alpaca.examples) == 700
    first = alpaca.examples[0]
    assert first.prompt.startswith("Below is an instruction") and first.prompt.endswith("### Response:\n")
    assert first.response == "They walked to a nearby store."
    with_input = alpaca.examples[1]
    assert "### Input:\nThe president delivered a speech yesterday." in with_input.prompt


@pytest.mark.parametrize("content,match", [("   \n", "empty"), ("[1, 2]", "list of JSON objects"),
                                           ('[{"instruction": "a", "output": " "}]', "no usable examples"),
                                           ('[{"other": 1}]', "no text field"), ("{bad", "not valid JSON")])
def test_bad_files(tmp_path, content, match):
    path = tmp_path / ("x.txt" if content.strip() == "" else "x.json")
    path.write_text(content)
    with pytest.raises(LosaError, match=match):
        read_source(path)


def test_slices_are_disjoint_and_cover(tinystories):
    source = read_source(tinystories)
    text = source.text
    train = slice_source(source, *parse_slice("0:0.8")).text
    test = slice_source(source, *parse_slice("0.8:1")).text
    # The train slice is a prefix and the test slice the rest, split at one blank line: no shared character.
    assert text.startswith(train) and text.rstrip("\n").endswith(test)
    cut = len(train)
    assert text[cut:].strip("\n") == test and text[cut: cut + 2] == "\n\n"
    assert 0.7 < len(train) / len(text) < 0.9
    for bad in ("0.5", "0.9:0.1", "a:b", "0:1.5"):
        with pytest.raises(LosaError, match="bad slice"):
            parse_slice(bad)


def test_slices_of_a_text_without_blank_lines(assets):
    """wikitext2's raw file, as read, has no blank lines: slices then cut at line breaks."""
    source = read_source(assets / "data" / "wikitext2-test.raw")
    halves = [slice_source(source, *parse_slice(s)).text for s in ("0:0.5", "0.5:1")]
    assert all(len(h) > 0.4 * len(source.text) for h in halves)
    assert source.text.strip("\n").startswith(halves[0]) and source.text.rstrip("\n").endswith(halves[1])


def test_windows(stories, tinystories, rng):
    _, tok = stories
    ids = tokenize_text(tok, read_source(tinystories).text)
    seqlen = int(torch.randint(17, 300, (), generator=rng))
    win = eval_windows(ids, seqlen)
    assert win.shape == (ids.numel() // seqlen, seqlen)
    assert torch.equal(win.flatten(), ids[: win.numel()])
    assert eval_windows(ids, seqlen, max_windows=3).shape == (3, seqlen)
    with pytest.raises(LosaError, match="shorter than one window"):
        eval_windows(ids[:10], 11)
    a, b = sample_windows(ids, 5, seqlen, seed=3), sample_windows(ids, 5, seqlen, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, sample_windows(ids, 5, seqlen, seed=4))
    for row in a:  # every sampled window is a real slice of the stream
        start = (ids.unfold(0, seqlen, 1) == row).all(1).nonzero()
        assert start.numel() >= 1


def test_instruction_examples_mask_the_prompt(stories, assets):
    _, tok = stories
    examples = read_source(assets / "data" / "alpaca-700.json").examples[:6]
    items = tokenize_examples(tok, examples, max_len=512, response_only=True)
    for ex, item in zip(examples, items):
        # trained on exactly the tokens of the rendered text (then EOS), not prompt and response apart
        assert item.input_ids.tolist() == tok(ex.prompt + ex.response)["input_ids"] + [tok.eos_token_id]
        n_prompt = len(tok(ex.prompt)["input_ids"])
        assert (item.labels[:n_prompt] == IGNORE_INDEX).all()
        assert torch.equal(item.labels[n_prompt:], item.input_ids[n_prompt:])
    full = tokenize_examples(tok, examples, max_len=512, response_only=False)
    assert all(torch.equal(f.labels, f.input_ids) for f in full)
    batch = collate(items[:3], pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert ((batch["attention_mask"] == 0) <= (batch["labels"] == IGNORE_INDEX)).all()
    with pytest.raises(LosaError, match="no usable examples"):
        tokenize_examples(tok, examples, max_len=8)


def test_self_generation_is_seeded_and_fills_windows(stories):
    model, tok = stories
    a = self_generate(model, tok, nsamples=3, seqlen=24, seed=7, batch_size=2, progress=False)
    b = self_generate(model, tok, nsamples=3, seqlen=24, seed=7, batch_size=3, progress=False)
    assert a.shape == (3, 24) and (a[:, 0] == tok.bos_token_id).all()
    assert not (a[:, 1:] == tok.eos_token_id).any()
    assert torch.equal(a, b)  # same seed, whatever the batch size
    assert not torch.equal(a, self_generate(model, tok, 3, 24, seed=8, progress=False))
    # self-generated text is what the model finds likely: far below a uniform guess (ppl 512)
    from losa_deploy.eval import perplexity

    assert perplexity(model, a, progress=False)["ppl"] < 50
    cal = calibration_windows(model, tok, "self", nsamples=2, seqlen=16, seed=1, progress=False)
    assert cal.shape == (2, 16)


def _nucleus_reference(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Float64 top-p distribution of one row: the smallest sorted prefix reaching top_p, renormalised."""
    p = torch.softmax(logits.double(), -1)
    sorted_p, order = p.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p <= top_p
    out = torch.zeros_like(p)
    out[order[keep]] = sorted_p[keep]
    return out / out.sum()


@pytest.mark.parametrize("scale", [4.0, 0.05])  # peaked (nucleus among the top candidates); flat (full sort)
def test_top_p_sampler_draws_from_the_nucleus(rng, scale):
    from losa_deploy.data.selfgen import _NUCLEUS_CANDIDATES, _sample

    vocab, draws, top_p = 3 * _NUCLEUS_CANDIDATES + 17, 3000, 0.9
    logits = torch.randn(vocab, generator=rng) * scale
    ref = _nucleus_reference(logits, top_p)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    gens = [torch.Generator().manual_seed(seed + i) for i in range(draws)]
    tokens = _sample(logits.expand(draws, vocab), 1.0, top_p, gens).flatten()
    assert (ref[tokens] > 0).all()  # never outside the nucleus
    counts = torch.bincount(tokens, minlength=vocab).double()
    # Frequencies agree with the reference: total variation over the 20 likeliest tokens one by one, the
    # rest of the top candidates, and everything beyond them (which the flat case must reach).
    order = ref.argsort(descending=True)
    groups = [order[i:i + 1] for i in range(20)] + [order[20:_NUCLEUS_CANDIDATES], order[_NUCLEUS_CANDIDATES:]]
    expected = torch.stack([ref[g].sum() for g in groups])
    observed = torch.stack([counts[g].sum() for g in groups]) / draws
    assert 0.5 * (observed - expected).abs().sum() < 0.06
    again = _sample(logits.expand(draws, vocab), 1.0, top_p,
                    [torch.Generator().manual_seed(seed + i) for i in range(draws)]).flatten()
    assert torch.equal(tokens, again)  # seeded


@pytest.mark.parametrize("record,message", [
    ({"instruction": None, "output": "x"}, "record 2 has a non-text 'instruction' (null)"),
    ({"instruction": 5, "output": "x"}, "record 2 has a non-text 'instruction' (int)"),
    ({"instruction": "a", "input": 7, "output": "x"}, "record 2 has a non-text 'input' (int)"),
    ({"instruction": "a", "output": None}, "record 2 has a non-text 'output' (null)"),
], ids=["null-instruction", "int-instruction", "int-input", "null-output"])
def test_malformed_instruction_records_are_refused(tmp_path, record, message):
    """A record whose field is not text names itself (it was a traceback, or a null output trained as the
    text "None"); a null input is an absent one."""
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "input": None, "output": "Hi."}, record]))
    with pytest.raises(LosaError, match=re.escape(message)):
        read_source(path)
    path.write_text(json.dumps([{"instruction": "Say hi.", "input": None, "output": "Hi."}]))
    (example,) = read_source(path).examples
    assert example.response == "Hi." and "### Input" not in example.prompt


def test_null_text_fields_are_skipped_not_read_as_none(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "one story"}\n{"text": null}\n{"other": 1}\n{"text": "two"}\n')
    assert read_source(path).as_text() == "one story\n\ntwo"
    path.write_text('{"text": "one"}\n{"text": 3}\n')
    with pytest.raises(LosaError, match="record 2 has a non-text 'text' \\(int\\)"):
        read_source(path)


class _PairTokenizer:
    """Characters, except that "ab" is one token: a merge across the prompt/response boundary."""

    eos_token_id = 99

    def __call__(self, text, add_special_tokens=True, verbose=False):
        ids, i = [], 0
        while i < len(text):
            if text[i:i + 2] == "ab":
                ids.append(0)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ids}


def test_a_token_across_the_prompt_boundary_is_learned_not_masked():
    from losa_deploy.data.sources import Example

    (item,) = tokenize_examples(_PairTokenizer(), [Example("xa", "by")], max_len=16)
    assert item.input_ids.tolist() == [ord("x"), 0, ord("y"), 99]  # the joined text's tokens, EOS once
    assert item.labels.tolist() == [IGNORE_INDEX, 0, ord("y"), 99]


class _EosTokenizer(_PairTokenizer):
    """One that ends every text with EOS itself (add_eos_token=True)."""

    def __call__(self, text, add_special_tokens=True, verbose=False):
        ids = super().__call__(text)["input_ids"]
        return {"input_ids": ids + [99] if add_special_tokens else ids}


def test_eos_is_not_doubled():
    from losa_deploy.data.sources import Example

    (item,) = tokenize_examples(_EosTokenizer(), [Example("q", "yz")], max_len=16)
    assert item.input_ids.tolist() == [ord("q"), ord("y"), ord("z"), 99]

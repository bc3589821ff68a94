"""Perplexity: the protocol against a float64 reference, and the real-model bar."""

import json
import math

import torch
import torch.nn.functional as F

import losa_deploy as ld
from losa_deploy.eval import perplexity
from losa_deploy.models import load_model


def test_matches_float64_reference(stories_dir, rng):
    model = load_model(stories_dir)
    n, seqlen = int(torch.randint(1, 6, (), generator=rng)), int(torch.randint(5, 70, (), generator=rng))
    windows = torch.randint(0, model.config.vocab_size, (n, seqlen), generator=rng)
    got = perplexity(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(windows).logits.double()
    nll = -F.log_softmax(logits[:, :-1], -1).gather(-1, windows[:, 1:, None]).mean()
    assert math.isclose(got["nll"], nll.item(), rel_tol=1e-5)
    assert math.isclose(got["ppl"], math.exp(nll.item()), rel_tol=1e-5)
    assert (got["windows"], got["seqlen"], got["tokens"]) == (n, seqlen, n * seqlen)


def test_cli_eval_real_model_below_10(cli, stories_dir, tinystories, tmp_path):
    out = tmp_path / "ppl.json"
    code, stdout, _ = cli("eval", stories_dir, "--data", tinystories, "--seqlen", 256, "--json", out,
                          "--no-progress")
    assert code == 0
    result = json.loads(out.read_text())
    assert result["ppl"] < 10 and result["seqlen"] == 256
    assert result["windows"] == result["tokens"] // 256 > 500
    assert f"{result['ppl']:.4f}" in stdout


def test_random_init_model_is_near_uniform(stories_dir, tinystories, tmp_path, cli):
    # The same protocol on an untrained model of the same shape: ~vocab size (512), so the bar above means
    # something.
    from transformers import AutoModelForCausalLM

    trained = load_model(stories_dir)
    torch.manual_seed(0)
    random = AutoModelForCausalLM.from_config(trained.config)
    random.save_pretrained(tmp_path / "random")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "random" / f).write_bytes((stories_dir / f).read_bytes())
    out = tmp_path / "r.json"
    assert cli("eval", tmp_path / "random", "--data", tinystories, "--seqlen", 256, "--max-windows", 20,
               "--json", out, "--no-progress")[0] == 0
    assert json.loads(out.read_text())["ppl"] > 300


def test_self_data_scores_at_most_max_windows(stories_dir):
    result = ld.evaluate(stories_dir, "self", seqlen=16, nsamples=3, max_windows=2, progress=False)
    assert result["windows"] == 2 and result["seqlen"] == 16 and result["slice"] is None
    assert math.isfinite(result["ppl"]) and result["ppl"] > 1

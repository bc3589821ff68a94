"""The block runner: block by block it reproduces the model, streams its signals, and hosts LoSA's seams."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from losa_deploy.models import get_architecture, load_model
from losa_deploy.sparsity.calibration import (
    BlockCollector,
    BlockRunner,
    GramCollector,
    ReconstructionError,
    checkpoint_reference,
)
from losa_deploy.sparsity.prune import PruneConfig, prune_model
from tests.conftest import tiny_config


class LastOutputs(BlockCollector):
    def block_output(self, step, outputs, reference):
        self.outputs = outputs.clone()


def _final_logits(model, hidden):
    arch = get_architecture(model)
    return model.lm_head(model.get_submodule(arch.final_norm)(hidden))


def _sliding_qwen2():
    """Qwen2 whose layers mix full and sliding-window attention: each block needs its own mask."""
    return AutoConfig.for_model("qwen2", vocab_size=96, hidden_size=40, intermediate_size=68, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                use_sliding_window=True, sliding_window=5, max_window_layers=1)


@pytest.mark.parametrize("family,attention", [("llama", "eager"), ("mistral", "eager"), ("qwen2", "eager"),
                                              ("opt", "eager"), ("qwen2-sliding", "eager"), ("llama", "sdpa"),
                                              ("qwen2-sliding", "sdpa")])
def test_runner_reproduces_the_model(rng, family, attention):
    """Also on SDPA models, where the walk runs our CPU attention kernel (kernels/attention.py)."""
    torch.manual_seed(0)
    config = _sliding_qwen2() if family == "qwen2-sliding" else tiny_config(family)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()
    windows = torch.randint(0, 96, (5, 23), generator=rng)
    last = LastOutputs()
    steps = [step.index for step in BlockRunner(model, windows, batch_size=2, collectors=[last], progress=False)]
    assert steps == list(range(config.num_hidden_layers))
    with torch.no_grad():
        expected = model(input_ids=windows, use_cache=False).logits
        got = _final_logits(model, last.outputs)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_gram_streaming_equals_materialised(rng):
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    windows = torch.randint(0, 96, (6, 17), generator=rng)
    grams = GramCollector(nsamples=4, chunk=7)  # chunks that do not divide T*d
    inputs = []

    class Keep(BlockCollector):
        def block_input(self, step):
            inputs.append(step.inputs[:4].flatten(1).double())

    for _ in BlockRunner(model, windows, batch_size=4, collectors=[grams, Keep()], progress=False):
        pass
    assert len(grams.grams) == 2
    for gram, f in zip(grams.grams, inputs):
        assert torch.allclose(gram, f @ f.T, rtol=1e-5)


def test_reconstruction_error_against_a_checkpoint(stories_dir, tinystories, rng):
    """LoSA's seam: the dense reference comes from the original checkpoint, block by block."""
    from losa_deploy.data import calibration_windows
    from losa_deploy.models import load_tokenizer

    windows = calibration_windows(None, load_tokenizer(stories_dir), str(tinystories), 8, 64, seed=3)
    model = load_model(stories_dir)
    report = prune_model(model, PruneConfig(method="wanda", sparsity=0.5), windows, progress=False)
    one_shot = [b["recon_error"] for b in report["blocks"]]
    assert all(e > 0 for e in one_shot) and one_shot[-1] > one_shot[0]  # errors accumulate
    # Re-run on the pruned model: the stream is already sparse, the reference is read from disk.
    errors = ReconstructionError()
    arch = get_architecture(model)
    for _ in BlockRunner(model, windows, collectors=[errors], progress=False,
                         reference_weights=checkpoint_reference(stories_dir, arch)):
        pass
    assert errors.errors == pytest.approx(one_shot, rel=1e-5)
    # A reference cache: the first walk fills it, the second reads it and runs no reference block.
    cache = []
    for walk in range(2):
        cached = ReconstructionError()
        for _ in BlockRunner(model, windows, collectors=[cached], progress=False, reference_cache=cache,
                             reference_weights=checkpoint_reference(stories_dir, arch) if walk == 0 else None):
            pass
        assert len(cache) == 5 and cached.errors == errors.errors
    # The weights swapped in for the reference were put back.
    assert all(float((lin.weight == 0).double().mean()) == pytest.approx(0.5, abs=0.01)
               for lin in arch.linears(model).values())
    # A dense model against itself has no error at all.
    dense = ReconstructionError()
    for _ in BlockRunner(load_model(stories_dir), windows, collectors=[dense], progress=False):
        pass
    assert dense.errors == [0.0] * 5


def test_input_stats_hooks_on_any_module(stories_dir, rng):
    """Statistics come from whatever modules the caller names (LoSA hooks its own wrapped linears)."""
    model = load_model(stories_dir)
    windows = torch.randint(0, 512, (3, 40), generator=rng)
    captured = {}
    for step in BlockRunner(model, windows, batch_size=2, progress=False):
        lin = step.linears()["mlp.down_proj"]
        stats = step.input_stats(hessian=True, modules={"down": lin})
        captured[step.index] = stats["down"]
        break
    s = captured[0]
    assert s.tokens == 3 * 40 and s.hessian().shape == (172, 172)
    assert torch.allclose(s.hessian().diagonal().sqrt() * 120 ** 0.5, s.norms().double(), rtol=1e-5)


def test_input_stats_equal_a_full_pass_and_skip_the_last_product(rng):
    """Each batch stops once every linear has its input: the statistics equal those of a whole forward
    with hooks, and the block's last linear never computes its product."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    windows = torch.randint(0, 96, (5, 21), generator=rng)
    for step in BlockRunner(model, windows, batch_size=2, progress=False):
        linears = step.linears()
        down_calls = []
        handle = linears["mlp.down_proj"].register_forward_hook(lambda *_, calls=down_calls: calls.append(1))
        stats = step.input_stats(hessian=True)
        handle.remove()
        assert down_calls == []
        seen = {name: [] for name in linears}
        handles = [lin.register_forward_pre_hook(lambda _m, args, got=seen[name]: got.append(args[0].flatten(0, -2)))
                   for name, lin in linears.items()]
        step.run()
        for h in handles:
            h.remove()
        for name, s in stats.items():
            x = torch.cat(seen[name]).double()
            assert s.tokens == x.shape[0] == 5 * 21
            torch.testing.assert_close(s.norms().double(), x.norm(dim=0), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s.hessian(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)


def test_last_block_runs_only_when_its_outputs_are_read(rng):
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    last = get_architecture(model).block_list(model)[-1]
    calls = []
    last.register_forward_hook(lambda *_: calls.append(1))
    windows = torch.randint(0, 96, (4, 13), generator=rng)
    grams = GramCollector()
    for _ in BlockRunner(model, windows, batch_size=2, collectors=[grams], progress=False):
        pass
    assert calls == [] and len(grams.grams) == 2  # the last block's input is all RMI reads
    errors = ReconstructionError()
    for _ in BlockRunner(model, windows, batch_size=2, collectors=[errors], progress=False):
        pass
    assert len(calls) == 2 * 2 and len(errors.errors) == 2  # reference run and output run, two batches each

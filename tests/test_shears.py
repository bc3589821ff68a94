"""Shears: elastic LoRA weight sharing and fixed scale, the rank sampler, checkpoint safety, the sub-adapter
search, the exact merge and the PEFT export of the chosen sub-adapter (ours and stock peft), data-parallel
equivalence, bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from losa_deploy.adapters.config import AdapterConfig
from losa_deploy.adapters.elastic import (
    ElasticSpace,
    RankSampler,
    activate,
    build_space,
    extract,
    parse_choices,
)
from losa_deploy.adapters.layer import LoraLinear
from losa_deploy.adapters.model import inject_adapters, merge_adapters
from losa_deploy.adapters.peft_format import load_peft_adapter, save_peft_adapter
from losa_deploy.errors import LosaError
from losa_deploy.finetuning.methods import MethodConfig
from losa_deploy.finetuning.shears import ShearsConfig, select_sub_adapter
from losa_deploy.models import load_model


def sparse_linear(rng, out_f=37, in_f=53, sparsity=0.5):
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=rng) * (torch.rand(out_f, in_f, generator=rng) >= sparsity))
        lin.bias.copy_(torch.randn(out_f, generator=rng))
    return lin


@pytest.mark.parametrize("masked", [True, False])
def test_sub_adapter_is_the_first_components_at_the_fixed_scale(rng, masked):
    r_max, r, scale = 11, 5, 64 / 11  # the scale is alpha / r_max whatever rank is active
    layer = LoraLinear(sparse_linear(rng), r_max, scale, max_rank=r_max, masked=masked, generator=rng)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3, generator=rng)
    layer.active_rank = r
    x = torch.randn(3, 7, layer.in_features, generator=rng)
    y = layer(x)
    # float64 reference from the first r components only, at the super-adapter's scale (never alpha / r)
    W, A, B = (t.detach().double() for t in (layer.weight, layer.lora_A[:r], layer.lora_B[:, :r]))
    M = layer.mask.double() if masked else 1.0
    torch.testing.assert_close(y.double(), x.double() @ (W + scale * (B @ A) * M).T + layer.bias.double(),
                               rtol=1e-5, atol=1e-5)
    # ... equal to an adapter that holds only those r components
    small = LoraLinear(sparse_linear(rng), r, scale, max_rank=r, masked=masked)
    small.weight.data, small.bias.data = layer.weight.data.clone(), layer.bias.data.clone()
    if masked:
        small.mask_words = layer.mask_words.clone()
    small.lora_A.data, small.lora_B.data = layer.lora_A.data[:r].clone(), layer.lora_B.data[:, :r].clone()
    torch.testing.assert_close(y, small(x), rtol=1e-6, atol=1e-6)
    # gradients reach the active components only, and equal the small adapter's
    g = torch.randn(y.shape, generator=rng)
    y.backward(g)
    small(x).backward(g)
    # fp32 sums of 21 products in a different order (a sliced view vs a whole factor): elements that
    # cancel to ~0.1 of their terms keep ~1e-6 of absolute rounding, so the tolerance is absolute
    torch.testing.assert_close(layer.lora_A.grad[:r], small.lora_A.grad, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(layer.lora_B.grad[:, :r], small.lora_B.grad, rtol=1e-5, atol=2e-5)
    assert layer.lora_A.grad[r:].abs().sum() == 0 and layer.lora_B.grad[:, r:].abs().sum() == 0
    # cutting the factors to the sub-adapter keeps the function and the scale
    delta = layer.delta()
    layer.set_rank(r, shrink="index")
    assert layer.rank == r and layer.active_rank is None and layer.scale == scale
    torch.testing.assert_close(layer.delta(), delta)
    with pytest.raises(LosaError, match="active rank"):
        layer.active_rank = r + 1
        layer(x)


def test_shears_adapter_config_keeps_the_scale_at_r_max():
    cfg = MethodConfig(method="shears", sparsity=0.5, max_rank=32, alpha=16.0, scale_rank=8,
                       shears=ShearsConfig(rank_choices=(16, 32, 24)))
    cfg.checked()
    adapter = cfg.adapter_config()
    assert cfg.shears.rank_choices == (32, 24, 16)
    assert adapter.rank == adapter.max_rank == adapter.scale_rank == 32
    assert adapter.alpha == 64.0 and adapter.scale == 2.0  # the paper's r 32, alpha 64


def space_of(n_groups: int, choices=(9, 6, 4)) -> ElasticSpace:
    return ElasticSpace(tuple((f"g{i}", (f"m{i}",)) for i in range(n_groups)), choices)


@pytest.mark.parametrize("per", ["step", "micro-batch"])
def test_sampler_is_uniform_seeded_and_fixed_per_unit(rng, per):
    space, groups = space_of(7), 7
    layers = {f"m{i}": LoraLinear(nn.Linear(5, 3), 9, 1.0, max_rank=9, masked=False) for i in range(groups)}
    seed = int(torch.randint(1 << 30, (1,), generator=rng))
    sampler = RankSampler(space, layers, seed=seed, per=per)
    seen = []
    for update in range(600):
        for micro in range(3):
            sampler.before_micro_batch(update, micro)
            seen.append(tuple(layers[f"m{i}"].active_rank for i in range(groups)))
    per_update = [seen[i: i + 3] for i in range(0, len(seen), 3)]
    if per == "step":  # one configuration for all micro-batches of an update
        assert all(len(set(u)) == 1 for u in per_update)
    else:
        assert sum(len(set(u)) > 1 for u in per_update) > 500
    draws = sampler.draws * groups
    assert draws == (600 if per == "step" else 1800) * groups
    # chi-square against uniform over the 3 choices (2 dof; 13.8 is p = 0.001) ...
    expected = draws / 3
    chi2 = sum((n - expected) ** 2 / expected for n in sampler.counts.values())
    assert chi2 < 13.8, sampler.counts
    # ... and per group: the groups draw independently (not one rank for all)
    assert len({c for c in seen if len(set(c)) > 1}) > 100
    stats = sampler.finish()
    assert all(layer.active_rank is None for layer in layers.values()) and stats["draws"] == sampler.draws
    # the same seed draws the same sequence; another seed does not
    one, two, other = (RankSampler(space, layers, seed=s, per=per) for s in (seed, seed, seed + 1))
    first = [one.sample() for _ in range(50)]
    assert first == [two.sample() for _ in range(50)]
    assert first != [other.sample() for _ in range(50)]


def stories_with_elastic_adapters(stories_dir, rng, choices=(8, 6, 3), masked=True, grouping="block"):
    model = load_model(stories_dir)
    with torch.no_grad():
        for lin in model.model.layers.modules():
            if isinstance(lin, nn.Linear):
                lin.weight.mul_(torch.rand(lin.weight.shape, generator=rng) > 0.5)
    r_max = max(choices)
    cfg = AdapterConfig(rank=r_max, max_rank=r_max, alpha=2.0 * r_max, scale_rank=r_max, masked=masked)
    layers = inject_adapters(model, cfg, seed=int(torch.randint(1000, (1,), generator=rng)))
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.05, generator=rng)
    return model, layers, build_space(model, layers, choices, grouping)


def test_groups_per_block(stories_dir, rng):
    model, layers, space = stories_with_elastic_adapters(stories_dir, rng)
    assert len(space.groups) == 5 * 4  # q/k/v, o, gate/up, down in each of 5 blocks
    assert space.groups[0] == ("0:q_proj,k_proj,v_proj", tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv"))
    assert sorted(m for _, ms in space.groups for m in ms) == sorted(layers)
    assert len(build_space(model, layers, (8, 4), "layer").groups) == 5
    assert len(build_space(model, layers, (8, 4), "module").groups) == 35
    with pytest.raises(LosaError, match="exactly one group"):
        build_space(model, layers, (8, 4), "q_proj,k_proj,v_proj;gate_proj,up_proj;down_proj")  # o_proj left out
    with pytest.raises(LosaError, match="exactly one group"):
        build_space(model, layers, (8, 4), "q_proj,k_proj,v_proj,o_proj;o_proj,gate_proj,up_proj;down_proj")


def test_sampled_ranks_survive_gradient_checkpointing(stories_dir, rng):
    """The rank is drawn outside the forward, so a recomputed forward uses the same sub-adapter."""
    model, layers, space = stories_with_elastic_adapters(stories_dir, rng)
    ids = torch.randint(512, (2, 37), generator=rng)
    seed = int(torch.randint(1 << 30, (1,), generator=rng))

    def grads(checkpointing: bool):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        model.train()
        sampler = RankSampler(space, layers, seed=seed)
        sampler.before_micro_batch(0, 0)
        for layer in layers.values():
            layer.lora_A.grad = layer.lora_B.grad = None
        model(input_ids=ids, labels=ids).loss.backward()
        sampler.finish()
        return [t.grad.clone() for layer in layers.values() for t in (layer.lora_A, layer.lora_B)]

    plain, recomputed = grads(False), grads(True)
    model.gradient_checkpointing_disable()
    assert any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_hill_climb_is_bounded_and_stops_at_a_local_optimum(rng):
    space = space_of(6, choices=(12, 8, 6, 4))
    target = [space.choices[int(i)] for i in torch.randint(4, (6,), generator=rng)]
    calls = []

    def loss(config):
        calls.append(config)
        return sum((r - t) ** 2 for r, t in zip(config, target)) + 0.01 * sum(config)

    found = select_sub_adapter(space, "hill-climb", loss, budget=1000, seed=1)
    assert found["chosen"] == tuple(target)  # separable and convex in each group: the optimum
    assert len(calls) == len(set(calls))  # nothing scored twice
    assert all(loss(n) > loss(found["chosen"]) for n in space.neighbours(found["chosen"]))
    calls.clear()
    few = select_sub_adapter(space, "hill-climb", loss, budget=3, seed=1)
    assert few["evaluations"] <= 3 and len(calls) <= 4 + 3  # the uniform anchors + the budget
    # heuristic = the median of the descending choices; max / min; no evaluation needed without data
    assert select_sub_adapter(space, "heuristic", None, 5)["chosen"] == (8,) * 6
    assert select_sub_adapter(space_of(2, (32, 24, 16)), "heuristic", None, 5)["chosen"] == (24, 24)
    assert select_sub_adapter(space, "max", None, 5)["chosen"] == (12,) * 6
    assert select_sub_adapter(space, "min", None, 5)["chosen"] == (4,) * 6


@pytest.mark.parametrize("masked", [True, False])
def test_chosen_sub_adapter_exports_with_its_ranks_and_merges_exactly(stories_dir, rng, tmp_path, masked):
    model, layers, space = stories_with_elastic_adapters(stories_dir, rng, masked=masked)
    config = tuple(space.choices[int(i)] for i in torch.randint(3, (len(space.groups),), generator=rng))
    ids = torch.randint(512, (2, 29), generator=rng)
    with torch.no_grad():
        activate(layers, space, config)
        expected = model(input_ids=ids).logits
        activate(layers, space, None)
        extract(layers, space, config)
        assert {n: layer.rank for n, layer in layers.items()} == space.ranks(config)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    base_state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("lora_A", "lora_B",
                                                                                          "mask_words"))}
    save_peft_adapter(model, tmp_path / "adapter", str(stories_dir))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    for name, r in space.ranks(config).items():
        assert saved["rank_pattern"].get(name, saved["r"]) == r
        assert math.isclose(saved["alpha_pattern"].get(name, saved["lora_alpha"]) / r, 2.0)  # alpha/r = s
    # our loader on a fresh copy of the pruned base: the same ranks and logits
    fresh = load_model(stories_dir)
    fresh.load_state_dict(base_state, strict=False)
    info = load_peft_adapter(fresh, tmp_path / "adapter")
    assert info["ranks"] == space.ranks(config) and info["masked"] == masked
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    if masked:  # the merge keeps the zero pattern: exactly the mask, non-zero count unchanged
        masks = {n: layer.mask.clone() for n, layer in layers.items()}
        stats = merge_adapters(model)
        assert stats["nnz_after"] == stats["nnz_before"] - stats["cancelled"] and stats["cancelled"] == 0
        for name, mask in masks.items():
            assert torch.equal(model.get_submodule(name).weight != 0, mask)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    else:  # stock peft applies an unmasked adapter exactly as we do
        peft = pytest.importorskip("peft")
        base = load_model(stories_dir)
        base.load_state_dict(base_state, strict=False)
        peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        for name, r in space.ranks(config).items():
            assert peft_model.base_model.model.get_submodule(name).r["default"] == r
        with torch.no_grad():
            torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_training_is_deterministic_with_a_seed(stories_dir, rng, tinystories):
    from losa_deploy.data import TokenizedExample
    from losa_deploy.finetuning.trainer import TrainConfig, train_phase

    windows = torch.randint(512, (8, 29), generator=rng)
    examples = [TokenizedExample(w.clone(), w.clone()) for w in windows]
    cfg = TrainConfig(lr=1e-2, batch_size=2, grad_accum=2, max_len=29, autocast="none")
    seed = int(torch.randint(1000, (1,), generator=rng))

    def train(sampler_seed: int):
        torch.manual_seed(0)
        model, layers, space = stories_with_elastic_adapters(stories_dir, torch.Generator().manual_seed(seed))
        sampler = RankSampler(space, layers, seed=sampler_seed, per="micro-batch")
        params = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
        losses = train_phase(model, params, examples, cfg, 0, 0, progress=False,
                             before_micro_batch=sampler.before_micro_batch)["losses"]
        return losses, torch.cat([p.detach().flatten() for p in params]), sampler.finish()

    first, again = train(1), train(1)
    assert first[2]["draws"] == 4 and first[0] == again[0] and torch.equal(first[1], again[1])


def test_parse_choices():
    assert parse_choices("16, 32,24") == (32, 24, 16)
    for bad, match in (("", "empty"), (",", "empty"), ("8,x", "integers"), ("8,2.5", "integers"),
                       ("8,0", "positive"), ("8,8", "repeat")):
        with pytest.raises(LosaError, match=match):
            parse_choices(bad)


def test_finetune_shears_end_to_end_and_bad_input(cli, stories_dir, tinystories, tmp_path):
    """The CLI trains, searches and exports: unmasked (the pruned base + an adapter with mixed ranks) and
    masked (merged with the zero pattern unchanged; base + adapter rebuild it exactly)."""
    out = tmp_path / "shears"
    args = [stories_dir, "-o", out, "--method", "shears", "--sparsity", "0.5", "--data", tinystories,
            "--data-slice", "0:0.8", "--budget-tokens", "4096", "--calib", tinystories, "--calib-slice", "0:0.8",
            "--nsamples", "8", "--lr", "1e-2",
            "--max-rank", "8", "--rank-choices", "8,6,3", "--eval-data", tinystories, "--eval-slice", "0.9:0.93",
            "--search-data", tinystories, "--search-slice", "0.8:0.83", "--no-progress"]
    for extra, message in ((["--rank-choices", "12,8"], "above r_max"), (["--rank-choices", ","], "empty"),
                           (["--rank-choices", "8,six"], "integers"), (["--search", "best"], "search"),
                           (["--method", "lora"], "Shears options")):
        code, _, err = cli("finetune", *args, *extra)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and message in err, err
        assert not out.exists()
    no_data = args[:args.index("--eval-data")] + ["--no-progress"]
    code, _, err = cli("finetune", *no_data, "--search", "hill-climb")
    assert code == 2 and "needs validation data" in err and not out.exists()
    code, stdout, err = cli("finetune", *args, "--unmasked", "--search", "hill-climb", "--search-evals", "4",
                            "--overwrite")
    assert code == 0, err
    report = json.loads((out / "finetune.json").read_text())
    shears = report["shears"]
    assert shears["evaluations"] <= 4 and len(shears["candidates"]) <= 3 + 4
    assert min(c["val_loss"] for c in shears["candidates"]) == shears["chosen"]["val_loss"]
    assert (out / "shears.png").stat().st_size > 0 and "shears sub-adapter (hill-climb)" in stdout
    assert abs(report["achieved_sparsity"] - 0.5) < 1e-3
    # the output is the pruned base; the adapter loads on it (ours) with the chosen ranks and reproduces
    # the reported perplexity of the chosen sub-adapter
    from losa_deploy.data import eval_windows, parse_slice, read_source, slice_source, tokenize_text
    from losa_deploy.eval.perplexity import perplexity
    from losa_deploy.models import load_tokenizer

    model = load_model(out)
    info = load_peft_adapter(model, out / "adapter")
    assert not info["masked"] and len(info["ranks"]) == 35
    for group, rank in shears["chosen"]["ranks"].items():  # "block:q_proj,k_proj,v_proj" -> rank
        block, names = group.split(":")
        members = [m for m in info["ranks"] if m.split(".")[2] == block and m.rsplit(".", 1)[1] in names.split(",")]
        assert len(members) == len(names.split(",")) and all(info["ranks"][m] == rank for m in members)
    text = slice_source(read_source(str(tinystories)), *parse_slice("0.9:0.93")).as_text()
    windows = eval_windows(tokenize_text(load_tokenizer(out), text), 256, 64)
    assert math.isclose(perplexity(model, windows, progress=False)["ppl"], shears["eval_ppl"], rel_tol=1e-5)

    # masked (the default): merged with the base's zero pattern; base + adapter rebuild it bit for bit
    masked = tmp_path / "masked"
    code, _, err = cli("finetune", *no_data[:2], masked, *no_data[3:], "--search", "max", "--save-base")
    assert code == 0, err
    merged, base = load_model(masked), load_model(masked / "base")
    for name, module in merged.named_modules():
        if isinstance(module, nn.Linear) and "layers" in name:
            assert torch.equal(module.weight != 0, base.get_submodule(name).weight != 0)
    code, _, err = cli("merge", masked / "base", "--adapter", masked / "adapter", "-o", tmp_path / "again")
    assert code == 0, err
    again = load_model(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), again.state_dict().values()))


def test_two_process_data_parallel_matches_one_process(stories_dir, tinystories, tmp_path):
    """Per-micro-batch ranks under DDP: each process draws the whole sequence, so its micro-batches use
    the sub-adapters one process would have used for them."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    common = [stories_dir, "--method", "shears", "--sparsity", "0.5", "--data", tinystories, "--data-slice", "0:0.5",
              "--budget-tokens", "4096", "--calib", tinystories, "--calib-slice", "0:0.5", "--nsamples", "8",
              "--lr", "1e-2", "--max-rank", "8", "--rank-choices", "8,6,3", "--sample-per", "micro-batch",
              "--search", "max", "--autocast", "none", "--no-progress"]
    runs = {"single": [sys.executable, "-m", "losa_deploy", "finetune"],
            "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "losa_deploy", "finetune"]}
    for name, cmd in runs.items():
        done = subprocess.run([*cmd, *map(str, common), "-o", str(tmp_path / name)], env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    single, ddp = (load_file(tmp_path / n / "model.safetensors") for n in runs)
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5)
    draws = [json.loads((tmp_path / n / "finetune.json").read_text())["phases"][0]["sampler"] for n in runs]
    assert draws[0] == draws[1] and draws[0]["draws"] == 4  # 2 updates x 2 micro-batches, on every process

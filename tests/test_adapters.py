"""Masked / plain LoRA layers, rank changes, the exact sparse merge, PEFT-format export, rank allocation."""

import pytest
import torch
from torch import nn

from losa_deploy.adapters.config import AdapterConfig
from losa_deploy.adapters.layer import LoraLinear
from losa_deploy.adapters.model import adapters_of, inject_adapters, merge_adapters
from losa_deploy.adapters.peft_format import load_peft_adapter, save_peft_adapter
from losa_deploy.adapters.ranks import allocate_ranks, allocate_ranks_reference, average_rank
from losa_deploy.errors import LosaError
from losa_deploy.finetuning.schedule import lambda_for, nm_schedule, sparsity_schedule
from losa_deploy.models import load_model


def sparse_linear(rng, out_f, in_f, sparsity, bias=True):
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=rng))
        lin.weight.mul_(torch.rand(out_f, in_f, generator=rng) >= sparsity)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=rng))
    return lin


def trained_layer(rng, masked=True, sparsity=0.6, rank=5, out_f=37, in_f=53):
    layer = LoraLinear(sparse_linear(rng, out_f, in_f, sparsity), rank, scale=2.0, max_rank=16, masked=masked,
                       generator=rng)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3, generator=rng)
    return layer


@pytest.mark.parametrize("masked", [True, False])
def test_forward_and_backward_match_float64(rng, masked):
    layer = trained_layer(rng, masked)
    x = torch.randn(3, 7, layer.in_features, generator=rng, requires_grad=True)
    y = layer(x)
    W, A, B = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
    delta = 2.0 * (B @ A) * (layer.mask.double() if masked else 1.0)
    ref = x.double() @ (W + delta).T + layer.bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(y.shape, generator=rng)
    y.backward(g)
    xr = x.detach().double().requires_grad_()
    Ar, Br = A.clone().requires_grad_(), B.clone().requires_grad_()
    d = 2.0 * (Br @ Ar) * (layer.mask.double() if masked else 1.0)
    (xr @ (W + d).T).backward(g.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad.double(), Ar.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad.double(), Br.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None


def test_growing_keeps_the_output_and_shrinking_is_best_rank(rng):
    layer = trained_layer(rng, masked=True)
    x = torch.randn(4, layer.in_features, generator=rng)
    before = layer(x)
    layer.set_rank(11, generator=rng)
    assert layer.rank == 11 and torch.equal(layer(x), before)
    assert layer.lora_A[5:].abs().sum() > 0 and layer.lora_B[:, 5:].abs().sum() == 0
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3, generator=rng)
    full = (layer.lora_B @ layer.lora_A).double()
    layer.set_rank(3, shrink="svd")
    s = torch.linalg.svdvals(full)
    err = torch.linalg.matrix_norm(full - (layer.lora_B @ layer.lora_A).double())
    assert torch.isclose(err, s[3:].square().sum().sqrt(), rtol=1e-4)  # Eckart–Young: the optimum
    layer.set_rank(2, shrink="index")
    assert layer.rank == 2
    with pytest.raises(LosaError, match="max_rank"):
        layer.set_rank(17)


def test_merge_keeps_the_zero_pattern_exactly(stories_dir, rng):
    model = load_model(stories_dir)
    with torch.no_grad():
        for lin in (m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features != 512):
            lin.weight.mul_(torch.rand(lin.weight.shape, generator=rng) > 0.7)
    inject_adapters(model, AdapterConfig(rank=6, masked=True), seed=int(torch.randint(0, 99, (), generator=rng)))
    masks = {}
    for name, layer in adapters_of(model).items():
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.05, generator=rng)
        masks[name] = layer.mask.clone()
    ids = torch.randint(0, 512, (2, 40), generator=rng)
    with torch.no_grad():
        unmerged = model(ids).logits
    stats = merge_adapters(model)
    assert stats["modules"] == stats["masked"] == 35 and stats["nnz_after"] == stats["nnz_before"]
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        assert isinstance(model.get_submodule(name), nn.Linear)
        assert torch.equal(w != 0, mask)
        assert not torch.signbit(w[w == 0]).any()  # no -0.0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-4, atol=1e-4)


def test_masks_only_shrink(rng):
    layer = trained_layer(rng)
    w = layer.weight.detach().clone()
    sparser = w * (torch.rand(w.shape, generator=rng) > 0.5)
    layer.set_base(sparser)
    assert torch.equal(layer.mask, sparser != 0)
    with pytest.raises(LosaError, match="un-prune"):
        layer.set_base(w)


def test_peft_export_reloads_with_per_module_ranks(stories_dir, tmp_path, rng):
    model = load_model(stories_dir)
    inject_adapters(model, AdapterConfig(rank=4, masked=False))
    for i, layer in enumerate(adapters_of(model).values()):
        layer.set_rank(1 + (i * 5) % 13, generator=rng)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1, generator=rng)
    ids = torch.randint(0, 512, (2, 29), generator=rng)
    with torch.no_grad():
        ref = model(ids).logits
    out = save_peft_adapter(model, tmp_path / "adapter", str(stories_dir))
    fresh = load_model(stories_dir)
    info = load_peft_adapter(fresh, out)
    assert info["ranks"] == {n: m.rank for n, m in adapters_of(model).items()}
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ref)
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    wrapped = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(stories_dir), out)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(ids).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [
    dict(rank_pattern={"model.layers.0.self_attn.q_proj": 2}),
    dict(rank_pattern={"layers.1.mlp.down_proj": 3}, alpha_pattern={"layers.1.mlp.down_proj": 16}),
    dict(use_rslora=True, rank_pattern={"model.layers.2.self_attn.v_proj": 6}),
])
def test_stock_peft_adapters_merge_with_peft_scales(stories_dir, tmp_path, rng, options):
    # An adapter PEFT itself wrote (no losa_adapter.json): each module's scale is PEFT's, from its own rank,
    # alpha_pattern and use_rslora, so the merge equals PEFT's merge_and_unload.
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(stories_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **options)
    wrapped = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=rng) * 0.05)
    wrapped.save_pretrained(tmp_path / "stock")
    want = wrapped.merge_and_unload().state_dict()
    ours = load_model(stories_dir)
    load_peft_adapter(ours, tmp_path / "stock")
    merge_adapters(ours)
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_adapter_for_another_base_is_refused(stories_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = load_model(stories_dir)
    inject_adapters(model, AdapterConfig(rank=2, masked=False))
    out = save_peft_adapter(model, tmp_path / "a", str(stories_dir))
    other = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=512, hidden_size=48, intermediate_size=100, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(LosaError, match="different base"):
        load_peft_adapter(other, out)
    pruned = load_model(stories_dir)  # same architecture, one weight changed: still another base
    with torch.no_grad():
        pruned.model.layers[3].mlp.down_proj.weight[0, 0] = 0.0
    with pytest.raises(LosaError, match="layers.3.mlp.down_proj differ"):
        load_peft_adapter(pruned, out)
    load_peft_adapter(load_model(stories_dir), out)  # the base it was trained on is accepted


def test_rank_allocation_hits_the_budget(rng):
    for _ in range(50):
        n = int(torch.randint(1, 40, (), generator=rng))
        errors = (torch.rand(n, generator=rng) ** 3).tolist()
        avg = float(torch.randint(2, 12, (), generator=rng))
        ranks = allocate_ranks(errors, avg)
        assert sum(ranks) == round(n * avg) and all(1 <= r <= 16 for r in ranks)
        order = sorted(range(n), key=lambda i: errors[i])
        assert all(ranks[a] <= ranks[b] for a, b in zip(order, order[1:]))  # monotone in the error
    # The reference's single greedy pass can miss; ours does not.
    errors = [0.001] * 30 + [1.0, 1.0]
    assert sum(allocate_ranks(errors, 9)) == 288 and sum(allocate_ranks_reference(errors, 9)) != 288
    assert [average_rank(t) for t in range(1, 6)] == [6, 7, 8, 9, 10]


def test_schedules():
    assert [round(s, 4) for s in sparsity_schedule(0.7, 5)] == [0.3416, 0.5488, 0.6552, 0.6944, 0.7]
    prev, lams = None, []
    for s in sparsity_schedule(0.9, 5):
        prev = lambda_for(s, "reference", prev)
        lams.append(prev)
    assert lams == [0.01] * 5  # the reference's stateful artefact
    assert [lambda_for(s) for s in sparsity_schedule(0.9, 5)] == [0.01, 0.03, 0.03, 0.03, 0.03]
    assert nm_schedule(2, 4, 5) == [3, 2, 2, 2, 2]
    with pytest.raises(LosaError):
        sparsity_schedule(1.0, 5)
    assert lambda_for(0.5, "constant:0.04") == 0.04
    with pytest.raises(LosaError, match="must be in"):
        lambda_for(0.5, "constant:-1")

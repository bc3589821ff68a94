"""Checkpoints: bit-exact save/load, the architecture adapter on every supported family, safe loading."""

import json

import pytest
import torch
from safetensors.torch import load_file

from losa_deploy.errors import LosaError
from losa_deploy.models import get_architecture, load_model, load_tokenizer, save_model
from losa_deploy.models.arch import head_size
from losa_deploy.models.tensors import iter_tensors


class NotATensor:
    """Anything weights_only unpickling does not allow (stands for arbitrary pickled code)."""


def _state(path):
    return dict(iter_tensors(path))


def test_save_load_is_bit_exact(stories_dir, tmp_path):
    model = load_model(stories_dir)
    tokenizer = load_tokenizer(stories_dir)
    out = save_model(model, tmp_path / "copy", tokenizer=tokenizer)
    original, saved = _state(stories_dir), _state(out)
    # A tied lm_head may be stored once or twice; every stored tensor must be identical.
    for key, tensor in original.items():
        assert key in saved, key
        assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor), key
    reloaded = load_model(out)
    for (k1, t1), (k2, t2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert k1 == k2 and torch.equal(t1, t2), k1
    assert load_tokenizer(out)("Once upon a time")["input_ids"] == tokenizer("Once upon a time")["input_ids"]
    # Ordinary files (safetensors writes its own 0600; the output follows the umask like every other file).
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert {(p.name, p.stat().st_mode & 0o777) for p in out.iterdir()} == \
        {(p.name, 0o666 & ~umask) for p in out.iterdir()}


def test_json_results_are_strict_json(tmp_path):
    import numpy as np

    from losa_deploy.utils.fs import write_json

    write_json(tmp_path / "r.json", {"ppl": float("nan"), "rows": [1.5, float("inf"), np.float32("nan")],
                                     "n": np.int64(3)})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == \
        {"ppl": None, "rows": [1.5, None, None], "n": 3}


def test_save_keeps_bf16_bits(stories_dir, tmp_path):
    model = load_model(stories_dir, dtype="bf16")
    out = save_model(model, tmp_path / "bf16")
    for key, tensor in model.state_dict().items():
        if key in load_file(out / "model.safetensors"):
            assert torch.equal(load_file(out / "model.safetensors")[key], tensor)
    assert load_model(out).dtype == torch.bfloat16


def test_every_family_loads_and_exposes_its_linears(tiny_model_dir):
    model = load_model(tiny_model_dir)
    arch = get_architecture(model)
    linears = arch.linears(model)
    cfg = model.config
    assert len(linears) == cfg.num_hidden_layers * len(arch.linear_names)
    for name, module in linears.items():
        assert isinstance(module, torch.nn.Linear), name
        # o_proj reads heads x head size, which Qwen3 sets apart from the hidden size (128 here, not 10)
        assert module.weight.shape[1] in (cfg.hidden_size, getattr(cfg, "intermediate_size", None),
                                          getattr(cfg, "ffn_dim", None), cfg.num_attention_heads * head_size(cfg))
    # Keys in the checkpoint match the adapter's pattern one to one.
    pattern = arch.weight_key_pattern()
    keys = [k for k, _ in iter_tensors(tiny_model_dir) if pattern.match(k)]
    assert sorted(k[: -len(".weight")] for k in keys) == sorted(linears)


def test_load_refuses_remote_code_without_flag(stories_dir, tmp_path):
    import shutil

    copy = tmp_path / "remote"
    shutil.copytree(stories_dir, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LosaError, match="trust-remote-code"):
        load_model(copy)


def test_pickled_weights_need_weights_only(stories_dir, tmp_path):
    import shutil

    safe = tmp_path / "bin-ok"
    shutil.copytree(stories_dir, safe)
    state = load_file(safe / "model.safetensors")
    (safe / "model.safetensors").unlink()
    torch.save(state, safe / "pytorch_model.bin")
    model = load_model(safe)
    assert torch.equal(model.model.embed_tokens.weight, state["model.embed_tokens.weight"])

    evil = tmp_path / "bin-evil"
    shutil.copytree(safe, evil)
    torch.save({"x": NotATensor()}, evil / "pytorch_model.bin")
    with pytest.raises(LosaError, match="weights_only"):
        load_model(evil)


def test_missing_weights_are_an_error_not_random_init(stories_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    partial = tmp_path / "partial"
    shutil.copytree(stories_dir, partial)
    state = load_file(partial / "model.safetensors")
    state.pop("model.layers.0.mlp.up_proj.weight")
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LosaError, match="missing"):
        load_model(partial)


def test_weight_files_are_the_ones_transformers_reads(stories_dir, tmp_path, cli):
    """A stray file beside the weights (a `consolidated.safetensors`, a stale shard) is not the model's:
    pack follows model.safetensors or the shard index, as transformers does, and copied nothing foreign."""
    import shutil

    from safetensors.torch import save_file

    from losa_deploy.models.checkpoint import stored_shapes, weight_files

    model = tmp_path / "m"
    shutil.copytree(stories_dir, model)
    save_file({"layers.0.attention.wq.weight": torch.randn(64, 64)}, model / "consolidated.safetensors")
    assert weight_files(model) == [model / "model.safetensors"]
    code, _, err = cli("pack", model, "-o", tmp_path / "hf", "--format", "hf", "--no-progress")
    assert code == 0, err
    assert "layers.0.attention.wq.weight" not in {k for k, _ in iter_tensors(tmp_path / "hf")}
    # Sharded: the index decides, and a shard it lists must exist.
    state = load_file(model / "model.safetensors")
    keys = sorted(state)
    (model / "model.safetensors").unlink()
    halves = {"model-00001-of-00002.safetensors": keys[:20], "model-00002-of-00002.safetensors": keys[20:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, model / name)
    index = {"metadata": {}, "weight_map": {k: n for n, part in halves.items() for k in part}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert [f.name for f in weight_files(model)] == sorted(halves)
    assert stored_shapes(model) == {k: tuple(t.shape) for k, t in state.items()}
    (model / "model-00002-of-00002.safetensors").rename(model / "gone.safetensors")
    with pytest.raises(LosaError, match="model-00002-of-00002.safetensors"):
        weight_files(model)


def test_a_tensor_stored_twice_is_refused(stories_dir, tmp_path, cli):
    """Two files holding one key (no index to say which is meant): one error line before anything is
    written, not the writer's traceback half way."""
    from safetensors.torch import save_file

    state = load_file(stories_dir / "model.safetensors")
    model = tmp_path / "m"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((stories_dir / name).read_bytes())
    save_file(state, model / "weights-a.safetensors")
    save_file({"model.embed_tokens.weight": state["model.embed_tokens.weight"]}, model / "weights-b.safetensors")
    code, _, err = cli("pack", model, "-o", tmp_path / "hf", "--format", "hf", "--no-progress")
    assert code == 2 and err.strip().splitlines() == [
        f"error: {model}: model.embed_tokens.weight is stored twice, in weights-a.safetensors and weights-b.safetensors"]
    assert not (tmp_path / "hf").exists()


def test_reading_tensors_gives_what_the_mapped_file_holds(tmp_path):
    """iter_tensors(mmap=False) reads each tensor into memory of its own: the same keys, order, dtypes and
    bytes as safe_open's views, empty and 0-dim tensors included; a truncated file is an error."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    state = {"b.bf16": torch.randn(3, 5, generator=generator).bfloat16(), "a.f32": torch.randn(7, generator=generator),
             "c.bool": torch.rand(4, 4, generator=generator) > 0.5, "d.u32": torch.arange(6, dtype=torch.int32).view(torch.uint32),
             "e.i64": torch.tensor(9), "f.empty": torch.empty(0, 3)}
    save_file(state, tmp_path / "model.safetensors")
    mapped, read = list(iter_tensors(tmp_path)), list(iter_tensors(tmp_path, mmap=False))
    assert [k for k, _ in read] == [k for k, _ in mapped] == sorted(state)
    for (_, tensor), (key, expected) in zip(read, mapped):
        assert tensor.dtype == expected.dtype and tensor.shape == expected.shape, key
        assert torch.equal(tensor.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8)), key
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-4])
    with pytest.raises(LosaError, match="is truncated"):
        list(iter_tensors(tmp_path, mmap=False))


def test_reading_a_header_that_contradicts_itself_names_the_tensor(tmp_path):
    """A header whose byte range for a tensor does not match its shape and dtype is called that, not a
    truncated file (the file is whole)."""
    import json
    import struct

    from safetensors.torch import save_file

    save_file({"w": torch.randn(4, 6), "v": torch.randn(3)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    header["w"]["shape"] = [4, 5]  # 80 bytes, where the offsets hold 96
    text = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    assert len(text) == header_len
    (tmp_path / "model.safetensors").write_bytes(data[:8] + text + data[8 + header_len:])
    begin, end = header["w"]["data_offsets"]
    assert end - begin == 96
    with pytest.raises(LosaError, match=rf"tensor w: F32 \[4, 5\] does not fit bytes {begin}\.\.{end}"):
        list(iter_tensors(tmp_path, mmap=False))

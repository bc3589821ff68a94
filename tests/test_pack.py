"""``pack``: formats, streaming, dtype conversion, -0.0 scrubbing, the sidecar, and bad input."""

import json
import shutil
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from losa_deploy import pack
from losa_deploy.errors import LosaError
from losa_deploy.export.writer import SafetensorsWriter
from losa_deploy.models import load_model
from losa_deploy.models.tensors import iter_tensors
from losa_deploy.sparsity.report import inspect_checkpoint


def _stored(path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(path))


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_hf_output_is_the_input_in_the_new_dtype(sparse_stories, tmp_path, dtype):
    result = pack(sparse_stories, tmp_path / "out", format="hf", dtype=dtype, progress=False)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    source, written = _stored(sparse_stories), _stored(tmp_path / "out")
    assert written.keys() == source.keys()
    for key, tensor in source.items():
        assert written[key].dtype == torch_dtype and torch.equal(written[key], tensor.to(torch_dtype)), key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == result["dtype"] and "quantization_config" not in config
    assert "sparsity_config" not in config
    # The sidecar describes the written weights, and `inspect` verifies it against them.
    report = inspect_checkpoint(tmp_path / "out")
    assert report["sidecar"]["verified_modules"] == len(report["layers"]) == 35
    assert report["pattern"] == result["pattern"] == ("unstructured" if "50" in sparse_stories.name else "nm")
    assert abs(result["global_sparsity"] - 0.5) < 0.01
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "generation_config.json").is_file()
    assert load_model(tmp_path / "out").dtype == torch_dtype


@pytest.mark.parametrize("stored", ["safetensors", "pickle"])
def test_negative_zeros_are_scrubbed(sparse_stories, tmp_path, stored):
    # The scrub writes over the tensors as read; the source files stay as they were (a pickle is mapped
    # privately, so its pages are copied on that write, never written back).
    src = tmp_path / "negzero"
    shutil.copytree(sparse_stories, src)
    state = load_file(src / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    zeros = state[key] == 0
    state[key][zeros] = -0.0
    if stored == "safetensors":
        save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    else:
        (src / "model.safetensors").unlink()
        torch.save(state, src / "pytorch_model.bin")
    before = {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()}
    result = pack(src, tmp_path / "out", progress=False)
    assert {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()} == before
    out = _stored(tmp_path / "out")[key]
    assert result["negative_zeros_scrubbed"] == int(zeros.sum()) > 0
    assert torch.equal(out == 0, zeros) and not bool(torch.signbit(out[zeros]).any())
    assert torch.equal(out, state[key])  # -0.0 == +0.0: the values are unchanged


def test_nm_vllm_hint(sparse_stories, tmp_path):
    pack(sparse_stories, tmp_path / "out", format="nm-vllm", dtype="bf16", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    hint = config["sparsity_config"]
    # Exactly the fields nm-vllm's CompressionConfig check accepts.
    assert set(hint) == {"format", "global_sparsity", "sparsity_structure"} and hint["format"] == "dense"
    assert hint["sparsity_structure"] == ("unstructured" if "50" in sparse_stories.name else "2:4")
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert load_model(tmp_path / "out").dtype == torch.bfloat16


def test_packing_streams_one_tensor_at_a_time(sparse_stories, tmp_path, monkeypatch):
    """Every tensor the writer received is freed before the next one is read: memory ~ one tensor."""
    seen: list[weakref.ref] = []
    original_add = SafetensorsWriter.add

    def add(self, key, tensor):
        assert all(ref() is None for ref in seen), "an earlier tensor is still alive"
        seen.append(weakref.ref(tensor))
        original_add(self, key, tensor)

    monkeypatch.setattr(SafetensorsWriter, "add", add)
    pack(sparse_stories, tmp_path / "out", dtype="bf16", progress=False)
    assert len(seen) == 47


@pytest.mark.parametrize("max_shard_bytes", [1, 3000, 10**9])
def test_writer_shards_like_transformers(tmp_path, rng, max_shard_bytes):
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.int32]
    tensors = {f"t{i}": (torch.randn(int(torch.randint(1, 40, (1,), generator=rng)), 7, generator=rng) * 50)
               .to(dtypes[i % len(dtypes)]) for i in range(9)}
    with SafetensorsWriter(tmp_path, max_shard_bytes=max_shard_bytes) as writer:
        for key, tensor in tensors.items():
            writer.add(key, tensor)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert [f.name for f in writer.files] == [f.name for f in files]
    if len(files) == 1:
        assert files[0].name == "model.safetensors" and not (tmp_path / "model.safetensors.index.json").exists()
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = {}
    for file in files:
        loaded.update(load_file(file))  # the reference reader agrees with every byte
        with safe_open(file, "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    assert not list(tmp_path.glob(".*")), "spool files left behind"


def test_sharded_output_loads_in_transformers(sparse_stories, tmp_path, monkeypatch):
    monkeypatch.setattr("losa_deploy.export.writer.DEFAULT_SHARD_BYTES", 100_000)
    pack(sparse_stories, tmp_path / "out", progress=False)
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    reference, model = load_model(sparse_stories), load_model(tmp_path / "out")
    for (k1, t1), (k2, t2) in zip(reference.state_dict().items(), model.state_dict().items()):
        assert k1 == k2 and torch.equal(t1, t2), k1


def test_dense_model_packs_with_a_warning(stories_dir, tmp_path, caplog):
    result = pack(stories_dir, tmp_path / "out", progress=False)
    assert result["pattern"] == "dense" and "no sparsity" in result["warnings"][0]
    assert any("no sparsity" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "out" / "model.safetensors").is_file()


# --- bad input: one line on stderr, exit 2, nothing written ---------------------------------------------

def _fails_cleanly(cli, tmp_path, args, match):
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = cli("pack", *args, "--no-progress")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], (out, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"


def test_unknown_format(cli, sparse_stories, tmp_path):
    _fails_cleanly(cli, tmp_path, [sparse_stories, "-o", tmp_path / "out", "--format", "gguf"],
                   "unknown format 'gguf'")


def test_existing_output_is_kept(cli, sparse_stories, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    _fails_cleanly(cli, tmp_path, [sparse_stories, "-o", tmp_path / "out"], "already exists")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    code, _, _ = cli("pack", sparse_stories, "-o", tmp_path / "out", "--overwrite", "--no-progress")
    assert code == 0 and not (tmp_path / "out" / "keep.txt").exists()


@pytest.mark.parametrize("fmt", ["hf", "deepsparse"])
def test_corrupt_tensor(cli, sparse_stories, tmp_path, fmt):
    src = tmp_path / "corrupt"
    shutil.copytree(sparse_stories, src)
    # Overwrite bytes in the middle of the data with 0xFF: NaNs in one stored float32 tensor.
    raw = bytearray((src / "model.safetensors").read_bytes())
    middle = len(raw) // 2
    raw[middle: middle + 64] = b"\xff" * 64
    (src / "model.safetensors").write_bytes(bytes(raw))
    _fails_cleanly(cli, tmp_path, [src, "-o", tmp_path / "out", "--format", fmt], "is corrupt")


def test_deepsparse_is_fp32_only(cli, sparse_stories, tmp_path):
    _fails_cleanly(cli, tmp_path, [sparse_stories, "-o", tmp_path / "out", "--format", "deepsparse",
                                   "--dtype", "bf16"], "cannot be written in bf16")


def test_output_cannot_be_the_input(sparse_stories, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(sparse_stories, copy)
    with pytest.raises(LosaError, match="is the input"):
        pack(copy, copy, overwrite=True, progress=False)
    assert (copy / "model.safetensors").is_file()


def test_fp16_overflow_is_refused(cli, sparse_stories, tmp_path):
    src = tmp_path / "big"
    shutil.copytree(sparse_stories, src)
    state = load_file(src / "model.safetensors")
    state["model.norm.weight"][3] = 1e6  # finite in fp32, inf in fp16
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    _fails_cleanly(cli, tmp_path, [src, "-o", tmp_path / "out", "--dtype", "fp16"], "outside the range of float16")
    code, _, _ = cli("pack", src, "-o", tmp_path / "out", "--dtype", "bf16", "--no-progress")
    assert code == 0  # bf16 has fp32's range


@pytest.mark.parametrize("fmt", ["hf", "nm-vllm", "losa", "deepsparse"])
@pytest.mark.parametrize("damage,match", [
    ("missing", "is missing 1 weight(s) of the model, e.g. model.layers.2.mlp.down_proj.weight"),
    ("shape", "model.layers.1.mlp.up_proj.weight has shape (100, 64), the llama model's is (172, 64)"),
])
def test_an_incomplete_checkpoint_is_refused(cli, sparse_stories, tmp_path, fmt, damage, match):
    """A weight missing or of the wrong shape: a loader would initialise it at random (or crash half-way);
    the pack is refused with nothing written."""
    src = tmp_path / "damaged"
    shutil.copytree(sparse_stories, src)
    state = load_file(src / "model.safetensors")
    if damage == "missing":
        del state["model.layers.2.mlp.down_proj.weight"]
    else:
        state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:100].clone()
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    _fails_cleanly(cli, tmp_path, [src, "-o", tmp_path / "out", "--format", fmt], match)


def test_storage_hints_of_the_input_are_not_carried(sparse_stories, tmp_path):
    """An input whose config says how its weights were stored (llm-compressor's sparsity_config, a
    transformers-4 torch_dtype) would mislead the loaders of a plain output."""
    src = tmp_path / "hinted"
    shutil.copytree(sparse_stories, src)
    config = json.loads((src / "config.json").read_text())
    config.update(torch_dtype="float32", sparsity_config={"format": "dense"},
                  quantization_config={"quant_method": "compressed-tensors", "sparsity_config": {"targets": ["Linear"]}})
    (src / "config.json").write_text(json.dumps(config))
    for fmt in ("hf", "nm-vllm"):
        pack(src, tmp_path / fmt, format=fmt, dtype="bf16", progress=False)
        written = json.loads((tmp_path / fmt / "config.json").read_text())
        assert "quantization_config" not in written
        assert written["dtype"] == written["torch_dtype"] == "bfloat16"
        assert ("sparsity_config" in written) == (fmt == "nm-vllm")  # nm-vllm writes its own hint


def test_sigterm_mid_pack_leaves_nothing_behind(sparse_stories, tmp_path, monkeypatch, capsys):
    """SIGTERM while the output is being written: exit 143 with one error line, and no .OUT.tmp-* left
    (the default action would have killed the process before the temporary directory was removed)."""
    import os
    import signal

    from losa_deploy.cli import main
    from losa_deploy.export import FORMATS

    def terminated(source, out):
        (out / "partial.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the pack")

    monkeypatch.setattr(FORMATS["hf"], "write_weights", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["pack", str(sparse_stories), "-o", str(tmp_path / "out"), "--no-progress"]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: terminated"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the CLI's only while it runs


def test_a_sidecar_module_the_checkpoint_lacks_is_refused(cli, sparse_stories, tmp_path):
    src = tmp_path / "listed"
    pack(sparse_stories, src, format="hf", progress=False)  # a checkpoint with its sidecar
    sidecar = json.loads((src / "losa_sparsity.json").read_text())
    sidecar["modules"]["model.layers.9.mlp.up_proj"] = next(iter(sidecar["modules"].values()))
    (src / "losa_sparsity.json").write_text(json.dumps(sidecar))
    _fails_cleanly(cli, tmp_path, [src, "-o", tmp_path / "out"], "sidecar lists model.layers.9.mlp.up_proj, which "
                                                                  "the checkpoint does not store")


@pytest.mark.parametrize("modules", [[], {"model.layers.0.mlp.up_proj": "50%"}], ids=["list", "entry not a table"])
def test_a_sidecar_without_a_module_table_is_refused(cli, sparse_stories, tmp_path, modules):
    """A malformed 'modules' used to switch the sidecar check off: the weights went unverified."""
    src = tmp_path / "listed"
    pack(sparse_stories, src, format="hf", progress=False)
    sidecar = json.loads((src / "losa_sparsity.json").read_text())
    sidecar["modules"] = modules
    (src / "losa_sparsity.json").write_text(json.dumps(sidecar))
    _fails_cleanly(cli, tmp_path, [src, "-o", tmp_path / "out"], "'modules' must map each module name")

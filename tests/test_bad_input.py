"""Bad input: a one-line ``error: ...`` on stderr, exit status 2, nothing written."""

import json
import shutil

import pytest


def _assert_clean_failure(result, tmp_path, before, match):
    code, out, err = result
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"


@pytest.fixture
def broken(tmp_path, stories_dir):
    """Factories for broken model directories."""

    def make(kind):
        path = tmp_path / kind
        if kind == "missing":
            return path
        shutil.copytree(stories_dir, path)
        if kind in ("no-weights", "onnx-export"):
            (path / "model.safetensors").unlink()
        if kind == "onnx-export":  # what pack --format deepsparse writes: config.json and model.onnx
            (path / "model.onnx").write_bytes(b"\x08\x07")
        elif kind == "truncated":
            data = (path / "model.safetensors").read_bytes()
            (path / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
        elif kind == "unsupported":
            cfg = json.loads((path / "config.json").read_text())
            cfg["model_type"] = "bloom"
            (path / "config.json").write_text(json.dumps(cfg))
        return path

    return make


@pytest.mark.parametrize("kind,match", [("missing", "does not exist"), ("no-weights", "no weights"),
                                        ("truncated", "truncated"), ("unsupported", "unsupported architecture"),
                                        ("onnx-export", "the deepsparse format): run it with bench")])
@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_broken_models(cli, broken, tmp_path, tinystories, kind, match, command):
    model = broken(kind)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [command, model, "--json", tmp_path / "out.json"]
    if command == "eval":
        args += ["--data", tinystories, "--seqlen", 64]
    _assert_clean_failure(cli(*args), tmp_path, before, match)


def test_empty_data_file(cli, stories_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("eval", stories_dir, "--data", tmp_path / "empty.txt", "--json", tmp_path / "out.json")
    _assert_clean_failure(result, tmp_path, before, "is empty")
    result = cli("eval", stories_dir, "--data", tmp_path, "--json", tmp_path / "out.json")
    _assert_clean_failure(result, tmp_path, before, "is not a regular file")


def test_seqlen_longer_than_context(cli, stories_dir, tinystories, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("eval", stories_dir, "--data", tinystories, "--seqlen", 1024, "--json", tmp_path / "out.json")
    _assert_clean_failure(result, tmp_path, before, "and the model's context (512 tokens)")


@pytest.mark.parametrize("args,match", [
    (["--seqlen", "1"], "seqlen 1 must be between 2"),
    (["--slice", "0:0.5"], "do not apply to --data self"),
    (["--text-field", "body"], "do not apply to --data self"),
], ids=["seqlen-1", "slice", "text-field"])
def test_eval_self_refuses_what_it_cannot_apply(cli, stories_dir, tmp_path, args, match):
    """--data self samples its own windows: a 1-token window divided by zero after sampling, and a slice
    or text field was ignored while the JSON reported it."""
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("eval", stories_dir, "--data", "self", *args, "--json", tmp_path / "out.json")
    _assert_clean_failure(result, tmp_path, before, match)


def test_usage_errors_are_one_line(cli, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    _assert_clean_failure(cli("eval", "x", "--data", "y", "--seqlen", "-3"), tmp_path, before,
                          "expected a positive integer")
    _assert_clean_failure(cli("no-such-command"), tmp_path, before, "invalid choice")


def test_import_gguf_bad_file_writes_nothing(cli, tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("import-gguf", tmp_path / "fake.gguf", "-o", tmp_path / "out")
    _assert_clean_failure(result, tmp_path, before, "not a GGUF file")


def test_existing_output_is_not_overwritten(cli, tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"GGUF")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    before = sorted(p.name for p in tmp_path.iterdir())
    _assert_clean_failure(cli("import-gguf", tmp_path / "fake.gguf", "-o", tmp_path / "out"), tmp_path, before,
                          "already exists")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def _copy(src, dst):
    shutil.copytree(src, dst)
    for path in [dst, *dst.iterdir()]:  # the shared assets are read-only; the copies must not be
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dst


def test_output_may_not_be_or_contain_an_input(cli, stories_dir, tmp_path):
    model = _copy(stories_dir, tmp_path / "model")
    before = sorted(p.name for p in tmp_path.iterdir())
    prune = ["--sparsity", "0.5", "--method", "magnitude", "--overwrite"]
    _assert_clean_failure(cli("prune", model, "-o", model, *prune), tmp_path, before, "is the input")
    _assert_clean_failure(cli("prune", model, "-o", tmp_path, *prune), tmp_path, before, "contains the input")
    _assert_clean_failure(cli("pack", model, "-o", model, "--overwrite"), tmp_path, before, "is the input")
    (model / "adapter").mkdir()
    (model / "adapter" / "adapter_config.json").write_text("{}")
    before = sorted(p.name for p in tmp_path.iterdir())
    _assert_clean_failure(cli("merge", model, "--adapter", model / "adapter", "-o", model, "--overwrite"),
                          tmp_path, before, "is the input")
    assert (model / "model.safetensors").read_bytes() == (stories_dir / "model.safetensors").read_bytes()


def test_output_check_covers_input_files_and_skips_aliases(tmp_path):
    from losa_deploy.errors import LosaError
    from losa_deploy.utils.fs import check_output_dir

    (tmp_path / "x.gguf").write_bytes(b"GGUF")  # a .gguf model: its imported copy is elsewhere, in the cache
    with pytest.raises(LosaError, match="contains the input"):
        check_output_dir(tmp_path, overwrite=True, inputs=(tmp_path / "cache" / "x", tmp_path / "x.gguf"))
    assert check_output_dir(tmp_path / "out", inputs=("smollm2-135m",)) == tmp_path / "out"


def test_result_files_are_checked_before_any_work(cli, stories_dir, tmp_path, monkeypatch):
    (tmp_path / "adir").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    prune = ["prune", stories_dir, "-o", tmp_path / "out", "--sparsity", "0.5", "--method", "magnitude"]
    _assert_clean_failure(cli(*prune, "--json", tmp_path / "adir"), tmp_path, before, "--json")
    _assert_clean_failure(cli(*prune, "--plot", tmp_path / "adir"), tmp_path, before, "is a directory")
    _assert_clean_failure(cli(*prune, "--json", tmp_path / "out"), tmp_path, before, "is the output directory")
    _assert_clean_failure(cli("env", "--json", tmp_path / "adir"), tmp_path, before, "is a directory")
    _assert_clean_failure(cli("inspect", stories_dir, "--plot", tmp_path / "adir"), tmp_path, before,
                          "is a directory")
    # An unwritable folder (root ignores modes, so the check is what is faked).
    import os

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "adir") else
                        real_access(p, mode))
    _assert_clean_failure(cli(*prune[:3], tmp_path / "adir" / "out", *prune[4:]), tmp_path, before,
                          "is not writable")
    _assert_clean_failure(cli(*prune, "--json", tmp_path / "adir" / "r.json"), tmp_path, before, "is not writable")


def test_json_and_plot_may_not_name_one_file(cli, stories_dir, tmp_path):
    """The plot would be written over the JSON (or the other way round): refused before any work."""
    before = sorted(p.name for p in tmp_path.iterdir())
    same = ["--json", tmp_path / "r.png", "--plot", tmp_path / "r.png"]
    _assert_clean_failure(cli("inspect", stories_dir, *same), tmp_path, before, "--json and --plot both name")
    _assert_clean_failure(cli("bench", stories_dir, *same), tmp_path, before, "--json and --plot both name")
    _assert_clean_failure(cli("prune", stories_dir, "-o", tmp_path / "out", "--sparsity", "0.5", "--method",
                              "magnitude", "--json", tmp_path / "r.json", "--plot", f"{tmp_path}/./r.json"),
                          tmp_path, before, "--json and --plot both name")


def test_a_plot_is_written_in_the_format_its_suffix_names(cli, stories_dir, tmp_path):
    for suffix, magic in ((".svg", b"<svg"), (".pdf", b"%PDF"), (".PNG", b"\x89PNG")):
        code, _, err = cli("inspect", stories_dir, "--plot", tmp_path / f"s{suffix}")
        assert code == 0, err
        assert magic in (tmp_path / f"s{suffix}").read_bytes()[:400]
    before = sorted(p.name for p in tmp_path.iterdir())
    for name in ("s.txt", "s"):
        _assert_clean_failure(cli("inspect", stories_dir, "--plot", tmp_path / name), tmp_path, before,
                              "name a .png, .svg or .pdf file")
    _assert_clean_failure(cli("bench", stories_dir, "--plot", tmp_path / "b.jpg"), tmp_path, before,
                          "name a .png, .svg or .pdf file")


def test_resume_without_a_checkpoint_keeps_a_finished_output(cli, stories_dir, tinystories, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("finetune", stories_dir, "-o", tmp_path / "out", "--data", tinystories, "--method", "lora", "--sparsity", "0.5",
                 "--resume")
    _assert_clean_failure(result, tmp_path, before, "already exists")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("args,match", [
    (["--lr", "-1"], "learning rate"), (["--lr", "nan"], "learning rate"), (["--max-len", "1"], "max_len"),
    (["--autocast", "fp8"], "unknown autocast mode"), (["--warmup", "1.5"], "warm-up"),
    (["--alpha", "inf"], "alpha"),
])
def test_finetune_options_fail_before_any_work(cli, stories_dir, tinystories, tmp_path, args, match):
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("finetune", stories_dir, "-o", tmp_path / "out", "--data", tinystories, "--method", "lora",
                 "--sparsity", "0.5", *args)
    _assert_clean_failure(result, tmp_path, before, match)


@pytest.mark.parametrize("args,match", [
    (["--method", "sparsegpt", "--sparsity", "0.5", "--percdamp", "-1"], "percdamp"),
    (["--method", "sparsegpt", "--sparsity", "0.5", "--percdamp", "nan"], "percdamp"),
    (["--method", "magnitude", "--sparsity", "0.7", "--allocation", "ALLOC"], "does not apply with an allocation"),
    (["--method", "wanda", "--sparsity", "0.5", "--allocation", "rmi", "--nsamples", "2"], "--nsamples >= 3"),
    (["--method", "magnitude", "--structure", "mixed-2:4", "--allocation", "ALLOC30"], "not a whole N of M=4"),
    (["--method", "magnitude", "--allocation", "HUGE"], "must be a number in [0, 1)"),
    (["--method", "magnitude", "--allocation", "ALLOC04"], "'04' is neither a block index"),
    (["--method", "magnitude", "--allocation", "ADIR"], "is a directory"),
    (["--method", "magnitude", "--structure", "2:99999999999999999999"], "2 <= M <= 64"),
    (["--method", "magnitude", "--sparsity", "0.5", "--calib", "NOFILE"], "does not exist"),
], ids=["percdamp-negative", "percdamp-nan", "sparsity-with-file", "rmi-2-windows", "file-off-grid",
        "file-huge-int", "file-key-04", "file-is-dir", "huge-m", "unused-calib-missing"])
def test_prune_options_fail_before_any_work(cli, stories_dir, tmp_path, args, match):
    (tmp_path / "alloc.json").write_text(json.dumps([0.5] * 5))
    (tmp_path / "alloc30.json").write_text(json.dumps([0.3] * 5))
    (tmp_path / "huge.json").write_text("[" + ", ".join(["1" + "0" * 400] * 5) + "]")
    (tmp_path / "alloc04.json").write_text(json.dumps({"0": 0.5, "1": 0.5, "2": 0.5, "3": 0.5, "04": 0.5}))
    (tmp_path / "adir").mkdir()
    files = {"ALLOC": "alloc.json", "ALLOC30": "alloc30.json", "HUGE": "huge.json", "ALLOC04": "alloc04.json",
             "ADIR": "adir", "NOFILE": "nothing.txt"}
    args = [str(tmp_path / files[a]) if a in files else a for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    _assert_clean_failure(cli("prune", stories_dir, "-o", tmp_path / "out", *args), tmp_path, before, match)


def test_corrupt_files_are_one_line_errors(cli, stories_dir, tinystories, tmp_path):
    import struct

    model = _copy(stories_dir, tmp_path / "model")
    raw = bytearray((model / "model.safetensors").read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    at = raw.index(b'"F32"', 8, 8 + header_len)
    raw[at:at + 5] = b'"F16"'  # same length: the header parses, but a tensor's bytes no longer fit it
    (model / "model.safetensors").write_bytes(bytes(raw))
    (tmp_path / "t.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x00\x00")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    before = sorted(p.name for p in tmp_path.iterdir())
    for command in (["inspect", model], ["eval", model, "--data", tinystories, "--seqlen", "64"],
                    ["pack", model, "-o", tmp_path / "p"]):
        _assert_clean_failure(cli(*command), tmp_path, before, "does not fit bytes")
    _assert_clean_failure(cli("import-gguf", tmp_path / "t.gguf", "-o", tmp_path / "g"), tmp_path, before,
                          "corrupt or truncated GGUF")
    _assert_clean_failure(cli("merge", stories_dir, "--adapter", adapter, "-o", tmp_path / "m"), tmp_path, before,
                          "not a valid safetensors file")


def test_nan_weights_and_packed_checkpoints_are_refused(cli, stories_dir, tinystories, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    model = _copy(stories_dir, tmp_path / "nan")
    state = load_file(model / "model.safetensors")
    key = next(k for k in state if k.endswith("mlp.up_proj.weight"))
    state[key][3, 5] = float("nan")
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    assert cli("pack", stories_dir, "-o", tmp_path / "packed", "--format", "losa")[0] == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    prune = ["-o", tmp_path / "out", "--sparsity", "0.5", "--method", "magnitude"]
    _assert_clean_failure(cli("eval", model, "--data", tinystories, "--seqlen", "64"), tmp_path, before,
                          f"weight {key} holds NaN")
    _assert_clean_failure(cli("prune", model, *prune), tmp_path, before, f"weight {key} holds NaN")
    for command in (["eval", tmp_path / "packed", "--data", tinystories], ["prune", tmp_path / "packed", *prune]):
        _assert_clean_failure(cli(*command), tmp_path, before, "is a packed checkpoint")
    assert torch.isnan(load_file(model / "model.safetensors")[key]).any()


def test_reports_never_replace_an_input(cli, stories_dir, tinystories, tmp_path):
    """--json / --plot that name an input file, or a file inside an input folder, would overwrite it after
    the work (a PNG in place of the model's weights); a new file beside the model is fine."""
    model = _copy(stories_dir, tmp_path / "model")
    calib = tmp_path / "calib.txt"
    calib.write_text(tinystories.read_text()[:20000])
    (tmp_path / "alloc.json").write_text(json.dumps([0.5] * 5))
    weights = (model / "model.safetensors").read_bytes()
    prune = ["prune", model, "-o", tmp_path / "out", "--method", "wanda", "--sparsity", "0.5", "--calib", calib,
             "--nsamples", "2", "--seqlen", "32"]
    before = sorted(p.name for p in tmp_path.iterdir())
    _assert_clean_failure(cli(*prune, "--plot", model / "model.safetensors"), tmp_path, before,
                          "would replace a file of the input")
    _assert_clean_failure(cli(*prune, "--json", calib), tmp_path, before, "would replace the input")
    _assert_clean_failure(cli("eval", model, "--data", calib, "--seqlen", "32", "--json", calib), tmp_path, before,
                          "would replace the input")
    _assert_clean_failure(cli("prune", model, "-o", tmp_path / "out", "--method", "magnitude", "--allocation",
                              tmp_path / "alloc.json", "--json", tmp_path / "alloc.json"), tmp_path, before,
                          "would replace the input")
    assert (model / "model.safetensors").read_bytes() == weights
    _assert_clean_failure(cli("eval", model, "--data", calib, "--seqlen", "32", "--json", model / "config.json"),
                          tmp_path, before, "would replace a file of the input")
    for _ in range(2):  # a report beside the model's files, written again on the second run
        code, _, err = cli("eval", model, "--data", calib, "--seqlen", "32", "--max-windows", "1", "--no-progress",
                           "--json", model / "eval.json")
        assert code == 0, err
    assert json.loads((model / "eval.json").read_text())["windows"] == 1


def test_an_allocation_file_inside_out_is_an_input(cli, stories_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "alloc.json").write_text(json.dumps([0.5] * 5))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("prune", stories_dir, "-o", tmp_path / "out", "--method", "magnitude", "--allocation",
                 tmp_path / "out" / "alloc.json", "--overwrite")
    _assert_clean_failure(result, tmp_path, before, "contains the input")
    assert (tmp_path / "out" / "alloc.json").is_file()


def test_an_existing_file_is_replaced_only_if_it_is_a_report(cli, stories_dir, tmp_path):
    """--json / --plot on an existing file that is not one of our reports (a data file named by mistake,
    as a helper once did with the shared TinyStories text) is refused; a previous report is rewritten."""
    data = tmp_path / "notes.txt"
    data.write_text("precious text\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    _assert_clean_failure(cli("inspect", stories_dir, "--json", data), tmp_path, before,
                          "exists and is not a losa-deploy report")
    _assert_clean_failure(cli("inspect", stories_dir, "--plot", data), tmp_path, before,
                          "exists and is not a losa-deploy report")
    assert data.read_text() == "precious text\n"
    report, plot = tmp_path / "r.json", tmp_path / "s.png"
    for _ in range(2):  # the second run replaces the first one's report and plot
        code, _, err = cli("inspect", stories_dir, "--json", report, "--plot", plot)
        assert code == 0, err
    assert json.loads(report.read_text())["command"] == "inspect"
    assert plot.read_bytes().startswith(b"\x89PNG")

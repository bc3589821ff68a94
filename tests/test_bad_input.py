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
        if kind == "no-weights":
            (path / "model.safetensors").unlink()
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
                                        ("truncated", "truncated"), ("unsupported", "unsupported architecture")])
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


def test_seqlen_longer_than_context(cli, stories_dir, tinystories, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("eval", stories_dir, "--data", tinystories, "--seqlen", 1024, "--json", tmp_path / "out.json")
    _assert_clean_failure(result, tmp_path, before, "longer than the model's context (512")


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

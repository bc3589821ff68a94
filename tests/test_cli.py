"""The CLI contract: every command has --help, --json and the same error convention."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from losa_deploy.cli import COMMANDS
from losa_deploy.kernels.placement import thp_mode


@pytest.mark.parametrize("command", [c[0] for c in COMMANDS])
def test_every_command_has_help(cli, command):
    code, out, _ = cli(command, "--help")
    assert code == 0 and "--json" in out and "usage:" in out


def test_unbuilt_commands_say_so(cli):
    import importlib.util

    pending = [c for c, module, _ in COMMANDS if importlib.util.find_spec(f"losa_deploy.cli.{module}") is None]
    for command in pending:
        code, _, err = cli(command, "anything")
        assert code == 2 and err.startswith("error: ") and "not built yet" in err


def test_env_reports_kernels_and_cpu(cli, tmp_path):
    code, out, _ = cli("env", "--json", tmp_path / "env.json")
    env = json.loads((tmp_path / "env.json").read_text())
    assert code == 0 and env["command"] == "env"
    assert env["packages"]["torch"].startswith("2.13.0")
    assert set(env["cpu"]["features"]) >= {"avx2", "avx512f", "avx512bf16", "avx512vnni", "avx512vbmi2"}
    assert "losa::pack_mask" in env["kernels"]["ops"] or not env["kernels"]["compiled"]
    assert "kernels:" in out and "features:" in out
    mode = thp_mode()
    assert env["memory"]["transparent_huge_pages"] == mode
    expected = "2 MiB huge pages" if mode in ("always", "madvise") else "4 KiB pages"
    assert env["memory"]["packed_weights"].startswith(expected) and f"memory:    packed CPU weights on {expected}" in out


def test_env_says_when_placement_is_off(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("LOSA_HUGE_PAGES", "0")
    code, out, _ = cli("env", "--json", tmp_path / "env.json")
    env = json.loads((tmp_path / "env.json").read_text())
    assert code == 0 and env["memory"]["packed_weights"] == "default allocator (LOSA_HUGE_PAGES=0)"
    assert "packed CPU weights on default allocator (LOSA_HUGE_PAGES=0)" in out


def test_env_reports_an_unrunnable_deepsparse_python_and_the_rest(cli, stories_dir, tmp_path, monkeypatch):
    """LOSA_DEEPSPARSE_PYTHON naming a file that cannot run: deepsparse is unusable, with the reason; the
    rest of the report stays (the whole command failed with Permission denied)."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 1.8.0\n")
    python.chmod(0o644)  # no execute bit: refused even to root
    monkeypatch.setenv("LOSA_DEEPSPARSE_PYTHON", str(python))
    code, out, err = cli("env", "--json", tmp_path / "env.json")
    assert code == 0, err
    deepsparse = json.loads((tmp_path / "env.json").read_text())["engines"]["deepsparse"]
    assert deepsparse["installed"] is False and "Permission denied" in deepsparse["error"]
    assert "kernels:" in out and "onnxruntime" in out
    line = next(line for line in out.splitlines() if "deepsparse" in line)
    assert "unusable" in line and str(python) in line and "Permission denied" in line
    code, _, err = cli("bench", stories_dir, "--engine", "deepsparse")
    assert code == 2 and err.count("\n") == 1 and f"{python} is not executable" in err


def test_bench_refuses_a_deepsparse_python_without_deepsparse(cli, stories_dir, monkeypatch):
    """LOSA_DEEPSPARSE_PYTHON naming a Python that runs but lacks the package (this venv's): refused in one
    line before any worker loads, not at the worker's import."""
    monkeypatch.setenv("LOSA_DEEPSPARSE_PYTHON", sys.executable)
    code, _, err = cli("bench", stories_dir, "--engine", "torch,deepsparse")
    assert code == 2 and err.count("\n") == 1 and f"{sys.executable} cannot import deepsparse" in err


def test_readme_source_paths_exist():
    """Every file path the README names in backticks (with a folder: bare names are read in context) is in
    the repository, at its root or under losa_deploy/; only DeepSparse's own files are elsewhere."""
    import re

    root = Path(__file__).resolve().parents[1]
    deepsparse = {"utils/onnx.py", "transformers/utils/helpers.py", "engines/nl_decoder_engine.py"}
    named = set(re.findall(r"`([\w./-]+/[\w.-]+\.(?:py|sh))`", (root / "README.md").read_text()))
    missing = [p for p in sorted(named - deepsparse)
               if not (root / p).exists() and not (root / "losa_deploy" / p).exists()]
    assert named and missing == []


@pytest.mark.parametrize("entry", ["script", "module"])
def test_installed_entry_points_run(entry):
    script = Path(sys.executable).with_name("losa-deploy")
    exe = [str(script)] if entry == "script" else [sys.executable, "-m", "losa_deploy"]
    done = subprocess.run([*exe, "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("losa-deploy ")
    bad = subprocess.run([*exe, "inspect", "/no/such/dir"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: model directory /no/such/dir does not exist"


def test_public_api_names_are_not_shadowed_by_submodules():
    """``losa_deploy.X`` must stay the API function: importing a submodule named X would replace it."""
    import pkgutil

    import losa_deploy

    submodules = {m.name for m in pkgutil.iter_modules(losa_deploy.__path__)}
    assert not submodules & losa_deploy._API


@pytest.mark.parametrize("command", ["prune", "finetune"])
def test_a_data_file_error_suggests_only_flags_the_command_has(cli, stories_dir, tmp_path, command):
    """A JSONL file without a known text field: the error told prune and finetune users to pass
    --text-field, which only eval has (argparse then refused it)."""
    import re

    from losa_deploy.cli import build_parser

    data = tmp_path / "body.jsonl"
    data.write_text('{"body": "Once upon a time there was a cat."}\n' * 20)
    flag = {"prune": "--calib", "finetune": "--data"}[command]
    code, _, err = cli(command, stories_dir, "-o", tmp_path / "out", "--sparsity", "0.5", flag, data)
    assert code == 2 and "no text field" in err
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    suggested = set(re.findall(r"(?<!eval's )(--[a-z-]+)", err))
    assert suggested <= set(sub._option_string_actions), suggested

"""The README's Python examples against the package: every import they show imports, and every call they
make to our API names a function that exists and takes those arguments (by position and keyword), so a
renamed function or keyword cannot leave the README describing an API we no longer have. Out of scope:
calls on the objects our functions return (``model.generate``), and the ```bash blocks (the CLI's options
are checked by the CLI tests)."""

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

import losa_deploy

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def imported_names(tree):
    """What the block's imports bind, imported for real (a missing module or name raises here)."""
    names = {"ld": losa_deploy}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "losa_deploy":
            module = importlib.import_module(node.module)
            for alias in node.names:
                names[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "losa_deploy":
                    names[alias.asname or alias.name] = importlib.import_module(alias.name)
    return names


def our_callee(func, names):
    """The object a call's function expression names, when it is ours (ld.f, f, Class.method); else None."""
    if isinstance(func, ast.Name):
        return names.get(func.id)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in names:
        owner = names[func.value.id]
        assert hasattr(owner, func.attr), f"README calls {func.value.id}.{func.attr}, which does not exist"
        return getattr(owner, func.attr)
    return None


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 5


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_calls_match_the_api(index):
    block = python_blocks()[index]
    tree = ast.parse(block)  # an example that is not Python is a README bug too
    names = imported_names(tree)
    checked = 0
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        callee = our_callee(call.func, names)
        if callee is None or not callable(callee):
            continue
        args = [None] * len(call.args)
        kwargs = {k.arg: None for k in call.keywords if k.arg is not None}
        where = f"README line `{ast.get_source_segment(block, call)}`"
        signature = inspect.signature(callee)
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            pytest.fail(f"{where}: {e}")
        # A **kwargs parameter accepts any keyword: the README's must still be named parameters.
        unnamed = set(kwargs) - set(signature.parameters)
        assert not unnamed, f"{where}: {sorted(unnamed)} only reach **kwargs"
        checked += 1
    assert checked, "the example calls none of our functions"

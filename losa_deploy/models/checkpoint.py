"""Loading and saving local Hugging Face causal-LM checkpoints, safely.

* Weights come from safetensors. Pickled ``.bin`` files are accepted only if ``torch.load(...,
  weights_only=True)`` can read them; anything needing arbitrary unpickling is refused.
* ``trust_remote_code`` is never enabled unless the caller passes it.
* Every file is checked before transformers sees it, so a missing directory, a config without weights,
  a truncated file or an unsupported architecture is a one-line :class:`LosaError`, not a traceback or,
  worse, a model silently filled with random weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

from ..errors import LosaError
from ..utils.fs import atomic_dir
from .arch import architecture_for

logger = logging.getLogger("losa_deploy")

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

# Files transformers writes beside the weights that a loaded checkpoint should keep.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise LosaError(f"unknown dtype '{name}' (choose from bf16, fp16, fp32)") from None


# What transformers reads, in its order of preference: the one file, else a shard index.
_STANDARD_WEIGHTS = (("model.safetensors", "model.safetensors.index.json"),
                     ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files, as transformers picks them: ``model.safetensors``, else the shards
    its index lists, else the same for ``pytorch_model.bin``. Other files beside them (a
    ``consolidated.safetensors`` some repositories also ship, a stale shard) are not the model's. A folder
    with none of these names: every ``*.safetensors``, else every ``pytorch_model*.bin``."""
    for single, index in _STANDARD_WEIGHTS:
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            return _indexed_files(path / index)
    st = sorted(path.glob("*.safetensors"))
    return st if st else sorted(path.glob("pytorch_model*.bin"))


def _indexed_files(index: Path) -> list[Path]:
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [index.parent / name for name in names]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LosaError(f"{index} is not a shard index with a weight_map of file names ({exc})") from None
    if not files:
        raise LosaError(f"{index} lists no shard files")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise LosaError(f"{index} lists {missing[0]}, which is not there")
    return files


# safetensors' dtype names (the writer in export/writer.py uses the same table).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_WEIGHT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)  # what our commands write


def _safetensors_header(file: Path) -> tuple[int, dict]:
    """(header length, the tensors' entries) of a safetensors file, read from its first bytes only."""
    with open(file, "rb") as raw:
        header_len = int.from_bytes(raw.read(8), "little")
        if header_len > file.stat().st_size - 8:
            raise ValueError("header length exceeds the file size")
        header = json.loads(raw.read(header_len))
    return header_len, {k: v for k, v in header.items() if k != "__metadata__"}


def stored_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every stored tensor's name and shape, from the safetensors headers (pickles: loaded on the meta
    device), without reading any data."""
    shapes, where = {}, {}
    for file in weight_files(Path(path)):
        if file.suffix == ".safetensors":
            found = {k: tuple(e["shape"]) for k, e in _safetensors_header(file)[1].items()}
        else:
            found = {k: tuple(t.shape) for k, t in
                     torch.load(file, map_location="meta", weights_only=True, mmap=True).items()}
        for key in found:
            if key in where:
                raise LosaError(f"{path}: {key} is stored twice, in {where[key]} and {file.name}")
            where[key] = file.name
        shapes.update(found)
    return shapes


def stored_dtype(path: str | os.PathLike) -> torch.dtype:
    """The floating dtype most of the checkpoint's weights are stored in (from the safetensors headers; the
    config's ``dtype`` for pickles), so a command that computes in fp32 writes back what it read."""
    counts: dict[torch.dtype, int] = {}
    for file in weight_files(Path(path)):
        if file.suffix != ".safetensors":
            break
        for entry in _safetensors_header(file)[1].values():
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype in _WEIGHT_DTYPES:
                counts[dtype] = counts.get(dtype, 0) + math.prod(entry["shape"])
    if counts:
        return max(counts, key=counts.get)
    config = read_config(path)
    return parse_dtype(config.get("dtype") or config.get("torch_dtype") or "fp32") or torch.float32


def read_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise LosaError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise LosaError(f"model path {path} is not a directory (a .gguf file? use `losa-deploy import-gguf`)")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise LosaError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        return json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LosaError(f"{cfg_path} is not valid JSON ({exc})") from None


def check_checkpoint(path: str | os.PathLike, trust_remote_code: bool = False, packed: bool = False) -> dict:
    """Validate a model directory without loading the model; returns its config as a dict. ``packed``: a
    ``losa`` / ``vllm`` packed checkpoint is what the caller reads (only ``losa_deploy.load`` does)."""
    path = Path(path)
    config = read_config(path)
    if not packed and is_packed(config):
        raise LosaError(f"{path} is a packed checkpoint (losa_sparse): serve it with losa_deploy.load or vLLM; "
                        "inspect reads it too, the other commands an unpacked one (e.g. `pack --format hf` of "
                        "its source)")
    if "auto_map" in config and not trust_remote_code:
        raise LosaError(f"{path} ships its own modelling code (auto_map); pass --trust-remote-code to run it")
    model_type = config.get("model_type")
    if model_type is None:
        raise LosaError(f"{path}/config.json has no model_type")
    architecture_for(model_type)
    files = weight_files(path)
    if not files:
        if (path / "model.onnx").is_file():  # pack --format deepsparse wrote it
            raise LosaError(f"{path} is an ONNX export (model.onnx, the deepsparse format): run it with bench "
                            "--engine onnxruntime|deepsparse; the other commands read its HF source")
        raise LosaError(f"{path} has config.json but no weights (*.safetensors or pytorch_model*.bin)")
    for file in files:
        if file.suffix == ".safetensors":
            check_safetensors(file)
        else:
            _check_pickle(file)
    return config


def is_packed(config: dict) -> bool:
    """Whether config.json describes our packed format (``losa`` writes the block, ``vllm`` a quant method)."""
    return "losa_sparse" in config or (config.get("quantization_config") or {}).get("quant_method") == "losa_sparse"


def is_packed_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the folder ``path`` holds a packed checkpoint (a config.json that :func:`is_packed` accepts)."""
    path = Path(path)
    return (path / "config.json").is_file() and is_packed(read_config(path))


def check_safetensors(file: str | os.PathLike) -> None:
    """Check, from the header alone, that a safetensors file is whole and consistent: every tensor's bytes lie
    in the file and match its dtype and shape (a wrong dtype or shape otherwise surfaces as a library
    traceback half-way through a command)."""
    file = Path(file)
    try:
        size = file.stat().st_size
        header_len, entries = _safetensors_header(file)
        for key, entry in entries.items():
            begin, end = entry["data_offsets"]
            numel = math.prod(entry["shape"])
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])  # others are only checked to lie in the file
            if not 0 <= begin <= end or (dtype is not None and end - begin != numel * dtype.itemsize):
                raise ValueError(f"tensor {key}: {entry['dtype']} {entry['shape']} does not fit bytes {begin}..{end}")
        data_end = max((v["data_offsets"][1] for v in entries.values()), default=0)
    except OSError as exc:
        raise LosaError(f"cannot read {file}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise LosaError(f"{file} is not a valid safetensors file ({exc})") from None
    if size < 8 + header_len + data_end:
        raise LosaError(f"{file} is truncated: its header needs {8 + header_len + data_end} bytes, the file has {size}")


def _check_pickle(file: Path) -> None:
    try:
        torch.load(file, map_location="meta", weights_only=True, mmap=True)
    except Exception as exc:
        raise LosaError(
            f"refusing {file}: it cannot be loaded with weights_only=True ({type(exc).__name__}); "
            "convert it to safetensors"
        ) from None


def load_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Load a causal LM from a local directory. ``dtype=None`` keeps the stored dtype."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    check_checkpoint(path, trust_remote_code)
    torch_dtype = parse_dtype(dtype)
    model, info = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch_dtype if torch_dtype is not None else "auto",
        trust_remote_code=trust_remote_code,
        local_files_only=True,
        weights_only=True,
        output_loading_info=True,
    )
    missing = [k for k in info.get("missing_keys", []) if not _is_tied(model, k)]
    if missing:
        raise LosaError(f"{path} is missing {len(missing)} weight(s), e.g. {sorted(missing)[0]}")
    if info.get("mismatched_keys"):
        raise LosaError(f"{path} has weights of the wrong shape, e.g. {info['mismatched_keys'][0]}")
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise LosaError(f"{path} is corrupt: weight {name} holds NaN or Inf values")
    model.eval()
    return model.to(device)


def _is_tied(model, key: str) -> bool:
    # transformers reports a tied lm_head as missing in some versions; it is not.
    return key.startswith("lm_head") and bool(getattr(model.config, "tie_word_embeddings", False))


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise LosaError(f"{path} has no tokenizer files (tokenizer.json or tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise LosaError(f"cannot load the tokenizer in {path}: {type(exc).__name__}: {exc}") from None


def save_model(model, out: str | os.PathLike, tokenizer=None, overwrite: bool = False,
               extra_files: dict[str, str] | None = None) -> Path:
    """Save as safetensors (exact tensors), atomically. ``extra_files`` maps file name -> text."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)
